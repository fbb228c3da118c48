//! The recent durable past of the log in memory: the last group commits, exactly as written
//! and synced, so that event-stream consumers that keep up read memory instead of the disk.
//! Only the writer adds to it, and only after the `fdatasync` that made a batch durable, so
//! nothing in it can be undone by a crash.

use std::collections::VecDeque;
use std::sync::Arc;

/// Bytes of recent batches kept in memory for the event stream.
pub const TAIL_BYTES_MAX: usize = 32 * 1024 * 1024;

/// One group commit: frames with LSNs `first_lsn..=last_lsn`, back to back.
#[derive(Debug)]
pub struct Batch {
    /// LSN of the first frame.
    pub first_lsn: u64,
    /// LSN of the last frame.
    pub last_lsn: u64,
    /// The frames, as written.
    pub bytes: Vec<u8>,
}

/// The last durable batches, contiguous in LSN, at most [`TAIL_BYTES_MAX`] bytes (always at
/// least the newest batch).
#[derive(Debug, Default)]
pub(crate) struct Tail {
    batches: VecDeque<Arc<Batch>>,
    bytes: usize,
}

impl Tail {
    /// Adds the batch that was just made durable; drops the oldest beyond the limit.
    pub(crate) fn push(&mut self, batch: Batch) {
        if let Some(last) = self.batches.back() {
            assert_eq!(
                last.last_lsn + 1,
                batch.first_lsn,
                "durable batches follow each other"
            );
        }
        self.bytes += batch.bytes.len();
        self.batches.push_back(Arc::new(batch));
        while self.bytes > TAIL_BYTES_MAX && self.batches.len() > 1 {
            if let Some(old) = self.batches.pop_front() {
                self.bytes -= old.bytes.len();
            }
        }
    }

    /// The batches holding `lsn` and everything after it, if the tail reaches back to `lsn`
    /// (`None` if `lsn` is older than the oldest batch kept, or nothing is kept).
    pub(crate) fn from(&self, lsn: u64) -> Option<Vec<Arc<Batch>>> {
        let first = self.batches.front()?.first_lsn;
        if lsn < first {
            return None;
        }
        let start = self.batches.partition_point(|b| b.last_lsn < lsn);
        Some(self.batches.range(start..).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_answers_only_from_where_it_reaches_back_to() {
        let mut tail = Tail::default();
        assert!(tail.from(1).is_none());
        for (first_lsn, last_lsn) in [(1u64, 3u64), (4, 8), (9, 9)] {
            tail.push(Batch {
                first_lsn,
                last_lsn,
                bytes: vec![1; 10],
            });
        }
        assert_eq!(tail.from(1).map(|b| b.len()), Some(3));
        assert_eq!(tail.from(5).map(|b| b[0].first_lsn), Some(4));
        assert_eq!(tail.from(9).map(|b| b.len()), Some(1));
        assert_eq!(tail.from(10).map(|b| b.len()), Some(0));
    }
}
