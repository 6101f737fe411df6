//! Verifies bearer tokens locally: access tokens by their Ed25519 signature with keys fetched from auth (again
//! whenever an unknown key id turns up), API tokens by asking auth, both cached; and refuses revoked credentials,
//! which auth announces on the event bus.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cube_bus::{BusError, EventBus};
use cube_proto::cube::auth::v1::{RevokedKind, TokenRevoked, UserDeactivated};
use futures::StreamExt as _;
use futures::future::BoxFuture;
use prost::Message as _;

use super::jws::{self, PublicKey, TokenError};
use super::principal::{Credential, Principal};
use crate::error::ApiError;

/// The prefix of every API token's secret.
pub const API_TOKEN_PREFIX: &str = "cube_";

/// The bus topic auth announces revoked sessions and tokens on.
pub const TOKEN_REVOKED: &str = "token.revoked";
/// The bus topic auth announces deactivated (or deleted) users on.
pub const USER_DEACTIVATED: &str = "user.deactivated";

/// Where a [`Verifier`] gets what it cannot work out alone: the auth service, over the network or in-process.
pub trait Authority: Send + Sync + 'static {
    /// Returns the public keys that verify access tokens.
    fn public_keys(&self) -> BoxFuture<'_, Result<Vec<PublicKey>, ApiError>>;

    /// Checks an API token and returns its holder; `UNAUTHENTICATED` when it is unknown, revoked or expired.
    fn introspect<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Principal, ApiError>>;
}

/// How a [`Verifier`] caches and checks.
#[derive(Debug, Clone)]
pub struct VerifierOptions {
    /// The issuer and audience access tokens must name.
    pub issuer: String,
    /// How long an API token, once checked with auth, is trusted without asking again. Revocation events cut
    /// it short; without them this bounds how late a revocation takes effect.
    pub api_token_ttl: Duration,
    /// The shortest time between two key fetches, so tokens with made-up key ids cannot flood auth.
    pub key_refetch_interval: Duration,
    /// The most verified tokens kept.
    pub cache_capacity: usize,
    /// Clock skew tolerated on issue times, in seconds.
    pub leeway_seconds: i64,
}

impl Default for VerifierOptions {
    fn default() -> Self {
        Self {
            issuer: "cube".into(),
            api_token_ttl: Duration::from_secs(2),
            key_refetch_interval: Duration::from_secs(1),
            cache_capacity: 50_000,
            leeway_seconds: 60,
        }
    }
}

/// Verifies bearer tokens into [`Principal`]s; cheap to clone, shared by every call of a server.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

struct Inner {
    authority: Arc<dyn Authority>,
    options: VerifierOptions,
    keys: RwLock<HashMap<String, PublicKey>>,
    last_key_fetch: tokio::sync::Mutex<Option<Instant>>,
    cache: RwLock<HashMap<Box<str>, Cached>>,
    revocations: RwLock<Revocations>,
}

struct Cached {
    principal: Arc<Principal>,
    /// Unix seconds (access tokens) after which the entry is no longer used.
    until_unix: i64,
    /// For API tokens: when to ask auth again.
    recheck_at: Option<Instant>,
}

/// Revoked credentials, each kept until it would have expired anyway.
#[derive(Default)]
struct Revocations {
    sessions: HashMap<String, i64>,
    api_tokens: HashMap<String, i64>,
    /// Username → (every credential issued at or before this time is refused, forget after).
    users: HashMap<String, (i64, i64)>,
    /// Username → (access tokens issued at or before this time are refused, forget after).
    user_access_tokens: HashMap<String, (i64, i64)>,
}

impl Revocations {
    fn refuses(&self, principal: &Principal) -> bool {
        let before = |map: &HashMap<String, (i64, i64)>| {
            map.get(&principal.username)
                .is_some_and(|(not_before, _)| principal.issued_at <= *not_before)
        };
        if before(&self.users) {
            return true;
        }
        match &principal.credential {
            Credential::AccessToken { session, .. } => {
                self.sessions.contains_key(session) || before(&self.user_access_tokens)
            }
            Credential::ApiToken { name, .. } => self.api_tokens.contains_key(name),
        }
    }

    fn prune(&mut self, now: i64) {
        self.sessions.retain(|_, expire| *expire > now);
        self.api_tokens.retain(|_, expire| *expire > now);
        self.users.retain(|_, (_, expire)| *expire > now);
        self.user_access_tokens.retain(|_, (_, expire)| *expire > now);
    }
}

