//! Tests that load the machine (floods, bursts) and would distort every timing bound of
//! tests running beside them. They run in a phase of their own, one at a time, after the
//! parallel suite: `cargo test -- --skip serial::`, then `cargo test -- serial::
//! --test-threads 1`.

mod load;
