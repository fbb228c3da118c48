//! The write-ahead log: segmented append-only files of framed records, one writer thread with
//! group commit, and a durable-LSN watermark that replies wait on.
//!
//! Appenders (account actors) encode a frame into a shared buffer and get an LSN back at
//! once; they never wait for the disk. The writer thread takes whatever is queued, writes it
//! with one `write_all`, makes it durable with one `fdatasync`, then advances `durable_lsn`
//! and wakes every waiter it covers. One fsync therefore serves every record queued while
//! the previous one ran.
//!
//! A failed write or sync is never retried: after a failed fsync the kernel may already
//! have dropped the dirty pages, so a retry that "succeeds" proves nothing. The WAL marks
//! itself failed, fails every waiter and refuses every later append; in-memory state is then
//! ahead of the log and must not be served again. Recovery on restart decides what survived.

pub mod codec;
pub mod reader;
pub mod tail;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};
use tokio::sync::{oneshot, watch};

pub use reader::{
    cut_tail, locate, replay, replay_after, replay_frames_after, replay_from, ReplayOutcome,
    TailCut,
};

use crate::storage::{Storage, StorageFile};

/// Default size at which the writer starts a new segment.
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;
/// The writer takes at most this much queued data into one write + fsync.
pub const WAL_BATCH_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Segments grow by zero-filled chunks of this size written ahead of the records. Records
/// then overwrite allocated, initialized blocks and `fdatasync` has no file-size metadata
/// to commit, which on ext4 roughly halves its latency. Replay reads a zero tail as the
/// clean end of a segment.
pub const SEGMENT_ZERO_CHUNK_BYTES: u64 = 4 * 1024 * 1024;

/// WAL failures. I/O and corruption are kept apart: one is the machine, the other the data.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// An I/O call failed.
    #[error("wal i/o on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Bytes that are not a valid log, not at the tail.
    #[error("corrupt WAL: {path} at offset {offset}: {reason}")]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Byte offset of the bad record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A write or sync failed earlier; the log accepts nothing more.
    #[error("storage failure: the log could not be written or synced, writes are stopped")]
    Failed,
    /// The log was closed for shutdown.
    #[error("the log is closed")]
    Closed,
}

impl WalError {
    /// The same kind of failure, for telling several waiters (I/O details are dropped:
    /// they were logged where they happened).
    pub fn clone_kind(&self) -> WalError {
        match self {
            WalError::Closed => WalError::Closed,
            _ => WalError::Failed,
        }
    }

    pub(crate) fn io(path: &Path, source: io::Error) -> WalError {
        WalError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Counters for `/metrics`. Relaxed ordering: they are statistics, read without a
/// happens-before relation to anything else.
#[derive(Debug)]
pub struct WalStats {
    /// Records appended.
    pub records: AtomicU64,
    /// Bytes written.
    pub bytes: AtomicU64,
    /// Records per group commit (`coffer_wal_batch_records`).
    pub batch_records: prometheus::Histogram,
    /// Time of each fdatasync (`coffer_wal_fsync_seconds`); its count and sum are the
    /// number of group commits and the time spent syncing.
    pub fsync_seconds: prometheus::Histogram,
}

impl Default for WalStats {
    fn default() -> WalStats {
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            prometheus::Histogram::with_opts(
                prometheus::HistogramOpts::new(name, help).buckets(buckets),
            )
            .expect("constant, valid histogram options")
        };
        WalStats {
            records: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            batch_records: histogram(
                "coffer_wal_batch_records",
                "Records written and synced by one group commit.",
                (0..14).map(|i| f64::from(1u32 << i)).collect(),
            ),
            fsync_seconds: histogram(
                "coffer_wal_fsync_seconds",
                "Time of one WAL fdatasync.",
                vec![
                    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                    0.1, 0.25, 0.5, 1.0,
                ],
            ),
        }
    }
}

/// Who runs the group commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriterMode {
    /// A writer thread commits whatever is queued, as soon as it is queued.
    #[default]
    Thread,
    /// Nothing is written until the owner calls [`Wal::commit`]: for deterministic
    /// simulation, where the test decides when each group commit happens.
    Manual,
}

/// Where the writer continues after recovery.
#[derive(Debug, Clone)]
pub struct WalStart {
    /// The storage the segments live on.
    pub storage: Arc<dyn Storage>,
    /// Who runs the group commits.
    pub mode: WriterMode,
    /// The directory of segments.
    pub dir: PathBuf,
    /// The last durable LSN found by recovery (0 for an empty log).
    pub last_lsn: u64,
    /// The last segment and its valid length, to append to.
    pub last_segment: Option<(PathBuf, u64)>,
    /// Size at which to start a new segment; at least 1 (1: a new segment for every group
    /// commit).
    pub segment_bytes_max: u64,
}

