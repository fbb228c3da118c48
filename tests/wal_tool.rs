//! `coffer wal verify` and `coffer wal dump` on a data directory the engine wrote, and on
//! ones the real server wrote with small segments and frequent snapshots, with and without
//! its WAL archive.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::process::{coffer_bin, http_client, start_server};

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
            "ok: no snapshot, then {records} records to lsn {records} in 1 segments (lsn 1..={records}); 2 accounts"
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

// ---------------------------------------------------------------------------------------
// A directory written by the real server, after snapshots removed (or archived) segments.

/// Credits the load sends at least, and at most while waiting for segments to go.
const CREDITS_MIN: u64 = 200;
const CREDITS_MAX: u64 = 3000;
/// Bound of the load and of the graceful stop.
const SERVE_DEADLINE: Duration = Duration::from_secs(60);

/// The first LSNs of the segments in `dir`, in order.
fn segment_lsns(dir: &Path) -> Vec<u64> {
    let mut lsns: Vec<u64> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| {
                    e.ok()?
                        .file_name()
                        .to_str()?
                        .strip_suffix(".wal")?
                        .parse()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default();
    lsns.sort_unstable();
    lsns
}

fn segment_path(dir: &Path, lsn: u64) -> PathBuf {
    dir.join(coffer::wal::reader::segment_name(lsn))
}

/// Every file under `dir` with its size and modification time: what a read-only command
/// must leave as it was.
fn tree(dir: &Path) -> BTreeMap<PathBuf, (u64, std::time::SystemTime)> {
    let mut found = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir").flatten() {
            let meta = entry.metadata().expect("metadata");
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                found.insert(entry.path(), (meta.len(), meta.modified().expect("mtime")));
            }
        }
    }
    found
}

/// Runs `coffer serve` on `data` with 4 KiB segments, a snapshot every 40 records and no
/// event retention (and `--wal-archive archive`), credits two accounts until snapshots have
/// removed the first segments (with an archive: moved at least three there), then stops it
/// with SIGTERM. Returns the last LSN (every record was acknowledged).
async fn serve_until_segments_go(root: &Path, data: &Path, archive: Option<&Path>) -> u64 {
    let mut args = vec![
        "--wal-segment-bytes",
        "4096",
        "--snapshot-every-records",
        "40",
        "--event-retention",
        "0s",
    ];
    let archive_arg = archive.map(|a| a.display().to_string());
    if let Some(archive) = &archive_arg {
        args.extend(["--wal-archive", archive.as_str()]);
    }
    let mut server = start_server(&coffer_bin(), data, root, &args).await;
    let client = http_client();
    for id in ["alice", "bob"] {
        let url = server.url(&format!("/v1/accounts/{id}"));
        let response = client
            .put(url)
            .json(&serde_json::json!({"currency": "GEM"}));
        assert_eq!(response.send().await.expect("PUT").status(), 201);
    }
    let deadline = Instant::now() + SERVE_DEADLINE;
    let mut credits = 0u64;
    loop {
        let gone = segment_lsns(&data.join("wal"))
            .first()
            .is_some_and(|&lsn| lsn > 1)
            && archive.is_none_or(|a| segment_lsns(a).len() >= 3);
        if credits >= CREDITS_MIN && gone {
            break;
        }
        assert!(
            credits < CREDITS_MAX && Instant::now() < deadline,
            "no segment was removed after {credits} credits:\n{}",
            server.log_text()
        );
        let id = if credits.is_multiple_of(2) {
            "alice"
        } else {
            "bob"
        };
        let response = client
            .post(server.url(&format!("/v1/accounts/{id}/credits")))
            .header("Idempotency-Key", format!("c{credits}"))
            .json(&serde_json::json!({"amount": 1 + credits % 5}))
            .send()
            .await
            .expect("credit");
        assert_eq!(response.status(), 201);
        credits += 1;
    }
    server.sigterm();
    let status = server
        .wait_exit(SERVE_DEADLINE)
        .await
        .expect("a graceful stop");
    assert!(status.success(), "{status:?}");
    credits + 2
}

