//! `http_request_duration_seconds`, labelled by route template, method and status, and the
//! request's route for code that runs inside it (the leak warning names its holder).
//!
//! The route label is the resource pattern that matched (`/accounts/{id}`), never the raw
//! path, and unmatched paths share one label: the label set stays bounded whatever clients
//! send. Methods outside the standard set are folded into `_OTHER` (as OpenTelemetry does)
//! for the same reason.

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::middleware::Next;
use actix_web::web;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::Metrics;

/// The route label of requests no resource matched.
pub const UNMATCHED: &str = "unmatched";
/// The method label of requests whose method is not a standard one.
pub const OTHER_METHOD: &str = "_OTHER";

/// OpenTelemetry's recommended bounds for HTTP server durations, in seconds.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    route: String,
    method: &'static str,
    status: u16,
}

/// The request-duration histogram.
#[derive(Clone, Debug)]
pub struct HttpMetrics {
    durations: Family<Labels, Histogram, fn() -> Histogram>,
}

impl HttpMetrics {
    /// Creates the histogram and registers it.
    pub fn register(registry: &mut Registry) -> HttpMetrics {
        let durations = super::registered(
            registry,
            "http_request_duration_seconds",
            "Time from receiving a request to its response being ready, by route template",
            Family::new_with_constructor((|| Histogram::new(BUCKETS)) as fn() -> Histogram),
        );
        HttpMetrics { durations }
    }
}

/// The method label: the method's name, or [`OTHER_METHOD`] for a non-standard one.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::CONNECT => "CONNECT",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::PATCH => "PATCH",
        _ => OTHER_METHOD,
    }
}

/// Middleware (app-wide): times every request, by route template.
pub async fn track(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let Some(metrics) = req.app_data::<web::Data<Metrics>>().cloned() else {
        return next.call(req).await;
    };
    let started = Instant::now();
    // Before routing, Actix finds the pattern by matching the path against its resource
    // map, which gives the same answer the router will.
    let route = req.match_pattern().unwrap_or_else(|| UNMATCHED.to_owned());
    let method = method_label(req.method());
    let result = next.call(req).await;
    let status = match &result {
        Ok(res) => res.status(),
        Err(e) => e.as_response_error().status_code(),
    };
    metrics
        .http
        .durations
        .get_or_create(&Labels {
            route,
            method,
            status: status.as_u16(),
        })
        .observe(started.elapsed().as_secs_f64());
    result
}
