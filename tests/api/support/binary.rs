//! The real `ledger` binary as a process of its own: its runtime, its sockets and its
//! server connections are then the service's alone, apart from the test's.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::{eventually, free_port};

/// The running binary; killed when dropped.
pub struct Binary {
    pub child: Child,
    pub port: u16,
    log: Arc<Mutex<String>>,
    pub client: reqwest::Client,
}

impl Binary {
    /// Starts the binary with a clean environment (no `.env` either: the working directory
    /// is the temp dir) and `vars`, and waits until it is live (not ready: the database
    /// may be made to misbehave on purpose).
    pub async fn start(vars: &[(&str, &str)]) -> Binary {
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ledger"))
            .env_clear()
            .env("PORT", port.to_string())
            // `vars` may say otherwise.
            .env("RUST_LOG", "warn")
            .envs(vars.iter().copied())
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start ledger");
        let log = Arc::new(Mutex::new(String::new()));
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let sink = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let binary = Binary {
            child,
            port,
            log,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("client"),
        };
        assert!(
            eventually(Duration::from_secs(10), || async {
                binary.status("/health/live").await == Some(200)
            })
            .await,
            "the service became live:\n{}",
            binary.log()
        );
        binary
    }

    /// Waits until readiness answers 200 (the database reached, migrations done).
    pub async fn wait_ready(&self) {
        assert!(
            eventually(Duration::from_secs(10), || async {
                self.status("/health/ready").await == Some(200)
            })
            .await,
            "the service became ready:\n{}",
            self.log()
        );
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.child.id().expect("running") as libc::pid_t;
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill failed");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The status of a GET, `None` if no response came.
    pub async fn status(&self, path: &str) -> Option<u16> {
        self.client
            .get(self.url(path))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }

    /// The sockets the process holds open now (its listener, HTTP connections, database
    /// connections and connection attempts), from `/proc/<pid>/fd`.
    pub fn sockets(&self) -> usize {
        let pid = self.child.id().expect("running");
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("the process's descriptors")
            .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("socket:"))
            .count()
    }
}
