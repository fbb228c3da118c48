//! Deterministic simulation (see `coffer::sim`): the real engine on a simulated disk, with
//! crashes (also between the two halves of a transfer), torn writes, failed writes and syncs
//! and flipped bits on read, checked against a reference model after every answer and at
//! every quiet point.
//!
//! `cargo test` runs 200 seeds. `COFFER_SIM_SEEDS=N` runs N seeds; `COFFER_SIM_SEED=S` runs
//! seed S alone (a failure prints the command that reproduces it); `COFFER_SIM_BYTES=FILE`
//! replays an input of the `crash_recovery` fuzz target.

use coffer::sim::{run, run_seed, ByteChoices, SimOptions, SimReport};

fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    match text.parse() {
        Ok(value) => Some(value),
        Err(_) => panic!("{name}={text} is not a number"),
    }
}

#[test]
fn crashes_and_storage_faults_lose_nothing_acknowledged_and_apply_nothing_twice() {
    let options = SimOptions::default();
    let seeds: Vec<u64> = match env_u64("COFFER_SIM_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("COFFER_SIM_SEEDS").unwrap_or(200)).collect(),
    };
    let mut total = SimReport::default();
    for seed in &seeds {
        match run_seed(*seed, &options) {
            Ok(report) => total.add(&report),
            Err(error) => panic!(
                "simulation failed: {error}\nreproduce: COFFER_SIM_SEED={seed} cargo test --test simulation"
            ),
        }
    }
    println!("{} seeds: {total:?}", seeds.len());
    // The runs must have exercised what they claim to: a run that never crashed or never
    // applied anything would pass for the wrong reason.
    if seeds.len() >= 50 {
        assert!(
            total.applied > 0 && total.refused > 0 && total.replayed > 0,
            "{total:?}"
        );
        assert!(total.crashes > seeds.len() as u64, "{total:?}");
        assert!(
            total.storage_faults > 0 && total.read_flips_detected > 0,
            "{total:?}"
        );
        assert!(
            total.resent_after_crash > 0 && total.expired > 0,
            "{total:?}"
        );
        assert!(total.restarts > 0, "{total:?}");
        // Transfers completed and failed (refunded), and some a crash tore between their
        // debit and their credit, finished by recovery.
        assert!(
            total.transfers_completed > 0
                && total.transfers_failed > 0
                && total.transfers_finished_by_recovery > 0,
            "{total:?}"
        );
    }
}

/// Replays a `crash_recovery` fuzz input: `COFFER_SIM_BYTES=path cargo test --test simulation`.
#[test]
fn a_fuzz_input_replays_when_given() {
    let Ok(path) = std::env::var("COFFER_SIM_BYTES") else {
        return;
    };
    let bytes = std::fs::read(&path).expect("COFFER_SIM_BYTES names a readable file");
    if let Err(error) = run(&mut ByteChoices::new(&bytes), &SimOptions::fuzz()) {
        panic!("simulation failed on {path}: {error}");
    }
}

#[test]
fn a_seed_reproduces_exactly() {
    let options = SimOptions::default();
    for seed in [1, 7, 42] {
        let first = run_seed(seed, &options).expect("simulation");
        let second = run_seed(seed, &options).expect("simulation");
        assert_eq!(first, second, "seed {seed} ran differently twice");
    }
}
