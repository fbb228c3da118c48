//! The engine: the registry of accounts, their actors, the WAL, recovery and hold expiry.
//!
//! Every account lives in a [`Slot`]: its state behind a short, synchronous lock. Commands
//! that change an account go through the one actor that owns it (see `actor.rs`), one at a
//! time, which is what makes a double spend impossible; the actor decides, writes the event
//! to the WAL, applies it, and the WAL writer sends the reply once the event is durable.
//! Reads take the state lock directly and wait until everything they show is durable.

mod actor;
mod events;
mod expiry;
mod ids;
mod recovery;
mod registry;
mod snapshots;
mod transfers;

pub use events::{EventFilter, EventPage, EVENTS_SCAN_RECORDS_MAX};
pub(crate) use recovery::{recover_from, recover_state, Start};
pub(crate) use registry::{Registry, Slot, Table};
pub use snapshots::{SnapshotFailed, SnapshotReport};
pub use transfers::{Conservation, TransferOutcome};

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::clock::Clock;
use crate::domain::{
    Account, AccountId, AccountView, Currencies, Currency, Event, EventBody, Hold, HoldStatus,
    IdempotencyEntry, IdempotencyKey, Metadata, OpError, Receipt, Request, Retention, Transaction,
    TransferBook,
};
use crate::storage::{FileStorage, Storage};
use crate::wal::{self, codec, Wal, WalError, WalStart, WriterMode};

pub use actor::{
    ACTORS_MAX, ACTOR_MAILBOX_CAPACITY, ACTOR_MAILBOX_CAPACITY_MAX, MAILBOX_SEND_WAIT,
};

/// Default: a snapshot after a million new WAL records...
pub const SNAPSHOT_EVERY_RECORDS_DEFAULT: u64 = 1_000_000;
/// ... or after ten minutes with any.
pub const SNAPSHOT_INTERVAL_DEFAULT: Duration = Duration::from_secs(600);

/// Default retention: the last 1000 transactions of each account in memory, idempotency
/// keys and ended holds for 24 hours (docs/API.md's minimum).
pub const RETENTION_DEFAULT: Retention = Retention {
    history: 1000,
    ttl_ms: 24 * 60 * 60 * 1000,
};

/// How the engine is set up.
#[derive(Clone)]
pub struct EngineConfig {
    /// The data directory (the WAL lives in `DIR/wal`).
    pub data_dir: PathBuf,
    /// Size at which the WAL starts a new segment.
    pub segment_bytes_max: u64,
    /// Capacity of each actor's mailbox.
    pub mailbox_capacity: usize,
    /// Number of account actors (each owns the accounts whose id hashes to it).
    pub actors: usize,
    /// The clock.
    pub clock: Arc<dyn Clock>,
    /// The storage the data directory lives on.
    pub storage: Arc<dyn Storage>,
    /// Who runs the WAL's group commits: its thread, or (for deterministic simulation) the
    /// caller of [`Engine::commit_wal`].
    pub wal_writer: WriterMode,
    /// How often the background sweep expires due holds; `None` for no sweep (tests and
    /// the simulation call [`Engine::expire_due`] themselves).
    pub expiry_sweep: Option<Duration>,
    /// What each account remembers besides its state: history length and the TTL of
    /// idempotency keys and ended holds.
    pub retention: Retention,
    /// Take a snapshot after this many new WAL records (`None`: not by count).
    pub snapshot_every_records: Option<u64>,
    /// Take a snapshot after this long with new records (`None`: not by time).
    pub snapshot_interval: Option<Duration>,
    /// Move WAL segments no snapshot needs here instead of deleting them.
    pub wal_archive: Option<PathBuf>,
    /// Keep WAL segments at least this long after the kept snapshots cover them, so the
    /// event stream can still serve their events (zero: remove them at once).
    pub event_retention: Duration,
    /// Threads that apply the WAL at start (0: one per core, up to 4; 1: the reading thread
    /// alone).
    pub replay_threads: usize,
    /// Seed of the id generator's counter; `None` seeds it from the wall clock. The
    /// simulation fixes it so a run reproduces exactly.
    pub id_seed: Option<u64>,
    /// Debug builds only, for tests of fail-stop: a credit of exactly this amount fails an
    /// invariant assertion on the live path (before it is written to the log), as a bug
    /// would. `coffer serve` sets it from `COFFER_TEST_PANIC_ON_CREDIT_AMOUNT`. Release
    /// builds do not have it.
    #[cfg(debug_assertions)]
    pub test_panic_on_credit_amount: Option<u64>,
}

