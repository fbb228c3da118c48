//! Rebuilding the accounts at start: the newest valid snapshot (falling back to an older one
//! if it is damaged), then the WAL after it, with the same `apply` as the live path.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::domain::{
    Account, AccountId, AccountView, Currencies, Event, EventBody, Retention, TransferBook,
};
use crate::snapshot;
use crate::storage::Storage;
use crate::wal::reader::SegmentFile;
use crate::wal::{self, ReplayOutcome, WalError};
use uuid::Uuid;

use super::registry::{owner, Slot};
use super::{OpenError, Table};

/// What [`recover_state`] rebuilt.
pub(crate) struct Recovered {
    /// One table per replay thread (a shard of the accounts by [`owner`]), handed on as
    /// they are rather than merged: the engine's registry is sharded the same way.
    pub(crate) accounts: Vec<Table>,
    pub(crate) outcome: ReplayOutcome,
    /// Every id made so far has a timestamp at or below this.
    pub(crate) newest_ms: u64,
    /// The snapshot recovery started from.
    pub(crate) snapshot_lsn: Option<u64>,
    /// Snapshots skipped as damaged, newest first.
    pub(crate) damaged_snapshots: Vec<String>,
    /// The currencies of the accounts, shared.
    pub(crate) currencies: Currencies,
    /// Every transfer remembered, pending ones included (recovery finishes those).
    pub(crate) transfers: TransferBook,
    /// The deadline, account and id of every open hold.
    pub(crate) deadlines: Vec<(u64, AccountId, Uuid)>,
}

/// Loads the newest valid snapshot of `data_dir` and replays the WAL after it, on `threads`
/// threads (0: one per core, up to [`REPLAY_THREADS_MAX`]). With `repair`, a torn tail is cut
/// on disk.
pub(crate) fn recover_state(
    storage: &dyn Storage,
    data_dir: &Path,
    retention: Retention,
    repair: bool,
    threads: usize,
) -> Result<Recovered, OpenError> {
    let segments = wal::reader::list_segments(storage, &data_dir.join("wal"))?;
    let start = Start::SnapshotThen(&segments);
    recover_from(storage, data_dir, start, retention, repair, threads)
}

