//! Read replicas: which server a read-only session runs on, and how far behind each
//! streaming replica is.
//!
//! - Each replica has a pool of its own, with the primary's limits and timeouts (the base
//!   size may differ: [`ReplicaConfig::pool_size`]), and a dedicated monitoring connection
//!   outside it.
//! - Background tasks measure each [`ReplicaConfig::sample_interval`] (100 ms): requests
//!   never pay for a measurement. One task per server, each on its own clock, so that a
//!   server slow to answer (each round trip is bounded by the probe timeout) delays the
//!   measurement of no other. One samples the primary's flush
//!   position (`pg_current_wal_flush_lsn()`, on a pooled connection checked out for the
//!   moment, so the primary's connection budget does not grow) with the time it was asked,
//!   keeping the samples a replica may not have replayed yet; one per replica asks it for
//!   its replay position (`pg_last_wal_replay_lsn()`, in a `READ COMMITTED` transaction).
//!   A replica's lag is a time: 0 when it has replayed the latest sample, else how long
//!   ago the oldest sample it has not replayed was taken (a sample taken after a gap is
//!   dated one interval after the previous answer: what it adds may be that old).
//!   (`now() - pg_last_xact_replay_timestamp()` would grow on an idle replica that is
//!   fully caught up.) The flush position, not the insert position: a record no commit
//!   follows (a hint bit's full-page image, say) may sit unflushed past the insert
//!   position for as long as the primary stays idle, and a replica can only replay what
//!   was flushed, so an idle, caught-up replica would look ever more behind.
//!   (A write's `Consistency-Token` is its insert position after the COMMIT: at or past its
//!   commit record, whatever `synchronous_commit` says; it is checked against the replay
//!   position, never taken as a sample.) Once the primary has gone unsampled for longer
//!   than [`ReplicaConfig::max_lag`] (it is down, or too busy to lend a connection within
//!   the probe timeout; a sample waits its turn in the pool like a request), every
//!   replica's lag is unknown: how far behind a replica is cannot be known without the
//!   primary's position, so replicas serve reads for at most that long after the primary
//!   was last seen.
//! - Every query here goes through the simple protocol: nothing outside a transaction
//!   relies on a named prepared statement, which PgBouncer in transaction mode loses.
//! - A read-only session that does not ask for `SERIALIZABLE` (a hot standby refuses it)
//!   runs on a replica that answered the latest measurement, whose lag is within
//!   [`ReplicaConfig::max_lag`] and, if the request carries a position it must see
//!   ([`ReadAfter`]), whose last measured replay position is at or past it; among several,
//!   in turn. With none such, on the primary. If the replica's check-out or `BEGIN`
//!   fails, the session begins on the primary instead and the replica counts as down
//!   until the next measurement says otherwise. The session middleware also runs a read
//!   again on the primary, once, when it failed on its replica before it answered: its
//!   connection broke (a connection exception, the server ending the session, no answer;
//!   also none within the statement deadline, the statement timeout plus a margin), and
//!   then the replica counts as down too; or replay cancelled its statement (a recovery
//!   conflict, 40001 or 40P01), which says nothing against the replica. Never a read
//!   whose statement its own statement timeout cancelled (57014): on the primary it would
//!   take as long again, for the same answer.
//!   Writes never run on a replica: only read-only sessions are routed.
//! - Replicas are named `host:port`, never by URL (which may hold a password).

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use deadpool::managed::Timeouts;
use diesel_async::AsyncPgConnection;

use crate::config::SessionConfig;
use crate::connect::Connector;
use crate::observe::SessionObserver;
use crate::pool::{self, DbPool};
use crate::session::{ErrorRenderer, Settings};
use crate::url::DatabaseUrl;

/// A position in PostgreSQL's write-ahead log, in its text form `X/Y` (hexadecimal, upper
/// case, e.g. `0/16B3748`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

/// PostgreSQL's WAL page size (`XLOG_BLCKSZ`, 8 KiB unless the server was built otherwise)
/// and the largest page header (`SizeOfXLogLongPHD`, 40 bytes, at a segment's start).
const WAL_PAGE: u64 = 8192;
const WAL_PAGE_HEADER_MAX: u64 = 40;

impl Lsn {
    /// The highest position there is (`FFFFFFFF/FFFFFFFF`): no replica covers it, so a
    /// read that must see it goes to the primary. A committed write whose own position
    /// is unknown answers with it.
    pub const MAX: Lsn = Lsn(u64::MAX);

