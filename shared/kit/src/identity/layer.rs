//! The layer in front of a server's RPCs that verifies each call's bearer token and hands the handler its
//! [`Principal`] in the request extensions.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use tonic::service::Routes;

use super::principal::ON_BEHALF_OF;
use super::verifier::Verifier;
use crate::error::ApiError;

/// Who may call a server's RPCs: bearer tokens checked by a [`Verifier`], except for the listed methods.
#[derive(Debug, Clone)]
pub struct Gate {
    verifier: Verifier,
    anonymous: &'static [&'static str],
    domain: Arc<str>,
}

impl Gate {
    /// Builds a gate that lets anonymous callers reach only `anonymous` (full method paths such as
    /// `/cube.auth.v1.AuthService/Login`).
    pub fn new(verifier: Verifier, anonymous: &'static [&'static str]) -> Self {
        Self {
            verifier,
            anonymous,
            domain: Arc::from(""),
        }
    }

    /// Returns the verifier.
    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// Puts the gate in front of `routes`, naming `domain` in its errors.
    pub(crate) fn guard(mut self, routes: Routes, domain: &str) -> Routes {
        self.domain = Arc::from(domain);
        Routes::from(
            routes
                .into_axum_router()
                .layer(axum::middleware::from_fn_with_state(self, check)),
        )
    }
}

async fn check(State(gate): State<Gate>, mut request: Request, next: Next) -> Response {
    if gate.anonymous.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let verified = match (bearer_token(request.headers()), on_behalf_of(request.headers())) {
        (Ok(token), Ok(None)) => gate.verifier.verify(token).await,
        (Ok(token), Ok(Some(user))) => gate.verifier.verify_acting(token, user).await,
        (Err(error), _) | (_, Err(error)) => Err(error),
    };
    match verified {
        Ok(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(error) => error.status(&gate.domain).into_http(),
    }
}

/// Reads the token of an `authorization: Bearer <token>` header.
///
/// # Errors
/// `UNAUTHENTICATED` when the header is missing or not a bearer token.
pub fn bearer_token(headers: &http::HeaderMap) -> Result<&str, ApiError> {
    let refuse = |message: &str| ApiError::Unauthenticated {
        message: message.to_owned(),
    };
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or_else(|| refuse("this call needs a bearer token in the authorization metadata"))?;
    let value = value
        .to_str()
        .map_err(|_| refuse("the authorization metadata is not text"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| refuse("the authorization metadata must be \"Bearer <token>\""))?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(refuse("the authorization metadata must be \"Bearer <token>\""));
    }
    Ok(token)
}

/// Reads the user a service account's call acts for ([`ON_BEHALF_OF`]), when the call names one.
///
/// # Errors
/// `INVALID_ARGUMENT` naming the metadata when it is not `users/{username}`.
pub fn on_behalf_of(headers: &http::HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get(ON_BEHALF_OF) else {
        return Ok(None);
    };
    let user = value
        .to_str()
        .ok()
        .filter(|user| {
            user.strip_prefix("users/")
                .is_some_and(|name| !name.is_empty() && !name.contains('/'))
        })
        .ok_or_else(|| ApiError::invalid(ON_BEHALF_OF, "must name a user as `users/{username}`"))?;
    Ok(Some(user))
}

/// Copies the caller's bearer token (and the user a service account acts for) onto a call a service makes on the
/// caller's behalf, so that the service it calls verifies the same caller.
///
/// # Errors
/// `UNAUTHENTICATED` when `from` carries no bearer token.
pub fn forward_token<T, U>(from: &tonic::Request<T>, to: &mut tonic::Request<U>) -> Result<(), ApiError> {
    let token = bearer_token(from.metadata().as_ref())?;
    let value = format!("Bearer {token}")
        .parse()
        .map_err(|_| ApiError::Unauthenticated {
            message: "the token holds characters metadata cannot carry".into(),
        })?;
    to.metadata_mut().insert("authorization", value);
    if let Some(user) = from.metadata().get(ON_BEHALF_OF) {
        to.metadata_mut().insert(ON_BEHALF_OF, user.clone());
    }
    Ok(())
}

/// Makes `request` a call of a service account acting for `user` (`users/{username}`): its token as the bearer,
/// the user in [`ON_BEHALF_OF`].
///
/// # Errors
/// `INVALID_ARGUMENT` when the token or the user hold characters metadata cannot carry.
pub fn act_for<T>(request: &mut tonic::Request<T>, token: &str, user: &str) -> Result<(), ApiError> {
    let bearer = format!("Bearer {token}")
        .parse()
        .map_err(|_| ApiError::invalid("token", "holds characters metadata cannot carry"))?;
    let user = user
        .parse()
        .map_err(|_| ApiError::invalid(ON_BEHALF_OF, "holds characters metadata cannot carry"))?;
    request.metadata_mut().insert("authorization", bearer);
    request.metadata_mut().insert(ON_BEHALF_OF, user);
    Ok(())
}
