//! A private PostgreSQL cluster per test, for tests that need a server configured in a way
//! the shared one is not (here: TLS on or off, with a certificate made by the test).
//!
//! Started from the installed server binaries (`initdb`, `pg_ctl` on `PATH` or in
//! `/usr/lib/postgresql/*/bin`), as the `postgres` account when the tests run as root
//! (the server refuses to run as root), in a fresh directory under `/tmp`, on a free port,
//! with trust authentication and no fsync. Dropping the value stops the server and deletes
//! the directory.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A server certificate and its private key, in PEM.
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A running private cluster; see the module docs.
pub struct PrivateCluster {
    dir: PathBuf,
    pg_ctl: PathBuf,
    as_postgres: bool,
    pub port: u16,
}

impl PrivateCluster {
    /// Starts a cluster, with TLS when `tls` is given (else `ssl = off`). Blocking: call
    /// it through `spawn_blocking` from async tests.
    pub fn start(tls: Option<&ServerTls>) -> PrivateCluster {
        let initdb = find_bin("initdb");
        let pg_ctl = find_bin("pg_ctl");
        let as_postgres = is_root();
        let dir = PathBuf::from(format!(
            "/tmp/ledger-test-pg-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir(&dir).expect("cluster directory");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .expect("chmod cluster directory");
        let port = free_port();
        let cluster = PrivateCluster {
            dir,
            pg_ctl,
            as_postgres,
            port,
        };
        cluster.give_to_owner(&cluster.dir);

        let data = cluster.dir.join("data");
        cluster.run(
            Command::new(&initdb)
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
                .arg("--no-sync"),
            "initdb",
        );
        let mut options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off",
            cluster.dir.display()
        );
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
        cluster.run(
            Command::new(&cluster.pg_ctl)
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(cluster.dir.join("server.log"))
                .args(["-w", "-t", "30", "-o", &options, "start"]),
            "pg_ctl start",
        );
        cluster
    }

    /// A URL of this cluster's `postgres` database as `host` (which must resolve to
    /// 127.0.0.1), with a password the server does not need (trust) but that must never
    /// show, and `query` appended.
    pub fn url(&self, host: &str, password: &str, query: &str) -> String {
        format!(
            "postgres://postgres:{password}@{host}:{}/postgres?{query}",
            self.port
        )
    }

    /// A plain, TLS-free admin URL (the server accepts both).
    pub fn admin_url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// A file in the cluster's directory (readable by everyone), e.g. for CA bundles.
    pub fn write_public(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, contents).expect("write file");
        path
    }

    fn write_private(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.write_public(name, contents);
        // The server refuses a key readable by others.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
        self.give_to_owner(&path);
        path
    }

    fn give_to_owner(&self, path: &Path) {
        if self.as_postgres {
            let status = Command::new("chown")
                .arg("postgres")
                .arg(path)
                .status()
                .expect("chown");
            assert!(status.success(), "chown postgres {}", path.display());
        }
    }

    fn run(&self, command: &mut Command, what: &str) {
        let output = if self.as_postgres {
            let mut wrapped = Command::new("runuser");
            wrapped
                .args(["-u", "postgres", "--"])
                .arg(command.get_program())
                .args(command.get_args());
            wrapped.output()
        } else {
            command.output()
        }
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        assert!(
            output.status.success(),
            "{what} failed: {}{}\n{log}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let mut stop = Command::new(&self.pg_ctl);
        stop.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"]);
        let _ = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(stop.get_program())
                .args(stop.get_args())
                .output()
        } else {
            stop.output()
        };
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A server binary from `PATH`, else from the newest `/usr/lib/postgresql/*/bin`.
fn find_bin(name: &str) -> PathBuf {
    if let Some(found) = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    }) {
        return found;
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin").join(name);
            bin.is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .unwrap_or_else(|| panic!("{name} not found on PATH or in /usr/lib/postgresql/*/bin"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
