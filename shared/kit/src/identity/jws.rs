//! Access tokens as compact JWS (RFC 7515) signed with Ed25519 (`alg: EdDSA`, RFC 8037), on `ring`.
//!
//! Only `EdDSA` is accepted: a header naming any other algorithm (`none`, `HS256`, …) is refused before any key is
//! looked up, so no algorithm-confusion forgery can reach a verifier.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

/// The longest token a verifier reads; anything longer is malformed, not worth decoding.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The claims of a Cube access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The issuer, e.g. `cube`.
    pub iss: String,
    /// The audience, e.g. `cube`.
    pub aud: String,
    /// The username.
    pub sub: String,
    /// The platform role ids in force, e.g. `["admin", "user"]`.
    pub roles: Vec<String>,
    /// The user's LDAP group DNs, as read at login (for project memberships held through groups).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// The login session the token belongs to.
    pub sid: String,
    /// The token's own id.
    pub jti: String,
    /// When it was issued, in seconds since the Unix epoch.
    pub iat: i64,
    /// When it expires, in seconds since the Unix epoch.
    pub exp: i64,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    typ: String,
    #[serde(default)]
    kid: String,
}

/// Why a token or key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token is not a well-formed compact JWS with a JSON header and claims.
    #[error("the token is malformed: {0}")]
    Malformed(&'static str),
    /// The header names an algorithm other than EdDSA.
    #[error("tokens signed with {0:?} are not accepted (only EdDSA)")]
    Algorithm(String),
    /// No known key has the token's key id (shown cut to 40 characters).
    #[error("the token was signed with an unknown key {:?}", .0.chars().take(40).collect::<String>())]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("the token's signature is invalid")]
    Signature,
    /// The issuer or audience is not Cube's.
    #[error("the token was not issued for Cube")]
    Issuer,
    /// The token expired.
    #[error("the token has expired")]
    Expired,
    /// The token claims to be issued in the future.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// A key could not be built or parsed.
    #[error("invalid key: {0}")]
    Key(String),
}

/// A private Ed25519 key that signs access tokens.
#[derive(Debug)]
pub struct SigningKey {
    kid: String,
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl SigningKey {
    /// Generates a new key with a random key id.
    ///
    /// # Errors
    /// Returns an error when the system's random source fails.
    pub fn generate() -> Result<Self, TokenError> {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| TokenError::Key("generating".into()))?;
        let kid = random_id(12).map_err(|_| TokenError::Key("generating a key id".into()))?;
        Self::from_pkcs8(kid, pkcs8.as_ref().to_vec())
    }

    /// Loads a key from its PKCS#8 document.
    ///
    /// # Errors
    /// Returns an error when the document is not an Ed25519 PKCS#8 key.
    pub fn from_pkcs8(kid: String, pkcs8: Vec<u8>) -> Result<Self, TokenError> {
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|error| TokenError::Key(error.to_string()))?;
        Ok(Self { kid, pair, pkcs8 })
    }

    /// Returns the key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Returns the PKCS#8 document, for storage.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// Returns the public half.
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            kid: self.kid.clone(),
            key: self.pair.public_key().as_ref().to_vec(),
        }
    }

    /// Signs `claims` into a compact JWS.
    ///
    /// # Errors
    /// Returns an error when the claims cannot be serialised.
    pub fn sign(&self, claims: &Claims) -> Result<String, TokenError> {
        let header = Header {
            alg: "EdDSA".into(),
            typ: "JWT".into(),
            kid: self.kid.clone(),
        };
        let header = serde_json::to_vec(&header).map_err(|_| TokenError::Malformed("header"))?;
        let claims = serde_json::to_vec(claims).map_err(|_| TokenError::Malformed("claims"))?;
        let mut token = URL_SAFE_NO_PAD.encode(header);
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(claims));
        let signature = self.pair.sign(token.as_bytes());
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature.as_ref()));
        Ok(token)
    }
}

/// A public Ed25519 key that verifies access tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// The key id.
    pub kid: String,
    /// The 32-byte public key.
    pub key: Vec<u8>,
}

impl PublicKey {
    /// Reads a key from its JSON Web Key fields, refusing anything but an Ed25519 signing key.
    ///
    /// # Errors
    /// Returns an error naming what is wrong with the key.
    pub fn from_jwk(jwk: &cube_proto::cube::auth::v1::Jwk) -> Result<Self, TokenError> {
        if jwk.kty != "OKP" || jwk.crv != "Ed25519" || (!jwk.alg.is_empty() && jwk.alg != "EdDSA") {
            return Err(TokenError::Key(format!(
                "key {:?} is {}/{}/{}, not OKP/Ed25519/EdDSA",
                jwk.kid, jwk.kty, jwk.crv, jwk.alg
            )));
        }
        let key = URL_SAFE_NO_PAD
            .decode(&jwk.x)
            .map_err(|_| TokenError::Key(format!("key {:?} is not base64url", jwk.kid)))?;
        if key.len() != 32 || jwk.kid.is_empty() {
            return Err(TokenError::Key(format!(
                "key {:?} is not a 32-byte Ed25519 key",
                jwk.kid
            )));
        }
        Ok(Self {
            kid: jwk.kid.clone(),
            key,
        })
    }

    /// Returns the key as a JSON Web Key.
    pub fn to_jwk(&self) -> cube_proto::cube::auth::v1::Jwk {
        cube_proto::cube::auth::v1::Jwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x: URL_SAFE_NO_PAD.encode(&self.key),
            kid: self.kid.clone(),
            alg: "EdDSA".into(),
            r#use: "sig".into(),
        }
    }
}

