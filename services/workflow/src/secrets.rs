//! Registry passwords at rest: sealed with ChaCha20-Poly1305 under a key derived (SHA-256) from the file
//! `--secret-key-file` names, each with a random nonce stored in front of it.

use std::path::Path;

use cube_kit::ApiError;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom as _, SystemRandom};

/// The key registry passwords are sealed with.
pub(crate) struct SecretKey {
    key: LessSafeKey,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    /// The key of the file at `path`, which must hold at least 32 bytes.
    ///
    /// # Errors
    /// Says why the file cannot serve as a key.
    pub(crate) fn read(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|error| format!("--secret-key-file {}: {error}", path.display()))?;
        if bytes.len() < 32 {
            return Err(format!(
                "--secret-key-file {}: holds {} bytes; a key needs at least 32 random bytes",
                path.display(),
                bytes.len()
            ));
        }
        Ok(Self::from_bytes(&bytes))
    }

    /// The key derived from `bytes`.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        // A 32-byte key is what ChaCha20-Poly1305 takes: this cannot fail.
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, digest.as_ref()).unwrap_or_else(|_| unreachable!());
        Self {
            key: LessSafeKey::new(unbound),
        }
    }

    /// `plain`, sealed: nonce, then ciphertext and tag.
    pub(crate) fn seal(&self, plain: &[u8]) -> Result<Vec<u8>, ApiError> {
        let mut nonce = [0_u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| ApiError::internal("no randomness"))?;
        let mut sealed = plain.to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut sealed)
            .map_err(|_| ApiError::internal("sealing failed"))?;
        let mut out = nonce.to_vec();
        out.extend(sealed);
        Ok(out)
    }

    /// What `sealed` holds, or `None` when it was not sealed with this key.
    pub(crate) fn open(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        let (nonce, rest) = sealed.split_at_checked(NONCE_LEN)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buffer = rest.to_vec();
        let plain = self.key.open_in_place(nonce, Aad::empty(), &mut buffer).ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_passwords_open_only_with_their_key() {
        let key = SecretKey::from_bytes(&[7; 32]);
        let sealed = key.seal(b"hunter2").expect("sealed");
        assert!(!sealed.windows(7).any(|window| window == b"hunter2"));
        assert_eq!(key.open(&sealed).as_deref(), Some(&b"hunter2"[..]));
        assert_eq!(SecretKey::from_bytes(&[8; 32]).open(&sealed), None);
    }
}
