//! Golden bytes of the WAL format: one complete frame per event tag, built from fixed
//! values, must encode to exactly the committed files in `tests/golden/v3/` (the version
//! this coffer writes), and each file must decode back to its event. The version 2 files in
//! `tests/golden/v2/` must still encode (as version 2) and decode exactly, and the version 1
//! files in `tests/golden/` stay as they were written and must still decode. A change to the codec that alters a single byte fails here, so
//! the on-disk format (docs/wal-format.md) cannot drift by accident.
//!
//! To create or deliberately re-create the files (a format change, with a new version
//! number): `COFFER_BLESS=1 cargo test --test golden`, then run again without it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use coffer::domain::{
    AccountId, Amount, Currency, Event, EventBody, IdempotencyKey, Metadata, Outcome,
    TransferFailure,
};
use coffer::wal::codec::{
    decode_frame, decode_frame_event, encode_event_version, encode_frame_version,
};
use uuid::Uuid;

/// 2026-01-01T00:00:00.000Z in unix milliseconds.
const T0_MS: u64 = 1_767_225_600_000;
/// The hold every hold-related event names (a UUID v7 with timestamp T0).
const HOLD_ID: u128 = 0x019b_76da_a800_7000_8000_0000_0000_00a1;

fn account() -> AccountId {
    AccountId::parse("player-42").expect("a valid account id")
}

fn key(text: &str) -> Option<IdempotencyKey> {
    Some(IdempotencyKey::parse(text).expect("a valid idempotency key"))
}

fn metadata(entries: &[(&str, &str)]) -> Metadata {
    let map: BTreeMap<String, String> = entries
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Metadata::new(map).expect("metadata within limits")
}

fn amount(value: u64) -> Amount {
    Amount::new(i128::from(value)).expect("an amount in range")
}

/// An event as the engine writes it: the seq after it, a fixed time, a fixed transaction id.
fn event(lsn: u64, key: Option<IdempotencyKey>, body: EventBody) -> Event {
    let is_open = matches!(body, EventBody::Opened { .. });
    Event {
        lsn,
        account: account(),
        seq: lsn - 1,
        at_ms: T0_MS + (lsn - 1) * 1000,
        tx_id: if is_open {
            Uuid::nil()
        } else {
            Uuid::from_u128(0x019b_76da_a800_7000_8000_0000_0000_0000 + u128::from(lsn))
        },
        idempotency_key: key,
        body,
        outcome: None,
    }
}

/// The transfer every transfer event names.
const TRANSFER_ID: u128 = 0x019b_76da_a800_7000_8000_0000_0000_00b2;

/// Every golden case of version 2: the version 1 cases and the transfer events.
fn cases() -> Vec<(&'static str, Event)> {
    let transfer_id = Uuid::from_u128(TRANSFER_ID);
    let house = AccountId::parse("house").expect("a valid account id");
    let mut cases = cases_v1();
    cases.extend([
        (
            "transfer_out",
            event(
                8,
                key("k-transfer-1"),
                EventBody::TransferOut {
                    transfer_id,
                    to: house.clone(),
                    amount: amount(25),
                    metadata: metadata(&[("prize", "weekly")]),
                },
            ),
        ),
        (
            "transfer_in",
            event(
                9,
                None,
                EventBody::TransferIn {
                    transfer_id,
                    from: house.clone(),
                    amount: amount(40),
                    metadata: Metadata::empty(),
                },
            ),
        ),
        (
            "transfer_refund",
            event(
                10,
                None,
                EventBody::TransferRefund {
                    transfer_id,
                    to: house,
                    amount: amount(25),
                    failure: TransferFailure::BalanceLimitExceeded,
                },
            ),
        ),
    ]);
    cases
}