/// Where a recovery starts.
#[derive(Clone, Copy)]
pub(crate) enum Start<'a> {
    /// The newest valid snapshot of the data directory, then these segments after it: what
    /// the server does.
    SnapshotThen(&'a [SegmentFile]),
    /// No snapshot: every record of these segments, which must start at lsn 1 (a complete
    /// journal, the archive's segments followed by the log's).
    Journal(&'a [SegmentFile]),
}

/// [`recover_state`] from `start`.
pub(crate) fn recover_from(
    storage: &dyn Storage,
    data_dir: &Path,
    start: Start<'_>,
    retention: Retention,
    repair: bool,
    threads: usize,
) -> Result<Recovered, OpenError> {
    let threads = replay_threads(threads);
    let snapshot_dir = data_dir.join("snapshots");
    let mut damaged_snapshots = Vec::new();
    let mut base = None;
    let (snapshots, segments) = match start {
        Start::SnapshotThen(segments) => (snapshot::list(storage, &snapshot_dir)?, segments),
        Start::Journal(segments) => (Vec::new(), segments),
    };
    for file in snapshots {
        match snapshot::read(storage, &file.path, threads) {
            Ok(found) => {
                base = Some(found);
                break;
            }
            Err(error) => {
                tracing::warn!(%error, "skipping a damaged snapshot, trying the one before it");
                damaged_snapshots.push(error.to_string());
            }
        }
    }
    let mut shards: Vec<Shard> = (0..threads)
        .map(|_| Shard {
            accounts: Table::with_capacity(0),
            currencies: Currencies::default(),
            transfers: Vec::new(),
            retention,
            newest_ms: 0,
        })
        .collect();
    let mut currencies = Currencies::default();
    let mut transfers = TransferBook::default();
    let (after_lsn, newest_ms, snapshot_lsn) = match base {
        Some(found) => {
            tracing::info!(
                lsn = found.lsn,
                accounts = found.accounts.len(),
                "loaded a snapshot"
            );
            // Each replay thread's accounts go into its table on that thread.
            let mut owned: Vec<Vec<Account>> = (0..threads)
                .map(|_| Vec::with_capacity(found.accounts.len() / threads + 1))
                .collect();
            for account in found.accounts {
                owned[owner(threads, account.id().as_str().as_bytes())].push(account);
            }
            let restored = crate::parallel::run_all(
                shards
                    .iter_mut()
                    .zip(owned)
                    .map(|(shard, accounts)| move || shard.restore(accounts))
                    .collect(),
            );
            if let Some(Err(id)) = restored.into_iter().find(Result::is_err) {
                return Err(OpenError::Snapshot(snapshot::SnapshotError::Corrupt {
                    path: snapshot_dir.join(snapshot::file_name(found.lsn)),
                    reason: format!("account {id} twice"),
                }));
            }
            for shard in &shards {
                for currency in shard.currencies.iter() {
                    currencies.share(currency.clone());
                }
            }
            transfers = TransferBook::from_records(found.transfers).map_err(|e| {
                OpenError::Snapshot(snapshot::SnapshotError::Corrupt {
                    path: snapshot_dir.join(snapshot::file_name(found.lsn)),
                    reason: e.to_string(),
                })
            })?;
            (found.lsn, found.ids_after_ms, Some(found.lsn))
        }
        None => (0, 0, None),
    };
    for shard in &mut shards {
        shard.currencies = currencies.clone();
    }
    let wal_dir = data_dir.join("wal");
    let log = Log {
        dir: &wal_dir,
        segments,
    };
    let replayed = if threads == 1 {
        let only = shards.remove(0);
        replay_inline(storage, log, after_lsn, repair, only, &mut transfers)?
    } else {
        replay_sharded(
            storage,
            log,
            after_lsn,
            repair,
            shards,
            currencies,
            &mut transfers,
        )?
    };
    let (accounts, currencies, outcome) =
        (replayed.accounts, replayed.currencies, replayed.outcome);
    let newest_ms = newest_ms.max(replayed.newest_ms);
    // Invariant 3 over the whole engine: transfers only move money between accounts.
    let Tally {
        balances,
        external,
        deadlines,
    } = replayed.tally;
    let in_flight = i128::try_from(transfers.in_flight().1).unwrap_or(i128::MAX);
    // Modulo 2^64, as the accounts keep their totals.
    if balances.wrapping_add(in_flight) as i64 != external {
        return Err(OpenError::NotConserved {
            balances,
            in_flight,
            external,
        });
    }
    Ok(Recovered {
        accounts,
        outcome,
        newest_ms,
        snapshot_lsn,
        damaged_snapshots,
        currencies,
        transfers,
        deadlines,
    })
}

/// What a shard's accounts add up to, gathered by its own thread once it has replayed.
#[derive(Default)]
struct Tally {
    /// The sum of balances.
    balances: i128,
    /// The sum of credits - debits - captures, modulo 2^64 as the accounts keep it.
    external: i64,
    /// Every open hold's deadline, account and id.
    deadlines: Vec<(u64, AccountId, Uuid)>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.balances += other.balances;
        self.external = self.external.wrapping_add(other.external);
        self.deadlines.extend(other.deadlines);
    }
}

/// The threads to replay on for a configured count (0: one per core, up to
/// [`REPLAY_THREADS_MAX`]).
fn replay_threads(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get().min(REPLAY_THREADS_MAX)),
        n => n.clamp(1, REPLAY_THREADS_MAX),
    }
}

/// At most this many threads apply a replay (`EngineConfig::replay_threads`, 0 = one per
/// core up to this).
pub const REPLAY_THREADS_MAX: usize = 4;

/// Records whose accounts a replay thread looks up ahead of applying them.
const WARM_AHEAD: usize = 64;

/// Events handed to a replay thread at a time.
const REPLAY_BATCH: usize = 2048;

/// What a replay rebuilt from the log.
struct Replayed {
    accounts: Vec<Table>,
    tally: Tally,
    currencies: Currencies,
    outcome: ReplayOutcome,
    newest_ms: u64,
}

/// Logs the replay's progress about once a second.
struct Progress {
    started: Instant,
    last_report: Instant,
    records: u64,
}

impl Progress {
    fn new() -> Progress {
        let now = Instant::now();
        Progress {
            started: now,
            last_report: now,
            records: 0,
        }
    }

