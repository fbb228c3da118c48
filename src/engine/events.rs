//! The event stream: every committed transaction of every account, in commit (LSN) order,
//! read from the write-ahead log itself. Each record carries its transaction's outcome
//! (format version 3), so a page is built from the log alone: from the last group commits
//! kept in memory (`wal::tail`) when the reader keeps up, else from the segment files.
//!
//! Only durable records are read (never past the durable LSN), and a read never skips a
//! record: a record it cannot show fails the read; a position that is no longer kept is
//! refused as expired with the oldest position that is.

use std::collections::VecDeque;
use std::sync::OnceLock;
use std::time::Duration;

use parking_lot::Mutex;

use super::{Engine, EngineError, Inner};
use crate::domain::{AccountId, EventBody, Transaction, TxKind};
use crate::wal::reader::{self, RangeError, ReadPosition};
use crate::wal::{codec, WalError};

/// The most records one read looks at, matching the filters or not, before it answers with
/// what it found (a rare filter must not make one request scan the whole log).
pub const EVENTS_SCAN_RECORDS_MAX: usize = 100_000;
/// Read positions remembered for consumers reading segments (one per consumer suffices).
const POSITIONS_MAX: usize = 64;

/// Which transactions a consumer wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Only this account's.
    pub account: Option<AccountId>,
    /// Only this kind.
    pub kind: Option<TxKind>,
}

/// One page of the stream.
#[derive(Debug, Clone)]
pub struct EventPage {
    /// The transactions, each with its LSN (the position a cursor names), in LSN order.
    pub events: Vec<(u64, Transaction)>,
    /// The LSN to read after next time: the last record looked at (matching or not).
    pub next: u64,
}

/// The event stream's state in the engine.
#[derive(Default)]
pub(crate) struct EventsState {
    /// The first record that carries its outcome: older records (format versions 1 and 2)
    /// cannot be shown, so the stream starts after them.
    first_outcome_lsn: OnceLock<u64>,
    /// Where recent segment reads stopped.
    positions: Mutex<VecDeque<ReadPosition>>,
}

impl Engine {
    /// The position before the oldest event kept: `after` may not be older than this. It
    /// moves forward when snapshots retire WAL segments.
    pub fn events_floor(&self) -> Result<u64, EngineError> {
        self.inner.events_floor()
    }

    /// The committed transactions after position `after` (`None`: from the oldest kept)
    /// that pass `filter`, at most `limit`. If there are none yet, waits up to `wait` for
    /// new durable records. Fails with `CursorExpired` if `after` is older than what is
    /// kept, `CursorAhead` if it is past the durable end of the log.
    pub async fn events(
        &self,
        after: Option<u64>,
        limit: usize,
        filter: &EventFilter,
        wait: Duration,
    ) -> Result<EventPage, EngineError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut durable = self.inner.wal.subscribe_durable();
        let floor = self.inner.events_floor()?;
        let mut cursor = after.unwrap_or(floor);
        let upto = self.inner.wal.durable_lsn();
        if cursor > upto {
            return Err(EngineError::CursorAhead { durable: upto });
        }
        if cursor < floor {
            return Err(EngineError::CursorExpired { floor });
        }
        loop {
            durable.borrow_and_update();
            let upto = self.inner.wal.durable_lsn();
            let page = self.scan(cursor, upto, limit, filter).await?;
            cursor = page.next;
            // Answer when there is something, when the wait is over, or when the scan
            // stopped early (more to look at: the consumer comes back at once).
            if !page.events.is_empty() || page.next < upto || wait.is_zero() {
                return Ok(page);
            }
            match tokio::time::timeout_at(deadline, durable.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return Ok(page),
            }
        }
    }

    /// One read of records `after + 1 ..= upto`: from memory if the in-memory tail reaches
    /// back far enough, else from the segments on a blocking thread.
    async fn scan(
        &self,
        after: u64,
        upto: u64,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<EventPage, EngineError> {
        if after >= upto {
            return Ok(EventPage {
                events: Vec::new(),
                next: after,
            });
        }
        let mut collect = Collect::new(after, limit, filter.clone());
        if let Some(batches) = self.inner.wal.recent_from(after + 1) {
            'batches: for batch in batches {
                let mut pos = 0;
                while pos < batch.bytes.len() {
                    let (frame, size) = codec::decode_frame(&batch.bytes[pos..])
                        .map_err(|e| internal(&format!("a durable batch in memory: {e}")))?;
                    pos += size;
                    if frame.lsn <= after {
                        continue;
                    }
                    if frame.lsn > upto || !collect.visit(&frame) {
                        break 'batches;
                    }
                }
            }
            return collect.finish();
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.scan_segments(after, upto, collect))
            .await
            .map_err(|_| EngineError::ShuttingDown)?
    }
}

