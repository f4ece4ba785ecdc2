//! `/healthz`, `/metrics` and the status page at `/`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;
use super::page::{Answer, Page};

/// The scheduler is alive while its heartbeat is younger than this.
pub const HEARTBEAT_STALE_SECONDS: i64 = 30;

#[derive(Clone)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    /// Unix seconds of the scheduler's last heartbeat.
    pub heartbeat: Arc<AtomicI64>,
    pub page: Arc<Page>,
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/", get(page))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn healthz(axum::extract::State(s): axum::extract::State<HttpState>) -> impl IntoResponse {
    let age = jiff::Timestamp::now().as_second() - s.heartbeat.load(Ordering::Relaxed);
    if age <= HEARTBEAT_STALE_SECONDS {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("scheduler stalled: no heartbeat for {age} s\n"),
        )
    }
}

async fn metrics(axum::extract::State(s): axum::extract::State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn page(
    axum::extract::State(s): axum::extract::State<HttpState>,
) -> axum::response::Response {
    match s.page.answer().await {
        Answer::Html(html) => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            html.as_str().to_owned(),
        )
            .into_response(),
        Answer::Off => (
            StatusCode::NOT_FOUND,
            "the status page is off ([agent] status_page = false); /metrics and /healthz are here\n",
        )
            .into_response(),
        Answer::Starting => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            "the agent is starting; reload in a few seconds\n",
        )
            .into_response(),
    }
}