    /// Parses PostgreSQL's text form, strictly: `^[0-9A-F]{1,8}/[0-9A-F]{1,8}$`.
    pub fn parse(text: &str) -> Option<Lsn> {
        let (high, low) = text.split_once('/')?;
        let part = |p: &str| {
            let hex = (1..=8).contains(&p.len())
                && p.bytes()
                    .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b));
            hex.then(|| u64::from_str_radix(p, 16).ok()).flatten()
        };
        Some(Lsn((part(high)? << 32) | part(low)?))
    }

    /// Whether a server that has replayed up to `self` has replayed everything up to
    /// `target`. Besides `self >= target`: the insert position that
    /// `pg_current_wal_insert_lsn()` reports just after a page boundary points past the
    /// next page's header, while a replica that replayed the record ending at the
    /// boundary reports the boundary itself; no record fits in between, so that counts
    /// as caught up (else an idle, caught-up replica would look ever more behind).
    pub fn covers(self, target: Lsn) -> bool {
        self >= target
            || (self.0.is_multiple_of(WAL_PAGE)
                && target.0 - self.0 <= WAL_PAGE_HEADER_MAX
                && target.0 % WAL_PAGE <= WAL_PAGE_HEADER_MAX)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Put into a request's extensions (by the application, from a header of its choosing),
/// it asks that the request's read-only session see at least this position: a replica
/// serves it only if its last measured replay position is at or past it, else the primary
/// does. A write's [`CommitPosition`] is such a position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadAfter(pub Lsn);

/// Put into a committed write's response extensions by a session middleware with
/// [`crate::SessionMiddleware::commit_position`]: the primary's WAL insert position read
/// after the COMMIT returned, so at or past the commit record. Hand it back to later
/// requests as [`ReadAfter`] (the application chooses how: a header, say).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitPosition(pub Lsn);

/// Where a read-only session ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReadTarget {
    /// The primary.
    Primary,
    /// A replica.
    Replica,
}

impl ReadTarget {
    /// A short snake_case name, for labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ReadTarget::Primary => "primary",
            ReadTarget::Replica => "replica",
        }
    }
}

/// Why a read-only session ran where it ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ReadReason {
    /// A replica was eligible (target: replica).
    Replica,
    /// No replica could serve it at all: none configured, or the session asked for
    /// `SERIALIZABLE`, which a hot standby refuses.
    NoReplica,
    /// Every replica was down (did not answer the latest measurement, or its
    /// connection failed); also a read run again after it failed on its replica (its
    /// connection broke, or replay cancelled its statement: the contract's reasons have no
    /// name of their own for a recovery conflict).
    Down,
    /// Every replica that answers was further behind than the maximum lag.
    Lagging,
    /// A replica was current enough in general, but had not replayed the position the
    /// request asked to see ([`ReadAfter`]).
    Token,
}

impl ReadReason {
    /// Every reason, for metrics that create their series up front.
    pub const ALL: [ReadReason; 5] = [
        ReadReason::Replica,
        ReadReason::NoReplica,
        ReadReason::Down,
        ReadReason::Lagging,
        ReadReason::Token,
    ];

    /// A short snake_case name, for labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ReadReason::Replica => "replica",
            ReadReason::NoReplica => "no_replica",
            ReadReason::Down => "down",
            ReadReason::Lagging => "lagging",
            ReadReason::Token => "token",
        }
    }
}

/// How the replicas are used. `Default` gives the values in brackets.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ReplicaConfig {
    /// Connections kept per replica when idle (5); overflow, timeouts and lifetimes are
    /// the primary's.
    pub pool_size: usize,
    /// A replica further behind than this serves no reads (5 s).
    pub max_lag: Duration,
    /// How often the primary's position is sampled and each replica measured (100 ms).
    pub sample_interval: Duration,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            pool_size: 5,
            max_lag: Duration::from_secs(5),
            sample_interval: Duration::from_millis(100),
        }
    }
}

