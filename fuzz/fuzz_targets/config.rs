//! The configuration file: TOML text -> validated `Config` (durations, cron expressions,
//! time zones, connection and storage URLs, recipients). Any input must give `Ok` or an
//! error, never a panic.
#![no_main]

use std::path::Path;

use dr_core::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(init: {
    // As under systemd's LoadCredential=, so `$CREDENTIALS_DIRECTORY/...` paths expand.
    // SAFETY: set once before any input runs, while no other thread reads the environment.
    unsafe { std::env::set_var("CREDENTIALS_DIRECTORY", "/run/credentials/dr-agent.service") };
}, |data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(text, Path::new("fuzz.toml")) {
        // What validation let through must be usable without re-checking.
        for db in &config.databases {
            let _ = db.url.dbname();
            for s in &db.schedules {
                let _ = s.keep.seconds_at(jiff::Timestamp::MAX);
                let _ = s.keep.seconds_at(jiff::Timestamp::MIN);
            }
        }
        let _ = config
            .recipients()
            .expect("recipients were validated at load");
    }
});
