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

impl RemoteAuthority {
    /// Asks auth who holds `token` (acting for `user`, when given) with `WhoAmI`.
    async fn who_is(&self, token: &str, user: Option<&str>) -> Result<Principal, ApiError> {
        let mut client = self.client.clone();
        let mut request = tonic::Request::new(WhoAmIRequest {});
        match user {
            Some(user) => super::act_for(&mut request, token, user)?,
            None => {
                let value = format!("Bearer {token}")
                    .parse()
                    .map_err(|_| ApiError::Unauthenticated {
                        message: "the token holds characters metadata cannot carry".into(),
                    })?;
                request.metadata_mut().insert("authorization", value);
            }
        }
        let answer = client.who_am_i(request).await.map_err(from_status)?.into_inner();
        let unexpected = |what: &str| ApiError::Unavailable {
            service: "auth".into(),
            source: format!("auth answered WhoAmI without {what}").into(),
        };
        let user_message = answer.user.ok_or_else(|| unexpected("a user"))?;
        let credential_message = answer.credential.ok_or_else(|| unexpected("a credential"))?;
        let expires_at = credential_message.expire_time.map(|time| time.seconds);
        let credential = match credential_message.kind() {
            CredentialKind::ApiToken => Credential::ApiToken {
                name: credential_message.id,
                scopes: credential_message.scopes.into_iter().map(Into::into).collect(),
            },
            CredentialKind::ServiceAccount => {
                let account = credential_message
                    .id
                    .split_once("/tokens/")
                    .map(|(account, _)| account.to_owned())
                    .ok_or_else(|| unexpected("a service account token name"))?;
                Credential::ServiceAccount {
                    account,
                    token: credential_message.id,
                    on_behalf_of: user.map(str::to_owned),
                }
            }
            CredentialKind::AccessToken | CredentialKind::Unspecified => Credential::AccessToken {
                id: credential_message.id,
                session: credential_message.session,
            },
        };
        let username = user_message
            .name
            .strip_prefix("users/")
            .unwrap_or(&user_message.name)
            .to_owned();
        Ok(Principal {
            username,
            roles: answer
                .roles
                .iter()
                .map(|role| role.strip_prefix("roles/").unwrap_or(role).to_owned())
                .collect(),
            groups: user_message.groups,
            credential,
            issued_at: unix_now(),
            expires_at,
        })
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
        Box::pin(async move {
            let principal = self.who_is(token, None).await?;
            if matches!(principal.credential, Credential::AccessToken { .. }) {
                return Err(ApiError::Unauthenticated {
                    message: "not an API token".into(),
                });
            }
            Ok(principal)
        })
    }

    fn act_for<'a>(&'a self, token: &'a str, user: &'a str) -> BoxFuture<'a, Result<Principal, ApiError>> {
        Box::pin(async move {
            let principal = self.who_is(token, Some(user)).await?;
            match &principal.credential {
                Credential::ServiceAccount {
                    on_behalf_of: Some(acting),
                    ..
                } if acting == user => Ok(principal),
                _ => Err(ApiError::Unavailable {
                    service: "auth".into(),
                    source: "auth answered WhoAmI for a service account acting for a user with another principal"
                        .into(),
                }),
            }
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
