//! Bad configuration stops the binary with exit 2 and one line naming the variable.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const URL: &str = "postgres://ledger:topsecret-pw@127.0.0.1:1/ledger";

/// Runs the binary with exactly `vars` and returns its exit code and stderr. A binary that
/// accepted its configuration would serve until stopped: it is killed after [`RUN_BOUND`]
/// and reported as `None`, so a regression fails the test instead of hanging it.
fn run(vars: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ledger"))
        .env_clear()
        // Port 0 unless the case sets one: a binary that does start collides with nothing.
        .env("PORT", "0")
        .envs(vars.iter().copied())
        // No .env from the checkout may leak in.
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ledger");
    let deadline = Instant::now() + RUN_BOUND;
    let exited = loop {
        if child.try_wait().expect("wait for ledger").is_some() {
            break true;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().expect("collect ledger output");
    (
        out.status.code().filter(|_| exited),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A configuration error exits within milliseconds; generous for 8 test threads on 2 cores.
const RUN_BOUND: Duration = Duration::from_secs(20);

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
        ("DB_STATEMENT_CACHE", "sometimes"),
        ("DB_STARTUP_OPTIONS", "2"),
        ("RUN_MIGRATIONS", "2"),
        ("HTTP_BODY_LIMIT", "0"),
        ("IDEMPOTENCY_TTL_SECS", "0"),
        ("SHUTDOWN_DRAIN_SECS", "-5"),
        ("SHUTDOWN_TIMEOUT_SECS", "0"),
        ("HOST", "localhost:80"),
        ("PORT", "65536"),
        ("DATABASE_REPLICA_URLS", "mysql://u:topsecret-pw@h/db"),
        ("DATABASE_REPLICA_URLS", "postgres://u:topsecret-pw@h/db,"),
        ("DB_REPLICA_POOL_SIZE", "0"),
        ("DB_REPLICA_MAX_LAG", "0"),
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

/// Durations below a millisecond used to round to zero (a pool that fails every check-out
/// at once); NaN, infinities and values beyond `Duration` used to panic or wrap.
#[test]
fn durations_below_a_millisecond_or_out_of_range_exit_2_naming_the_variable() {
    const NOT_NUMBERS: [&str; 5] = ["NaN", "inf", "-inf", "1e400", "5s"];
    let decimal_secs = ["1e-10", "0.0001", "0.0009999", "0", "-0.0", "-1", "1e30"];
    let whole_secs = [
        "0.0001",
        "1e-10",
        "0",
        "0.5",
        "-1",
        "99999999999999999999",
        "1e30",
    ];
    let millis = ["0.5", "1e-10", "-1", "2147483648", "99999999999999999999"];
    let seconds_or_off = ["0.5", "1e-10", "-1", "99999999999999999999"];
    let groups: [(&[&str], &[&str]); 4] = [
        (&["DB_POOL_TIMEOUT", "DB_HEALTH_TIMEOUT"], &decimal_secs),
        (
            &[
                "DB_POOL_IDLE_TIMEOUT",
                "DB_POOL_RECYCLE",
                "IDEMPOTENCY_TTL_SECS",
                "SHUTDOWN_TIMEOUT_SECS",
            ],
            &whole_secs,
        ),
        (&["DB_STATEMENT_TIMEOUT", "DB_IDLE_IN_TX_TIMEOUT"], &millis),
        (
            &["DB_LEAK_WARN_SECS", "SHUTDOWN_DRAIN_SECS"],
            &seconds_or_off,
        ),
    ];
    for (vars, values) in groups {
        for var in vars {
            for value in values.iter().chain(NOT_NUMBERS.iter()) {
                let (code, stderr) = run(&[("DATABASE_URL", URL), (var, value)]);
                assert_eq!(code, Some(2), "{var}={value}: {stderr}");
                assert_eq!(stderr.lines().count(), 1, "{var}={value}: {stderr}");
                assert!(stderr.contains(var), "{var}={value}: {stderr}");
            }
        }
    }
}