/// One JSON object per line, each LSN the one after the line before, from `first`.
fn assert_consecutive(stdout: &[u8], first: u64, last: u64) {
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len() as u64, last - first + 1);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["lsn"], first + i as u64, "{line}");
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_snapshots_removed_segments_verify_and_dump_cover_what_remains() {
    // Goal: on a healthy directory whose first segments a snapshot removed, verify checks
    // every segment left and says which LSNs only the snapshot has; dump prints every
    // record left in order from the first one kept and says so on stderr; neither writes.
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    let last = serve_until_segments_go(root.path(), &data, None).await;
    let segments = segment_lsns(&data.join("wal"));
    let first = segments[0];
    assert!(first > 1);
    let before = tree(&data);

    let verified = coffer(&["wal", "verify"], &data);
    let out = text(&verified.stdout);
    assert!(verified.status.success(), "{verified:?}");
    assert!(out.starts_with("ok: snapshot at lsn "), "{out}");
    assert!(
        out.contains(&format!(
            "in {} segments (lsn {first}..={last}); 2 accounts",
            segments.len()
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "journal: lsn {first}..={last} in {} segments, every record checked, no gap; lsn 1..={} are only in the snapshot\n",
            segments.len(),
            first - 1
        )),
        "{out}"
    );

    let dumped = coffer(&["wal", "dump"], &data);
    assert!(dumped.status.success(), "{dumped:?}");
    assert_consecutive(&dumped.stdout, first, last);
    let err = text(&dumped.stderr);
    assert!(
        err.starts_with(&format!(
            "coffer wal dump: {} records, lsn {first}..={last}, from {} segments; lsn 1..={} are only in the snapshot at lsn ",
            last - first + 1,
            segments.len(),
            first - 1
        )),
        "{err}"
    );
    assert_eq!(tree(&data), before, "verify and dump wrote nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_archive_verify_and_dump_read_the_complete_journal_and_refuse_a_gap() {
    // Goal: with --archive (or COFFER_WAL_ARCHIVE) the archived segments come first: dump
    // prints every record from lsn 1, verify replays the journal from lsn 1 to the same
    // accounts; a missing archived segment, or a gap between archive and log, is an error
    // naming the segment after the gap.
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    let archive = root.path().join("archive");
    let last = serve_until_segments_go(root.path(), &data, Some(&archive)).await;
    let archived = segment_lsns(&archive);
    let live = segment_lsns(&data.join("wal"));
    let total = archived.len() + live.len();
    let archive_arg = archive.display().to_string();

    let dumped = coffer(&["wal", "dump", "--archive", &archive_arg], &data);
    assert!(dumped.status.success(), "{dumped:?}");
    assert_consecutive(&dumped.stdout, 1, last);
    assert_eq!(
        text(&dumped.stderr),
        format!(
            "coffer wal dump: {last} records, lsn 1..={last}, from {total} segments ({} archived)\n",
            archived.len()
        )
    );
    let from_env = Command::new(env!("CARGO_BIN_EXE_coffer"))
        .args(["wal", "dump", "--data-dir"])
        .arg(&data)
        .env("COFFER_WAL_ARCHIVE", &archive)
        .output()
        .expect("run coffer");
    assert!(from_env.status.success(), "{from_env:?}");
    assert_eq!(from_env.stdout, dumped.stdout);

    let verified = coffer(&["wal", "verify", "--archive", &archive_arg], &data);
    let out = text(&verified.stdout);
    assert!(verified.status.success(), "{verified:?}");
    assert!(
        out.contains(&format!(
            "journal: lsn 1..={last} in {total} segments ({} archived), every record checked, no gap; its replay from lsn 1 gives the same 2 accounts\n",
            archived.len()
        )),
        "{out}"
    );

    // A missing segment in the middle of the archive.
    let middle = segment_path(&archive, archived[1]);
    let aside = root.path().join("aside.wal");
    std::fs::rename(&middle, &aside).expect("move a segment away");
    let after_gap = segment_path(&archive, archived[2]).display().to_string();
    for command in ["dump", "verify"] {
        let out = coffer(&["wal", command, "--archive", &archive_arg], &data);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{command}: {out:?}");
        assert!(err.contains(&after_gap), "{command}: {err}");
        assert!(
            err.contains(&format!(
                "lsn {}..={} are missing",
                archived[1],
                archived[2] - 1
            )),
            "{command}: {err}"
        );
    }
    std::fs::rename(&aside, &middle).expect("put it back");

    // A gap between the archive and the log.
    let newest = segment_path(&archive, *archived.last().expect("archived"));
    std::fs::rename(&newest, &aside).expect("move a segment away");
    let first_live = segment_path(&data.join("wal"), live[0])
        .display()
        .to_string();
    for command in ["dump", "verify"] {
        let out = coffer(&["wal", command, "--archive", &archive_arg], &data);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{command}: {out:?}");
        assert!(err.contains(&first_live), "{command}: {err}");
        assert!(err.contains("are missing"), "{command}: {err}");
    }
}