/// Reads the key id of a token without verifying anything, refusing tokens that are not EdDSA compact JWS.
///
/// # Errors
/// Returns an error when the token is malformed or names another algorithm.
pub fn key_id(token: &str) -> Result<String, TokenError> {
    let (header, _, _) = split(token)?;
    Ok(header.kid)
}

/// Verifies `token` with `key` and checks its issuer, audience and times against `now` (seconds since the
/// epoch), allowing `leeway` seconds of clock skew on the issue time.
///
/// # Errors
/// Returns why the token was refused.
pub fn verify(token: &str, key: &PublicKey, issuer: &str, now: i64, leeway: i64) -> Result<Claims, TokenError> {
    let (header, signed, signature) = split(token)?;
    if header.kid != key.kid {
        return Err(TokenError::UnknownKey(header.kid));
    }
    UnparsedPublicKey::new(&ED25519, &key.key)
        .verify(signed.as_bytes(), &signature)
        .map_err(|_| TokenError::Signature)?;
    let payload = signed
        .split_once('.')
        .map(|(_, payload)| payload)
        .ok_or(TokenError::Malformed("no claims"))?;
    let payload = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| TokenError::Malformed("claims are not base64url"))?;
    let claims: Claims = serde_json::from_slice(&payload).map_err(|_| TokenError::Malformed("claims"))?;
    if claims.iss != issuer || claims.aud != issuer {
        return Err(TokenError::Issuer);
    }
    if claims.exp <= now {
        return Err(TokenError::Expired);
    }
    if claims.iat > now + leeway {
        return Err(TokenError::NotYetValid);
    }
    Ok(claims)
}

/// Splits a compact JWS into its decoded header, the signed text and the decoded signature.
fn split(token: &str) -> Result<(Header, &str, Vec<u8>), TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::Malformed("longer than 8 KiB"));
    }
    let (signed, signature) = token.rsplit_once('.').ok_or(TokenError::Malformed("not three parts"))?;
    let (header, payload) = signed.split_once('.').ok_or(TokenError::Malformed("not three parts"))?;
    if payload.contains('.') {
        return Err(TokenError::Malformed("more than three parts"));
    }
    let header = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| TokenError::Malformed("header is not base64url"))?;
    let header: Header = serde_json::from_slice(&header).map_err(|_| TokenError::Malformed("header"))?;
    if header.alg != "EdDSA" {
        return Err(TokenError::Algorithm(header.alg));
    }
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| TokenError::Malformed("signature is not base64url"))?;
    Ok((header, signed, signature))
}

/// Returns `bytes` random bytes from the system's source, base64url-encoded.
///
/// # Errors
/// Returns an error when the system's random source fails.
pub fn random_id(bytes: usize) -> Result<String, ring::error::Unspecified> {
    let mut buffer = vec![0_u8; bytes];
    ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut buffer)?;
    Ok(URL_SAFE_NO_PAD.encode(buffer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(now: i64) -> Claims {
        Claims {
            iss: "cube".into(),
            aud: "cube".into(),
            sub: "alice".into(),
            roles: vec!["user".into()],
            groups: Vec::new(),
            sid: "s1".into(),
            jti: "t1".into(),
            iat: now,
            exp: now + 900,
        }
    }

    #[test]
    fn signs_and_verifies() -> Result<(), TokenError> {
        let key = SigningKey::generate()?;
        let token = key.sign(&claims(1_000))?;
        let verified = verify(&token, &key.public_key(), "cube", 1_001, 60)?;
        assert_eq!(verified, claims(1_000));
        assert_eq!(key_id(&token)?, key.kid());
        let jwk = key.public_key().to_jwk();
        assert_eq!(PublicKey::from_jwk(&jwk)?, key.public_key());
        Ok(())
    }

    #[test]
    fn refuses_forgeries_and_bad_times() -> Result<(), TokenError> {
        let key = SigningKey::generate()?;
        let other = SigningKey::generate()?;
        let token = key.sign(&claims(1_000))?;
        let public = key.public_key();
        assert_eq!(verify(&token, &public, "cube", 2_000, 60), Err(TokenError::Expired));
        assert_eq!(verify(&token, &public, "cube", 900, 60), Err(TokenError::NotYetValid));
        assert_eq!(verify(&token, &public, "other", 1_001, 60), Err(TokenError::Issuer));
        // Same key id, another key's signature.
        let forged = SigningKey::from_pkcs8(key.kid().into(), other.pkcs8().to_vec())?.sign(&claims(1_000))?;
        assert_eq!(verify(&forged, &public, "cube", 1_001, 60), Err(TokenError::Signature));
        // Tampered claims.
        let parts: Vec<&str> = token.split('.').collect();
        let mut admin = claims(1_000);
        admin.roles = vec!["admin".into()];
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&admin).map_err(|_| TokenError::Malformed("x"))?);
        let tampered = format!("{}.{payload}.{}", parts[0], parts[2]);
        assert_eq!(
            verify(&tampered, &public, "cube", 1_001, 60),
            Err(TokenError::Signature)
        );
        // alg: none, with and without a signature.
        let none = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"none","kid":"{}"}}"#, key.kid()));
        for forged in [format!("{none}.{payload}."), format!("{none}.{payload}.{}", parts[2])] {
            assert_eq!(
                verify(&forged, &public, "cube", 1_001, 60),
                Err(TokenError::Algorithm("none".into()))
            );
        }
        for garbage in ["", "a.b", "a.b.c.d", "!!.!!.!!", &"x".repeat(MAX_TOKEN_BYTES + 1)] {
            assert!(matches!(
                verify(garbage, &public, "cube", 1_001, 60),
                Err(TokenError::Malformed(_))
            ));
        }
        Ok(())
    }
}
