//! The WAL's bytes: the record frame and the event payload, both hand-written little-endian
//! fields (see `docs/wal-format.md`). Nothing here depends on a serde library's choices.
//!
//! Frame (24-byte header, then the payload):
//!
//! ```text
//! offset size field
//!      0    4 magic      = 0x5746_4643 ("CFFW" as little-endian bytes)
//!      4    2 version    = 3 (format of frame and payload; 1 and 2 are read too)
//!      6    1 kind       = 1 (event)
//!      7    1 pad        = 0
//!      8    4 len        payload length in bytes, 1..=RECORD_PAYLOAD_BYTES_MAX
//!     12    8 lsn        log sequence number, 1, 2, 3, ... with no gap
//!     20    4 crc32      CRC-32 (IEEE) of header bytes 0..20 followed by the payload
//!     24  len payload
//! ```
//!
//! Event payload, version 3 (version 2 is the same without the outcome after the tag,
//! version 1 also without tags 8..=10):
//!
//! ```text
//! u8 id_len, id bytes          account id
//! u64 seq                      the account's seq after the event (0 for opened)
//! u64 at_ms                    unix milliseconds
//! [16] tx_id                   UUID bytes (nil for opened)
//! u8 has_key, [u8 len, bytes]  idempotency key, when has_key = 1
//! u8 tag                       what happened, then (version 3) the outcome:
//!   u8 has_outcome             1 if the transaction's figures follow (always for what coffer
//!                              writes, except opened: 0)
//!   [u64 amount]               only for release and expire: the hold's amount
//!   i64 balance, u64 held      the account's balance and held just after the event
//! fields                       the body, by tag:
//!   1 opened   u8 len + currency, u64 overdraft_limit, metadata
//!   2 credit   u64 amount, metadata
//!   3 debit    u64 amount, metadata
//!   4 hold     [16] hold_id, u64 amount, u64 expires_at_ms, u32 expires_in_secs (0 = not given), metadata
//!   5 capture  [16] hold_id, u64 amount, u8 amount_given, metadata
//!   6 release  [16] hold_id, metadata
//!   7 expire   [16] hold_id
//!   8 transfer_out     [16] transfer_id, u8 len + to account id, u64 amount, metadata
//!   9 transfer_in      [16] transfer_id, u8 len + from account id, u64 amount, metadata
//!  10 transfer_refund  [16] transfer_id, u8 len + to account id, u64 amount, u8 failure
//!                      (1 account_not_found, 2 currency_mismatch, 3 balance_limit_exceeded)
//! metadata = u8 count, then count x (u16 key_len, key, u16 value_len, value), UTF-8
//! ```

use std::collections::BTreeMap;

use uuid::Uuid;

use crate::domain::{
    AccountId, Amount, Currency, Event, EventBody, IdempotencyKey, Metadata, Outcome,
    TransferFailure,
};

/// Frame magic, "CFFW" as little-endian bytes.
pub const FRAME_MAGIC: u32 = 0x5746_4643;
/// Current frame and payload version: what this coffer writes. Version 3 added the
/// transaction's outcome (amount, balance and held after) at the end of the payload.
pub const FRAME_VERSION: u16 = 3;
/// The first version whose records carry their outcome (what the event stream shows).
pub const FRAME_VERSION_OUTCOME: u16 = 3;
/// Oldest version this coffer reads. Version 1 has no transfer events (tags 8..=10).
pub const FRAME_VERSION_MIN: u16 = 1;
/// Record kind of an event.
pub const RECORD_KIND_EVENT: u8 = 1;
/// Size of the frame header.
pub const FRAME_HEADER_BYTES: usize = 24;
/// Offset of the CRC field: the CRC covers the header bytes before it.
const FRAME_CRC_OFFSET: usize = 20;
/// The largest payload a frame may carry. The largest event (128-byte id, 255-byte key,
/// 16 metadata entries of 40 + 500 four-byte characters) is about 35 KiB.
pub const RECORD_PAYLOAD_BYTES_MAX: usize = 64 * 1024;

