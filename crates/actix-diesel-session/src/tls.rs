//! TLS to PostgreSQL with libpq's `sslmode` meanings, on rustls.
//!
//! | `sslmode` | TLS | certificate chain | host name |
//! |---|---|---|---|
//! | `disable` | never | | |
//! | `prefer` (default) | if the server offers it, else plain text | not checked | not checked |
//! | `require` | always; fails when the server offers none | not checked, unless `sslrootcert` is given (then as `verify-ca`) | not checked |
//! | `verify-ca` | always | against `sslrootcert`, else the system's roots | not checked |
//! | `verify-full` | always | as `verify-ca` | must match the URL's host |
//!
//! Two differences from libpq, both on the safe side or the convenient one: without
//! `sslrootcert`, `verify-ca` and `verify-full` trust the operating system's roots (libpq
//! wants `~/.postgresql/root.crt`, or `sslrootcert=system` for that; `system` is accepted
//! here too), and `prefer` does not retry in plain text when a TLS handshake the server
//! agreed to fails (without certificate checks, only a broken server gets there).
//!
//! The TLS settings are built once per URL, by [`crate::Connector::new`], and shared by the
//! connectors made from it; a CA file that cannot be read is reported on every connection
//! attempt (a readiness check shows it) rather than at start-up, since a service should
//! start without its database.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::url::{DatabaseUrl, SslMode};

/// `sslrootcert` value that asks for the operating system's roots (as in libpq 16+).
const SYSTEM_ROOTS: &str = "system";

/// How a connector negotiates TLS.
#[derive(Clone)]
pub enum Tls {
    /// `sslmode=disable`: plain text.
    Disabled,
    /// TLS with these settings; `required` refuses a server that offers none.
    Enabled {
        connector: MakeRustlsConnect,
        required: bool,
    },
    /// The settings asked for could not be built (unreadable CA file, ...). Every
    /// connection attempt fails with this text, which names no secret.
    Broken(String),
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tls::Disabled => f.write_str("Tls::Disabled"),
            Tls::Enabled { required, .. } => write!(f, "Tls::Enabled {{ required: {required} }}"),
            Tls::Broken(e) => write!(f, "Tls::Broken({e:?})"),
        }
    }
}

impl Tls {
    /// The TLS behaviour the URL's `sslmode` and `sslrootcert` ask for.
    pub fn for_url(url: &DatabaseUrl) -> Tls {
        let mode = url.ssl_mode();
        let root_cert = url.ssl_root_cert().map(|p| p.as_path());
        let verification = match (mode, root_cert) {
            (SslMode::Disable, _) => return Tls::Disabled,
            (SslMode::Prefer, _) | (SslMode::Require, None) => Verification::None,
            (SslMode::Require | SslMode::VerifyCa, _) => Verification::Chain,
            (SslMode::VerifyFull, _) => Verification::ChainAndHost,
        };
        match client_config(verification, root_cert) {
            Ok(config) => Tls::Enabled {
                connector: MakeRustlsConnect::new(config),
                required: mode != SslMode::Prefer,
            },
            Err(e) => Tls::Broken(format!("sslmode={}: {e}", mode_name(mode))),
        }
    }
}

/// libpq's spelling of a mode, for error messages.
pub fn mode_name(mode: SslMode) -> &'static str {
    match mode {
        SslMode::Disable => "disable",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
    }
}

/// How much of the server's certificate is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verification {
    /// Encryption only (libpq's `prefer` and `require`): no protection against an active
    /// man in the middle, as in libpq.
    None,
    /// The chain must lead to a trusted root; the name in the certificate is not checked.
    Chain,
    /// Chain and host name.
    ChainAndHost,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn client_config(
    verification: Verification,
    root_cert: Option<&Path>,
) -> Result<ClientConfig, String> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(set_up_failed)?;
    let verifier: Arc<dyn ServerCertVerifier> = match verification {
        Verification::None => Arc::new(Relaxed {
            chain: None,
            provider,
        }),
        Verification::Chain => Arc::new(Relaxed {
            chain: Some(webpki(root_cert, &provider)?),
            provider,
        }),
        Verification::ChainAndHost => webpki(root_cert, &provider)?,
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

fn set_up_failed(e: impl fmt::Display) -> String {
    format!("TLS set-up failed: {e}")
}

/// rustls' full WebPKI check (chain and host name) against the roots `root_cert` names.
fn webpki(
    root_cert: Option<&Path>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, String> {
    let roots = Arc::new(trusted_roots(root_cert)?);
    WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(set_up_failed)
}

/// The CA certificates of `sslrootcert`, or the system's when it is absent or `system`.
fn trusted_roots(root_cert: Option<&Path>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match root_cert {
        Some(path) if path != Path::new(SYSTEM_ROOTS) => {
            let shown = path.display();
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("cannot read sslrootcert {shown}: {e}"))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "sslrootcert {shown} holds no usable PEM certificate"
                ));
            }
        }
        _ => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err("no sslrootcert given and no system CA certificates found".to_owned());
            }
        }
    }
    Ok(roots)
}

/// libpq's relaxed modes. `prefer`, and `require` without `sslrootcert` (no `chain`):
/// any certificate is accepted. `verify-ca` (a `chain`): the full WebPKI check, except that
/// a certificate issued for another name is accepted; rustls checks the chain before the
/// name, so a name error means the chain itself was trusted. In both, the handshake
/// signatures are verified (with the provider's algorithms, as the WebPKI verifier does),
/// so the peer at least holds the key of the certificate it shows.
#[derive(Debug)]
struct Relaxed {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Relaxed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(url: &str) -> Tls {
        Tls::for_url(&DatabaseUrl::parse(url).unwrap())
    }

    #[test]
    fn modes_map_to_libpq_behaviour() {
        assert!(matches!(
            tls("postgres://u@h/d?sslmode=disable"),
            Tls::Disabled
        ));
        assert!(matches!(
            tls("postgres://u@h/d"),
            Tls::Enabled {
                required: false,
                ..
            }
        ));
        assert!(matches!(
            tls("postgres://u@h/d?sslmode=require"),
            Tls::Enabled { required: true, .. }
        ));
    }

    #[test]
    fn an_unreadable_ca_file_is_reported_without_secrets() {
        let Tls::Broken(e) =
            tls("postgres://u:s3cret@h/d?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
        else {
            panic!("expected a broken TLS set-up");
        };
        assert!(
            e.contains("sslmode=verify-full") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
        assert!(!e.contains("s3cret"));
    }
}
