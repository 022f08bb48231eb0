//! How the client decides to trust a server: a pinned certificate
//! fingerprint or a CA file. There is no "accept anything" option.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

use crate::ClientError;

/// How to authenticate the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Pin the SHA-256 of the server's end-entity certificate, as printed by
    /// `openpista start`: 64 hex digits, optionally with `:` separators and a
    /// `sha256:` prefix, any case.
    Fingerprint(String),
    /// Verify the server's chain against the CA certificates in this PEM file.
    CaFile(PathBuf),
}

impl Trust {
    /// A rustls client configuration for this trust, TLS 1.3 only, with the
    /// openpista ALPN and no early data. Uses the aws-lc-rs provider.
    pub fn rustls_config(&self) -> Result<rustls::ClientConfig, ClientError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(ClientError::Tls)?;
        let mut config = match self {
            Trust::Fingerprint(text) => {
                let expected = parse_fingerprint(text)?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(FingerprintVerifier {
                        expected,
                        provider,
                    }))
                    .with_no_client_auth()
            }
            Trust::CaFile(path) => {
                let mut roots = rustls::RootCertStore::empty();
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|e| ClientError::Trust(format!("{}: {e}", path.display())))?;
                for cert in certs {
                    let cert =
                        cert.map_err(|e| ClientError::Trust(format!("{}: {e}", path.display())))?;
                    roots.add(cert).map_err(ClientError::Tls)?;
                }
                if roots.is_empty() {
                    return Err(ClientError::Trust(format!(
                        "{}: no certificates found",
                        path.display()
                    )));
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
        };
        config.alpn_protocols = vec![openpista_proto::wire::ALPN.to_vec()];
        config.enable_early_data = false;
        Ok(config)
    }
}

/// Parses a fingerprint as accepted by [`Trust::Fingerprint`].
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], ClientError> {
    let bad = || ClientError::Trust(format!("invalid SHA-256 fingerprint {text:?}"));
    let trimmed = text.trim();
    let trimmed = trimmed
        .strip_prefix("sha256:")
        .or_else(|| trimmed.strip_prefix("SHA256:"))
        .unwrap_or(trimmed);
    let hex: Vec<u8> = trimmed.bytes().filter(|b| *b != b':').collect();
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16).ok_or_else(bad)?;
        let lo = (pair[1] as char).to_digit(16).ok_or_else(bad)?;
        out[i] = u8::try_from(hi * 16 + lo).map_err(|_| bad())?;
    }
    Ok(out)
}

/// Accepts exactly one end-entity certificate (by SHA-256) and still checks
/// the handshake signatures with the provider's algorithms, so a peer must
/// hold the certificate's private key.
#[derive(Debug)]
struct FingerprintVerifier {
    expected: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for FingerprintVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let actual: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if actual == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
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

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_in_common_spellings() {
        let plain = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_fingerprint(&plain).unwrap(), [0xab; 32]);
        assert_eq!(
            parse_fingerprint(&format!("sha256:{colons}")).unwrap(),
            [0xab; 32]
        );
        assert!(parse_fingerprint("abc").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
        assert!(parse_fingerprint(&"é".repeat(32)).is_err());
    }
}