const _: () = assert!(FRAME_HEADER_BYTES == 4 + 2 + 1 + 1 + 4 + 8 + 4);
const _: () = assert!(FRAME_CRC_OFFSET + 4 == FRAME_HEADER_BYTES);

const TAG_OPENED: u8 = 1;
const TAG_CREDIT: u8 = 2;
const TAG_DEBIT: u8 = 3;
const TAG_HOLD: u8 = 4;
const TAG_CAPTURE: u8 = 5;
const TAG_RELEASE: u8 = 6;
const TAG_EXPIRE: u8 = 7;
const TAG_TRANSFER_OUT: u8 = 8;
const TAG_TRANSFER_IN: u8 = 9;
const TAG_TRANSFER_REFUND: u8 = 10;

/// Why bytes are not a valid frame or payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the frame needs: a torn write if at the tail.
    #[error("incomplete record")]
    Incomplete,
    /// The bytes are not a frame of this format.
    #[error("bad frame: {0}")]
    BadFrame(&'static str),
    /// The checksum does not match.
    #[error("checksum mismatch")]
    Checksum,
    /// An intact frame of a version or kind this coffer does not know (a newer writer).
    #[error("intact record of an unsupported version or kind (written by a newer coffer?)")]
    Unsupported,
    /// The checksum matches but the payload is not a valid event.
    #[error("bad payload: {0}")]
    BadPayload(&'static str),
}

/// One decoded frame: its LSN and payload.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Format version it was written in.
    pub version: u16,
    /// Log sequence number.
    pub lsn: u64,
    /// The payload bytes.
    pub payload: &'a [u8],
}

/// Appends one frame with the given LSN and payload to `out`, in the current version.
pub fn encode_frame(lsn: u64, payload: &[u8], out: &mut Vec<u8>) {
    encode_frame_version(lsn, FRAME_VERSION, payload, out);
}

/// [`encode_frame`] in another version, for tests and tools that write an older log (the
/// payload must then be of that version: see [`encode_event_version`]).
pub fn encode_frame_version(lsn: u64, version: u16, payload: &[u8], out: &mut Vec<u8>) {
    assert!(!payload.is_empty(), "empty payload");
    assert!(
        payload.len() <= RECORD_PAYLOAD_BYTES_MAX,
        "payload too large"
    );
    let start = out.len();
    out.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
    out.extend_from_slice(&version.to_le_bytes());
    out.push(RECORD_KIND_EVENT);
    out.push(0);
    // Exact: the length is at most RECORD_PAYLOAD_BYTES_MAX, asserted above.
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&lsn.to_le_bytes());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&out[start..start + FRAME_CRC_OFFSET]);
    hasher.update(payload);
    out.extend_from_slice(&hasher.finalize().to_le_bytes());
    out.extend_from_slice(payload);
}

/// Decodes the frame at the start of `bytes`; returns it and its total size.
pub fn decode_frame(bytes: &[u8]) -> Result<(Frame<'_>, usize), DecodeError> {
    if bytes.len() < FRAME_HEADER_BYTES {
        return Err(DecodeError::Incomplete);
    }
    let header = &bytes[..FRAME_HEADER_BYTES];
    if le_u32(&header[0..4]) != FRAME_MAGIC {
        return Err(DecodeError::BadFrame("bad magic"));
    }
    let len = le_u32(&header[8..12]) as usize;
    if len == 0 || len > RECORD_PAYLOAD_BYTES_MAX {
        return Err(DecodeError::BadFrame("payload length out of range"));
    }
    let total = FRAME_HEADER_BYTES + len;
    if bytes.len() < total {
        return Err(DecodeError::Incomplete);
    }
    let payload = &bytes[FRAME_HEADER_BYTES..total];
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[..FRAME_CRC_OFFSET]);
    hasher.update(payload);
    if hasher.finalize() != le_u32(&header[FRAME_CRC_OFFSET..FRAME_HEADER_BYTES]) {
        return Err(DecodeError::Checksum);
    }
    // Checked after the CRC: a frame that is intact but of another version was written by
    // another coffer on purpose, and must stop recovery rather than be cut as torn.
    let version = le_u16(&header[4..6]);
    if !(FRAME_VERSION_MIN..=FRAME_VERSION).contains(&version)
        || header[6] != RECORD_KIND_EVENT
        || header[7] != 0
    {
        return Err(DecodeError::Unsupported);
    }
    let lsn = le_u64(&header[12..20]);
    Ok((
        Frame {
            version,
            lsn,
            payload,
        },
        total,
    ))
}

