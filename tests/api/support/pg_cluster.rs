//! A private PostgreSQL cluster for tests that stop the server, need many connections, or
//! need a server configured in a way the shared one is not (TLS on, with a certificate the
//! test makes, or off): never the shared server.
//!
//! The recipe is the one `scripts/pg.sh` follows for `make`; keep the two in step. The
//! installed server binaries (`initdb`, `pg_ctl` on `PATH` or in the newest
//! `/usr/lib/postgresql/*/bin`), a `mktemp -d` directory under `/tmp` (mode 755, given to
//! the `postgres` account when the tests run as root, since initdb and the server refuse
//! to run as root; the commands then run through `runuser -u postgres`), trust
//! authentication, `fsync=off` and no synchronous commit (throwaway data), listening on
//! 127.0.0.1 only. Unlike the script's, each cluster takes any free port and fewer
//! connections. Dropping the value stops the server and deletes the directory. A cluster
//! can also be a streaming replica of another ([`PgCluster::start_replica`]).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tokio_postgres::Client;

use super::{connect, free_port, migrate};

/// `mktemp -d` template of a cluster's directory.
const DIR_TEMPLATE: &str = "/tmp/ledger-test-pg.XXXXXX";
/// Enough for the tests on a private cluster (a small pool, readiness, an observer).
const MAX_CONNECTIONS: u32 = 60;

/// A server certificate and its private key, in PEM.
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A running (or stopped) private cluster; see the module docs.
pub struct PgCluster(Server);

/// What starting and stopping the server needs; cloned into blocking tasks.
#[derive(Clone)]
struct Server {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    /// Options of the `postgres` process, the same at every start.
    options: String,
}

impl PgCluster {
    /// Initialises and starts a new cluster with TLS off.
    pub async fn start() -> PgCluster {
        Self::start_with(None, "").await
    }

    /// Initialises and starts a new cluster with TLS off and `settings` (`-c name=value`
    /// options) added.
    pub async fn start_with_settings(settings: &'static str) -> PgCluster {
        Self::start_with(None, settings).await
    }

    /// Initialises and starts a new cluster with TLS on, serving this certificate.
    pub async fn start_with_tls(tls: ServerTls) -> PgCluster {
        Self::start_with(Some(tls), "").await
    }

    async fn start_with(tls: Option<ServerTls>, settings: &'static str) -> PgCluster {
        tokio::task::spawn_blocking(move || {
            let bin = server_bin_dir();
            let port = free_port();
            let dir = private_dir();
            let mut options = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
                 -c synchronous_commit=off -c full_page_writes=off -c max_connections={MAX_CONNECTIONS}",
                dir.display()
            );
            // Owned from here on: a failure below still stops and deletes what there is.
            let mut cluster = PgCluster(Server {
                bin,
                dir,
                port,
                options: String::new(),
            });
            match tls {
                Some(tls) => {
                    let cert = cluster.write_private("server.crt", &tls.cert_pem);
                    let key = cluster.write_private("server.key", &tls.key_pem);
                    options += &format!(
                        " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                        cert.display(),
                        key.display()
                    );
                }
                None => options += " -c ssl=off",
            }
            if !settings.is_empty() {
                options = format!("{options} {settings}");
            }
            cluster.0.options = options;
            cluster.0.run(
                "initdb",
                &[
                    "-D",
                    &cluster.0.data(),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
            );
            cluster.0.start();
            cluster
        })
        .await
        .expect("cluster start")
    }