/// A revocation to apply, as announced by auth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    /// A login session (`sessions/{id}` or the bare id) and every access token issued in it.
    Session {
        /// The session id.
        id: String,
        /// When its tokens expire anyway (Unix seconds).
        expires_at: i64,
    },
    /// One API token, by resource name.
    ApiToken {
        /// `users/{username}/apiTokens/{token}`.
        name: String,
        /// When it expires anyway (Unix seconds); far in the future for tokens without expiry.
        expires_at: i64,
    },
    /// Every credential of a user issued at or before `at` (deactivation, deletion).
    User {
        /// The username.
        username: String,
        /// Unix seconds.
        at: i64,
    },
    /// Every access token of a user issued at or before `at` (role or password change).
    UserAccessTokens {
        /// The username.
        username: String,
        /// Unix seconds.
        at: i64,
    },
}

/// How long a user-wide revocation is remembered: longer than any access token or API-token cache lives.
const USER_REVOCATION_MEMORY: i64 = 24 * 60 * 60;

/// Returns the current time in seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX))
}

fn unauthenticated(message: impl Into<String>) -> ApiError {
    ApiError::Unauthenticated {
        message: message.into(),
    }
}

impl Verifier {
    /// Builds a verifier that asks `authority` for keys and API-token checks.
    pub fn new(authority: Arc<dyn Authority>, options: VerifierOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                authority,
                options,
                keys: RwLock::new(HashMap::new()),
                last_key_fetch: tokio::sync::Mutex::new(None),
                cache: RwLock::new(HashMap::new()),
                revocations: RwLock::new(Revocations::default()),
            }),
        }
    }

    /// Verifies a bearer token and returns its holder.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` when the token is malformed, forged, expired or revoked; `UNAVAILABLE` when auth
    /// cannot be asked.
    pub async fn verify(&self, token: &str) -> Result<Arc<Principal>, ApiError> {
        let now = unix_now();
        if let Some(principal) = self.cached(token, now) {
            return self.unless_revoked(principal);
        }
        let (principal, until_unix, recheck_at) = if token.starts_with(API_TOKEN_PREFIX) {
            let principal = self.inner.authority.introspect(token).await?;
            let until = principal.expires_at.unwrap_or(i64::MAX);
            (
                principal,
                until,
                Some(Instant::now() + self.inner.options.api_token_ttl),
            )
        } else {
            let claims = self.verify_signature(token, now).await?;
            let principal = Principal {
                username: claims.sub,
                roles: claims.roles,
                groups: claims.groups,
                credential: Credential::AccessToken {
                    id: claims.jti,
                    session: claims.sid,
                },
                issued_at: claims.iat,
                expires_at: Some(claims.exp),
            };
            (principal, claims.exp, None)
        };
        let principal = Arc::new(principal);
        self.remember(token, &principal, until_unix, recheck_at, now);
        self.unless_revoked(principal)
    }

    fn cached(&self, token: &str, now: i64) -> Option<Arc<Principal>> {
        let cache = self.inner.cache.read().unwrap_or_else(PoisonError::into_inner);
        let entry = cache.get(token)?;
        let fresh = entry.until_unix > now && entry.recheck_at.is_none_or(|at| Instant::now() < at);
        fresh.then(|| Arc::clone(&entry.principal))
    }

    fn remember(
        &self,
        token: &str,
        principal: &Arc<Principal>,
        until_unix: i64,
        recheck_at: Option<Instant>,
        now: i64,
    ) {
        let mut cache = self.inner.cache.write().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= self.inner.options.cache_capacity {
            let instant = Instant::now();
            cache.retain(|_, entry| entry.until_unix > now && entry.recheck_at.is_none_or(|at| instant < at));
            if cache.len() >= self.inner.options.cache_capacity {
                cache.clear();
            }
        }
        cache.insert(
            token.into(),
            Cached {
                principal: Arc::clone(principal),
                until_unix,
                recheck_at,
            },
        );
    }

    fn unless_revoked(&self, principal: Arc<Principal>) -> Result<Arc<Principal>, ApiError> {
        let revocations = self.inner.revocations.read().unwrap_or_else(PoisonError::into_inner);
        if revocations.refuses(&principal) {
            return Err(unauthenticated("the token has been revoked"));
        }
        Ok(principal)
    }

    async fn verify_signature(&self, token: &str, now: i64) -> Result<jws::Claims, ApiError> {
        let refuse = |error: TokenError| unauthenticated(error.to_string());
        let kid = jws::key_id(token).map_err(refuse)?;
        let key = match self.key(&kid) {
            Some(key) => key,
            None => {
                self.refetch_keys(&kid).await?;
                self.key(&kid).ok_or_else(|| refuse(TokenError::UnknownKey(kid)))?
            }
        };
        let options = &self.inner.options;
        jws::verify(token, &key, &options.issuer, now, options.leeway_seconds).map_err(refuse)
    }

    fn key(&self, kid: &str) -> Option<PublicKey> {
        let keys = self.inner.keys.read().unwrap_or_else(PoisonError::into_inner);
        keys.get(kid).cloned()
    }

    /// Fetches the keys again, at most once per refetch interval: a call that comes sooner waits for the
    /// interval to pass (callers queue on the lock, and those behind find the key already fetched), so a freshly
    /// rotated key is never refused and made-up key ids cannot flood auth.
    async fn refetch_keys(&self, kid: &str) -> Result<(), ApiError> {
        let mut last = self.inner.last_key_fetch.lock().await;
        if self.key(kid).is_some() {
            return Ok(());
        }
        if let Some(at) = *last {
            let interval = self.inner.options.key_refetch_interval;
            if at.elapsed() < interval {
                tokio::time::sleep(interval.saturating_sub(at.elapsed())).await;
            }
        }
        let keys = self.inner.authority.public_keys().await?;
        *last = Some(Instant::now());
        let keys = keys.into_iter().map(|key| (key.kid.clone(), key)).collect();
        *self.inner.keys.write().unwrap_or_else(PoisonError::into_inner) = keys;
        Ok(())
    }

    /// Applies a revocation: from now on the credentials it names are refused.
    pub fn revoke(&self, revocation: Revocation) {
        let now = unix_now();
        let mut revocations = self.inner.revocations.write().unwrap_or_else(PoisonError::into_inner);
        revocations.prune(now);
        match revocation {
            Revocation::Session { id, expires_at } => {
                let id = id.strip_prefix("sessions/").map_or(id.clone(), str::to_owned);
                revocations.sessions.insert(id, expires_at);
            }
            Revocation::ApiToken { name, expires_at } => {
                revocations.api_tokens.insert(name, expires_at);
            }
            Revocation::User { username, at } => {
                revocations.users.insert(username, (at, at + USER_REVOCATION_MEMORY));
            }
            Revocation::UserAccessTokens { username, at } => {
                revocations
                    .user_access_tokens
                    .insert(username, (at, at + USER_REVOCATION_MEMORY));
            }
        }
    }

    /// Subscribes to auth's revocation events on `bus` (as consumer group `group`, which must be unique to this
    /// process so that every replica sees every event) and applies them until the returned feed is dropped.
    ///
    /// # Errors
    /// Returns an error when the subscriptions cannot be made.
    pub async fn follow(&self, bus: &Arc<dyn EventBus>, group: &str) -> Result<RevocationFeed, BusError> {
        let mut tasks = Vec::new();
        for topic in [TOKEN_REVOKED, USER_DEACTIVATED] {
            // From the oldest event still held: revocations announced before this process started apply too.
            let mut subscription = bus.subscribe_retained(topic, group, "verifier").await?;
            let verifier = self.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(delivery) = subscription.next().await {
                    let delivery = match delivery {
                        Ok(delivery) => delivery,
                        Err(error) => {
                            tracing::warn!(%error, topic, "reading revocation events");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                    };
                    match decode(topic, &delivery.payload) {
                        Some(revocation) => verifier.revoke(revocation),
                        None => tracing::warn!(topic, id = %delivery.id, "undecodable revocation event"),
                    }
                    if let Err(error) = delivery.ack().await {
                        tracing::warn!(%error, topic, "acknowledging a revocation event");
                    }
                }
            }));
        }
        Ok(RevocationFeed { tasks })
    }
}

/// Turns a revocation event into a [`Revocation`].
fn decode(topic: &str, payload: &[u8]) -> Option<Revocation> {
    let seconds = |time: Option<prost_types::Timestamp>| time.map_or(0, |time| time.seconds);
    let username = |user: &str| user.strip_prefix("users/").map(str::to_owned);
    if topic == USER_DEACTIVATED {
        let event = UserDeactivated::decode(payload).ok()?;
        return Some(Revocation::User {
            username: username(&event.user)?,
            at: seconds(event.time),
        });
    }
    let event = TokenRevoked::decode(payload).ok()?;
    let expires_at = event.expire_time.map_or(i64::MAX, |time| time.seconds);
    match event.kind() {
        RevokedKind::Session => Some(Revocation::Session {
            id: event.id,
            expires_at,
        }),
        RevokedKind::ApiToken => Some(Revocation::ApiToken {
            name: event.id,
            expires_at,
        }),
        RevokedKind::UserAccessTokens => Some(Revocation::UserAccessTokens {
            username: username(&event.user)?,
            at: seconds(event.time),
        }),
        RevokedKind::Unspecified => None,
    }
}

/// Applies revocation events while it lives.
#[derive(Debug)]
pub struct RevocationFeed {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for RevocationFeed {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