/// Decodes the event of a frame by the frame's version: a version 1 record cannot hold a
/// transfer event, which came with version 2.
pub fn decode_frame_event(frame: &Frame<'_>) -> Result<Event, DecodeError> {
    decode_frame_event_with(frame, |_| None)
}

/// The account id a payload starts with (a u8 length, then the bytes), read without
/// decoding the rest: for routing a record before it is decoded. Empty if the payload is
/// too short for it (decoding it then fails).
pub fn payload_account_id(payload: &[u8]) -> &[u8] {
    payload
        .split_first()
        .and_then(|(len, rest)| rest.get(..usize::from(*len)))
        .unwrap_or(&[])
}

/// [`decode_frame_event`] that takes the account id from `known` when it has it (replay
/// passes the ids of the accounts it holds), instead of a new copy of the id for every
/// record: an allocation and a free per event, a fair part of replay's time. `known` is
/// shown the record's id; what it returns is used only if equal to it (the decoder
/// compares), else the id is parsed from the record as usual.
pub fn decode_frame_event_with(
    frame: &Frame<'_>,
    known: impl FnOnce(&str) -> Option<AccountId>,
) -> Result<Event, DecodeError> {
    let event = decode_event_with(frame.version, frame.lsn, frame.payload, known)?;
    let transfer = matches!(
        event.body,
        EventBody::TransferOut { .. }
            | EventBody::TransferIn { .. }
            | EventBody::TransferRefund { .. }
    );
    if frame.version < 2 && transfer {
        return Err(bad("a transfer event in a version 1 record"));
    }
    Ok(event)
}

/// Encodes an event's payload in the current version (everything but the LSN, which the
/// frame carries).
pub fn encode_event(event: &Event, out: &mut Vec<u8>) {
    encode_event_version(event, FRAME_VERSION, out);
}

/// Encodes an event's payload in `version` (1..=3); versions before 3 leave the outcome out.
pub fn encode_event_version(event: &Event, version: u16, out: &mut Vec<u8>) {
    encode_body(event, version, out);
}

/// The outcome, right after the tag byte in version 3 (nothing before): the record then
/// still ends with the fields of its tag, as in version 2.
fn put_outcome(event: &Event, version: u16, out: &mut Vec<u8>) {
    if version < FRAME_VERSION_OUTCOME {
        return;
    }
    match (&event.outcome, &event.body) {
        (None, _) => out.push(0),
        (Some(_), EventBody::Opened { .. }) => panic!("an opened event has no outcome"),
        (Some(outcome), body) => {
            out.push(1);
            if matches!(body, EventBody::Release { .. } | EventBody::Expire { .. }) {
                out.extend_from_slice(&outcome.amount.to_le_bytes());
            }
            out.extend_from_slice(&outcome.balance.to_le_bytes());
            out.extend_from_slice(&outcome.held.to_le_bytes());
        }
    }
}

