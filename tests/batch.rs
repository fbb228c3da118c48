//! `POST /v1/batch` against a real server: every operation is answered in order exactly as
//! its single endpoint would answer it, errors stay per operation, operations on one account
//! apply in the order given, and only a malformed request refuses the whole batch.

mod common;

use common::TestServer;
use serde_json::{json, Value};

async fn open(ts: &TestServer, id: &str) {
    let r = ts
        .client
        .put(ts.url(&format!("/v1/accounts/{id}")))
        .json(&json!({"currency": "GEM"}))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 201);
}

async fn batch(ts: &TestServer, body: &Value) -> (u16, Value) {
    let r = ts
        .client
        .post(ts.url("/v1/batch"))
        .json(body)
        .send()
        .await
        .expect("batch");
    let status = r.status().as_u16();
    (status, r.json().await.expect("json"))
}

async fn account(ts: &TestServer, id: &str) -> Value {
    ts.get_json(&format!("/v1/accounts/{id}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_results_match_the_single_endpoints_in_order() {
    // Goal: a batch over two accounts answers each operation in order with the status and
    // body of its single endpoint, and a later single request with the same key replays
    // exactly the body the batch returned.
    let ts = TestServer::start().await;
    open(&ts, "a").await;
    open(&ts, "b").await;
    let (status, body) = batch(
        &ts,
        &json!({"operations": [
            {"op": "credit", "account": "a", "amount": 100, "idempotency_key": "k1"},
            {"op": "credit", "account": "b", "amount": 50, "idempotency_key": "k1", "metadata": {"m": "1"}},
            {"op": "debit", "account": "a", "amount": 30, "idempotency_key": "k2"},
            {"op": "hold", "account": "b", "amount": 20, "expires_in_secs": 60, "idempotency_key": "k3"},
            {"op": "debit", "account": "b", "amount": 31, "idempotency_key": "k4"},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().expect("results");
    assert_eq!(results.len(), 5);
    let statuses: Vec<u64> = results
        .iter()
        .map(|r| r["status"].as_u64().expect("status"))
        .collect();
    assert_eq!(statuses, [201, 201, 201, 201, 409]);
    assert!(results.iter().all(|r| r["replayed"] == false));
    assert_eq!(results[0]["body"]["transaction"]["seq"], 1);
    assert_eq!(results[2]["body"]["account"]["balance"], 70);
    assert_eq!(results[3]["body"]["hold"]["status"], "open");
    assert_eq!(results[3]["body"]["account"]["available"], 30);
    assert_eq!(results[4]["body"]["code"], "insufficient_funds");
    assert_eq!(results[4]["body"]["detail"], "available 30 is less than 31");

    // The single endpoint, same key and body, replays what the batch answered.
    let r = ts
        .client
        .post(ts.url("/v1/accounts/a/debits"))
        .header("Idempotency-Key", "k2")
        .json(&json!({"amount": 30}))
        .send()
        .await
        .expect("single");
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    let single: Value = r.json().await.expect("json");
    assert_eq!(single, results[2]["body"]);
    assert_eq!(account(&ts, "a").await["balance"], 70);
    assert_eq!(account(&ts, "b").await["held"], 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_stay_with_their_operation() {
    // Goal: malformed, unknown-account, key-less and invalid operations get their own error
    // results while the valid operations of the same batch apply.
    let ts = TestServer::start().await;
    open(&ts, "a").await;
    let (status, body) = batch(
        &ts,
        &json!({"operations": [
            {"op": "credit", "account": "a", "amount": 10, "idempotency_key": "ok1"},
            {"op": "teleport", "account": "a", "amount": 1, "idempotency_key": "x1"},
            {"op": "credit", "account": "nobody", "amount": 1, "idempotency_key": "x2"},
            {"op": "credit", "account": "a", "amount": 1},
            {"op": "credit", "account": "a", "amount": 0, "idempotency_key": "x3"},
            {"op": "credit", "account": "a", "amount": "5", "idempotency_key": "x4"},
            {"op": "credit", "account": "bad id", "amount": 1, "idempotency_key": "x5"},
            {"op": "capture", "account": "a", "hold_id": "0193a2b4-0000-7000-8000-000000000000", "idempotency_key": "x6"},
            {"op": "credit", "account": "a", "amount": 1, "hold_id": "0193a2b4-0000-7000-8000-000000000000", "idempotency_key": "x7"},
            [1, 2],
            {"op": "debit", "account": "a", "amount": 4, "idempotency_key": "ok2"},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let codes: Vec<(u64, String)> = body["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| {
            (
                r["status"].as_u64().expect("status"),
                r["body"]["code"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let expect = [
        (201, ""),
        (400, "invalid_request"),
        (404, "account_not_found"),
        (400, "idempotency_key_missing"),
        (422, "validation_failed"),
        (400, "invalid_request"),
        (400, "invalid_request"),
        (404, "hold_not_found"),
        (400, "invalid_request"),
        (400, "invalid_request"),
        (201, ""),
    ];
    let expect: Vec<(u64, String)> = expect.iter().map(|(s, c)| (*s, c.to_string())).collect();
    assert_eq!(codes, expect);
    // Each refusal names its operation's offending field; a missing key is the operation's
    // own `idempotency_key`, not the header a single endpoint would need.
    let fields: Vec<Option<&str>> = body["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["body"]["field"].as_str())
        .collect();
    assert_eq!(
        fields,
        [
            None,
            Some("/operations/1/op"),
            None,
            Some("/operations/3/idempotency_key"),
            Some("/operations/4/amount"),
            Some("/operations/5/amount"),
            Some("/operations/6/account"),
            None,
            Some("/operations/8/hold_id"),
            Some("/operations/9"),
            None,
        ]
    );
    let missing = &body["results"][3]["body"]["detail"];
    assert!(
        missing
            .as_str()
            .is_some_and(|d| d.contains("idempotency_key") && !d.contains("header")),
        "{missing}"
    );
    let a = account(&ts, "a").await;
    assert_eq!(a["balance"], 6);
    assert_eq!(a["seq"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_on_one_account_apply_in_the_order_given() {
    // Goal: a credit before a debit funds it; the debit before the credit is refused.
    let ts = TestServer::start().await;
    open(&ts, "a").await;
    let (_, body) = batch(
        &ts,
        &json!({"operations": [
            {"op": "credit", "account": "a", "amount": 5, "idempotency_key": "c1"},
            {"op": "debit", "account": "a", "amount": 5, "idempotency_key": "d1"},
            {"op": "debit", "account": "a", "amount": 5, "idempotency_key": "d2"},
            {"op": "credit", "account": "a", "amount": 5, "idempotency_key": "c2"},
        ]}),
    )
    .await;
    let statuses: Vec<u64> = body["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["status"].as_u64().expect("status"))
        .collect();
    assert_eq!(statuses, [201, 201, 409, 201]);
    let seqs: Vec<u64> = body["results"]
        .as_array()
        .expect("results")
        .iter()
        .filter_map(|r| r["body"]["transaction"]["seq"].as_u64())
        .collect();
    assert_eq!(seqs, [1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_batch_applies_nothing_twice() {
    // Goal: sending the same batch again (and a key repeated inside one batch) answers with
    // the stored results marked replayed, and balances move once.
    let ts = TestServer::start().await;
    open(&ts, "a").await;
    let ops = json!({"operations": [
        {"op": "credit", "account": "a", "amount": 7, "idempotency_key": "k"},
        {"op": "credit", "account": "a", "amount": 7, "idempotency_key": "k"},
        {"op": "credit", "account": "a", "amount": 8, "idempotency_key": "k"},
    ]});
    let (_, first) = batch(&ts, &ops).await;
    let first = first["results"].as_array().expect("results").clone();
    assert_eq!(first[0]["replayed"], false);
    assert_eq!(first[1]["replayed"], true);
    assert_eq!(first[1]["body"], first[0]["body"]);
    assert_eq!(first[2]["status"], 422);
    assert_eq!(first[2]["body"]["code"], "idempotency_key_reused");
    let (_, second) = batch(&ts, &ops).await;
    let second = second["results"].as_array().expect("results").clone();
    assert_eq!(second[0]["replayed"], true);
    assert_eq!(second[0]["body"], first[0]["body"]);
    assert_eq!(account(&ts, "a").await["balance"], 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_malformed_request_refuses_the_whole_batch() {
    // Goal: not JSON, not an object, unknown top-level fields (400), no or too many
    // operations (422) and a body over 1 MiB (413) refuse everything and apply nothing.
    let ts = TestServer::start().await;
    open(&ts, "a").await;
    let send = |body: String| {
        let request = ts
            .client
            .post(ts.url("/v1/batch"))
            .header("content-type", "application/json")
            .body(body);
        async move {
            let r = request.send().await.expect("send");
            let status = r.status().as_u16();
            let body: Value = r.json().await.expect("json");
            (status, body["code"].as_str().unwrap_or("").to_string())
        }
    };
    let op = json!({"op": "credit", "account": "a", "amount": 1, "idempotency_key": "k"});
    let too_many: Vec<Value> = (0..1001)
        .map(|i| json!({"op": "credit", "account": "a", "amount": 1, "idempotency_key": format!("k{i}")}))
        .collect();
    let cases = [
        ("{".to_string(), 400, "invalid_request"),
        ("[]".to_string(), 400, "invalid_request"),
        (
            json!({"operations": [op], "extra": 1}).to_string(),
            400,
            "invalid_request",
        ),
        (
            json!({"operations": "no"}).to_string(),
            400,
            "invalid_request",
        ),
        (
            json!({"operations": []}).to_string(),
            422,
            "validation_failed",
        ),
        (
            json!({"operations": too_many}).to_string(),
            422,
            "validation_failed",
        ),
        (
            format!(
                r#"{{"operations": [{op}], "pad": "{}"}}"#,
                "x".repeat(1024 * 1024)
            ),
            413,
            "payload_too_large",
        ),
    ];
    for (body, status, code) in cases {
        let got = send(body.clone()).await;
        assert_eq!(
            got,
            (status, code.to_string()),
            "body starting {:.60}",
            body
        );
    }
    assert_eq!(account(&ts, "a").await["seq"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_batch_of_1000_operations_is_durable_across_a_restart() {
    // Goal: 1,000 debits over 10 accounts in one request all apply and survive a restart.
    let mut ts = TestServer::start().await;
    for i in 0..10 {
        open(&ts, &format!("acc{i}")).await;
    }
    let credits: Vec<Value> = (0..10)
        .map(|i| json!({"op": "credit", "account": format!("acc{i}"), "amount": 1000, "idempotency_key": "seed"}))
        .collect();
    batch(&ts, &json!({ "operations": credits })).await;
    let debits: Vec<Value> = (0..1000)
        .map(|i| json!({"op": "debit", "account": format!("acc{}", i % 10), "amount": 1, "idempotency_key": format!("d{i}")}))
        .collect();
    let (status, body) = batch(&ts, &json!({ "operations": debits })).await;
    assert_eq!(status, 200);
    assert!(body["results"]
        .as_array()
        .expect("results")
        .iter()
        .all(|r| r["status"] == 201));
    ts.restart().await;
    for i in 0..10 {
        let a = account(&ts, &format!("acc{i}")).await;
        assert_eq!(a["balance"], 900);
        assert_eq!(a["seq"], 101);
    }
}