/// What the latest measurement of one replica found, for health checks and metrics.
#[derive(Clone, Debug)]
pub struct ReplicaStatus {
    /// `host:port`.
    pub name: String,
    /// Whether it answered the latest measurement (and no read's connection to it has
    /// failed since).
    pub up: bool,
    /// Its lag, once known (see the module docs); `None` before its first answer, while
    /// it is behind every sample still kept, or once the primary has gone unsampled for
    /// longer than the maximum lag.
    pub lag: Option<Duration>,
    /// Whether it serves reads now: up, and lag within the maximum.
    pub eligible: bool,
    /// How long the latest measurement's round trip took (connecting included).
    pub response_time: Option<Duration>,
    /// Why the latest measurement failed: the driver's text, which names no secret.
    pub error: Option<String>,
    /// Its pool's figures.
    pub pool: deadpool::Status,
}

/// One replica: its sessions' settings (pool, connector) and what was last measured.
pub(crate) struct Member {
    pub(crate) name: String,
    pub(crate) settings: Arc<Settings>,
    monitor: Connector,
    measured: Mutex<Measured>,
}

#[derive(Clone, Default)]
struct Measured {
    up: bool,
    replayed: Option<Lsn>,
    lag: Option<Duration>,
    response_time: Option<Duration>,
    error: Option<String>,
}

/// The primary's positions that some replica may not have replayed yet, in order.
#[derive(Default)]
struct Samples {
    /// When the primary last answered a sample (asked then), whether its position was
    /// new or not; `None` before its first answer.
    answered: Option<Instant>,
    kept: VecDeque<(Lsn, Instant)>,
    /// The newest sample dropped: a replica that has not replayed even this one is
    /// behind by an unknown time (at least its age).
    dropped: Option<(Lsn, Instant)>,
}

/// At most this many samples are kept (past it the oldest go): at one per 100 ms, a
/// replica would have to be 100 s behind while the others are current, far past any
/// sensible maximum lag.
const MAX_SAMPLES: usize = 1000;

/// The replicas of a [`crate::Database`]; see the module docs.
pub(crate) struct Replicas {
    pub(crate) members: Vec<Member>,
    max_lag: Duration,
    /// How often the primary is sampled: dates a sample taken after a gap (see
    /// `record_position`).
    sample_interval: Duration,
    next: AtomicUsize,
    samples: Mutex<Samples>,
    closed: AtomicBool,
    /// A replica's pool limits, as configured (before any split among workers).
    pool_cfg: SessionConfig,
    /// Each worker's `(pool_size, max_connections)` of every replica, with per-worker
    /// pools; `None`: workers use the replicas' shared pools.
    worker_shares: Option<Vec<(usize, usize)>>,
}

impl Replicas {
    /// The pools of every replica for the worker holding share `index`, opened and driven
    /// by the calling thread (empty when workers use the shared pools).
    pub(crate) fn worker_pools(
        &self,
        index: usize,
        observer: &Arc<dyn SessionObserver>,
        render: &ErrorRenderer,
    ) -> Result<Vec<Arc<Settings>>, deadpool::managed::BuildError> {
        let Some(&share) = self.worker_shares.as_ref().and_then(|s| s.get(index)) else {
            return Ok(Vec::new());
        };
        let cfg = crate::workers::share_config(&self.pool_cfg, share);
        self.members
            .iter()
            .map(|member| {
                Settings::with_new_pool(
                    &cfg,
                    member.settings.connector.clone().on_callers_runtime(),
                    observer,
                    render,
                    pool::RecyclePing::Empty,
                )
                .map(Arc::new)
            })
            .collect()
    }

