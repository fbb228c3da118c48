//! Arbitrary bytes as WAL segments on the simulated disk: decoding and replay never panic,
//! count every record they hand out, agree with and without repair, and a repair is
//! idempotent; recovery of the same bytes by the engine (including the expiry of recovered
//! holds) never panics and survives a second restart.
//!
//! Input: byte 0 is a set of flags, the rest the segment bytes.
//! - `flags & 3` in {0, 1}: one segment, `00000000000000000001.wal`, holding `data[1..]`.
//! - `flags & 3` in {2, 3}: two segments. `data[1..3]` (u16 LE) is where `data[11..]` is
//!   split; the first part is segment 1, the second is named by `data[3..11]` (u64 LE): its
//!   low byte + 1 when `flags & 3 == 2` (so small, often the right next LSN), the raw value
//!   when 3.
//! - `flags & 4`: recovery runs with the clock far in the future (every hold expires),
//!   otherwise at 0 (none does).

#![no_main]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use coffer::clock::ManualClock;
use coffer::storage::sim::SimStorage;
use coffer::wal::codec::{
    decode_event, decode_event_version, decode_frame, decode_frame_event, encode_event,
    encode_event_version, encode_frame, FRAME_HEADER_BYTES, FRAME_MAGIC, FRAME_VERSION,
};
use coffer::wal::{self, ReplayOutcome};
use coffer::{Engine, EngineConfig};
use libfuzzer_sys::fuzz_target;

const WAL_DIR: &str = "/wal";
const DATA_DIR: &str = "/data";

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let segments = segments_of(flags, rest);
    for (_, bytes) in &segments {
        decode_directly(bytes);
    }
    let replayed = replay_checks(&segments);
    if trace() {
        let names: Vec<_> = segments.iter().map(|s| (s.0, s.1.len())).collect();
        eprintln!("segments (first LSN, bytes) {names:?}; replay: {replayed:?}");
    }
    recover_checks(&segments, flags & 4 != 0, replayed.as_ref());
});

/// `COFFER_FUZZ_TRACE=1` prints what replay and recovery made of each input.
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("COFFER_FUZZ_TRACE").is_some())
}

/// The segments the input describes: (first LSN from the name, bytes).
fn segments_of(flags: u8, rest: &[u8]) -> Vec<(u64, Vec<u8>)> {
    if flags & 3 < 2 || rest.len() < 10 {
        return vec![(1, rest.to_vec())];
    }
    let split = u16::from_le_bytes([rest[0], rest[1]]) as usize;
    let name = u64::from_le_bytes(rest[2..10].try_into().expect("8 bytes"));
    let body = &rest[10..];
    let split = split % (body.len() + 1);
    let second = if flags & 3 == 2 {
        (name & 0xff) + 1
    } else {
        name
    };
    let mut segments = vec![(1, body[..split].to_vec())];
    if second != 1 {
        segments.push((second, body[split..].to_vec()));
    }
    segments
}

fn disk_with(dir: &Path, segments: &[(u64, Vec<u8>)]) -> SimStorage {
    let disk = SimStorage::new();
    for (first_lsn, bytes) in segments {
        disk.put(&dir.join(wal::reader::segment_name(*first_lsn)), bytes);
    }
    disk
}

