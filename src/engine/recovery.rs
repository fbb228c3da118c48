//! Rebuilding the accounts at start: the newest valid snapshot (falling back to an older one
//! if it is damaged), then the WAL after it, with the same `apply` as the live path.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::domain::{
    Account, AccountId, Currencies, Event, EventBody, FastMap, Retention, TransferBook,
};
use crate::snapshot;
use crate::storage::Storage;
use crate::wal::{self, ReplayOutcome};

use super::OpenError;

/// What [`recover_state`] rebuilt.
pub(crate) struct Recovered {
    /// Boxed: the map grows by doubling while it fills, and a table of whole accounts would
    /// need about twice their size at its peak.
    pub(crate) accounts: FastMap<AccountId, Box<Account>>,
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
}

/// Loads the newest valid snapshot of `data_dir` and replays the WAL after it. With
/// `repair`, a torn tail is cut on disk.
pub(crate) fn recover_state(
    storage: &dyn Storage,
    data_dir: &Path,
    retention: Retention,
    repair: bool,
) -> Result<Recovered, OpenError> {
    let snapshot_dir = data_dir.join("snapshots");
    let mut damaged_snapshots = Vec::new();
    let mut base = None;
    for file in snapshot::list(storage, &snapshot_dir)? {
        match snapshot::read(storage, &file.path) {
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
    let mut accounts: FastMap<AccountId, Box<Account>> = FastMap::default();
    let mut currencies = Currencies::default();
    let mut transfers = TransferBook::default();
    let (after_lsn, mut newest_ms, snapshot_lsn) = match base {
        Some(found) => {
            tracing::info!(
                lsn = found.lsn,
                accounts = found.accounts.len(),
                "loaded a snapshot"
            );
            accounts.reserve(found.accounts.len());
            for mut account in found.accounts {
                account.set_retention(retention);
                currencies.share(account.currency().clone());
                let id = account.id().clone();
                if accounts.insert(id.clone(), Box::new(account)).is_some() {
                    return Err(OpenError::Snapshot(snapshot::SnapshotError::Corrupt {
                        path: snapshot_dir.join(snapshot::file_name(found.lsn)),
                        reason: format!("account {id} twice"),
                    }));
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
    let started = Instant::now();
    let mut last_report = started;
    let mut replayed: u64 = 0;
    let outcome = wal::replay_after(storage, &data_dir.join("wal"), after_lsn, repair, |event| {
        newest_ms = newest_ms.max(event.at_ms);
        replayed += 1;
        if replayed % 65_536 == 0 && last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            let secs = started.elapsed().as_secs_f64().max(1e-9);
            tracing::info!(
                records = replayed,
                lsn = event.lsn,
                rate = (replayed as f64 / secs) as u64,
                "replaying the WAL"
            );
        }
        replay_event(
            &mut accounts,
            &mut currencies,
            &mut transfers,
            event,
            retention,
        )
    })?;
    // Invariant 3 over the whole engine: transfers only move money between accounts.
    let balances: i128 = accounts.values().map(|a| i128::from(a.balance())).sum();
    let external: i128 = accounts.values().map(|a| a.external_net()).sum();
    let in_flight = i128::try_from(transfers.in_flight().1).unwrap_or(i128::MAX);
    if balances.checked_add(in_flight) != Some(external) {
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
    })
}

/// Replay of one event into the recovering map, with the same checks and changes as the
/// live path. Events at or below an account's `last_lsn` are skipped: a fuzzy snapshot holds
/// some events after its own LSN.
fn replay_event(
    accounts: &mut FastMap<AccountId, Box<Account>>,
    currencies: &mut Currencies,
    transfers: &mut TransferBook,
    mut event: Event,
    retention: Retention,
) -> Result<(), String> {
    if let Some(account) = accounts.get_mut(&event.account) {
        let is_transfer = event.body.is_transfer();
        if event.lsn <= account.last_lsn() {
            // Already in the snapshot this replay started from (it is fuzzy); its book has
            // the event too.
            if is_transfer {
                transfers.record(&event, None).map_err(|e| e.to_string())?;
            }
            return Ok(());
        }
        if let EventBody::Opened { .. } = event.body {
            return Err(format!("account {} opened twice", event.account));
        }
        account.replay(&event).map_err(|e| e.to_string())?;
        if is_transfer {
            transfers
                .record(&event, Some(account.view()))
                .map_err(|e| e.to_string())?;
        }
        return Ok(());
    }
    if let EventBody::Opened { currency, .. } = &mut event.body {
        *currency = currencies.share(currency.clone());
        let mut account = Account::open(&event).map_err(|e| e.to_string())?;
        account.set_retention(retention);
        accounts.insert(event.account, Box::new(account));
        return Ok(());
    }
    Err(format!("event for unknown account {}", event.account))
}