impl EngineConfig {
    /// Defaults for a data directory, on the system clock.
    pub fn new(data_dir: impl Into<PathBuf>) -> EngineConfig {
        EngineConfig {
            data_dir: data_dir.into(),
            segment_bytes_max: wal::SEGMENT_BYTES_DEFAULT,
            mailbox_capacity: ACTOR_MAILBOX_CAPACITY,
            actors: std::thread::available_parallelism().map_or(2, |n| n.get()),
            clock: Arc::new(crate::clock::SystemClock),
            storage: Arc::new(FileStorage),
            wal_writer: WriterMode::Thread,
            expiry_sweep: Some(expiry::SWEEP_INTERVAL),
            retention: RETENTION_DEFAULT,
            snapshot_every_records: Some(SNAPSHOT_EVERY_RECORDS_DEFAULT),
            snapshot_interval: Some(SNAPSHOT_INTERVAL_DEFAULT),
            wal_archive: None,
            event_retention: Duration::ZERO,
            replay_threads: 0,
            id_seed: None,
            #[cfg(debug_assertions)]
            test_panic_on_credit_amount: None,
        }
    }

    /// Refuses settings the engine cannot run with, rather than raising or lowering them.
    pub fn check(&self) -> Result<(), BadSetting> {
        let bad = |field: &'static str, reason: String| Err(BadSetting { field, reason });
        if self.segment_bytes_max == 0 {
            return bad("segment_bytes_max", "must be at least 1".to_string());
        }
        if !(1..=ACTORS_MAX).contains(&self.actors) {
            return bad(
                "actors",
                format!("{} is not in 1..={ACTORS_MAX}", self.actors),
            );
        }
        if !(1..=ACTOR_MAILBOX_CAPACITY_MAX).contains(&self.mailbox_capacity) {
            let reason = format!(
                "{} is not in 1..={ACTOR_MAILBOX_CAPACITY_MAX}",
                self.mailbox_capacity
            );
            return bad("mailbox_capacity", reason);
        }
        Ok(())
    }
}

/// Why an engine call did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No account with this id.
    #[error("account {0} not found")]
    AccountNotFound(AccountId),
    /// `PUT` of an existing account with other fields.
    #[error("account exists with currency {currency} and overdraft_limit {overdraft_limit}")]
    AccountExists {
        /// Its currency.
        currency: String,
        /// Its overdraft limit.
        overdraft_limit: u64,
    },
    /// The request was refused by the account's rules.
    #[error("{0:?}")]
    Op(OpError),
    /// The log cannot be written; writes are stopped.
    #[error("storage failure")]
    StorageFailure,
    /// The engine is shutting down.
    #[error("shutting down")]
    ShuttingDown,
    /// An actor's mailbox stayed full for `MAILBOX_SEND_WAIT`: nothing was queued.
    #[error("overloaded")]
    Overloaded,
    /// No transfer with this id is remembered.
    #[error("transfer {0} not found")]
    TransferNotFound(Uuid),
    /// An event-stream position older than the oldest event kept.
    #[error("cursor expired: the oldest position kept is after {floor}")]
    CursorExpired {
        /// The oldest position a read may start after.
        floor: u64,
    },
    /// An event-stream position past the durable end of the log (not one this log gave).
    #[error("cursor past the end of the log at {durable}")]
    CursorAhead {
        /// The durable end of the log.
        durable: u64,
    },
    /// Something that should not happen did (logged where it happened).
    #[error("internal error")]
    Internal,
}

impl From<WalError> for EngineError {
    fn from(error: WalError) -> EngineError {
        match error {
            WalError::Closed => EngineError::ShuttingDown,
            _ => EngineError::StorageFailure,
        }
    }
}