/// The codec alone: every frame found decodes consistently and re-encodes to itself.
fn decode_directly(bytes: &[u8]) {
    let magic = FRAME_MAGIC.to_le_bytes();
    let mut offset = 0;
    while offset < bytes.len() {
        match decode_frame(&bytes[offset..]) {
            Ok((frame, size)) => {
                assert!(size > FRAME_HEADER_BYTES && size <= bytes.len() - offset);
                assert_eq!(size, FRAME_HEADER_BYTES + frame.payload.len());
                // The frame is canonical: decode_frame checked every header field. The
                // encoder writes the current version; an older frame differs in its version
                // field and so its CRC, and in nothing else.
                let mut again = Vec::new();
                encode_frame(frame.lsn, frame.payload, &mut again);
                let original = &bytes[offset..offset + size];
                if frame.version == FRAME_VERSION {
                    assert_eq!(again, original, "frame re-encoding");
                } else {
                    assert_eq!(again[..4], original[..4], "frame re-encoding: magic");
                    assert_eq!(again[6..20], original[6..20], "frame re-encoding: header");
                    assert_eq!(again[24..], original[24..], "frame re-encoding: payload");
                }
                if let Ok(event) = decode_frame_event(&frame) {
                    assert_eq!(event.lsn, frame.lsn);
                    // In the frame's own version (older ones have no outcome at the end).
                    let mut payload = Vec::new();
                    encode_event_version(&event, frame.version, &mut payload);
                    // Only the order of metadata entries may differ (they are re-sorted).
                    assert_eq!(payload.len(), frame.payload.len(), "payload re-encoding");
                    let again = decode_event_version(frame.version, frame.lsn, &payload)
                        .expect("re-encoded event");
                    assert_eq!(again, event, "event round trip");
                    if frame.version == FRAME_VERSION {
                        let mut current = Vec::new();
                        encode_event(&event, &mut current);
                        assert_eq!(decode_event(frame.lsn, &current).as_ref(), Ok(&event));
                    }
                }
                offset += size;
            }
            Err(_) => {
                // Resynchronise at the next magic number, as a reader looking for frames would.
                offset += 1;
                match bytes[offset.min(bytes.len())..]
                    .windows(magic.len())
                    .position(|w| w == magic)
                {
                    Some(at) => offset += at,
                    None => break,
                }
            }
        }
    }
}

/// Replay without and with repair, then once more: the same answers, and the repair sticks.
fn replay_checks(segments: &[(u64, Vec<u8>)]) -> Option<ReplayOutcome> {
    let dir = Path::new(WAL_DIR);
    let disk = disk_with(dir, segments);
    let replay = |repair: bool| {
        let mut seen = 0u64;
        let mut last_lsn = 0u64;
        let result = wal::replay_from(&disk, dir, repair, |event| {
            if seen > 0 {
                assert_eq!(event.lsn, last_lsn + 1, "LSNs handed out in order, no gap");
            }
            seen += 1;
            last_lsn = event.lsn;
            Ok(())
        });
        if let Ok(outcome) = &result {
            assert_eq!(seen, outcome.records, "every record counted");
            assert_eq!(
                last_lsn, outcome.last_lsn,
                "last LSN is the last handed out"
            );
            let (path, len) = outcome.last_segment.clone().expect("a segment exists");
            let last = segments.iter().map(|s| s.0).max().expect("a segment");
            assert_eq!(path, dir.join(wal::reader::segment_name(last)));
            let size = disk.durable_bytes(&path).expect("the segment").len() as u64;
            assert!(len <= size, "valid length within the file");
        }
        result
    };
    let dry = replay(false);
    for (first_lsn, bytes) in segments {
        let path = dir.join(wal::reader::segment_name(*first_lsn));
        assert_eq!(
            disk.durable_bytes(&path).as_deref(),
            Some(&bytes[..]),
            "replay without repair changes nothing"
        );
    }
    let repaired = replay(true);
    match (&dry, &repaired) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.records, b.records);
            assert_eq!(a.last_lsn, b.last_lsn);
            assert_eq!(a.tail_cut, b.tail_cut);
            assert_eq!(a.last_segment, b.last_segment);
        }
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("repair changes the verdict: {dry:?} vs {repaired:?}"),
    }
    let outcome = repaired.ok()?;
    if let Some(cut) = &outcome.tail_cut {
        let after = disk.durable_bytes(&cut.path).expect("the cut segment");
        assert_eq!(after.len() as u64, cut.offset, "the cut is durable");
        let (first_lsn, before) = segments
            .iter()
            .find(|s| dir.join(wal::reader::segment_name(s.0)) == cut.path)
            .expect("a known segment");
        assert_eq!(*first_lsn, segments.iter().map(|s| s.0).max().unwrap());
        assert_eq!(&before[..after.len()], &after[..], "only the tail is cut");
        assert_eq!(cut.bytes, (before.len() - after.len()) as u64);
    }
    let again = replay(true).expect("a repaired log replays");
    assert_eq!(again.records, outcome.records, "repair is idempotent");
    assert_eq!(again.last_lsn, outcome.last_lsn, "repair is idempotent");
    assert_eq!(again.last_segment, outcome.last_segment);
    assert!(again.tail_cut.is_none(), "nothing left to cut: {again:?}");
    Some(outcome)
}

