//! Reading the log back: list segments, check every frame, hand each event to the caller in
//! LSN order. Segments end in zeros that the writer allocated ahead; a zero tail is the
//! clean end of a segment. A bad frame with something non-zero after it, but no valid frame,
//! in the last segment is a torn tail (a write cut short by a crash) and is cut; any other
//! bad frame is corruption and stops recovery with the file and offset.

use std::path::{Path, PathBuf};

use super::codec::{self, DecodeError, FRAME_MAGIC};
use super::WalError;
use crate::domain::Event;
use crate::storage::{FileStorage, Storage};

const SEGMENT_SUFFIX: &str = ".wal";

/// The file name of the segment whose first record has `first_lsn`.
pub fn segment_name(first_lsn: u64) -> String {
    format!("{first_lsn:020}{SEGMENT_SUFFIX}")
}

/// A segment file and the LSN its name says it starts at.
#[derive(Debug, Clone)]
pub struct SegmentFile {
    /// Path of the file.
    pub path: PathBuf,
    /// LSN of its first record.
    pub first_lsn: u64,
}

/// Lists the segments of a directory in LSN order. Files that are not segments are ignored.
pub fn list_segments(storage: &dyn Storage, dir: &Path) -> Result<Vec<SegmentFile>, WalError> {
    let names = storage.list(dir).map_err(|e| WalError::io(dir, e))?;
    let mut segments = Vec::new();
    for name in names {
        let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX) else {
            continue;
        };
        if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(first_lsn) = stem.parse::<u64>() else {
            continue;
        };
        segments.push(SegmentFile {
            path: dir.join(&name),
            first_lsn,
        });
    }
    segments.sort_by_key(|s| s.first_lsn);
    Ok(segments)
}

/// The complete journal: the segments of `archive` (where the server moves the segments no
/// snapshot needs, `--wal-archive`) followed by those of the log in `dir`, in LSN order. A
/// segment in both is refused: it would be read twice. Whether they continue one another
/// with no gap is checked when they are read.
pub fn list_journal(
    storage: &dyn Storage,
    archive: &Path,
    dir: &Path,
) -> Result<Vec<SegmentFile>, WalError> {
    let mut segments = list_segments(storage, archive)?;
    let live = list_segments(storage, dir)?;
    for segment in &live {
        if let Ok(i) = segments.binary_search_by_key(&segment.first_lsn, |s| s.first_lsn) {
            return Err(WalError::Corrupt {
                path: segments[i].path.clone(),
                offset: 0,
                reason: format!(
                    "the segment is both in the archive and in the log ({})",
                    segment.path.display()
                ),
            });
        }
    }
    segments.extend(live);
    segments.sort_by_key(|s| s.first_lsn);
    Ok(segments)
}

/// What a torn tail cut removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailCut {
    /// The segment.
    pub path: PathBuf,
    /// Offset of the first removed byte.
    pub offset: u64,
    /// Bytes removed.
    pub bytes: u64,
    /// Why the record there was refused.
    pub reason: String,
}

/// The result of reading the whole log.
#[derive(Debug, Clone)]
pub struct ReplayOutcome {
    /// Number of records handed to the caller (those after the snapshot).
    pub records: u64,
    /// LSN of the last valid record (0 when the log is empty).
    pub last_lsn: u64,
    /// The last segment and its valid length, where writing continues.
    pub last_segment: Option<(PathBuf, u64)>,
    /// The torn tail that was found, if any.
    pub tail_cut: Option<TailCut>,
}

/// [`replay_from`] on the real file system.
pub fn replay(
    dir: &Path,
    repair: bool,
    on_event: impl FnMut(Event) -> Result<(), String>,
) -> Result<ReplayOutcome, WalError> {
    replay_from(&FileStorage, dir, repair, on_event)
}

/// Reads every segment of `dir` in order and calls `on_event` for each record. When
/// `repair` is true a torn tail is truncated on disk (and the truncation synced); otherwise it
/// is only reported. An error from `on_event` is reported as corruption at that record.
///
/// Before it cuts anything, it reads the segment a second time: a tail that reads
/// differently twice is a failing read, not a torn write, and is reported as an I/O error
/// rather than cut (cutting would drop acknowledged records).
pub fn replay_from(
    storage: &dyn Storage,
    dir: &Path,
    repair: bool,
    on_event: impl FnMut(Event) -> Result<(), String>,
) -> Result<ReplayOutcome, WalError> {
    replay_after(storage, dir, 0, repair, on_event)
}

