//! The shared-secret token: stored mode 0600, compared in constant time.

use std::path::Path;

use openpista_channels::{ExposeSecret, SecretString};
use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::GatewayError;
use crate::tls::{check_private, write_private};

/// Reads the token at `path` (trimmed), creating a random 32-byte hex token
/// (mode 0600) if the file does not exist. A token file readable by other
/// users is refused. The token is held as a secret (redacted `Debug`).
pub fn load_or_create_token(path: &Path) -> Result<SecretString, GatewayError> {
    if path.exists() {
        check_private(path)?;
        let text = std::fs::read_to_string(path).map_err(|source| GatewayError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let token = text.trim().to_owned();
        if token.is_empty() {
            return Err(GatewayError::Config(format!("{} is empty", path.display())));
        }
        return Ok(SecretString::from(token));
    }
    let bytes: [u8; 32] = rand::rng().random();
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| GatewayError::Io {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    write_private(path, format!("{token}\n").as_bytes())?;
    Ok(SecretString::from(token))
}

/// The configured token, kept as a digest so comparisons take the same time
/// whatever the presented token's length or content.
#[derive(Clone)]
pub(crate) struct TokenCheck {
    expected: Option<[u8; 32]>,
}

impl std::fmt::Debug for TokenCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCheck")
            .field("required", &self.expected.is_some())
            .finish()
    }
}

impl TokenCheck {
    /// `None` (or an empty token) means no token is required.
    pub(crate) fn new(token: Option<&SecretString>) -> Self {
        Self {
            expected: token
                .map(|t| t.expose_secret())
                .filter(|t| !t.is_empty())
                .map(|t| Sha256::digest(t.as_bytes()).into()),
        }
    }

    pub(crate) fn required(&self) -> bool {
        self.expected.is_some()
    }

    /// Whether `presented` may pass.
    pub(crate) fn allows(&self, presented: Option<&str>) -> bool {
        let Some(expected) = &self.expected else {
            return true;
        };
        let Some(presented) = presented else {
            return false;
        };
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        bool::from(digest.ct_eq(expected))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_exactly() {
        let check = TokenCheck::new(Some(&SecretString::from("s3cret")));
        assert!(check.allows(Some("s3cret")));
        assert!(!check.allows(Some("s3cre")));
        assert!(!check.allows(Some("")));
        assert!(!check.allows(None));
        let open = TokenCheck::new(None);
        assert!(!open.required());
        assert!(open.allows(None));
        assert!(!TokenCheck::new(Some(&SecretString::from(""))).required());
    }

    #[test]
    fn token_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let t1 = load_or_create_token(&path).unwrap();
        let t2 = load_or_create_token(&path).unwrap();
        assert_eq!(t1.expose_secret(), t2.expose_secret());
        assert_eq!(t1.expose_secret().len(), 64);
        assert!(
            !format!("{t1:?}").contains(t1.expose_secret()),
            "Debug is redacted"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