/// The engine's recovery of the same bytes: it refuses what replay refuses, otherwise it
/// applies every record (or refuses one as corrupt) without panicking, expires due holds,
/// and a second recovery sees the expiries and nothing to cut.
fn recover_checks(segments: &[(u64, Vec<u8>)], late: bool, replayed: Option<&ReplayOutcome>) {
    let data_dir = PathBuf::from(DATA_DIR);
    let disk = disk_with(&data_dir.join("wal"), segments);
    let config = {
        let mut config = EngineConfig::new(&data_dir);
        config.storage = Arc::new(disk.clone());
        config.clock = Arc::new(ManualClock::new(if late { u64::MAX / 4 } else { 0 }));
        config.wal_writer = wal::WriterMode::Manual;
        config.expiry_sweep = None;
        config.actors = 1;
        config.id_seed = Some(7);
        config
    };
    let opened = Engine::open(config.clone());
    let Some(replayed) = replayed else {
        assert!(opened.is_err(), "the engine opened a log replay refuses");
        return;
    };
    let (engine, report) = match opened {
        Ok(opened) => opened,
        Err(error) => {
            // An event that replay decodes but the state machine refuses: reported, not
            // applied.
            if trace() {
                eprintln!("recovery refused: {error}");
            }
            return;
        }
    };
    assert_eq!(report.records, replayed.records);
    assert_eq!(report.last_lsn, replayed.last_lsn);
    assert_eq!(
        report.tail_cut.as_ref().map(|c| (c.offset, c.bytes)),
        replayed.tail_cut.as_ref().map(|c| (c.offset, c.bytes)),
        "the engine cuts what replay cuts"
    );
    assert!(report.accounts as u64 <= report.records);
    // finish_recovery appends the expiries and waits for them; in manual mode the WAL is
    // committed by hand between two polls. Its actors are spawned on a runtime dropped here.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let _enter = runtime.enter();
    let expired = {
        let mut cx = Context::from_waker(Waker::noop());
        let mut finish = std::pin::pin!(engine.finish_recovery());
        let mut result = None;
        for _ in 0..3 {
            if let Poll::Ready(r) = finish.as_mut().poll(&mut cx) {
                result = Some(r);
                break;
            }
            engine
                .commit_wal()
                .expect("the simulated disk does not fail");
        }
        result
            .expect("finish_recovery completes once the WAL is committed")
            .expect("finish_recovery succeeds")
    };
    if trace() {
        eprintln!("recovered: {report:?}; expired {expired}");
    }
    if !late {
        assert_eq!(expired, 0, "nothing expires at time 0");
    }
    let stats = engine.stats();
    assert_eq!(stats.accounts, report.accounts as u64);
    assert_eq!(
        stats.wal_records, expired as u64,
        "one expire record per expired hold"
    );
    engine.shutdown();
    drop(engine);
    let (engine, second) = Engine::open(config).expect("a recovered log opens again");
    assert_eq!(second.records, report.records + expired as u64);
    assert_eq!(second.accounts, report.accounts);
    assert!(second.tail_cut.is_none(), "{second:?}");
    engine.shutdown();
}
