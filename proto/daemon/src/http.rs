//! The daemons' plain-HTTP side port: Prometheus `/metrics` and the health endpoints
//! ([`crate::health`]).

use std::sync::Arc;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::health::{Endpoint, Health, is_verbose};

/// Renders the metrics exposition (OpenMetrics text).
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
struct Side {
    render: Render,
    health: Health,
}

/// Serves `/metrics`, `/livez`, `/readyz` and `/healthz` on `listener` until cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Render,
    health: Health,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(|s, q| probe(Endpoint::Livez, s, q)))
        .route("/readyz", get(|s, q| probe(Endpoint::Readyz, s, q)))
        .route("/healthz", get(|s, q| probe(Endpoint::Healthz, s, q)))
        .with_state(Side { render, health });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn metrics(State(side): State<Side>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        (side.render)(),
    )
}

async fn probe(
    endpoint: Endpoint,
    State(side): State<Side>,
    RawQuery(query): RawQuery,
) -> Response {
    health_response(&side.health, endpoint, query.as_deref()).await
}

/// The HTTP response for a health endpoint (also used by the embedded API).
pub async fn health_response(health: &Health, endpoint: Endpoint, query: Option<&str>) -> Response {
    let answer = health.answer(endpoint, is_verbose(query)).await;
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        answer.body,
    )
        .into_response()
}
