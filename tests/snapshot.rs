//! Snapshots: recovery from a snapshot and the WAL after it, fallback past a damaged
//! snapshot, removal (or archiving) of WAL segments no kept snapshot needs, and the file
//! format pinned by a golden file (`COFFER_BLESS=1 cargo test --test snapshot` re-creates
//! it, for a deliberate format change with a new version number).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use coffer::clock::ManualClock;
use coffer::domain::{
    Account, AccountId, AccountView, Currency, Decision, Event, EventBody, Fresh, IdempotencyKey,
    Metadata, Request, Retention, TransferBook, TransferRecord,
};
use coffer::snapshot::{self, SnapshotWriter};
use coffer::{Engine, EngineConfig};
use uuid::Uuid;

const T0_MS: u64 = 1_767_225_600_000;

fn config(dir: &Path) -> EngineConfig {
    let mut config = EngineConfig::new(dir);
    config.snapshot_every_records = None;
    config.snapshot_interval = None;
    config.segment_bytes_max = 4096;
    config.clock = Arc::new(ManualClock::new(T0_MS));
    config
}

fn names() -> Vec<AccountId> {
    ["alice", "bob", "carol"]
        .iter()
        .map(|n| AccountId::parse(n).expect("id"))
        .collect()
}

async fn open(config: EngineConfig) -> (Engine, coffer::engine::RecoveryReport) {
    let (engine, report) = Engine::open(config).expect("open");
    engine.finish_recovery().await.expect("recover");
    (engine, report)
}

/// `rounds` keyed changes on every account: credits, debits, holds and captures.
async fn traffic(engine: &Engine, round0: usize, rounds: usize) {
    for round in round0..round0 + rounds {
        for id in names() {
            let key = |what: &str| {
                Some(IdempotencyKey::parse(&format!("{id}-{what}-{round}")).expect("key"))
            };
            let credit = Request::Credit {
                amount: 100,
                metadata: BTreeMap::new(),
            };
            engine.execute(&id, key("c"), credit).await.expect("credit");
            let debit = Request::Debit {
                amount: 30,
                metadata: BTreeMap::new(),
            };
            engine.execute(&id, key("d"), debit).await.expect("debit");
            let hold = Request::Hold {
                amount: 20,
                expires_in_secs: None,
                metadata: BTreeMap::new(),
            };
            let held = engine.execute(&id, key("h"), hold).await.expect("hold");
            if round % 2 == 0 {
                let hold_id = held.receipt.hold.as_ref().expect("hold").id;
                let capture = Request::Capture {
                    hold_id,
                    amount: Some(5),
                    metadata: BTreeMap::new(),
                };
                engine
                    .execute(&id, key("p"), capture)
                    .await
                    .expect("capture");
            }
        }
    }
}

async fn views(engine: &Engine) -> Vec<AccountView> {
    let mut all = Vec::new();
    for id in names() {
        all.push(engine.account(&id).await.expect("account"));
    }
    all
}

async fn setup(dir: &Path) -> Engine {
    let (engine, _) = open(config(dir)).await;
    for id in names() {
        engine
            .open_account(id, Currency::parse("GEM").expect("c"), 0, Metadata::empty())
            .await
            .expect("open account");
    }
    engine
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test]
async fn a_restart_loads_the_snapshot_and_replays_only_the_wal_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = setup(dir.path()).await;
    traffic(&engine, 0, 10).await;
    let taken = engine.snapshot().await.expect("snapshot");
    assert_eq!(taken.accounts, 3);
    traffic(&engine, 10, 2).await;
    let before = views(&engine).await;
    let (history, _) = engine
        .transactions(&names()[0], None, 1000)
        .await
        .expect("history");
    engine.shutdown();
    drop(engine);

    let (engine, report) = open(config(dir.path())).await;
    assert_eq!(report.snapshot_lsn, Some(taken.lsn));
    // Rounds 10 (4 changes) and 11 (3) on 3 accounts after the snapshot, nothing before it.
    assert_eq!(report.records, (4 + 3) * 3, "{report:?}");
    assert_eq!(views(&engine).await, before);
    let (again, _) = engine
        .transactions(&names()[0], None, 1000)
        .await
        .expect("history");
    assert_eq!(again, history, "the history survives the snapshot");
    // Keys from before the snapshot still replay.
    let key = IdempotencyKey::parse("alice-c-0").expect("key");
    let credit = Request::Credit {
        amount: 100,
        metadata: BTreeMap::new(),
    };
    let replay = engine
        .execute(&names()[0], Some(key), credit)
        .await
        .expect("replay");
    assert!(replay.replayed);
}

