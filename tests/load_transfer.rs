//! `coffer load --workload transfer | transfer-hot` against a real server on 127.0.0.1: a
//! short, bounded run completes transfers, refuses nothing, and the final check finds every
//! balance equal to what the acknowledged transfers imply.

mod common;

use std::time::Duration;

use coffer::load::{self, LoadArgs, LoadReport, Workload};
use common::TestServer;

/// Upper bound of one load run, setup and check included.
const RUN_DEADLINE: Duration = Duration::from_secs(60);

fn args(ts: &TestServer, workload: Workload, accounts: u64, prefix: &str) -> LoadArgs {
    let target = ts
        .base
        .trim_start_matches("http://")
        .parse()
        .expect("the test server's address");
    LoadArgs {
        target,
        workload,
        accounts,
        connections: 4,
        duration: Duration::from_millis(800),
        rate: None,
        batch: 1,
        prefix: prefix.to_string(),
        json: false,
        quiet: true,
        token: None,
        tls_ca: None,
        tls_server_name: None,
        consumers: 0,
        tls: None,
    }
}

async fn run(args: LoadArgs) -> LoadReport {
    tokio::time::timeout(RUN_DEADLINE, load::run(args))
        .await
        .expect("the load run ends in time")
        .expect("the load run succeeds")
}

fn assert_clean(report: &LoadReport) {
    assert!(report.flows > 0, "no transfer completed: {}", report.text());
    assert!(report.errors.is_empty(), "refusals: {}", report.text());
    assert_eq!(report.mismatched_accounts, 0, "{}", report.text());
    assert!(report.latency_ms.p50 > 0.0, "{}", report.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_workload_moves_money_between_random_pairs() {
    // Goal: random-pair transfers complete and every touched account ends where they say.
    let mut ts = TestServer::start().await;
    let report = run(args(&ts, Workload::Transfer, 20, "tr")).await;
    assert_clean(&report);
    assert_eq!(report.workload, Workload::Transfer);
    // Each transfer touches two accounts; a short run touches several.
    assert!(report.verified_accounts >= 2, "{}", report.text());
    // Money is conserved: the sum of all balances is what setup credited.
    let mut total = 0u64;
    for i in 0..20 {
        let account: serde_json::Value = ts.get_json(&format!("/v1/accounts/tr-{i}")).await;
        total += account["balance"].as_u64().expect("a balance");
    }
    assert_eq!(total, 20 * 1_000_000_000_000);
    // A second run over the same accounts starts from their current balances.
    let again = run(args(&ts, Workload::Transfer, 20, "tr")).await;
    assert_clean(&again);
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_hot_workload_credits_one_destination() {
    // Goal: every transfer goes to account 0, which gains exactly the completed flows.
    let mut ts = TestServer::start().await;
    let report = run(args(&ts, Workload::TransferHot, 10, "th")).await;
    assert_clean(&report);
    let hot: serde_json::Value = ts.get_json("/v1/accounts/th-0").await;
    assert_eq!(
        hot["balance"].as_u64(),
        Some(1_000_000_000_000 + report.flows),
        "{}",
        report.text()
    );
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_workloads_refuse_one_account_and_batches() {
    // Goal: a transfer needs two accounts, and batches carry no transfers: both are errors.
    let mut ts = TestServer::start().await;
    let one = args(&ts, Workload::Transfer, 1, "t1");
    assert!(tokio::time::timeout(RUN_DEADLINE, load::run(one))
        .await
        .expect("ends in time")
        .is_err());
    let mut batched = args(&ts, Workload::TransferHot, 4, "t2");
    batched.batch = 10;
    assert!(tokio::time::timeout(RUN_DEADLINE, load::run(batched))
        .await
        .expect("ends in time")
        .is_err());
    ts.stop().await;
}
