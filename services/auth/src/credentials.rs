//! The secrets auth deals in: Argon2id password hashes, random refresh and API tokens kept only as SHA-256
//! digests, and the keyring of Ed25519 keys that sign access tokens.

use std::sync::{Arc, PoisonError, RwLock};

use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use cube_kit::ApiError;
use cube_kit::identity::SIGNING_KEY_ROTATED;
use cube_kit::identity::jws::{PublicKey, SigningKey};
use cube_proto::cube::auth::v1::SigningKeyRotated;
use ring::rand::{SecureRandom as _, SystemRandom};
use sea_orm::{
    ActiveValue::Set, ColumnTrait as _, DatabaseConnection, EntityTrait, QueryFilter as _, QueryOrder,
    TransactionTrait as _,
};
use subtle::ConstantTimeEq as _;

use crate::model::signing_key;

/// Argon2id with OWASP's minimum parameters: 19 MiB of memory, 2 passes, 1 lane.
pub const ARGON2_MEMORY_KIB: u32 = 19 * 1024;
/// Argon2id passes.
pub const ARGON2_PASSES: u32 = 2;
/// Argon2id lanes.
pub const ARGON2_LANES: u32 = 1;

fn argon2() -> Result<Argon2<'static>, ApiError> {
    let params = Params::new(ARGON2_MEMORY_KIB, ARGON2_PASSES, ARGON2_LANES, None)
        .map_err(|error| ApiError::internal(error.to_string()))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Hashes a password (on the blocking pool: it takes tens of milliseconds by design).
///
/// # Errors
/// Returns an internal error when hashing fails.
pub async fn hash_password(password: String) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || {
        let salt =
            SaltString::encode_b64(&random_bytes::<16>()?).map_err(|error| ApiError::internal(error.to_string()))?;
        argon2()?
            .hash_password(password.as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .map_err(|error| ApiError::internal(error.to_string()))
    })
    .await
    .map_err(ApiError::internal)?
}

/// Checks a password against a stored hash, or against a fixed dummy hash when there is none, so that unknown
/// users and users without a password take as long to refuse as wrong passwords.
///
/// # Errors
/// Returns an internal error when the blocking pool fails.
pub async fn verify_password(password: String, hash: Option<String>) -> Result<bool, ApiError> {
    tokio::task::spawn_blocking(move || {
        let known = hash.is_some();
        let stored = hash.unwrap_or_else(|| DUMMY_HASH.to_owned());
        let Ok(parsed) = PasswordHash::new(&stored) else {
            return Ok(false);
        };
        let matches = argon2()?.verify_password(password.as_bytes(), &parsed).is_ok();
        Ok(known && matches)
    })
    .await
    .map_err(ApiError::internal)?
}

/// An Argon2id hash of a random password nobody knows, with the same parameters as real ones.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$mCMJFVKPLpSMVc4f3c+d6xaVDVeCsYzmDeKtGIhlZZM";

/// Returns `N` random bytes.
///
/// # Errors
/// Returns an internal error when the system's random source fails.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], ApiError> {
    let mut bytes = [0_u8; N];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| ApiError::internal("the system random source failed"))?;
    Ok(bytes)
}

/// Returns a random identifier of `N` bytes in lowercase hex.
///
/// # Errors
/// Returns an internal error when the system's random source fails.
pub fn random_hex<const N: usize>() -> Result<String, ApiError> {
    Ok(random_bytes::<N>()?.iter().map(|byte| format!("{byte:02x}")).collect())
}

/// Returns a random secret of 32 bytes, base64url.
///
/// # Errors
/// Returns an internal error when the system's random source fails.
pub fn random_secret() -> Result<String, ApiError> {
    Ok(URL_SAFE_NO_PAD.encode(random_bytes::<32>()?))
}

