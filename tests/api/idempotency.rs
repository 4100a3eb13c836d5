//! `Idempotency-Key` (contract section 4): replays, conflicts, scoping, malformed keys,
//! failed first requests, concurrent repeats, in-flight repeats, expiry and purge.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::HeaderValue;
use serde_json::json;
use tokio::task::JoinHandle;

use crate::support::{eventually, spawn_app, spawn_app_with, Answer, TestApp};

fn body(from: i64, to: i64, amount: i64) -> String {
    json!({ "from_account_id": from, "to_account_id": to, "amount": amount }).to_string()
}

/// A `POST /transfers/batch` body of these items, as sent.
fn batch_body(items: &[String]) -> String {
    format!(r#"{{"transfers": [{}]}}"#, items.join(", "))
}

async fn two_accounts(app: &TestApp) -> (i64, i64) {
    (
        app.account_id("payer", 1000).await,
        app.account_id("payee", 0).await,
    )
}

fn assert_replay_of(replay: &Answer, first: &Answer) {
    assert_eq!(replay.status, first.status);
    assert_eq!(replay.text, first.text, "the replay repeats the body bytes");
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.header("content-type"), first.header("content-type"));
    assert_eq!(replay.header("location"), first.header("location"));
}

#[tokio::test]
async fn a_repeat_replays_the_first_response_without_applying_again() {
    let app = spawn_app().await;
    let (payer, payee) = two_accounts(&app).await;

    let first = app
        .post_keyed("/transfers", Some("key-1"), &body(payer, payee, 100))
        .await;
    let second = app
        .post_keyed("/transfers", Some("key-1"), &body(payer, payee, 100))
        .await;

    assert_eq!(first.status, 201, "{}", first.text);
    assert!(first.header("idempotent-replayed").is_none());
    assert!(first.header("location").is_some());
    assert_replay_of(&second, &first);
    assert_ne!(
        second.header("x-request-id"),
        first.header("x-request-id"),
        "a replay is a request of its own"
    );
    let state = app.db.ledger_state().await;
    assert_eq!(state.transfers, 1);
    assert_eq!(state.balances, vec![(payer, 900), (payee, 100)]);
    assert_eq!(state.idempotency_keys, 1);
    // A different key is a different request.
    let other = app
        .post_keyed("/transfers", Some("key-2"), &body(payer, payee, 100))
        .await;
    assert_eq!(other.status, 201);
    assert!(other.header("idempotent-replayed").is_none());
    assert_eq!(app.db.ledger_state().await.transfers, 2);
}

#[tokio::test]
async fn the_same_json_value_spelt_differently_replays() {
    let app = spawn_app().await;
    let (payer, payee) = two_accounts(&app).await;
    let first = app
        .post_keyed("/transfers", Some("k"), &body(payer, payee, 7))
        .await;
    assert_eq!(first.status, 201);

    let respelt = format!(
        "\n{{ \"amount\" :7,\n\t\"to_account_id\": {payee} , \"from_account_id\":{payer} }}  "
    );
    let replay = app.post_keyed("/transfers", Some("k"), &respelt).await;

    assert_replay_of(&replay, &first);
    assert_eq!(app.db.ledger_state().await.transfers, 1);

    // The same for a batch.
    let batch = batch_body(&[body(payer, payee, 1), body(payee, payer, 1)]);
    let first = app.post_keyed("/transfers/batch", Some("b"), &batch).await;
    assert_eq!(first.status, 201, "{}", first.text);
    let respelt = format!(
        r#"{{ "transfers" : [ {{"to_account_id":{payee},"amount":1,"from_account_id":{payer}}},
              {{"amount":1,"from_account_id":{payee},"to_account_id":{payer}}} ] }}"#
    );
    let replay = app
        .post_keyed("/transfers/batch", Some("b"), &respelt)
        .await;
    assert_replay_of(&replay, &first);
    assert_eq!(app.db.ledger_state().await.transfers, 3);
}

