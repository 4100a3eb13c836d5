//! PostgreSQL message framing for the fault proxy, so that it can act on the frontend
//! message that carries `COMMIT` (see [`CommitFault`]) and know which answers belong
//! before it.
//!
//! The proxy splits each direction into whole protocol messages: after the start-up
//! packet (and an `SSLRequest` answered `N`), a frontend or backend message is a type byte
//! and a length. A connection that goes to TLS (or is a cancel request) is relayed as it
//! comes, unframed. Every `Query` and `Sync` the client sends is answered by exactly one
//! `ReadyForQuery`, and so is the start-up packet: counting both says when every answer to
//! what came before a message has been relayed.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

/// What the proxy does with the next `COMMIT` (or `ROLLBACK`) a client sends (simple
/// protocol, the way the session sends them), on whichever connection it comes. It first
/// relays every answer to what the client sent before it (the transaction-id query
/// pipelined ahead of the COMMIT, say), then:
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitFault {
    /// Forwards the COMMIT, waits until the server has answered it, drops that answer and
    /// closes the connection: the transaction committed, the client never hears so.
    ForwardThenCut,
    /// Closes the connection without forwarding the COMMIT: the server never sees it
    /// and rolls back when it sees the socket close.
    SwallowThenCut,
    /// Forwards the COMMIT and then relays nothing more in either direction, keeping both
    /// sockets open: a server, or a middlebox, that went silent during COMMIT.
    ForwardThenSilence,
    /// Relays nothing more in either direction, the COMMIT included, keeping both sockets
    /// open: the server's backend waits in its transaction, which stays in progress.
    SwallowThenSilence,
}