/// Every golden case of version 3: the version 2 cases, each with the outcome the engine
/// records (the amount, balance and held after it; fixed values, not a real history).
fn cases_v3() -> Vec<(&'static str, Event)> {
    cases()
        .into_iter()
        .map(|(name, mut event)| {
            let (amount, balance, held) = match name {
                "opened" => return (name, event),
                "credit" => (1500, 1500, 0),
                "debit" => (300, 1200, 0),
                "hold" => (200, 1200, 200),
                "capture" => (150, 1050, 0),
                "release" | "expire" => (200, 1050, 0),
                "transfer_out" => (25, 1025, 0),
                "transfer_in" => (40, 1065, 0),
                _ => (25, 1090, 0),
            };
            event.outcome = Some(Outcome {
                amount,
                balance,
                held,
            });
            (name, event)
        })
        .collect()
}

/// The cases of version 1: one per event tag it had.
fn cases_v1() -> Vec<(&'static str, Event)> {
    let hold_id = Uuid::from_u128(HOLD_ID);
    vec![
        (
            "opened",
            event(
                1,
                None,
                EventBody::Opened {
                    currency: Currency::parse("GEM").expect("a valid currency"),
                    overdraft_limit: 0,
                    metadata: metadata(&[("tier", "gold")]),
                },
            ),
        ),
        (
            "credit",
            event(
                2,
                key("k-credit-1"),
                EventBody::Credit {
                    amount: amount(1500),
                    metadata: metadata(&[("order", "A-1"), ("note", "é€")]),
                },
            ),
        ),
        (
            "debit",
            event(
                3,
                key("k-debit-1"),
                EventBody::Debit {
                    amount: amount(300),
                    metadata: Metadata::empty(),
                },
            ),
        ),
        (
            "hold",
            event(
                4,
                key("k-hold-1"),
                EventBody::Hold {
                    hold_id,
                    amount: amount(200),
                    expires_at_ms: T0_MS + 3000 + 600_000,
                    expires_in_secs: Some(600),
                    metadata: metadata(&[("psp", "stripe")]),
                },
            ),
        ),
        (
            "capture",
            event(
                5,
                key("k-capture-1"),
                EventBody::Capture {
                    hold_id,
                    amount: amount(150),
                    amount_given: true,
                    metadata: metadata(&[("charge", "ch_1")]),
                },
            ),
        ),
        (
            "release",
            event(
                6,
                key("k-release-1"),
                EventBody::Release {
                    hold_id,
                    metadata: Metadata::empty(),
                },
            ),
        ),
        ("expire", event(7, None, EventBody::Expire { hold_id })),
    ]
}

/// A version 3 file.
fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("golden")
        .join("v3")
        .join(format!("{name}.bin"))
}

/// A version 2 file (written before outcomes; never re-blessed).
fn golden_v2_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("golden")
        .join("v2")
        .join(format!("{name}.bin"))
}

/// A version 1 file (written by coffer before transfers; never re-blessed).
fn golden_v1_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("golden")
        .join(format!("{name}.bin"))
}

fn frame_of(event: &Event) -> Vec<u8> {
    frame_of_version(event, 3)
}

fn frame_of_version(event: &Event, version: u16) -> Vec<u8> {
    let mut payload = Vec::new();
    encode_event_version(event, version, &mut payload);
    let mut frame = Vec::new();
    encode_frame_version(event.lsn, version, &payload, &mut frame);
    frame
}

fn blessing() -> bool {
    std::env::var("COFFER_BLESS").is_ok_and(|v| v == "1")
}

#[test]
fn every_event_encodes_to_its_golden_bytes() {
    // Goal: the encoder's output for fixed events never changes without a visible diff.
    if blessing() {
        let dir = golden_path("x");
        let dir = dir.parent().expect("the golden file has a directory");
        std::fs::create_dir_all(dir).expect("create tests/golden");
        for (name, event) in cases_v3() {
            std::fs::write(golden_path(name), frame_of(&event)).expect("write a golden file");
        }
        return;
    }
    for (name, event) in cases() {
        let golden = std::fs::read(golden_v2_path(name)).expect("read a version 2 file");
        assert_eq!(
            hex(&frame_of_version(&event, 2)),
            hex(&golden),
            "{name}: the version 2 encoding changed"
        );
    }
    for (name, event) in cases_v3() {
        let path = golden_path(name);
        let golden = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (create it with COFFER_BLESS=1 cargo test --test golden)",
                path.display()
            )
        });
        let encoded = frame_of(&event);
        assert_eq!(
            hex(&encoded),
            hex(&golden),
            "{name}: the encoding differs from {}",
            path.display()
        );
    }
}

