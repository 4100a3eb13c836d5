//! A pool per Actix worker ([`crate::SessionConfig::worker_pools`]).
//!
//! Each Actix worker is a thread with a single-threaded runtime of its own. With one pool
//! driven on the application's runtime, every round trip of a request crosses threads
//! twice (the worker writes, the application's runtime reads the socket and wakes the
//! worker): measured at about a fifth of the service's CPU per request. With a pool per
//! worker whose connections are opened and driven on that worker, a request and its
//! connection's socket stay on one thread, and every core still serves requests.
//!
//! It is also what makes driving connections on a worker safe under a graceful shutdown:
//! an idle worker stops first, and its runtime stops with it, but the connections that die
//! with it were only ever used by its own requests, which have all finished.
//!
//! The budget stays the configured one, split, not multiplied: one connection stays with
//! the application's pool (the one [`crate::Database::pool`] returns, for background
//! work), two with replicas (the primary's lag samples must not queue behind other
//! background work), and the rest are shared out among the workers, the base
//! (`pool_size`) first, as evenly as whole connections allow.
//! A worker cannot borrow another's idle connections: a check-out waits for its own
//! worker's. Actix hands TCP connections to its workers in turn, so under load each
//! worker sees its share of the traffic, but a client that keeps one connection (a load
//! balancer's keep-alive) stays on one worker, and one slow request takes a whole
//! connection of that worker's share. So per-worker pools are used only when every
//! worker gets at least [`MIN_WORKER_SHARE`] connections; a smaller budget keeps one
//! pool for all, driven on the application's runtime.
//!
//! Each worker also gets a pool of each replica, the replica's budget split the same way
//! (one connection kept for its shared pool), when that allows [`MIN_WORKER_SHARE`] per
//! worker; otherwise the workers share that replica's pool.
//!
//! A worker takes a share when its first session middleware is built (Actix builds each
//! worker's services on that worker), and gives it back when its thread ends (a worker
//! Actix restarts after a panic takes the share again). A thread that asks once every share
//! is taken (more threads than [`crate::SessionConfig::worker_pools`] says) runs its
//! sessions on the application's pool.

use std::cell::RefCell;
use std::sync::{Arc, Mutex, Weak};
use std::thread::ThreadId;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::SessionConfig;
use crate::pool::{self, DbPool};
use crate::session::Settings;

/// The fewest connections a worker's pool may have: with fewer, a few slow requests on
/// one worker would make its other requests wait while other workers' connections idle.
pub const MIN_WORKER_SHARE: usize = 4;

/// The connections the application's own pool keeps when the workers have pools of
/// their own: one for background work, and one more with replicas, so that the primary's
/// lag samples never queue behind other background work.
pub(crate) fn application_connections(with_replicas: bool) -> usize {
    if with_replicas {
        2
    } else {
        1
    }
}

/// `cfg` with the limits of one share from [`shares`].
pub(crate) fn share_config(cfg: &SessionConfig, (base, max): (usize, usize)) -> SessionConfig {
    let mut cfg = cfg.clone();
    cfg.pool_size = base;
    cfg.max_overflow = max - base;
    cfg
}

/// The per-worker pools of one [`crate::Database`].
pub(crate) struct WorkerPools {
    /// The configuration of the whole database (its full budget).
    config: SessionConfig,
    /// The application's settings: the connector, observer, renderer and replicas a
    /// worker's settings share.
    base: Arc<Settings>,
    /// Each worker's `(pool_size, max_connections)`, from [`shares`].
    shares: Vec<(usize, usize)>,
    /// One per worker share: which thread holds it, and that worker's settings.
    slots: Mutex<Vec<Option<Held>>>,
    /// Set by [`WorkerPools::close`]: no share is taken any more.
    closed: AtomicBool,
}

struct Held {
    thread: ThreadId,
    settings: Arc<Settings>,
}

thread_local! {
    /// The shares this thread holds (one per database in per-worker mode): found here
    /// without a lock, and given back when the thread ends.
    static HELD: RefCell<Vec<Share>> = const { RefCell::new(Vec::new()) };
}

