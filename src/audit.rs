//! Offline operator commands on a data directory: `coffer wal verify` (the server's own
//! recovery, snapshot and WAL, every checksum and invariant checked, nothing written) and
//! `coffer wal dump` (one JSON line per WAL record still on disk, for audits and
//! reconciliation; with `--wal-archive`, the archive holds the older segments). A torn tail
//! is reported, not cut (the server cuts it at its next start).

use std::io::Write;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::domain::{Event, EventBody, Metadata, Retention};
use crate::engine::OpenError;
use crate::http::dto::Timestamp;
use crate::storage::FileStorage;
use crate::wal::{self, reader, TailCut, WalError};

/// What `wal verify` found in a data directory that is sound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The snapshot recovery would start from, if any.
    pub snapshot_lsn: Option<u64>,
    /// Snapshots skipped as damaged (recovery falls back past them).
    pub damaged_snapshots: Vec<String>,
    /// WAL segment files.
    pub segments: usize,
    /// Records replayed after the snapshot.
    pub records: u64,
    /// LSN of the last record.
    pub last_lsn: u64,
    /// Accounts at the end of the log.
    pub accounts: usize,
    /// Open holds at the end of the log.
    pub open_holds: usize,
    /// Sum of all balances at the end of the log.
    pub total_balance: i128,
    /// Transfers remembered.
    pub transfers: usize,
    /// Transfers half done (the server finishes them at its next start), and their sum.
    pub transfers_pending: (usize, u128),
    /// A torn tail the server would cut at its next start.
    pub tail_cut: Option<TailCut>,
}

/// Recovers `data_dir` exactly as the server would (newest valid snapshot, then every WAL
/// record after it, every checksum checked and every event applied with the server's own
/// `apply`, which asserts every invariant, and money conserved over all accounts), without
/// writing anything. An error names the
/// file and offset of the first bad record.
pub fn verify(data_dir: &Path) -> Result<Verified, OpenError> {
    let segments = reader::list_segments(&FileStorage, &wal_dir(data_dir)?)?.len();
    let recovered =
        crate::engine::recover_state(&FileStorage, data_dir, Retention::UNLIMITED, false, 0)?;
    let accounts: Vec<crate::domain::Account> = recovered
        .accounts
        .into_iter()
        .flat_map(crate::engine::Table::into_accounts)
        .collect();
    Ok(Verified {
        snapshot_lsn: recovered.snapshot_lsn,
        damaged_snapshots: recovered.damaged_snapshots,
        segments,
        records: recovered.outcome.records,
        last_lsn: recovered.outcome.last_lsn,
        accounts: accounts.len(),
        open_holds: accounts.iter().map(|a| a.view().open_holds as usize).sum(),
        total_balance: accounts.iter().map(|a| i128::from(a.view().balance)).sum(),
        transfers: recovered.transfers.len(),
        transfers_pending: recovered.transfers.in_flight(),
        tail_cut: recovered.outcome.tail_cut,
    })
}

/// Writes every record of the log in `data_dir` as one JSON object per line, in LSN order.
/// Returns the number of records; stops at the first bad record with its error (the lines
/// before it are written).
pub fn dump(data_dir: &Path, out: &mut dyn Write) -> Result<u64, WalError> {
    let dir = wal_dir(data_dir)?;
    let mut failed: Option<std::io::Error> = None;
    let outcome = wal::replay_from(&FileStorage, &dir, false, |event| {
        let line = event_json(&event);
        writeln!(out, "{line}").map_err(|e| {
            let text = format!("cannot write the dump: {e}");
            failed = Some(e);
            text
        })
    });
    if let Some(error) = failed {
        return Err(WalError::io(Path::new("<stdout>"), error));
    }
    Ok(outcome?.records)
}

/// The WAL directory of `data_dir`, which must exist: a mistyped `--data-dir` is an error,
/// not an empty log that verifies.
fn wal_dir(data_dir: &Path) -> Result<std::path::PathBuf, WalError> {
    let dir = data_dir.join("wal");
    if dir.is_dir() {
        return Ok(dir);
    }
    Err(WalError::io(
        &dir,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no WAL directory here: is this the server's --data-dir?",
        ),
    ))
}

fn metadata_json(metadata: &Metadata) -> Value {
    Value::Object(
        metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect::<Map<String, Value>>(),
    )
}

fn time_json(ms: u64) -> Value {
    serde_json::to_value(Timestamp(ms)).unwrap_or(Value::Null)
}

/// One record as JSON: the envelope, `kind`, and the body's fields.
pub fn event_json(event: &Event) -> Value {
    let mut record = json!({
        "lsn": event.lsn,
        "account": event.account.as_str(),
        "seq": event.seq,
        "at": time_json(event.at_ms),
        "tx_id": (!event.tx_id.is_nil()).then(|| event.tx_id.to_string()),
        "idempotency_key": event.idempotency_key.as_ref().map(|k| k.as_str()),
    });
    let body = match &event.body {
        EventBody::Opened {
            currency,
            overdraft_limit,
            metadata,
        } => json!({
            "kind": "opened",
            "currency": currency.as_str(),
            "overdraft_limit": overdraft_limit,
            "metadata": metadata_json(metadata),
        }),
        EventBody::Credit { amount, metadata } => json!({
            "kind": "credit", "amount": amount.get(), "metadata": metadata_json(metadata),
        }),
        EventBody::Debit { amount, metadata } => json!({
            "kind": "debit", "amount": amount.get(), "metadata": metadata_json(metadata),
        }),
        EventBody::Hold {
            hold_id,
            amount,
            expires_at_ms,
            expires_in_secs,
            metadata,
        } => json!({
            "kind": "hold",
            "hold_id": hold_id.to_string(),
            "amount": amount.get(),
            "expires_at": time_json(*expires_at_ms),
            "expires_in_secs": expires_in_secs,
            "metadata": metadata_json(metadata),
        }),
        EventBody::Capture {
            hold_id,
            amount,
            amount_given,
            metadata,
        } => json!({
            "kind": "capture",
            "hold_id": hold_id.to_string(),
            "amount": amount.get(),
            "amount_given": amount_given,
            "metadata": metadata_json(metadata),
        }),
        EventBody::Release { hold_id, metadata } => json!({
            "kind": "release", "hold_id": hold_id.to_string(), "metadata": metadata_json(metadata),
        }),
        EventBody::Expire { hold_id } => {
            json!({ "kind": "expire", "hold_id": hold_id.to_string() })
        }
        EventBody::TransferOut {
            transfer_id,
            to,
            amount,
            metadata,
        } => json!({
            "kind": "transfer_out",
            "transfer_id": transfer_id.to_string(),
            "to": to.as_str(),
            "amount": amount.get(),
            "metadata": metadata_json(metadata),
        }),
        EventBody::TransferIn {
            transfer_id,
            from,
            amount,
            metadata,
        } => json!({
            "kind": "transfer_in",
            "transfer_id": transfer_id.to_string(),
            "from": from.as_str(),
            "amount": amount.get(),
            "metadata": metadata_json(metadata),
        }),
        EventBody::TransferRefund {
            transfer_id,
            to,
            amount,
            failure,
        } => json!({
            "kind": "transfer_refund",
            "transfer_id": transfer_id.to_string(),
            "to": to.as_str(),
            "amount": amount.get(),
            "failure_code": failure.code(),
        }),
    };
    if let (Value::Object(record), Value::Object(body)) = (&mut record, body) {
        record.extend(body);
    }
    record
}
