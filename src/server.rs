//! Running the server: lock the data directory, bind, serve `/healthz` and `/readyz` while
//! recovery runs, recover, then serve everything; on shutdown stop accepting, finish
//! in-flight requests, flush the WAL and release the lock.
//!
//! Connections are accepted by a loop of our own rather than `axum::serve`, because hyper's
//! header-read timeout (against slowloris), TLS and a connection cap all sit at the
//! connection level. Each connection is HTTP/1.1 (the only protocol the API speaks), over
//! TCP or over rustls.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::engine::{BadSetting, Engine, EngineConfig, EngineError, OpenError};
use crate::http::{self, AppState, RouterConfig};
use crate::storage::{DirLock, DirLockError};

/// Default time a client has to send a request's headers (and, with TLS, its handshake).
pub const HEADER_READ_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Default cap on open connections; past it, new connections wait in the listen backlog.
pub const CONNECTIONS_MAX_DEFAULT: usize = 10_000;
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The data directory is used by another process, or cannot be locked.
    #[error(transparent)]
    Lock(#[from] DirLockError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The error.
        source: std::io::Error,
    },
    /// A non-loopback address without tokens and without `--insecure-no-auth`.
    #[error(
        "refusing to listen on non-loopback address {addr} without authentication: configure \
         tokens (--auth-tokens-file or COFFER_AUTH_TOKENS) or pass --insecure-no-auth"
    )]
    InsecureNoAuth {
        /// The address.
        addr: SocketAddr,
    },
    /// A setting is out of its bounds.
    #[error(transparent)]
    Config(#[from] BadSetting),
    /// The TLS certificate or key could not be loaded.
    #[error("TLS: {0}")]
    Tls(String),
    /// Recovery failed: the data directory could not be read or is corrupt.
    #[error("recovery failed: {0}")]
    Open(#[from] OpenError),
    /// Expiring overdue holds after recovery failed.
    #[error("recovery failed while expiring overdue holds: {0}")]
    Finish(#[from] EngineError),
    /// Recovery panicked or was cancelled.
    #[error("recovery task failed: {0}")]
    Task(String),
}

/// How the server listens and guards its endpoints.
#[derive(Clone)]
pub struct ServerConfig {
    /// The main listen address.
    pub listen: String,
    /// Authentication, rate limit and request timeout.
    pub guard: http::GuardConfig,
    /// A separate address serving `/metrics` only, over plain HTTP and without
    /// authentication; the main listener then has no `/metrics`.
    pub metrics_listen: Option<String>,
    /// TLS on the main listener.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Time a client has to send its request headers (and TLS handshake).
    pub header_read_timeout: Duration,
    /// Open connections at most; more wait in the listen backlog until one closes.
    pub connections_max: usize,
    /// Allow a non-loopback listen address without tokens.
    pub insecure_no_auth: bool,
}

impl ServerConfig {
    /// Defaults: no authentication, no TLS, no rate limit.
    pub fn new(listen: &str) -> ServerConfig {
        ServerConfig {
            listen: listen.to_string(),
            guard: http::GuardConfig::default(),
            metrics_listen: None,
            tls: None,
            header_read_timeout: HEADER_READ_TIMEOUT_DEFAULT,
            connections_max: CONNECTIONS_MAX_DEFAULT,
            insecure_no_auth: false,
        }
    }

    /// Refuses settings the server cannot run with, rather than raising or lowering them.
    pub fn check(&self) -> Result<(), BadSetting> {
        if !(1..=Semaphore::MAX_PERMITS).contains(&self.connections_max) {
            return Err(BadSetting {
                field: "connections_max",
                reason: format!(
                    "{} is not in 1..={}",
                    self.connections_max,
                    Semaphore::MAX_PERMITS
                ),
            });
        }
        Ok(())
    }
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    state: AppState,
    stop: watch::Sender<bool>,
    serving: JoinHandle<()>,
    metrics_serving: Option<JoinHandle<()>>,
    /// The data directory's lock, held until the server is shut down or dropped.
    lock: Option<DirLock>,
}

/// What each connection needs.
struct Connections {
    app: Router,
    tls: Option<TlsAcceptor>,
    header_read_timeout: Duration,
    permits: Arc<Semaphore>,
}

impl Server {
    /// Binds `listen`, starts serving (503 `not_ready` until recovered), recovers the data
    /// directory and returns once the server is ready. No authentication, no TLS.
    pub async fn start(listen: &str, config: EngineConfig) -> Result<Server, ServerError> {
        Server::start_with(ServerConfig::new(listen), config).await
    }

    /// [`Server::start`] with listeners, TLS, authentication and limits as `server` says.
    ///
    /// The data directory is locked first (created if missing), before anything in it is
    /// read and before the port is bound: a second server on the same directory, in this
    /// process or another, fails at once with [`ServerError::Lock`]. The lock is held until
    /// [`Server::shutdown`] has closed the WAL, or until the server is dropped.
    pub async fn start_with(
        server: ServerConfig,
        config: EngineConfig,
    ) -> Result<Server, ServerError> {
        server.check()?;
        config.check()?;
        let lock = DirLock::acquire(&config.data_dir)?;
        let (listener, addr) = bind(&server.listen).await?;
        if server.guard.tokens.is_empty() && !server.insecure_no_auth && !addr.ip().is_loopback() {
            return Err(ServerError::InsecureNoAuth { addr });
        }
        if server.guard.tokens.is_empty() && server.insecure_no_auth {
            tracing::warn!(%addr, "--insecure-no-auth: serving without authentication on any address");
        }
        let metrics = match &server.metrics_listen {
            Some(listen) => Some(bind(listen).await?),
            None => None,
        };
        let state = AppState::new();
        let (stop, stopped) = watch::channel(false);
        let router = RouterConfig {
            guard: server.guard.clone(),
            metrics_elsewhere: metrics.is_some(),
        };
        let main = Connections {
            app: http::router_with(state.clone(), router),
            tls: server.tls.clone().map(TlsAcceptor::from),
            header_read_timeout: server.header_read_timeout,
            permits: Arc::new(Semaphore::new(server.connections_max)),
        };
        let serving = tokio::spawn(accept_loop(listener, Arc::new(main), stopped.clone()));
        let (metrics_addr, metrics_serving) = match metrics {
            Some((listener, metrics_addr)) => {
                let connections = Connections {
                    app: http::metrics_router(state.clone()),
                    tls: None,
                    header_read_timeout: server.header_read_timeout,
                    permits: Arc::new(Semaphore::new(64)),
                };
                let task = tokio::spawn(accept_loop(listener, Arc::new(connections), stopped));
                tracing::info!(addr = %metrics_addr, "serving /metrics");
                (Some(metrics_addr), Some(task))
            }
            None => (None, None),
        };
        tracing::info!(
            %addr,
            tls = server.tls.is_some(),
            auth = !server.guard.tokens.is_empty(),
            data_dir = %config.data_dir.display(),
            "listening; recovering"
        );
        let mut server = Server {
            addr,
            metrics_addr,
            state,
            stop,
            serving,
            metrics_serving,
            lock: Some(lock),
        };
        match recover(config).await {
            Ok(engine) => {
                server.state.set_engine(engine);
                tracing::info!(%addr, "coffer ready");
                Ok(server)
            }
            Err(error) => {
                server.stop_serving().await;
                Err(error)
            }
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address of the separate `/metrics` listener, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The engine.
    pub fn engine(&self) -> Option<&Engine> {
        self.state.engine()
    }

    /// Stops accepting, lets in-flight requests finish (up to a grace period), then flushes
    /// and closes the WAL.
    pub async fn shutdown(mut self) {
        self.stop_serving().await;
        if let Some(engine) = self.state.engine() {
            // A snapshot at shutdown makes the next start replay next to nothing.
            if engine.snapshot_on_shutdown() {
                match engine.snapshot().await {
                    Ok(report) => tracing::info!(
                        lsn = report.lsn,
                        accounts = report.accounts,
                        "snapshot written at shutdown"
                    ),
                    Err(error) => tracing::warn!(%error, "no snapshot at shutdown"),
                }
            }
            engine.shutdown();
        }
        // Only now that the WAL is closed may another server open the directory.
        drop(self.lock.take());
        tracing::info!("coffer stopped");
    }

    async fn stop_serving(&mut self) {
        let _ = self.stop.send(true);
        self.state.begin_stop();
        const GRACE: Duration = Duration::from_secs(10);
        if tokio::time::timeout(GRACE, &mut self.serving)
            .await
            .is_err()
        {
            tracing::warn!("in-flight requests did not finish within the grace period");
            self.serving.abort();
        }
        if let Some(mut metrics) = self.metrics_serving.take() {
            if tokio::time::timeout(GRACE, &mut metrics).await.is_err() {
                metrics.abort();
            }
        }
    }
}

/// Loads a PEM certificate chain and private key into a rustls configuration (ring
/// provider, TLS 1.2 and 1.3, HTTP/1.1 by ALPN).
pub fn load_tls(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ServerError::Tls(format!("certificate {}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(ServerError::Tls(format!(
            "certificate {}: no certificate in the file",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| ServerError::Tls(format!("key {}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServerError::Tls(format!("certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

async fn bind(listen: &str) -> Result<(TcpListener, SocketAddr), ServerError> {
    let error = |source| ServerError::Bind {
        addr: listen.to_string(),
        source,
    };
    let listener = TcpListener::bind(listen).await.map_err(error)?;
    let addr = listener.local_addr().map_err(error)?;
    Ok((listener, addr))
}

/// Accepts until told to stop, one task per connection, at most `permits` at once (the
/// permit is taken before `accept`, so extra connections wait in the kernel's backlog).
/// On stop: stop accepting, close idle connections, let in-flight requests finish.
async fn accept_loop(
    listener: TcpListener,
    connections: Arc<Connections>,
    mut stopped: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            permit = connections.permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = wait_stop(&mut stopped) => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = wait_stop(&mut stopped) => break,
        };
        let _ = stream.set_nodelay(true);
        let watcher = graceful.watcher();
        tokio::spawn(serve_connection(
            stream,
            peer,
            connections.clone(),
            watcher,
            permit,
        ));
    }
    drop(listener);
    graceful.shutdown().await;
}

async fn wait_stop(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    connections: Arc<Connections>,
    watcher: Watcher,
    _permit: OwnedSemaphorePermit,
) {
    match &connections.tls {
        None => serve_io(stream, peer, &connections, watcher).await,
        Some(acceptor) => {
            let handshake = acceptor.accept(stream);
            match tokio::time::timeout(connections.header_read_timeout, handshake).await {
                Ok(Ok(tls)) => serve_io(tls, peer, &connections, watcher).await,
                Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    }
}

async fn serve_io<I>(io: I, peer: SocketAddr, connections: &Connections, watcher: Watcher)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let app = connections.app.clone();
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        tower::Service::call(&mut app.clone(), request)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(connections.header_read_timeout);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    if let Err(error) = watcher.watch(connection).await {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

async fn recover(config: EngineConfig) -> Result<Engine, ServerError> {
    let (engine, report) = tokio::task::spawn_blocking(move || Engine::open(config))
        .await
        .map_err(|e| ServerError::Task(e.to_string()))??;
    let expired = engine.finish_recovery().await?;
    tracing::info!(
        records = report.records,
        accounts = report.accounts,
        last_lsn = report.last_lsn,
        holds_expired = expired,
        torn_tail_cut = report.tail_cut.is_some(),
        millis = u64::try_from(report.duration.as_millis()).unwrap_or(u64::MAX),
        "recovery done"
    );
    Ok(engine)
}