    fn count(&mut self, lsn: u64) {
        self.records += 1;
        if self.records.is_multiple_of(65_536)
            && self.last_report.elapsed() >= Duration::from_secs(1)
        {
            self.last_report = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(1e-9);
            tracing::info!(
                records = self.records,
                lsn,
                rate = (self.records as f64 / secs) as u64,
                "replaying the WAL"
            );
        }
    }
}

/// The segments a replay reads, and the log directory named in errors about them as a whole.
#[derive(Clone, Copy)]
struct Log<'a> {
    dir: &'a Path,
    segments: &'a [SegmentFile],
}

impl Log<'_> {
    fn replay_after(
        self,
        storage: &dyn Storage,
        after_lsn: u64,
        repair: bool,
        on_frame: impl FnMut(&wal::codec::Frame<'_>) -> Result<(), String>,
    ) -> Result<ReplayOutcome, WalError> {
        let (dir, segments) = (self.dir, self.segments);
        wal::reader::replay_segments_after(storage, dir, segments, after_lsn, repair, on_frame)
    }
}

/// One thread: reads, decodes and applies every event in log order. For small logs, and
/// where one core is all there is.
fn replay_inline(
    storage: &dyn Storage,
    log: Log<'_>,
    after_lsn: u64,
    repair: bool,
    mut shard: Shard,
    book: &mut TransferBook,
) -> Result<Replayed, OpenError> {
    let mut progress = Progress::new();
    let outcome = log.replay_after(storage, after_lsn, repair, |frame| {
        progress.count(frame.lsn);
        shard.replay_frame(frame)?;
        for (event, view) in shard.transfers.drain(..) {
            book.record(&event, view).map_err(|e| e.to_string())?;
        }
        Ok(())
    })?;
    Ok(Replayed {
        tally: shard.tally(),
        accounts: vec![shard.accounts],
        currencies: shard.currencies,
        outcome,
        newest_ms: shard.newest_ms,
    })
}

