//! Taking snapshots while traffic goes on, and removing what they make unnecessary: older
//! snapshots beyond the last two, and WAL segments that only records before the older of
//! those two are in (moved to `--wal-archive` when one is given).

use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::{Engine, EngineError, Inner};
use crate::snapshot::{self, SnapshotError, SnapshotWriter, SNAPSHOTS_KEPT};
use crate::wal::{reader, WalError, WriterMode};

/// What one snapshot did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotReport {
    /// Its LSN: recovery replays the WAL after it.
    pub lsn: u64,
    /// Accounts in it.
    pub accounts: u64,
    /// Size of the file.
    pub bytes: u64,
    /// WAL segments removed (or archived) because no kept snapshot needs them.
    pub segments_removed: usize,
    /// Time to capture, wait for durability and write.
    pub duration: Duration,
}

/// Why a snapshot was not taken. The engine goes on serving either way; the previous
/// snapshots and the WAL are untouched.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFailed {
    /// The engine could not make the captured state durable.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Writing the snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Listing or removing WAL segments failed.
    #[error(transparent)]
    Wal(#[from] WalError),
}

impl Engine {
    /// Takes a snapshot now, while traffic goes on: captures every account under its own
    /// lock, waits until everything captured is durable in the WAL, writes the file durably,
    /// then removes what the two newest snapshots make unnecessary. One at a time.
    pub async fn snapshot(&self) -> Result<SnapshotReport, SnapshotFailed> {
        let _one_at_a_time = self.inner.snapshot_running.lock().await;
        let started = Instant::now();
        let manual = self.inner.config.wal_writer == WriterMode::Manual;
        // Encoding a million accounts takes a while: off the async workers, except in the
        // single-threaded simulation, which must stay deterministic.
        let captured = if manual {
            self.inner.capture()
        } else {
            let inner = self.inner.clone();
            tokio::task::spawn_blocking(move || inner.capture())
                .await
                .map_err(|_| EngineError::ShuttingDown)?
        };
        self.inner.wal.wait_durable(captured.wait_lsn).await?;
        let bytes = captured.bytes.len() as u64;
        let segments_removed = if manual {
            self.inner.store(captured.lsn, &captured.bytes)?
        } else {
            let inner = self.inner.clone();
            let lsn = captured.lsn;
            tokio::task::spawn_blocking(move || inner.store(lsn, &captured.bytes))
                .await
                .map_err(|_| EngineError::ShuttingDown)??
        };
        Ok(SnapshotReport {
            lsn: captured.lsn,
            accounts: captured.accounts,
            bytes,
            segments_removed,
            duration: started.elapsed(),
        })
    }
}

struct Captured {
    bytes: Vec<u8>,
    lsn: u64,
    /// Highest LSN of any captured account: the file is written once this is durable.
    wait_lsn: u64,
    accounts: u64,
}

impl Inner {
    fn capture(&self) -> Captured {
        // Every event at or below this LSN is applied by now (LSNs are assigned and events
        // applied under the account's lock), so each account captured below has it.
        let lsn = self.wal.last_assigned_lsn();
        let slots: Vec<_> = self.accounts.slots();
        let mut writer = SnapshotWriter::new(lsn, 0, self.clock.now_ms());
        let mut wait_lsn = lsn;
        for slot in &slots {
            let parts = {
                let account = slot.state.lock();
                wait_lsn = wait_lsn.max(account.last_lsn());
                account.parts()
            };
            writer.add(&parts);
        }
        // The book after the accounts: it then has every transfer event they have (the book
        // is written under the account's lock right after the event). Transfers that ended
        // at or below `lsn` long enough ago are forgotten first.
        self.prune_transfers(lsn, self.clock.now_ms());
        let transfers: Vec<_> = self.transfers.lock().records().cloned().collect();
        for record in &transfers {
            wait_lsn = wait_lsn.max(record.last_lsn());
        }
        // Read after the capture: every id in a captured account is at or below it.
        writer.set_ids_after_ms(self.ids.last_ms());
        Captured {
            bytes: writer.finish(transfers.iter().map(|r| &**r)),
            lsn,
            wait_lsn,
            accounts: slots.len() as u64,
        }
    }

