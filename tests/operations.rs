//! Operating the real binary: one process per data directory (the `DIR/LOCK` lock), flags
//! out of their bounds, boolean environment variables, logs without colour escapes off a
//! terminal, and fail-stop (a failed invariant ends the whole process; the next start
//! recovers every acknowledged change).

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::{Duration, Instant};

use coffer::server::{ServerConfig, ServerError};
use coffer::storage::DirLockError;
use coffer::{EngineConfig, Server};
use common::process::{
    coffer_bin, free_port, http_client, start_server, start_server_with_env, ServerProcess,
};
use common::TestServer;
use serde_json::{json, Value};

/// How long a refused start may take: it must fail at once, not after recovery or a timeout.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a graceful stop, or the abort after a failed invariant, may take.
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

// ---------------------------------------------------------------------------------------
// Flags.

/// Runs `coffer serve` with `args` and `envs` on a fresh directory and expects a refusal:
/// a non-zero exit within the bound, and stderr naming `flag`. Nothing is written.
async fn assert_refused(args: &[&str], envs: &[(&str, &str)], flag: &str) {
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    let log = root.path().join("stderr.log");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut server = ServerProcess::spawn(&coffer_bin(), &data, &listen, &log, args, envs);
    let what = format!("{args:?} {envs:?}");
    let status = server
        .wait_exit(REFUSAL_TIMEOUT)
        .await
        .unwrap_or_else(|| panic!("{what}: the server started:\n{}", server.log_text()));
    let text = server.log_text();
    assert!(!status.success(), "{what}: exit {status:?}");
    assert!(
        text.contains(flag),
        "{what}: stderr does not name {flag}:\n{text}"
    );
    assert!(!data.exists(), "{what}: the data directory was touched");
}