#[tokio::test]
async fn a_key_reused_with_another_body_gets_409_and_applies_nothing() {
    let app = spawn_app().await;
    let (payer, payee) = two_accounts(&app).await;
    assert_eq!(
        app.post_keyed("/transfers", Some("k"), &body(payer, payee, 10))
            .await
            .status,
        201
    );
    let before = app.db.ledger_state().await;

    for other in [body(payer, payee, 11), body(payee, payer, 10)] {
        let answer = app.post_keyed("/transfers", Some("k"), &other).await;
        answer.assert_problem(409, "idempotency_conflict");
        assert!(answer.header("idempotent-replayed").is_none());
        assert_eq!(app.db.ledger_state().await, before);
    }
    // Items in another order are another request.
    let batch = |a: i64, b: i64| batch_body(&[body(a, b, 1), body(b, a, 1)]);
    assert_eq!(
        app.post_keyed("/transfers/batch", Some("kb"), &batch(payer, payee))
            .await
            .status,
        201
    );
    let before_batch = app.db.ledger_state().await;
    app.post_keyed("/transfers/batch", Some("kb"), &batch(payee, payer))
        .await
        .assert_problem(409, "idempotency_conflict");
    assert_eq!(app.db.ledger_state().await, before_batch);
    assert_eq!(before.transfers + 2, before_batch.transfers);
}

#[tokio::test]
async fn keys_are_scoped_to_the_endpoint() {
    let app = spawn_app().await;
    let (payer, payee) = two_accounts(&app).await;

    let single = app
        .post_keyed("/transfers", Some("shared"), &body(payer, payee, 5))
        .await;
    let batch = app
        .post_keyed(
            "/transfers/batch",
            Some("shared"),
            &batch_body(&[body(payer, payee, 5)]),
        )
        .await;

    assert_eq!(single.status, 201);
    assert_eq!(batch.status, 201, "{}", batch.text);
    assert!(batch.header("idempotent-replayed").is_none());
    let state = app.db.ledger_state().await;
    assert_eq!(state.transfers, 2);
    assert_eq!(state.idempotency_keys, 2);
}

/// POSTs a JSON `payload` with these `Idempotency-Key` headers, as many as given.
async fn post_with_keys(app: &TestApp, path: &str, keys: &[HeaderValue], payload: &str) -> Answer {
    let mut request = app
        .client
        .post(app.url(path))
        .header("content-type", "application/json")
        .body(payload.to_owned());
    for key in keys {
        request = request.header("idempotency-key", key.clone());
    }
    Answer::from(request.send().await.unwrap()).await
}

#[tokio::test]
async fn malformed_keys_get_400_before_anything_is_applied() {
    let app = spawn_app().await;
    let (payer, payee) = two_accounts(&app).await;
    let before = app.db.ledger_state().await;
    let bad: Vec<HeaderValue> = vec![
        HeaderValue::from_static(""),
        HeaderValue::from_str(&"k".repeat(256)).unwrap(),
        HeaderValue::from_static("has space"),
        HeaderValue::from_static("tab\there"),
        HeaderValue::from_bytes("clé".as_bytes()).unwrap(),
    ];
    for path in ["/transfers", "/transfers/batch"] {
        let payload = if path == "/transfers" {
            body(payer, payee, 1)
        } else {
            batch_body(&[body(payer, payee, 1)])
        };
        for key in &bad {
            let answer = post_with_keys(&app, path, std::slice::from_ref(key), &payload).await;
            answer.assert_problem(400, "bad_request");
        }
        let two = [
            HeaderValue::from_static("one"),
            HeaderValue::from_static("two"),
        ];
        let twice = post_with_keys(&app, path, &two, &payload).await;
        twice.assert_problem(400, "bad_request");
        assert_eq!(app.db.ledger_state().await, before);
    }
    // The longest key and every visible character are fine.
    let longest = "k".repeat(255);
    let visible: String = (0x21u8..=0x7e).map(char::from).collect();
    for key in [longest.as_str(), visible.as_str()] {
        let answer = app
            .post_keyed("/transfers", Some(key), &body(payer, payee, 1))
            .await;
        assert_eq!(answer.status, 201, "{}", answer.text);
    }
    assert_eq!(app.db.ledger_state().await.idempotency_keys, 2);
}