#[tokio::test]
async fn segments_no_kept_snapshot_needs_are_removed_or_archived() {
    for archive in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive_dir = dir.path().join("archive");
        let mut cfg = config(dir.path());
        if archive {
            cfg.wal_archive = Some(archive_dir.clone());
        }
        let (engine, _) = open(cfg.clone()).await;
        for id in names() {
            engine
                .open_account(id, Currency::parse("GEM").expect("c"), 0, Metadata::empty())
                .await
                .expect("open account");
        }
        let wal = dir.path().join("wal");
        let mut removed = 0;
        for step in 0..3 {
            traffic(&engine, step * 10, 10).await;
            removed += engine.snapshot().await.expect("snapshot").segments_removed;
        }
        let before = views(&engine).await;
        assert!(removed > 0, "archive={archive}: nothing removed");
        assert_eq!(
            files(&dir.path().join("snapshots")).len(),
            2,
            "two snapshots kept"
        );
        let left = files(&wal);
        assert!(left
            .first()
            .is_some_and(|f| f != "00000000000000000001.wal"));
        if archive {
            let archived = files(&archive_dir);
            assert_eq!(archived.len(), removed);
            assert_eq!(archived[0], "00000000000000000001.wal");
        } else {
            assert!(!archive_dir.exists());
        }
        engine.shutdown();
        drop(engine);
        let (engine, report) = open(cfg).await;
        assert!(report.snapshot_lsn.is_some());
        assert_eq!(views(&engine).await, before, "archive={archive}");
    }
}

#[tokio::test]
async fn a_damaged_newest_snapshot_falls_back_to_the_one_before() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = setup(dir.path()).await;
    traffic(&engine, 0, 4).await;
    let first = engine.snapshot().await.expect("snapshot");
    traffic(&engine, 4, 4).await;
    let second = engine.snapshot().await.expect("snapshot");
    traffic(&engine, 8, 1).await;
    let before = views(&engine).await;
    engine.shutdown();
    drop(engine);

    let newest = dir
        .path()
        .join("snapshots")
        .join(snapshot::file_name(second.lsn));
    let mut bytes = std::fs::read(&newest).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&newest, &bytes).expect("write");

    let (engine, report) = open(config(dir.path())).await;
    assert_eq!(report.damaged_snapshots, 1);
    assert_eq!(report.snapshot_lsn, Some(first.lsn));
    assert_eq!(views(&engine).await, before);
}

#[tokio::test]
async fn wal_verify_recovers_from_the_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = setup(dir.path()).await;
    traffic(&engine, 0, 3).await;
    let taken = engine.snapshot().await.expect("snapshot");
    traffic(&engine, 3, 1).await;
    engine.shutdown();
    drop(engine);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_coffer"))
        .args(["wal", "verify", "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains(&format!("ok: snapshot at lsn {}, then", taken.lsn)),
        "{text}"
    );
    assert!(text.contains("3 accounts"), "{text}");
}

// ---------------------------------------------------------------------------------------
// The format
// ---------------------------------------------------------------------------------------

/// One account with a bit of everything: metadata, an open hold, a captured one, history
/// and keys with receipts. Fixed ids and times, so the bytes are fixed.
fn golden_account() -> Account {
    let id = AccountId::parse("golden").expect("id");
    let metadata = Metadata::new(BTreeMap::from([("tier".to_string(), "gold".to_string())]))
        .expect("metadata");
    let opened = Event {
        lsn: 1,
        account: id.clone(),
        seq: 0,
        at_ms: T0_MS,
        tx_id: Uuid::nil(),
        idempotency_key: None,
        body: EventBody::Opened {
            currency: Currency::parse("GEM").expect("c"),
            overdraft_limit: 50,
            metadata,
        },
        outcome: None,
    };
    let mut account = Account::open(&opened).expect("open");
    let requests = [
        Request::Credit {
            amount: 500,
            metadata: BTreeMap::from([("order".into(), "o-1".into())]),
        },
        Request::Hold {
            amount: 120,
            expires_in_secs: Some(60),
            metadata: BTreeMap::new(),
        },
        Request::Hold {
            amount: 80,
            expires_in_secs: None,
            metadata: BTreeMap::new(),
        },
        Request::Debit {
            amount: 7,
            metadata: BTreeMap::new(),
        },
    ];
    let mut lsn = 1;
    let mut apply = |account: &mut Account, key: Option<&str>, request: &Request| {
        lsn += 1;
        let fresh = Fresh {
            now_ms: T0_MS + lsn,
            hold_id: Uuid::from_u128(0x019b_76da_a800_7000_8000_0000_0000_0000 + u128::from(lsn)),
        };
        let key = key.map(|k| IdempotencyKey::parse(k).expect("key"));
        let Ok(Decision::Apply(body)) = account.decide(key.as_ref(), request, fresh) else {
            panic!("refused");
        };
        let event = Event {
            lsn,
            account: account.id().clone(),
            seq: account.seq() + 1,
            at_ms: T0_MS + lsn,
            tx_id: Uuid::from_u128(0x019b_76da_a800_7000_9000_0000_0000_0000 + u128::from(lsn)),
            idempotency_key: key,
            body,
            outcome: None,
        };
        account.apply(&event, Retention::UNLIMITED).expect("apply")
    };
    let mut holds = Vec::new();
    for (i, request) in requests.iter().enumerate() {
        let receipt = apply(&mut account, Some(&format!("key-{i}")), request);
        if let Some(hold) = &receipt.hold {
            holds.push(hold.id);
        }
    }
    let capture = Request::Capture {
        hold_id: holds[0],
        amount: Some(100),
        metadata: BTreeMap::new(),
    };
    apply(&mut account, Some("key-capture"), &capture);
    account
}

