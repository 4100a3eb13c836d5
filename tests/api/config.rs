//! Bad configuration stops the binary with exit 2 and one line naming the variable.

use std::process::Command;

const URL: &str = "postgres://ledger:topsecret-pw@127.0.0.1:1/ledger";

fn run(vars: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ledger"))
        .env_clear()
        .envs(vars.iter().copied())
        // No .env from the checkout may leak in.
        .current_dir(std::env::temp_dir())
        .output()
        .expect("run ledger");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn each_invalid_variable_exits_2_with_one_line_naming_it() {
    let cases = [
        ("DB_POOL_SIZE", "0"),
        ("DB_MAX_OVERFLOW", "lots"),
        ("DB_POOL_IDLE_TIMEOUT", "0"),
        ("DB_POOL_TIMEOUT", "-1"),
        ("DB_POOL_RECYCLE", "x"),
        ("DB_STATEMENT_TIMEOUT", "1.5"),
        ("DB_IDLE_IN_TX_TIMEOUT", "-1"),
        ("DB_HEALTH_TIMEOUT", "0"),
        ("DB_LEAK_WARN_SECS", "soon"),
        ("DB_ECHO", "perhaps"),
        ("RUN_MIGRATIONS", "2"),
        ("HTTP_BODY_LIMIT", "0"),
        ("IDEMPOTENCY_TTL_SECS", "0"),
        ("SHUTDOWN_DRAIN_SECS", "-5"),
        ("SHUTDOWN_TIMEOUT_SECS", "0"),
        ("HOST", "localhost:80"),
        ("PORT", "65536"),
    ];
    for (var, value) in cases {
        let (code, stderr) = run(&[("DATABASE_URL", URL), (var, value)]);
        assert_eq!(code, Some(2), "{var}={value}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{var}: {stderr}");
        assert!(lines[0].contains(var), "{var}: {stderr}");
        assert!(!stderr.contains("topsecret"), "{var}: {stderr}");
    }
}

#[test]
fn a_missing_or_bad_database_url_exits_2_without_the_password() {
    let (code, stderr) = run(&[]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");

    for bad in [
        "mysql://u:topsecret-pw@h/db",
        "postgres://u:topsecret-pw@h/db?sslmode=sometimes",
        "not a url topsecret-pw",
    ] {
        let (code, stderr) = run(&[("DATABASE_URL", bad)]);
        assert_eq!(code, Some(2), "{bad}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("DATABASE_URL") && !stderr.contains("topsecret"),
            "{stderr}"
        );
    }
}

#[test]
fn an_unknown_command_exits_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_ledger"))
        .arg("frobnicate")
        .env_clear()
        .env("DATABASE_URL", URL)
        .current_dir(std::env::temp_dir())
        .output()
        .expect("run ledger");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage"));
}
