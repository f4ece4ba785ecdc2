//! Manifests as read from the repository: any bytes must give `Ok` or an error, never a
//! panic; a manifest that parses must serialize back to itself, and every field that becomes
//! part of an object key (environment, database, object names) must be one path
//! segment, so a tampered manifest cannot point a restore or prune outside its backup.
#![no_main]

use dr_core::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fn one_segment(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains(['/', '\\', '\0'])
}

fuzz_target!(|data: &[u8]| {
    let key = "staging/app/backups/20261122T030000Z-3f9a/manifest.json";
    let Ok(m) = Manifest::from_json(key, data) else {
        return;
    };
    assert!(
        one_segment(&m.environment),
        "environment {:?}",
        m.environment
    );
    assert!(one_segment(&m.database), "database {:?}", m.database);
    for o in &m.objects {
        assert!(one_segment(&o.name), "object name {:?}", o.name);
    }
    let again = Manifest::from_json(key, &m.to_json()).expect("a written manifest reads back");
    assert_eq!(again, m);
});
