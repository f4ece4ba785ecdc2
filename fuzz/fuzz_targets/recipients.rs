//! Recipients files (`age -R` format, as `recipients_file` or `recipients = [...]`): any text
//! must give `Ok` or an error; what parses must print back to recipients that parse again.
#![no_main]

use dr_core::keys::Recipients;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(r) = Recipients::parse_all(text.lines(), "fuzz") else {
        return;
    };
    let printed = r.to_strings();
    let again = Recipients::parse_all(printed.iter().map(String::as_str), "again")
        .expect("printed recipients parse");
    assert_eq!(again.to_strings(), printed);
});
