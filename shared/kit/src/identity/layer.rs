//! The layer in front of a server's RPCs that verifies each call's bearer token and hands the handler its
//! [`Principal`] in the request extensions.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use tonic::service::Routes;

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
    let verified = match bearer_token(request.headers()) {
        Ok(token) => gate.verifier.verify(token).await,
        Err(error) => Err(error),
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

/// Copies the caller's bearer token onto a call a service makes on the caller's behalf, so that the service it
/// calls verifies the same caller.
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
    Ok(())
}