/// The proxy's armed fault and the simple query it waits for (`COMMIT`, `ROLLBACK`),
/// shared by all its connections: the first such query takes it.
pub type ArmedFault = Arc<Mutex<Option<(&'static str, CommitFault)>>>;

/// One message of the stream, or a run of bytes relayed as they come.
pub struct Frame {
    /// The message's type byte; 0 for a start-up packet, an `SSLRequest` answer or
    /// unframed bytes.
    pub kind: u8,
    pub bytes: Vec<u8>,
}

impl Frame {
    /// Whether this is the simple query `text`.
    fn is_query(&self, text: &str) -> bool {
        self.kind == b'Q'
            && self
                .bytes
                .get(5..)
                .and_then(|q| q.strip_suffix(b"\0"))
                .is_some_and(|q| q == text.as_bytes())
    }
}

/// What the frontend side does with a frame.
pub enum Verdict {
    Forward,
    /// Forward it, then act on the armed fault (the frame is the COMMIT).
    Fault(CommitFault),
}

#[derive(Default)]
struct Counts {
    /// Relay bytes as they come: TLS, or a cancel request.
    opaque: bool,
    /// The client sent an `SSLRequest` (or `GSSENCRequest`): the server answers one byte.
    single_byte_answer: bool,
    /// Messages the client sent that the server answers with a `ReadyForQuery`.
    sync_points: u64,
    /// `ReadyForQuery` messages read from the server, and those relayed to the client.
    ready_read: u64,
    ready_relayed: u64,
    /// Drop what the server sends instead of relaying it (after a faulted COMMIT).
    hold_backend: bool,
}

/// The framing state of one proxied connection, shared by its two directions.
#[derive(Clone)]
pub struct Wire {
    counts: Arc<Mutex<Counts>>,
    changed: Arc<Notify>,
    fault: ArmedFault,
}

impl Wire {
    pub fn new(fault: ArmedFault) -> Wire {
        Wire {
            counts: Arc::default(),
            changed: Arc::new(Notify::new()),
            fault,
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, change: impl FnOnce(&mut Counts)) {
        change(&mut self.counts());
        self.changed.notify_waiters();
    }

    async fn wait_until(&self, done: impl Fn(&Counts) -> bool) {
        loop {
            let changed = self.changed.notified();
            if done(&self.counts()) {
                return;
            }
            changed.await;
        }
    }

    /// Takes the next whole frame the client sent out of `buf`.
    pub fn next_frontend(&self, buf: &mut Vec<u8>, started: &mut bool) -> Option<Frame> {
        if buf.is_empty() {
            return None;
        }
        if self.counts().opaque {
            return Some(Frame {
                kind: 0,
                bytes: std::mem::take(buf),
            });
        }
        if !*started {
            // A start-up-phase packet: length (itself included), then a request code.
            let len = be_u32(buf, 0)? as usize;
            if buf.len() < len || len < 8 {
                return None;
            }
            let bytes: Vec<u8> = buf.drain(..len).collect();
            match be_u32(&bytes, 4)? {
                // SSLRequest, GSSENCRequest: the server answers one byte.
                80_877_103 | 80_877_104 => self.update(|c| c.single_byte_answer = true),
                // CancelRequest: nothing follows.
                80_877_102 => self.update(|c| c.opaque = true),
                // The start-up message: answered by a ReadyForQuery after authentication.
                _ => {
                    *started = true;
                    self.update(|c| c.sync_points += 1);
                }
            }
            return Some(Frame { kind: 0, bytes });
        }
        let frame = typed_frame(buf)?;
        if frame.kind == b'Q' || frame.kind == b'S' {
            self.update(|c| c.sync_points += 1);
        }
        Some(frame)
    }

    /// Takes the next whole frame the server sent out of `buf`.
    pub fn next_backend(&self, buf: &mut Vec<u8>) -> Option<Frame> {
        if buf.is_empty() {
            return None;
        }
        let (opaque, single) = {
            let c = self.counts();
            (c.opaque, c.single_byte_answer)
        };
        if opaque {
            return Some(Frame {
                kind: 0,
                bytes: std::mem::take(buf),
            });
        }
        if single {
            let answer = buf.remove(0);
            // `N`: no TLS, the client sends its start-up message next; anything else and
            // the rest of the connection is TLS.
            self.update(|c| {
                c.single_byte_answer = false;
                c.opaque = answer != b'N';
            });
            return Some(Frame {
                kind: 0,
                bytes: vec![answer],
            });
        }
        let frame = typed_frame(buf)?;
        if frame.kind == b'Z' {
            self.update(|c| c.ready_read += 1);
        }
        Some(frame)
    }

    /// What to do with a frame the client sent; for the COMMIT that takes the armed fault,
    /// waits first until every answer to what the client sent before it has been relayed.
    pub async fn verdict(&self, frame: &Frame) -> Verdict {
        let fault = {
            let mut armed = self.fault.lock().unwrap_or_else(PoisonError::into_inner);
            match *armed {
                Some((query, fault)) if frame.is_query(query) => {
                    *armed = None;
                    fault
                }
                _ => return Verdict::Forward,
            }
        };
        // The COMMIT itself was counted when it was framed.
        self.wait_until(|c| c.ready_relayed + 1 >= c.sync_points)
            .await;
        if fault != CommitFault::SwallowThenCut {
            self.update(|c| c.hold_backend = true);
        }
        Verdict::Fault(fault)
    }

    /// Waits until the server has answered everything the client sent (the faulted COMMIT
    /// included).
    pub async fn all_answered(&self) {
        self.wait_until(|c| c.ready_read >= c.sync_points).await;
    }

    /// Whether a frame the server sent is relayed to the client.
    pub fn relays(&self) -> bool {
        !self.counts().hold_backend
    }

    /// A frame the server sent was relayed.
    pub fn relayed(&self, frame: &Frame) {
        if frame.kind == b'Z' {
            self.update(|c| c.ready_relayed += 1);
        }
    }
}

fn be_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_be_bytes(bytes))
}

/// A message with a type byte and a length (itself included, the type byte not).
fn typed_frame(buf: &mut Vec<u8>) -> Option<Frame> {
    let len = be_u32(buf, 1)? as usize + 1;
    if buf.len() < len {
        return None;
    }
    let bytes: Vec<u8> = buf.drain(..len).collect();
    Some(Frame {
        kind: bytes[0],
        bytes,
    })
}
