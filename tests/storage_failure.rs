//! A WAL that cannot be written stops writes for good: nothing is acknowledged, every later
//! write and `/readyz` answer 503 `storage_failure`, and state that was durable before
//! stays readable.

use std::collections::BTreeMap;

use coffer::domain::{AccountId, Currency, IdempotencyKey, Metadata, Request};
use coffer::engine::EngineError;
use coffer::{EngineConfig, Server};

fn credit(amount: i128) -> Request {
    Request::Credit {
        amount,
        metadata: BTreeMap::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_wal_write_is_never_acknowledged_and_stops_writes() {
    // Goal: when the writer cannot create its next segment, the pending write fails with
    // StorageFailure, later writes fail at once, and earlier durable state is still served.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = EngineConfig::new(dir.path());
    // Tiny segments: every batch starts a new segment file, so we can sabotage the next one.
    config.segment_bytes_max = 1;
    let server = Server::start("127.0.0.1:0", config).await.expect("start");
    let engine = server.engine().expect("ready").clone();
    let id = AccountId::parse("acct").expect("id");
    let currency = Currency::parse("GEM").expect("currency");
    engine
        .open_account(id.clone(), currency, 0, Metadata::empty())
        .await
        .expect("open");
    let key = |k: &str| Some(IdempotencyKey::parse(k).expect("key"));
    engine
        .execute(&id, key("ok"), credit(10))
        .await
        .expect("first credit is durable");
    let durable = engine.stats().durable_lsn;

    // The next segment would be named after the next LSN: occupy that name with a directory
    // so that creating the file fails.
    let next = dir
        .path()
        .join("wal")
        .join(coffer::wal::reader::segment_name(durable + 1));
    std::fs::create_dir(&next).expect("sabotage");

    let failed = engine.execute(&id, key("lost"), credit(5)).await;
    assert!(
        matches!(failed, Err(EngineError::StorageFailure)),
        "got {failed:?}"
    );
    assert!(engine.storage_failed());
    let again = engine.execute(&id, key("later"), credit(1)).await;
    assert!(
        matches!(again, Err(EngineError::StorageFailure)),
        "got {again:?}"
    );

    // Over HTTP: writes and readiness are 503 storage_failure.
    let base = format!("http://{}", server.addr());
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{base}/v1/accounts/acct/credits"))
        .header("Idempotency-Key", "http-1")
        .body(r#"{"amount":1}"#)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["code"], "storage_failure");
    let ready = client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 503);

    // The lookup of the durable key still works; the failed ones were never acknowledged.
    let found = engine
        .idempotency_entry(&id, &IdempotencyKey::parse("ok").expect("key"))
        .await
        .expect("lookup");
    assert!(found.is_some());
    server.shutdown().await;

    // After a restart the failed write is absent: only the durable credit counts.
    std::fs::remove_dir(&next).expect("clean up sabotage");
    let server = Server::start("127.0.0.1:0", EngineConfig::new(dir.path()))
        .await
        .expect("restart");
    let engine = server.engine().expect("ready");
    let view = engine.account(&id).await.expect("account");
    assert_eq!(view.balance, 10);
    assert_eq!(view.seq, 1);
    server.shutdown().await;
}
