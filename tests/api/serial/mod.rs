//! Tests that load the machine's cores (floods, bursts) or whose bounds are sampled: they
//! run on their own, one at a time, after the parallel suite (`cargo test -- --skip
//! serial::`, then `cargo test -- serial:: --test-threads 1`), so that neither they nor
//! the rest disturb each other's timing.

mod connect;
mod load;
mod pgbouncer;
mod probe_flood;
mod rolling_update;
