//! Authentication shared by every server: the typed [`Principal`] handlers read, the [`Verifier`] that turns
//! bearer tokens into principals (locally, with cached keys and claims, honouring revocations), the layer that
//! runs it in front of every RPC, and the [`RemoteAuthority`] that asks the auth service what a verifier cannot
//! know alone.

pub mod jws;
mod layer;
mod principal;
mod remote;
mod verifier;

pub use layer::{Gate, bearer_token};
pub use principal::{ADMIN_ROLE, Credential, Permission, Principal};
pub use remote::RemoteAuthority;
pub use verifier::{
    API_TOKEN_PREFIX, Authority, Revocation, RevocationFeed, TOKEN_REVOKED, USER_DEACTIVATED, Verifier,
    VerifierOptions, unix_now,
};
