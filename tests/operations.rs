//! Operating the real binary: one process per data directory (the `DIR/LOCK` lock).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use coffer::server::{ServerConfig, ServerError};
use coffer::storage::DirLockError;
use coffer::{EngineConfig, Server};
use common::process::{coffer_bin, free_port, http_client, start_server, ServerProcess};
use common::TestServer;
use serde_json::{json, Value};

/// How long a refused start may take: it must fail at once, not after recovery or a timeout.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a graceful stop may take.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

async fn put_account(client: &reqwest::Client, server: &ServerProcess, id: &str) {
    let response = client
        .put(server.url(&format!("/v1/accounts/{id}")))
        .json(&json!({"currency": "GEM"}))
        .send()
        .await
        .expect("PUT account");
    assert_eq!(response.status(), 201, "PUT {id}");
}

/// Sends a credit; its status, or `None` when no answer came (the connection failed).
async fn credit(
    client: &reqwest::Client,
    server: &ServerProcess,
    id: &str,
    key: &str,
    amount: u64,
) -> Option<u16> {
    let response = client
        .post(server.url(&format!("/v1/accounts/{id}/credits")))
        .header("Idempotency-Key", key)
        .json(&json!({ "amount": amount }))
        .send()
        .await
        .ok()?;
    Some(response.status().as_u16())
}

async fn get_json(client: &reqwest::Client, url: &str) -> (u16, Value) {
    let response = client.get(url).send().await.expect("GET");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn coffer(args: &[&str]) -> std::process::Output {
    Command::new(coffer_bin())
        .args(args)
        .output()
        .expect("run coffer")
}

// ---------------------------------------------------------------------------------------
// One process per data directory.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_a_locked_directory_refuses_and_the_first_keeps_everything() {
    // Goal: a second `coffer serve` on the same directory exits non-zero at once naming the
    // directory and the holder's pid; the first keeps serving, `wal verify` runs beside it,
    // and after the first stops a new server has every acknowledged change.
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    let logs = root.path().join("logs");
    std::fs::create_dir_all(&logs).expect("logs");
    let bin = coffer_bin();
    let client = http_client();

    let mut first = start_server(&bin, &data, &logs, &[]).await;
    put_account(&client, &first, "alice").await;
    for i in 0..10 {
        let status = credit(&client, &first, "alice", &format!("before-{i}"), 10).await;
        assert_eq!(status, Some(201));
    }
    let lock_text = std::fs::read_to_string(data.join("LOCK")).expect("the lock file");
    assert_eq!(lock_text.trim(), first.child.id().to_string());

    let listen = format!("127.0.0.1:{}", free_port());
    let log = logs.join("second.log");
    let mut second = ServerProcess::spawn(&bin, &data, &listen, &log, &[], &[]);
    let started = Instant::now();
    let status = second
        .wait_exit(REFUSAL_TIMEOUT)
        .await
        .unwrap_or_else(|| panic!("the second server kept running:\n{}", second.log_text()));
    let text = second.log_text();
    assert!(
        !status.success(),
        "the second server exited with {status:?}"
    );
    assert!(started.elapsed() < REFUSAL_TIMEOUT, "{text}");
    assert!(
        text.contains(&data.display().to_string()),
        "names the data directory:\n{text}"
    );
    assert!(
        text.contains(&format!("pid {}", first.child.id())),
        "names the holder's pid:\n{text}"
    );
    assert!(!text.contains("listening"), "never bound its port:\n{text}");
    assert!(reqwest::get(format!("http://{listen}/healthz"))
        .await
        .is_err());

    // The first one is not disturbed, and the offline check runs beside it.
    assert_eq!(
        credit(&client, &first, "alice", "after-refusal", 5).await,
        Some(201)
    );
    let verified = coffer(&["wal", "verify", "--data-dir", &data.display().to_string()]);
    let out = String::from_utf8_lossy(&verified.stdout);
    assert!(verified.status.success(), "{verified:?}");
    assert!(out.starts_with("ok: "), "{out}");
    assert!(out.contains("1 accounts"), "{out}");

    first.sigterm();
    let stopped = first
        .wait_exit(EXIT_TIMEOUT)
        .await
        .expect("a graceful stop");
    assert!(stopped.success(), "{stopped:?}: {}", first.log_text());
    drop(first);

    let third = start_server(&bin, &data, &logs, &[]).await;
    let (status, account) = get_json(&client, &third.url("/v1/accounts/alice")).await;
    assert_eq!(status, 200);
    assert_eq!(account["balance"], 105, "{account}");
    assert_eq!(account["seq"], 11, "{account}");
    for key in ["before-0", "before-9", "after-refusal"] {
        let url = third.url(&format!("/v1/accounts/alice/idempotency-keys/{key}"));
        assert_eq!(get_json(&client, &url).await.0, 200, "{key}");
    }
}

#[tokio::test]
async fn in_one_process_the_lock_refuses_a_second_server_until_the_first_shuts_down() {
    // Goal: `Server::start_with` takes the lock too, so an in-process second server on the
    // same directory is refused with the holder (this process), and a restart after
    // shutdown works.
    let mut ts = TestServer::start().await;
    let second = Server::start_with(
        ServerConfig::new("127.0.0.1:0"),
        EngineConfig::new(ts.dir.path()),
    )
    .await;
    match second {
        Err(ServerError::Lock(DirLockError::Held { dir, pid })) => {
            assert_eq!(dir, ts.dir.path());
            assert_eq!(pid, Some(std::process::id()));
        }
        Err(other) => panic!("expected the lock to be held, got {other}"),
        Ok(_) => panic!("a second server started on a locked directory"),
    }
    ts.restart().await;
    assert_eq!(ts.get_json("/readyz").await["status"], "ready");
    ts.stop().await;
}