#[test]
fn every_golden_file_decodes_to_its_event() {
    // Goal: the decoder reads the committed bytes back to exactly the event they pin.
    if blessing() {
        return;
    }
    for (name, event) in cases_v3() {
        let golden = std::fs::read(golden_path(name)).expect("read a golden file");
        let (frame, size) = decode_frame(&golden).expect("a golden file is one valid frame");
        assert_eq!(size, golden.len(), "{name}: one frame, nothing after it");
        assert_eq!(frame.lsn, event.lsn, "{name}: lsn");
        assert_eq!(frame.version, 3, "{name}: version");
        let decoded = decode_frame_event(&frame).expect("a valid payload");
        assert_eq!(decoded, event, "{name}: decoded event");
    }
}

#[test]
fn version_2_files_still_decode_to_their_events() {
    // Goal: a log written before outcomes were recorded is read exactly as before, without
    // an outcome (the event stream starts after such records).
    for (name, event) in cases() {
        let golden = std::fs::read(golden_v2_path(name)).expect("read a version 2 file");
        let (frame, size) = decode_frame(&golden).expect("a golden file is one valid frame");
        assert_eq!(size, golden.len(), "{name}: one frame, nothing after it");
        assert_eq!(frame.version, 2, "{name}: version");
        let decoded = decode_frame_event(&frame).expect("a valid payload");
        assert_eq!(decoded, event, "{name}: decoded event");
        assert_eq!(decoded.outcome, None, "{name}: no outcome before version 3");
    }
}

#[test]
fn version_1_files_still_decode_to_their_events() {
    // Goal: a log written before transfers existed is read exactly as before.
    for (name, event) in cases_v1() {
        let golden = std::fs::read(golden_v1_path(name)).expect("read a version 1 file");
        let (frame, size) = decode_frame(&golden).expect("a golden file is one valid frame");
        assert_eq!(size, golden.len(), "{name}: one frame, nothing after it");
        assert_eq!(frame.version, 1, "{name}: version");
        let decoded = decode_frame_event(&frame).expect("a valid payload");
        assert_eq!(decoded, event, "{name}: decoded event");
    }
}

#[test]
fn a_version_1_record_cannot_hold_a_transfer() {
    // Goal: tags 8..=10 exist only from version 2 on; an intact version 1 frame with one is
    // corruption, not a transfer.
    for (name, event) in cases().into_iter().skip(cases_v1().len()) {
        let mut frame = frame_of_version(&event, 2);
        frame[4..6].copy_from_slice(&1u16.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&frame[0..20]);
        crc.update(&frame[24..]);
        let crc = crc.finalize().to_le_bytes();
        frame[20..24].copy_from_slice(&crc);
        let (decoded, _) = decode_frame(&frame).expect("an intact version 1 frame");
        assert!(
            decode_frame_event(&decoded).is_err(),
            "{name} accepted in version 1"
        );
    }
}

#[test]
fn the_frame_header_layout_is_pinned() {
    // Goal: the 24-byte header fields sit where docs/wal-format.md says they do.
    if blessing() {
        return;
    }
    let golden = std::fs::read(golden_path("credit")).expect("read credit.bin");
    assert_eq!(&golden[0..4], b"CFFW", "magic");
    assert_eq!(&golden[4..6], &3u16.to_le_bytes(), "version");
    assert_eq!(golden[6], 1, "kind: event");
    assert_eq!(golden[7], 0, "pad");
    let len = u32::from_le_bytes(golden[8..12].try_into().expect("4 bytes"));
    assert_eq!(len as usize, golden.len() - 24, "len: payload bytes");
    assert_eq!(&golden[12..20], &2u64.to_le_bytes(), "lsn");
    let mut crc = crc32fast::Hasher::new();
    crc.update(&golden[0..20]);
    crc.update(&golden[24..]);
    assert_eq!(
        &golden[20..24],
        &crc.finalize().to_le_bytes(),
        "crc32 of header bytes 0..20 and the payload"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
