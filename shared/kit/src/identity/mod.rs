//! Authentication shared by every server: the typed [`Principal`] handlers read, the [`Verifier`] that turns
//! bearer tokens into principals (locally, with cached keys and claims, honouring revocations), the layer that
//! runs it in front of every RPC, and the [`RemoteAuthority`] that asks the auth service what a verifier cannot
//! know alone.

pub mod jws;
mod layer;
mod principal;
mod remote;
mod username;
mod verifier;

pub use layer::{Gate, act_for, bearer_token, forward_token, on_behalf_of};
pub use principal::{ADMIN_ROLE, Credential, ON_BEHALF_OF, Permission, Principal};
pub use remote::RemoteAuthority;
pub use username::{MAX_USERNAME_BYTES, canonical_username};
/// Builds the gate of a service other than auth: tokens verified with keys from the auth service behind
/// `auth`, API tokens checked with it, and revocations followed on `bus` (as a consumer group of this process
/// alone, named after `service`). Keep the returned feed alive while serving.
///
/// # Errors
/// Returns an error when the revocation events cannot be subscribed to.
pub async fn service_gate(
    service: &str,
    auth: crate::Channel,
    bus: &std::sync::Arc<dyn cube_bus::EventBus>,
    anonymous: &'static [&'static str],
) -> Result<(Gate, RevocationFeed), cube_bus::BusError> {
    let verifier = Verifier::new(
        std::sync::Arc::new(RemoteAuthority::new(auth)),
        VerifierOptions::default(),
    );
    let instance = jws::random_id(9).unwrap_or_else(|_| format!("{}", std::process::id()));
    let feed = verifier
        .follow(bus, &format!("{service}-revocations-{instance}"))
        .await?;
    Ok((Gate::new(verifier, anonymous), feed))
}

pub use verifier::{
    API_TOKEN_PREFIX, Authority, Digest, Revocation, RevocationFeed, RevokedCredential, RevokedSubject,
    SIGNING_KEY_ROTATED, TOKEN_REVOKED, USER_DEACTIVATED, Verifier, VerifierOptions, digest, digest_from_hex,
    digest_hex, unix_now,
};
