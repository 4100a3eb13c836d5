//! The database URL, parsed once and kept behind a type that never shows its password.

use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use percent_encoding::{percent_decode_str, percent_encode, NON_ALPHANUMERIC};
use secrecy::{ExposeSecret, SecretSlice};

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
/// `Display` and `Debug` print the URL with the password replaced by `***`, and without
/// `sslmode` and `sslrootcert`. The password itself is kept apart, in memory that is wiped
/// when the `DatabaseUrl` is dropped; the only way to it is [`DatabaseUrl::pg_config`],
/// which hands it to the driver.
#[derive(Clone)]
pub struct DatabaseUrl {
    redacted: String,
    /// Everything the driver needs but the password.
    pg: tokio_postgres::Config,
    /// Percent-decoded bytes, as the driver takes them.
    password: Option<SecretSlice<u8>>,
    ssl_mode: SslMode,
    ssl_root_cert: Option<PathBuf>,
}

impl DatabaseUrl {
    /// Parses and validates a `postgres://` or `postgresql://` URL. The error text never
    /// contains the URL itself, since it may hold the password.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut url = url::Url::parse(raw).map_err(|e| format!("is not a valid URL ({e})"))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            // The scheme is not echoed: in a list split on commas (DATABASE_REPLICA_URLS),
            // a piece of a password can look like one (`u:a,b:c@h` gives `b:c@h`).
            return Err("must start with postgres:// or postgresql://".to_owned());
        }
        if url.fragment().is_some() {
            // The driver would take the `#` and what follows into the last value, which may
            // be the password, while the URL parser calls it the fragment and shows it.
            return Err("has a # outside the parameters; write it as %23".to_owned());
        }
        let mut password = url.password().map(secret);
        // sslmode and sslrootcert are ours to interpret (the driver knows neither
        // verify-ca nor verify-full); a `password` parameter is kept as secret as one in
        // the user info, and wins over it as in the driver; every other parameter goes to
        // the driver. The query is split here rather than
        // with `Url::query_pairs`, which decodes a `+` as a space as in HTML forms: the
        // driver and libpq keep it a `+`.
        let mut ssl_mode = SslMode::default();
        let mut ssl_root_cert = None;
        let mut to_driver = Vec::new();
        let mut shown = Vec::new();
        for param in url.query().unwrap_or_default().split('&') {
            if param.is_empty() {
                continue;
            }
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            match percent_decode_str(key).decode_utf8_lossy().as_ref() {
                "sslmode" => {
                    ssl_mode = match percent_decode_str(value).decode_utf8_lossy().as_ref() {
                        "disable" => SslMode::Disable,
                        "prefer" | "allow" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        other => return Err(format!("sslmode {other:?} is not one of disable, prefer, require, verify-ca, verify-full")),
                    }
                }
                "sslrootcert" => {
                    ssl_root_cert = Some(PathBuf::from(
                        percent_decode_str(value).decode_utf8_lossy().into_owned(),
                    ));
                }
                "password" => {
                    password = Some(secret(value));
                    shown.push(format!("{key}=***"));
                }
                _ => {
                    to_driver.push(format!("{}={}", reencode(key), reencode(value)));
                    shown.push(param.to_owned());
                }
            }
        }

        // tokio-postgres builds its configuration from a string only: it has no
        // constructor from a parsed `url::Url`, and the parser of its parameters
        // (host lists, socket directories, keepalives, target_session_attrs, ...) is
        // private. So it reads the URL once more, rebuilt from the parsed one, without the
        // password (handed over separately by `pg_config`) and without our parameters.
        let has_password = url.password().is_some();
        if has_password {
            url.set_password(None)
                .map_err(|()| "cannot have a password".to_owned())?;
        }
        url.set_query(
            Some(to_driver.join("&"))
                .filter(|q| !q.is_empty())
                .as_deref(),
        );
        let mut pg = tokio_postgres::Config::from_str(url.as_str())
            .map_err(|e| format!("is not usable by the PostgreSQL driver ({e})"))?;
        // The connector sets the driver's mode from ours (see `crate::connect` and
        // `crate::tls`).
        pg.ssl_mode(tokio_postgres::config::SslMode::Disable);

        if has_password {
            url.set_password(Some("***"))
                .map_err(|()| "cannot have a password".to_owned())?;
        }
        url.set_query(Some(shown.join("&")).filter(|q| !q.is_empty()).as_deref());
        Ok(DatabaseUrl {
            redacted: url.into(),
            pg,
            password,
            ssl_mode,
            ssl_root_cert,
        })
    }

    /// The driver configuration, password included: a fresh copy for the caller to
    /// connect with. Never log it. (Its `Debug` shows the password as `_`, but unlike
    /// this `DatabaseUrl` it does not wipe the password when dropped.)
    pub fn pg_config(&self) -> tokio_postgres::Config {
        let mut pg = self.pg.clone();
        if let Some(password) = &self.password {
            pg.password(password.expose_secret());
        }
        pg
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

/// A password from the URL, percent-decoded byte for byte as the driver would.
fn secret(encoded: &str) -> SecretSlice<u8> {
    SecretSlice::from(percent_decode_str(encoded).collect::<Vec<u8>>())
}

/// A parameter name or value, decoded and encoded again for the driver: byte for byte
/// (a `+` stays a `+`, as the driver reads it), and with nothing left that the driver
/// could take for a separator (an `@` would end the user name for it).
fn reencode(component: &str) -> String {
    let bytes: Cow<'_, [u8]> = percent_decode_str(component).into();
    percent_encode(&bytes, NON_ALPHANUMERIC).to_string()
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
        // A password's tail after a comma, parsed as a URL of its own, shows nothing.
        let err = DatabaseUrl::parse("pw3cret:x@h/db").unwrap_err();
        assert!(!err.contains("pw3cret"), "{err}");
        let err = DatabaseUrl::parse("postgres://u:secret@h/db?sslmode=bogus").unwrap_err();
        assert!(err.contains("sslmode") && !err.contains("secret"));
        // An unescaped `#` in a password parameter would otherwise show its tail.
        let err = DatabaseUrl::parse("postgres://u@h/db?password=S3cret#tail").unwrap_err();
        assert!(!err.contains("S3cret") && !err.contains("tail"), "{err}");
    }

    #[test]
    fn decodes_an_escaped_password_and_shows_none_of_it() {
        let url = DatabaseUrl::parse(
            "postgres://app:p%2Fw%3A%25%20%2B+%C3%A9@db.example:6543/ledger?application_name=x",
        )
        .unwrap();
        assert_eq!(url.pg_config().get_password(), Some("p/w:% ++é".as_bytes()));
        assert_eq!(
            url.to_string(),
            "postgres://app:***@db.example:6543/ledger?application_name=x"
        );
        let url = DatabaseUrl::parse("postgres://app@db/ledger?password=a%26b%3D%2B+c").unwrap();
        assert_eq!(url.pg_config().get_password(), Some(&b"a&b=++c"[..]));
        assert_eq!(url.to_string(), "postgres://app@db/ledger?password=***");
    }

    #[test]
    fn masks_nothing_without_a_password() {
        let raw = "postgres://app@db.example:6543/ledger?application_name=x&connect_timeout=5";
        let url = DatabaseUrl::parse(raw).unwrap();
        assert_eq!(url.to_string(), raw);
        assert_eq!(format!("{url:?}"), format!("DatabaseUrl({raw})"));
        assert_eq!(url.pg_config().get_password(), None);
    }

    #[test]
    fn debug_of_the_whole_value_never_shows_the_password() {
        for raw in [
            "postgres://app:Pw-In-Userinfo@db/ledger",
            "postgres://app@db/ledger?password=Pw-In-Userinfo",
        ] {
            let url = DatabaseUrl::parse(raw).unwrap();
            let shown = format!("{url:?} {url:#?} {:?}", url.pg_config());
            assert!(!shown.contains("Pw-In-Userinfo"), "{shown}");
            assert!(shown.contains("***"), "{shown}");
        }
    }

    #[test]
    fn hands_the_driver_the_parameters_as_written() {
        let url = DatabaseUrl::parse(
            "postgres://app@db/ledger?options=-c%20statement_timeout%3D5&application_name=a@b+c&sslrootcert=/etc/my+ca.pem&sslmode=verify-full",
        )
        .unwrap();
        let pg = url.pg_config();
        assert_eq!(pg.get_options(), Some("-c statement_timeout=5"));
        assert_eq!(pg.get_application_name(), Some("a@b+c"));
        assert_eq!(pg.get_user(), Some("app"));
        assert_eq!(pg.get_dbname(), Some("ledger"));
        assert_eq!(url.ssl_mode(), SslMode::VerifyFull);
        assert_eq!(url.ssl_root_cert(), Some(&PathBuf::from("/etc/my+ca.pem")));
        assert_eq!(
            url.to_string(),
            "postgres://app@db/ledger?options=-c%20statement_timeout%3D5&application_name=a@b+c"
        );
    }
}
