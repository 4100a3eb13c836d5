//! `DB_ECHO` and round trips, observed from the outside: the real binary's log.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::support::{eventually, free_port, TestDb};

/// Echo logs statement text only (no bind values, never the URL or its password), and a
/// request costs exactly BEGIN, its own statements, the transaction-id query pipelined
/// with COMMIT, and COMMIT: no ping, no SET.
#[tokio::test]
async fn echo_logs_statement_text_only_and_requests_cost_no_extra_round_trips() {
    let db = TestDb::migrated().await;
    // Trust authentication ignores the password; it is there to prove it never shows.
    let url = db
        .url
        .replacen("://postgres@", "://postgres:echo-pw-secret@", 1);
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ledger"))
        .env_clear()
        .env("DATABASE_URL", &url)
        .env("PORT", port.to_string())
        .env("DB_ECHO", "true")
        .env("RUN_MIGRATIONS", "false")
        .env("RUST_LOG", "info")
        .current_dir(std::env::temp_dir())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ledger");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let (stderr, lines) = (child.stderr.take().unwrap(), lines.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        })
    };
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    assert!(
        eventually(Duration::from_secs(10), || async {
            client
                .get(format!("{base}/health/live"))
                .send()
                .await
                .is_ok()
        })
        .await,
        "the binary started"
    );

    let sql_lines = || -> Vec<String> {
        lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("actix_diesel_session::sql"))
            .cloned()
            .collect()
    };
    let created = client
        .post(format!("{base}/accounts"))
        .json(&json!({ "name": "bind-value-must-not-show", "balance": 424242 }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let id = created.json::<serde_json::Value>().await.unwrap()["id"]
        .as_i64()
        .unwrap();
    assert!(eventually(Duration::from_secs(2), || async { sql_lines().len() >= 5 }).await);
    let after_create = sql_lines();

    for _ in 0..2 {
        let got = client
            .get(format!("{base}/accounts/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(got.status(), 200);
    }
    assert!(eventually(Duration::from_secs(2), || async { sql_lines().len() >= 11 }).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();

    let all = lines.lock().unwrap().join("\n");
    assert!(
        !all.contains("echo-pw-secret"),
        "the password never reaches the log:\n{all}"
    );
    assert!(
        all.contains("postgres:***@"),
        "the start-up line shows the redacted URL:\n{all}"
    );
    assert!(
        !all.contains("bind-value-must-not-show") && !all.contains("424242"),
        "no bind values:\n{all}"
    );

    let statements: Vec<String> = sql_lines()
        .iter()
        .map(|l| {
            // `<ts> INFO actix_diesel_session::sql rid=<id>: <statement>`
            let after_target = l.split_once("actix_diesel_session::sql").unwrap().1;
            after_target.split_once(": ").unwrap().1.trim().to_owned()
        })
        .collect();
    // The transaction's id query is pipelined with COMMIT (no round trip of its own).
    let is_id_query = |s: &str| s.starts_with("SELECT pg_current_xact_id_if_assigned()::text");
    // After the COMMIT, one more: the WAL position for the answer's Consistency-Token
    // (the one round trip a write pays for read-your-writes; README, "Read replicas").
    assert_eq!(
        after_create.len(),
        5,
        "POST /accounts: BEGIN, INSERT, the id query, COMMIT, the WAL position:\n{}",
        statements.join("\n")
    );
    assert_eq!(
        statements.len(),
        11,
        "two reads in read-only transactions: BEGIN READ ONLY, SELECT, COMMIT each (no id \
         query: a read-only transaction has none), no ping:\n{}",
        statements.join("\n")
    );
    assert_eq!(statements[0], "BEGIN");
    assert!(
        statements[1].starts_with("INSERT INTO \"accounts\""),
        "{}",
        statements[1]
    );
    assert!(is_id_query(&statements[2]), "{}", statements[2]);
    assert_eq!(statements[3], "COMMIT");
    assert_eq!(statements[4], "SELECT pg_current_wal_insert_lsn()");
    for read in [&statements[5..8], &statements[8..11]] {
        assert_eq!(read[0], "BEGIN READ ONLY");
        assert!(read[1].starts_with("SELECT"), "{}", read[1]);
        assert_eq!(read[2], "COMMIT");
    }
}
