//! Recovery of damaged write-ahead logs, in process through `Engine::open` and through the
//! binary where the exit code matters.
//!
//! What recovery must do with a damaged log (DESIGN.md, STYLE.md §4):
//! - an incomplete or checksum-failing *last* record is a torn tail: it is cut (on disk too),
//!   reported, and everything before it is recovered exactly;
//! - a bad record with a valid record after it is corruption: opening fails with
//!   `WalError::Corrupt` naming the segment file and the record's offset, the binary exits
//!   non-zero and says so on stderr, and the file is left as it was;
//! - a bit flipped in the last record cannot be told apart from a torn write, so it is cut
//!   like one. That record is lost even if it had been acknowledged: this is the documented
//!   limit of a log that has no record after the damaged one to prove it was complete.
//!
//! The writer allocates segments ahead in zero-filled chunks, so a segment file is its
//! records followed by zeros; an all-zero rest is the clean end of a segment. A torn write
//! therefore shows up either as a short file or as a partial record followed by zeros; both
//! are tested.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coffer::domain::{
    AccountId, AccountView, Currency, IdempotencyKey, Metadata, Receipt, Request,
};
use coffer::engine::{EngineError, OpenError, RecoveryReport};
use coffer::wal::WalError;
use coffer::{Engine, EngineConfig};
use uuid::Uuid;

/// Frame header size of the WAL format (STYLE.md §4): magic, version, kind, pad, len, lsn, crc.
const FRAME_HEADER: usize = 24;
/// Offset of the payload length in the frame header.
const FRAME_LEN_OFFSET: usize = 8;
/// Frame magic, as stored.
const FRAME_MAGIC: [u8; 4] = 0x5746_4643u32.to_le_bytes();
/// Small segments, so a log spans several files.
const SMALL_SEGMENT_BYTES: u64 = 512;
/// How long the binary may take to start or to fail.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// Helpers: runtimes, engines, and a scripted workload that remembers what it was told.

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn config(dir: &Path, segment_bytes: Option<u64>) -> EngineConfig {
    let mut config = EngineConfig::new(dir);
    if let Some(bytes) = segment_bytes {
        config.segment_bytes_max = bytes;
    }
    config
}

/// Opens the engine and finishes recovery; panics with the error if it cannot open.
async fn open(dir: &Path, segment_bytes: Option<u64>) -> (Engine, RecoveryReport) {
    let (engine, report) = match Engine::open(config(dir, segment_bytes)) {
        Ok(opened) => opened,
        Err(error) => panic!("Engine::open({}) failed: {error}", dir.display()),
    };
    engine.finish_recovery().await.expect("finish recovery");
    (engine, report)
}

/// Opens and expects an error (an engine that opened is shut down before the panic).
fn open_err(dir: &Path) -> OpenError {
    match Engine::open(config(dir, None)) {
        Ok((engine, report)) => {
            engine.shutdown();
            panic!("Engine::open succeeded on a corrupt log: {report:?}")
        }
        Err(error) => error,
    }
}

fn wal_dir(data: &Path) -> PathBuf {
    data.join("wal")
}

