//! Recovery at scale: builds a data directory of ACCOUNTS accounts (default 1,000,000) and
//! EVENTS events (default 10,000,000) through the real WAL writer, then measures, in one run:
//!
//! - replay rate: a cold start from the WAL alone (events/s);
//! - resident memory per idle account (only its open event: no history, no keys);
//! - snapshot write time and size;
//! - cold start with the snapshot and a WAL tail of TAIL events (default 1,000,000).
//!
//! `cargo bench --bench recovery` (about a minute and 2-3 GB of RAM at the defaults);
//! `ACCOUNTS=100000 EVENTS=1000000 cargo bench --bench recovery` for a quick run;
//! `BENCH_DIR=/path` to build the data somewhere else than a temp dir; `IDLE_ONLY=1` to stop
//! after the memory measure; `REPLAY_ONLY=N` (with `BENCH_DIR`) to build the log once, keep
//! it, and only time N replays of it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coffer::domain::{AccountId, Amount, Currency, Event, EventBody, Metadata, Request};
use coffer::engine::RecoveryReport;
use coffer::storage::FileStorage;
use coffer::wal::{codec, Wal, WalStart, WriterMode};
use coffer::{Engine, EngineConfig};
use uuid::Uuid;

/// The server's allocator (`src/main.rs`), so the memory and speed figures are the server's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resident memory once the allocator has given back what is free: recovery frees large
/// transient buffers (a whole WAL segment is read at a time) that mimalloc returns to the
/// OS only lazily, on later allocator activity, which a running server has and this
/// benchmark, measuring right after the open, does not. Without this the figure varies by
/// 40-60 bytes an account from run to run.
fn settled_rss_bytes() -> u64 {
    // SAFETY: mi_collect takes no pointers; it only returns free memory to the OS.
    unsafe { libmimalloc_sys::mi_collect(true) };
    rss_bytes()
}

/// Resident memory of this process, from /proc (Linux).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// CPU time (user and system) of this process so far, from /proc (Linux; 0 elsewhere): a
/// figure less shaken than wall time by other jobs on a shared machine.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat(5), 11 and 12 after the name; in
    // clock ticks of 1/100 s on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

fn account(i: u64) -> AccountId {
    AccountId::parse(&format!("player-{i:07}")).expect("id")
}

fn config(dir: &Path) -> EngineConfig {
    let mut config = EngineConfig::new(dir);
    config.snapshot_every_records = None;
    config.snapshot_interval = None;
    config.expiry_sweep = None;
    config
}

/// Opens an engine (the whole recovery), timed: the engine, its report and the seconds.
fn open_timed(config: EngineConfig) -> (Engine, RecoveryReport, f64) {
    let started = Instant::now();
    let (engine, report) = Engine::open(config).expect("open");
    (engine, report, started.elapsed().as_secs_f64())
}

/// How long a replay took, of how many events, at what rate.
fn replay_rate(report: &RecoveryReport, secs: f64) -> String {
    format!(
        "{secs:.2} s, {} events, {:.0} events/s",
        report.records,
        report.records as f64 / secs.max(1e-9)
    )
}

