//! `dr-restore`: choosing a backup, fetching, verifying, decrypting and restoring it
//! (`dr restore`, `dr verify`). The drills reuse this engine.
//!
//! Not built yet: it will run the pipeline stages of `dr_core::pipeline` backwards.
