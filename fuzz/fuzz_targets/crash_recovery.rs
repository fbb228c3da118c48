//! The fuzzer's bytes drive the deterministic simulation (`coffer::sim`): they choose the
//! requests, the group commits, the clock, the crash points, which unsynced writes survive
//! and where the last one tears, failed writes and syncs, and bit flips on recovery reads.
//! After every crash the engine recovers and is checked against the reference model fed
//! only what was acknowledged; any disagreement, lost acknowledged operation, double
//! application or panic is a crash of this target.

#![no_main]

use coffer::sim::{run, ByteChoices, SimOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let options = SimOptions {
        steps: 150,
        segment_bytes: 2048,
    };
    if let Err(error) = run(&mut ByteChoices::new(data), &options) {
        panic!("simulation failed: {error}");
    }
});