/// A configuration value out of its bounds (it is refused, never raised or lowered).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad setting {field}: {reason}")]
pub struct BadSetting {
    /// The setting (a field of the configuration).
    pub field: &'static str,
    /// Why it cannot be used.
    pub reason: String,
}

/// Errors that stop the engine from opening.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The log could not be read, or is corrupt.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// A snapshot could not be read (a damaged one is skipped; this is I/O or a duplicate).
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// A setting is out of its bounds.
    #[error(transparent)]
    Config(#[from] BadSetting),
    /// The recovered state does not conserve money (invariant 3 over all accounts).
    #[error("money is not conserved: balances {balances} + in flight {in_flight} != credits - debits - captures {external}")]
    NotConserved {
        /// Sum of the balances.
        balances: i128,
        /// Sum of the pending transfers.
        in_flight: i128,
        /// Sum of credits minus debits and captures, modulo 2^64.
        external: i64,
    },
}

/// What recovery found.
#[derive(Debug, Clone)]
pub struct RecoveryReport {
    /// Records replayed (after the snapshot).
    pub records: u64,
    /// LSN of the snapshot recovery started from, if any.
    pub snapshot_lsn: Option<u64>,
    /// Snapshots skipped because they were damaged.
    pub damaged_snapshots: usize,
    /// Accounts recovered.
    pub accounts: usize,
    /// Last LSN in the log.
    pub last_lsn: u64,
    /// A torn tail that was cut, if any.
    pub tail_cut: Option<wal::TailCut>,
    /// Holds that had expired while the server was down (expired before serving).
    pub holds_expired: usize,
    /// How long recovery took.
    pub duration: Duration,
}

/// A successful change, or a replay of one.
#[derive(Debug, Clone)]
pub struct Executed {
    /// The outcome.
    pub receipt: Arc<Receipt>,
    /// True when this answers an earlier request with the same key.
    pub replayed: bool,
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Copy)]
pub struct EngineStats {
    /// Accounts.
    pub accounts: u64,
    /// Actor tasks alive now (a fixed number, each owning a shard of the accounts).
    pub live_actors: u64,
    /// Commands waiting in actor mailboxes now.
    pub queued_commands: u64,
    /// Holds waiting for their deadline.
    pub open_holds: u64,
    /// WAL records appended since start.
    pub wal_records: u64,
    /// WAL bytes written since start.
    pub wal_bytes: u64,
    /// WAL write + fsync batches since start.
    pub wal_syncs: u64,
    /// Time spent in fsync since start (µs).
    pub wal_sync_micros: u64,
    /// Highest durable LSN.
    pub durable_lsn: u64,
    /// Whether writes are stopped by a storage failure.
    pub storage_failed: bool,
    /// Transfers whose source was debited and whose destination is not credited yet.
    pub transfers_in_flight: u64,
    /// The sum of their amounts (in minor units, over all currencies).
    pub transfers_in_flight_amount: u128,
    /// Transfers remembered.
    pub transfers: u64,
    /// How long the last start's recovery took, finishing transfers and expiring holds
    /// included (ms).
    pub recovery_millis: u64,
}

/// The engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    accounts: Registry,
    wal: Wal,
    clock: Arc<dyn Clock>,
    ids: ids::IdGen,
    expiry: expiry::ExpiryIndex,
    config: EngineConfig,
    live_actors: AtomicU64,
    /// The account actors, started on first use (they need the runtime).
    actors: std::sync::OnceLock<actor::Actors>,
    /// Held while a snapshot is taken: one at a time.
    snapshot_running: tokio::sync::Mutex<()>,
    /// Currencies shared by the accounts.
    currencies: Mutex<Currencies>,
    /// Every transfer remembered. Locked after an account's state lock, never before.
    transfers: Mutex<TransferBook>,
    /// How long recovery took (ms): replay at open, then `finish_recovery` adds its part.
    recovery_millis: AtomicU64,
    /// The event stream's state.
    events: events::EventsState,
    /// When each WAL segment was first found covered by the kept snapshots (by its first
    /// LSN): it is removed `event_retention` after that.
    covered_since: Mutex<std::collections::HashMap<u64, Instant>>,
}

