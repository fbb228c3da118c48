//! Snapshots: every account's state in one file, so that recovery replays only the WAL after
//! it and covered WAL segments can go. The format is ours, little-endian, versioned and
//! checksummed; `docs/snapshot-format.md` describes it and `tests/golden/snapshot.bin` pins it.
//!
//! A snapshot is fuzzy: it records `lsn`, the last LSN assigned when it began, then captures
//! each account in turn under its lock while traffic goes on. Every event at or below `lsn`
//! is in the captured accounts (an event's LSN is assigned and the event applied under the
//! same lock); events after it may or may not be. Recovery therefore replays the WAL after
//! `lsn` and skips, per account, the events at or below the account's own `last_lsn`.
//!
//! Files are `DIR/snapshots/{lsn:020}.snap`, written under a temporary name, synced, renamed
//! and the directory synced, so a crash leaves either the old set or the new one.

use std::io;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::domain::{
    Account, AccountId, AccountParts, AccountView, Currencies, Currency, Hold, HoldStatus,
    IdempotencyEntry, IdempotencyKey, Receipt, Request, Transaction, TransferFailure,
    TransferRecord, TransferStatus, TxKind,
};
use crate::storage::Storage;
use crate::wal::codec::{bad, put_metadata, put_pairs, put_str8, DecodeError, Reader};

/// First bytes of a snapshot file ("CFNS" little-endian).
pub const SNAPSHOT_MAGIC: u32 = 0x534E_4643;
/// Last bytes of a snapshot file ("SEND" little-endian): a file cut short lacks them.
pub const SNAPSHOT_END_MAGIC: u32 = 0x444E_4553;
/// The format version this coffer writes. Version 1 (before transfers) is read too.
pub const SNAPSHOT_VERSION: u16 = 2;
/// Header size in bytes.
pub const SNAPSHOT_HEADER_BYTES: usize = 40;
/// Snapshots kept; older ones (and the WAL segments only they needed) are removed.
pub const SNAPSHOTS_KEPT: usize = 2;

const SUFFIX: &str = ".snap";
const TMP_SUFFIX: &str = ".snap.tmp";

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// An I/O call failed.
    #[error("snapshot i/o on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The file is not a valid snapshot.
    #[error("corrupt snapshot {path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn io_error(path: &Path, source: io::Error) -> SnapshotError {
    SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A decoded snapshot.
#[derive(Debug)]
pub struct Snapshot {
    /// Last LSN assigned when the snapshot began: replay continues after it.
    pub lsn: u64,
    /// Every id made before the snapshot has a timestamp at or below this (ms).
    pub ids_after_ms: u64,
    /// When it was taken (unix ms).
    pub created_at_ms: u64,
    /// The accounts.
    pub accounts: Vec<Account>,
    /// The transfers remembered (version 2 on).
    pub transfers: Vec<TransferRecord>,
}

/// A snapshot file and the LSN its name says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFile {
    /// Path of the file.
    pub path: PathBuf,
    /// Its LSN.
    pub lsn: u64,
}

/// The file name of the snapshot at `lsn`.
pub fn file_name(lsn: u64) -> String {
    format!("{lsn:020}{SUFFIX}")
}

/// Snapshots in `dir`, newest first. Other files are ignored.
pub fn list(storage: &dyn Storage, dir: &Path) -> Result<Vec<SnapshotFile>, SnapshotError> {
    let mut found: Vec<SnapshotFile> = storage
        .list(dir)
        .map_err(|e| io_error(dir, e))?
        .into_iter()
        .filter_map(|name| {
            let stem = name.strip_suffix(SUFFIX)?;
            if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some(SnapshotFile {
                path: dir.join(&name),
                lsn: stem.parse().ok()?,
            })
        })
        .collect();
    found.sort_by_key(|s| std::cmp::Reverse(s.lsn));
    Ok(found)
}

/// Builds a snapshot file's bytes from encoded accounts (see [`encode_account`]).
pub struct SnapshotWriter {
    bytes: Vec<u8>,
    accounts: u64,
}