    /// A streaming replica of this cluster, as a new cluster: `pg_basebackup -R` (which
    /// writes the standby signal and the primary's connection) into a new directory,
    /// started as a hot standby on a free port with this cluster's settings. The
    /// primary's defaults allow it (`wal_level=replica`, `max_wal_senders=10`, and
    /// initdb's `replication` lines in `pg_hba.conf`, trusted like the rest).
    pub async fn start_replica(&self) -> PgCluster {
        let primary = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let port = free_port();
            let dir = private_dir();
            let options = primary
                .options
                .replace(&format!("-p {} ", primary.port), &format!("-p {port} "))
                .replace(
                    &primary.dir.display().to_string(),
                    &dir.display().to_string(),
                );
            let replica = PgCluster(Server {
                bin: primary.bin.clone(),
                dir,
                port,
                options,
            });
            // Beside the real `pg_ctl`: a `PATH` directory may hold links to a few server
            // binaries only.
            let basebackup = std::fs::canonicalize(primary.bin.join("pg_ctl"))
                .ok()
                .and_then(|ctl| ctl.parent().map(|dir| dir.join("pg_basebackup")))
                .filter(|path| path.is_file())
                .unwrap_or_else(|| primary.bin.join("pg_basebackup"));
            replica.0.run(
                &basebackup.display().to_string(),
                &[
                    "-D",
                    &replica.0.data(),
                    "-R",
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                    "--no-sync",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &primary.port.to_string(),
                    "-U",
                    "postgres",
                ],
            );
            replica.0.start();
            replica
        })
        .await
        .expect("replica start")
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.0.port
    }

    /// A URL for database `db` as the superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.0.port)
    }

    /// A URL of the `postgres` database as `host` (which must resolve to 127.0.0.1), with
    /// a password (trust authentication ignores it; it is there to prove it never shows)
    /// and `query` appended.
    pub fn url_with(&self, host: &str, password: &str, query: &str) -> String {
        format!(
            "postgres://postgres:{password}@{host}:{}/postgres?{query}",
            self.0.port
        )
    }

    /// A plain client on database `db` (in plain text, also when TLS is on).
    pub async fn client(&self, db: &str) -> Client {
        connect(&self.url(db)).await
    }

    /// Creates database `name` and applies the service's migrations; returns its URL.
    pub async fn migrated_database(&self, name: &str) -> String {
        self.client("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        let url = self.url(name);
        migrate(name, &url).await;
        url
    }

    /// A file in the cluster's directory, readable by everyone (e.g. a CA bundle).
    pub fn write_public(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.dir.join(name);
        std::fs::write(&path, contents).expect("write file");
        path
    }

    /// A file only the server's account may read, as the server demands of its key.
    fn write_private(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.write_public(name, contents);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        give_to_owner(&path);
        path
    }

    /// Stops the server (`pg_ctl stop -m fast`: sessions are terminated, as in a restart).
    pub async fn stop(&self) {
        self.stop_in("fast").await;
    }

    /// Crashes the server (`pg_ctl stop -m immediate`: no checkpoint, recovery at the next
    /// start), as a power loss would.
    pub async fn crash(&self) {
        self.stop_in("immediate").await;
    }

    async fn stop_in(&self, mode: &'static str) {
        let server = self.0.clone();
        tokio::task::spawn_blocking(move || {
            server.run("pg_ctl", &["-D", &server.data(), "-m", mode, "-w", "stop"]);
        })
        .await
        .expect("stop");
    }

    /// Starts the stopped server again, same port, data and options.
    pub async fn restart(&self) {
        let server = self.0.clone();
        tokio::task::spawn_blocking(move || server.start())
            .await
            .expect("restart");
    }
}

impl Server {
    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn start(&self) {
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
                &self.options,
                "start",
            ],
        );
    }

    /// Runs a server binary as the cluster's owner; fails the test with its output and
    /// the server log if it fails.
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
        let _ = owner_command(self.0.bin.join("pg_ctl"))
            .args(["-D", &self.0.data(), "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.0.dir);
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A fresh directory for a cluster, as `scripts/pg.sh` makes one.
pub fn private_dir() -> PathBuf {
    if is_root() {
        let account = Command::new("id").arg("postgres").output();
        assert!(
            account.is_ok_and(|o| o.status.success()),
            "running as root and there is no 'postgres' account to run the server as"
        );
    }
    let out = Command::new("mktemp")
        .args(["-d", DIR_TEMPLATE])
        .output()
        .expect("mktemp");
    assert!(out.status.success(), "mktemp failed");
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    give_to_owner(&dir);
    dir
}

/// Hands `path` to the cluster's owner: `postgres` when we are root.
pub fn give_to_owner(path: &Path) {
    if is_root() {
        let status = Command::new("chown")
            .arg("postgres")
            .arg(path)
            .status()
            .expect("chown");
        assert!(status.success(), "chown postgres {}", path.display());
    }
}

/// A command run as the cluster's owner: `postgres` when we are root, else ourselves.
fn owner_command(program: impl AsRef<Path>) -> Command {
    if is_root() {
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