    /// Builds a pool per replica (without connecting) and starts the monitoring task on
    /// the current Tokio runtime.
    pub(crate) fn start(
        urls: &[DatabaseUrl],
        cfg: &SessionConfig,
        replica_cfg: &ReplicaConfig,
        primary: &DbPool,
        primary_connector: &Connector,
        observer: &Arc<dyn SessionObserver>,
        render: &ErrorRenderer,
    ) -> Result<Arc<Replicas>, deadpool::managed::BuildError> {
        // `worker_pools` is 0 unless the primary has per-worker pools.
        let workers = cfg.worker_pools;
        let mut pool_cfg = cfg.clone();
        pool_cfg.pool_size = replica_cfg.pool_size;
        // With per-worker pools for the primary, each worker gets a pool of each replica
        // too, when the replica's budget allows (as for the primary: one connection kept
        // for the shared pool, at least `MIN_WORKER_SHARE` per worker).
        let worker_shares = (workers > 1)
            .then(|| {
                crate::workers::shares(
                    pool_cfg.pool_size,
                    pool_cfg.max_connections().saturating_sub(1),
                    workers,
                )
            })
            .flatten();
        let shared_cfg = if worker_shares.is_some() {
            crate::workers::share_config(&pool_cfg, (0, 1))
        } else {
            pool_cfg.clone()
        };
        let mut members = Vec::with_capacity(urls.len());
        for url in urls {
            // The primary's settings, pooler flags included: replicas sit behind the same
            // kind of pooler as the primary, if any.
            let connector =
                Connector::for_sessions(url, cfg).sharing_cancels_with(primary_connector);
            let monitor = connector.with_settings(
                &format!("{}-monitor", cfg.application_name),
                Some(cfg.probe_timeout),
                cfg.idle_in_transaction_timeout,
                cfg.probe_timeout,
            );
            members.push(Member {
                name: server_name(url),
                settings: Arc::new(Settings::with_new_pool(
                    &shared_cfg,
                    connector,
                    observer,
                    render,
                    pool::RecyclePing::Empty,
                )?),
                monitor,
                measured: Mutex::new(Measured::default()),
            });
        }
        let replicas = Arc::new(Replicas {
            members,
            max_lag: replica_cfg.max_lag,
            sample_interval: replica_cfg.sample_interval,
            next: AtomicUsize::new(0),
            samples: Mutex::new(Samples::default()),
            closed: AtomicBool::new(false),
            pool_cfg,
            worker_shares,
        });
        spawn_monitors(
            &replicas,
            primary,
            replica_cfg.sample_interval,
            cfg.probe_timeout,
        );
        Ok(replicas)
    }

    /// The replica a read-only session should run on (its index in `members`), or why
    /// none.
    pub(crate) fn choose(&self, after: Option<Lsn>) -> Result<usize, ReadReason> {
        let n = self.members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut why = ReadReason::Down;
        for i in 0..n {
            let index = (start + i) % n;
            let member = &self.members[index];
            let m = lock(&member.measured).clone();
            if !m.up {
                continue;
            }
            if self.trusted_lag(m.lag).is_none_or(|lag| lag > self.max_lag) {
                why = why.max(ReadReason::Lagging);
                continue;
            }
            if let Some(after) = after {
                if !m.replayed.is_some_and(|r| r.covers(after)) {
                    why = why.max(ReadReason::Token);
                    continue;
                }
            }
            return Ok(index);
        }
        Err(why)
    }

    /// Counts `member` as down until its next measurement: a read's connection to it
    /// failed.
    pub(crate) fn mark_down(&self, member: &Member, error: &str) {
        let mut m = lock(&member.measured);
        if m.up {
            log::warn!(
                "replica {} failed a read ({error}); reads go elsewhere until it answers again",
                member.name
            );
        }
        m.up = false;
        m.error = Some(error.to_owned());
    }

    /// Records that the primary was at `lsn` at `at` (or later).
    pub(crate) fn record_position(&self, lsn: Lsn, at: Instant) {
        let mut samples = lock(&self.samples);
        let previous = samples.answered;
        samples.answered = samples.answered.max(Some(at));
        if samples.kept.back().is_some_and(|(last, _)| *last >= lsn) {
            // Not newer: the older sample's time is the one that matters.
            return;
        }
        // What this sample adds was written at some time since the previous answer: after
        // a gap in the samples (the primary unreachable, say) that may be long before
        // `at`, and a replica missing it is as far behind as that. Dated one interval
        // after the previous answer, it is never younger than what it stands for; with
        // samples on time, that is `at`.
        let at = previous.map_or(at, |previous| at.min(previous + self.sample_interval));
        samples.kept.push_back((lsn, at));
        if samples.kept.len() > MAX_SAMPLES {
            samples.dropped = samples.kept.pop_front();
        }
    }

    /// The latest measurement of every replica.
    pub(crate) fn statuses(&self) -> Vec<ReplicaStatus> {
        self.members
            .iter()
            .map(|member| {
                let m = lock(&member.measured).clone();
                let lag = self.trusted_lag(m.lag);
                ReplicaStatus {
                    name: member.name.clone(),
                    up: m.up,
                    lag,
                    eligible: m.up && lag.is_some_and(|lag| lag <= self.max_lag),
                    response_time: m.response_time,
                    error: m.error,
                    pool: member.settings.pool.status(),
                }
            })
            .collect()
    }

