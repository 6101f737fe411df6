//! The auth service as seen from another service: its public keys, its answer to "who holds this API token", and
//! the revocations in force.

use cube_proto::cube::auth::v1::auth_service_client::AuthServiceClient;
use cube_proto::cube::auth::v1::{CredentialKind, GetJwksRequest, GetRevocationListRequest, WhoAmIRequest};
use futures::future::BoxFuture;

use super::jws::PublicKey;
use super::principal::{Credential, Principal};
use super::verifier::{Authority, RevokedCredential, unix_now};
use crate::channel::Channel;
use crate::error::ApiError;

/// Asks the auth service, over a [`Channel`], for keys (`GetJwks`), API-token checks (`WhoAmI` with the token) and
/// revocations (`GetRevocationList`).
#[derive(Debug, Clone)]
pub struct RemoteAuthority {
    client: AuthServiceClient<Channel>,
}

impl RemoteAuthority {
    /// Talks to auth over `channel`.
    pub fn new(channel: Channel) -> Self {
        Self {
            client: AuthServiceClient::new(channel),
        }
    }
}

fn from_status(status: tonic::Status) -> ApiError {
    if status.code() == tonic::Code::Unauthenticated {
        ApiError::Unauthenticated {
            message: status.message().to_owned(),
        }
    } else {
        ApiError::Unavailable {
            service: "auth".into(),
            source: Box::new(status),
        }
    }
}

impl Authority for RemoteAuthority {
    fn public_keys(&self) -> BoxFuture<'_, Result<Vec<PublicKey>, ApiError>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let jwks = client
                .get_jwks(GetJwksRequest {})
                .await
                .map_err(from_status)?
                .into_inner();
            Ok(jwks
                .keys
                .iter()
                .filter_map(|jwk| match PublicKey::from_jwk(jwk) {
                    Ok(key) => Some(key),
                    Err(error) => {
                        tracing::warn!(%error, "ignoring a key auth published");
                        None
                    }
                })
                .collect())
        })
    }

    fn introspect<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Principal, ApiError>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let mut request = tonic::Request::new(WhoAmIRequest {});
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| ApiError::Unauthenticated {
                    message: "the token holds characters metadata cannot carry".into(),
                })?;
            request.metadata_mut().insert("authorization", value);
            let answer = client.who_am_i(request).await.map_err(from_status)?.into_inner();
            let unexpected = |what: &str| ApiError::Unavailable {
                service: "auth".into(),
                source: format!("auth answered WhoAmI without {what}").into(),
            };
            let user = answer.user.ok_or_else(|| unexpected("a user"))?;
            let credential = answer.credential.ok_or_else(|| unexpected("a credential"))?;
            if credential.kind() != CredentialKind::ApiToken {
                return Err(ApiError::Unauthenticated {
                    message: "not an API token".into(),
                });
            }
            let username = user.name.strip_prefix("users/").unwrap_or(&user.name).to_owned();
            let groups = user.groups;
            Ok(Principal {
                username,
                roles: answer
                    .roles
                    .iter()
                    .map(|role| role.strip_prefix("roles/").unwrap_or(role).to_owned())
                    .collect(),
                groups,
                credential: Credential::ApiToken {
                    name: credential.id,
                    scopes: credential.scopes.into_iter().map(Into::into).collect(),
                },
                issued_at: unix_now(),
                expires_at: credential.expire_time.map(|time| time.seconds),
            })
        })
    }

    fn revocations(&self) -> BoxFuture<'_, Result<Vec<RevokedCredential>, ApiError>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let list = client
                .get_revocation_list(GetRevocationListRequest {})
                .await
                .map_err(from_status)?
                .into_inner();
            Ok(list
                .revocations
                .iter()
                .filter_map(|revoked| {
                    let credential = RevokedCredential::from_proto(revoked);
                    if credential.is_none() {
                        tracing::warn!(kind = revoked.kind, "ignoring a malformed revocation auth listed");
                    }
                    credential
                })
                .collect())
        })
    }
}
