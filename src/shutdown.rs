//! Graceful shutdown with a drain window (contract section 5).
//!
//! On SIGTERM or SIGINT: readiness fails at once, the service keeps serving for
//! `SHUTDOWN_DRAIN_SECS` (Kubernetes needs that long to take the pod out of its
//! endpoints), then stops accepting and lets in-flight requests finish and commit within
//! `SHUTDOWN_TIMEOUT_SECS`; requests still running then are dropped, which rolls their
//! transactions back. Finally the pool closes. Actix's own signal handling is disabled
//! because it stops accepting the moment SIGTERM arrives and treats SIGINT as a forced stop.

use std::io;

use tokio::signal::unix::{signal, SignalKind};

use crate::app::Application;

/// Runs the application until a signal stops it, with the drain window.
pub async fn run_with_signals(app: Application) -> io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let handle = app.handle();
    let health = app.health();
    let drain = app.config().shutdown_drain;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        log::info!("{name} received: readiness now fails; draining for {drain:?}");
        health.start_draining();
        // A second signal (an impatient operator) cuts the drain window short; in-flight
        // requests still get SHUTDOWN_TIMEOUT_SECS to finish.
        tokio::select! {
            () = tokio::time::sleep(drain) => {
                log::info!("drain window over: no new connections; waiting for in-flight requests");
            }
            _ = term.recv() => log::info!("second signal: ending the drain window early"),
            _ = int.recv() => log::info!("second signal: ending the drain window early"),
        }
        handle.stop(true).await;
    });
    app.run_until_stopped().await
}
