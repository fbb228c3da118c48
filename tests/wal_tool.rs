//! `coffer wal verify` and `coffer wal dump` on a data directory the engine wrote.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use coffer::domain::{AccountId, Currency, IdempotencyKey, Metadata, Request};
use coffer::{Engine, EngineConfig};

/// Writes 2 accounts and 20 changes (credits, debits, a hold and its capture); returns the
/// number of records.
async fn write_log(dir: &Path) -> u64 {
    let (engine, _) = Engine::open(EngineConfig::new(dir)).expect("open");
    engine.finish_recovery().await.expect("recover");
    let mut records = 0;
    for name in ["alice", "bob"] {
        let id = AccountId::parse(name).expect("id");
        let currency = Currency::parse("GEM").expect("currency");
        engine
            .open_account(id.clone(), currency, 0, Metadata::empty())
            .await
            .expect("open account");
        records += 1;
        for i in 0..9 {
            let request = if i % 3 == 2 {
                Request::Debit {
                    amount: 5,
                    metadata: BTreeMap::new(),
                }
            } else {
                Request::Credit {
                    amount: 10,
                    metadata: BTreeMap::from([("i".to_string(), i.to_string())]),
                }
            };
            let key = IdempotencyKey::parse(&format!("{name}-{i}")).expect("key");
            engine
                .execute(&id, Some(key), request)
                .await
                .expect("change");
            records += 1;
        }
    }
    let alice = AccountId::parse("alice").expect("id");
    let hold = Request::Hold {
        amount: 7,
        expires_in_secs: None,
        metadata: BTreeMap::new(),
    };
    let held = engine.execute(&alice, None, hold).await.expect("hold");
    let hold_id = held.receipt.hold.as_ref().expect("hold").id;
    let capture = Request::Capture {
        hold_id,
        amount: None,
        metadata: BTreeMap::new(),
    };
    engine
        .execute(&alice, None, capture)
        .await
        .expect("capture");
    engine.shutdown();
    records + 2
}

fn coffer(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_coffer"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .expect("run coffer")
}

#[tokio::test]
async fn verify_reports_a_sound_log_and_dump_prints_every_record_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let records = write_log(dir.path()).await;

    let verified = coffer(&["wal", "verify"], dir.path());
    let text = String::from_utf8_lossy(&verified.stdout);
    assert!(verified.status.success(), "{text} {verified:?}");
    assert!(
        text.contains(&format!(
            "ok: no snapshot, then {records} records to lsn {records} in 1 segments; 2 accounts"
        )),
        "{text}"
    );
    // alice: 6 credits of 10 - 3 debits of 5 - a capture of 7 = 38; bob: 45.
    assert!(text.contains("0 open holds, total balance 83"), "{text}");

    let dumped = coffer(&["wal", "dump"], dir.path());
    assert!(dumped.status.success(), "{dumped:?}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&dumped.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len() as u64, records);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["lsn"], i as u64 + 1);
    }
    assert_eq!(lines[0]["kind"], "opened");
    assert_eq!(lines[0]["account"], "alice");
    assert_eq!(lines[1]["kind"], "credit");
    assert_eq!(lines[1]["amount"], 10);
    assert_eq!(lines[1]["idempotency_key"], "alice-0");
    assert_eq!(lines[1]["metadata"]["i"], "0");
    let last = &lines[lines.len() - 1];
    assert_eq!(last["kind"], "capture");
    assert_eq!(last["amount"], 7);
    assert_eq!(last["hold_id"], lines[lines.len() - 2]["hold_id"]);
}

#[tokio::test]
async fn verify_fails_on_a_flipped_byte_and_names_the_file_and_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path()).await;
    let segment = dir.path().join("wal").join("00000000000000000001.wal");
    let mut bytes = std::fs::read(&segment).expect("read");
    // A byte inside the third record: damage in the middle of the log, not a torn tail.
    let offset = 200;
    bytes[offset] ^= 0x01;
    std::fs::write(&segment, &bytes).expect("write");

    let verified = coffer(&["wal", "verify"], dir.path());
    let text = String::from_utf8_lossy(&verified.stderr);
    assert!(!verified.status.success(), "{verified:?}");
    assert!(text.contains("corrupt WAL"), "{text}");
    assert!(text.contains("00000000000000000001.wal"), "{text}");

    let dumped = coffer(&["wal", "dump"], dir.path());
    assert!(!dumped.status.success(), "dump stops at the damage too");
}

#[test]
fn a_directory_without_a_log_is_an_error_not_an_empty_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("typo");
    for command in ["verify", "dump"] {
        let out = coffer(&["wal", command], &missing);
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command}: {out:?}");
        assert!(text.contains("no WAL directory here"), "{command}: {text}");
    }
}