/// Several threads: this one reads the log and checks every frame (CRC, header, LSN order),
/// and hands each record, still encoded, to the thread that owns its account (by a hash of
/// the id, read from the payload without decoding it); each thread decodes and applies its
/// accounts' records in log order, exactly as one thread would (an account's events depend
/// only on that account). The transfer book, which spans accounts, is written afterwards
/// from the transfer events in LSN order. Applying is bound by memory latency (a cold
/// account per event); two threads keep twice the misses in flight.
///
/// An error found by an applying thread names the record by LSN; it is reported, as from
/// one thread, for the first bad record of the log, with its file and offset. A torn tail is
/// cut only once everything before it applied.
fn replay_sharded(
    storage: &dyn Storage,
    log: Log<'_>,
    after_lsn: u64,
    repair: bool,
    shards: Vec<Shard>,
    mut currencies: Currencies,
    book: &mut TransferBook,
) -> Result<Replayed, OpenError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;

    let threads = shards.len();
    let owner = |id: &[u8]| owner(threads, id);
    let failed = AtomicBool::new(false);
    let mut progress = Progress::new();
    // Emptied batches go back to the reading thread to be filled again: a fixed set of
    // buffers instead of one allocation per batch, each freed by another thread (which the
    // allocator is slow to give back: it cost about 50 bytes of RSS per account).
    let (recycle, recycled) = mpsc::channel::<Frames>();
    let (read, finished) = std::thread::scope(|scope| {
        let mut senders = Vec::with_capacity(threads);
        let mut workers = Vec::with_capacity(threads);
        for mut shard in shards {
            let (tx, rx) = mpsc::sync_channel::<Frames>(4);
            let failed = &failed;
            let recycle = recycle.clone();
            senders.push(tx);
            workers.push(scope.spawn(move || {
                let mut error: Option<(u64, String)> = None;
                for mut batch in rx {
                    if error.is_none() {
                        if let Err(found) = shard.replay_frames(&batch) {
                            error = Some(found);
                            failed.store(true, Ordering::Relaxed);
                        }
                    }
                    batch.clear();
                    let _ = recycle.send(batch);
                }
                let tally = if error.is_none() {
                    shard.tally()
                } else {
                    Tally::default()
                };
                (shard, tally, error)
            }));
        }
        drop(recycle);
        let mut batches: Vec<Frames> = (0..threads).map(|_| Frames::default()).collect();
        let read = log.replay_after(storage, after_lsn, false, |frame| {
            if failed.load(Ordering::Relaxed) {
                return Err("stopped: a replay thread refused a record".to_string());
            }
            progress.count(frame.lsn);
            // A payload too short for an id goes anywhere, and its thread reports it.
            let i = owner(wal::codec::payload_account_id(frame.payload));
            batches[i].push(frame);
            if batches[i].frames.len() == REPLAY_BATCH {
                let full =
                    std::mem::replace(&mut batches[i], recycled.try_recv().unwrap_or_default());
                senders[i]
                    .send(full)
                    .map_err(|_| "a replay thread stopped".to_string())?;
            }
            Ok(())
        });
        for (sender, batch) in senders.iter().zip(batches) {
            if !batch.frames.is_empty() {
                let _ = sender.send(batch);
            }
        }
        drop(senders);
        let finished: Vec<Finished> = crate::parallel::join_all(workers);
        (read, finished)
    });
    let corrupt_at = |lsn: u64, reason: String| {
        let (path, offset) = wal::reader::locate_in(storage, log.segments, lsn)
            .unwrap_or((log.dir.to_path_buf(), 0));
        OpenError::Wal(WalError::Corrupt {
            path,
            offset,
            reason,
        })
    };
    // The first bad record of the log: every record before the point where reading stopped
    // was handed to its thread, and each thread stops at its first bad one.
    if let Some((lsn, reason)) = finished
        .iter()
        .filter_map(|(_, _, error)| error.clone())
        .min_by_key(|(lsn, _)| *lsn)
    {
        return Err(corrupt_at(lsn, reason));
    }
    let outcome = read?;
    let mut transfer_events = Vec::new();
    let mut accounts = Vec::with_capacity(threads);
    let mut newest_ms = 0;
    let mut tally = Tally::default();
    for (shard, shard_tally, _) in finished {
        tally.add(shard_tally);
        for currency in shard.currencies.iter() {
            currencies.share(currency.clone());
        }
        newest_ms = newest_ms.max(shard.newest_ms);
        accounts.push(shard.accounts);
        transfer_events.extend(shard.transfers);
    }
    transfer_events.sort_by_key(|(event, _)| event.lsn);
    for (event, view) in transfer_events {
        book.record(&event, view)
            .map_err(|e| corrupt_at(event.lsn, e.to_string()))?;
    }
    if let (true, Some(cut)) = (repair, &outcome.tail_cut) {
        wal::cut_tail(storage, cut)?;
    }
    Ok(Replayed {
        accounts,
        tally,
        currencies,
        outcome,
        newest_ms,
    })
}

/// A replay thread's shard when it is done, its tally, and the first record it refused
/// (LSN and why).
type Finished = (Shard, Tally, Option<(u64, String)>);

/// Records for one replay thread, still encoded: their payloads back to back.
#[derive(Default)]
struct Frames {
    bytes: Vec<u8>,
    /// Version, LSN and end offset in `bytes` of each record.
    frames: Vec<(u16, u64, usize)>,
}

impl Frames {
    /// Empties it, keeping its buffers.
    fn clear(&mut self) {
        self.bytes.clear();
        self.frames.clear();
    }

    fn push(&mut self, frame: &wal::codec::Frame<'_>) {
        if self.frames.is_empty() {
            self.bytes.reserve(REPLAY_BATCH * 96);
            self.frames.reserve(REPLAY_BATCH);
        }
        self.bytes.extend_from_slice(frame.payload);
        self.frames
            .push((frame.version, frame.lsn, self.bytes.len()));
    }
}

/// The accounts one replay thread owns, and the transfer events it applied.
struct Shard {
    accounts: Table,
    currencies: Currencies,
    /// Transfer events with the account just after them (`None`: the account already had
    /// the event), for the transfer book.
    transfers: Vec<(Event, Option<AccountView>)>,
    retention: Retention,
    /// Newest event time seen (decoded here, on the parallel path).
    newest_ms: u64,
}

impl Shard {
    /// Puts accounts from a snapshot in this shard's table; gives back the id of one
    /// already there.
    fn restore(&mut self, accounts: Vec<Account>) -> Result<(), AccountId> {
        self.accounts.reserve(accounts.len());
        for mut account in accounts {
            account.keep_history(self.retention.history);
            self.currencies.share(account.currency().clone());
            if let Err(account) = self.accounts.insert(account) {
                return Err(account.id().clone());
            }
        }
        Ok(())
    }

