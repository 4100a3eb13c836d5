//! What a session sends, statement by statement, as its SQL echo (`SessionConfig::echo`)
//! reports it: the options of a route travel in the BEGIN itself, transaction-local
//! settings in the same message as the BEGIN (or, once the transaction is open, as one
//! statement of their own), and a read-only transaction's COMMIT goes out alone.
//!
//! The echo is a log record per statement, captured here by a logger of this test
//! binary's own; hence one test in this binary, and nothing else logging statements.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Mutex;
use std::time::Duration;

use log::{Level, LevelFilter, Log, Metadata, Record};

use support::{Options, TestApp};

/// The log target of the SQL echo.
const SQL_TARGET: &str = "actix_diesel_session::sql";

/// What the session sends before a read-write transaction's COMMIT, pipelined with it, to
/// learn the transaction's id (shortened here).
const XID_QUERY: &str = "<transaction id query>";

static STATEMENTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Keeps the SQL echo; passes warnings and errors on to stderr.
struct Capture;

impl Log for Capture {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.target() == SQL_TARGET || metadata.level() <= Level::Warn
    }

    fn log(&self, record: &Record) {
        if record.target() == SQL_TARGET {
            let sql = record.args().to_string();
            let sql = if sql.starts_with("SELECT pg_current_xact_id_if_assigned()") {
                XID_QUERY.to_owned()
            } else {
                sql
            };
            STATEMENTS.lock().unwrap().push(sql);
        } else if self.enabled(record.metadata()) {
            eprintln!("{} {}: {}", record.level(), record.target(), record.args());
        }
    }

    fn flush(&self) {}
}

static CAPTURE: Capture = Capture;

/// The statements echoed since the last call.
fn sent() -> Vec<String> {
    std::mem::take(&mut *STATEMENTS.lock().unwrap())
}

#[actix_web::test]
async fn options_and_settings_travel_with_the_begin_and_a_read_only_commit_goes_alone() {
    log::set_logger(&CAPTURE).expect("the first logger of this binary");
    log::set_max_level(LevelFilter::Info);
    let app = TestApp::spawn_with(Options {
        config: |c| {
            c.echo = true;
            c.pool_size = 1;
            c.max_overflow = 0;
            // No ping before reuse in the echo.
            c.ping_if_idle_for = Duration::from_secs(3600);
        },
        ..Options::default()
    })
    .await;

    let show = [
        "SHOW transaction_isolation",
        "SHOW transaction_read_only",
        "SHOW transaction_deferrable",
    ];
    let read_setting = "SELECT coalesce(current_setting($1, true), '<null>') AS value";
    let tricky = r#"it's a \ "test"; --"#;
    let escaped = r#"BEGIN; SELECT set_config(E'app.x', E'it\'s a \\ "test"; --', true)"#;

    // The options in the BEGIN; no transaction id to learn for a read-only COMMIT.
    let sent_for = send(
        &app,
        "/options/serializable-read-only-deferrable",
        None,
        "",
        2,
    )
    .await;
    let begin = "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE";
    assert_eq!(sent_for, [&[begin][..], &show, &["COMMIT"]].concat());
    let sent_for = send(&app, "/options/repeatable-read", None, "", 2).await;
    let begin = "BEGIN ISOLATION LEVEL REPEATABLE READ";
    assert_eq!(
        sent_for,
        [&[begin][..], &show, &[XID_QUERY, "COMMIT"]].concat()
    );
    let sent_for = send(&app, "/read-only/count", None, "", 2).await;
    assert_eq!(
        sent_for,
        [
            "BEGIN READ ONLY",
            "SELECT count(*) AS n FROM items",
            "COMMIT"
        ]
    );
    // A read-write transaction, by contrast.
    let sent_for = send(&app, "/items/written", None, "", 2).await;
    let insert = "INSERT INTO items (name) VALUES ($1)";
    assert_eq!(sent_for, ["BEGIN", insert, XID_QUERY, "COMMIT"]);

    // Settings known before the first statement: in the BEGIN's message, escaped.
    let header = Some(("x-value", tricky));
    let sent_for = send(&app, "/settings-from/app.x", header, "", 2).await;
    assert_eq!(sent_for, [escaped, read_setting, XID_QUERY, "COMMIT"]);
    let sent_for = send(&app, "/set-local/before/app.x", None, tricky, 2).await;
    assert_eq!(sent_for, [escaped, read_setting, XID_QUERY, "COMMIT"]);
    // Once the transaction is open: a statement of its own, the value bound.
    let sent_for = send(&app, "/set-local/after/app.x", None, "v", 2).await;
    let set_config = "SELECT set_config($1, $2, true)";
    assert_eq!(
        sent_for,
        [
            "BEGIN",
            read_setting,
            set_config,
            read_setting,
            XID_QUERY,
            "COMMIT"
        ]
    );

    // A write in a read-only transaction fails, and the transaction is rolled back.
    let sent_for = send(&app, "/read-only/items/refused", None, "", 5).await;
    assert_eq!(sent_for, ["BEGIN READ ONLY", insert, "ROLLBACK"]);
}

/// POSTs `body` to `path` (with the header, if any), checks the status class (2 for 2xx)
/// and returns the statements the request's session sent.
async fn send(
    app: &TestApp,
    path: &str,
    header: Option<(&str, &str)>,
    body: &str,
    class: u16,
) -> Vec<String> {
    let mut request = app.client.post(app.url(path)).body(body.to_owned());
    if let Some((name, value)) = header {
        request = request.header(name, value);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status().as_u16() / 100, class, "{path}");
    sent()
}
