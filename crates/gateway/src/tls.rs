//! The server's TLS identity: a self-signed certificate generated once by
//! rcgen and kept (mode 0600) in the data directory, or an operator-supplied
//! certificate and key. Clients pin [`TlsIdentity::fingerprint`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::GatewayError;

/// File name of the generated certificate in the data directory.
pub const CERT_FILE: &str = "cert.pem";
/// File name of the generated private key in the data directory.
pub const KEY_FILE: &str = "key.pem";

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct TlsIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl TlsIdentity {
    /// Loads `dir/cert.pem` and `dir/key.pem`, generating them (SANs
    /// `localhost`, `127.0.0.1`, `::1`; files mode 0600) on first use. The key
    /// must not be readable by other users. If only one of the files exists it
    /// is an error: nothing is overwritten.
    pub fn load_or_generate(dir: &Path) -> Result<Self, GatewayError> {
        let cert = dir.join(CERT_FILE);
        let key = dir.join(KEY_FILE);
        match (cert.exists(), key.exists()) {
            (true, true) => {
                check_private(&key)?;
                Self::from_pem_files(&cert, &key)
            }
            (false, false) => {
                let generated = rcgen::generate_simple_self_signed(vec![
                    "localhost".to_owned(),
                    "127.0.0.1".to_owned(),
                    "::1".to_owned(),
                ])
                .map_err(|e| GatewayError::Tls(format!("generating a certificate: {e}")))?;
                create_private_dir(dir)?;
                write_private(&key, generated.signing_key.serialize_pem().as_bytes())?;
                write_private(&cert, generated.cert.pem().as_bytes())?;
                tracing::info!(cert = %cert.display(), "generated a self-signed certificate");
                Self::from_pem_files(&cert, &key)
            }
            (true, false) | (false, true) => Err(GatewayError::Tls(format!(
                "{} and {} must both exist or both be absent",
                cert.display(),
                key.display()
            ))),
        }
    }

    /// Loads an operator-supplied PEM certificate chain and private key.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, GatewayError> {
        let pem_err = |path: &Path, e: rustls::pki_types::pem::Error| {
            GatewayError::Tls(format!("{}: {e}", path.display()))
        };
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| pem_err(cert, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(cert, e))?;
        if chain.is_empty() {
            return Err(GatewayError::Tls(format!(
                "{}: no certificate found",
                cert.display()
            )));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, e))?;
        Ok(Self { chain, key })
    }

    /// SHA-256 of the end-entity certificate, as lowercase hex pairs joined by `:`.
    pub fn fingerprint(&self) -> String {
        self.fingerprint_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }

    /// SHA-256 of the end-entity certificate.
    pub fn fingerprint_bytes(&self) -> [u8; 32] {
        let leaf = self.chain.first().map(|c| c.as_ref()).unwrap_or_default();
        Sha256::digest(leaf).into()
    }

    /// The end-entity certificate in DER.
    pub fn certificate_der(&self) -> &[u8] {
        self.chain.first().map(|c| c.as_ref()).unwrap_or_default()
    }

    /// The rustls server configuration used by [`crate::QuicServer`]: TLS 1.3
    /// only, ALPN `openpista/1` only, no client certificates, and no 0-RTT
    /// (`max_early_data_size = 0`), so no request can arrive as replayable
    /// early data. Uses the aws-lc-rs provider, installed per configuration.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, GatewayError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| GatewayError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| GatewayError::Tls(e.to_string()))?;
        config.alpn_protocols = vec![openpista_proto::wire::ALPN.to_vec()];
        config.max_early_data_size = 0;
        Ok(config)
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> GatewayError + '_ {
    move |source| GatewayError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn create_private_dir(dir: &Path) -> Result<(), GatewayError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io_err(dir))
}

/// Writes a new file readable by its owner only (via a temporary file and a rename).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), GatewayError> {
    let tmp: PathBuf = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(io_err(&tmp))?;
    file.write_all(bytes).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Refuses a secret file that group or others may read.
pub(crate) fn check_private(path: &Path) -> Result<(), GatewayError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(io_err(path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(GatewayError::InsecurePermissions {
                path: path.to_path_buf(),
                mode: mode & 0o777,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = TlsIdentity::load_or_generate(&data).unwrap();
        let again = TlsIdentity::load_or_generate(&data).unwrap();
        assert_eq!(first.fingerprint(), again.fingerprint());
        assert_eq!(first.fingerprint().len(), 32 * 3 - 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for f in [CERT_FILE, KEY_FILE] {
                let mode = std::fs::metadata(data.join(f))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{f}");
            }
        }
        assert!(first.server_config().is_ok());
    }

    #[cfg(unix)]
    #[test]
    fn a_world_readable_key_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        TlsIdentity::load_or_generate(dir.path()).unwrap();
        let key = dir.path().join(KEY_FILE);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = TlsIdentity::load_or_generate(dir.path()).unwrap_err();
        assert!(
            matches!(err, GatewayError::InsecurePermissions { .. }),
            "{err}"
        );
    }

    #[test]
    fn half_an_identity_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CERT_FILE), "x").unwrap();
        assert!(TlsIdentity::load_or_generate(dir.path()).is_err());
        assert_eq!(
            std::fs::read_to_string(dir.path().join(CERT_FILE)).unwrap(),
            "x"
        );
    }
}
