//! JSON read back from the repository besides manifests: drill reports (listed by `dr drill
//! --history` and plotted) and the row counts a backup records for drills. Any bytes must
//! give `Ok` or an error, and whatever parses must render without panicking.
#![no_main]

use std::collections::BTreeMap;

use dr_drills::report::{plot_svg, DrillReport};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = serde_json::from_slice::<DrillReport>(data) {
        let _ = plot_svg(std::slice::from_ref(&r), &r.database);
        let _ = plot_svg(&[r.clone(), r], "two");
    }
    let _ = serde_json::from_slice::<BTreeMap<String, u64>>(data);
});
