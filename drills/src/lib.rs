//! `dr-drills`: scratch targets (an ephemeral cluster or a scratch server), drill runs,
//! checks, RTO measurement and drill reports.
//!
//! Not built yet: it will drive `dr_restore` into targets it created itself.