/// Handle to the log. Cheap to share behind an `Arc`.
pub struct Wal {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// The writer itself in [`WriterMode::Manual`].
    manual: Mutex<Option<Writer>>,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    durable_lsn: AtomicU64,
    failed: AtomicBool,
    waiters: Mutex<Vec<Waiter>>,
    stats: WalStats,
    /// The last durable batches, for the event stream.
    tail: Mutex<tail::Tail>,
    /// The durable LSN, for those who wait for it to move (event-stream long polls).
    durable_watch: watch::Sender<u64>,
    /// The first LSN this process writes (every record from it on is of the current version).
    start_lsn: u64,
}

/// Work to run once an LSN is durable (with `Ok`), or once the log has failed (with the
/// error). It runs on the writer thread, so it must be short: typically a channel send.
pub type OnDurable = Box<dyn FnOnce(Result<(), WalError>) + Send>;

/// A callback waiting for an LSN to become durable.
type Waiter = (u64, OnDurable);

struct Queue {
    buf: Vec<u8>,
    first_lsn: u64,
    next_lsn: u64,
    closing: bool,
    failed: bool,
}

impl Wal {
    /// Starts the writer thread, continuing the log where recovery left it.
    pub fn start(start: WalStart) -> Result<Wal, WalError> {
        let storage = start.storage.clone();
        storage
            .create_dir_all(&start.dir)
            .map_err(|e| WalError::io(&start.dir, e))?;
        sync_dir(&*storage, &start.dir)?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                buf: Vec::with_capacity(1 << 20),
                first_lsn: start.last_lsn + 1,
                next_lsn: start.last_lsn + 1,
                closing: false,
                failed: false,
            }),
            wake: Condvar::new(),
            durable_lsn: AtomicU64::new(start.last_lsn),
            failed: AtomicBool::new(false),
            waiters: Mutex::new(Vec::new()),
            stats: WalStats::default(),
            tail: Mutex::new(tail::Tail::default()),
            durable_watch: watch::Sender::new(start.last_lsn),
            start_lsn: start.last_lsn + 1,
        });
        let segment = match &start.last_segment {
            Some((path, len)) => {
                let mut file = storage.open(path).map_err(|e| WalError::io(path, e))?;
                // Recovery read these records, possibly from the page cache of a process that
                // died before its fdatasync: make them durable before anything shows them
                // (the event stream serves every record up to the recovered LSN).
                file.sync().map_err(|e| WalError::io(path, e))?;
                let allocated = file.size().map_err(|e| WalError::io(path, e))?;
                Some(Segment {
                    file,
                    path: path.clone(),
                    len: *len,
                    allocated: allocated.max(*len),
                })
            }
            None => None,
        };
        // 0 would start a new segment under the name of an empty one left by recovery.
        assert!(
            start.segment_bytes_max >= 1,
            "EngineConfig::check refuses segments of 0 bytes"
        );
        let mut writer = Writer {
            shared: shared.clone(),
            storage,
            dir: start.dir.clone(),
            segment,
            segment_bytes_max: start.segment_bytes_max,
            batch: Vec::with_capacity(1 << 20),
        };
        if start.mode == WriterMode::Manual {
            return Ok(Wal {
                shared,
                writer: Mutex::new(None),
                manual: Mutex::new(Some(writer)),
            });
        }
        let handle = std::thread::Builder::new()
            .name("coffer-wal".to_string())
            .spawn(move || writer.run())
            .map_err(|e| WalError::io(&start.dir, e))?;
        Ok(Wal {
            shared,
            writer: Mutex::new(Some(handle)),
            manual: Mutex::new(None),
        })
    }

    /// In [`WriterMode::Manual`]: writes and syncs everything queued now, as one group
    /// commit, and runs the callbacks it covers. Returns whether there was anything to
    /// write. In thread mode it does nothing (the thread commits).
    pub fn commit(&self) -> Result<bool, WalError> {
        let mut manual = self.manual.lock();
        let Some(writer) = manual.as_mut() else {
            return Ok(false);
        };
        match writer.step(false) {
            Step::Idle => Ok(false),
            Step::Wrote => Ok(true),
            Step::Closed => Err(WalError::Closed),
            Step::Failed => {
                *manual = None;
                Err(WalError::Failed)
            }
        }
    }

    /// The last LSN handed out (durable or not).
    pub fn last_assigned_lsn(&self) -> u64 {
        self.shared.queue.lock().next_lsn - 1
    }

    /// Records queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.shared.queue.lock().buf.len()
    }

    /// Queues one record and returns its LSN. Does not wait for the disk; pair it with
    /// [`Wal::wait_durable`] before acknowledging anything that depends on it.
    pub fn append(&self, payload: &[u8]) -> Result<u64, WalError> {
        let mut queue = self.shared.queue.lock();
        if queue.failed {
            return Err(WalError::Failed);
        }
        if queue.closing {
            return Err(WalError::Closed);
        }
        let lsn = queue.next_lsn;
        queue.next_lsn += 1;
        if queue.buf.is_empty() {
            queue.first_lsn = lsn;
        }
        codec::encode_frame(lsn, payload, &mut queue.buf);
        drop(queue);
        self.shared.stats.records.fetch_add(1, Ordering::Relaxed);
        self.shared.wake.notify_one();
        Ok(lsn)
    }

    /// A receiver of the durable LSN: `changed()` wakes when it moves.
    pub fn subscribe_durable(&self) -> watch::Receiver<u64> {
        self.shared.durable_watch.subscribe()
    }

    /// The recent durable batches holding `lsn` and everything after it, if memory still
    /// reaches back to `lsn` (else read the segments).
    pub fn recent_from(&self, lsn: u64) -> Option<Vec<Arc<tail::Batch>>> {
        self.shared.tail.lock().from(lsn)
    }

    /// The first LSN this process wrote or will write: every record from it on is of the
    /// current format version.
    pub fn start_lsn(&self) -> u64 {
        self.shared.start_lsn
    }

    /// The highest LSN known to be on stable storage.
    pub fn durable_lsn(&self) -> u64 {
        self.shared.durable_lsn.load(Ordering::Acquire)
    }

    /// Whether a write or sync has failed (writes are stopped for good).
    pub fn is_failed(&self) -> bool {
        self.shared.failed.load(Ordering::Acquire)
    }

    /// Statistics for `/metrics`.
    pub fn stats(&self) -> &WalStats {
        &self.shared.stats
    }

    /// Runs `then` once `lsn` is durable: at once if it already is, otherwise on the writer
    /// thread right after the fsync that covers it. If the log fails first, `then` gets the
    /// error. Handing the reply itself to the writer saves a wake-up per request.
    pub fn when_durable(&self, lsn: u64, then: OnDurable) {
        if self.durable_lsn() >= lsn {
            return then(Ok(()));
        }
        let mut waiters = self.shared.waiters.lock();
        // Re-checked under the lock: the writer advances the watermark before it takes
        // this lock, so a waiter added here is either covered now or called later.
        if self.durable_lsn() >= lsn {
            drop(waiters);
            return then(Ok(()));
        }
        if self.is_failed() {
            drop(waiters);
            return then(Err(WalError::Failed));
        }
        waiters.push((lsn, then));
    }

    /// Waits until `lsn` is durable. Fails if the log failed before getting there.
    pub async fn wait_durable(&self, lsn: u64) -> Result<(), WalError> {
        if self.durable_lsn() >= lsn {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        self.when_durable(
            lsn,
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        );
        rx.await.unwrap_or(Err(WalError::Closed))
    }

    /// Flushes what is queued, stops the writer thread and waits for it.
    pub fn close(&self) {
        self.shared.queue.lock().closing = true;
        self.shared.wake.notify_one();
        if let Some(handle) = self.writer.lock().take() {
            let _ = handle.join();
        }
        if let Some(mut writer) = self.manual.lock().take() {
            while let Step::Wrote = writer.step(false) {}
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.close();
    }
}

struct Segment {
    file: Box<dyn StorageFile>,
    path: PathBuf,
    /// End of the valid records: the next batch is written here.
    len: u64,
    /// Size of the file; bytes between `len` and `allocated` are zeros.
    allocated: u64,
}

struct Writer {
    shared: Arc<Shared>,
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    segment: Option<Segment>,
    segment_bytes_max: u64,
    /// The batch being written (swapped with the queue's buffer).
    batch: Vec<u8>,
}

/// What one turn of the writer did.
enum Step {
    /// Nothing was queued.
    Idle,
    /// One batch was written and synced.
    Wrote,
    /// The log is closing and everything queued is written.
    Closed,
    /// A write or sync failed; the log is failed.
    Failed,
}

impl Writer {
    fn run(&mut self) {
        while let Step::Wrote = self.step(true) {}
    }

    /// Takes what is queued (waiting for something if `block`), writes it with one write
    /// and one sync, advances the durable LSN and runs the callbacks it covers.
    fn step(&mut self, block: bool) -> Step {
        let (first_lsn, last_lsn) = {
            let mut queue = self.shared.queue.lock();
            while block && queue.buf.is_empty() && !queue.closing {
                self.shared.wake.wait(&mut queue);
            }
            if queue.buf.is_empty() {
                return if queue.closing {
                    Step::Closed
                } else {
                    Step::Idle
                };
            }
            std::mem::swap(&mut queue.buf, &mut self.batch);
            let range = (queue.first_lsn, queue.next_lsn - 1);
            queue.first_lsn = queue.next_lsn;
            range
        };
        let batch = std::mem::take(&mut self.batch);
        self.shared
            .stats
            .batch_records
            .observe((last_lsn + 1 - first_lsn) as f64);
        if let Err(error) = self.write_batch(&batch, first_lsn) {
            self.fail(error);
            return Step::Failed;
        }
        // Durable now: the batch joins the in-memory tail before the watermark moves, so a
        // reader that sees the new watermark finds the records in memory or on disk.
        self.shared.tail.lock().push(tail::Batch {
            first_lsn,
            last_lsn,
            bytes: batch.clone(),
        });
        self.shared.durable_lsn.store(last_lsn, Ordering::Release);
        self.shared.durable_watch.send_replace(last_lsn);
        self.wake_waiters(last_lsn);
        self.batch = batch;
        self.batch.clear();
        if self.batch.capacity() > WAL_BATCH_BYTES_MAX {
            self.batch = Vec::with_capacity(1 << 20);
        }
        Step::Wrote
    }

    fn write_batch(&mut self, batch: &[u8], first_lsn: u64) -> Result<(), WalError> {
        let rotate = match &self.segment {
            None => true,
            Some(segment) => segment.len >= self.segment_bytes_max,
        };
        if rotate {
            self.open_segment(first_lsn)?;
        }
        let segment = self.segment.as_mut().ok_or(WalError::Failed)?;
        let batch_len = batch.len() as u64;
        if segment.len + batch_len > segment.allocated {
            // Zero-fill ahead in one go; the fdatasync below makes the new size durable
            // together with the batch, and the following batches overwrite in place.
            // At most one segment's worth ahead, so small segments stay small.
            let ahead = SEGMENT_ZERO_CHUNK_BYTES.min(self.segment_bytes_max);
            let target = (segment.len + batch_len).max(segment.allocated) + ahead;
            write_zeros(&mut *segment.file, segment.allocated, target)
                .map_err(|e| WalError::io(&segment.path, e))?;
            segment.allocated = target;
        }
        segment
            .file
            .write_at(segment.len, batch)
            .map_err(|e| WalError::io(&segment.path, e))?;
        let started = std::time::Instant::now();
        segment
            .file
            .sync()
            .map_err(|e| WalError::io(&segment.path, e))?;
        let stats = &self.shared.stats;
        stats.fsync_seconds.observe(started.elapsed().as_secs_f64());
        stats.bytes.fetch_add(batch_len, Ordering::Relaxed);
        segment.len += batch_len;
        Ok(())
    }

    /// Starts a new segment named by its first LSN; the directory entry is made durable
    /// before any record in it is acknowledged.
    fn open_segment(&mut self, first_lsn: u64) -> Result<(), WalError> {
        let path = self.dir.join(reader::segment_name(first_lsn));
        let file = self
            .storage
            .create(&path)
            .map_err(|e| WalError::io(&path, e))?;
        sync_dir(&*self.storage, &self.dir)?;
        self.segment = Some(Segment {
            file,
            path,
            len: 0,
            allocated: 0,
        });
        Ok(())
    }

    fn wake_waiters(&self, durable: u64) {
        let ready: Vec<_> = {
            let mut waiters = self.shared.waiters.lock();
            let mut ready = Vec::new();
            let mut i = 0;
            while i < waiters.len() {
                if waiters[i].0 <= durable {
                    ready.push(waiters.swap_remove(i));
                } else {
                    i += 1;
                }
            }
            ready
        };
        for (_, then) in ready {
            then(Ok(()));
        }
    }

    fn fail(&self, error: WalError) {
        tracing::error!(%error, "WAL write or sync failed; refusing all further writes");
        self.shared.queue.lock().failed = true;
        self.shared.failed.store(true, Ordering::Release);
        let waiters = std::mem::take(&mut *self.shared.waiters.lock());
        for (_, then) in waiters {
            then(Err(WalError::Failed));
        }
    }
}

/// Writes zeros to `file` from `from` up to `to` (exclusive).
fn write_zeros(file: &mut dyn StorageFile, from: u64, to: u64) -> io::Result<()> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut at = from;
    while at < to {
        // Exact: the step is at most the buffer's 64 KiB.
        let step = (to - at).min(ZEROS.len() as u64) as usize;
        file.write_at(at, &ZEROS[..step])?;
        at += step as u64;
    }
    Ok(())
}

/// Makes a directory's entries (new, renamed or removed files) durable.
pub fn sync_dir(storage: &dyn Storage, dir: &Path) -> Result<(), WalError> {
    storage.sync_dir(dir).map_err(|e| WalError::io(dir, e))
}