fn encode_body(event: &Event, version: u16, out: &mut Vec<u8>) {
    put_str8(out, event.account.as_str());
    out.extend_from_slice(&event.seq.to_le_bytes());
    out.extend_from_slice(&event.at_ms.to_le_bytes());
    out.extend_from_slice(event.tx_id.as_bytes());
    match &event.idempotency_key {
        None => out.push(0),
        Some(key) => {
            out.push(1);
            put_str8(out, key.as_str());
        }
    }
    match &event.body {
        EventBody::Opened {
            currency,
            overdraft_limit,
            metadata,
        } => {
            out.push(TAG_OPENED);
            put_outcome(event, version, out);
            put_str8(out, currency.as_str());
            out.extend_from_slice(&overdraft_limit.to_le_bytes());
            put_metadata(out, metadata);
        }
        EventBody::Credit { amount, metadata } => {
            out.push(TAG_CREDIT);
            put_outcome(event, version, out);
            out.extend_from_slice(&amount.get().to_le_bytes());
            put_metadata(out, metadata);
        }
        EventBody::Debit { amount, metadata } => {
            out.push(TAG_DEBIT);
            put_outcome(event, version, out);
            out.extend_from_slice(&amount.get().to_le_bytes());
            put_metadata(out, metadata);
        }
        EventBody::Hold {
            hold_id,
            amount,
            expires_at_ms,
            expires_in_secs,
            metadata,
        } => {
            out.push(TAG_HOLD);
            put_outcome(event, version, out);
            out.extend_from_slice(hold_id.as_bytes());
            out.extend_from_slice(&amount.get().to_le_bytes());
            out.extend_from_slice(&expires_at_ms.to_le_bytes());
            out.extend_from_slice(&expires_in_secs.unwrap_or(0).to_le_bytes());
            put_metadata(out, metadata);
        }
        EventBody::Capture {
            hold_id,
            amount,
            amount_given,
            metadata,
        } => {
            out.push(TAG_CAPTURE);
            put_outcome(event, version, out);
            out.extend_from_slice(hold_id.as_bytes());
            out.extend_from_slice(&amount.get().to_le_bytes());
            out.push(u8::from(*amount_given));
            put_metadata(out, metadata);
        }
        EventBody::Release { hold_id, metadata } => {
            out.push(TAG_RELEASE);
            put_outcome(event, version, out);
            out.extend_from_slice(hold_id.as_bytes());
            put_metadata(out, metadata);
        }
        EventBody::Expire { hold_id } => {
            out.push(TAG_EXPIRE);
            put_outcome(event, version, out);
            out.extend_from_slice(hold_id.as_bytes());
        }
        EventBody::TransferOut {
            transfer_id,
            to,
            amount,
            metadata,
        } => {
            out.push(TAG_TRANSFER_OUT);
            put_outcome(event, version, out);
            out.extend_from_slice(transfer_id.as_bytes());
            put_str8(out, to.as_str());
            out.extend_from_slice(&amount.get().to_le_bytes());
            put_metadata(out, metadata);
        }
        EventBody::TransferIn {
            transfer_id,
            from,
            amount,
            metadata,
        } => {
            out.push(TAG_TRANSFER_IN);
            put_outcome(event, version, out);
            out.extend_from_slice(transfer_id.as_bytes());
            put_str8(out, from.as_str());
            out.extend_from_slice(&amount.get().to_le_bytes());
            put_metadata(out, metadata);
        }
        EventBody::TransferRefund {
            transfer_id,
            to,
            amount,
            failure,
        } => {
            out.push(TAG_TRANSFER_REFUND);
            put_outcome(event, version, out);
            out.extend_from_slice(transfer_id.as_bytes());
            put_str8(out, to.as_str());
            out.extend_from_slice(&amount.get().to_le_bytes());
            out.push(failure.tag());
        }
    }
}

/// Decodes an event payload of the current version; `lsn` comes from its frame. Every value
/// is validated as on the request path, so a decoded event satisfies the same type
/// invariants.
pub fn decode_event(lsn: u64, payload: &[u8]) -> Result<Event, DecodeError> {
    decode_event_version(FRAME_VERSION, lsn, payload)
}

