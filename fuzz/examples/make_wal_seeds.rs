//! Writes the seed corpus of the `wal_decode` target (`fuzz/corpus/wal_decode/`): logs the
//! real engine wrote on the simulated disk, cut and damaged the ways a crash or a bad disk
//! would, plus the golden frames of `tests/golden/`. Each seed is the target's input: a flag
//! byte, then the segment bytes (see the target's header for the two-segment layout).
//!
//! Re-create after a change of the WAL format:
//! `cargo +nightly run --manifest-path fuzz/Cargo.toml --example make_wal_seeds`

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use coffer::clock::ManualClock;
use coffer::domain::{AccountId, Currency, IdempotencyKey, Metadata, Request};
use coffer::storage::sim::SimStorage;
use coffer::storage::Storage;
use coffer::wal::codec::{decode_frame, encode_frame};
use coffer::{Engine, EngineConfig};

const T0_MS: u64 = 1_767_225_600_000;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("corpus").join("wal_decode");
    std::fs::create_dir_all(&out).expect("corpus dir");
    let write = |name: &str, flags: u8, bytes: &[u8]| {
        let mut seed = vec![flags];
        seed.extend_from_slice(bytes);
        std::fs::write(out.join(name), seed).expect("write seed");
    };
    let two = |flags: u8, split: usize, name: u64, bytes: &[u8]| {
        let mut seed = vec![flags];
        seed.extend_from_slice(&(split as u16).to_le_bytes());
        seed.extend_from_slice(&name.to_le_bytes());
        seed.extend_from_slice(bytes);
        seed
    };

    // One segment the engine wrote, with its zero-filled tail.
    let (segments, holds_open) = engine_log(64 * 1024);
    assert_eq!(segments.len(), 1, "one segment");
    let log = &segments[0];
    let ends = frame_ends(log);
    let end = *ends.last().expect("records");
    write(
        "engine_log_zero_tail",
        0,
        &log[..(end + 256).min(log.len())],
    );
    write("engine_log_exact", 0, &log[..end]);
    write("engine_log_expire_on_recovery", 4, &log[..end + 64]);
    assert!(holds_open > 0);
    // Torn tails: the last record cut short, or its bytes garbled.
    let last_start = ends[ends.len() - 2];
    write(
        "torn_mid_record",
        0,
        &log[..last_start + (end - last_start) / 2],
    );
    write("torn_mid_header", 0, &log[..last_start + 10]);
    let mut garbled = log[..end].to_vec();
    for b in &mut garbled[last_start + 30..end] {
        *b ^= 0x5a;
    }
    write("torn_garbled_tail", 0, &garbled);
    // Damage in the middle: a flipped bit in the second record (corruption, not a tail).
    let mut flipped = log[..end].to_vec();
    flipped[ends[0] + 40] ^= 0x04;
    write("corrupt_middle_bit", 0, &flipped);
    // A hole of zeros in the middle, then valid records.
    let mut holed = log[..end].to_vec();
    for b in &mut holed[ends[1]..ends[2]] {
        *b = 0;
    }
    write("zero_hole_middle", 0, &holed);
    // Two segments split after k records (the second named k + 1): the right name, a wrong
    // one, a huge one, and a first segment torn (damage that is not at the tail).
    let k = 3;
    let split = ends[k];
    std::fs::write(
        out.join("two_segments"),
        two(2, split, k as u64, &log[..end + 32]),
    )
    .expect("write");
    std::fs::write(
        out.join("two_segments_gap"),
        two(2, split, k as u64 + 4, &log[..end]),
    )
    .expect("write");
    std::fs::write(
        out.join("two_segments_raw_name"),
        two(3, split, u64::MAX - 1, &log[..end]),
    )
    .expect("write");
    std::fs::write(
        out.join("two_segments_torn_first"),
        two(2, split - 5, k as u64, &log[..end]),
    )
    .expect("write");

    // Real rotation: small segments, the first two as the two-segment layout.
    let (small, _) = engine_log(700);
    assert!(small.len() >= 2, "rotated");
    let first_records = frame_ends(&small[0]).len() - 1;
    let first = &small[0][..*frame_ends(&small[0]).last().expect("records")];
    let mut joined = first.to_vec();
    joined.extend_from_slice(&small[1]);
    std::fs::write(
        out.join("rotated_segments"),
        two(2, first.len(), first_records as u64, &joined),
    )
    .expect("write");

    // The golden frames of tests/golden, alone and as one log (LSN 1..7).
    let golden = root.join("..").join("tests").join("golden");
    let mut all = Vec::new();
    for name in [
        "opened", "credit", "debit", "hold", "capture", "release", "expire",
    ] {
        let bytes = std::fs::read(golden.join(format!("{name}.bin"))).expect("golden file");
        all.extend_from_slice(&bytes);
        write(&format!("golden_{name}"), 0, &bytes);
    }
    write("golden_log", 0, &all);

    // Edge shapes: empty, only zeros, a frame of an unknown version with a valid CRC.
    write("empty", 0, b"");
    write("zeros", 0, &[0u8; 64]);
    let mut future = Vec::new();
    encode_frame(1, b"from a newer coffer", &mut future);
    future[4..6].copy_from_slice(&2u16.to_le_bytes());
    let mut hasher = crc32fast_like::Crc::new();
    hasher.update(&future[..20]);
    hasher.update(&future[24..]);
    future[20..24].copy_from_slice(&hasher.finish().to_le_bytes());
    write("unknown_version", 0, &future);
    println!("wrote seeds to {}", out.display());
}

