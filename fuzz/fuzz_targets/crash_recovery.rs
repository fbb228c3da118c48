//! The fuzzer's bytes drive the deterministic simulation (`coffer::sim`): they choose the
//! requests, the group commits, the clock, the crash points, which unsynced writes survive
//! and where the last one tears, failed writes and syncs, and bit flips on recovery reads.
//! After every crash the engine recovers and is checked against the reference model fed
//! only what was acknowledged; any disagreement, lost acknowledged operation, double
//! application or panic is a crash of this target. To replay a crash without nightly:
//! `COFFER_SIM_BYTES=fuzz/artifacts/crash_recovery/crash-... COFFER_SIM_TRACE=1 cargo test
//! --test simulation`.

#![no_main]

use coffer::sim::{run, ByteChoices, SimOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(error) = run(&mut ByteChoices::new(data), &SimOptions::fuzz()) {
        panic!("simulation failed: {error}");
    }
});
