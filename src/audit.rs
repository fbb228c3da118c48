//! Offline operator commands on a data directory: `coffer wal verify` (the server's own
//! recovery, snapshot and WAL, every checksum and invariant checked, then every segment
//! left checked back to the oldest, through the archive when one is given) and
//! `coffer wal dump` (one JSON line per WAL record still in a segment, for audits and
//! reconciliation; with an archive, the server's archived segments come first). A torn tail
//! is reported, not cut (the server cuts it at its next start).
//!
//! Both only read: they take no lock and write nothing, so they may run beside a live
//! server. A snapshot that removes segments while they read can make them fail; run them
//! again then.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::domain::{AccountView, Event, EventBody, Metadata, Retention};
use crate::engine::{recover_from, OpenError, Start};
use crate::http::dto::Timestamp;
use crate::storage::FileStorage;
use crate::wal::reader::{self, SegmentFile};
use crate::wal::{codec, TailCut, WalError};

/// What `wal verify` found in a data directory that is sound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The snapshot recovery would start from, if any.
    pub snapshot_lsn: Option<u64>,
    /// Snapshots skipped as damaged (recovery falls back past them).
    pub damaged_snapshots: Vec<String>,
    /// WAL segment files in the log.
    pub segments: usize,
    /// The LSNs the log's segments hold (`None`: no record).
    pub segments_lsn: Option<(u64, u64)>,
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
    /// The check of every segment left, when recovery did not read them all (it starts at
    /// the snapshot's segment) or an archive was given.
    pub journal: Option<JournalChecked>,
}

/// The second pass of `wal verify`: every record of every segment, archived ones first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalChecked {
    /// Segments read, archived ones included.
    pub segments: usize,
    /// Of them, from the archive (`None`: no archive was given).
    pub archived: Option<usize>,
    /// The LSNs they hold, with no gap (`None`: no record).
    pub lsn: Option<(u64, u64)>,
    /// True when they start at lsn 1 and were replayed from there, with every invariant,
    /// to exactly the accounts recovery gives; false when the records before them are only
    /// in the snapshot (their checksums, order and encoding were checked).
    pub replayed_from_start: bool,
}

impl Verified {
    /// The report `coffer wal verify` prints, line by line.
    pub fn report(&self) -> String {
        let start = self.snapshot_lsn.map_or("no snapshot".to_string(), |lsn| {
            format!("snapshot at lsn {lsn}")
        });
        let mut text = format!(
            "ok: {start}, then {} records to lsn {} in {} segments{}; {} accounts, {} open holds, total balance {}\n",
            self.records,
            self.last_lsn,
            self.segments,
            range_text(self.segments_lsn),
            self.accounts,
            self.open_holds,
            self.total_balance
        );
        text += &format!(
            "transfers: {} remembered, {} half done ({} in flight; the server finishes them at its next start); money conserved\n",
            self.transfers, self.transfers_pending.0, self.transfers_pending.1
        );
        if let Some(journal) = &self.journal {
            text += &journal.report(self.accounts);
        }
        for damaged in &self.damaged_snapshots {
            text += &format!("warning: skipped a damaged snapshot: {damaged}\n");
        }
        if let Some(cut) = &self.tail_cut {
            text += &format!(
                "note: torn tail in {} at offset {} ({} bytes: {}); it was never acknowledged and the server cuts it at its next start\n",
                cut.path.display(),
                cut.offset,
                cut.bytes,
                cut.reason
            );
        }
        text
    }
}

impl JournalChecked {
    fn report(&self, accounts: usize) -> String {
        let archived = self
            .archived
            .map_or(String::new(), |n| format!(" ({n} archived)"));
        let lsn = self
            .lsn
            .map_or("no records".to_string(), |(a, b)| format!("lsn {a}..={b}"));
        let how = match self.lsn {
            _ if self.replayed_from_start => {
                format!("its replay from lsn 1 gives the same {accounts} accounts")
            }
            Some((first, _)) if first > 1 => {
                format!("lsn 1..={} are only in the snapshot", first - 1)
            }
            _ => "nothing before them".to_string(),
        };
        format!(
            "journal: {lsn} in {} segments{archived}, every record checked, no gap; {how}\n",
            self.segments
        )
    }
}