/// The golden account after a transfer of 50 to "house" (which completed), and the
/// transfer's record (version 2).
fn golden_v2() -> (Account, TransferRecord) {
    let mut account = golden_account();
    let house = AccountId::parse("house").expect("id");
    let key = IdempotencyKey::parse("key-transfer").expect("key");
    let transfer_id = Uuid::from_u128(0x019b_76da_a800_7000_8000_0000_0000_00b2);
    let request = Request::Transfer {
        to: house.clone(),
        amount: 50,
        metadata: BTreeMap::from([("prize".into(), "weekly".into())]),
    };
    let currency = account.currency().clone();
    let Ok(Decision::Apply(body)) =
        account.decide_transfer(Some(&key), &request, transfer_id, &currency)
    else {
        panic!("refused");
    };
    let out = Event {
        lsn: 7,
        account: account.id().clone(),
        seq: account.seq() + 1,
        at_ms: T0_MS + 7,
        tx_id: Uuid::from_u128(0x019b_76da_a800_7000_9000_0000_0000_0007),
        idempotency_key: Some(key),
        body,
        outcome: None,
    };
    account
        .apply(&out, Retention::UNLIMITED)
        .expect("apply the debit");
    let mut book = TransferBook::default();
    book.record(&out, Some(account.view()))
        .expect("record the debit");
    let mut receiver = Account::open(&Event {
        lsn: 3,
        account: house.clone(),
        seq: 0,
        at_ms: T0_MS,
        tx_id: Uuid::nil(),
        idempotency_key: None,
        body: EventBody::Opened {
            currency,
            overdraft_limit: 0,
            metadata: Metadata::empty(),
        },
        outcome: None,
    })
    .expect("open house");
    let inn = Event {
        lsn: 8,
        account: house,
        seq: 1,
        at_ms: T0_MS + 8,
        tx_id: Uuid::from_u128(0x019b_76da_a800_7000_9000_0000_0000_0008),
        idempotency_key: None,
        body: EventBody::TransferIn {
            transfer_id,
            from: account.id().clone(),
            amount: coffer::domain::Amount::new(50).expect("amount"),
            metadata: Metadata::new(BTreeMap::from([("prize".into(), "weekly".into())]))
                .expect("metadata"),
        },
        outcome: None,
    };
    receiver
        .apply(&inn, Retention::UNLIMITED)
        .expect("apply the credit");
    book.record(&inn, Some(receiver.view()))
        .expect("record the credit");
    let record = book
        .get(&transfer_id)
        .expect("the transfer")
        .as_ref()
        .clone();
    (account, record)
}

fn golden_bytes() -> Vec<u8> {
    let (account, record) = golden_v2();
    let mut writer = SnapshotWriter::new(8, 0, T0_MS + 10);
    writer.set_ids_after_ms(T0_MS + 8);
    writer.add(&account.parts());
    writer.finish([&record].into_iter())
}

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/golden/{name}"))
}

#[test]
fn the_snapshot_format_matches_its_golden_file_and_round_trips() {
    let bytes = golden_bytes();
    if std::env::var("COFFER_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(golden_path("v2/snapshot.bin"), &bytes).expect("bless");
    }
    let golden = std::fs::read(golden_path("v2/snapshot.bin"))
        .expect("tests/golden/v2/snapshot.bin (COFFER_BLESS=1 creates it)");
    assert_eq!(
        bytes, golden,
        "the snapshot encoding changed: bump SNAPSHOT_VERSION and re-bless"
    );
    let decoded = snapshot::decode(&golden).expect("decode");
    assert_eq!(
        (decoded.lsn, decoded.ids_after_ms, decoded.created_at_ms),
        (8, T0_MS + 8, T0_MS + 10)
    );
    let (account, record) = golden_v2();
    assert_eq!(decoded.accounts.len(), 1);
    assert_eq!(decoded.accounts[0].parts(), account.parts());
    assert_eq!(decoded.transfers, vec![record]);
}

