//! Fresh ids: UUID v7 (unix-millisecond timestamp first), with a counter in the random bits
//! so that ids made in one process sort in the order they were made. Hold lists page by id.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use uuid::{Builder, Uuid};

pub(crate) struct IdGen {
    /// Highest timestamp used so far, so that a clock stepping back cannot reorder ids.
    last_ms: AtomicU64,
    counter: AtomicU64,
}

impl IdGen {
    /// A generator whose ids sort after every id made at or before `after_ms` (the newest
    /// timestamp recovery saw), so a restart within the same millisecond, or onto a clock
    /// that stepped back, cannot sort new holds before old ones.
    /// `seed` fixes the counter's start (for deterministic simulation); `None` takes it from
    /// the wall clock.
    pub(crate) fn new(after_ms: u64, seed: Option<u64>) -> IdGen {
        // Seeded from the wall clock's nanoseconds and the pid: ids need to be unique and
        // ordered, not secret. Kept below 2^40 so the counter never reaches the bits that the
        // UUID variant field overwrites.
        let seed = seed.unwrap_or_else(|| {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::from(d.subsec_nanos()));
            nanos ^ (u64::from(std::process::id()) << 20)
        }) & ((1 << 40) - 1);
        IdGen {
            last_ms: AtomicU64::new(after_ms.saturating_add(1)),
            counter: AtomicU64::new(seed),
        }
    }

    /// The highest timestamp any id made so far carries (at most).
    pub(crate) fn last_ms(&self) -> u64 {
        self.last_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn next(&self, now_ms: u64) -> Uuid {
        let ms = self
            .last_ms
            .fetch_max(now_ms, Ordering::Relaxed)
            .max(now_ms);
        // Relaxed: uniqueness needs only the atomicity of fetch_add.
        let count = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut random = [0u8; 10];
        random[2..].copy_from_slice(&count.to_be_bytes());
        Builder::from_unix_timestamp_millis(ms, &random).into_uuid()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_v7_and_ordered_within_a_millisecond() {
        let ids = IdGen::new(0, None);
        let a = ids.next(1_700_000_000_000);
        let b = ids.next(1_700_000_000_000);
        let c = ids.next(1_699_999_999_999);
        assert_eq!(a.get_version_num(), 7);
        assert!(a < b);
        assert!(b < c, "a clock step back must not reorder ids");
    }

    #[test]
    fn ids_after_a_restart_sort_after_recovered_ones() {
        let before = IdGen::new(0, None).next(1_700_000_000_000);
        let after = IdGen::new(1_700_000_000_000, None).next(1_699_000_000_000);
        assert!(before < after);
    }
}