    /// Adds up this shard's accounts (on its own thread, side by side with the others).
    fn tally(&self) -> Tally {
        let mut tally = Tally::default();
        for slot in self.accounts.iter() {
            let account = slot.state.lock();
            tally.balances += i128::from(account.balance());
            tally.external = tally.external.wrapping_add(account.external_net());
            for (deadline, hold) in account.open_deadlines() {
                tally.deadlines.push((deadline, slot.id.clone(), hold));
            }
        }
        tally
    }

    /// Decodes and applies a batch of records in order; the first bad one stops it, with its
    /// LSN and what is wrong.
    fn replay_frames(&mut self, batch: &Frames) -> Result<(), (u64, String)> {
        let mut start = 0;
        for chunk in batch.frames.chunks(WARM_AHEAD) {
            // Look the chunk's accounts up first, in a loop of independent lookups that
            // the processor overlaps: each is a cache miss or two (the table, the slot),
            // which applying one record after another would wait for one at a time.
            let mut warm = start;
            let mut found = 0usize;
            for &(_, _, end) in chunk {
                let id = wal::codec::payload_account_id(&batch.bytes[warm..end]);
                warm = end;
                if let Some(slot) = self.accounts.get_bytes(id) {
                    found += usize::from(slot.state.is_locked());
                }
            }
            std::hint::black_box(found);
            for &(version, lsn, end) in chunk {
                let frame = wal::codec::Frame {
                    version,
                    lsn,
                    payload: &batch.bytes[start..end],
                };
                start = end;
                self.replay_frame(&frame).map_err(|reason| (lsn, reason))?;
            }
        }
        Ok(())
    }

    /// Decodes and applies one record, with the same checks and changes as the live path.
    /// Events at or below an account's `last_lsn` are skipped: a fuzzy snapshot holds some
    /// events after its own LSN. The account is looked up once, by the id at the start of
    /// the payload, and the decoded event borrows that account's id (no copy of it per
    /// record).
    fn replay_frame(&mut self, frame: &wal::codec::Frame<'_>) -> Result<(), String> {
        // The id as bytes: a slot's id is valid text, so finding one validates them (and
        // decoding validates them again).
        let id = wal::codec::payload_account_id(frame.payload);
        let Some(slot) = self.accounts.find_mut_bytes(id) else {
            let event = wal::codec::decode_frame_event(frame).map_err(|e| e.to_string())?;
            self.newest_ms = self.newest_ms.max(event.at_ms);
            return self.open(event);
        };
        let Some(account) = Slot::account_mut(slot) else {
            return Err(format!("account {} is shared during replay", slot.id));
        };
        // Its history's lines are cold: asked for now, they arrive while the record is
        // decoded, instead of stalling the append at the end.
        std::hint::black_box(account.touch_history());
        // The decoder uses the offered id only if it equals the record's (it compares).
        let event = wal::codec::decode_frame_event_with(frame, |_| Some(account.id().clone()))
            .map_err(|e| e.to_string())?;
        self.newest_ms = self.newest_ms.max(event.at_ms);
        let is_transfer = event.body.is_transfer();
        if event.lsn <= account.last_lsn() {
            // Already in the snapshot this replay started from (it is fuzzy); its book has
            // the event too.
            if is_transfer {
                self.transfers.push((event, None));
            }
            return Ok(());
        }
        if let EventBody::Opened { .. } = event.body {
            return Err(format!("account {} opened twice", event.account));
        }
        account
            .replay(&event, self.retention)
            .map_err(|e| e.to_string())?;
        if is_transfer {
            let view = account.view();
            self.transfers.push((event, Some(view)));
        }
        Ok(())
    }

    /// An event for an account this shard does not have: it must open it.
    fn open(&mut self, mut event: Event) -> Result<(), String> {
        if let EventBody::Opened { currency, .. } = &mut event.body {
            *currency = self.currencies.share(currency.clone());
            let account = Account::open(&event).map_err(|e| e.to_string())?;
            if self.accounts.insert(account).is_err() {
                return Err(format!("account {} opened twice", event.account));
            }
            return Ok(());
        }
        Err(format!("event for unknown account {}", event.account))
    }
}