    /// Closes the replicas' pools and stops the monitoring task.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for member in &self.members {
            member.settings.pool.close();
        }
    }

    /// A replica's last measured lag, as long as the primary has been sampled within the
    /// maximum lag; else unknown (see the module docs). The measurement itself may be a
    /// round older than the primary's last silence.
    fn trusted_lag(&self, lag: Option<Duration>) -> Option<Duration> {
        lag.filter(|_| self.primary_sampled_within_max_lag(Instant::now()))
    }

    /// Whether the primary answered a sample no longer than the maximum lag before `now`.
    fn primary_sampled_within_max_lag(&self, now: Instant) -> bool {
        lock(&self.samples)
            .answered
            .is_some_and(|at| now.saturating_duration_since(at) <= self.max_lag)
    }

    /// The lag of a replica that has replayed up to `replayed`, now: see the module docs.
    fn lag(&self, replayed: Lsn, now: Instant) -> Option<Duration> {
        if !self.primary_sampled_within_max_lag(now) {
            // The primary's position is unknown (or too old to trust): so is the lag.
            return None;
        }
        let samples = lock(&self.samples);
        if samples
            .dropped
            .is_some_and(|(dropped, _)| !replayed.covers(dropped))
        {
            // Behind a sample no longer kept: by how long is unknown, and no read trusts
            // an unknown lag.
            return None;
        }
        let oldest_missing = samples
            .kept
            .iter()
            .find(|(lsn, _)| !replayed.covers(*lsn))
            .map(|(_, at)| *at);
        Some(oldest_missing.map_or(Duration::ZERO, |at| now.saturating_duration_since(at)))
    }

    /// Drops the samples every replica that answers has replayed (keeping the newest).
    fn prune(&self) {
        let replayed: Vec<Lsn> = self
            .members
            .iter()
            .filter_map(|member| {
                let m = lock(&member.measured);
                m.up.then_some(m.replayed).flatten()
            })
            .collect();
        let Some(slowest) = replayed.into_iter().min() else {
            return;
        };
        let mut samples = lock(&self.samples);
        while samples.kept.len() > 1
            && samples
                .kept
                .front()
                .is_some_and(|(lsn, _)| slowest.covers(*lsn))
        {
            samples.dropped = samples.kept.pop_front();
        }
    }
}

/// Starts the measurement tasks (see the module docs): one sampling the primary, one
/// per replica, each on its own clock. They end when the replicas are dropped or closed,
/// or the primary's pool is closed.
fn spawn_monitors(replicas: &Arc<Replicas>, primary: &DbPool, every: Duration, timeout: Duration) {
    let weak = Arc::downgrade(replicas);
    {
        let (weak, primary) = (weak.clone(), primary.clone());
        tokio::spawn(async move {
            let mut tick = ticker(every);
            while let Some(replicas) = next_round(&mut tick, &weak, &primary).await {
                let asked = Instant::now();
                match sample_primary(&primary, timeout).await {
                    Ok(lsn) => replicas.record_position(lsn, asked),
                    Err(e) => {
                        log::debug!("no sample of the primary's WAL position this round: {e}")
                    }
                }
            }
        });
    }
    for index in 0..replicas.members.len() {
        let (weak, primary) = (weak.clone(), primary.clone());
        tokio::spawn(async move {
            let mut tick = ticker(every);
            let mut link = None;
            while let Some(replicas) = next_round(&mut tick, &weak, &primary).await {
                replicas.measure(index, &mut link, timeout).await;
            }
        });
    }
}

