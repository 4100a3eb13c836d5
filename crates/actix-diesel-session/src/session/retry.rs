//! Running a request's whole transaction again after a conflict ([`Retry`]).
//!
//! PostgreSQL answers a transaction that lost a race under `SERIALIZABLE` (or
//! `REPEATABLE READ`) with SQLSTATE 40001, and one of two deadlocked transactions with
//! 40P01. Either way nothing of it was committed and the same work, run again from the
//! start in a new transaction, normally succeeds. The session can do that for the handler
//! because it owns the whole transaction: it rolls back, waits a little, and calls the
//! handler again with the same request and the same body.
//!
//! What makes that safe, and where it stops:
//! - The body is read into memory before the first attempt, up to [`Retry::body_limit`],
//!   and each attempt reads its own copy. A body past the limit is passed on unread (the
//!   handler's own extractor then refuses it or reads it), and that request is not retried.
//! - Only an attempt that did not commit is run again: one whose statement failed with
//!   40001/40P01 (whatever the handler then answered), or whose COMMIT was refused with
//!   one of them. Never one whose COMMIT's answer was lost (it may have committed), one
//!   that committed early ([`super::DbSession::commit`]), one that panicked or ran past a
//!   deadline.
//! - After-commit hooks of an attempt that did not commit are dropped with it: only the
//!   attempt that committed runs its hooks. The session cannot undo anything else a handler
//!   did (a call to another service, a message sent): such side effects belong in
//!   [`super::DbSession::after_commit`] hooks, or the route must not retry.
//! - Each attempt gets the same request: what a handler, an extractor or an inner
//!   middleware stored in its extensions in a failed attempt is still there in the next
//!   (only the session's own state is removed). Do not keep rows read inside the
//!   transaction there: the next attempt must read them again, in its own snapshot.
//! - A conflict the handler recovered from, by rolling back to a savepoint around it, is
//!   no reason to retry: the handler's answer stands. One it swallowed (answering success
//!   in a transaction the conflict aborted) is: without a retry policy it is answered
//!   503 [`crate::SessionError::Conflict`], not a 500.
//! - The time bound (`within`) starts once the body has been read, so a slow upload does
//!   not use it up.
//! - The request goes through the same inner services again, so the middleware must wrap
//!   the resource or route, whose routing has already happened, not a scope (whose router
//!   would have to match the path a second time: Actix offers no way to undo its first
//!   match). Around a scope the conflict is answered without a retry, and an error is
//!   logged.

use std::time::Duration;

use actix_web::dev::{Payload, ServiceRequest};
use actix_web::error::PayloadError;
use actix_web::http::header::CONTENT_LENGTH;
use actix_web::web::{Bytes, BytesMut};
use actix_web::HttpMessage;
use futures_util::stream::{self, StreamExt};

/// How a [`super::SessionMiddleware`] retries its sessions' transactions after a
/// serialization failure (40001) or a deadlock (40P01); see
/// [`super::SessionMiddleware::retry`].
///
/// The defaults: 3 attempts in all, a back-off drawn at random between 5 and 10 ms before
/// the second attempt and twice that before each next one (at most 250 ms), no attempt
/// started later than 2 s after the first, and bodies up to 256 KiB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retry {
    attempts: u32,
    first_backoff: Duration,
    max_backoff: Duration,
    within: Duration,
    body_limit: usize,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 3,
            first_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(250),
            within: Duration::from_secs(2),
            body_limit: 256 * 1024,
        }
    }
}

impl Retry {
    /// How many times the handler may run in all, the first attempt included (at least 1).
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// The back-off before the second attempt is drawn at random between half of `first`
    /// and `first`; each next one's bounds double, up to `max` ("equal jitter": requests
    /// that conflicted with each other do not come back in step, and each waits at least
    /// half its bound, long enough for the transaction that won to finish).
    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        self.first_backoff = first;
        self.max_backoff = max.max(first);
        self
    }

    /// No attempt starts later than `total` after the first one started: the bound on the
    /// time retries add to a request (the last attempt's own statements are bounded as
    /// usual).
    pub fn within(mut self, total: Duration) -> Self {
        self.within = total;
        self
    }

    /// The largest body kept for the next attempts. Set it to the limit the route's
    /// extractors enforce (say `JsonConfig::limit`): a body past it is not buffered, and
    /// its request not retried.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// The configured number of attempts.
    pub fn max_attempts(&self) -> u32 {
        self.attempts
    }

    /// The wait before the attempt after attempt `failed` (1 for the first), or `None`
    /// when there is to be no other: all attempts made, or the next one would start past
    /// the total bound (`elapsed` since the first began).
    pub(crate) fn delay(&self, failed: u32, elapsed: Duration) -> Option<Duration> {
        if failed >= self.attempts {
            return None;
        }
        let doubled = self
            .first_backoff
            .saturating_mul(1 << (failed - 1).min(16))
            .min(self.max_backoff);
        let micros = u64::try_from(doubled.as_micros()).unwrap_or(u64::MAX);
        let delay = Duration::from_micros(fastrand::u64(micros / 2..=micros));
        (elapsed + delay < self.within).then_some(delay)
    }

    /// Reads the request's body into memory for the attempts to share, up to the body
    /// limit, and gives the request a copy to read. A body past the limit, or one whose
    /// reading failed, is put back as it came (the part read, then the rest or the error)
    /// for the handler to deal with, and `None` says that the request cannot be run again.
    pub(crate) async fn buffer(&self, req: &mut ServiceRequest) -> Option<Bytes> {
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > self.body_limit) {
            return None;
        }
        let mut payload = req.take_payload();
        let mut body = BytesMut::new();
        loop {
            match payload.next().await {
                None => {
                    let body = body.freeze();
                    req.set_payload(Payload::from(body.clone()));
                    return Some(body);
                }
                Some(Ok(chunk)) if body.len() + chunk.len() <= self.body_limit => {
                    body.extend_from_slice(&chunk);
                }
                Some(next) => {
                    // Too large, or broken: the handler gets the stream as it was.
                    let read: Result<Bytes, PayloadError> = Ok(body.freeze());
                    let rest = stream::iter([read, next]).chain(payload);
                    req.set_payload(Payload::Stream {
                        payload: Box::pin(rest),
                    });
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_grows_is_capped_and_stops_after_the_last_attempt_or_the_bound() {
        let retry = Retry::default()
            .attempts(5)
            .backoff(Duration::from_millis(10), Duration::from_millis(25))
            .within(Duration::from_secs(1));
        for _ in 0..200 {
            let first = retry.delay(1, Duration::ZERO).unwrap_or(Duration::MAX);
            assert!(first >= Duration::from_millis(5) && first <= Duration::from_millis(10));
            let second = retry.delay(2, Duration::ZERO).unwrap_or(Duration::MAX);
            assert!(second >= Duration::from_millis(10) && second <= Duration::from_millis(20));
            let third = retry.delay(3, Duration::ZERO).unwrap_or(Duration::MAX);
            assert!(third <= Duration::from_millis(25), "capped: {third:?}");
        }
        assert_eq!(retry.delay(5, Duration::ZERO), None, "five attempts made");
        assert_eq!(
            retry.delay(1, Duration::from_secs(1)),
            None,
            "past the total bound"
        );
        assert_eq!(Retry::default().attempts(0).max_attempts(), 1);
    }
}