#[tokio::test]
async fn a_failed_first_request_leaves_no_key_so_a_later_one_applies() {
    let app = spawn_app().await;
    let poor = app.account_id("poor", 100).await;
    let payee = app.account_id("payee", 0).await;
    let donor = app.account_id("donor", 1000).await;
    let before = app.db.ledger_state().await;

    let failed = app
        .post_keyed("/transfers", Some("retry-me"), &body(poor, payee, 500))
        .await;
    failed.assert_problem(409, "insufficient_funds");
    assert_eq!(
        app.db.ledger_state().await,
        before,
        "no key row survives the rollback"
    );
    // The same request fails the same way (it is applied afresh, not replayed).
    let again = app
        .post_keyed("/transfers", Some("retry-me"), &body(poor, payee, 500))
        .await;
    again.assert_problem(409, "insufficient_funds");
    assert!(again.header("idempotent-replayed").is_none());

    assert_eq!(app.transfer(donor, poor, 400).await.status, 201);
    let applied = app
        .post_keyed("/transfers", Some("retry-me"), &body(poor, payee, 500))
        .await;
    assert_eq!(applied.status, 201, "{}", applied.text);
    assert!(applied.header("idempotent-replayed").is_none());
    let state = app.db.ledger_state().await;
    assert_eq!(state.balances, vec![(poor, 0), (payee, 500), (donor, 600)]);
    assert_eq!(state.idempotency_keys, 1);

    // A failed batch leaves no key either.
    let batch = batch_body(&[body(payee, poor, 501)]);
    app.post_keyed("/transfers/batch", Some("b"), &batch)
        .await
        .assert_problem(409, "insufficient_funds");
    assert_eq!(app.db.ledger_state().await.idempotency_keys, 1);
}

#[tokio::test]
async fn twenty_concurrent_requests_with_one_key_apply_exactly_once() {
    let app = spawn_app_with(&[("DB_POOL_TIMEOUT", "30")]).await;
    let (payer, payee) = two_accounts(&app).await;
    let payload = body(payer, payee, 10);

    let answers = futures_util::future::join_all(
        (0..20).map(|_| app.post_keyed("/transfers", Some("once"), &payload)),
    )
    .await;

    for answer in &answers {
        assert_eq!(answer.status, 201, "{}", answer.text);
        assert_eq!(answer.text, answers[0].text, "every answer is the same");
    }
    let replays = answers
        .iter()
        .filter(|a| a.header("idempotent-replayed") == Some("true"))
        .count();
    assert_eq!(replays, 19);
    let state = app.db.ledger_state().await;
    assert_eq!(state.transfers, 1);
    assert_eq!(state.balances, vec![(payer, 990), (payee, 10)]);
}

/// Holds a row lock on `account` from a connection of the test's own, so that a transfer
/// from it stays in flight (inside its transaction, key claimed) until released.
async fn hold_account(app: &TestApp, account: i64) -> tokio_postgres::Client {
    let client = app.db.client().await;
    client.batch_execute("BEGIN").await.unwrap();
    client
        .execute(
            "SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE",
            &[&account],
        )
        .await
        .unwrap();
    client
}

async fn wait_for(app: &TestApp, fragment: &str, count: i64) {
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.db.waiting_on_lock(fragment).await == count
        })
        .await,
        "expected {count} request(s) waiting on a lock in a statement with {fragment:?}"
    );
}

/// A keyed transfer of 100 from `payer` to `payee`, held in flight (key claimed) by
/// `lock`, a row lock on the payer, and a repeat of it that waits on the claimed key.
struct InFlightRepeat {
    app: Arc<TestApp>,
    payer: i64,
    payee: i64,
    /// `COMMIT` on it lets the first request go on.
    lock: tokio_postgres::Client,
    first: JoinHandle<Answer>,
    second: JoinHandle<Answer>,
}

impl InFlightRepeat {
    async fn start(key: &'static str) -> InFlightRepeat {
        let app = Arc::new(spawn_app().await);
        let (payer, payee) = two_accounts(&app).await;
        let payload = body(payer, payee, 100);
        let lock = hold_account(&app, payer).await;
        let send = || {
            let (app, payload) = (app.clone(), payload.clone());
            tokio::spawn(async move { app.post_keyed("/transfers", Some(key), &payload).await })
        };
        let first = send();
        // The first has claimed the key and waits for the account row.
        wait_for(&app, "FOR UPDATE", 1).await;
        let second = send();
        // The repeat waits on the key the first inserted.
        wait_for(&app, "idempotency_keys", 1).await;
        InFlightRepeat {
            app,
            payer,
            payee,
            lock,
            first,
            second,
        }
    }
}