impl Engine {
    /// Opens the data directory: replays the WAL (cutting a torn tail, refusing
    /// corruption), then starts the WAL writer. Holds that expired while the server was down
    /// are expired by [`Engine::finish_recovery`], which must run before serving.
    pub fn open(config: EngineConfig) -> Result<(Engine, RecoveryReport), OpenError> {
        config.check()?;
        let started = Instant::now();
        let wal_dir = config.data_dir.join("wal");
        let recovered = recover_state(
            &*config.storage,
            &config.data_dir,
            config.retention,
            true,
            config.replay_threads,
        )?;
        let (accounts, outcome, newest_ms, currencies, transfers) = (
            recovered.accounts,
            recovered.outcome,
            recovered.newest_ms,
            recovered.currencies,
            recovered.transfers,
        );
        if let Some(cut) = &outcome.tail_cut {
            tracing::warn!(
                path = %cut.path.display(), offset = cut.offset, bytes = cut.bytes,
                reason = %cut.reason, "cut a torn record at the tail of the WAL"
            );
        }
        if let Some(archive) = &config.wal_archive {
            // Made at start, not at the first segment archived, so the offline tools find
            // the configured archive as soon as a server ran with it.
            config
                .storage
                .create_dir_all(archive)
                .map_err(|e| WalError::io(archive, e))?;
        }
        let wal = Wal::start(WalStart {
            storage: config.storage.clone(),
            mode: config.wal_writer,
            dir: wal_dir,
            last_lsn: outcome.last_lsn,
            last_segment: outcome.last_segment.clone(),
            segment_bytes_max: config.segment_bytes_max,
        })?;
        let expiry = expiry::ExpiryIndex::default();
        for (deadline, account, hold_id) in &recovered.deadlines {
            expiry.insert(*deadline, account, *hold_id);
        }
        let accounts = Registry::from_tables(accounts);
        let report = RecoveryReport {
            records: outcome.records,
            snapshot_lsn: recovered.snapshot_lsn,
            damaged_snapshots: recovered.damaged_snapshots.len(),
            accounts: accounts.len(),
            last_lsn: outcome.last_lsn,
            tail_cut: outcome.tail_cut,
            holds_expired: 0,
            duration: started.elapsed(),
        };
        let inner = Inner {
            accounts,
            wal,
            ids: ids::IdGen::new(newest_ms, config.id_seed),
            clock: config.clock.clone(),
            expiry,
            config,
            live_actors: AtomicU64::new(0),
            actors: std::sync::OnceLock::new(),
            snapshot_running: tokio::sync::Mutex::new(()),
            currencies: Mutex::new(currencies),
            transfers: Mutex::new(transfers),
            recovery_millis: AtomicU64::new(
                u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            ),
            events: events::EventsState::default(),
            covered_since: Mutex::new(Default::default()),
        };
        Ok((
            Engine {
                inner: Arc::new(inner),
            },
            report,
        ))
    }

    /// Expires every hold whose deadline passed (also while the server was down), waits
    /// until those expiries are durable, then starts the background expiry task. Returns how
    /// many holds it expired.
    pub async fn finish_recovery(&self) -> Result<usize, EngineError> {
        let started = Instant::now();
        let finished = self.inner.finish_pending_transfers()?;
        let expired = self.inner.expire_all_due()?;
        self.inner
            .wal
            .wait_durable(self.inner.wal.durable_lsn().max(expired.1).max(finished))
            .await?;
        if let Some(every) = self.inner.config.expiry_sweep {
            expiry::spawn_sweeper(Arc::downgrade(&self.inner), every);
        }
        snapshots::spawn_snapshotter(
            Arc::downgrade(&self.inner),
            self.inner.config.snapshot_every_records,
            self.inner.config.snapshot_interval,
        );
        self.inner.actors();
        let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.inner
            .recovery_millis
            .fetch_add(millis, Ordering::Relaxed);
        Ok(expired.0)
    }

    /// The WAL's counters and histograms (group commit sizes, fsync times).
    pub fn wal_stats(&self) -> &wal::WalStats {
        self.inner.wal.stats()
    }

