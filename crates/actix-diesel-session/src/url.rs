//! The database URL, parsed once and kept behind a type that never shows its password.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// libpq's `sslmode` values. The default is `prefer`, as in libpq.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Plain text only.
    Disable,
    /// TLS when the server offers it, without certificate checks (also `allow`).
    #[default]
    Prefer,
    /// TLS or nothing, without certificate checks (with `sslrootcert`, as `verify-ca`).
    Require,
    /// TLS with a certificate chain to a trusted root; any host name.
    VerifyCa,
    /// TLS with a trusted certificate for the host name connected to.
    VerifyFull,
}

/// A validated database URL.
///
/// `Display` and `Debug` print the URL with the password replaced by `***`; the only way
/// to the secret is [`DatabaseUrl::pg_config`], which hands it to the driver.
#[derive(Clone)]
pub struct DatabaseUrl {
    redacted: String,
    pg: tokio_postgres::Config,
    ssl_mode: SslMode,
    ssl_root_cert: Option<PathBuf>,
}

impl DatabaseUrl {
    /// Parses and validates a `postgres://` or `postgresql://` URL. The error text never
    /// contains the URL itself, since it may hold the password.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut url = url::Url::parse(raw).map_err(|e| format!("is not a valid URL ({e})"))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(format!(
                "must start with postgres:// or postgresql://, not {}://",
                url.scheme()
            ));
        }
        // sslmode and sslrootcert are ours to interpret (the driver knows neither
        // verify-ca nor verify-full); every other parameter goes to the driver.
        let mut ssl_mode = SslMode::default();
        let mut ssl_root_cert = None;
        let mut rest = Vec::new();
        for (key, value) in url.query_pairs() {
            match key.as_ref() {
                "sslmode" => {
                    ssl_mode = match value.as_ref() {
                        "disable" => SslMode::Disable,
                        "prefer" | "allow" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        other => return Err(format!("sslmode {other:?} is not one of disable, prefer, require, verify-ca, verify-full")),
                    }
                }
                "sslrootcert" => ssl_root_cert = Some(PathBuf::from(value.as_ref())),
                _ => rest.push((key.into_owned(), value.into_owned())),
            }
        }
        if rest.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(rest);
        }
        let mut pg = tokio_postgres::Config::from_str(url.as_str())
            .map_err(|e| format!("is not usable by the PostgreSQL driver ({e})"))?;
        // The connector sets the driver's mode from ours (see `db::connect` and `db::tls`).
        pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
        if url.password().is_some() {
            // set_password only fails for URLs that cannot have one, which a
            // postgres:// URL with a password is not.
            let _ = url.set_password(Some("***"));
        }
        // The driver also takes the password as a query parameter (`?password=`).
        let masked: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let secret = k.to_ascii_lowercase().contains("pass");
                (
                    k.into_owned(),
                    if secret {
                        "***".to_owned()
                    } else {
                        v.into_owned()
                    },
                )
            })
            .collect();
        if !masked.is_empty() {
            url.query_pairs_mut().clear().extend_pairs(masked);
        }
        Ok(DatabaseUrl {
            redacted: url.to_string(),
            pg,
            ssl_mode,
            ssl_root_cert,
        })
    }

    /// The driver configuration, password included. Never log it.
    pub fn pg_config(&self) -> &tokio_postgres::Config {
        &self.pg
    }

    /// The `sslmode` the URL asked for.
    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    /// The CA bundle named by `sslrootcert`, if any.
    pub fn ssl_root_cert(&self) -> Option<&PathBuf> {
        self.ssl_root_cert.as_ref()
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({})", self.redacted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_the_password_and_keeps_the_rest() {
        let url = DatabaseUrl::parse(
            "postgres://app:p%40ss@db.example:6543/ledger?sslmode=require&application_name=x",
        )
        .unwrap();
        let shown = url.to_string();
        assert!(
            !shown.contains("p%40ss") && !shown.contains("p@ss"),
            "{shown}"
        );
        assert!(
            shown.starts_with("postgres://app:***@db.example:6543/ledger"),
            "{shown}"
        );
        assert_eq!(url.ssl_mode(), SslMode::Require);
        assert_eq!(url.pg_config().get_password(), Some(&b"p@ss"[..]));
        assert_eq!(url.pg_config().get_dbname(), Some("ledger"));
    }

    #[test]
    fn redacts_a_password_given_as_a_query_parameter() {
        let url =
            DatabaseUrl::parse("postgres://app@db/ledger?password=S3cretPW&connect_timeout=5")
                .unwrap();
        let shown = format!("{url} {url:?}");
        assert!(!shown.contains("S3cretPW"), "{shown}");
        assert!(
            shown.contains("password=***") && shown.contains("connect_timeout=5"),
            "{shown}"
        );
        assert_eq!(url.pg_config().get_password(), Some(&b"S3cretPW"[..]));
    }

    #[test]
    fn rejects_other_schemes_and_bad_sslmodes_without_echoing_the_url() {
        let err = DatabaseUrl::parse("mysql://u:secret@h/db").unwrap_err();
        assert!(!err.contains("secret"));
        let err = DatabaseUrl::parse("postgres://u:secret@h/db?sslmode=bogus").unwrap_err();
        assert!(err.contains("sslmode") && !err.contains("secret"));
    }
}