/// Returns the SHA-256 digest of a secret, hex: what the database keeps instead of it.
pub fn digest(secret: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, secret.as_bytes())
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Compares two digests in constant time.
pub fn same_digest(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Splits an API token `cube_<id>_<secret>` into its id, or `None` when it has another shape.
pub fn api_token_id(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(cube_kit::identity::API_TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let valid = id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) && secret.len() == 43;
    valid.then_some(id)
}

/// A signing key and when it was created (Unix ms).
type DatedKey = (Arc<SigningKey>, i64);

/// How many keys are kept and published at most: the one that signs and the two before it. Rotating past that
/// retires the oldest at once, and the tokens it signed stop working.
pub const KEPT_KEYS: usize = 3;

/// The keys that sign access tokens: the newest signs, the [`KEPT_KEYS`] newest are kept, and each is published
/// until the tokens it signed have expired.
#[derive(Debug, Clone)]
pub struct Keyring {
    keys: Arc<RwLock<Vec<DatedKey>>>,
}

impl Keyring {
    /// Loads the keys from the database, creating the first one on a fresh database.
    ///
    /// # Errors
    /// Returns an internal error when the database fails or a stored key is corrupt.
    pub async fn load(db: &DatabaseConnection) -> Result<Self, ApiError> {
        let keyring = Self {
            keys: Arc::new(RwLock::new(Vec::new())),
        };
        keyring.reload(db).await?;
        if keyring.keys.read().unwrap_or_else(PoisonError::into_inner).is_empty() {
            keyring.rotate(db).await?;
        }
        Ok(keyring)
    }

    async fn reload(&self, db: &DatabaseConnection) -> Result<(), ApiError> {
        let rows = signing_key::Entity::find()
            .order_by_desc(signing_key::Column::CreatedMs)
            .all(db)
            .await
            .map_err(ApiError::internal)?;
        let mut keys = Vec::with_capacity(rows.len());
        for row in rows {
            let pkcs8 = STANDARD.decode(&row.pkcs8).map_err(ApiError::internal)?;
            let key = SigningKey::from_pkcs8(row.kid, pkcs8).map_err(ApiError::internal)?;
            keys.push((Arc::new(key), row.created_ms));
        }
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = keys;
        Ok(())
    }

    /// Creates a new key, which signs from now on, retires the keys past the [`KEPT_KEYS`] newest, and announces
    /// it on `signing_key.rotated` through the outbox, in one transaction.
    ///
    /// # Errors
    /// Returns an internal error when the database fails.
    pub async fn rotate(&self, db: &DatabaseConnection) -> Result<PublicKey, ApiError> {
        let key = SigningKey::generate().map_err(ApiError::internal)?;
        let public = key.public_key();
        let now = cube_kit::time::now_ms();
        let txn = db.begin().await.map_err(ApiError::internal)?;
        signing_key::Entity::insert(signing_key::ActiveModel {
            kid: Set(key.kid().to_owned()),
            pkcs8: Set(STANDARD.encode(key.pkcs8())),
            created_ms: Set(now),
        })
        .exec(&txn)
        .await
        .map_err(ApiError::internal)?;
        let retired: Vec<String> = signing_key::Entity::find()
            .order_by_desc(signing_key::Column::CreatedMs)
            .order_by_desc(signing_key::Column::Kid)
            .all(&txn)
            .await
            .map_err(ApiError::internal)?
            .into_iter()
            .skip(KEPT_KEYS)
            .map(|row| row.kid)
            .collect();
        if !retired.is_empty() {
            signing_key::Entity::delete_many()
                .filter(signing_key::Column::Kid.is_in(retired.clone()))
                .exec(&txn)
                .await
                .map_err(ApiError::internal)?;
            tracing::info!(?retired, "retired signing keys past the newest {KEPT_KEYS}");
        }
        let event = SigningKeyRotated {
            kid: public.kid.clone(),
            retired_kids: retired,
            time: Some(cube_kit::time::timestamp(now)),
        };
        crate::core::enqueue(&txn, SIGNING_KEY_ROTATED, &event).await?;
        txn.commit().await.map_err(ApiError::internal)?;
        // Another replica may have rotated too: the database decides which key is newest.
        self.reload(db).await?;
        Ok(public)
    }

    /// Returns the key that signs now.
    ///
    /// # Errors
    /// Returns an internal error when there is no key (never after [`Keyring::load`]).
    pub fn current(&self) -> Result<Arc<SigningKey>, ApiError> {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        keys.first()
            .map(|(key, _)| Arc::clone(key))
            .ok_or_else(|| ApiError::internal("no signing key"))
    }

    /// Returns the public keys of tokens that may still be live: the signing key and every key retired less than
    /// `lifetime_ms` ago.
    pub fn published(&self, lifetime_ms: i64) -> Vec<PublicKey> {
        let now = cube_kit::time::now_ms();
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let mut published = Vec::new();
        let mut retired_at = None;
        for (key, created_ms) in keys.iter().take(KEPT_KEYS) {
            if retired_at.is_none_or(|retired: i64| now - retired < lifetime_ms) {
                published.push(key.public_key());
            }
            // A key stopped signing when the next newer one was created.
            retired_at = Some(*created_ms);
        }
        published
    }

    /// Reloads the keys when a token names one this replica has not seen (another replica rotated).
    ///
    /// # Errors
    /// Returns an internal error when the database fails.
    pub async fn refresh(&self, db: &DatabaseConnection) -> Result<(), ApiError> {
        self.reload(db).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passwords_hash_and_verify_and_the_dummy_never_matches() -> Result<(), ApiError> {
        let hash = hash_password("correct horse battery".into()).await?;
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hash}");
        assert!(verify_password("correct horse battery".into(), Some(hash.clone())).await?);
        assert!(!verify_password("wrong".into(), Some(hash)).await?);
        assert!(!verify_password("anything".into(), None).await?);
        Ok(())
    }

    #[test]
    fn api_token_ids_parse_only_from_well_formed_tokens() -> Result<(), ApiError> {
        let token = format!("cube_{}_{}", random_hex::<8>()?, random_secret()?);
        assert!(api_token_id(&token).is_some());
        for bad in ["cube_", "cube_zz_x", "bearer", "cube_0123456789abcdef_short"] {
            assert_eq!(api_token_id(bad), None, "{bad}");
        }
        assert!(same_digest(&digest("a"), &digest("a")));
        assert!(!same_digest(&digest("a"), &digest("b")));
        Ok(())
    }
}
