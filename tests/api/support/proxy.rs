//! A TCP proxy between the service and PostgreSQL that misbehaves on demand: it passes
//! traffic, refuses new connections, cuts every open connection, black-holes (keeps
//! every socket open and forwards nothing, in either direction, as a hung server or a
//! middlebox does while TCP still acknowledges, so keepalives never fire), or plays a
//! server that accepts and never answers. It can also add latency to every chunk, and it
//! speaks enough of the PostgreSQL protocol (`pgwire`) to break a connection exactly at
//! its `COMMIT` ([`Proxy::on_next_commit`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::pgwire::{ArmedFault, CommitFault, Verdict, Wire};

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Close new connections at once; open ones keep flowing.
    Refuse,
    /// Accept, keep every socket open, forward nothing. Data waits in the socket buffers
    /// and flows again when the mode returns to `Pass`.
    BlackHole,
    /// A server that accepts and then says nothing: new connections are accepted and
    /// what the client sends is held, never answered, and forgotten when the client hangs
    /// up (the proxy closes its side), so [`Proxy::open`] counts exactly the attempts the
    /// client still has open. When the mode returns to `Pass`, the connections still open
    /// go through to the server with what they sent. Connections opened before are held
    /// as in `BlackHole`.
    Silent,
}

#[derive(Clone, Copy)]
struct State {
    mode: Mode,
    /// Bumped by [`Proxy::cut_all`]; a connection opened under an older value closes.
    generation: u64,
    /// Connections numbered below this stay black-holed for good ([`Proxy::freeze_open`]).
    frozen_below: u64,
    /// Added to every chunk forwarded, in either direction ([`Proxy::set_latency`]).
    latency: Duration,
}

/// A running proxy on 127.0.0.1; stops (and closes every connection) when dropped.
pub struct Proxy {
    port: u16,
    state: watch::Sender<State>,
    open: Arc<AtomicUsize>,
    /// Connections accepted so far; the next one gets this number.
    accepted: Arc<AtomicU64>,
    fault: ArmedFault,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy to `upstream` on a free port of 127.0.0.1, in `Pass` mode.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
        let port = listener.local_addr().expect("proxy address").port();
        let (state, rx) = watch::channel(State {
            mode: Mode::Pass,
            generation: 0,
            frozen_below: 0,
            latency: Duration::ZERO,
        });
        let open = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let fault = ArmedFault::default();
        let accept = tokio::spawn(accept_loop(
            listener,
            upstream,
            rx,
            open.clone(),
            accepted.clone(),
            fault.clone(),
        ));
        Proxy {
            port,
            state,
            open,
            accepted,
            fault,
            accept,
        }
    }

    /// The port the service should connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Switches the mode (applies to open connections at once).
    pub fn set_mode(&self, mode: Mode) {
        self.state.send_modify(|s| s.mode = mode);
    }

    /// Delays every chunk forwarded from now on, in either direction, by `latency`
    /// (order preserved): a request and its answer each take `latency` longer, so a round
    /// trip costs twice `latency` more, as with a database in another zone.
    pub fn set_latency(&self, latency: Duration) {
        self.state.send_modify(|s| s.latency = latency);
    }

    /// Connections open through the proxy now (a `Silent` connection counts until its
    /// client hangs up).
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Lets new connections through again while the ones open now stay black-holed for
    /// good: a middlebox whose old flows died silently while the server recovered.
    pub fn freeze_open(&self) {
        self.state.send_modify(|s| {
            s.frozen_below = self.accepted.load(Ordering::SeqCst);
            s.mode = Mode::Pass;
        });
    }

    /// Breaks the next `COMMIT` any client sends through the proxy as `fault` says (only a
    /// connection without TLS can be read: give the client `sslmode=disable`).
    pub fn on_next_commit(&self, fault: CommitFault) {
        self.on_next_query("COMMIT", fault);
    }

    /// Breaks the next simple query `query` (`COMMIT`, `ROLLBACK`) as `fault` says.
    pub fn on_next_query(&self, query: &'static str, fault: CommitFault) {
        *self
            .fault
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((query, fault));
    }

    /// Whether the fault armed by [`Proxy::on_next_commit`] has been used.
    pub fn commit_fault_used(&self) -> bool {
        self.fault
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_none()
    }

    /// Closes every open connection (both sides); returns how many there were.
    pub fn cut_all(&self) -> usize {
        let mut open = 0;
        // Under the channel's write lock: the accept loop counts a connection and reads
        // its generation under the read lock, so none escapes the count.
        self.state.send_modify(|s| {
            open = self.open.load(Ordering::SeqCst);
            s.generation += 1;
        });
        open
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Dropping `state` ends every connection task (their receivers see it closed).
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    state: watch::Receiver<State>,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicU64>,
    fault: ArmedFault,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of file descriptors, say: do not spin.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        // Counted and numbered under the channel's read lock (see `cut_all`).
        let (now, id) = {
            let now = state.borrow();
            if now.mode != Mode::Refuse {
                open.fetch_add(1, Ordering::SeqCst);
            }
            (*now, accepted.fetch_add(1, Ordering::SeqCst))
        };
        if now.mode == Mode::Refuse {
            drop(client);
            continue;
        }
        let open = open.clone();
        let state = state.clone();
        let wire = Wire::new(fault.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = relay(client, upstream, id, state.clone(), wire) => {}
                () = cut(state, now.generation) => {}
            }
            open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// Connects upstream once traffic may flow, then forwards both ways until either side
/// closes.
async fn relay(
    mut client: TcpStream,
    upstream: SocketAddr,
    id: u64,
    mut state: watch::Receiver<State>,
    wire: Wire,
) {
    let Some(held) = accepted_until_flowing(&mut client, id, &mut state).await else {
        return;
    };
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let frontend = Pump {
        side: Side::Frontend,
        id,
        state: state.clone(),
        wire: wire.clone(),
    };
    let backend = Pump {
        side: Side::Backend,
        id,
        state,
        wire,
    };
    tokio::select! {
        () = frontend.run(client_read, server_write, held) => {}
        () = backend.run(server_read, client_write, Vec::new()) => {}
    }
}

/// Waits until traffic of a new connection may flow. While the proxy is `Silent`, reads
/// and holds what the client sends, and gives up (`None`) when it hangs up; returns what
/// was held.
async fn accepted_until_flowing(
    client: &mut TcpStream,
    id: u64,
    state: &mut watch::Receiver<State>,
) -> Option<Vec<u8>> {
    let mut held = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let now = *state.borrow_and_update();
        if is_flowing(&now, id) {
            return Some(held);
        }
        if now.mode == Mode::Silent {
            tokio::select! {
                read = client.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => held.extend_from_slice(&buf[..n]),
                },
                changed = state.changed() => changed.ok()?,
            }
        } else {
            state.changed().await.ok()?;
        }
    }
}

