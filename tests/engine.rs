//! Engine-level behaviour that needs no HTTP: idle actors are retired (memory grows with
//! data, not with tasks) and come back on the next command with nothing lost.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use coffer::domain::{AccountId, Currency, IdempotencyKey, Metadata, Request};
use coffer::{Engine, EngineConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_actors_retire_and_restart_on_the_next_command() {
    // Goal: after a burst on 50 accounts, every actor stops once idle (live_actors = 0), and
    // the next command on any account starts a new one and sees the state left behind.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = EngineConfig::new(dir.path());
    config.actor_idle = Duration::from_millis(40);
    let (engine, _) = Engine::open(config).expect("open");
    engine.finish_recovery().await.expect("recover");
    let ids: Vec<AccountId> = (0..50)
        .map(|i| AccountId::parse(&format!("acct-{i}")).expect("id"))
        .collect();
    for id in &ids {
        engine
            .open_account(
                id.clone(),
                Currency::parse("GEM").expect("c"),
                0,
                Metadata::empty(),
            )
            .await
            .expect("open account");
        let credit = Request::Credit {
            amount: 10,
            metadata: BTreeMap::new(),
        };
        engine
            .execute(id, Some(IdempotencyKey::parse("k1").expect("key")), credit)
            .await
            .expect("credit");
    }
    assert!(engine.stats().live_actors > 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while engine.stats().live_actors > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        engine.stats().live_actors,
        0,
        "idle actors were not retired"
    );
    for id in &ids {
        let debit = Request::Debit {
            amount: 4,
            metadata: BTreeMap::new(),
        };
        let done = engine
            .execute(id, Some(IdempotencyKey::parse("k2").expect("key")), debit)
            .await
            .expect("debit after restart of the actor");
        assert_eq!(done.receipt.account.balance, 6);
        assert_eq!(done.receipt.account.seq, 2);
    }
    engine.shutdown();
}
