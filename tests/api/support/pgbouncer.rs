//! A real PgBouncer in front of a private cluster, started from the installed binary
//! (Debian's package `pgbouncer`, which `make test` installs when it is missing).
//!
//! PgBouncer refuses to run as root, so when the tests run as root it runs as the
//! `postgres` account, like the private clusters, from a `mktemp -d` directory that account
//! owns (its configuration, user list, log and pid file). It listens on a free port of
//! 127.0.0.1 only, with no Unix socket, trusts every user of its user list, and sends
//! every database to the cluster. Dropping the value kills it and deletes the directory.
//!
//! Where PgBouncer is not installed, [`PgBouncer::available`] says so and the tests skip
//! with that reason; under `CI=true` they fail instead, so that a CI machine without it
//! cannot pass by testing nothing.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::pg_cluster::{give_to_owner, is_root, private_dir, PgCluster};
use super::{eventually, free_port};

/// Where Debian installs it; `PATH` is searched too.
const DEBIAN_BINARY: &str = "/usr/sbin/pgbouncer";

/// How PgBouncer hands server connections to clients.
#[derive(Clone, Copy, Debug)]
pub enum PoolMode {
    /// For a client's whole connection.
    Session,
    /// For one transaction at a time.
    Transaction,
}

/// A running PgBouncer; see the module docs.
pub struct PgBouncer {
    child: Child,
    dir: PathBuf,
    pub port: u16,
}

impl PgBouncer {
    /// The installed binary, or why there is none. Panics under `CI=true` when there is
    /// none: there, a skipped test would pass without proving anything.
    pub fn available() -> Result<PathBuf, String> {
        let found = std::iter::once(PathBuf::from(DEBIAN_BINARY))
            .chain(
                std::env::var_os("PATH")
                    .into_iter()
                    .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                    .map(|dir| dir.join("pgbouncer")),
            )
            .find(|path| path.is_file());
        match found {
            Some(path) => Ok(path),
            None if std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true")) => {
                panic!("CI=true and pgbouncer is not installed (apt-get install pgbouncer)")
            }
            None => Err(format!(
                "pgbouncer is not installed ({DEBIAN_BINARY} missing, none on PATH): \
                 apt-get install pgbouncer, or `make test` installs it"
            )),
        }
    }

    /// Starts PgBouncer in `mode` in front of `cluster`, with at most `server_connections`
    /// server connections in all (`default_pool_size` and `max_db_connections`), and waits
    /// until it answers.
    pub async fn start(
        binary: PathBuf,
        cluster: &PgCluster,
        mode: PoolMode,
        server_connections: u32,
    ) -> PgBouncer {
        let dir = tokio::task::spawn_blocking(private_dir)
            .await
            .expect("directory");
        let port = free_port();
        let mode = match mode {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        };
        let config = format!(
            "[databases]\n\
             * = host=127.0.0.1 port={cluster_port}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {dir}/userlist.txt\n\
             pool_mode = {mode}\n\
             default_pool_size = {server_connections}\n\
             max_db_connections = {server_connections}\n\
             max_client_conn = 500\n\
             logfile = {dir}/pgbouncer.log\n\
             pidfile = {dir}/pgbouncer.pid\n",
            cluster_port = cluster.port(),
            dir = dir.display(),
        );
        for (name, contents) in [
            ("pgbouncer.ini", config.as_str()),
            // Trust authentication still wants the user listed.
            ("userlist.txt", "\"postgres\" \"\"\n"),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, contents).expect("write pgbouncer file");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            give_to_owner(&path);
        }
        let mut command = Command::new(&binary);
        command
            .arg(dir.join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if is_root() {
            // It refuses root. Dropping privileges in the child itself (rather than
            // through `runuser`, which forks) keeps PgBouncer our direct child, which
            // `kill_on_drop` kills.
            let (uid, gid) = (id("-u"), id("-g"));
            command.uid(uid).gid(gid);
        }
        let child = command.spawn().expect("start pgbouncer");
        let bouncer = PgBouncer { child, dir, port };
        let url = bouncer.url("postgres");
        assert!(
            eventually(Duration::from_secs(10), || async {
                match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    Ok((client, connection)) => {
                        tokio::spawn(connection);
                        client.simple_query("SELECT 1").await.is_ok()
                    }
                    Err(_) => false,
                }
            })
            .await,
            "pgbouncer answers:\n{}",
            bouncer.log()
        );
        bouncer
    }

    /// A URL for database `db` through PgBouncer.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// PgBouncer's log, for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        // Reaped here, within a second: the test process may exit before Tokio reaps it,
        // and a child nobody reaps stays a zombie where the init process does not reap.
        for _ in 0..100 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `postgres` account's user or group id (`id -u postgres`, `id -g postgres`).
fn id(which: &str) -> u32 {
    let out = std::process::Command::new("id")
        .args([which, "postgres"])
        .output()
        .expect("id");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("the postgres account's id")
}