/// Which way a [`Pump`] copies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Client to server.
    Frontend,
    /// Server to client.
    Backend,
}

/// Copies one direction of a connection, message by message (see `pgwire`).
struct Pump {
    side: Side,
    id: u64,
    state: watch::Receiver<State>,
    wire: Wire,
}

impl Pump {
    /// Copies until either side closes, holding the data back while the proxy
    /// black-holes, each chunk delayed by the latency in force when it was read (chunks go
    /// one at a time: one that arrives during another's delay waits for it, which a
    /// request/response protocol never notices). `pending`: bytes already read.
    async fn run(mut self, mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut pending: Vec<u8>) {
        let mut buf = vec![0u8; 16 * 1024];
        let mut started = false;
        loop {
            while let Some(frame) = match self.side {
                Side::Frontend => self.wire.next_frontend(&mut pending, &mut started),
                Side::Backend => self.wire.next_backend(&mut pending),
            } {
                // Data read just as a black hole began is held back too.
                if !flowing(&mut self.state, self.id).await {
                    return;
                }
                if self.side == Side::Backend {
                    if self.wire.relays() {
                        if to.write_all(&frame.bytes).await.is_err() {
                            return;
                        }
                        self.wire.relayed(&frame);
                    }
                    continue;
                }
                match self.wire.verdict(&frame).await {
                    Verdict::Forward => {
                        if to.write_all(&frame.bytes).await.is_err() {
                            return;
                        }
                    }
                    Verdict::Fault(CommitFault::SwallowThenCut) => return,
                    Verdict::Fault(CommitFault::ForwardThenCut) => {
                        if to.write_all(&frame.bytes).await.is_ok() {
                            self.wire.all_answered().await;
                        }
                        return;
                    }
                    Verdict::Fault(CommitFault::ForwardThenSilence) => {
                        let _ = to.write_all(&frame.bytes).await;
                        std::future::pending::<()>().await;
                    }
                    Verdict::Fault(CommitFault::SwallowThenSilence) => {
                        std::future::pending::<()>().await;
                    }
                }
            }
            if !flowing(&mut self.state, self.id).await {
                return;
            }
            let n = tokio::select! {
                read = from.read(&mut buf) => match read {
                    // A server that goes away behind a silent proxy stays silent to its
                    // client: nothing, not even the close, is relayed any more.
                    Ok(0) | Err(_) if self.side == Side::Backend && !self.wire.relays() => {
                        std::future::pending::<()>().await;
                        return;
                    }
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
                // A mode change while waiting: look at the mode again (reads are
                // cancel-safe).
                changed = self.state.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let latency = self.state.borrow().latency;
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            pending.extend_from_slice(&buf[..n]);
        }
    }
}

/// Waits while connection `id` is black-holed; false once the proxy is gone.
async fn flowing(state: &mut watch::Receiver<State>, id: u64) -> bool {
    loop {
        let now = *state.borrow_and_update();
        if is_flowing(&now, id) {
            return true;
        }
        if state.changed().await.is_err() {
            return false;
        }
    }
}

fn is_flowing(state: &State, id: u64) -> bool {
    matches!(state.mode, Mode::Pass | Mode::Refuse) && id >= state.frozen_below
}

/// Resolves when connections of `generation` must be cut, or the proxy is gone.
async fn cut(mut state: watch::Receiver<State>, generation: u64) {
    while state.borrow_and_update().generation == generation {
        if state.changed().await.is_err() {
            return;
        }
    }
}
