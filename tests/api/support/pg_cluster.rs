//! A private PostgreSQL cluster for tests that stop the server or need many connections:
//! never the shared server. Started from the installed binaries (`initdb`, `pg_ctl` on
//! `PATH` or in `/usr/lib/postgresql/*/bin`), as the `postgres` account when the tests run
//! as root (the server refuses to run as root), in a fresh directory under `/tmp` owned by
//! that account, on a free port, with `fsync=off` (throwaway data). Stopped and deleted on
//! drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tokio_postgres::Client;

use super::free_port;

/// A running (or stopped) private cluster.
pub struct PgCluster {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
}

impl PgCluster {
    /// Initialises and starts a new cluster.
    pub async fn start() -> PgCluster {
        tokio::task::spawn_blocking(|| {
            let bin = server_bin_dir();
            let dir = owner_command("mktemp")
                .args(["-d", "/tmp/ledger-test-pg.XXXXXX"])
                .output()
                .expect("mktemp");
            assert!(dir.status.success(), "mktemp failed");
            let dir = PathBuf::from(String::from_utf8_lossy(&dir.stdout).trim());
            let cluster = PgCluster {
                dir,
                port: free_port(),
                bin,
            };
            cluster.run(
                "initdb",
                &[
                    "-D",
                    &cluster.data(),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
            );
            cluster.start_blocking();
            cluster
        })
        .await
        .expect("cluster start")
    }

    /// A URL for database `db` as the superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A plain client on database `db`.
    pub async fn client(&self, db: &str) -> Client {
        crate::helpers::connect(&self.url(db)).await
    }

    /// Creates database `name` and applies the service's migrations; returns its URL.
    pub async fn migrated_database(&self, name: &str) -> String {
        self.client("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        let url = self.url(name);
        let config = crate::helpers::config_for(name, &[("DATABASE_URL", url.clone())].into());
        ledger::db::migrate::run_pending(&config.db)
            .await
            .expect("migrations apply");
        url
    }

    /// Stops the server (`pg_ctl stop -m fast`: sessions are terminated, as in a restart).
    pub async fn stop(&self) {
        let (data, pg_ctl) = (self.data(), self.bin.join("pg_ctl"));
        tokio::task::spawn_blocking(move || {
            let status = owner_command(&pg_ctl)
                .args(["-D", &data, "-m", "fast", "-w", "stop"])
                .stdout(Stdio::null())
                .status()
                .expect("pg_ctl stop");
            assert!(status.success(), "pg_ctl stop failed");
        })
        .await
        .expect("stop");
    }

    /// Starts the stopped server again, same port and data.
    pub async fn restart(&self) {
        let again = PgCluster {
            dir: self.dir.clone(),
            port: self.port,
            bin: self.bin.clone(),
        };
        tokio::task::spawn_blocking(move || {
            again.start_blocking();
            // Not ours to clean up: `self` owns the directory.
            std::mem::forget(again);
        })
        .await
        .expect("restart");
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn start_blocking(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off \
             -c max_connections=60",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-w",
                "-t",
                "30",
                "-o",
                &options,
                "start",
            ],
        );
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = owner_command(self.bin.join(program))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
        );
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = owner_command(self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A command run as the cluster's owner: `postgres` when we are root, else ourselves.
fn owner_command(program: impl AsRef<Path>) -> Command {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program.as_ref());
        command
    } else {
        Command::new(program.as_ref())
    }
}

/// Where `initdb` and `pg_ctl` are: on `PATH`, else the newest `/usr/lib/postgresql/*/bin`.
fn server_bin_dir() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file());
    if let Some(dir) = on_path {
        return dir;
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).expect(
        "PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin",
    )
}