#[tokio::test]
async fn a_flag_out_of_its_bounds_stops_the_start_and_names_the_flag() {
    // Goal: every bounded flag refuses a value outside its bounds, from the command line and
    // from its environment variable, instead of raising or lowering it.
    let cases: [(&str, &str, &str); 14] = [
        ("--wal-segment-bytes", "COFFER_WAL_SEGMENT_BYTES", "100"),
        ("--wal-segment-bytes", "COFFER_WAL_SEGMENT_BYTES", "4095"),
        (
            "--wal-segment-bytes",
            "COFFER_WAL_SEGMENT_BYTES",
            "1073741825",
        ),
        ("--workers", "COFFER_WORKERS", "0"),
        ("--workers", "COFFER_WORKERS", "1025"),
        ("--actors", "COFFER_ACTORS", "0"),
        ("--mailbox-capacity", "COFFER_MAILBOX_CAPACITY", "0"),
        ("--mailbox-capacity", "COFFER_MAILBOX_CAPACITY", "1048577"),
        ("--max-connections", "COFFER_MAX_CONNECTIONS", "0"),
        ("--history-limit", "COFFER_HISTORY_LIMIT", "0"),
        ("--rate-limit-burst", "COFFER_RATE_LIMIT_BURST", "0"),
        ("--request-timeout", "COFFER_REQUEST_TIMEOUT", "0s"),
        ("--header-read-timeout", "COFFER_HEADER_READ_TIMEOUT", "0s"),
        (
            "--idempotency-ttl",
            "COFFER_IDEMPOTENCY_TTL",
            "600000000years",
        ),
    ];
    for (flag, env, value) in cases {
        assert_refused(&[flag, value], &[], flag).await;
        assert_refused(&[], &[(env, value)], flag).await;
    }
    // The smallest segment size is accepted as it is.
    let root = tempfile::tempdir().expect("tempdir");
    let server = start_server(
        &coffer_bin(),
        root.path(),
        root.path(),
        &["--wal-segment-bytes", "4096"],
    )
    .await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boolean_environment_variables_take_1_0_true_and_false() {
    // Goal: COFFER_INSECURE_NO_AUTH=1/true turn the flag on, 0/false leave it off (a
    // public address is then refused), and anything else is refused naming the flag.
    let root = tempfile::tempdir().expect("tempdir");
    let bin = coffer_bin();
    for value in ["1", "true", "TRUE", "0", "false"] {
        let data = root.path().join(format!("data-{value}"));
        let env = [("COFFER_INSECURE_NO_AUTH", value)];
        let server = start_server_with_env(&bin, &data, root.path(), &[], &env).await;
        let on = server
            .log_text()
            .contains("--insecure-no-auth: serving without");
        assert_eq!(on, ["1", "true", "TRUE"].contains(&value), "{value}");
    }
    for value in ["0", "false"] {
        let out = Command::new(&bin)
            .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
            .arg(root.path().join("public"))
            .env("COFFER_INSECURE_NO_AUTH", value)
            .env_remove("COFFER_AUTH_TOKENS")
            .env_remove("COFFER_AUTH_TOKENS_FILE")
            .output()
            .expect("run coffer");
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{value}: {text}");
        assert!(text.contains("non-loopback"), "{value}: {text}");
    }
    assert_refused(
        &[],
        &[("COFFER_INSECURE_NO_AUTH", "maybe")],
        "--insecure-no-auth",
    )
    .await;
}

#[tokio::test]
async fn logs_to_a_file_or_a_pipe_have_no_colour_escapes() {
    // Goal: without a terminal on stderr, text logs carry no ANSI escapes, with NO_COLOR
    // unset: a server's log in a file, and a refused start's error through a pipe.
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    let listen = format!("127.0.0.1:{}", free_port());
    let log = root.path().join("server.log");
    let mut command = Command::new(coffer_bin());
    command
        .args(["serve", "--listen", &listen, "--data-dir"])
        .arg(&data)
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
    let mut child = command.spawn().expect("spawn coffer");
    let deadline = Instant::now() + common::process::READY_TIMEOUT;
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("coffer ready") || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(text.contains("coffer ready"), "{text}");
    assert!(!text.contains('\u{1b}'), "escapes in a log file:\n{text:?}");

    let missing = root.path().join("no-tokens-file");
    let out = Command::new(coffer_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(root.path().join("other"))
        .arg("--auth-tokens-file")
        .arg(&missing)
        .env_remove("NO_COLOR")
        .output()
        .expect("run coffer");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(text.contains("cannot read the tokens file"), "{text}");
    assert!(!text.contains('\u{1b}'), "escapes in a pipe:\n{text:?}");
}

// ---------------------------------------------------------------------------------------
// Fail-stop.

/// The amount the test hook turns into a failed invariant.
const POISONED_AMOUNT: u64 = 777;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_invariant_ends_the_process_and_a_restart_serves_every_acknowledged_change() {
    // Goal: with the debug-only hook, a credit of the poisoned amount fails an invariant in
    // its account's actor; the whole process aborts at once (SIGABRT), that credit never
    // got a 2xx, and a restart serves every acknowledged change and verifies.
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    let bin = coffer_bin();
    let client = http_client();
    let poisoned = POISONED_AMOUNT.to_string();
    let env = [("COFFER_TEST_PANIC_ON_CREDIT_AMOUNT", poisoned.as_str())];
    let mut server = start_server_with_env(&bin, &data, root.path(), &[], &env).await;
    let accounts = ["alice", "bob", "carol"];
    for id in accounts {
        put_account(&client, &server, id).await;
    }
    for i in 0..12u64 {
        let id = accounts[(i % 3) as usize];
        let status = credit(&client, &server, id, &format!("k{i}"), 10 + i).await;
        assert_eq!(status, Some(201), "credit {i}");
    }

    let started = Instant::now();
    let answer = credit(&client, &server, "bob", "poison", POISONED_AMOUNT).await;
    assert!(
        !answer.is_some_and(|status| (200..300).contains(&status)),
        "the poisoned credit was acknowledged: {answer:?}"
    );
    let status = server
        .wait_exit(EXIT_TIMEOUT)
        .await
        .unwrap_or_else(|| panic!("the process kept running:\n{}", server.log_text()));
    let log = server.log_text();
    assert!(started.elapsed() < EXIT_TIMEOUT);
    assert!(!status.success(), "{status:?}");
    assert_eq!(
        status.signal(),
        Some(6),
        "SIGABRT expected: {status:?}\n{log}"
    );
    assert!(log.contains("invariant failed on purpose"), "{log}");
    assert!(log.contains("stopping the process"), "{log}");
    drop(server);

    let server = start_server(&bin, &data, root.path(), &[]).await;
    for (a, id) in accounts.iter().enumerate() {
        let expected: u64 = (0..12u64)
            .filter(|i| i % 3 == a as u64)
            .map(|i| 10 + i)
            .sum();
        let (status, account) = get_json(&client, &server.url(&format!("/v1/accounts/{id}"))).await;
        assert_eq!(status, 200);
        assert_eq!(account["balance"], expected, "{id}: {account}");
        assert_eq!(account["seq"], 4, "{id}: {account}");
    }
    let url = server.url("/v1/accounts/bob/idempotency-keys/poison");
    assert_eq!(
        get_json(&client, &url).await.0,
        404,
        "the poisoned credit left no trace"
    );
    server.sigterm();
    let mut server = server;
    assert!(server
        .wait_exit(EXIT_TIMEOUT)
        .await
        .is_some_and(|s| s.success()));
    drop(server);
    let verified = coffer(&["wal", "verify", "--data-dir", &data.display().to_string()]);
    let out = String::from_utf8_lossy(&verified.stdout);
    assert!(verified.status.success(), "{verified:?}");
    assert!(out.starts_with("ok: "), "{out}");
    assert!(out.contains("3 accounts"), "{out}");
}