impl SnapshotWriter {
    /// Starts a snapshot at `lsn`.
    pub fn new(lsn: u64, ids_after_ms: u64, created_at_ms: u64) -> SnapshotWriter {
        let mut bytes = Vec::with_capacity(1 << 20);
        bytes.extend_from_slice(&SNAPSHOT_MAGIC.to_le_bytes());
        bytes.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&0u16.to_le_bytes());
        bytes.extend_from_slice(&lsn.to_le_bytes());
        bytes.extend_from_slice(&ids_after_ms.to_le_bytes());
        bytes.extend_from_slice(&created_at_ms.to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes()); // account count, set by finish
        SnapshotWriter { bytes, accounts: 0 }
    }

    /// Sets the newest id timestamp (known only once every account is captured).
    pub fn set_ids_after_ms(&mut self, ms: u64) {
        self.bytes[16..24].copy_from_slice(&ms.to_le_bytes());
    }

    /// Adds one account.
    pub fn add(&mut self, parts: &AccountParts) {
        self.add_record(|out| encode_account(parts, out));
        self.accounts += 1;
    }

    fn add_record(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        let at = self.bytes.len();
        self.bytes.extend_from_slice(&0u32.to_le_bytes());
        encode(&mut self.bytes);
        let len = u32::try_from(self.bytes.len() - at - 4).unwrap_or(u32::MAX);
        self.bytes[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// The finished file: the transfers, the account count, the CRC-32 of everything before
    /// it, the end magic.
    pub fn finish<'a>(
        mut self,
        transfers: impl ExactSizeIterator<Item = &'a TransferRecord>,
    ) -> Vec<u8> {
        put_u64(&mut self.bytes, transfers.len() as u64);
        for record in transfers {
            self.add_record(|out| encode_transfer(record, out));
        }
        self.bytes[32..40].copy_from_slice(&self.accounts.to_le_bytes());
        let crc = crc32fast::hash(&self.bytes);
        self.bytes.extend_from_slice(&crc.to_le_bytes());
        self.bytes
            .extend_from_slice(&SNAPSHOT_END_MAGIC.to_le_bytes());
        self.bytes
    }
}

/// Writes a finished snapshot durably: a temporary name, sync, rename, sync of the directory.
pub fn write(
    storage: &dyn Storage,
    dir: &Path,
    lsn: u64,
    bytes: &[u8],
) -> Result<PathBuf, SnapshotError> {
    storage.create_dir_all(dir).map_err(|e| io_error(dir, e))?;
    let tmp = dir.join(format!("{lsn:020}{TMP_SUFFIX}"));
    let path = dir.join(file_name(lsn));
    // Left over by a crash during an earlier attempt.
    let _ = storage.remove(&tmp);
    let mut file = storage.create(&tmp).map_err(|e| io_error(&tmp, e))?;
    file.write_at(0, bytes).map_err(|e| io_error(&tmp, e))?;
    file.sync().map_err(|e| io_error(&tmp, e))?;
    drop(file);
    storage
        .rename(&tmp, &path)
        .map_err(|e| io_error(&path, e))?;
    storage.sync_dir(dir).map_err(|e| io_error(dir, e))?;
    Ok(path)
}

/// Reads and checks one snapshot file, decoding its accounts on `threads` threads.
pub fn read(storage: &dyn Storage, path: &Path, threads: usize) -> Result<Snapshot, SnapshotError> {
    let bytes = storage.read(path).map_err(|e| io_error(path, e))?;
    decode_with(&bytes, threads).map_err(|reason| SnapshotError::Corrupt {
        path: path.to_path_buf(),
        reason,
    })
}

/// Decodes a whole snapshot file.
pub fn decode(bytes: &[u8]) -> Result<Snapshot, String> {
    decode_with(bytes, 1)
}