    /// Creates an account, or confirms it exists with the same currency and overdraft
    /// limit. Returns whether it was created, and the account.
    pub async fn open_account(
        &self,
        id: AccountId,
        currency: Currency,
        overdraft_limit: u64,
        metadata: Metadata,
    ) -> Result<(bool, AccountView), EngineError> {
        if let Some(slot) = self.inner.slot(&id) {
            return self.existing(&slot, &currency, overdraft_limit).await;
        }
        let created = {
            let mut accounts = self.inner.accounts.shard(&id).write();
            if let Some(slot) = accounts.get(&id) {
                Err(slot.clone())
            } else {
                let mut event = Event {
                    lsn: 0,
                    account: id.clone(),
                    seq: 0,
                    at_ms: self.inner.clock.now_ms(),
                    tx_id: Uuid::nil(),
                    idempotency_key: None,
                    body: EventBody::Opened {
                        currency: self.inner.currencies.lock().share(currency.clone()),
                        overdraft_limit,
                        metadata,
                    },
                    outcome: None,
                };
                event.lsn = self.inner.append(&event)?;
                let account = Account::open(&event)
                    .expect("an open event built from validated values is accepted");
                // The account as created: by the time the open is durable, requests that
                // came after it may have changed the account without being durable yet.
                let view = account.view();
                if accounts.insert(account).is_err() {
                    unreachable!("the id was looked up under the same write lock");
                }
                Ok((event.lsn, view))
            }
        };
        let (lsn, view) = match created {
            Ok(created) => created,
            Err(slot) => return self.existing(&slot, &currency, overdraft_limit).await,
        };
        self.inner.wal.wait_durable(lsn).await?;
        Ok((true, view))
    }

    async fn existing(
        &self,
        slot: &Slot,
        currency: &Currency,
        overdraft_limit: u64,
    ) -> Result<(bool, AccountView), EngineError> {
        let view = self.inner.read(slot, |account| account.view()).await?;
        if view.currency != *currency || view.overdraft_limit != overdraft_limit {
            return Err(EngineError::AccountExists {
                currency: view.currency.as_str().to_string(),
                overdraft_limit: view.overdraft_limit,
            });
        }
        Ok((false, view))
    }

    /// An account, as durable.
    pub async fn account(&self, id: &AccountId) -> Result<AccountView, EngineError> {
        let slot = self.inner.slot_or_404(id)?;
        self.inner.read(&slot, |account| account.view()).await
    }

    /// Runs a client request through the account's actor and waits until its outcome is
    /// durable. An idempotent replay waits for the original's durability.
    pub async fn execute(
        &self,
        id: &AccountId,
        key: Option<IdempotencyKey>,
        request: Request,
    ) -> Result<Executed, EngineError> {
        let slot = self.inner.slot_or_404(id)?;
        let actors = self.inner.actors();
        let (reply, rx) = oneshot::channel();
        let msg = actor::Msg::Execute {
            slot,
            key,
            request,
            reply,
        };
        actors.send(actors.owner(id), msg).await?;
        rx.await.map_err(|_| EngineError::ShuttingDown)?
    }