/// A share held by the current thread; dropped (given back) when the thread ends.
struct Share {
    owner: Weak<WorkerPools>,
    /// `Arc::as_ptr` of the owner, to find this database's share among the thread's.
    key: usize,
    index: usize,
    settings: Arc<Settings>,
}

impl Drop for Share {
    fn drop(&mut self) {
        if let Some(owner) = self.owner.upgrade() {
            owner.give_back(self.index);
        }
    }
}

/// The shares of `total` connections with a base of `base` among `workers`: each
/// worker's `(pool_size, max_connections)`, remainders to the first workers. `None` when
/// a worker would get fewer than [`MIN_WORKER_SHARE`].
pub(crate) fn shares(base: usize, total: usize, workers: usize) -> Option<Vec<(usize, usize)>> {
    if workers == 0 || total < workers * MIN_WORKER_SHARE {
        return None;
    }
    let split = |n: usize| (0..workers).map(move |i| n / workers + usize::from(i < n % workers));
    Some(
        split(base.min(total))
            .zip(split(total))
            .map(|(base, max)| (base.min(max), max))
            .collect(),
    )
}

impl WorkerPools {
    /// Per-worker pools of the given [`shares`] of `config`'s budget.
    pub(crate) fn new(
        config: &SessionConfig,
        base: Arc<Settings>,
        shares: Vec<(usize, usize)>,
    ) -> Arc<WorkerPools> {
        Arc::new(WorkerPools {
            config: config.clone(),
            base,
            slots: Mutex::new(shares.iter().map(|_| None).collect()),
            shares,
            closed: AtomicBool::new(false),
        })
    }

    fn key(self: &Arc<Self>) -> usize {
        Arc::as_ptr(self) as usize
    }

    /// The settings of the calling thread's share, taking a free share (and building its
    /// pool on the calling thread's runtime) on the thread's first call. `None`: every
    /// share is taken by other threads, the pools are closed, or the thread runs no Tokio
    /// runtime.
    pub(crate) fn settings_here(self: &Arc<Self>) -> Option<Arc<Settings>> {
        let key = self.key();
        if let Some(found) = HELD.with_borrow(|held| {
            held.iter()
                .find(|share| share.key == key)
                .map(|share| share.settings.clone())
        }) {
            return Some(found);
        }
        tokio::runtime::Handle::try_current().ok()?;
        let thread = std::thread::current().id();
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        // Read under the lock that `close` sets it under: no share is built after.
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        let Some(index) = slots.iter().position(Option::is_none) else {
            // More workers than shares (a worker restarted before the one it replaces
            // gave its share back, or more workers than configured).
            log::warn!(
                "thread {thread:?} found every one of the {} worker pools taken; its sessions use the application's pool",
                slots.len()
            );
            return None;
        };
        let settings = match self.build_share(index) {
            Ok(settings) => settings,
            Err(e) => {
                log::error!("building a worker's pool failed: {e}; it uses the application's pool");
                return None;
            }
        };
        slots[index] = Some(Held {
            thread,
            settings: settings.clone(),
        });
        drop(slots);
        HELD.with_borrow_mut(|held| {
            held.push(Share {
                owner: Arc::downgrade(self),
                key,
                index,
                settings: settings.clone(),
            })
        });
        log::debug!("worker {thread:?} took pool share {index}");
        Some(settings)
    }

    /// The pool of the calling thread's share, if it holds one (it never takes one).
    pub(crate) fn pool_here(self: &Arc<Self>) -> Option<DbPool> {
        let key = self.key();
        HELD.with_borrow(|held| {
            held.iter()
                .find(|share| share.key == key)
                .map(|share| share.settings.pool.clone())
        })
    }