/// [`replay_from`] for a log whose records up to `after_lsn` are covered by a snapshot:
/// segments holding only such records are not read (they may be gone), records up to
/// `after_lsn` are checked but not handed to `on_event`, and the log must reach at least
/// `after_lsn`.
pub fn replay_after(
    storage: &dyn Storage,
    dir: &Path,
    after_lsn: u64,
    repair: bool,
    mut on_event: impl FnMut(Event) -> Result<(), String>,
) -> Result<ReplayOutcome, WalError> {
    replay_frames_after(storage, dir, after_lsn, repair, |frame| {
        let event = codec::decode_frame_event(frame).map_err(|e| e.to_string())?;
        on_event(event)
    })
}

/// [`replay_after`] that hands over each record after `after_lsn` as a checked frame (its
/// CRC, header and LSN verified), not yet decoded: for a caller that decodes elsewhere (a
/// parallel replay). An error from `on_frame` names the frame's file and offset.
pub fn replay_frames_after(
    storage: &dyn Storage,
    dir: &Path,
    after_lsn: u64,
    repair: bool,
    on_frame: impl FnMut(&codec::Frame<'_>) -> Result<(), String>,
) -> Result<ReplayOutcome, WalError> {
    let segments = list_segments(storage, dir)?;
    replay_segments_after(storage, dir, &segments, after_lsn, repair, on_frame)
}

/// [`replay_frames_after`] over `segments` (in LSN order: a directory's, or a whole journal
/// from [`list_journal`]); `dir` names the log in errors about it as a whole. Only the last
/// segment may end in a torn tail.
pub fn replay_segments_after(
    storage: &dyn Storage,
    dir: &Path,
    segments: &[SegmentFile],
    after_lsn: u64,
    repair: bool,
    mut on_frame: impl FnMut(&codec::Frame<'_>) -> Result<(), String>,
) -> Result<ReplayOutcome, WalError> {
    // The last segment starting at or before after_lsn + 1 holds the first record needed.
    let first_needed = segments
        .iter()
        .rposition(|s| s.first_lsn <= after_lsn.saturating_add(1))
        .unwrap_or(0);
    let segments = &segments[first_needed..];
    let mut outcome = ReplayOutcome {
        records: 0,
        last_lsn: 0,
        last_segment: None,
        tail_cut: None,
    };
    let count = segments.len();
    std::thread::scope(|scope| {
        // The next segment is read while this one is checked and handed on, so that the
        // threads applying the records do not wait for each whole-segment read. Segments are
        // still read once each, in order.
        let prefetched = (count > 1).then(|| {
            let (send, receive) = std::sync::mpsc::sync_channel(0);
            let paths: Vec<PathBuf> = segments.iter().map(|s| s.path.clone()).collect();
            scope.spawn(move || {
                for path in &paths {
                    if send.send(storage.read(path)).is_err() {
                        return;
                    }
                }
            });
            receive
        });
        for (index, segment) in segments.iter().enumerate() {
            let is_last = index + 1 == count;
            let bytes = match &prefetched {
                Some(receive) => receive
                    .recv()
                    .unwrap_or_else(|_| Err(std::io::Error::other("the segment reader stopped"))),
                None => storage.read(&segment.path),
            }
            .map_err(|e| WalError::io(&segment.path, e))?;
            let corrupt = |offset: usize, reason: String| WalError::Corrupt {
                path: segment.path.clone(),
                offset: offset as u64,
                reason,
            };
            // LSNs run 1, 2, 3, ... across segments with no gap: each segment must start right
            // after the records before it, also after a segment with no records at all (the
            // log starts at 1 until snapshots let it start later).
            let before = outcome.last_lsn.max(after_lsn);
            let continues = if index == 0 {
                segment.first_lsn <= before + 1
            } else {
                segment.first_lsn == before + 1
            };
            if !continues {
                return Err(corrupt(0, discontinuity(index, segment.first_lsn, before)));
            }
            if index == 0 {
                // Records before this segment are covered by the snapshot (or there are none).
                outcome.last_lsn = segment.first_lsn.saturating_sub(1);
            }
            let mut expected_lsn = segment.first_lsn;
            let mut offset = 0usize;
            while offset < bytes.len() {
                match codec::decode_frame(&bytes[offset..]) {
                    Ok((frame, size)) => {
                        if frame.lsn != expected_lsn {
                            return Err(corrupt(
                                offset,
                                format!("lsn {} where {} was expected", frame.lsn, expected_lsn),
                            ));
                        }
                        // Records the snapshot covers are checksummed (decode_frame) but not
                        // decoded: nothing reads them.
                        if frame.lsn > after_lsn {
                            on_frame(&frame).map_err(|reason| corrupt(offset, reason))?;
                            outcome.records += 1;
                        }
                        outcome.last_lsn = frame.lsn;
                        expected_lsn += 1;
                        offset += size;
                    }
                    Err(_) if bytes[offset..].iter().all(|b| *b == 0) => {
                        // Zero-filled space the writer allocated ahead: the clean end.
                        break;
                    }
                    Err(error) => {
                        let intact = error == DecodeError::Unsupported;
                        if intact || !is_last || valid_frame_after(&bytes, offset) {
                            return Err(corrupt(offset, error.to_string()));
                        }
                        let again = storage
                            .read(&segment.path)
                            .map_err(|e| WalError::io(&segment.path, e))?;
                        if again != bytes {
                            return Err(WalError::io(
                                &segment.path,
                                std::io::Error::other("the segment read differently twice"),
                            ));
                        }
                        let cut = TailCut {
                            path: segment.path.clone(),
                            offset: offset as u64,
                            bytes: (bytes.len() - offset) as u64,
                            reason: describe(error),
                        };
                        if repair {
                            truncate(storage, &segment.path, offset as u64)?;
                        }
                        outcome.tail_cut = Some(cut);
                        break;
                    }
                }
            }
            if is_last {
                outcome.last_segment = Some((segment.path.clone(), offset as u64));
            }
        }
        if outcome.last_lsn < after_lsn {
            return Err(WalError::Corrupt {
                path: dir.to_path_buf(),
                offset: 0,
                reason: format!(
                    "the log ends at lsn {} but the snapshot covers up to {after_lsn}",
                    outcome.last_lsn
                ),
            });
        }
        Ok(outcome)
    })
}

/// Why segment number `index` (of those read), starting at `first_lsn`, cannot follow
/// records that end at `before`: a gap names the records missing.
fn discontinuity(index: usize, first_lsn: u64, before: u64) -> String {
    let found =
        format!("segment starts at lsn {first_lsn} but the records before it end at {before}");
    match first_lsn.checked_sub(before + 1) {
        Some(0) | None if index > 0 => format!("{found}: it overlaps them"),
        Some(missing) if index > 0 => format!(
            "{found}: lsn {}..={} are missing (a segment before this one is missing)",
            before + 1,
            before + missing
        ),
        // The first segment read: nothing else holds the records before it.
        _ if before == 0 => format!(
            "{found}: lsn 1..={} are in no segment and no snapshot",
            first_lsn - 1
        ),
        _ => format!(
            "{found}: lsn {}..={} are in no segment (the snapshot covers up to {before})",
            before + 1,
            first_lsn - 1
        ),
    }
}

/// Whether any complete, checksum-valid frame starts after `offset`: if one does, the bad
/// frame at `offset` is not a torn tail but damage in the middle of the log.
fn valid_frame_after(bytes: &[u8], offset: usize) -> bool {
    let magic = FRAME_MAGIC.to_le_bytes();
    let mut pos = offset + 1;
    while pos + magic.len() <= bytes.len() {
        if bytes[pos..pos + magic.len()] == magic && codec::decode_frame(&bytes[pos..]).is_ok() {
            return true;
        }
        pos += 1;
    }
    false
}

fn describe(error: DecodeError) -> String {
    error.to_string()
}

/// Cuts a torn tail that [`replay_after`] found without `repair`, as it would have.
pub fn cut_tail(storage: &dyn Storage, cut: &TailCut) -> Result<(), WalError> {
    truncate(storage, &cut.path, cut.offset)
}

/// The segment and byte offset of the record with `lsn`, to name it in an error found after
/// the record was read (by a parallel replay). `None` if it cannot be found.
pub fn locate(storage: &dyn Storage, dir: &Path, lsn: u64) -> Option<(PathBuf, u64)> {
    locate_in(storage, &list_segments(storage, dir).ok()?, lsn)
}

/// [`locate`] among `segments` (in LSN order).
pub fn locate_in(
    storage: &dyn Storage,
    segments: &[SegmentFile],
    lsn: u64,
) -> Option<(PathBuf, u64)> {
    let segment = segments.iter().rev().find(|s| s.first_lsn <= lsn)?;
    let bytes = storage.read(&segment.path).ok()?;
    let mut offset = 0;
    while let Ok((frame, size)) = codec::decode_frame(&bytes[offset..]) {
        if frame.lsn == lsn {
            return Some((segment.path.clone(), offset as u64));
        }
        offset += size;
    }
    None
}

fn truncate(storage: &dyn Storage, path: &Path, len: u64) -> Result<(), WalError> {
    let mut file = storage.open(path).map_err(|e| WalError::io(path, e))?;
    file.set_len(len).map_err(|e| WalError::io(path, e))?;
    file.sync().map_err(|e| WalError::io(path, e))
}

/// Bytes read from a segment at a time when reading a range of records.
pub const READ_CHUNK_BYTES: usize = 1024 * 1024;

const _: () =
    assert!(READ_CHUNK_BYTES > codec::FRAME_HEADER_BYTES + codec::RECORD_PAYLOAD_BYTES_MAX);

/// Where a range read stopped: the segment, the LSN of the next record and its offset, so
/// that the next read of the same consumer starts there instead of at the segment's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadPosition {
    /// The first LSN of the segment (its name).
    pub segment_first_lsn: u64,
    /// The LSN of the record at `offset`.
    pub lsn: u64,
    /// Its byte offset in the segment.
    pub offset: u64,
}

/// Why a range read failed.
#[derive(Debug, thiserror::Error)]
pub enum RangeError {
    /// The first record asked for is in no segment any more (removed after a snapshot).
    #[error("the records from lsn {0} are no longer kept")]
    Gone(u64),
    /// Reading failed, or the bytes are not the log they should be.
    #[error(transparent)]
    Wal(#[from] WalError),
}

/// Reads the records with LSNs `after + 1 ..= upto` from the segments of `dir`, in order,
/// handing each checked frame to `visit` until it returns `false` (that frame counts as
/// read). Every frame's LSN must be the one expected, so a read never skips a record: it
/// fails instead. `start` is a position an earlier read returned; it is used if it lies at or
/// before `after + 1`. Returns where the next read continues.
///
/// Records after `upto` are never decoded beyond their header: they may not be durable yet.
pub fn read_range(
    storage: &dyn Storage,
    dir: &Path,
    after: u64,
    upto: u64,
    start: Option<ReadPosition>,
    mut visit: impl FnMut(&codec::Frame<'_>) -> bool,
) -> Result<ReadPosition, RangeError> {
    let want = after.saturating_add(1);
    let segments = list_segments(storage, dir)?;
    let index = segments
        .iter()
        .rposition(|s| s.first_lsn <= want)
        .ok_or(RangeError::Gone(want))?;
    let mut lsn = segments[index].first_lsn;
    let mut offset = 0u64;
    if let Some(p) = start.filter(|p| {
        p.segment_first_lsn == segments[index].first_lsn && p.lsn <= want && p.lsn >= lsn
    }) {
        (lsn, offset) = (p.lsn, p.offset);
    }
    for (i, segment) in segments.iter().enumerate().skip(index) {
        let corrupt = |offset: u64, reason: String| WalError::Corrupt {
            path: segment.path.clone(),
            offset,
            reason,
        };
        if i > index {
            if segment.first_lsn != lsn {
                return Err(corrupt(
                    0,
                    format!(
                        "segment starts at lsn {} where {lsn} was expected",
                        segment.first_lsn
                    ),
                )
                .into());
            }
            offset = 0;
        }
        loop {
            if lsn > upto {
                return Ok(ReadPosition {
                    segment_first_lsn: segment.first_lsn,
                    lsn,
                    offset,
                });
            }
            let chunk = match storage.read_at(&segment.path, offset, READ_CHUNK_BYTES) {
                Ok(chunk) => chunk,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(RangeError::Gone(lsn))
                }
                Err(e) => return Err(WalError::io(&segment.path, e).into()),
            };
            let full = chunk.len() == READ_CHUNK_BYTES;
            let mut pos = 0usize;
            let mut segment_ended = false;
            while lsn <= upto {
                // A frame never starts with a zero byte: zeros are the space the writer
                // allocated ahead, the end of the segment's records.
                if pos >= chunk.len() || chunk[pos] == 0 {
                    segment_ended = pos < chunk.len() || !full;
                    break;
                }
                match codec::decode_frame(&chunk[pos..]) {
                    Ok((frame, size)) => {
                        if frame.lsn != lsn {
                            let at = offset + pos as u64;
                            let reason = format!("lsn {} where {lsn} was expected", frame.lsn);
                            return Err(corrupt(at, reason).into());
                        }
                        pos += size;
                        lsn += 1;
                        if frame.lsn >= want && !visit(&frame) {
                            return Ok(ReadPosition {
                                segment_first_lsn: segment.first_lsn,
                                lsn,
                                offset: offset + pos as u64,
                            });
                        }
                    }
                    // The frame goes on in the next chunk.
                    Err(DecodeError::Incomplete) if full => break,
                    Err(error) => {
                        let at = offset + pos as u64;
                        return Err(corrupt(at, format!("record {lsn}: {error}")).into());
                    }
                }
            }
            offset += pos as u64;
            if segment_ended {
                break;
            }
            if pos == 0 && lsn <= upto {
                // A whole chunk without one record: impossible with frames smaller than a
                // chunk; refuse rather than loop.
                return Err(corrupt(offset, "no record in a whole chunk".to_string()).into());
            }
        }
    }
    if lsn <= upto {
        return Err(RangeError::Wal(WalError::Corrupt {
            path: dir.to_path_buf(),
            offset: 0,
            reason: format!(
                "the segments end at lsn {} before the durable lsn {upto}",
                lsn - 1
            ),
        }));
    }
    Ok(ReadPosition {
        segment_first_lsn: segments.last().map_or(0, |s| s.first_lsn),
        lsn,
        offset: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::codec::{encode_frame, FRAME_HEADER_BYTES};

    /// A frame as `encode_frame` makes it, but with another version and a CRC that matches.
    fn frame_of_version(lsn: u64, version: u16) -> Vec<u8> {
        let mut frame = Vec::new();
        encode_frame(lsn, b"payload", &mut frame);
        frame[4..6].copy_from_slice(&version.to_le_bytes());
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&frame[..20]);
        hasher.update(&frame[FRAME_HEADER_BYTES..]);
        let crc = hasher.finalize().to_le_bytes();
        frame[20..24].copy_from_slice(&crc);
        frame
    }

    #[test]
    fn a_gap_after_a_segment_without_records_is_corruption() {
        // Found by the wal_decode fuzz target: a first segment that reads as zeros, then a
        // segment starting at lsn 5, was replayed as a sound log with lsns 1..=4 missing.
        use crate::storage::sim::SimStorage;
        let disk = SimStorage::new();
        disk.put(&Path::new("/wal").join(segment_name(1)), &[0u8; 32]);
        let mut frame = Vec::new();
        encode_frame(5, b"payload", &mut frame);
        disk.put(&Path::new("/wal").join(segment_name(5)), &frame);
        let result = replay_from(&disk, Path::new("/wal"), true, |_| Ok(()));
        assert!(
            matches!(&result, Err(WalError::Corrupt { offset: 0, reason, .. }) if reason.contains("end at 0")),
            "got {result:?}"
        );
        // A log whose first segment does not start at lsn 1 is refused the same way.
        let disk = SimStorage::new();
        disk.put(&Path::new("/wal").join(segment_name(5)), &frame);
        assert!(replay_from(&disk, Path::new("/wal"), true, |_| Ok(())).is_err());
    }

    #[test]
    fn an_intact_frame_of_an_unknown_version_at_the_tail_is_refused_not_cut() {
        // Goal: a record a newer coffer wrote on purpose stops recovery (a downgrade), while
        // the same bytes with a broken CRC would be a torn tail.
        assert_eq!(
            codec::decode_frame(&frame_of_version(1, codec::FRAME_VERSION + 1)).map(|_| ()),
            Err(DecodeError::Unsupported)
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(segment_name(1));
        std::fs::write(&path, frame_of_version(1, codec::FRAME_VERSION + 1)).expect("write");
        let result = replay(dir.path(), true, |_| Ok(()));
        assert!(
            matches!(result, Err(WalError::Corrupt { offset: 0, .. })),
            "got {result:?}"
        );
        let len = std::fs::metadata(&path).expect("metadata").len();
        assert_eq!(
            len as usize,
            frame_of_version(1, codec::FRAME_VERSION + 1).len(),
            "nothing was cut"
        );
    }
}
