//! Shared helpers for integration tests: a real coffer server on `127.0.0.1:0` over a
//! temporary data directory, and an HTTP client for it; `process` runs the binary.

#![allow(dead_code)]

pub mod process;

use std::time::Duration;

use coffer::engine::{Engine, EngineConfig};
use coffer::server::ServerConfig;
use coffer::Server;
use tempfile::TempDir;

/// A running server on a temporary data directory, with a client pointed at it.
pub struct TestServer {
    server: Option<Server>,
    server_config: ServerConfig,
    config: EngineConfig,
    /// The data directory; it lives as long as the `TestServer`.
    pub dir: TempDir,
    /// A client without proxies and with a bounded timeout.
    pub client: reqwest::Client,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
}

impl TestServer {
    /// Starts a server with the default engine configuration.
    pub async fn start() -> TestServer {
        TestServer::start_with(|_| {}).await
    }

    /// Starts a server after `configure` adjusted the engine configuration (e.g. its clock).
    pub async fn start_with(configure: impl FnOnce(&mut EngineConfig)) -> TestServer {
        TestServer::start_configured(ServerConfig::new("127.0.0.1:0"), configure).await
    }

    /// Starts a server with `server_config` (authentication, limits, TLS; its `listen`
    /// should be `127.0.0.1:0`) after `configure` adjusted the engine configuration. With
    /// TLS, `base` is `https://...` and `client` does not trust the certificate: make one
    /// that does.
    pub async fn start_configured(
        server_config: ServerConfig,
        configure: impl FnOnce(&mut EngineConfig),
    ) -> TestServer {
        let dir = tempfile::tempdir().expect("create a temp dir");
        let mut config = EngineConfig::new(dir.path());
        configure(&mut config);
        let server = Server::start_with(server_config.clone(), config.clone())
            .await
            .expect("start the server");
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("build the HTTP client");
        let base = base_of(&server_config, &server);
        TestServer {
            server: Some(server),
            server_config,
            config,
            dir,
            client,
            base,
        }
    }

    /// The absolute URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// GET `path` and its body as JSON; panics, naming `path`, if either fails.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let response = self.client.get(self.url(path)).send().await;
        let response = response.unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let body = response.json().await;
        body.unwrap_or_else(|e| panic!("GET {path}: not JSON: {e}"))
    }

    /// GET `path` and its body as text; panics, naming `path`, if either fails.
    pub async fn get_text(&self, path: &str) -> String {
        let response = self.client.get(self.url(path)).send().await;
        let response = response.unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let body = response.text().await;
        body.unwrap_or_else(|e| panic!("GET {path}: body: {e}"))
    }

    /// The address the running server listens on.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.server
            .as_ref()
            .map(Server::addr)
            .expect("the server is running")
    }

    /// The address of the separate `/metrics` listener, if configured.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.server.as_ref().and_then(Server::metrics_addr)
    }

    /// The running server's engine.
    pub fn engine(&self) -> &Engine {
        self.server
            .as_ref()
            .and_then(Server::engine)
            .expect("the server is running and ready")
    }

    /// Shuts the server down gracefully, then starts a new one on the same data directory
    /// and configuration (same clock); the client then talks to the new one.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.resume().await;
    }

    /// Starts a new server on the same data directory and configuration after [`stop`]
    /// (recovery runs before it returns); the client then talks to the new one.
    ///
    /// [`stop`]: TestServer::stop
    pub async fn resume(&mut self) {
        assert!(self.server.is_none(), "resume() needs a stopped server");
        let server = Server::start_with(self.server_config.clone(), self.config.clone())
            .await
            .expect("restart the server");
        self.base = base_of(&self.server_config, &server);
        self.server = Some(server);
    }

    /// Shuts the server down gracefully (the data directory stays).
    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }
}

fn base_of(server_config: &ServerConfig, server: &Server) -> String {
    let scheme = if server_config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{}", server.addr())
}