    /// Runs many requests, each exactly as [`Engine::execute`] would, in one trip through
    /// each account's actor and one wait for durability. Requests on the same account apply
    /// in the order given; the results come back in the order given.
    pub async fn execute_batch(
        &self,
        operations: Vec<(AccountId, Option<IdempotencyKey>, Request)>,
    ) -> Vec<Result<Executed, EngineError>> {
        let count = operations.len();
        let mut results: Vec<Option<Result<Executed, EngineError>>> =
            (0..count).map(|_| None).collect();
        let actors = self.inner.actors();
        let mut groups: Vec<Vec<actor::Item>> = (0..actors.count()).map(|_| Vec::new()).collect();
        for (index, (account, key, request)) in operations.into_iter().enumerate() {
            match self.inner.slot(&account) {
                Some(slot) => groups[actors.owner(&account)].push((index, slot, key, request)),
                None => results[index] = Some(Err(EngineError::AccountNotFound(account))),
            }
        }
        let mut pending = Vec::with_capacity(groups.len());
        for (owner, items) in groups.into_iter().enumerate() {
            if items.is_empty() {
                continue;
            }
            let indexes: Vec<usize> = items.iter().map(|(i, _, _, _)| *i).collect();
            let (reply, rx) = oneshot::channel();
            match actors.send(owner, actor::Msg::Batch { items, reply }).await {
                Ok(()) => pending.push((indexes, rx)),
                Err(error) => {
                    let overloaded = matches!(error, EngineError::Overloaded);
                    for index in indexes {
                        results[index] = Some(Err(if overloaded {
                            EngineError::Overloaded
                        } else {
                            EngineError::ShuttingDown
                        }));
                    }
                }
            }
        }
        let mut wait_lsn = 0;
        let mut answers = Vec::with_capacity(count);
        for (indexes, rx) in pending {
            match rx.await {
                Ok(group) => {
                    for (index, answer) in group {
                        wait_lsn = wait_lsn.max(answer.wait_lsn);
                        answers.push((index, answer.result));
                    }
                }
                Err(_) => {
                    for index in indexes {
                        results[index] = Some(Err(EngineError::ShuttingDown));
                    }
                }
            }
        }
        // One wait covers every answer: nothing is shown before all of it is durable.
        let durable = self.inner.wal.wait_durable(wait_lsn).await;
        for (index, result) in answers {
            results[index] = Some(match &durable {
                Ok(()) => result,
                Err(error) => Err(EngineError::from(error.clone_kind())),
            });
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(EngineError::ShuttingDown)))
            .collect()
    }

    /// One hold of an account.
    pub async fn hold(&self, id: &AccountId, hold_id: &Uuid) -> Result<Hold, EngineError> {
        let slot = self.inner.slot_or_404(id)?;
        self.inner
            .read(&slot, |account| account.hold(hold_id).cloned())
            .await?
            .ok_or(EngineError::Op(OpError::HoldNotFound(*hold_id)))
    }

    /// Holds in creation order after `after`, optionally of one status; at most `limit`,
    /// and the cursor of the next page if there may be more.
    pub async fn holds(
        &self,
        id: &AccountId,
        status: Option<HoldStatus>,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<(Vec<Hold>, Option<Uuid>), EngineError> {
        let slot = self.inner.slot_or_404(id)?;
        self.inner
            .read(&slot, |account| {
                let mut page: Vec<Hold> = account
                    .holds_after(after)
                    .filter(|h| status.is_none_or(|s| h.status == s))
                    .take(limit + 1)
                    .cloned()
                    .collect();
                let next = if page.len() > limit {
                    page.truncate(limit);
                    page.last().map(|h| h.id)
                } else {
                    None
                };
                (page, next)
            })
            .await
    }

    /// Transactions newest first, with `seq < before_seq`; at most `limit`, and the cursor of
    /// the next page if there is more.
    pub async fn transactions(
        &self,
        id: &AccountId,
        before_seq: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<Transaction>, Option<u64>), EngineError> {
        let slot = self.inner.slot_or_404(id)?;
        self.inner
            .read(&slot, |account| {
                // The newest transactions, with consecutive seqs from `first`: "seq < before"
                // is the prefix of length before - first.
                let history = account.history();
                let first = history.first_seq().unwrap_or(1);
                let end = before_seq.map_or(history.len(), |b| {
                    usize::try_from(b.saturating_sub(first))
                        .unwrap_or(usize::MAX)
                        .min(history.len())
                });
                let start = end.saturating_sub(limit);
                let page: Vec<Transaction> = history.range(start..end).rev().collect();
                let next = (start > 0).then(|| page.last().map(|t| t.seq)).flatten();
                (page, next)
            })
            .await
    }

    /// The remembered outcome of an idempotency key, without applying anything.
    pub async fn idempotency_entry(
        &self,
        id: &AccountId,
        key: &IdempotencyKey,
    ) -> Result<Option<IdempotencyEntry>, EngineError> {
        let slot = self.inner.slot_or_404(id)?;
        let entry = slot.state.lock().idempotency_entry(key).cloned();
        if let Some(entry) = &entry {
            self.inner.wal.wait_durable(entry.lsn).await?;
        }
        Ok(entry)
    }

    /// Expires every hold whose deadline has passed now; returns how many. The background
    /// sweeper calls this periodically; tests with a manual clock call it directly.
    pub async fn expire_due(&self) -> Result<usize, EngineError> {
        let (count, lsn) = self.inner.expire_all_due()?;
        self.inner.wal.wait_durable(lsn).await?;
        Ok(count)
    }

    /// Counters for `/metrics`.
    pub fn stats(&self) -> EngineStats {
        let wal = self.inner.wal.stats();
        let (in_flight, in_flight_amount, transfers) = {
            let book = self.inner.transfers.lock();
            let (count, amount) = book.in_flight();
            (count as u64, amount, book.len() as u64)
        };
        EngineStats {
            recovery_millis: self.inner.recovery_millis.load(Ordering::Relaxed),
            transfers_in_flight: in_flight,
            transfers_in_flight_amount: in_flight_amount,
            transfers,
            accounts: self.inner.accounts.len() as u64,
            live_actors: self.inner.live_actors.load(Ordering::Relaxed),
            queued_commands: self.inner.actors.get().map_or(0, |a| a.queued() as u64),
            open_holds: self.inner.expiry.len() as u64,
            wal_records: wal.records.load(Ordering::Relaxed),
            wal_bytes: wal.bytes.load(Ordering::Relaxed),
            wal_syncs: wal.fsync_seconds.get_sample_count(),
            wal_sync_micros: (wal.fsync_seconds.get_sample_sum() * 1e6) as u64,
            durable_lsn: self.inner.wal.durable_lsn(),
            storage_failed: self.inner.wal.is_failed(),
        }
    }

    /// With [`WriterMode::Manual`]: writes and syncs everything queued as one group commit
    /// and answers the requests it covers. Returns whether anything was queued.
    pub fn commit_wal(&self) -> Result<bool, EngineError> {
        Ok(self.inner.wal.commit()?)
    }

    /// Bytes queued for the WAL and not yet written.
    pub fn wal_queued_bytes(&self) -> usize {
        self.inner.wal.queued_bytes()
    }

    /// Whether snapshots are configured (and so one is due at graceful shutdown).
    pub fn snapshot_on_shutdown(&self) -> bool {
        let config = &self.inner.config;
        (config.snapshot_every_records.is_some() || config.snapshot_interval.is_some())
            && !self.storage_failed()
    }

    /// Whether writes are stopped by a storage failure.
    pub fn storage_failed(&self) -> bool {
        self.inner.wal.is_failed()
    }

    /// Flushes the WAL and stops its writer. Requests after this fail with `ShuttingDown`.
    pub fn shutdown(&self) {
        self.inner.wal.close();
    }
}

