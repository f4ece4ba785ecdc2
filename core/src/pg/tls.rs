//! TLS for dr's own connections, with libpq's `sslmode` semantics:
//!
//! | sslmode | encryption | certificate check |
//! |---|---|---|
//! | `disable` | never | — |
//! | `allow`, `prefer` | if the server offers it | none |
//! | `require` | always | none, unless a root certificate is configured (then as `verify-ca`, like libpq) |
//! | `verify-ca` | always | chain to `sslrootcert` |
//! | `verify-full` | always | chain to `sslrootcert` and the host name |
//!
//! `sslrootcert=system` trusts the operating system's roots. Client certificates come from
//! `sslcert`/`sslkey` (or `~/.postgresql/postgresql.{crt,key}`), as for libpq.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(text: &str) -> Option<SslMode> {
        Some(match text {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// What tokio-postgres should negotiate.
    pub fn negotiate(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as T;
        match self {
            SslMode::Disable => T::Disable,
            SslMode::Allow | SslMode::Prefer => T::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => T::Require,
        }
    }
}

/// Where the trusted roots come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    File(PathBuf),
    System,
}

#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub root: Option<RootCert>,
    /// Client certificate and key files, for servers that authenticate by certificate.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("sslmode={mode} needs a root certificate: set sslrootcert=/path/to/ca.crt (or sslrootcert=system for the operating system's roots), or create {default}")]
    NoRootCert { mode: &'static str, default: String },
    #[error("cannot read {what} {path}: {message}")]
    Read {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("TLS setup failed: {0}")]
    Setup(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_roots(root: &RootCert) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    match root {
        RootCert::System => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = store.add(cert);
            }
            if store.is_empty() {
                return Err(TlsError::Read {
                    what: "the system's root certificates",
                    path: PathBuf::from("(system store)"),
                    message: "none found; install ca-certificates or set sslrootcert to a file"
                        .into(),
                });
            }
        }
        RootCert::File(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| TlsError::Read {
                    what: "root certificate",
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            for cert in certs {
                store.add(cert).map_err(|e| TlsError::Read {
                    what: "root certificate",
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            }
            if store.is_empty() {
                return Err(TlsError::Read {
                    what: "root certificate",
                    path: path.clone(),
                    message: "no certificate in the file".into(),
                });
            }
        }
    }
    Ok(store)
}

fn read_client_cert(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Read {
            what: "client certificate",
            path: cert.to_owned(),
            message: e.to_string(),
        })?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Read {
        what: "client key",
        path: key.to_owned(),
        message: e.to_string(),
    })?;
    Ok((certs, key))
}

/// The connector for `settings`; `None` means no TLS (sslmode=disable).
pub fn connector(
    settings: &TlsSettings,
) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, TlsError> {
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = match (settings.mode, &settings.root) {
        (SslMode::Disable, _) => return Ok(None),
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
            return Err(TlsError::NoRootCert {
                mode: if settings.mode == SslMode::VerifyCa {
                    "verify-ca"
                } else {
                    "verify-full"
                },
                default: default_root_path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "~/.postgresql/root.crt".into()),
            })
        }
        (SslMode::Allow | SslMode::Prefer, _) | (SslMode::Require, None) => {
            Arc::new(NoVerify(provider.clone()))
        }
        (SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull, Some(root)) => {
            let roots = Arc::new(read_roots(root)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| TlsError::Setup(e.to_string()))?;
            if settings.mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match &settings.client_cert {
        Some((cert, key)) => {
            let (certs, key) = read_client_cert(cert, key)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| TlsError::Setup(e.to_string()))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(config)))
}

/// `~/.postgresql/root.crt`, libpq's default root certificate.
pub fn default_root_path() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".postgresql/root.crt"))
}

/// `sslmode=require` (and weaker) without a root certificate: encryption, no identity
/// check, exactly as libpq. Handshake signatures are still verified.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain before the name, so a name error means the chain passed.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
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
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmodes_parse_and_map_to_what_is_negotiated() {
        use tokio_postgres::config::SslMode as T;
        assert_eq!(SslMode::parse("verify-full"), Some(SslMode::VerifyFull));
        assert_eq!(SslMode::parse("bogus"), None);
        assert_eq!(SslMode::Prefer.negotiate(), T::Prefer);
        assert_eq!(SslMode::VerifyCa.negotiate(), T::Require);
        assert_eq!(SslMode::Disable.negotiate(), T::Disable);
    }

    #[test]
    fn verify_modes_without_a_root_certificate_say_what_to_set() {
        let err = connector(&TlsSettings {
            mode: SslMode::VerifyFull,
            root: None,
            client_cert: None,
        })
        .err()
        .expect("refused");
        let text = err.to_string();
        assert!(text.contains("sslrootcert"), "{text}");
        assert!(connector(&TlsSettings {
            mode: SslMode::Disable,
            root: None,
            client_cert: None,
        })
        .unwrap()
        .is_none());
        assert!(connector(&TlsSettings {
            mode: SslMode::Require,
            root: None,
            client_cert: None,
        })
        .unwrap()
        .is_some());
    }
}