/// Offsets where each frame of a segment ends, after a leading 0 (so `ends[i]..ends[i+1]`
/// is record i).
fn frame_ends(segment: &[u8]) -> Vec<usize> {
    let mut ends = vec![0];
    let mut offset = 0;
    while let Ok((_, size)) = decode_frame(&segment[offset..]) {
        offset += size;
        ends.push(offset);
    }
    ends
}

/// Runs a small workload on the real engine over the simulated disk; returns its segments'
/// durable bytes in order, and how many holds are left open.
fn engine_log(segment_bytes_max: u64) -> (Vec<Vec<u8>>, u64) {
    let disk = SimStorage::new();
    let clock = Arc::new(ManualClock::new(T0_MS));
    let mut config = EngineConfig::new("/data");
    config.storage = Arc::new(disk.clone());
    config.clock = clock.clone();
    config.expiry_sweep = None;
    config.actors = 1;
    config.id_seed = Some(42);
    config.segment_bytes_max = segment_bytes_max;
    let (engine, _) = Engine::open(config).expect("open");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let open_holds = runtime.block_on(async {
        engine.finish_recovery().await.expect("recovery");
        let id = |s: &str| AccountId::parse(s).expect("id");
        let key = |s: &str| Some(IdempotencyKey::parse(s).expect("key"));
        let meta = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let mut tier = BTreeMap::new();
        tier.insert("tier".to_string(), "gold".to_string());
        engine
            .open_account(
                id("player-42"),
                Currency::parse("GEM").expect("currency"),
                0,
                Metadata::new(tier).expect("metadata"),
            )
            .await
            .expect("open");
        engine
            .open_account(
                id("shop:eu.1"),
                Currency::parse("EUR").expect("currency"),
                500,
                Metadata::empty(),
            )
            .await
            .expect("open");
        let run = |account: &'static str, k: &'static str, op: Request| {
            let engine = engine.clone();
            async move {
                engine
                    .execute(&id(account), key(k), op)
                    .await
                    .expect("operation")
                    .receipt
            }
        };
        run(
            "player-42",
            "c1",
            Request::Credit {
                amount: 1500,
                metadata: meta(&[("order", "A-1"), ("note", "é€")]),
            },
        )
        .await;
        run(
            "shop:eu.1",
            "d1",
            Request::Debit {
                amount: 200,
                metadata: meta(&[]),
            },
        )
        .await;
        let hold = |amount, secs| Request::Hold {
            amount,
            expires_in_secs: secs,
            metadata: meta(&[("psp", "stripe")]),
        };
        let h1 = run("player-42", "h1", hold(300, Some(600))).await;
        let h2 = run("player-42", "h2", hold(100, None)).await;
        let h3 = run("player-42", "h3", hold(50, Some(1))).await;
        let _h4 = run("shop:eu.1", "h4", hold(10, Some(60))).await;
        let hold_id = |r: &Arc<coffer::domain::Receipt>| r.hold.as_ref().expect("hold").id;
        run(
            "player-42",
            "cap1",
            Request::Capture {
                hold_id: hold_id(&h1),
                amount: Some(120),
                metadata: meta(&[("charge", "ch_1")]),
            },
        )
        .await;
        run(
            "player-42",
            "rel1",
            Request::Release {
                hold_id: hold_id(&h2),
                metadata: meta(&[]),
            },
        )
        .await;
        let _ = h3;
        clock.advance_ms(2_000);
        engine.expire_due().await.expect("expire");
        let batch = (0..6)
            .map(|i| {
                (
                    id("shop:eu.1"),
                    key(["b0", "b1", "b2", "b3", "b4", "b5"][i]),
                    Request::Credit {
                        amount: 7 + i as i128,
                        metadata: meta(&[]),
                    },
                )
            })
            .collect();
        for result in engine.execute_batch(batch).await {
            result.expect("batch operation");
        }
        engine.stats().open_holds
    });
    engine.shutdown();
    let dir = Path::new("/data/wal");
    let mut names = disk.list(dir).expect("list");
    names.sort();
    let segments = names
        .iter()
        .map(|name| {
            disk.durable_bytes(&dir.join(name))
                .unwrap_or_else(|| panic!("segment {name}"))
        })
        .collect();
    (segments, open_holds)
}

/// CRC-32 (IEEE), bit by bit: only for the one hand-made frame above.
mod crc32fast_like {
    pub struct Crc(u32);
    impl Crc {
        pub fn new() -> Crc {
            Crc(!0)
        }
        pub fn update(&mut self, bytes: &[u8]) {
            for &b in bytes {
                self.0 ^= u32::from(b);
                for _ in 0..8 {
                    let mask = (self.0 & 1).wrapping_neg();
                    self.0 = (self.0 >> 1) ^ (0xEDB8_8320 & mask);
                }
            }
        }
        pub fn finish(&self) -> u32 {
            !self.0
        }
    }
}