#[test]
fn a_version_1_snapshot_still_loads() {
    // Goal: a snapshot written before transfers existed (never re-blessed) reads as before.
    let golden = std::fs::read(golden_path("snapshot.bin")).expect("tests/golden/snapshot.bin");
    assert_eq!(&golden[4..6], &1u16.to_le_bytes(), "a version 1 file");
    let decoded = snapshot::decode(&golden).expect("decode");
    assert_eq!(
        (decoded.lsn, decoded.ids_after_ms, decoded.created_at_ms),
        (6, T0_MS + 6, T0_MS + 10)
    );
    assert_eq!(decoded.accounts.len(), 1);
    assert_eq!(decoded.accounts[0].parts(), golden_account().parts());
    assert!(decoded.transfers.is_empty());
}

#[test]
fn every_damaged_byte_of_a_snapshot_is_refused_without_a_panic() {
    let bytes = golden_bytes();
    for at in 0..bytes.len() {
        let mut damaged = bytes.clone();
        damaged[at] ^= 0x01;
        assert!(snapshot::decode(&damaged).is_err(), "flip at {at} accepted");
        assert!(
            snapshot::decode(&bytes[..at]).is_err(),
            "cut at {at} accepted"
        );
    }
}

/// An account `name` in `currency`, opened and credited `credits` times.
fn simple_account(name: &str, currency: &str, credits: u64) -> Account {
    let id = AccountId::parse(name).expect("id");
    let opened = Event {
        lsn: 1,
        account: id.clone(),
        seq: 0,
        at_ms: T0_MS,
        tx_id: Uuid::nil(),
        idempotency_key: None,
        body: EventBody::Opened {
            currency: Currency::parse(currency).expect("currency"),
            overdraft_limit: 0,
            metadata: Metadata::empty(),
        },
        outcome: None,
    };
    let mut account = Account::open(&opened).expect("open");
    for n in 1..=credits {
        let credit = Event {
            lsn: 1 + n,
            account: id.clone(),
            seq: n,
            at_ms: T0_MS + n,
            tx_id: Uuid::from_u128(u128::from(n)),
            idempotency_key: None,
            body: EventBody::Credit {
                amount: coffer::domain::Amount::new(i128::from(n)).expect("amount"),
                metadata: Metadata::empty(),
            },
            outcome: None,
        };
        account
            .apply(&credit, Retention::UNLIMITED)
            .expect("credit");
    }
    account
}

#[test]
fn decoding_on_several_threads_gives_the_same_snapshot_and_the_same_first_error() {
    // Goal: a cold start decodes the accounts in parallel runs; the accounts come back in
    // file order with the same parts, and a bad account is named by its index in the file
    // as one thread would name it, also when a later run holds another bad one.
    let accounts: Vec<Account> = (0..10_000u64)
        .map(|i| simple_account(&format!("a-{i}"), ["GEM", "EUR"][i as usize % 2], i % 4))
        .collect();
    let mut writer = SnapshotWriter::new(9, 0, T0_MS);
    for account in &accounts {
        writer.add(&account.parts());
    }
    let bytes = writer.finish([].into_iter());
    let one = snapshot::decode_with(&bytes, 1).expect("one thread");
    for threads in [2, 3, 4] {
        let many = snapshot::decode_with(&bytes, threads).expect("several threads");
        assert_eq!(many.accounts.len(), accounts.len());
        for (a, b) in many.accounts.iter().zip(&one.accounts) {
            assert_eq!(a.parts(), b.parts());
        }
    }
    for (decoded, account) in one.accounts.iter().zip(&accounts) {
        assert_eq!(decoded.parts(), account.parts());
    }

    // Two accounts whose balance is not their credits: the first is reported.
    let mut writer = SnapshotWriter::new(9, 0, T0_MS);
    for (i, account) in accounts.iter().enumerate() {
        let mut parts = account.parts();
        if i == 6_001 || i == 9_002 {
            parts.balance += 1;
        }
        writer.add(&parts);
    }
    let bytes = writer.finish([].into_iter());
    for threads in [1, 2, 4] {
        let Err(error) = snapshot::decode_with(&bytes, threads) else {
            panic!("{threads} threads accepted a bad account");
        };
        assert!(
            error.starts_with("account 6001:"),
            "{threads} threads: {error}"
        );
    }
}
