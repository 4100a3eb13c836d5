//! The integration suite: one binary, real PostgreSQL, the real server over HTTP.

// A test (and its helpers) should fail loudly at the first surprise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod accounts;
mod bad_input;
mod budget;
mod config;
mod echo;
mod faults;
mod health;
mod idempotency;
mod invariants;
mod k8s;
mod lost_commit;
mod metrics;
mod migrations;
mod openapi;
mod pgbouncer;
mod pool;
mod replicas;
mod retry;
mod serial;
mod session;
mod shutdown;
mod sqlstate;
mod support;
mod time_bounds;
mod tls;
mod transfers;