#[tokio::test]
async fn a_repeat_that_arrives_while_the_first_is_in_flight_waits_and_replays() {
    let InFlightRepeat {
        app,
        payer,
        payee,
        lock,
        first,
        second,
    } = InFlightRepeat::start("slow").await;
    // No answer yet, no polling.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!first.is_finished() && !second.is_finished());

    lock.batch_execute("COMMIT").await.unwrap();
    let first = first.await.unwrap();
    let second = second.await.unwrap();

    assert_eq!(first.status, 201, "{}", first.text);
    assert!(first.header("idempotent-replayed").is_none());
    assert_replay_of(&second, &first);
    let state = app.db.ledger_state().await;
    assert_eq!(state.transfers, 1);
    assert_eq!(state.balances, vec![(payer, 900), (payee, 100)]);
}

#[tokio::test]
async fn a_repeat_waiting_on_a_first_that_rolls_back_applies_itself() {
    let InFlightRepeat {
        app,
        payer,
        payee,
        lock,
        first,
        second,
    } = InFlightRepeat::start("k").await;

    // The first request's backend dies while it waits: its transaction (and key) is gone.
    let killed: i64 = app
        .db
        .client()
        .await
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name = 'ledger' \
             AND wait_event_type = 'Lock' AND query LIKE '%FOR UPDATE%'",
            &[&app.db.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    let first = first.await.unwrap();
    first.assert_problem(503, "database_unavailable");
    // The repeat now owns the key and waits for the account row in turn.
    wait_for(&app, "FOR UPDATE", 1).await;
    assert!(!second.is_finished());
    lock.batch_execute("COMMIT").await.unwrap();

    let second = second.await.unwrap();
    assert_eq!(second.status, 201, "{}", second.text);
    assert!(second.header("idempotent-replayed").is_none());
    let state = app.db.ledger_state().await;
    assert_eq!(state.transfers, 1);
    assert_eq!(state.idempotency_keys, 1);
    assert_eq!(state.balances, vec![(payer, 900), (payee, 100)]);
}

#[tokio::test]
async fn an_expired_key_is_not_replayed_even_before_it_is_purged() {
    // Default TTL (a day): the purge runs only after a minute, so the stale row stays.
    let app = spawn_app().await;
    let (payer, payee) = two_accounts(&app).await;
    let payload = body(payer, payee, 10);
    let first = app.post_keyed("/transfers", Some("old"), &payload).await;
    assert_eq!(first.status, 201);
    let aged = app
        .db
        .client()
        .await
        .execute(
            "UPDATE idempotency_keys SET created_at = now() - interval '25 hours'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(aged, 1);

    let repeat = app.post_keyed("/transfers", Some("old"), &payload).await;

    assert_eq!(repeat.status, 201, "{}", repeat.text);
    assert!(repeat.header("idempotent-replayed").is_none());
    assert_ne!(repeat.text, first.text);
    let state = app.db.ledger_state().await;
    assert_eq!(state.transfers, 2);
    assert_eq!(state.idempotency_keys, 1, "the stale row was taken over");
    // And the fresh row replays again.
    let replay = app.post_keyed("/transfers", Some("old"), &payload).await;
    assert_replay_of(&replay, &repeat);
}

#[tokio::test]
async fn expired_keys_are_purged_in_the_background() {
    // A TTL of 8 s purges every 2 s.
    let app = spawn_app_with(&[("IDEMPOTENCY_TTL_SECS", "8")]).await;
    let (payer, payee) = two_accounts(&app).await;
    let fresh = app
        .post_keyed("/transfers", Some("fresh"), &body(payer, payee, 1))
        .await;
    assert_eq!(fresh.status, 201);
    let client = app.db.client().await;
    client
        .execute(
            "INSERT INTO idempotency_keys (endpoint, key, fingerprint, response_status, \
             response_body, created_at) \
             SELECT 'POST /transfers', 'stale-' || n, 'x', 201, '{}', now() - interval '1 hour' \
             FROM generate_series(1, 1500) AS n",
            &[],
        )
        .await
        .unwrap();

    let purged = eventually(Duration::from_secs(10), || async {
        app.db
            .scalar("SELECT count(*) FROM idempotency_keys WHERE key LIKE 'stale-%'")
            .await
            == 0
    })
    .await;

    assert!(purged, "expired keys were purged");
    assert_eq!(
        app.db
            .scalar("SELECT count(*) FROM idempotency_keys WHERE key = 'fresh'")
            .await,
        1,
        "a key younger than the TTL stays"
    );
}
