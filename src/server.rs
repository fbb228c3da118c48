//! Running the server: bind, serve `/healthz` and `/readyz` while recovery runs, recover,
//! then serve everything; on shutdown stop accepting, finish in-flight requests and flush
//! the WAL.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::engine::{Engine, EngineConfig, EngineError, OpenError};
use crate::http::{self, AppState};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The error.
        source: std::io::Error,
    },
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

/// A running server.
pub struct Server {
    addr: SocketAddr,
    state: AppState,
    stop: watch::Sender<bool>,
    serving: JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Binds `listen`, starts serving (503 `not_ready` until recovered), recovers the data
    /// directory and returns once the server is ready.
    pub async fn start(listen: &str, config: EngineConfig) -> Result<Server, ServerError> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: listen.to_string(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: listen.to_string(),
            source,
        })?;
        let state = AppState::new();
        let (stop, mut stopped) = watch::channel(false);
        let app = http::router(state.clone());
        let serving = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        });
        tracing::info!(%addr, data_dir = %config.data_dir.display(), "listening; recovering");
        let mut server = Server {
            addr,
            state,
            stop,
            serving,
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
        tracing::info!("coffer stopped");
    }

    async fn stop_serving(&mut self) {
        let _ = self.stop.send(true);
        const GRACE: Duration = Duration::from_secs(10);
        if tokio::time::timeout(GRACE, &mut self.serving)
            .await
            .is_err()
        {
            tracing::warn!("in-flight requests did not finish within the grace period");
            self.serving.abort();
        }
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