/// A tick every `every`; a late round delays the next ones rather than bunching them up.
fn ticker(every: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// Waits for the next tick; `None` once the replicas are gone or closed, or the primary's
/// pool is closed.
async fn next_round(
    tick: &mut tokio::time::Interval,
    replicas: &Weak<Replicas>,
    primary: &DbPool,
) -> Option<Arc<Replicas>> {
    tick.tick().await;
    let replicas = replicas.upgrade()?;
    (!replicas.closed.load(Ordering::Acquire) && !primary.is_closed()).then_some(replicas)
}

impl Replicas {
    /// One measurement of replica `index`, on its monitoring connection `link`.
    async fn measure(&self, index: usize, link: &mut Option<AsyncPgConnection>, timeout: Duration) {
        let member = &self.members[index];
        let started = Instant::now();
        let result = replay_position(&member.monitor, link, timeout).await;
        let took = started.elapsed();
        let lag = result
            .as_ref()
            .ok()
            .and_then(|replayed| self.lag(*replayed, Instant::now()));
        {
            let mut m = lock(&member.measured);
            match result {
                Ok(replayed) => {
                    if !m.up {
                        log::info!("replica {} answers; replayed up to {replayed}", member.name);
                    }
                    m.up = true;
                    m.replayed = Some(replayed);
                    m.lag = lag;
                    m.error = None;
                }
                Err(e) => {
                    if m.up {
                        log::warn!("replica {} is down: {e}", member.name);
                    }
                    m.up = false;
                    m.error = Some(e);
                }
            }
            m.response_time = Some(took);
        }
        self.prune();
    }
}

/// The primary's flush position, on a pooled connection held for the query only.
async fn sample_primary(primary: &DbPool, timeout: Duration) -> Result<Lsn, String> {
    let timeouts = Timeouts {
        // As long as the round trip itself: the sampler has a task of its own, and the
        // pool hands connections out in turn, so under a saturated pool the sample queues
        // like a request instead of being skipped (skipped for the maximum lag, every
        // replica's lag would be unknown and every read would go to the busy primary).
        wait: Some(timeout),
        create: Some(timeout),
        recycle: Some(timeout),
    };
    let conn = primary
        .timeout_get(&timeouts)
        .await
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, current_position(&conn, FLUSH_POSITION)).await {
        Ok(result) => result,
        Err(_) => {
            // The query may still be running: the connection must not serve anyone else.
            drop(deadpool::managed::Object::take(conn));
            Err(format!("no answer within {timeout:?}"))
        }
    }
}

/// `SELECT pg_last_wal_replay_lsn()` on the replica's monitoring connection, made (again)
/// when missing or failed; all within `timeout`.
async fn replay_position(
    connector: &Connector,
    link: &mut Option<AsyncPgConnection>,
    timeout: Duration,
) -> Result<Lsn, String> {
    let work = async {
        if link.is_none() {
            *link = Some(connector.establish().await.map_err(|e| e.to_string())?);
        }
        match link.as_ref() {
            Some(conn) => current_position(conn, REPLAY_POSITION).await,
            None => Err("no monitoring connection".to_owned()),
        }
    };
    let result = tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
    if result.is_err() {
        // Failed or cut off mid-way: start afresh next round.
        *link = None;
    }
    result
}

/// Where the primary inserts its next WAL record.
pub(crate) const INSERT_POSITION: &str = "SELECT pg_current_wal_insert_lsn()";
/// How far the primary has flushed its WAL: what a replica can have received.
const FLUSH_POSITION: &str = "SELECT pg_current_wal_flush_lsn()";
/// How far a replica has replayed; NULL on a server that is not a standby. In a
/// transaction that states `READ COMMITTED`: a standby whose `default_transaction_isolation`
/// is `serializable` refuses the snapshot of a bare `SELECT` ("cannot use serializable
/// mode in a hot standby"). (A failure leaves the transaction open on the monitoring
/// connection, which is then closed.)
const REPLAY_POSITION: &str =
    "BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY; SELECT pg_last_wal_replay_lsn(); COMMIT";

/// Runs `query`, which returns one LSN, through the simple protocol.
pub(crate) async fn current_position(conn: &AsyncPgConnection, query: &str) -> Result<Lsn, String> {
    let messages = conn.simple_query(query).await.map_err(|e| e.to_string())?;
    let value = messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => Some(row.get(0)),
        _ => None,
    });
    match value {
        Some(Some(text)) => Lsn::parse(text).ok_or_else(|| format!("not a WAL position: {text:?}")),
        Some(None) => Err("not a standby (no replay position)".to_owned()),
        None => Err("no row".to_owned()),
    }
}