/// [`decode_event`] for a payload of `version` (older ones have no outcome).
pub fn decode_event_version(version: u16, lsn: u64, payload: &[u8]) -> Result<Event, DecodeError> {
    decode_event_with(version, lsn, payload, |_| None)
}

/// [`decode_event_version`], taking the account id from `known` when it has one equal to
/// the record's (an id already known is valid).
fn decode_event_with(
    version: u16,
    lsn: u64,
    payload: &[u8],
    known: impl FnOnce(&str) -> Option<AccountId>,
) -> Result<Event, DecodeError> {
    let mut r = Reader { bytes: payload };
    let text = r.str8()?;
    let account = match known(text) {
        Some(id) if id.as_str() == text => id,
        _ => AccountId::parse(text).map_err(|_| bad("account id"))?,
    };
    let seq = r.u64()?;
    let at_ms = r.u64()?;
    let tx_id = r.uuid()?;
    let idempotency_key = match r.u8()? {
        0 => None,
        1 => Some(IdempotencyKey::parse(r.str8()?).map_err(|_| bad("idempotency key"))?),
        _ => return Err(bad("key flag")),
    };
    let tag = r.u8()?;
    let recorded = if version >= FRAME_VERSION_OUTCOME {
        read_outcome(&mut r, tag)?
    } else {
        None
    };
    let body = match tag {
        TAG_OPENED => EventBody::Opened {
            currency: Currency::parse(r.str8()?).map_err(|_| bad("currency"))?,
            overdraft_limit: r.u64()?,
            metadata: r.metadata()?,
        },
        TAG_CREDIT => EventBody::Credit {
            amount: r.amount()?,
            metadata: r.metadata()?,
        },
        TAG_DEBIT => EventBody::Debit {
            amount: r.amount()?,
            metadata: r.metadata()?,
        },
        TAG_HOLD => EventBody::Hold {
            hold_id: r.uuid()?,
            amount: r.amount()?,
            expires_at_ms: r.u64()?,
            expires_in_secs: match r.u32()? {
                0 => None,
                secs => Some(secs),
            },
            metadata: r.metadata()?,
        },
        TAG_CAPTURE => EventBody::Capture {
            hold_id: r.uuid()?,
            amount: r.amount()?,
            amount_given: match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(bad("amount_given flag")),
            },
            metadata: r.metadata()?,
        },
        TAG_RELEASE => EventBody::Release {
            hold_id: r.uuid()?,
            metadata: r.metadata()?,
        },
        TAG_EXPIRE => EventBody::Expire { hold_id: r.uuid()? },
        TAG_TRANSFER_OUT => EventBody::TransferOut {
            transfer_id: r.uuid()?,
            to: AccountId::parse(r.str8()?).map_err(|_| bad("account id"))?,
            amount: r.amount()?,
            metadata: r.metadata()?,
        },
        TAG_TRANSFER_IN => EventBody::TransferIn {
            transfer_id: r.uuid()?,
            from: AccountId::parse(r.str8()?).map_err(|_| bad("account id"))?,
            amount: r.amount()?,
            metadata: r.metadata()?,
        },
        TAG_TRANSFER_REFUND => EventBody::TransferRefund {
            transfer_id: r.uuid()?,
            to: AccountId::parse(r.str8()?).map_err(|_| bad("account id"))?,
            amount: r.amount()?,
            failure: TransferFailure::from_tag(r.u8()?).ok_or(bad("transfer failure"))?,
        },
        _ => return Err(bad("unknown event tag")),
    };
    let outcome = match recorded {
        None => None,
        Some(raw) => Some(finish_outcome(raw, &body)?),
    };
    if !r.bytes.is_empty() {
        return Err(bad("trailing bytes"));
    }
    Ok(Event {
        lsn,
        account,
        seq,
        at_ms,
        tx_id,
        idempotency_key,
        body,
        outcome,
    })
}

