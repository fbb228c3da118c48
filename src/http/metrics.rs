//! `/metrics` in the Prometheus text format, and the middleware that counts requests.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;

/// Request counters by status class. Relaxed: statistics only.
#[derive(Debug, Default)]
pub struct HttpStats {
    by_class: [AtomicU64; 5],
}

impl HttpStats {
    fn record(&self, status: StatusCode) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts every answered request by its status class.
pub(crate) async fn count(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    state.inner.stats.record(response.status());
    response
}

/// Renders every counter.
pub(crate) async fn render(State(state): State<AppState>) -> Response {
    let mut out = String::with_capacity(2048);
    out.push_str("# HELP coffer_http_requests_total HTTP requests answered, by status class.\n");
    out.push_str("# TYPE coffer_http_requests_total counter\n");
    for (i, counter) in state.inner.stats.by_class.iter().enumerate() {
        let _ = writeln!(
            out,
            "coffer_http_requests_total{{class=\"{}xx\"}} {}",
            i + 1,
            counter.load(Ordering::Relaxed)
        );
    }
    let ready = state.engine().is_some();
    gauge(
        &mut out,
        "coffer_ready",
        "1 once recovery is done.",
        u64::from(ready),
    );
    if let Some(engine) = state.engine() {
        let s = engine.stats();
        gauge(&mut out, "coffer_accounts", "Accounts.", s.accounts);
        gauge(
            &mut out,
            "coffer_live_actors",
            "Account actors running (each owns a shard of the accounts).",
            s.live_actors,
        );
        gauge(
            &mut out,
            "coffer_mailbox_depth",
            "Commands waiting in actor mailboxes.",
            s.queued_commands,
        );
        gauge(
            &mut out,
            "coffer_open_holds",
            "Holds waiting for capture, release or expiry.",
            s.open_holds,
        );
        counter(
            &mut out,
            "coffer_wal_records_total",
            "WAL records appended.",
            s.wal_records,
        );
        counter(
            &mut out,
            "coffer_wal_bytes_total",
            "WAL bytes written and synced.",
            s.wal_bytes,
        );
        counter(
            &mut out,
            "coffer_wal_syncs_total",
            "WAL write + fdatasync batches.",
            s.wal_syncs,
        );
        let _ = writeln!(
            out,
            "# HELP coffer_wal_sync_seconds_total Time spent in fdatasync.\n# TYPE coffer_wal_sync_seconds_total counter\ncoffer_wal_sync_seconds_total {:.6}",
            s.wal_sync_micros as f64 / 1e6
        );
        gauge(
            &mut out,
            "coffer_wal_durable_lsn",
            "Highest LSN on stable storage.",
            s.durable_lsn,
        );
        gauge(
            &mut out,
            "coffer_transfers_in_flight",
            "Transfers whose source is debited and whose destination is not credited yet.",
            s.transfers_in_flight,
        );
        let _ = writeln!(
            out,
            "# HELP coffer_transfers_in_flight_amount Sum of the amounts of transfers in flight (minor units, all currencies).\n# TYPE coffer_transfers_in_flight_amount gauge\ncoffer_transfers_in_flight_amount {}",
            s.transfers_in_flight_amount
        );
        gauge(
            &mut out,
            "coffer_transfers_remembered",
            "Transfers kept for GET /v1/transfers/{id} and idempotent retries.",
            s.transfers,
        );
        gauge(
            &mut out,
            "coffer_storage_failed",
            "1 when a WAL write or sync failed and writes are stopped.",
            u64::from(s.storage_failed),
        );
    }
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        out,
    )
        .into_response()
}

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}