/// Writes `accounts` open events, then `events - accounts` credits spread over the accounts,
/// straight through the WAL writer (group commits of whatever is queued).
fn build(dir: &Path, accounts: u64, events: u64) -> Duration {
    let started = Instant::now();
    let wal = Wal::start(WalStart {
        storage: Arc::new(FileStorage),
        mode: WriterMode::Thread,
        dir: dir.join("wal"),
        last_lsn: 0,
        last_segment: None,
        segment_bytes_max: coffer::wal::SEGMENT_BYTES_DEFAULT,
    })
    .expect("wal");
    let gem = Currency::parse("GEM").expect("currency");
    let mut payload = Vec::with_capacity(128);
    let mut seqs = vec![0u64; accounts as usize];
    for lsn in 1..=events {
        let i = (lsn - 1) % accounts;
        let first = lsn <= accounts;
        let event = Event {
            lsn,
            account: account(i),
            seq: if first { 0 } else { seqs[i as usize] + 1 },
            at_ms: 1_767_225_600_000 + lsn / 1000,
            tx_id: if first {
                Uuid::nil()
            } else {
                Uuid::from_u128(u128::from(lsn))
            },
            idempotency_key: None,
            body: if first {
                EventBody::Opened {
                    currency: gem.clone(),
                    overdraft_limit: 0,
                    metadata: Metadata::empty(),
                }
            } else {
                EventBody::Credit {
                    amount: Amount::new(7).expect("amount"),
                    metadata: Metadata::empty(),
                }
            },
            outcome: None,
        };
        if !first {
            seqs[i as usize] += 1;
        }
        payload.clear();
        codec::encode_event(&event, &mut payload);
        wal.append(&payload).expect("append");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(wal.wait_durable(events)).expect("durable");
    wal.close();
    started.elapsed()
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let accounts = env_u64("ACCOUNTS", 1_000_000);
    let events = env_u64("EVENTS", 10_000_000).max(accounts);
    let tail = env_u64("TAIL", 1_000_000);
    let temp = tempfile::tempdir().expect("tempdir");
    let root = std::env::var("BENCH_DIR").map_or(temp.path().to_path_buf(), Into::into);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let replay_only = env_u64("REPLAY_ONLY", 0);
    if replay_only > 0 {
        replays(&root.join("data"), accounts, events, replay_only);
        return;
    }

    // Memory per idle account: a log of open events only.
    let idle_dir = root.join("idle");
    build(&idle_dir, accounts, accounts);
    let before = settled_rss_bytes();
    let (idle, _) = Engine::open(config(&idle_dir)).expect("open");
    let idle_rss = settled_rss_bytes().saturating_sub(before);
    drop(idle);
    println!(
        "idle accounts: {accounts} in {:.1} MB of RSS: {} bytes per account",
        idle_rss as f64 / 1e6,
        idle_rss / accounts
    );

    if std::env::var_os("IDLE_ONLY").is_some() {
        return;
    }
    let dir = root.join("data");
    let built = build(&dir, accounts, events);
    println!(
        "built: {events} events over {accounts} accounts in {:.1} s ({:.0} events/s through the WAL writer)",
        built.as_secs_f64(),
        events as f64 / built.as_secs_f64()
    );

    // One replay thread, then the default (one per core): the same log, one run.
    let mut one = config(&dir);
    one.replay_threads = 1;
    let (engine, report, secs) = open_timed(one);
    println!(
        "cold start from the WAL alone, 1 replay thread: {} replayed",
        replay_rate(&report, secs)
    );
    drop(engine);
    let (engine, report, secs) = open_timed(config(&dir));
    println!(
        "cold start from the WAL alone, default replay threads: {} replayed, RSS {:.0} MB",
        replay_rate(&report, secs),
        rss_bytes() as f64 / 1e6
    );

    rt.block_on(engine.finish_recovery()).expect("recover");
    let snapshot = rt.block_on(engine.snapshot()).expect("snapshot");
    println!(
        "snapshot: {} accounts, {:.1} MB, written in {:.2} s",
        snapshot.accounts,
        snapshot.bytes as f64 / 1e6,
        snapshot.duration.as_secs_f64()
    );

    // A WAL tail after the snapshot, through the engine (batches, fully durable).
    let started = Instant::now();
    rt.block_on(async {
        let mut batch = Vec::with_capacity(1000);
        for n in 0..tail {
            let request = Request::Credit {
                amount: 3,
                metadata: BTreeMap::new(),
            };
            batch.push((account(n % accounts), None, request));
            if batch.len() == 1000 || n + 1 == tail {
                for result in engine.execute_batch(std::mem::take(&mut batch)).await {
                    result.expect("credit");
                }
            }
        }
    });
    println!(
        "tail: {tail} credits in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    engine.shutdown();
    drop(engine);

    let (engine, report, secs) = open_timed(config(&dir));
    println!(
        "cold start with snapshot (lsn {}) + WAL tail: {secs:.2} s, {} tail events replayed",
        report.snapshot_lsn.unwrap_or(0),
        report.records
    );
    drop(engine);
}

/// Only the replay, `times` times, of a log kept in `dir` between runs (built on the first):
/// for comparing builds. The log is left as it is: no snapshot, no tail.
fn replays(dir: &Path, accounts: u64, events: u64, times: u64) {
    if dir.join("built").exists() {
        println!("reusing the log in {}", dir.display());
    } else {
        let built = build(dir, accounts, events);
        println!(
            "built: {events} events over {accounts} accounts in {:.1} s",
            built.as_secs_f64()
        );
        std::fs::write(dir.join("built"), b"").expect("marker");
    }
    for _ in 0..times {
        let cpu = cpu_seconds();
        let (engine, report, secs) = open_timed(config(dir));
        println!(
            "replay, default threads: {}, {:.2} s of CPU",
            replay_rate(&report, secs),
            cpu_seconds() - cpu
        );
        drop(engine);
    }
}
