//! `/metrics` (Prometheus text format): request latency histograms by route template,
//! method and status; WAL group-commit sizes and fsync times; recovery time; and no raw
//! account id in any label.

mod common;

use common::TestServer;
use serde_json::json;

/// The value of the first sample line that starts with `name{` (or `name `) and contains
/// every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn requests_are_timed_by_route_method_and_status_and_the_wal_by_batch_and_fsync() {
    let ts = TestServer::start().await;
    let client = &ts.client;
    let put = client
        .put(ts.url("/v1/accounts/player-secret-7"))
        .json(&json!({"currency": "GEM"}))
        .send()
        .await
        .expect("put");
    assert_eq!(put.status(), 201);
    for n in 0..3 {
        let r = client
            .post(ts.url("/v1/accounts/player-secret-7/credits"))
            .header("idempotency-key", format!("k{n}"))
            .json(&json!({"amount": 5}))
            .send()
            .await
            .expect("credit");
        assert_eq!(r.status(), 201);
    }
    let missing = client
        .get(ts.url("/v1/accounts/nobody"))
        .send()
        .await
        .expect("get");
    assert_eq!(missing.status(), 404);
    let unmatched = client.get(ts.url("/nowhere")).send().await.expect("get");
    assert_eq!(unmatched.status(), 404);

    let text = ts.get_text("/metrics").await;
    let count = "coffer_http_request_duration_seconds_count";
    assert_eq!(
        sample(
            &text,
            count,
            &[
                r#"route="/v1/accounts/{id}/credits""#,
                r#"method="POST""#,
                r#"status="201""#
            ]
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            count,
            &[
                r#"route="/v1/accounts/{id}""#,
                r#"method="GET""#,
                r#"status="404""#
            ]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, count, &[r#"route="unmatched""#, r#"status="404""#]),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            "coffer_http_request_duration_seconds_bucket",
            &[r#"route="/v1/accounts/{id}/credits""#, r#"le="+Inf""#]
        ) == Some(3.0),
        "{text}"
    );
    assert!(!text.contains("player-secret-7"), "a raw id in a label");

    let batches = sample(&text, "coffer_wal_batch_records_count", &[]).expect("batches");
    let records = sample(&text, "coffer_wal_batch_records_sum", &[]).expect("records");
    assert!(batches >= 1.0 && records >= 4.0, "{text}");
    let fsyncs = sample(&text, "coffer_wal_fsync_seconds_count", &[]).expect("fsyncs");
    assert_eq!(fsyncs, batches, "one fsync per group commit");
    assert!(sample(&text, "coffer_wal_fsync_seconds_sum", &[]).is_some_and(|s| s > 0.0));
    assert!(sample(&text, "coffer_recovery_seconds", &[]).is_some_and(|s| s >= 0.0));
    for gauge in [
        "coffer_wal_durable_lsn",
        "coffer_mailbox_depth",
        "coffer_live_actors",
        "coffer_accounts",
        "coffer_open_holds",
    ] {
        assert!(sample(&text, gauge, &[]).is_some(), "{gauge} missing");
    }
}