    /// Writes the snapshot, keeps the newest two, and removes the WAL segments the older
    /// of them does not need. Returns how many segments went.
    fn store(&self, lsn: u64, bytes: &[u8]) -> Result<usize, SnapshotFailed> {
        let storage = &*self.config.storage;
        let dir = self.config.data_dir.join("snapshots");
        snapshot::write(storage, &dir, lsn, bytes)?;
        let kept = snapshot::list(storage, &dir)?;
        if kept.len() > SNAPSHOTS_KEPT {
            for old in &kept[SNAPSHOTS_KEPT..] {
                if let Err(error) = storage.remove(&old.path) {
                    tracing::warn!(path = %old.path.display(), %error, "cannot remove an old snapshot");
                }
            }
            crate::wal::sync_dir(storage, &dir)?;
        }
        let Some(floor) = kept.get(SNAPSHOTS_KEPT - 1).map(|s| s.lsn) else {
            return Ok(0);
        };
        let wal_dir = self.config.data_dir.join("wal");
        let segments = reader::list_segments(storage, &wal_dir)?;
        let mut removed = 0;
        let now = Instant::now();
        let retention = self.config.event_retention;
        let mut covered_since = self.covered_since.lock();
        // Never the last segment (the writer appends to it); a segment goes when the next
        // one starts at or before floor + 1, so every record in it is at or below floor, and
        // once it has been covered for the event retention (its events stay readable).
        for pair in segments.windows(2) {
            if pair[1].first_lsn > floor.saturating_add(1) {
                break;
            }
            let since = *covered_since.entry(pair[0].first_lsn).or_insert(now);
            if now.duration_since(since) < retention {
                break;
            }
            self.retire_segment(&pair[0].path)?;
            covered_since.remove(&pair[0].first_lsn);
            removed += 1;
        }
        drop(covered_since);
        if removed > 0 {
            crate::wal::sync_dir(storage, &wal_dir)?;
            if let Some(archive) = &self.config.wal_archive {
                crate::wal::sync_dir(storage, archive)?;
            }
        }
        Ok(removed)
    }

    fn retire_segment(&self, path: &Path) -> Result<(), WalError> {
        let storage = &*self.config.storage;
        match (&self.config.wal_archive, path.file_name()) {
            (Some(archive), Some(name)) => {
                storage
                    .create_dir_all(archive)
                    .map_err(|e| WalError::io(archive, e))?;
                let to = archive.join(name);
                storage.rename(path, &to).map_err(|e| WalError::io(&to, e))
            }
            _ => storage.remove(path).map_err(|e| WalError::io(path, e)),
        }
    }
}

/// Starts the background snapshotter: a snapshot after `every_records` new WAL records or
/// `every` time with at least one, whichever comes first. It holds only a weak reference, so
/// it ends with the engine.
pub(crate) fn spawn_snapshotter(
    inner: Weak<Inner>,
    every_records: Option<u64>,
    every: Option<Duration>,
) {
    if every_records.is_none() && every.is_none() {
        return;
    }
    tokio::spawn(async move {
        let mut records_at_last = 0;
        let mut last = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(inner) = inner.upgrade() else { return };
            if inner.wal.is_failed() {
                return;
            }
            let records = inner
                .wal
                .stats()
                .records
                .load(std::sync::atomic::Ordering::Relaxed);
            let new = records.saturating_sub(records_at_last);
            let due = every_records.is_some_and(|n| new >= n)
                || every.is_some_and(|t| new > 0 && last.elapsed() >= t);
            if !due {
                continue;
            }
            records_at_last = records;
            last = Instant::now();
            let engine = Engine {
                inner: Arc::clone(&inner),
            };
            drop(inner);
            match engine.snapshot().await {
                Ok(report) => tracing::info!(
                    lsn = report.lsn,
                    accounts = report.accounts,
                    bytes = report.bytes,
                    segments_removed = report.segments_removed,
                    ms = report.duration.as_millis() as u64,
                    "snapshot written"
                ),
                Err(error) => tracing::warn!(%error, "snapshot failed; will try again"),
            }
        }
    });
}