/// The outcome of a version 3 payload as stored after the tag byte: the amount (release
/// and expire only), balance and held, if the flag says one is there.
type RawOutcome = (Option<u64>, i64, u64);

fn read_outcome(r: &mut Reader<'_>, tag: u8) -> Result<Option<RawOutcome>, DecodeError> {
    if !r.flag()? {
        return Ok(None);
    }
    let amount = match tag {
        TAG_OPENED => return Err(bad("an opened event with an outcome")),
        TAG_RELEASE | TAG_EXPIRE => Some(r.amount()?.get()),
        _ => None,
    };
    let balance = r.i64()?;
    let held = r.u64()?;
    Ok(Some((amount, balance, held)))
}

/// The outcome of a decoded body, checked for what can be checked without the account: the
/// amount is the body's where it has one, and the balances are in range.
fn finish_outcome(raw: RawOutcome, body: &EventBody) -> Result<Outcome, DecodeError> {
    let (stored, balance, held) = raw;
    let amount = match body {
        EventBody::Opened { .. } => return Err(bad("an opened event with an outcome")),
        EventBody::Release { .. } | EventBody::Expire { .. } => {
            stored.ok_or(bad("release or expire without its amount"))?
        }
        EventBody::Credit { amount, .. }
        | EventBody::Debit { amount, .. }
        | EventBody::Hold { amount, .. }
        | EventBody::Capture { amount, .. }
        | EventBody::TransferOut { amount, .. }
        | EventBody::TransferIn { amount, .. }
        | EventBody::TransferRefund { amount, .. } => amount.get(),
    };
    // Exact: AMOUNT_MAX < i64::MAX.
    if balance > crate::domain::AMOUNT_MAX as i64 || balance.checked_sub_unsigned(held).is_none() {
        return Err(bad("outcome out of range"));
    }
    Ok(Outcome {
        amount,
        balance,
        held,
    })
}

pub(crate) fn bad(what: &'static str) -> DecodeError {
    DecodeError::BadPayload(what)
}

pub(crate) fn put_str8(out: &mut Vec<u8>, text: &str) {
    // Callers pass ids, keys and currencies, all at most 255 bytes by their types.
    let len = u8::try_from(text.len()).expect("short strings are at most 255 bytes by type");
    out.push(len);
    out.extend_from_slice(text.as_bytes());
}

pub(crate) fn put_str16(out: &mut Vec<u8>, text: &str) {
    // Metadata keys and values are at most 500 characters (2,000 bytes) by type.
    let len = u16::try_from(text.len()).expect("metadata strings are at most 2,000 bytes");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

pub(crate) fn put_metadata(out: &mut Vec<u8>, metadata: &Metadata) {
    put_pairs(out, metadata.len(), metadata.iter());
}

/// Metadata-shaped pairs: a `u8` count, then each key and value as `str16`. Callers pass
/// validated metadata (at most 16 keys): of an event, or of a request that succeeded.
pub(crate) fn put_pairs<'a>(
    out: &mut Vec<u8>,
    len: usize,
    pairs: impl Iterator<Item = (&'a String, &'a String)>,
) {
    let count = u8::try_from(len).expect("metadata has at most 16 keys by validation");
    out.push(count);
    for (key, value) in pairs {
        put_str16(out, key);
        put_str16(out, value);
    }
}