impl Inner {
    /// The account actors, started on first use.
    fn actors(self: &Arc<Inner>) -> &actor::Actors {
        self.actors.get_or_init(|| {
            actor::Actors::start(
                Arc::downgrade(self),
                self.config.actors,
                self.config.mailbox_capacity,
            )
        })
    }

    fn slot(&self, id: &AccountId) -> Option<Arc<Slot>> {
        self.accounts.get(id)
    }

    fn slot_or_404(&self, id: &AccountId) -> Result<Arc<Slot>, EngineError> {
        self.slot(id)
            .ok_or_else(|| EngineError::AccountNotFound(id.clone()))
    }

    /// Reads under the state lock, then waits until what was read is durable.
    async fn read<T>(&self, slot: &Slot, f: impl FnOnce(&Account) -> T) -> Result<T, EngineError> {
        let (value, lsn) = {
            let account = slot.state.lock();
            (f(&account), account.last_lsn())
        };
        self.wal.wait_durable(lsn).await?;
        Ok(value)
    }

    /// Encodes an event and queues it in the WAL; returns its LSN.
    fn append(&self, event: &Event) -> Result<u64, EngineError> {
        let mut payload = Vec::with_capacity(128);
        codec::encode_event(event, &mut payload);
        Ok(self.wal.append(&payload)?)
    }