impl Inner {
    fn events_floor(&self) -> Result<u64, EngineError> {
        let dir = self.config.data_dir.join("wal");
        let segments = reader::list_segments(&*self.config.storage, &dir).map_err(wal_error)?;
        let first_segment = segments
            .first()
            .map_or(self.wal.start_lsn(), |s| s.first_lsn);
        let first_outcome = self.first_outcome_lsn()?;
        Ok(first_segment.max(first_outcome).saturating_sub(1))
    }

    /// The LSN of the first record of format version 3 or later (every later record is too:
    /// coffer writes only its newest version, and downgrades are not supported). Found once,
    /// by reading frame headers from the oldest segment; the first record this process
    /// writes if no older one is.
    fn first_outcome_lsn(&self) -> Result<u64, EngineError> {
        if let Some(lsn) = self.events.first_outcome_lsn.get() {
            return Ok(*lsn);
        }
        let start = self.wal.start_lsn();
        let dir = self.config.data_dir.join("wal");
        let storage = &*self.config.storage;
        let segments = reader::list_segments(storage, &dir).map_err(wal_error)?;
        let mut found = start;
        if let Some(first) = segments.first().filter(|s| s.first_lsn < start) {
            let read = reader::read_range(
                storage,
                &dir,
                first.first_lsn - 1,
                start - 1,
                None,
                |frame| {
                    if frame.version >= codec::FRAME_VERSION_OUTCOME {
                        found = frame.lsn;
                        return false;
                    }
                    true
                },
            );
            match read {
                Ok(_) => {}
                // The oldest segment went meanwhile: the next call looks again.
                Err(RangeError::Gone(_)) => return Ok(start.min(first.first_lsn + 1)),
                Err(RangeError::Wal(error)) => return Err(wal_error(error)),
            }
        }
        Ok(*self.events.first_outcome_lsn.get_or_init(|| found))
    }

    fn scan_segments(
        &self,
        after: u64,
        upto: u64,
        mut collect: Collect,
    ) -> Result<EventPage, EngineError> {
        let dir = self.config.data_dir.join("wal");
        let start = {
            let positions = self.events.positions.lock();
            positions
                .iter()
                .filter(|p| p.lsn <= after + 1)
                .max_by_key(|p| p.lsn)
                .copied()
        };
        let read = reader::read_range(&*self.config.storage, &dir, after, upto, start, |f| {
            collect.visit(f)
        });
        match read {
            Ok(position) => {
                let mut positions = self.events.positions.lock();
                if positions.len() >= POSITIONS_MAX {
                    positions.pop_front();
                }
                positions.push_back(position);
            }
            Err(RangeError::Gone(_)) => {
                let floor = self.events_floor()?;
                if after < floor {
                    return Err(EngineError::CursorExpired { floor });
                }
                return Err(internal("a WAL segment went while it was needed"));
            }
            Err(RangeError::Wal(error)) => return Err(wal_error(error)),
        }
        collect.finish()
    }
}

/// Gathers a page from the frames of a read.
struct Collect {
    page: EventPage,
    limit: usize,
    filter: EventFilter,
    scanned: usize,
    error: Option<String>,
}

impl Collect {
    fn new(after: u64, limit: usize, filter: EventFilter) -> Collect {
        Collect {
            page: EventPage {
                events: Vec::new(),
                next: after,
            },
            limit: limit.max(1),
            filter,
            scanned: 0,
            error: None,
        }
    }

    /// Takes one frame (the next LSN); returns whether to go on.
    fn visit(&mut self, frame: &codec::Frame<'_>) -> bool {
        debug_assert_eq!(frame.lsn, self.page.next + 1, "frames in LSN order, no gap");
        let event = match codec::decode_frame_event(frame) {
            Ok(event) => event,
            Err(error) => {
                self.error = Some(format!("record {}: {error}", frame.lsn));
                return false;
            }
        };
        match Transaction::of_event(&event) {
            Some(tx) => {
                let account = self.filter.account.as_ref();
                if account.is_none_or(|a| *a == tx.account_id)
                    && self.filter.kind.is_none_or(|k| k == tx.kind)
                {
                    self.page.events.push((frame.lsn, tx));
                }
            }
            // An account's creation is not a transaction.
            None if matches!(event.body, EventBody::Opened { .. }) => {}
            None => {
                self.error = Some(format!("record {} carries no outcome", frame.lsn));
                return false;
            }
        }
        self.page.next = frame.lsn;
        self.scanned += 1;
        self.page.events.len() < self.limit && self.scanned < EVENTS_SCAN_RECORDS_MAX
    }

    fn finish(self) -> Result<EventPage, EngineError> {
        match self.error {
            Some(error) => Err(internal(&error)),
            None => Ok(self.page),
        }
    }
}

fn internal(what: &str) -> EngineError {
    tracing::error!(what, "event stream read failed");
    EngineError::Internal
}

fn wal_error(error: WalError) -> EngineError {
    tracing::error!(%error, "event stream read failed");
    EngineError::Internal
}
