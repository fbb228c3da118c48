//! Hold expiry: an index of open holds by deadline, and a background sweeper that expires
//! due holds durably. Actors also expire an account's due holds before each command, so a
//! capture after the deadline finds the hold expired even between sweeps.

use std::collections::BTreeSet;
use std::sync::Weak;
use std::time::Duration;

use parking_lot::Mutex;
use uuid::Uuid;

use super::Inner;
use crate::domain::AccountId;

/// How often the sweeper looks for due holds, by default.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(200);

/// Open holds by deadline.
#[derive(Default)]
pub(crate) struct ExpiryIndex {
    set: Mutex<BTreeSet<(u64, AccountId, Uuid)>>,
}

impl ExpiryIndex {
    pub(crate) fn insert(&self, deadline_ms: u64, account: &AccountId, hold: Uuid) {
        self.set.lock().insert((deadline_ms, account.clone(), hold));
    }

    pub(crate) fn remove(&self, deadline_ms: u64, account: &AccountId, hold: Uuid) {
        self.set
            .lock()
            .remove(&(deadline_ms, account.clone(), hold));
    }

    pub(crate) fn len(&self) -> usize {
        self.set.lock().len()
    }

    /// The entries due at `now_ms`, earliest first. They stay in the index until the hold
    /// ends (or is found already ended), so two concurrent sweeps both see them and both
    /// serialize on the account's lock: neither can return before the expiry is applied.
    pub(crate) fn due(&self, now_ms: u64) -> Vec<(u64, AccountId, Uuid)> {
        let set = self.set.lock();
        set.iter()
            .take_while(|(deadline, _, _)| *deadline <= now_ms)
            .cloned()
            .collect()
    }
}

/// Starts the background sweeper. It holds only a weak reference, so it ends with the engine.
pub(crate) fn spawn_sweeper(inner: Weak<Inner>, every: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(inner) = inner.upgrade() else { return };
            if inner.wal.is_failed() {
                return;
            }
            if let Err(error) = inner.expire_all_due() {
                tracing::warn!(%error, "hold expiry sweep stopped");
                return;
            }
        }
    });
}