    /// Writes and applies one event to an account whose state lock the caller holds.
    /// The event is checked before it is written, so the log never holds an event that
    /// replay would refuse.
    fn commit(
        &self,
        account: &mut Account,
        key: Option<IdempotencyKey>,
        body: EventBody,
        now_ms: u64,
    ) -> Result<(Arc<Receipt>, u64), EngineError> {
        let mut event = Event {
            lsn: 0,
            account: account.id().clone(),
            seq: account.seq() + 1,
            at_ms: now_ms,
            tx_id: self.ids.next(now_ms),
            idempotency_key: key,
            body,
            outcome: None,
        };
        // The outcome (balances after) is recorded with the event, so the event stream can
        // show the transaction from the log alone; replay checks it like every other field.
        match account.outcome_of(&event) {
            Ok(outcome) => event.outcome = Some(outcome),
            // decide() accepted this request under the same lock: a refusal here is a bug.
            Err(error) => panic!("decided event refused by check: {error}"),
        }
        #[cfg(debug_assertions)]
        if let (EventBody::Credit { amount, .. }, Some(poisoned)) =
            (&event.body, self.config.test_panic_on_credit_amount)
        {
            // The test hook of fail-stop: an invariant that fails here, as a bug would.
            assert_ne!(
                amount.get(),
                poisoned,
                "invariant failed on purpose (COFFER_TEST_PANIC_ON_CREDIT_AMOUNT)"
            );
        }
        if event.body.is_transfer() {
            // The transfer steps re-check the book under this lock: a refusal is a bug too,
            // and must stop before the log holds an event replay would refuse.
            if let Err(error) = self.transfers.lock().check_new(&event) {
                panic!("transfer event refused by the book: {error}");
            }
        }
        event.lsn = self.append(&event)?;
        let receipt = account
            .apply_checked(&event, self.config.retention)
            .expect("check() accepted this event under the same lock");
        if event.body.is_transfer() {
            // Under the account's lock, right after the event: a snapshot that captures the
            // book after the accounts has every transfer event its accounts have.
            if let Err(error) = self.transfers.lock().record(&event, Some(account.view())) {
                panic!("transfer book refused a live event: {error}");
            }
        }
        if let Some(hold) = &receipt.hold {
            match hold.status {
                HoldStatus::Open => self
                    .expiry
                    .insert(hold.expires_at_ms, account.id(), hold.id),
                _ => self
                    .expiry
                    .remove(hold.expires_at_ms, account.id(), hold.id),
            }
        }
        Ok((receipt, event.lsn))
    }

    /// Expires an account's due holds; returns how many and the last LSN written.
    fn expire_account(
        &self,
        account: &mut Account,
        now_ms: u64,
    ) -> Result<(usize, u64), EngineError> {
        let mut count = 0;
        let mut lsn = 0;
        for hold_id in account.due_holds(now_ms) {
            if let Some(body) = account.decide_expire(&hold_id, now_ms) {
                lsn = self.commit(account, None, body, now_ms)?.1;
                count += 1;
            }
        }
        Ok((count, lsn))
    }

    /// Expires every due hold of every account, through each account's state lock.
    fn expire_all_due(&self) -> Result<(usize, u64), EngineError> {
        let now_ms = self.clock.now_ms();
        let mut count = 0;
        let mut lsn = 0;
        let due = self.expiry.due(now_ms);
        let mut done: std::collections::HashSet<&AccountId, ahash::RandomState> =
            Default::default();
        for (_, account_id, _) in &due {
            if !done.insert(account_id) {
                continue;
            }
            let Some(slot) = self.slot(account_id) else {
                continue;
            };
            let mut account = slot.state.lock();
            let (n, last) = self.expire_account(&mut account, now_ms)?;
            count += n;
            lsn = lsn.max(last);
        }
        // Entries whose hold had already ended (or whose account is gone) are stale: drop them.
        for (deadline, account_id, hold_id) in &due {
            self.expiry.remove(*deadline, account_id, *hold_id);
        }
        Ok((count, lsn))
    }
}