/// Recovers `data_dir` exactly as the server would (newest valid snapshot, then every WAL
/// record after it, every checksum checked and every event applied with the server's own
/// `apply`, which asserts every invariant, and money conserved over all accounts), without
/// writing anything. Then, unless that read every record there is, it reads every segment
/// left, `archive`'s (the server's `--wal-archive`) first: in LSN order with no gap, every
/// record checked; from lsn 1, a replay with every invariant that must give the same
/// accounts. An error names the file and offset of the first bad record, or the segment
/// after a gap.
pub fn verify(data_dir: &Path, archive: Option<&Path>) -> Result<Verified, OpenError> {
    let wal_dir = wal_dir(data_dir)?;
    let live = reader::list_segments(&FileStorage, &wal_dir)?;
    let recovered = recover_from(
        &FileStorage,
        data_dir,
        Start::SnapshotThen(&live),
        Retention::UNLIMITED,
        false,
        0,
    )?;
    let views = sorted_views(recovered.accounts);
    let last_lsn = recovered.outcome.last_lsn;
    let segments_lsn = held_lsns(&live, last_lsn);
    let journal = match archive {
        None if recovered.snapshot_lsn.is_none() => None,
        _ => Some(check_journal(
            data_dir, &wal_dir, archive, &live, &views, last_lsn,
        )?),
    };
    Ok(Verified {
        snapshot_lsn: recovered.snapshot_lsn,
        damaged_snapshots: recovered.damaged_snapshots,
        segments: live.len(),
        segments_lsn,
        records: recovered.outcome.records,
        last_lsn,
        accounts: views.len(),
        open_holds: views.iter().map(|a| a.open_holds as usize).sum(),
        total_balance: views.iter().map(|a| i128::from(a.balance)).sum(),
        transfers: recovered.transfers.len(),
        transfers_pending: recovered.transfers.in_flight(),
        tail_cut: recovered.outcome.tail_cut,
        journal,
    })
}

/// Reads every segment of the journal (the archive's, then the log's): from lsn 1 as a
/// replay that must give `views`; otherwise every frame checked and decoded.
fn check_journal(
    data_dir: &Path,
    wal_dir: &Path,
    archive: Option<&Path>,
    live: &[SegmentFile],
    views: &[AccountView],
    last_lsn: u64,
) -> Result<JournalChecked, OpenError> {
    let segments = match archive {
        Some(archive) => reader::list_journal(&FileStorage, &archive_dir(archive)?, wal_dir)?,
        None => live.to_vec(),
    };
    let archived = archive.map(|_| segments.len() - live.len());
    let first_lsn = segments.first().map_or(1, |s| s.first_lsn);
    let replayed_from_start = first_lsn == 1;
    let last = if replayed_from_start {
        let full = recover_from(
            &FileStorage,
            data_dir,
            Start::Journal(&segments),
            Retention::UNLIMITED,
            false,
            0,
        )?;
        let last = full.outcome.last_lsn;
        let full_views = sorted_views(full.accounts);
        if let Some(differs) = first_difference(views, &full_views) {
            return Err(OpenError::Wal(WalError::Corrupt {
                path: data_dir.join("snapshots"),
                offset: 0,
                reason: format!(
                    "the snapshot and the replay of the journal from lsn 1 disagree: {differs}"
                ),
            }));
        }
        last
    } else {
        let decoded = |frame: &codec::Frame<'_>| {
            codec::decode_frame_event(frame)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let after = first_lsn - 1;
        reader::replay_segments_after(&FileStorage, wal_dir, &segments, after, false, decoded)?
            .last_lsn
    };
    if last != last_lsn {
        return Err(OpenError::Wal(WalError::Corrupt {
            path: wal_dir.to_path_buf(),
            offset: 0,
            reason: format!("the journal ends at lsn {last} but the log at {last_lsn}"),
        }));
    }
    Ok(JournalChecked {
        segments: segments.len(),
        archived,
        lsn: held_lsns(&segments, last),
        replayed_from_start,
    })
}

/// Every account's view, in id order.
fn sorted_views(tables: Vec<crate::engine::Table>) -> Vec<AccountView> {
    let mut views: Vec<AccountView> = tables
        .into_iter()
        .flat_map(crate::engine::Table::into_accounts)
        .map(|account| account.view())
        .collect();
    views.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
    views
}

/// The first account on which two recoveries disagree, described.
fn first_difference(ours: &[AccountView], theirs: &[AccountView]) -> Option<String> {
    if ours.len() != theirs.len() {
        return Some(format!("{} accounts against {}", ours.len(), theirs.len()));
    }
    let (a, b) = ours.iter().zip(theirs).find(|(a, b)| a != b)?;
    Some(format!("account {}: {a:?} against {b:?}", a.id))
}

/// The LSNs segments hold when the last record is `last_lsn`.
fn held_lsns(segments: &[SegmentFile], last_lsn: u64) -> Option<(u64, u64)> {
    let first = segments.first()?.first_lsn;
    (last_lsn >= first).then_some((first, last_lsn))
}

fn range_text(range: Option<(u64, u64)>) -> String {
    range.map_or(String::new(), |(a, b)| format!(" (lsn {a}..={b})"))
}

/// What `wal dump` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dumped {
    /// Records written.
    pub records: u64,
    /// The LSNs of the first and last record written (`None`: none).
    pub lsn: Option<(u64, u64)>,
    /// Segments read, archived ones included.
    pub segments: usize,
    /// Of them, from the archive (`None`: no archive was given).
    pub archived: Option<usize>,
    /// The newest snapshot's LSN, which covers the records before the first segment.
    pub snapshot_lsn: Option<u64>,
    /// A torn tail at the end of the log (not dumped: it was never acknowledged).
    pub tail_cut: Option<TailCut>,
}