/// [`decode`] on `threads` threads: the accounts, most of the file, are split in runs
/// decoded side by side (a cold start is mostly this). The result is the same.
pub fn decode_with(bytes: &[u8], threads: usize) -> Result<Snapshot, String> {
    if bytes.len() < SNAPSHOT_HEADER_BYTES + 8 {
        return Err("shorter than a header and a trailer".into());
    }
    let (body, trailer) = bytes.split_at(bytes.len() - 8);
    let mut t = Reader { bytes: trailer };
    let crc = t.u32().map_err(|e| e.to_string())?;
    let end = t.u32().map_err(|e| e.to_string())?;
    if end != SNAPSHOT_END_MAGIC {
        return Err("no end marker (cut short?)".into());
    }
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch".into());
    }
    let mut r = Reader { bytes: body };
    let field = |e: DecodeError| e.to_string();
    if r.u32().map_err(field)? != SNAPSHOT_MAGIC {
        return Err("not a snapshot (bad magic)".into());
    }
    let version = r.u16().map_err(field)?;
    if !(1..=SNAPSHOT_VERSION).contains(&version) {
        return Err(format!(
            "version {version}, this coffer reads 1..={SNAPSHOT_VERSION}"
        ));
    }
    let _reserved = r.u16().map_err(field)?;
    let lsn = r.u64().map_err(field)?;
    let ids_after_ms = r.u64().map_err(field)?;
    let created_at_ms = r.u64().map_err(field)?;
    let count = r.u64().map_err(field)?;
    // Each account is a length and its bytes: found first, decoded in parallel after.
    let mut payloads = Vec::with_capacity(usize::try_from(count.min(1 << 20)).unwrap_or(0));
    for _ in 0..count {
        let len = r.u32().map_err(field)? as usize;
        payloads.push(r.take(len).map_err(field)?);
    }
    let (accounts, mut currencies) = decode_accounts(version, &payloads, threads)?;
    let mut transfers = Vec::new();
    if version >= 2 {
        let count = r.u64().map_err(field)?;
        for index in 0..count {
            let len = r.u32().map_err(field)? as usize;
            let payload = r.take(len).map_err(field)?;
            let mut record =
                decode_transfer(payload).map_err(|e| format!("transfer {index}: {e}"))?;
            record.from_account.currency = currencies.share(record.from_account.currency);
            if let Some(to) = &mut record.to_account {
                to.currency = currencies.share(to.currency.clone());
            }
            transfers.push(record);
        }
    }
    if !r.bytes.is_empty() {
        return Err("bytes after the last record".into());
    }
    Ok(Snapshot {
        lsn,
        ids_after_ms,
        created_at_ms,
        accounts,
        transfers,
    })
}

// ---------------------------------------------------------------------------------------
// Accounts
// ---------------------------------------------------------------------------------------

/// Fewer accounts than this are decoded on the calling thread alone.
const PARALLEL_ACCOUNTS_MIN: usize = 4096;

/// Decodes the accounts of `payloads` (in order) on up to `threads` threads, each a
/// contiguous run; errors name the account by its index in the file, the first one first.
fn decode_accounts(
    version: u16,
    payloads: &[&[u8]],
    threads: usize,
) -> Result<(Vec<Account>, Currencies), String> {
    if threads <= 1 || payloads.len() < PARALLEL_ACCOUNTS_MIN {
        return decode_run(version, payloads, 0);
    }
    let run = payloads.len().div_ceil(threads);
    let runs = crate::parallel::run_all(
        payloads
            .chunks(run)
            .enumerate()
            .map(|(i, part)| move || decode_run(version, part, i * run))
            .collect(),
    );
    let mut accounts = Vec::with_capacity(payloads.len());
    let mut currencies = Currencies::default();
    for run in runs {
        let (mut decoded, shared) = run?;
        accounts.append(&mut decoded);
        for currency in shared.iter() {
            currencies.share(currency.clone());
        }
    }
    Ok((accounts, currencies))
}

