//! `/metrics` in the Prometheus text format, and the middleware that counts requests.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::core::Collector;
use prometheus::{HistogramOpts, HistogramVec};

use super::AppState;

/// Request counters by status class (relaxed: statistics only), and request latency by
/// route, method and status.
#[derive(Debug)]
pub struct HttpStats {
    by_class: [AtomicU64; 5],
    latency: HistogramVec,
}

impl Default for HttpStats {
    fn default() -> HttpStats {
        let opts = HistogramOpts::new(
            "coffer_http_request_duration_seconds",
            "Time from a request's arrival to its answer, by route template, method and status.",
        )
        .buckets(vec![
            0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
            1.0, 2.5, 5.0, 10.0,
        ]);
        HttpStats {
            by_class: Default::default(),
            latency: HistogramVec::new(opts, &["route", "method", "status"])
                .expect("constant, valid histogram options"),
        }
    }
}

impl HttpStats {
    fn record(&self, route: &str, method: &str, status: StatusCode, seconds: f64) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        if let Ok(histogram) =
            self.latency
                .get_metric_with_label_values(&[route, method, status.as_str()])
        {
            histogram.observe(seconds);
        }
    }
}

/// Marks a matched request's response with its route template (`/v1/accounts/{id}/credits`)
/// for [`count`]: a route layer, so it runs after routing, where the template is known.
/// Latency is labelled by template, never by raw path, so that account ids cannot grow the
/// metrics without bound.
pub(crate) async fn mark_route(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().cloned();
    let mut response = next.run(request).await;
    if let Some(route) = route {
        response.extensions_mut().insert(route);
    }
    response
}

/// Counts every answered request by its status class, and times it by route, method and
/// status (requests that matched no route count as route `unmatched`).
pub(crate) async fn count(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let response = next.run(request).await;
    let route = response
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str);
    state.inner.stats.record(
        route,
        method.as_str(),
        response.status(),
        started.elapsed().as_secs_f64(),
    );
    response
}

super::openapi::problems!(
    MetricsProblems = [UNAUTHORIZED, RATE_LIMITED, OVERLOADED, SHUTTING_DOWN]
);

/// Prometheus metrics
///
/// Requests by route, method and status with latency histograms; WAL batch sizes, fsync
/// latency and the durable LSN; mailbox depth, live actors, accounts, open holds; recovery
/// duration. Behind authentication, or served without it on its own `--metrics-listen`
/// address (and then not here).
#[utoipa::path(get, path = "/metrics", operation_id = "metrics", tag = "service",
    responses(
        (status = 200, description = "Prometheus text format 0.0.4.", body = String, content_type = "text/plain; version=0.0.4; charset=utf-8"),
        MetricsProblems,
    ))]
pub(crate) async fn render(State(state): State<AppState>) -> Response {
    let mut out = String::with_capacity(8192);
    let mut families = Vec::new();
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
    gauge(
        &mut out,
        "coffer_event_consumers",
        "Event-stream consumers connected now (long polls waiting and SSE streams open).",
        state.inner.events.consumers.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "coffer_events_delivered_total",
        "Events sent to event-stream consumers (pages and SSE).",
        state.inner.events.delivered.load(Ordering::Relaxed),
    );
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
        let _ = writeln!(
            out,
            "# HELP coffer_recovery_seconds How long the last start's recovery took.\n# TYPE coffer_recovery_seconds gauge\ncoffer_recovery_seconds {:.3}",
            s.recovery_millis as f64 / 1e3
        );
        let wal = engine.wal_stats();
        families.extend(wal.batch_records.collect());
        families.extend(wal.fsync_seconds.collect());
    }
    families.extend(state.inner.stats.latency.collect());
    if let Err(error) = prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
        tracing::warn!(%error, "cannot encode the histograms");
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