impl Dumped {
    /// What the dump covers, for stderr (`coffer wal dump: ...`).
    pub fn summary(&self) -> String {
        let archived = self
            .archived
            .map_or(String::new(), |n| format!(" ({n} archived)"));
        let mut text = match self.lsn {
            Some((a, b)) => format!(
                "{} records, lsn {a}..={b}, from {} segments{archived}",
                self.records, self.segments
            ),
            None => format!("no records, {} segments{archived}", self.segments),
        };
        if let (Some((first, _)), Some(snapshot)) = (self.lsn, self.snapshot_lsn) {
            if first > 1 {
                let removed = match self.archived {
                    Some(_) => "their segments were removed before the archive began",
                    None => "their segments were removed; a server with --wal-archive keeps them: pass --archive DIR",
                };
                text += &format!(
                    "; lsn 1..={} are only in the snapshot at lsn {snapshot} ({removed})",
                    first - 1
                );
            }
        }
        if let Some(cut) = &self.tail_cut {
            text += &format!(
                "; a torn tail in {} at offset {} was not dumped (never acknowledged)",
                cut.path.display(),
                cut.offset
            );
        }
        text
    }
}

/// Writes every record still in a segment of `data_dir`'s log, `archive`'s segments first
/// (the server's `--wal-archive`), as one JSON object per line, in LSN order from the first
/// record there is: the segments must continue one another with no gap, and records before
/// the first one must be covered by a snapshot. Stops at the first bad record with its error
/// (the lines before it are written).
pub fn dump(
    data_dir: &Path,
    archive: Option<&Path>,
    out: &mut dyn Write,
) -> Result<Dumped, OpenError> {
    let dir = wal_dir(data_dir)?;
    let segments = match archive {
        Some(archive) => reader::list_journal(&FileStorage, &archive_dir(archive)?, &dir)?,
        None => reader::list_segments(&FileStorage, &dir)?,
    };
    let archived = archive.map(|_| segments.len() - count_in(&segments, &dir));
    let snapshot_lsn = crate::snapshot::list(&FileStorage, &data_dir.join("snapshots"))?
        .first()
        .map(|s| s.lsn);
    let first_lsn = segments.first().map_or(1, |s| s.first_lsn);
    if first_lsn > snapshot_lsn.unwrap_or(0) + 1 {
        let (path, covered) = (segments[0].path.clone(), snapshot_lsn.unwrap_or(0));
        return Err(OpenError::Wal(WalError::Corrupt {
            path,
            offset: 0,
            reason: format!(
                "the first segment starts at lsn {first_lsn}, and lsn {}..={} are in no segment and no snapshot",
                covered + 1,
                first_lsn - 1
            ),
        }));
    }
    let mut failed: Option<std::io::Error> = None;
    let mut first_written = None;
    let outcome = reader::replay_segments_after(
        &FileStorage,
        &dir,
        &segments,
        first_lsn - 1,
        false,
        |frame| {
            let event = codec::decode_frame_event(frame).map_err(|e| e.to_string())?;
            first_written.get_or_insert(event.lsn);
            writeln!(out, "{}", event_json(&event)).map_err(|e| {
                let text = format!("cannot write the dump: {e}");
                failed = Some(e);
                text
            })
        },
    );
    if let Some(error) = failed {
        return Err(WalError::io(Path::new("<stdout>"), error).into());
    }
    let outcome = outcome?;
    Ok(Dumped {
        records: outcome.records,
        lsn: first_written.map(|first| (first, outcome.last_lsn)),
        segments: segments.len(),
        archived,
        snapshot_lsn,
        tail_cut: outcome.tail_cut,
    })
}

/// How many of `segments` are in `dir`.
fn count_in(segments: &[SegmentFile], dir: &Path) -> usize {
    segments
        .iter()
        .filter(|s| s.path.parent() == Some(dir))
        .count()
}

/// The WAL directory of `data_dir`, which must exist: a mistyped `--data-dir` is an error,
/// not an empty log that verifies.
fn wal_dir(data_dir: &Path) -> Result<PathBuf, WalError> {
    existing_dir(
        data_dir.join("wal"),
        "no WAL directory here: is this the server's --data-dir?",
    )
}

/// The archive directory, which must exist (the server creates it at start): a mistyped
/// `--archive` is an error, not an archive without segments.
fn archive_dir(archive: &Path) -> Result<PathBuf, WalError> {
    existing_dir(
        archive.to_path_buf(),
        "no archive directory here: is this the server's --wal-archive?",
    )
}

fn existing_dir(dir: PathBuf, missing: &'static str) -> Result<PathBuf, WalError> {
    if dir.is_dir() {
        return Ok(dir);
    }
    Err(WalError::io(
        &dir,
        std::io::Error::new(std::io::ErrorKind::NotFound, missing),
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