    fn build_share(&self, index: usize) -> Result<Arc<Settings>, deadpool::managed::BuildError> {
        let cfg = share_config(&self.config, self.shares[index]);
        // Opened and driven here, on this worker's runtime.
        let connector = self.base.connector.clone().on_callers_runtime();
        let mut settings = Settings::with_new_pool(
            &cfg,
            connector,
            &self.base.observer,
            &self.base.render,
            pool::RecyclePing::Select1,
        )?;
        if let Some(replicas) = &self.base.replicas {
            settings.replica_pools =
                replicas.worker_pools(index, &self.base.observer, &self.base.render)?;
            settings.replicas = Some(replicas.clone());
        }
        Ok(Arc::new(settings))
    }

    /// Gives a share back when its thread ends: its pool closes (its connections died
    /// with the thread's runtime) and the next worker to start takes the share.
    fn give_back(&self, index: usize) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = slots.get_mut(index).and_then(Option::take) {
            held.settings.pool.close();
            for replica in &held.settings.replica_pools {
                replica.pool.close();
            }
            log::debug!("worker {:?} gave pool share {index} back", held.thread);
        }
    }

    /// Closes the pools of the shares taken; no share is taken from now on.
    pub(crate) fn close(&self) {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        self.closed.store(true, Ordering::Release);
        for held in slots.iter().flatten() {
            held.settings.pool.close();
            for replica in &held.settings.replica_pools {
                replica.pool.close();
            }
        }
    }

    /// The workers' own pools of the replica at `index` (none when they use its shared
    /// pool).
    pub(crate) fn replica_pools(&self, index: usize) -> Vec<DbPool> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .iter()
            .flatten()
            .filter_map(|held| held.settings.replica_pools.get(index))
            .map(|replica| replica.pool.clone())
            .collect()
    }

    /// The pools of the shares taken.
    pub(crate) fn pools(&self) -> Vec<DbPool> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .iter()
            .flatten()
            .map(|held| held.settings.pool.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{application_connections, shares, MIN_WORKER_SHARE};
    use crate::SessionConfig;

    #[test]
    fn max_worker_pools_is_the_most_workers_that_get_shares() {
        for (pool_size, max_overflow) in [(5, 10), (2, 2), (4, 5), (20, 45), (1, 0)] {
            let mut cfg = SessionConfig::default();
            (cfg.pool_size, cfg.max_overflow) = (pool_size, max_overflow);
            for with_replicas in [false, true] {
                let most = cfg.max_worker_pools(with_replicas);
                let total = cfg
                    .max_connections()
                    .saturating_sub(application_connections(with_replicas));
                for workers in 1..=most + 2 {
                    assert_eq!(
                        shares(pool_size, total, workers).is_some(),
                        workers <= most,
                        "{pool_size} + {max_overflow}, replicas {with_replicas}, {workers} workers"
                    );
                }
            }
        }
    }

    #[test]
    fn shares_split_the_budget_exactly_with_the_base_first() {
        // The ledger's defaults on two workers: 5 + 10 - 1 = 14 connections.
        assert_eq!(shares(5, 14, 2), Some(vec![(3, 7), (2, 7)]));
        assert_eq!(shares(2, 9, 2), Some(vec![(1, 5), (1, 4)]));
        for (base, total, workers) in [(5, 14, 3), (1, 17, 4), (9, 9, 2), (20, 12, 3)] {
            let split = shares(base, total, workers).unwrap();
            assert_eq!(split.len(), workers);
            assert_eq!(split.iter().map(|s| s.1).sum::<usize>(), total);
            assert_eq!(split.iter().map(|s| s.0).sum::<usize>(), base.min(total));
            assert!(split.iter().all(|&(b, m)| m >= MIN_WORKER_SHARE && b <= m));
        }
    }

    #[test]
    fn shares_refuse_fewer_than_the_minimum_per_worker() {
        // The defaults on four workers: 14 connections are fewer than 4 each.
        assert_eq!(shares(5, 14, 4), None);
        assert_eq!(shares(5, 15, 4), None);
        assert_eq!(shares(1, 7, 2), None);
        assert_eq!(shares(0, 0, 1), None);
        assert_eq!(shares(1, 8, 0), None);
    }
}
