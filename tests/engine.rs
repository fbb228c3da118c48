//! Engine-level behaviour that needs no HTTP: a fixed set of actors serves any number of
//! accounts (tasks do not grow with accounts), and concurrent single commands and batches on
//! overlapping accounts are each applied exactly once.

use std::collections::BTreeMap;

use coffer::domain::{AccountId, Currency, IdempotencyKey, Metadata, Request};
use coffer::{Engine, EngineConfig};

fn debit(amount: i128) -> Request {
    Request::Debit {
        amount,
        metadata: BTreeMap::new(),
    }
}

fn key(text: &str) -> Option<IdempotencyKey> {
    Some(IdempotencyKey::parse(text).expect("key"))
}

async fn engine_with_accounts(dir: &std::path::Path, accounts: usize) -> (Engine, Vec<AccountId>) {
    let mut config = EngineConfig::new(dir);
    config.actors = 3;
    let (engine, _) = Engine::open(config).expect("open");
    engine.finish_recovery().await.expect("recover");
    let ids: Vec<AccountId> = (0..accounts)
        .map(|i| AccountId::parse(&format!("acct-{i}")).expect("id"))
        .collect();
    let mut seed = Vec::new();
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
            amount: 1000,
            metadata: BTreeMap::new(),
        };
        seed.push((id.clone(), key("seed"), credit));
    }
    for result in engine.execute_batch(seed).await {
        result.expect("seed credit");
    }
    (engine, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_set_of_actors_serves_any_number_of_accounts() {
    // Goal: commands on 300 accounts run on the configured 3 actors; no task per account.
    let dir = tempfile::tempdir().expect("tempdir");
    let (engine, ids) = engine_with_accounts(dir.path(), 300).await;
    for id in &ids {
        engine
            .execute(id, key("d1"), debit(1))
            .await
            .expect("debit");
    }
    assert_eq!(engine.stats().live_actors, 3);
    assert_eq!(engine.stats().queued_commands, 0);
    engine.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_singles_and_batches_apply_each_operation_once() {
    // Goal: 8 tasks sending single debits and 4 tasks sending batches, all over the same 20
    // accounts, with every key sent twice: each account ends at exactly 1000 minus the
    // distinct debits, with seq matching, and every second send is a replay.
    let dir = tempfile::tempdir().expect("tempdir");
    let (engine, ids) = engine_with_accounts(dir.path(), 20).await;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let engine = engine.clone();
        let ids = ids.clone();
        tasks.push(tokio::spawn(async move {
            let mut replays = 0;
            for i in 0..50 {
                let id = &ids[(i * 7 + t) % ids.len()];
                let k = format!("s{t}-{i}");
                let first = engine.execute(id, key(&k), debit(1)).await.expect("debit");
                let again = engine.execute(id, key(&k), debit(1)).await.expect("retry");
                assert!(!first.replayed);
                assert!(again.replayed);
                assert_eq!(first.receipt, again.receipt);
                replays += 1;
            }
            replays
        }));
    }
    for t in 0..4 {
        let engine = engine.clone();
        let ids = ids.clone();
        tasks.push(tokio::spawn(async move {
            let mut replays = 0;
            for round in 0..5 {
                let ops: Vec<_> = (0..40)
                    .map(|i| {
                        let id = ids[(i + round) % ids.len()].clone();
                        (id, key(&format!("b{t}-{round}-{}", i % 20)), debit(1))
                    })
                    .collect();
                for result in engine.execute_batch(ops).await {
                    if result.expect("batch debit").replayed {
                        replays += 1;
                    }
                }
            }
            replays
        }));
    }
    let mut replays = 0;
    for task in tasks {
        replays += task.await.expect("task");
    }
    // Singles: 8 x 50 distinct debits, each retried once. Batches: 4 x 5 rounds x 20
    // distinct keys, each sent twice in its batch.
    assert_eq!(replays, 8 * 50 + 4 * 5 * 20);
    let mut total = 0;
    for id in &ids {
        let view = engine.account(id).await.expect("account");
        let debits = 1000 - view.balance;
        assert_eq!(view.seq as i64, 1 + debits, "seq counts every event once");
        total += debits;
    }
    assert_eq!(total, 8 * 50 + 4 * 5 * 20);
    engine.shutdown();
}

/// Found by the simulation (seed 74): the answer to opening an account showed the account
/// as it was once the open was durable, including a credit sent after the open that was
/// not durable yet. The answer must show the account as created.
#[test]
fn opening_an_account_answers_with_the_account_as_created_not_a_later_undurable_state() {
    use coffer::storage::sim::SimStorage;
    use coffer::wal::WriterMode;
    use std::sync::Arc;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut config = EngineConfig::new("/data");
    config.storage = Arc::new(SimStorage::new());
    config.wal_writer = WriterMode::Manual;
    config.expiry_sweep = None;
    let _context = rt.enter();
    let (engine, _) = Engine::open(config).expect("open");
    let recovering = rt.spawn({
        let engine = engine.clone();
        async move { engine.finish_recovery().await }
    });
    rt.block_on(recovering).expect("join").expect("recover");
    let id = AccountId::parse("fresh").expect("id");
    let opening = rt.spawn({
        let (engine, id) = (engine.clone(), id.clone());
        async move {
            engine
                .open_account(id, Currency::parse("GEM").expect("c"), 0, Metadata::empty())
                .await
        }
    });
    rt.block_on(tokio::task::yield_now());
    let crediting = rt.spawn({
        let (engine, id) = (engine.clone(), id.clone());
        async move {
            let credit = Request::Credit {
                amount: 100,
                metadata: BTreeMap::new(),
            };
            engine.execute(&id, key("c1"), credit).await
        }
    });
    for _ in 0..8 {
        rt.block_on(tokio::task::yield_now());
    }
    // The open and the credit are both applied in memory, neither is durable yet.
    assert!(!opening.is_finished() && !crediting.is_finished());
    engine.commit_wal().expect("commit");
    let (created, view) = rt.block_on(opening).expect("join").expect("open account");
    assert!(created);
    assert_eq!((view.balance, view.seq), (0, 0), "the account as created");
    let credited = rt.block_on(crediting).expect("join").expect("credit");
    assert_eq!(credited.receipt.account.balance, 100);
}