/// The WAL segments, in name (= LSN) order.
fn segments(data: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(wal_dir(data))
        .map(|entries| {
            entries
                .map(|e| e.expect("dir entry").path())
                .filter(|p| p.extension().is_some_and(|e| e == "wal"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn last_segment(data: &Path) -> PathBuf {
    segments(data).pop().expect("at least one segment")
}

/// Start and end offsets of every record in a segment, read from the frame headers, up to
/// the zero-filled rest of the file.
fn records(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() && bytes[offset..].iter().any(|b| *b != 0) {
        assert!(
            offset + FRAME_HEADER <= bytes.len(),
            "partial header at {offset}"
        );
        assert_eq!(
            bytes[offset..offset + 4],
            FRAME_MAGIC,
            "no magic at {offset}"
        );
        let len_bytes: [u8; 4] = bytes[offset + FRAME_LEN_OFFSET..offset + FRAME_LEN_OFFSET + 4]
            .try_into()
            .expect("4 bytes");
        let end = offset + FRAME_HEADER + u32::from_le_bytes(len_bytes) as usize;
        assert!(end <= bytes.len(), "partial record at {offset}");
        out.push((offset, end));
        offset = end;
    }
    out
}

/// Copies a data directory (its WAL) to a new temporary directory.
fn copy_data(from: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().expect("temp dir");
    fs::create_dir_all(wal_dir(to.path())).expect("wal dir");
    for segment in segments(from) {
        let name = segment.file_name().expect("file name");
        fs::copy(&segment, wal_dir(to.path()).join(name)).expect("copy segment");
    }
    to
}

fn account_id(text: &str) -> AccountId {
    AccountId::parse(text).expect("account id")
}

fn key(text: &str) -> IdempotencyKey {
    IdempotencyKey::parse(text).expect("idempotency key")
}

/// A workload of credits, debits, holds, partial captures and releases on two accounts,
/// remembering every account's view after every acknowledged operation.
struct Script {
    engine: Engine,
    accounts: Vec<AccountId>,
    /// Each account's view after the last acknowledged operation.
    views: BTreeMap<String, AccountView>,
    /// Open holds per account, oldest first.
    holds: Vec<Vec<Uuid>>,
    /// Every acknowledged key, with its account and receipt.
    acked: Vec<(AccountId, IdempotencyKey, Arc<Receipt>)>,
    /// Records written: one per opened account and one per operation.
    records: u64,
    step: usize,
}

impl Script {
    async fn new(engine: Engine) -> Script {
        let mut script = Script {
            engine,
            accounts: vec![account_id("rec-a"), account_id("rec-b")],
            views: BTreeMap::new(),
            holds: vec![Vec::new(), Vec::new()],
            acked: Vec::new(),
            records: 0,
            step: 0,
        };
        for id in script.accounts.clone() {
            let (created, view) = script
                .engine
                .open_account(
                    id.clone(),
                    Currency::parse("GEM").expect("currency"),
                    0,
                    Metadata::empty(),
                )
                .await
                .expect("open account");
            assert!(created);
            script.views.insert(id.as_str().to_string(), view);
            script.records += 1;
        }
        script
    }

    /// Runs one request and remembers its outcome.
    async fn run(&mut self, account: usize, request: Request) -> Arc<Receipt> {
        let id = self.accounts[account].clone();
        let k = key(&format!("rec-{}", self.step));
        self.step += 1;
        let executed = self
            .engine
            .execute(&id, Some(k.clone()), request)
            .await
            .expect("operation acknowledged");
        assert!(!executed.replayed);
        let receipt = executed.receipt;
        self.views
            .insert(id.as_str().to_string(), receipt.account.clone());
        self.acked.push((id, k, receipt.clone()));
        self.records += 1;
        receipt
    }

    /// The next operation of a fixed cycle of six kinds.
    async fn next(&mut self) -> Arc<Receipt> {
        let i = self.step;
        let account = (i / 6) % 2;
        let amount = i as i128;
        let metadata = BTreeMap::from([("step".to_string(), i.to_string())]);
        let request = match i % 6 {
            0 => Request::Credit {
                amount: 500 + amount,
                metadata,
            },
            1 | 4 => Request::Hold {
                amount: 20 + amount,
                expires_in_secs: None,
                metadata,
            },
            2 => Request::Capture {
                hold_id: self.holds[account].remove(0),
                amount: Some(7),
                metadata,
            },
            3 => Request::Debit {
                amount: 3 + amount,
                metadata,
            },
            _ => Request::Release {
                hold_id: self.holds[account].remove(0),
                metadata,
            },
        };
        let receipt = self.run(account, request).await;
        if let Some(hold) = &receipt.hold {
            if i % 6 == 1 || i % 6 == 4 {
                self.holds[account].push(hold.id);
            }
        }
        receipt
    }

    /// A hold with metadata on the first account, used as the record that gets damaged.
    async fn final_hold(&mut self) -> Uuid {
        let metadata = BTreeMap::from([("purpose".to_string(), "the last record".to_string())]);
        let receipt = self
            .run(
                0,
                Request::Hold {
                    amount: 11,
                    expires_in_secs: Some(600),
                    metadata,
                },
            )
            .await;
        receipt.hold.as_ref().expect("hold receipt").id
    }
}

/// What a populated data directory holds, and the state before its last record.
struct Populated {
    dir: tempfile::TempDir,
    /// Views after every record but the last.
    views_before_last: BTreeMap<String, AccountView>,
    /// Views after every record.
    views_after_last: BTreeMap<String, AccountView>,
    /// Keys acknowledged before the last record.
    acked_before_last: Vec<(AccountId, IdempotencyKey, Arc<Receipt>)>,
    /// Every acknowledged key, the last record's included.
    acked_all: Vec<(AccountId, IdempotencyKey, Arc<Receipt>)>,
    /// The key and hold of the last record.
    last: (AccountId, IdempotencyKey, Uuid),
    records: u64,
}

/// Writes `steps` operations and then one final hold, and shuts the engine down cleanly.
fn populate(steps: usize, segment_bytes: Option<u64>) -> Populated {
    let dir = tempfile::tempdir().expect("temp dir");
    let rt = runtime();
    let populated = rt.block_on(async move {
        let (engine, report) = open(dir.path(), segment_bytes).await;
        assert_eq!(report.records, 0);
        let mut script = Script::new(engine).await;
        for _ in 0..steps {
            script.next().await;
        }
        let views_before_last = script.views.clone();
        let acked_before_last = script.acked.clone();
        let hold = script.final_hold().await;
        let (account, key, _) = script.acked.last().expect("last").clone();
        script.engine.shutdown();
        Populated {
            dir,
            views_before_last,
            views_after_last: script.views.clone(),
            acked_before_last,
            acked_all: script.acked.clone(),
            last: (account, key, hold),
            records: script.records,
        }
    });
    drop(rt);
    populated
}

/// Every account equals its expected view; every expected key is found with its receipt.
async fn check_state(
    engine: &Engine,
    views: &BTreeMap<String, AccountView>,
    acked: &[(AccountId, IdempotencyKey, Arc<Receipt>)],
    what: &str,
) {
    for (id, view) in views {
        let got = engine
            .account(&account_id(id))
            .await
            .unwrap_or_else(|e| panic!("{what}: account {id}: {e}"));
        assert_eq!(
            &got, view,
            "{what}: account {id} differs from the acknowledged state"
        );
    }
    for (id, k, receipt) in acked {
        let entry = engine
            .idempotency_entry(id, k)
            .await
            .expect("idempotency lookup")
            .unwrap_or_else(|| panic!("{what}: acknowledged key {} is lost", k.as_str()));
        assert_eq!(
            &entry.receipt,
            receipt,
            "{what}: key {} has another outcome",
            k.as_str()
        );
    }
}

/// The recovered state lacks exactly the last record: its key and hold are unknown.
async fn check_last_lost(engine: &Engine, populated: &Populated, what: &str) {
    let (id, k, hold) = &populated.last;
    check_state(
        engine,
        &populated.views_before_last,
        &populated.acked_before_last,
        what,
    )
    .await;
    let entry = engine.idempotency_entry(id, k).await.expect("lookup");
    assert!(
        entry.is_none(),
        "{what}: the cut record's key {} is still known",
        k.as_str()
    );
    match engine.hold(id, hold).await {
        Err(EngineError::Op(_)) => {}
        other => panic!("{what}: the cut record's hold should be unknown, got {other:?}"),
    }
}

/// Appends one credit after recovery, shuts down, reopens, and checks it survived on top of
/// `views`.
fn append_and_reopen(dir: &Path, views: &BTreeMap<String, AccountView>, what: &str) {
    let account = account_id("rec-b");
    let k = key("after-recovery");
    let rt = runtime();
    let receipt = rt.block_on(async {
        let (engine, _) = open(dir, None).await;
        let executed = engine
            .execute(
                &account,
                Some(k.clone()),
                Request::Credit {
                    amount: 5,
                    metadata: BTreeMap::new(),
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{what}: append after recovery: {e}"));
        engine.shutdown();
        executed.receipt
    });
    drop(rt);
    let before = &views[account.as_str()];
    assert_eq!(
        receipt.account.seq,
        before.seq + 1,
        "{what}: seq after append"
    );
    assert_eq!(
        receipt.account.balance,
        before.balance + 5,
        "{what}: balance after append"
    );
    let rt = runtime();
    rt.block_on(async {
        let (engine, report) = open(dir, None).await;
        assert!(
            report.tail_cut.is_none(),
            "{what}: reopen after append cut a tail: {:?}",
            report.tail_cut
        );
        let mut views = views.clone();
        views.insert(account.as_str().to_string(), receipt.account.clone());
        check_state(
            &engine,
            &views,
            &[(account.clone(), k.clone(), receipt.clone())],
            what,
        )
        .await;
        engine.shutdown();
    });
}

fn flip_bit(path: &Path, offset: usize, bit: u8) -> Vec<u8> {
    let mut bytes = fs::read(path).expect("read segment");
    bytes[offset] ^= 1 << bit;
    fs::write(path, &bytes).expect("write segment");
    bytes
}

/// Asserts that `error` is `Corrupt` at `path` and `offset`.
fn assert_corrupt_at(error: &OpenError, path: &Path, offset: usize, what: &str) {
    match error {
        OpenError::Wal(WalError::Corrupt {
            path: got_path,
            offset: got_offset,
            ..
        }) => {
            assert_eq!(got_path, path, "{what}: wrong file in {error}");
            assert_eq!(
                *got_offset, offset as u64,
                "{what}: wrong offset in {error}"
            );
        }
        other => panic!(
            "{what}: expected Corrupt at {} offset {offset}, got {other:?}",
            path.display()
        ),
    }
}

// ---------------------------------------------------------------------------------------
// The binary.

/// A `coffer serve` process, killed and reaped when dropped.
struct Process {
    child: Child,
    stderr: PathBuf,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    fn start(data: &Path, listen: &str, stderr: PathBuf) -> Process {
        let child = Command::new(env!("CARGO_BIN_EXE_coffer"))
            .arg("serve")
            .arg("--data-dir")
            .arg(data)
            .arg("--listen")
            .arg(listen)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn coffer");
        Process { child, stderr }
    }

    fn stderr(&self) -> String {
        strip_ansi(&fs::read_to_string(&self.stderr).unwrap_or_default())
    }

    /// Waits (bounded) for the process to exit.
    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "coffer did not exit within {PROCESS_TIMEOUT:?}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Starts the binary on a free port and waits until it is ready; retries if the port was
/// taken meanwhile.
async fn start_ready(data: &Path, logs: &Path) -> (Process, String) {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("http client");
    for _ in 0..8 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let log = logs.join(format!("coffer-{port}.log"));
        let mut process = Process::start(data, &format!("127.0.0.1:{port}"), log);
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        loop {
            if let Some(status) = process.child.try_wait().expect("try_wait") {
                let stderr = process.stderr();
                if stderr.contains("cannot listen") {
                    break;
                }
                panic!("coffer exited before ready ({status:?}):\n{stderr}");
            }
            assert!(
                Instant::now() < deadline,
                "coffer not ready:\n{}",
                process.stderr()
            );
            let ready = http
                .get(format!("{base}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ready && process.stderr().contains("coffer ready") {
                return (process, base);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    panic!("could not start coffer on a free port");
}

// ---------------------------------------------------------------------------------------
// Tests.

/// How a torn write of the last record looks on disk.
#[derive(Clone, Copy, Debug)]
enum Tear {
    /// The file ends inside the record (its size was never made durable).
    ShortFile,
    /// The record's end was never written: zeros follow, up to the allocated size.
    ZeroedRest,
}

/// The bytes of a segment whose last record `start..end` was torn after `cut` bytes.
fn tear(pristine: &[u8], start: usize, end: usize, cut: usize, how: Tear) -> Vec<u8> {
    assert!((start..end).contains(&cut));
    match how {
        Tear::ShortFile => pristine[..cut].to_vec(),
        Tear::ZeroedRest => {
            let mut bytes = pristine.to_vec();
            bytes[cut..end].fill(0);
            bytes
        }
    }
}

#[test]
fn a_torn_last_record_is_cut_at_every_length_and_nothing_before_it_is_lost() {
    // Goal: tearing the last record at every byte (short file or zeroed rest) loses exactly that record, is reported and cut on disk, and the log accepts and keeps new writes.
    let populated = populate(17, None);
    let segment = last_segment(populated.dir.path());
    let pristine = fs::read(&segment).expect("read segment");
    let frames = records(&pristine);
    assert_eq!(
        frames.len() as u64,
        populated.records,
        "one record per event"
    );
    let (start, end) = *frames.last().expect("a last record");
    assert!(
        pristine[end..].iter().all(|b| *b == 0),
        "zeros after the records"
    );

    for how in [Tear::ShortFile, Tear::ZeroedRest] {
        for cut in start..end {
            let what = format!("{how:?} at {cut} (last record {start}..{end})");
            let copy = copy_data(populated.dir.path());
            let seg = last_segment(copy.path());
            let torn = tear(&pristine, start, end, cut, how);
            fs::write(&seg, &torn).expect("tear");
            let rt = runtime();
            rt.block_on(async {
                let (engine, report) = open(copy.path(), None).await;
                if cut == start {
                    // Nothing of the record was written: the log simply ends before it.
                    assert!(
                        report.tail_cut.is_none(),
                        "{what}: nothing to cut: {report:?}"
                    );
                } else {
                    let tail = report
                        .tail_cut
                        .as_ref()
                        .unwrap_or_else(|| panic!("{what}: no tail cut reported: {report:?}"));
                    assert_eq!(tail.path, seg, "{what}");
                    assert_eq!(tail.offset, start as u64, "{what}");
                    assert_eq!(tail.bytes, (torn.len() - start) as u64, "{what}");
                }
                assert_eq!(
                    report.records,
                    populated.records - 1,
                    "{what}: records replayed"
                );
                assert_eq!(report.last_lsn, populated.records - 1, "{what}: last lsn");
                check_last_lost(&engine, &populated, &what).await;
                engine.shutdown();
            });
            drop(rt);
            let on_disk = fs::read(&seg).expect("segment");
            if cut == start {
                assert_eq!(on_disk, torn, "{what}: a clean log must not be changed");
            } else {
                assert_eq!(
                    on_disk,
                    pristine[..start],
                    "{what}: the torn bytes should be cut on disk"
                );
            }
            append_and_reopen(copy.path(), &populated.views_before_last, &what);
        }
    }
}

#[test]
fn a_torn_first_record_of_a_new_segment_is_cut_and_writing_continues_there() {
    // Goal: with several segments, a torn record that is the only one of the last segment is cut to an empty segment, and writing continues in it.
    let dir = tempfile::tempdir().expect("temp dir");
    let rt = runtime();
    let (views_before, acked_before, segments_before) = rt.block_on(async {
        let (engine, _) = open(dir.path(), Some(SMALL_SEGMENT_BYTES)).await;
        let mut script = Script::new(engine).await;
        // Write until a record starts a new segment: that record is then alone in it.
        let mut previous = (script.views.clone(), script.acked.clone());
        let mut count = segments(dir.path()).len();
        for _ in 0..200 {
            previous = (script.views.clone(), script.acked.clone());
            script.next().await;
            let now = segments(dir.path()).len();
            if now > count && count > 1 {
                break;
            }
            count = now;
        }
        script.engine.shutdown();
        (previous.0, previous.1, segments(dir.path()))
    });
    drop(rt);
    assert!(
        segments_before.len() >= 3,
        "expected several segments: {segments_before:?}"
    );
    let last = segments_before.last().expect("last").clone();
    let pristine = fs::read(&last).expect("read");
    let frames = records(&pristine);
    assert_eq!(frames.len(), 1, "the last segment should hold one record");
    let end = frames[0].1;
    for (how, cut) in [Tear::ShortFile, Tear::ZeroedRest]
        .into_iter()
        .flat_map(|how| (0..end).map(move |cut| (how, cut)))
    {
        let what = format!("{how:?} of the lone record at {cut}");
        let copy = copy_data(dir.path());
        let seg = last_segment(copy.path());
        let torn = tear(&pristine, 0, end, cut, how);
        fs::write(&seg, &torn).expect("tear");
        let rt = runtime();
        rt.block_on(async {
            let (engine, report) = open(copy.path(), Some(SMALL_SEGMENT_BYTES)).await;
            if cut > 0 {
                let tail = report
                    .tail_cut
                    .as_ref()
                    .unwrap_or_else(|| panic!("{what}: no cut"));
                assert_eq!(
                    (tail.path.as_path(), tail.offset),
                    (seg.as_path(), 0),
                    "{what}"
                );
            }
            check_state(&engine, &views_before, &acked_before, &what).await;
            engine.shutdown();
        });
        drop(rt);
        let expected_len = if cut == 0 { torn.len() } else { 0 };
        assert_eq!(
            fs::metadata(&seg).expect("segment").len(),
            expected_len as u64,
            "{what}"
        );
        append_and_reopen(copy.path(), &views_before, &what);
    }
}

#[test]
fn garbage_after_the_last_record_is_cut() {
    // Goal: random bytes or a partial frame after the last complete record (over the zero-filled space or past the end of the file) are cut as a torn tail, zeros are a clean end, and nothing is lost.
    let populated = populate(11, None);
    let segment = last_segment(populated.dir.path());
    let pristine = fs::read(&segment).expect("read segment");
    let frames = records(&pristine);
    let end = frames.last().expect("records").1;
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut random = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                (rng as u8) | 1
            })
            .collect()
    };
    let first_start = frames[0].0;
    let last_start = frames.last().expect("records").0;
    assert_ne!(
        pristine[end - 1],
        0,
        "the last record ends in a non-zero byte"
    );
    let mut header_with_huge_len = pristine[first_start..first_start + FRAME_HEADER].to_vec();
    header_with_huge_len[FRAME_LEN_OFFSET..FRAME_LEN_OFFSET + 4]
        .copy_from_slice(&60_000u32.to_le_bytes());
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        ("1 zero byte", vec![0]),
        ("24 zero bytes", vec![0; FRAME_HEADER]),
        ("4096 zero bytes", vec![0; 4096]),
        ("1 random byte", random(1)),
        ("7 random bytes", random(7)),
        ("100 random bytes", random(100)),
        ("5000 random bytes", random(5000)),
        ("the magic alone", FRAME_MAGIC.to_vec()),
        // The last record ends in non-zero metadata bytes, so its copy minus the last byte
        // stays incomplete even with zeros after it.
        (
            "a copy of the last record minus its last byte",
            pristine[last_start..end - 1].to_vec(),
        ),
        (
            "a header claiming 60000 payload bytes",
            header_with_huge_len,
        ),
    ];
    for (name, tail) in &garbage {
        // Written where the next record would go, or appended after the zero-filled space.
        for at in [end, pristine.len()] {
            let what = format!("{name} at {at} (records end at {end})");
            let copy = copy_data(populated.dir.path());
            let seg = last_segment(copy.path());
            let mut bytes = pristine.clone();
            bytes.resize(bytes.len().max(at + tail.len()), 0);
            bytes[at..at + tail.len()].copy_from_slice(tail);
            fs::write(&seg, &bytes).expect("write");
            let zeros = tail.iter().all(|b| *b == 0);
            let rt = runtime();
            rt.block_on(async {
                let (engine, report) = open(copy.path(), None).await;
                match &report.tail_cut {
                    // Zeros are the clean end of a segment: no cut needed.
                    None => assert!(zeros, "{what}: no tail cut reported"),
                    Some(cut) => assert_eq!(
                        (cut.offset, cut.bytes),
                        (end as u64, (bytes.len() - end) as u64),
                        "{what}"
                    ),
                }
                assert_eq!(report.records, populated.records, "{what}");
                check_state(
                    &engine,
                    &populated.views_after_last,
                    &populated.acked_all,
                    &what,
                )
                .await;
                engine.shutdown();
            });
            drop(rt);
            let on_disk = fs::read(&seg).expect("segment");
            if !zeros {
                assert_eq!(
                    on_disk,
                    pristine[..end],
                    "{what}: the garbage should be cut on disk"
                );
            }
            append_and_reopen(copy.path(), &populated.views_after_last, &what);
        }
    }
}

#[test]
fn a_flipped_bit_before_the_last_record_refuses_to_open_naming_file_and_offset() {
    // Goal: one flipped bit in any byte of any record but the last makes Engine::open fail with Corrupt at that record's file and offset, and leaves the file untouched.
    let populated = populate(9, None);
    let segment = last_segment(populated.dir.path());
    let pristine = fs::read(&segment).expect("read segment");
    let frames = records(&pristine);
    let work = copy_data(populated.dir.path());
    let seg = last_segment(work.path());
    let mut checked = 0;
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .expect("open");
    for (index, &(start, end)) in frames[..frames.len() - 1].iter().enumerate() {
        for offset in start..end {
            let bit = ((offset + index) % 8) as u8;
            let what = format!("bit {bit} of byte {offset} (record {index} at {start}..{end})");
            file.write_all_at(&[pristine[offset] ^ (1 << bit)], offset as u64)
                .expect("flip");
            let error = open_err(work.path());
            assert_corrupt_at(&error, &seg, start, &what);
            let mut byte = [0u8];
            file.read_exact_at(&mut byte, offset as u64)
                .expect("read back");
            assert_eq!(
                (file.metadata().expect("len").len(), byte[0]),
                (pristine.len() as u64, pristine[offset] ^ (1 << bit)),
                "{what}: a refused log must not be changed"
            );
            file.write_all_at(&[pristine[offset]], offset as u64)
                .expect("restore");
            checked += 1;
        }
    }
    assert!(checked > 500, "only {checked} bytes checked");
}

#[test]
fn a_flipped_bit_in_an_earlier_segment_names_that_segment() {
    // Goal: with several segments, damage in a segment that is not the last (even in its last record) is corruption naming that segment, as is a torn end of such a segment or a missing segment.
    let dir = tempfile::tempdir().expect("temp dir");
    let rt = runtime();
    rt.block_on(async {
        let (engine, _) = open(dir.path(), Some(SMALL_SEGMENT_BYTES)).await;
        let mut script = Script::new(engine).await;
        for _ in 0..40 {
            script.next().await;
        }
        script.engine.shutdown();
    });
    drop(rt);
    let work = copy_data(dir.path());
    let all = segments(work.path());
    assert!(all.len() >= 4, "expected several segments: {all:?}");
    // Damages one segment with `damage`, expects Corrupt at `at`, restores the segment.
    let check = |seg: &Path, damage: &dyn Fn(&mut Vec<u8>), at: (&Path, usize), what: &str| {
        let pristine = fs::read(seg).expect("read");
        let mut bytes = pristine.clone();
        damage(&mut bytes);
        fs::write(seg, &bytes).expect("damage");
        assert_corrupt_at(&open_err(work.path()), at.0, at.1, what);
        fs::write(seg, &pristine).expect("restore");
    };
    for (index, seg) in all[..all.len() - 1].iter().enumerate() {
        let pristine = fs::read(seg).expect("read");
        let frames = records(&pristine);
        let &(start, end) = frames.last().expect("records");
        for (offset, bit) in [(start, 0u8), (start + 10, 3), (start + 21, 7), (end - 1, 1)] {
            check(
                seg,
                &|b| b[offset] ^= 1 << bit,
                (seg, start),
                &format!("segment {index}, bit {bit} of byte {offset}"),
            );
        }
        // A non-last segment whose last record is torn is not a tail: corruption.
        check(
            seg,
            &|b| b.truncate(end - 1),
            (seg, start),
            &format!("segment {index} cut short inside its last record"),
        );
        check(
            seg,
            &|b| b[end - 5..end].fill(0),
            (seg, start),
            &format!("segment {index} with the end of its last record zeroed"),
        );
        // Its last record zeroed entirely looks like a clean end, but the next segment
        // then does not continue the LSNs.
        check(
            seg,
            &|b| b[start..end].fill(0),
            (&all[index + 1], 0),
            &format!("segment {index} with its last record zeroed"),
        );
    }
    // A missing segment in the middle: the next one does not continue the LSNs.
    let second = fs::read(&all[1]).expect("read");
    fs::remove_file(&all[1]).expect("remove");
    assert_corrupt_at(&open_err(work.path()), &all[2], 0, "a missing segment");
    fs::write(&all[1], second).expect("restore");
    // Everything restored: the log opens again.
    let rt = runtime();
    rt.block_on(async {
        let (engine, report) = open(work.path(), Some(SMALL_SEGMENT_BYTES)).await;
        assert!(report.tail_cut.is_none(), "{report:?}");
        engine.shutdown();
    });
}

#[test]
fn a_flipped_bit_in_the_last_record_is_cut_as_a_torn_tail() {
    // Goal: a bit flipped anywhere in the last record is indistinguishable from a torn write, so that record alone is cut (the documented limit) and the rest is recovered.
    let populated = populate(7, None);
    let segment = last_segment(populated.dir.path());
    let pristine = fs::read(&segment).expect("read segment");
    let &(start, end) = records(&pristine).last().expect("records");
    let copy = copy_data(populated.dir.path());
    let seg = last_segment(copy.path());
    for offset in start..end {
        let bit = (offset % 8) as u8;
        let what = format!("bit {bit} of byte {offset} in the last record {start}..{end}");
        fs::write(&seg, &pristine).expect("restore");
        flip_bit(&seg, offset, bit);
        let rt = runtime();
        rt.block_on(async {
            let (engine, report) = open(copy.path(), None).await;
            let cut = report
                .tail_cut
                .as_ref()
                .unwrap_or_else(|| panic!("{what}: no tail cut reported"));
            assert_eq!(
                (cut.offset, cut.bytes),
                (start as u64, (pristine.len() - start) as u64),
                "{what}"
            );
            check_last_lost(&engine, &populated, &what).await;
            engine.shutdown();
        });
        drop(rt);
        assert_eq!(
            fs::metadata(&seg).expect("len").len(),
            start as u64,
            "{what}"
        );
    }
}

#[test]
fn the_binary_exits_non_zero_on_corruption_and_names_file_and_offset() {
    // Goal: `coffer serve` on a log damaged before its last record exits with a non-zero status (no panic) and its stderr names the segment file and the offset.
    let populated = populate(5, None);
    let segment = last_segment(populated.dir.path());
    let pristine = fs::read(&segment).expect("read segment");
    let frames = records(&pristine);
    let logs = tempfile::tempdir().expect("log dir");
    // Magic, length field, LSN, CRC and payload of the second and fourth records.
    let cases = [
        (frames[1].0, 0u8),
        (frames[1].0 + FRAME_LEN_OFFSET + 1, 2),
        (frames[3].0 + 14, 5),
        (frames[3].0 + 22, 6),
        (frames[3].1 - 3, 4),
    ];
    for (n, (offset, bit)) in cases.into_iter().enumerate() {
        let start = frames
            .iter()
            .find(|(s, e)| (*s..*e).contains(&offset))
            .expect("record")
            .0;
        let work = copy_data(populated.dir.path());
        let seg = last_segment(work.path());
        flip_bit(&seg, offset, bit);
        let log = logs.path().join(format!("case-{n}.log"));
        let mut process = Process::start(work.path(), "127.0.0.1:0", log);
        let status = process.wait_exit();
        let stderr = process.stderr();
        let what = format!("case {n}: bit {bit} of byte {offset}");
        assert!(
            !status.success(),
            "{what}: coffer started on a corrupt log:\n{stderr}"
        );
        assert!(
            status.code().is_some_and(|c| c != 0),
            "{what}: expected a non-zero exit code, got {status:?}:\n{stderr}"
        );
        assert!(
            !stderr.contains("panicked"),
            "{what}: coffer panicked:\n{stderr}"
        );
        let path = seg.display().to_string();
        assert!(
            stderr.contains(&path),
            "{what}: stderr does not name {path}:\n{stderr}"
        );
        let offset_named = [
            format!("offset {start}"),
            format!("offset={start}"),
            format!("offset: {start}"),
        ]
        .iter()
        .any(|s| stderr.contains(s.as_str()));
        assert!(
            offset_named,
            "{what}: stderr does not name offset {start}:\n{stderr}"
        );
    }
}

#[test]
fn the_binary_starts_on_a_torn_tail_and_serves_what_was_acknowledged() {
    // Goal: `coffer serve` on a log whose last record is torn logs the cut, becomes ready and serves the state before that record.
    let populated = populate(8, None);
    let segment = last_segment(populated.dir.path());
    let pristine = fs::read(&segment).expect("read segment");
    let &(start, end) = records(&pristine).last().expect("records");
    fs::write(&segment, &pristine[..start + (end - start) / 2]).expect("tear");
    let logs = tempfile::tempdir().expect("log dir");
    let rt = runtime();
    rt.block_on(async {
        let (process, base) = start_ready(populated.dir.path(), logs.path()).await;
        let stderr = process.stderr();
        assert!(
            stderr.contains("torn"),
            "the cut should be logged:\n{stderr}"
        );
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        for (id, view) in &populated.views_before_last {
            let account: serde_json::Value = http
                .get(format!("{base}/v1/accounts/{id}"))
                .send()
                .await
                .expect("GET account")
                .json()
                .await
                .expect("JSON");
            assert_eq!(account["balance"], view.balance, "{id}: {account}");
            assert_eq!(account["held"], view.held, "{id}: {account}");
            assert_eq!(account["seq"], view.seq, "{id}: {account}");
        }
        let (id, k, _) = &populated.last;
        let status = http
            .get(format!(
                "{base}/v1/accounts/{}/idempotency-keys/{}",
                id.as_str(),
                k.as_str()
            ))
            .send()
            .await
            .expect("lookup")
            .status();
        assert_eq!(status, 404, "the torn record's key must be unknown");
        drop(process);
    });
}

#[test]
fn an_empty_data_dir_starts_and_keeps_what_is_written() {
    // Goal: a missing directory, an empty one, an empty wal/ and a lone empty first segment all open as an empty log that then keeps new writes.
    type Setup = fn(&Path);
    let setups: [(&str, Setup); 4] = [
        ("a missing directory", |d| {
            fs::remove_dir(d).expect("remove")
        }),
        ("an empty directory", |_| {}),
        ("an empty wal directory", |d| {
            fs::create_dir(d.join("wal")).expect("mkdir")
        }),
        ("a lone empty first segment", |d| {
            fs::create_dir(d.join("wal")).expect("mkdir");
            File::create(d.join("wal").join(format!("{:020}.wal", 1))).expect("create");
        }),
    ];
    for (name, setup) in setups {
        let root = tempfile::tempdir().expect("temp dir");
        let dir = root.path().join("data");
        fs::create_dir(&dir).expect("mkdir");
        setup(&dir);
        let rt = runtime();
        let (views, acked) = rt.block_on(async {
            let (engine, report) = open(&dir, None).await;
            assert_eq!(
                (report.records, report.accounts, report.last_lsn),
                (0, 0, 0),
                "{name}: {report:?}"
            );
            assert!(report.tail_cut.is_none(), "{name}: {report:?}");
            let mut script = Script::new(engine).await;
            for _ in 0..4 {
                script.next().await;
            }
            script.engine.shutdown();
            (script.views.clone(), script.acked.clone())
        });
        drop(rt);
        let rt = runtime();
        rt.block_on(async {
            let (engine, report) = open(&dir, None).await;
            assert_eq!(
                report.records, 6,
                "{name}: two accounts and four operations"
            );
            assert!(report.tail_cut.is_none(), "{name}");
            check_state(&engine, &views, &acked, name).await;
            engine.shutdown();
        });
    }
}

#[test]
fn an_empty_segment_at_the_end_is_fine() {
    // Goal: an empty last segment (a crash right after a rotation created it) opens without a cut, and writing continues in it.
    let populated = populate(6, None);
    let next = wal_dir(populated.dir.path()).join(format!("{:020}.wal", populated.records + 1));
    File::create(&next).expect("create empty segment");
    let rt = runtime();
    rt.block_on(async {
        let (engine, report) = open(populated.dir.path(), None).await;
        assert!(report.tail_cut.is_none(), "{report:?}");
        assert_eq!(report.records, populated.records);
        check_state(
            &engine,
            &populated.views_after_last,
            &populated.acked_all,
            "empty last segment",
        )
        .await;
        engine.shutdown();
    });
    drop(rt);
    append_and_reopen(
        populated.dir.path(),
        &populated.views_after_last,
        "empty last segment",
    );
    assert!(
        fs::metadata(&next).expect("segment").len() > 0,
        "the write after recovery should go to the empty last segment"
    );
}