/// Decodes a run of accounts, the first being account `first` of the file.
fn decode_run(
    version: u16,
    payloads: &[&[u8]],
    first: usize,
) -> Result<(Vec<Account>, Currencies), String> {
    let mut accounts = Vec::with_capacity(payloads.len());
    let mut currencies = Currencies::default();
    for (i, payload) in payloads.iter().enumerate() {
        let index = first + i;
        let mut parts =
            decode_account(version, payload).map_err(|e| format!("account {index}: {e}"))?;
        parts.currency = currencies.share(parts.currency);
        let account = Account::from_parts(parts).map_err(|e| format!("account {index}: {e}"))?;
        accounts.push(account);
    }
    Ok((accounts, currencies))
}

/// `balance - held`, which a snapshot does not store (it is derived). Saturating: the
/// values come from a file, and a corrupt one is refused by the account checks, not here.
fn available(balance: i64, held: u64) -> i64 {
    balance.saturating_sub(i64::try_from(held).unwrap_or(i64::MAX))
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_i64(out: &mut Vec<u8>, value: i64) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_i128(out: &mut Vec<u8>, value: i128) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_count(out: &mut Vec<u8>, count: usize) {
    put_u32(out, u32::try_from(count).unwrap_or(u32::MAX));
}

fn put_opt_uuid(out: &mut Vec<u8>, id: Option<Uuid>) {
    match id {
        None => out.push(0),
        Some(id) => {
            out.push(1);
            out.extend_from_slice(id.as_bytes());
        }
    }
}

fn kind_tag(kind: TxKind) -> u8 {
    match kind {
        TxKind::Credit => 1,
        TxKind::Debit => 2,
        TxKind::Hold => 3,
        TxKind::Capture => 4,
        TxKind::Release => 5,
        TxKind::Expire => 6,
        TxKind::TransferOut => 7,
        TxKind::TransferIn => 8,
    }
}

fn status_tag(status: HoldStatus) -> u8 {
    match status {
        HoldStatus::Open => 1,
        HoldStatus::Captured => 2,
        HoldStatus::Released => 3,
        HoldStatus::Expired => 4,
    }
}

/// Encodes one account (without the length prefix).
pub fn encode_account(parts: &AccountParts, out: &mut Vec<u8>) {
    put_str8(out, parts.id.as_str());
    put_str8(out, parts.currency.as_str());
    put_u64(out, parts.overdraft_limit);
    put_metadata(out, &parts.metadata);
    put_u64(out, parts.created_at_ms);
    put_i64(out, parts.balance);
    put_u64(out, parts.held);
    put_u64(out, parts.seq);
    put_u64(out, parts.last_lsn);
    // The totals are kept modulo 2^64 (i64, wrapping) and stored sign-extended to the
    // format's i128 fields.
    put_i128(out, i128::from(parts.total_in));
    put_i128(out, i128::from(parts.total_out));
    put_i128(out, i128::from(parts.transfers_net));
    put_count(out, parts.holds.len());
    for hold in &parts.holds {
        encode_hold(hold, out);
    }
    put_count(out, parts.ended_holds.len());
    for (at, id) in &parts.ended_holds {
        put_u64(out, *at);
        out.extend_from_slice(id.as_bytes());
    }
    put_count(out, parts.history.len());
    for tx in &parts.history {
        encode_tx(tx, out);
    }
    put_count(out, parts.keys.len());
    for (key, entry) in &parts.keys {
        put_str8(out, key.as_str());
        put_u64(out, entry.lsn);
        put_u64(out, entry.created_at_ms);
        encode_request(&entry.request, out);
        let receipt = &entry.receipt;
        encode_tx(&receipt.transaction, out);
        put_i64(out, receipt.account.balance);
        put_u64(out, receipt.account.held);
        put_u32(out, receipt.account.open_holds);
        put_u64(out, receipt.account.seq);
        match &receipt.hold {
            None => out.push(0),
            Some(hold) => {
                out.push(1);
                encode_hold(hold, out);
            }
        }
    }
}

fn encode_hold(hold: &Hold, out: &mut Vec<u8>) {
    out.extend_from_slice(hold.id.as_bytes());
    put_u64(out, hold.amount.get());
    put_u64(out, hold.captured);
    out.push(status_tag(hold.status));
    put_u64(out, hold.created_at_ms);
    put_u64(out, hold.expires_at_ms);
    put_metadata(out, &hold.metadata);
}

fn encode_tx(tx: &Transaction, out: &mut Vec<u8>) {
    out.extend_from_slice(tx.id.as_bytes());
    put_u64(out, tx.seq);
    out.push(kind_tag(tx.kind));
    put_u64(out, tx.amount);
    put_opt_uuid(out, tx.hold_id);
    put_opt_uuid(out, tx.transfer_id);
    put_i64(out, tx.balance);
    put_u64(out, tx.held);
    put_u64(out, tx.created_at_ms);
    put_metadata(out, &tx.metadata);
}

fn encode_request(request: &Request, out: &mut Vec<u8>) {
    match request {
        Request::Credit { amount, metadata } => {
            out.push(1);
            put_i128(out, *amount);
            put_pairs(out, metadata.len(), metadata.iter());
        }
        Request::Debit { amount, metadata } => {
            out.push(2);
            put_i128(out, *amount);
            put_pairs(out, metadata.len(), metadata.iter());
        }
        Request::Hold {
            amount,
            expires_in_secs,
            metadata,
        } => {
            out.push(3);
            put_i128(out, *amount);
            match expires_in_secs {
                None => out.push(0),
                Some(secs) => {
                    out.push(1);
                    put_i128(out, *secs);
                }
            }
            put_pairs(out, metadata.len(), metadata.iter());
        }
        Request::Capture {
            hold_id,
            amount,
            metadata,
        } => {
            out.push(4);
            out.extend_from_slice(hold_id.as_bytes());
            match amount {
                None => out.push(0),
                Some(amount) => {
                    out.push(1);
                    put_i128(out, *amount);
                }
            }
            put_pairs(out, metadata.len(), metadata.iter());
        }
        Request::Release { hold_id, metadata } => {
            out.push(5);
            out.extend_from_slice(hold_id.as_bytes());
            put_pairs(out, metadata.len(), metadata.iter());
        }
        Request::Transfer {
            to,
            amount,
            metadata,
        } => {
            out.push(6);
            put_str8(out, to.as_str());
            put_i128(out, *amount);
            put_pairs(out, metadata.len(), metadata.iter());
        }
    }
}

fn encode_view(view: &AccountView, out: &mut Vec<u8>) {
    put_str8(out, view.id.as_str());
    put_str8(out, view.currency.as_str());
    put_i64(out, view.balance);
    put_u64(out, view.held);
    put_u64(out, view.overdraft_limit);
    put_u32(out, view.open_holds);
    put_u64(out, view.seq);
    put_u64(out, view.created_at_ms);
    put_metadata(out, &view.metadata);
}

fn decode_view(r: &mut Reader<'_>) -> Result<AccountView, DecodeError> {
    let id = AccountId::parse(r.str8()?).map_err(|_| bad("account id"))?;
    let currency = Currency::parse(r.str8()?).map_err(|_| bad("currency"))?;
    let balance = r.i64()?;
    let held = r.u64()?;
    Ok(AccountView {
        id,
        currency,
        balance,
        held,
        available: available(balance, held),
        overdraft_limit: r.u64()?,
        open_holds: r.u32()?,
        seq: r.u64()?,
        created_at_ms: r.u64()?,
        metadata: r.metadata()?,
    })
}

/// Encodes one transfer record (without the length prefix).
pub fn encode_transfer(record: &TransferRecord, out: &mut Vec<u8>) {
    out.extend_from_slice(record.id.as_bytes());
    put_str8(out, record.from.as_str());
    put_str8(out, record.to.as_str());
    put_u64(out, record.amount.get());
    match record.status {
        TransferStatus::Pending => out.extend_from_slice(&[1, 0]),
        TransferStatus::Completed => out.extend_from_slice(&[2, 0]),
        TransferStatus::Failed(failure) => out.extend_from_slice(&[3, failure.tag()]),
    }
    put_u64(out, record.created_at_ms);
    put_metadata(out, &record.metadata);
    match &record.key {
        None => out.push(0),
        Some(key) => {
            out.push(1);
            put_str8(out, key.as_str());
        }
    }
    encode_view(&record.from_account, out);
    match &record.to_account {
        None => out.push(0),
        Some(view) => {
            out.push(1);
            encode_view(view, out);
        }
    }
    put_u64(out, record.out_lsn);
    put_u64(out, record.end_lsn);
    put_u64(out, record.ended_at_ms);
}

/// Decodes one transfer record.
pub fn decode_transfer(payload: &[u8]) -> Result<TransferRecord, DecodeError> {
    let mut r = Reader { bytes: payload };
    let id = r.uuid()?;
    let from = AccountId::parse(r.str8()?).map_err(|_| bad("account id"))?;
    let to = AccountId::parse(r.str8()?).map_err(|_| bad("account id"))?;
    let amount = r.amount()?;
    let status = match (r.u8()?, r.u8()?) {
        (1, 0) => TransferStatus::Pending,
        (2, 0) => TransferStatus::Completed,
        (3, tag) => {
            TransferStatus::Failed(TransferFailure::from_tag(tag).ok_or(bad("transfer failure"))?)
        }
        _ => return Err(bad("transfer status")),
    };
    let created_at_ms = r.u64()?;
    let metadata = r.metadata()?;
    let key = if r.flag()? {
        Some(IdempotencyKey::parse(r.str8()?).map_err(|_| bad("idempotency key"))?)
    } else {
        None
    };
    let from_account = decode_view(&mut r)?;
    let to_account = if r.flag()? {
        Some(decode_view(&mut r)?)
    } else {
        None
    };
    let record = TransferRecord {
        id,
        from,
        to,
        amount,
        status,
        created_at_ms,
        metadata,
        key,
        from_account,
        to_account,
        out_lsn: r.u64()?,
        end_lsn: r.u64()?,
        ended_at_ms: r.u64()?,
    };
    if !r.bytes.is_empty() {
        return Err(bad("trailing bytes"));
    }
    Ok(record)
}

fn decode_kind(tag: u8) -> Result<TxKind, DecodeError> {
    Ok(match tag {
        1 => TxKind::Credit,
        2 => TxKind::Debit,
        3 => TxKind::Hold,
        4 => TxKind::Capture,
        5 => TxKind::Release,
        6 => TxKind::Expire,
        7 => TxKind::TransferOut,
        8 => TxKind::TransferIn,
        _ => return Err(bad("transaction kind")),
    })
}

fn decode_status(tag: u8) -> Result<HoldStatus, DecodeError> {
    Ok(match tag {
        1 => HoldStatus::Open,
        2 => HoldStatus::Captured,
        3 => HoldStatus::Released,
        4 => HoldStatus::Expired,
        _ => return Err(bad("hold status")),
    })
}

/// Decodes one account's parts, as written by snapshot format `version`.
pub fn decode_account(version: u16, payload: &[u8]) -> Result<AccountParts, DecodeError> {
    let mut r = Reader { bytes: payload };
    let id = AccountId::parse(r.str8()?).map_err(|_| bad("account id"))?;
    let currency = Currency::parse(r.str8()?).map_err(|_| bad("currency"))?;
    let overdraft_limit = r.u64()?;
    let metadata = r.metadata()?;
    let created_at_ms = r.u64()?;
    let balance = r.i64()?;
    let held = r.u64()?;
    let seq = r.u64()?;
    let last_lsn = r.u64()?;
    let total_in = r.i128()?;
    let total_out = r.i128()?;
    // Version 1 had no transfers.
    let transfers_net = if version >= 2 { r.i128()? } else { 0 };
    let view = AccountView {
        id: id.clone(),
        currency: currency.clone(),
        balance: 0,
        held: 0,
        available: 0,
        overdraft_limit,
        open_holds: 0,
        seq: 0,
        created_at_ms,
        metadata: metadata.clone(),
    };
    let mut holds = Vec::new();
    for _ in 0..r.count()? {
        holds.push(decode_hold(&mut r, &id)?);
    }
    let mut ended_holds = Vec::new();
    for _ in 0..r.count()? {
        ended_holds.push((r.u64()?, r.uuid()?));
    }
    let mut history = Vec::new();
    for _ in 0..r.count()? {
        history.push(decode_tx(&mut r, &id)?);
    }
    let mut keys = Vec::new();
    for _ in 0..r.count()? {
        let key = IdempotencyKey::parse(r.str8()?).map_err(|_| bad("idempotency key"))?;
        let lsn = r.u64()?;
        let created_at_ms = r.u64()?;
        let request = decode_request(&mut r)?;
        let transaction = decode_tx(&mut r, &id)?;
        let balance = r.i64()?;
        let held = r.u64()?;
        let open_holds = r.u32()?;
        let seq = r.u64()?;
        let hold = if r.flag()? {
            Some(decode_hold(&mut r, &id)?)
        } else {
            None
        };
        let account = AccountView {
            balance,
            held,
            available: available(balance, held),
            open_holds,
            seq,
            ..view.clone()
        };
        let receipt = std::sync::Arc::new(Receipt {
            transaction,
            account,
            hold,
        });
        keys.push((
            key,
            IdempotencyEntry {
                request,
                receipt,
                lsn,
                created_at_ms,
            },
        ));
    }
    if !r.bytes.is_empty() {
        return Err(bad("trailing bytes"));
    }
    Ok(AccountParts {
        id,
        currency,
        overdraft_limit,
        metadata,
        created_at_ms,
        balance,
        held,
        seq,
        last_lsn,
        holds,
        ended_holds,
        history,
        keys,
        // Modulo 2^64, as accounts keep them (the truncating cast is exactly that).
        total_in: total_in as i64,
        total_out: total_out as i64,
        transfers_net: transfers_net as i64,
    })
}

fn decode_hold(r: &mut Reader<'_>, account: &AccountId) -> Result<Hold, DecodeError> {
    Ok(Hold {
        id: r.uuid()?,
        account_id: account.clone(),
        amount: r.amount()?,
        captured: r.u64()?,
        status: decode_status(r.u8()?)?,
        created_at_ms: r.u64()?,
        expires_at_ms: r.u64()?,
        metadata: r.metadata()?,
    })
}

fn decode_tx(r: &mut Reader<'_>, account: &AccountId) -> Result<Transaction, DecodeError> {
    let id = r.uuid()?;
    let seq = r.u64()?;
    let kind = decode_kind(r.u8()?)?;
    let amount = r.u64()?;
    let hold_id = r.opt_uuid()?;
    let transfer_id = r.opt_uuid()?;
    let balance = r.i64()?;
    let held = r.u64()?;
    let created_at_ms = r.u64()?;
    let metadata = r.metadata()?;
    Ok(Transaction {
        id,
        account_id: account.clone(),
        seq,
        kind,
        amount,
        hold_id,
        transfer_id,
        balance,
        held,
        available: available(balance, held),
        created_at_ms,
        metadata,
    })
}

fn decode_request(r: &mut Reader<'_>) -> Result<Request, DecodeError> {
    Ok(match r.u8()? {
        1 => Request::Credit {
            amount: r.i128()?,
            metadata: r.map()?,
        },
        2 => Request::Debit {
            amount: r.i128()?,
            metadata: r.map()?,
        },
        3 => Request::Hold {
            amount: r.i128()?,
            expires_in_secs: if r.flag()? { Some(r.i128()?) } else { None },
            metadata: r.map()?,
        },
        4 => Request::Capture {
            hold_id: r.uuid()?,
            amount: if r.flag()? { Some(r.i128()?) } else { None },
            metadata: r.map()?,
        },
        5 => Request::Release {
            hold_id: r.uuid()?,
            metadata: r.map()?,
        },
        6 => Request::Transfer {
            to: AccountId::parse(r.str8()?).map_err(|_| bad("account id"))?,
            amount: r.i128()?,
            metadata: r.map()?,
        },
        _ => return Err(bad("request tag")),
    })
}