fn le_u16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// A bounds-checked cursor over a payload.
pub(crate) struct Reader<'a> {
    pub(crate) bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(bad("truncated payload"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(le_u16(self.take(2)?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(le_u32(self.take(4)?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(le_u64(self.take(8)?))
    }
    pub(crate) fn uuid(&mut self) -> Result<Uuid, DecodeError> {
        let mut a = [0u8; 16];
        a.copy_from_slice(self.take(16)?);
        Ok(Uuid::from_bytes(a))
    }
    pub(crate) fn amount(&mut self) -> Result<Amount, DecodeError> {
        Amount::new(i128::from(self.u64()?)).map_err(|_| bad("amount out of range"))
    }
    pub(crate) fn str8(&mut self) -> Result<&'a str, DecodeError> {
        let len = usize::from(self.u8()?);
        std::str::from_utf8(self.take(len)?).map_err(|_| bad("string is not UTF-8"))
    }
    pub(crate) fn str16(&mut self) -> Result<String, DecodeError> {
        let len = usize::from(self.u16()?);
        let text = std::str::from_utf8(self.take(len)?).map_err(|_| bad("string is not UTF-8"))?;
        Ok(text.to_string())
    }
    pub(crate) fn metadata(&mut self) -> Result<Metadata, DecodeError> {
        Metadata::new(self.map()?).map_err(|_| bad("metadata out of limits"))
    }
    /// Metadata-shaped pairs (see `put_pairs`), not yet checked against the limits.
    pub(crate) fn map(&mut self) -> Result<BTreeMap<String, String>, DecodeError> {
        let count = self.u8()?;
        let mut map = BTreeMap::new();
        for _ in 0..count {
            let key = self.str16()?;
            let value = self.str16()?;
            if map.insert(key, value).is_some() {
                return Err(bad("duplicate metadata key"));
            }
        }
        Ok(map)
    }
    pub(crate) fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(self.u64()? as i64)
    }
    pub(crate) fn i128(&mut self) -> Result<i128, DecodeError> {
        let mut a = [0u8; 16];
        a.copy_from_slice(self.take(16)?);
        Ok(i128::from_le_bytes(a))
    }
    /// A `u32` count of elements that follow. Every element takes at least one byte: a count
    /// beyond the bytes left is damage, not a reason to allocate.
    pub(crate) fn count(&mut self) -> Result<usize, DecodeError> {
        let count = self.u32()? as usize;
        if count > self.bytes.len() {
            return Err(bad("count beyond the data"));
        }
        Ok(count)
    }
    pub(crate) fn flag(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(bad("flag")),
        }
    }
    pub(crate) fn opt_uuid(&mut self) -> Result<Option<Uuid>, DecodeError> {
        Ok(if self.flag()? {
            Some(self.uuid()?)
        } else {
            None
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_events() -> Vec<Event> {
        let account = AccountId::parse("player-42").expect("valid id");
        let meta = Metadata::new(BTreeMap::from([
            ("order".to_string(), "A-1".to_string()),
            ("note".to_string(), "é€".to_string()),
        ]))
        .expect("valid metadata");
        let hold_id = Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0001);
        let bodies = vec![
            EventBody::Opened {
                currency: Currency::parse("GEM").expect("valid"),
                overdraft_limit: 50,
                metadata: meta.clone(),
            },
            EventBody::Credit {
                amount: Amount::new(1500).expect("valid"),
                metadata: Metadata::empty(),
            },
            EventBody::Debit {
                amount: Amount::new(7).expect("valid"),
                metadata: meta.clone(),
            },
            EventBody::Hold {
                hold_id,
                amount: Amount::new(200).expect("valid"),
                expires_at_ms: 1_800_000_000_000,
                expires_in_secs: Some(60),
                metadata: Metadata::empty(),
            },
            EventBody::Capture {
                hold_id,
                amount: Amount::new(150).expect("valid"),
                amount_given: true,
                metadata: meta.clone(),
            },
            EventBody::Release {
                hold_id,
                metadata: Metadata::empty(),
            },
            EventBody::Expire { hold_id },
            EventBody::TransferOut {
                transfer_id: hold_id,
                to: AccountId::parse("house").expect("valid id"),
                amount: Amount::new(25).expect("valid"),
                metadata: meta.clone(),
            },
            EventBody::TransferIn {
                transfer_id: hold_id,
                from: AccountId::parse("house").expect("valid id"),
                amount: Amount::new(25).expect("valid"),
                metadata: Metadata::empty(),
            },
            EventBody::TransferRefund {
                transfer_id: hold_id,
                to: AccountId::parse("house").expect("valid id"),
                amount: Amount::new(25).expect("valid"),
                failure: TransferFailure::BalanceLimitExceeded,
            },
        ];
        bodies
            .into_iter()
            .enumerate()
            .map(|(i, body)| Event {
                lsn: i as u64 + 1,
                account: account.clone(),
                seq: i as u64,
                at_ms: 1_700_000_000_000 + i as u64,
                tx_id: Uuid::from_u128(i as u128),
                idempotency_key: (i % 2 == 1)
                    .then(|| IdempotencyKey::parse(&format!("key-{i}")).expect("valid")),
                body,
                outcome: None,
            })
            .collect()
    }

    #[test]
    fn every_event_round_trips_through_a_frame() {
        for event in sample_events() {
            let mut payload = Vec::new();
            encode_event(&event, &mut payload);
            let mut framed = Vec::new();
            encode_frame(event.lsn, &payload, &mut framed);
            let (frame, size) = decode_frame(&framed).expect("valid frame");
            assert_eq!(size, framed.len());
            assert_eq!(frame.lsn, event.lsn);
            let decoded = decode_event(frame.lsn, frame.payload).expect("valid payload");
            assert_eq!(decoded, event);
        }
    }

    #[test]
    fn every_truncation_is_incomplete_and_every_bit_flip_is_caught() {
        let event = &sample_events()[3];
        let mut payload = Vec::new();
        encode_event(event, &mut payload);
        let mut framed = Vec::new();
        encode_frame(event.lsn, &payload, &mut framed);
        for cut in 0..framed.len() {
            let result = decode_frame(&framed[..cut]);
            assert!(result.is_err(), "truncation at {cut} decoded");
        }
        for byte in 0..framed.len() {
            for bit in 0..8 {
                let mut flipped = framed.clone();
                flipped[byte] ^= 1 << bit;
                assert!(
                    decode_frame(&flipped).is_err(),
                    "flip of bit {bit} in byte {byte} passed"
                );
            }
        }
    }

    #[test]
    fn payload_decoder_refuses_garbage_without_panicking() {
        let event = &sample_events()[4];
        let mut payload = Vec::new();
        encode_event(event, &mut payload);
        for cut in 0..payload.len() {
            assert!(decode_event(1, &payload[..cut]).is_err());
        }
        let mut trailing = payload.clone();
        trailing.push(0);
        assert_eq!(
            decode_event(1, &trailing),
            Err(DecodeError::BadPayload("trailing bytes"))
        );
    }
}

#[cfg(test)]
mod known_id_tests {
    use super::*;

    #[test]
    fn an_offered_id_is_used_only_when_it_is_the_records() {
        // Goal: replay offers the id of the account it looked up without comparing; the
        // decoder compares, so a wrong offer can never name another account.
        let event = Event {
            lsn: 3,
            account: AccountId::parse("player-1").expect("id"),
            seq: 1,
            at_ms: 1_767_225_600_000,
            tx_id: Uuid::from_u128(7),
            idempotency_key: None,
            body: EventBody::Credit {
                amount: Amount::new(5).expect("amount"),
                metadata: Metadata::empty(),
            },
            outcome: None,
        };
        let mut payload = Vec::new();
        encode_event(&event, &mut payload);
        let frame = Frame {
            version: FRAME_VERSION,
            lsn: 3,
            payload: &payload,
        };
        let offered = AccountId::parse("player-1").expect("id");
        let same = decode_frame_event_with(&frame, |_| Some(offered.clone())).expect("decode");
        assert_eq!(same.account, event.account);
        assert!(
            std::ptr::eq(same.account.as_str(), offered.as_str()),
            "the offered id is shared, not copied"
        );
        let wrong =
            decode_frame_event_with(&frame, |_| Some(AccountId::parse("player-2").expect("id")))
                .expect("decode");
        assert_eq!(wrong.account.as_str(), "player-1");
    }
}