/// `host:port` of the URL's (first) server: how a replica is named in logs, metrics and
/// health output, never by its URL.
fn server_name(url: &DatabaseUrl) -> String {
    let config = url.pg_config();
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

/// The guarded value even if a thread panicked while holding the lock: every value kept
/// under these locks is valid at every point.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse_strictly_and_print_as_postgresql_does() {
        assert_eq!(Lsn::parse("0/16B3748"), Some(Lsn(0x16B_3748)));
        assert_eq!(Lsn::parse("1/0"), Some(Lsn(1 << 32)));
        assert_eq!(Lsn::parse("FFFFFFFF/FFFFFFFF"), Some(Lsn(u64::MAX)));
        for bad in [
            "",
            "0",
            "/0",
            "0/",
            "0/16b3748",
            "G/0",
            "123456789/0",
            " 0/1",
            "0/1/2",
            "+1/0",
        ] {
            assert_eq!(Lsn::parse(bad), None, "{bad:?}");
        }
        assert_eq!(Lsn(0x16B_3748).to_string(), "0/16B3748");
        assert_eq!(Lsn((3 << 32) | 0xA).to_string(), "3/A");
    }

    fn without_members(max_lag: Duration) -> Replicas {
        Replicas {
            members: Vec::new(),
            max_lag,
            sample_interval: Duration::from_millis(100),
            next: AtomicUsize::new(0),
            samples: Mutex::new(Samples::default()),
            closed: AtomicBool::new(false),
            pool_cfg: SessionConfig::default(),
            worker_shares: None,
        }
    }

    #[test]
    fn after_a_gap_in_the_primarys_samples_a_replicas_lag_counts_from_before_the_gap() {
        let replicas = without_members(Duration::from_secs(5));
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        replicas.record_position(Lsn(100), at(0));
        replicas.record_position(Lsn(150), at(100));
        // On time, a sample is dated when it was taken.
        assert_eq!(
            replicas.lag(Lsn(100), at(300)),
            Some(Duration::from_millis(200))
        );
        // Four seconds without an answer; then the primary is far ahead. The replica, still
        // at 150, may lack anything written since the answer at 100 ms.
        replicas.record_position(Lsn(900), at(4100));
        assert_eq!(
            replicas.lag(Lsn(150), at(4200)),
            Some(Duration::from_millis(4000))
        );
        assert_eq!(replicas.lag(Lsn(900), at(4200)), Some(Duration::ZERO));
    }

    #[test]
    fn a_replicas_lag_is_unknown_once_the_primary_has_gone_unsampled_for_the_maximum_lag() {
        let max_lag = Duration::from_secs(5);
        let replicas = without_members(max_lag);
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        assert_eq!(
            replicas.lag(Lsn(100), at(0)),
            None,
            "before the primary's first sample"
        );
        replicas.record_position(Lsn(100), at(0));
        assert_eq!(replicas.lag(Lsn(100), at(1000)), Some(Duration::ZERO));
        assert_eq!(
            replicas.lag(Lsn(90), at(1000)),
            Some(Duration::from_secs(1))
        );
        assert_eq!(replicas.lag(Lsn(100), at(5000)), Some(Duration::ZERO));
        // The primary stops answering: a caught-up replica's lag is unknown past the
        // maximum, however current it was.
        assert_eq!(replicas.lag(Lsn(100), at(5001)), None);
        assert_eq!(replicas.lag(Lsn(90), at(5001)), None);
        // It answers again, at the same position (an idle primary): trusted again.
        replicas.record_position(Lsn(100), at(6000));
        assert_eq!(replicas.lag(Lsn(100), at(6100)), Some(Duration::ZERO));
        assert_eq!(
            replicas.lag(Lsn(90), at(6100)),
            Some(Duration::from_millis(6100)),
            "still timed from the older sample it has not replayed"
        );
        assert!(replicas.primary_sampled_within_max_lag(at(11_000)));
        assert!(!replicas.primary_sampled_within_max_lag(at(11_001)));
        // The last lag measured is not trusted once the primary went unsampled too long.
        assert_eq!(
            replicas.trusted_lag(Some(Duration::ZERO)),
            Some(Duration::ZERO)
        );
        let silent = without_members(Duration::ZERO);
        silent.record_position(Lsn(1), Instant::now() - Duration::from_millis(10));
        assert_eq!(silent.trusted_lag(Some(Duration::ZERO)), None);
    }

    #[test]
    fn a_page_header_alone_is_no_lag() {
        assert!(Lsn(100).covers(Lsn(100)));
        assert!(!Lsn(99).covers(Lsn(100)));
        // The record before ended at the boundary; the insert position is past the header.
        assert!(Lsn(8192).covers(Lsn(8192 + 24)));
        assert!(Lsn(16 << 20).covers(Lsn((16 << 20) + 40)));
        assert!(!Lsn(8192).covers(Lsn(8192 + 48)));
        assert!(!Lsn(8184).covers(Lsn(8192 + 24)));
    }
}
