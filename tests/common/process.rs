//! The real `coffer` binary as a child process: `coffer serve` on a free port of 127.0.0.1
//! with its stderr in a log file, waited for (bounded) until it is ready, and killed and
//! reaped when dropped, whatever the test did.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a server may take to report ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Timeout of each request of [`http_client`].
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Ports tried before giving up (another process may take a free port before the server
/// binds it).
const BIND_ATTEMPTS: usize = 8;

/// A running `coffer serve`; killed (SIGKILL) and reaped when dropped.
pub struct ServerProcess {
    /// The process.
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Its stderr.
    pub log: PathBuf,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServerProcess {
    /// Spawns `bin serve --data-dir DATA --listen LISTEN ARGS...` with `envs` added to the
    /// environment and stderr to `log`; does not wait for anything.
    pub fn spawn(
        bin: &Path,
        data_dir: &Path,
        listen: &str,
        log: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> ServerProcess {
        let log_file = File::create(log).expect("create the server log");
        let child = Command::new(bin)
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(listen)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} serve: {e}", bin.display()));
        ServerProcess {
            child,
            base: format!("http://{listen}"),
            log: log.to_path_buf(),
        }
    }

    /// What it wrote to stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The absolute URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Sends SIGKILL and waits for the process; asserts it died of the signal.
    pub fn sigkill(&mut self) {
        self.child.kill().expect("SIGKILL the server");
        let status = self.child.wait().expect("reap the killed server");
        assert_eq!(
            status.signal(),
            Some(9),
            "the server should have died of SIGKILL, got {status:?}; log:\n{}",
            self.log_text()
        );
    }

    /// Sends SIGTERM through `kill(1)`.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(status.success(), "kill -TERM failed: {status:?}");
    }

    /// Waits (bounded) for the process to exit on its own.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait on the server") {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

/// A port of 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

/// A client without proxies and with a bounded timeout.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("build an HTTP client")
}

/// The binary cargo built for the tests.
pub fn coffer_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_coffer"))
}

/// Starts `bin serve` on `data_dir` and a free port of 127.0.0.1 (stderr in a new file in
/// `logs`) and waits until `/readyz` is 200 and the process logged that it is ready. Retries
/// with another port if the bind failed; panics, with the log, if it exits otherwise.
pub async fn start_server(
    bin: &Path,
    data_dir: &Path,
    logs: &Path,
    args: &[&str],
) -> ServerProcess {
    start_server_with_env(bin, data_dir, logs, args, &[]).await
}

/// [`start_server`] with `envs` added to the server's environment.
pub async fn start_server_with_env(
    bin: &Path,
    data_dir: &Path,
    logs: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
) -> ServerProcess {
    static STARTS: AtomicUsize = AtomicUsize::new(0);
    let client = http_client();
    for _ in 0..BIND_ATTEMPTS {
        let listen = format!("127.0.0.1:{}", free_port());
        let n = STARTS.fetch_add(1, Ordering::Relaxed);
        let log = logs.join(format!("server-{n}.log"));
        let mut server = ServerProcess::spawn(bin, data_dir, &listen, &log, args, envs);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = server.child.try_wait().expect("try_wait") {
                let log = server.log_text();
                if log.contains("cannot listen") {
                    break; // the port was taken meanwhile: try another one
                }
                panic!("coffer exited before it was ready ({status:?}); log:\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "coffer was not ready within {READY_TIMEOUT:?}; log:\n{}",
                server.log_text()
            );
            let ready = client
                .get(server.url("/readyz"))
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            // The log line rules out answers from another process on a reused port.
            if ready && server.log_text().contains("coffer ready") {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    panic!("could not start coffer on a free port in {BIND_ATTEMPTS} attempts");
}
