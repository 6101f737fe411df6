//! Verifies bearer tokens locally: access tokens by their Ed25519 signature with keys fetched from auth (again
//! when an unknown key id turns up, at most once per interval), API tokens by asking auth, both cached; and
//! refuses revoked credentials, which it loads from auth before it answers its first call and then follows on
//! the event bus.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cube_bus::{BusError, EventBus, Start};
use cube_proto::cube::auth::v1::{RevokedKind, SigningKeyRotated, TokenRevoked, UserDeactivated};
use futures::StreamExt as _;
use futures::future::{BoxFuture, FutureExt as _, Shared};
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
/// The bus topic auth announces signing-key rotations on.
pub const SIGNING_KEY_ROTATED: &str = "signing_key.rotated";

/// Where a [`Verifier`] gets what it cannot work out alone: the auth service, over the network or in-process.
pub trait Authority: Send + Sync + 'static {
    /// Returns the public keys that verify access tokens.
    fn public_keys(&self) -> BoxFuture<'_, Result<Vec<PublicKey>, ApiError>>;

    /// Checks an API token and returns its holder; `UNAUTHENTICATED` when it is unknown, revoked or expired.
    fn introspect<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Principal, ApiError>>;

    /// Returns the revocations still in force, which a verifier loads before it answers its first call.
    fn revocations(&self) -> BoxFuture<'_, Result<Vec<RevokedCredential>, ApiError>>;

    /// Checks a service account's token and returns the principal of `user` (`users/{username}`) as the account
    /// acting for them: the user's roles and groups, the account's credential. `UNAUTHENTICATED` when the token
    /// is not a live service account's, `PERMISSION_DENIED` naming `cube-on-behalf-of` when the user is unknown or
    /// inactive.
    fn act_for<'a>(&'a self, token: &'a str, user: &'a str) -> BoxFuture<'a, Result<Principal, ApiError>>;
}

/// How a [`Verifier`] caches and checks.
#[derive(Debug, Clone)]
pub struct VerifierOptions {
    /// The issuer and audience access tokens must name.
    pub issuer: String,
    /// How long an API token, once checked with auth, is trusted without asking again. Revocation events cut
    /// it short; without them this bounds how late a revocation takes effect.
    pub api_token_ttl: Duration,
    /// The shortest time between two key fetches, so tokens with made-up key ids cannot flood auth. A token with
    /// an unknown key id that comes sooner is refused at once, and the keys are fetched again when the interval
    /// ends, so a key rotated meanwhile is known at most this long after its first token was refused.
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
            key_refetch_interval: Duration::from_millis(500),
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
    key_fetch: Mutex<KeyFetch>,
    cache: RwLock<HashMap<Box<str>, Cached>>,
    revocations: RwLock<Revocations>,
    /// Set once the revocations in force have been loaded from the authority.
    revocations_loaded: tokio::sync::OnceCell<()>,
}

/// A key fetch that every caller with an unknown key id shares: `Err` holds why auth could not be asked.
type SharedFetch = Shared<BoxFuture<'static, Result<(), String>>>;

/// The state of key fetching, shared by every call.
#[derive(Default)]
struct KeyFetch {
    /// When the last fetch started.
    last: Option<Instant>,
    /// The fetch under way, if any.
    running: Option<SharedFetch>,
    /// Whether a fetch is scheduled for the end of the current interval.
    trailing: bool,
}

struct Cached {
    principal: Arc<Principal>,
    /// The digests revocations name the principal by, computed once.
    subjects: Subjects,
    /// Unix seconds (access tokens) after which the entry is no longer used.
    until_unix: i64,
    /// For API tokens: when to ask auth again.
    recheck_at: Option<Instant>,
}

impl RevokedCredential {
    /// Returns the revocation as `GetRevocationList` lists it.
    pub fn to_proto(&self) -> cube_proto::cube::auth::v1::RevokedCredential {
        let time = |seconds: i64| prost_types::Timestamp { seconds, nanos: 0 };
        cube_proto::cube::auth::v1::RevokedCredential {
            kind: self.subject.kind() as i32,
            subject_sha256: digest_hex(&self.digest),
            time: (self.issued_until != i64::MAX).then(|| time(self.issued_until)),
            expire_time: Some(time(self.forget_after)),
        }
    }

    /// Reads a revocation as `GetRevocationList` lists it; `None` when it is malformed.
    pub fn from_proto(revoked: &cube_proto::cube::auth::v1::RevokedCredential) -> Option<Self> {
        Some(Self {
            subject: RevokedSubject::of_kind(revoked.kind())?,
            digest: digest_from_hex(&revoked.subject_sha256)?,
            issued_until: revoked.time.as_ref().map_or(i64::MAX, |time| time.seconds),
            forget_after: revoked.expire_time.as_ref()?.seconds,
        })
    }
}

/// Revoked credentials by what they name and its digest, each kept until it would have expired anyway.
#[derive(Default)]
struct Revocations {
    /// (what, digest) → (credentials issued at or before this Unix second are refused, forget after).
    entries: HashMap<(RevokedSubject, Digest), (i64, i64)>,
}

impl Revocations {
    fn refuses(&self, principal: &Principal, subjects: &Subjects) -> bool {
        if self.entries.is_empty() {
            return false;
        }
        let issued_before = |subject: RevokedSubject| {
            self.entries
                .get(&(subject, subjects.user))
                .is_some_and(|(issued_until, _)| principal.issued_at <= *issued_until)
        };
        if issued_before(RevokedSubject::User) {
            return true;
        }
        match &principal.credential {
            Credential::AccessToken { .. } => {
                self.entries
                    .contains_key(&(RevokedSubject::Session, subjects.credential))
                    || issued_before(RevokedSubject::UserAccessTokens)
            }
            // A service account's token is revoked like an API token, by its name.
            Credential::ApiToken { .. } | Credential::ServiceAccount { .. } => self
                .entries
                .contains_key(&(RevokedSubject::ApiToken, subjects.credential)),
        }
    }

    /// Adds a revocation; of two for the same subject the wider one holds.
    fn apply(&mut self, revoked: &RevokedCredential, now: i64) {
        if revoked.forget_after <= now {
            return;
        }
        let entry = self
            .entries
            .entry((revoked.subject, revoked.digest))
            .or_insert((i64::MIN, i64::MIN));
        entry.0 = entry.0.max(revoked.issued_until);
        entry.1 = entry.1.max(revoked.forget_after);
    }

    fn prune(&mut self, now: i64) {
        self.entries.retain(|_, (_, forget_after)| *forget_after > now);
    }
}

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// What revocations name a principal by: the digests of its username and of its session or API token.
#[derive(Clone, Copy)]
struct Subjects {
    user: Digest,
    credential: Digest,
}

impl Subjects {
    fn of(principal: &Principal) -> Self {
        Self {
            user: digest(&principal.username),
            credential: match &principal.credential {
                Credential::AccessToken { session, .. } => digest(session),
                Credential::ApiToken { name, .. } => digest(name),
                Credential::ServiceAccount { token, .. } => digest(token),
            },
        }
    }
}

/// Returns the SHA-256 digest of `text`: how revocations name sessions, API tokens and users.
pub fn digest(text: &str) -> Digest {
    let mut digest = [0; 32];
    digest.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref());
    digest
}

/// Returns a digest in lowercase hex.
pub fn digest_hex(digest: &Digest) -> String {
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Reads a digest written in hex; `None` when it is not 64 hex digits.
pub fn digest_from_hex(hex: &str) -> Option<Digest> {
    if hex.len() != 64 {
        return None;
    }
    let mut digest = [0; 32];
    for (byte, pair) in digest.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(digest)
}

/// What a [`RevokedCredential`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RevokedSubject {
    /// A login session and every access token issued in it, by session id (without `sessions/`).
    Session,
    /// One API token, by resource name (`users/{username}/apiTokens/{token}`).
    ApiToken,
    /// Every credential of a user issued until a time, by username.
    User,
    /// Every access token of a user issued until a time, by username.
    UserAccessTokens,
}

impl RevokedSubject {
    /// The kind the API names it by.
    pub fn kind(self) -> RevokedKind {
        match self {
            Self::Session => RevokedKind::Session,
            Self::ApiToken => RevokedKind::ApiToken,
            Self::User => RevokedKind::User,
            Self::UserAccessTokens => RevokedKind::UserAccessTokens,
        }
    }

    /// The subject of a kind; `None` for `REVOKED_KIND_UNSPECIFIED`.
    pub fn of_kind(kind: RevokedKind) -> Option<Self> {
        match kind {
            RevokedKind::Session => Some(Self::Session),
            RevokedKind::ApiToken => Some(Self::ApiToken),
            RevokedKind::User => Some(Self::User),
            RevokedKind::UserAccessTokens => Some(Self::UserAccessTokens),
            RevokedKind::Unspecified => None,
        }
    }
}

/// A revocation in force as auth stores and lists it: what it names is known only by digest, so the list can
/// be handed to any caller without naming users or sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedCredential {
    /// What is revoked.
    pub subject: RevokedSubject,
    /// The SHA-256 digest of the session id, API token name or username.
    pub digest: Digest,
    /// Credentials issued at or before this Unix second are refused; `i64::MAX` (all of them) for sessions and
    /// API tokens.
    pub issued_until: i64,
    /// When the revocation may be forgotten (Unix seconds): what it names would have expired by then.
    pub forget_after: i64,
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

impl Revocation {
    /// Returns the revocation as it is stored and listed, its subject digested.
    pub fn credential(&self) -> RevokedCredential {
        match self {
            Self::Session { id, expires_at } => RevokedCredential {
                subject: RevokedSubject::Session,
                digest: digest(id.strip_prefix("sessions/").unwrap_or(id)),
                issued_until: i64::MAX,
                forget_after: *expires_at,
            },
            Self::ApiToken { name, expires_at } => RevokedCredential {
                subject: RevokedSubject::ApiToken,
                digest: digest(name),
                issued_until: i64::MAX,
                forget_after: *expires_at,
            },
            Self::User { username, at } => RevokedCredential {
                subject: RevokedSubject::User,
                digest: digest(username),
                issued_until: *at,
                forget_after: at.saturating_add(USER_REVOCATION_MEMORY),
            },
            Self::UserAccessTokens { username, at } => RevokedCredential {
                subject: RevokedSubject::UserAccessTokens,
                digest: digest(username),
                issued_until: *at,
                forget_after: at.saturating_add(USER_REVOCATION_MEMORY),
            },
        }
    }
}

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
                key_fetch: Mutex::new(KeyFetch::default()),
                cache: RwLock::new(HashMap::new()),
                revocations: RwLock::new(Revocations::default()),
                revocations_loaded: tokio::sync::OnceCell::new(),
            }),
        }
    }

    /// Verifies a bearer token and returns its holder.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` when the token is malformed, forged, expired or revoked; `UNAVAILABLE` when auth
    /// cannot be asked (also while the revocations in force have not been loaded from it).
    pub async fn verify(&self, token: &str) -> Result<Arc<Principal>, ApiError> {
        self.load_revocations().await?;
        let now = unix_now();
        if let Some((principal, subjects)) = self.cached(token, now) {
            return self.unless_revoked(principal, &subjects);
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
        let subjects = Subjects::of(&principal);
        self.remember(token, &principal, subjects, until_unix, recheck_at, now);
        self.unless_revoked(principal, &subjects)
    }

    /// Verifies a service account's token sent with [`super::ON_BEHALF_OF`] naming `user`, and returns the
    /// account acting as that user. The token itself is verified (and revocations checked) on every call; the
    /// user's roles and groups are asked of auth and trusted for [`VerifierOptions::api_token_ttl`].
    ///
    /// # Errors
    /// `UNAUTHENTICATED` as [`Verifier::verify`]; `PERMISSION_DENIED` naming the metadata when the token is not a
    /// service account's (users cannot act for others) or the user does not exist or is inactive.
    pub async fn verify_acting(&self, token: &str, user: &str) -> Result<Arc<Principal>, ApiError> {
        let caller = self.verify(token).await?;
        if caller.service_account().is_none() {
            return Err(ApiError::PermissionDenied {
                permission: format!(
                    "{} metadata (only service accounts act for other users)",
                    super::ON_BEHALF_OF
                ),
            });
        }
        let now = unix_now();
        let key = format!("{token}\n{user}");
        if let Some((principal, subjects)) = self.cached(&key, now) {
            return self.unless_revoked(principal, &subjects);
        }
        let principal = Arc::new(self.inner.authority.act_for(token, user).await?);
        let subjects = Subjects::of(&principal);
        let recheck_at = Some(Instant::now() + self.inner.options.api_token_ttl);
        self.remember(&key, &principal, subjects, i64::MAX, recheck_at, now);
        self.unless_revoked(principal, &subjects)
    }

    fn cached(&self, token: &str, now: i64) -> Option<(Arc<Principal>, Subjects)> {
        let cache = self.inner.cache.read().unwrap_or_else(PoisonError::into_inner);
        let entry = cache.get(token)?;
        let fresh = entry.until_unix > now && entry.recheck_at.is_none_or(|at| Instant::now() < at);
        fresh.then(|| (Arc::clone(&entry.principal), entry.subjects))
    }

    fn remember(
        &self,
        token: &str,
        principal: &Arc<Principal>,
        subjects: Subjects,
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
                subjects,
                until_unix,
                recheck_at,
            },
        );
    }

    fn unless_revoked(&self, principal: Arc<Principal>, subjects: &Subjects) -> Result<Arc<Principal>, ApiError> {
        let revocations = self.inner.revocations.read().unwrap_or_else(PoisonError::into_inner);
        if revocations.refuses(&principal, subjects) {
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
                self.refetch_keys().await?;
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

    /// Makes sure the keys are fresh for a token with a key id not seen yet: waits for the fetch under way, or
    /// starts one when the last is at least an interval old; otherwise returns at once (the token is refused) and
    /// schedules a fetch for the end of the interval. So made-up key ids neither flood auth nor make anyone wait,
    /// and a freshly rotated key is known within one interval.
    async fn refetch_keys(&self) -> Result<(), ApiError> {
        let running = {
            let mut fetch = self.inner.key_fetch.lock().unwrap_or_else(PoisonError::into_inner);
            match (&fetch.running, fetch.last) {
                (Some(running), _) => running.clone(),
                (None, Some(last)) if last.elapsed() < self.inner.options.key_refetch_interval => {
                    if !fetch.trailing {
                        fetch.trailing = true;
                        let wait = self.inner.options.key_refetch_interval.saturating_sub(last.elapsed());
                        let verifier = self.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(wait).await;
                            let running = {
                                let mut fetch = verifier.inner.key_fetch.lock().unwrap_or_else(PoisonError::into_inner);
                                fetch.trailing = false;
                                match &fetch.running {
                                    Some(running) => running.clone(),
                                    None => verifier.start_key_fetch(&mut fetch),
                                }
                            };
                            if let Err(error) = running.await {
                                tracing::warn!(%error, "fetching the keys that verify access tokens");
                            }
                        });
                    }
                    return Ok(());
                }
                (None, _) => self.start_key_fetch(&mut fetch),
            }
        };
        running.await.map_err(|error| ApiError::Unavailable {
            service: "auth".into(),
            source: error.into(),
        })
    }

    /// Starts a key fetch as a task of its own, so it completes even when every caller waiting for it gives up.
    fn start_key_fetch(&self, fetch: &mut KeyFetch) -> SharedFetch {
        fetch.last = Some(Instant::now());
        let verifier = self.clone();
        let task = tokio::spawn(async move {
            let outcome = match verifier.inner.authority.public_keys().await {
                Ok(keys) => {
                    let keys = keys.into_iter().map(|key| (key.kid.clone(), key)).collect();
                    *verifier.inner.keys.write().unwrap_or_else(PoisonError::into_inner) = keys;
                    Ok(())
                }
                Err(error) => Err(error.to_string()),
            };
            verifier
                .inner
                .key_fetch
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .running = None;
            outcome
        });
        let running = task
            .map(|joined| joined.unwrap_or_else(|error| Err(error.to_string())))
            .boxed()
            .shared();
        fetch.running = Some(running.clone());
        running
    }

    /// Follows a key rotation: tokens of the retired keys are refused from now on, and the keys are fetched
    /// again at once (the announcement comes from auth, so no interval applies).
    async fn keys_rotated(&self, retired: &[String]) {
        {
            let mut keys = self.inner.keys.write().unwrap_or_else(PoisonError::into_inner);
            for kid in retired {
                keys.remove(kid);
            }
        }
        // Tokens already verified with a retired key are in the cache: drop them all, they are re-verified cheaply.
        if !retired.is_empty() {
            self.inner.cache.write().unwrap_or_else(PoisonError::into_inner).clear();
        }
        let running = {
            let mut fetch = self.inner.key_fetch.lock().unwrap_or_else(PoisonError::into_inner);
            match &fetch.running {
                Some(running) => running.clone(),
                None => self.start_key_fetch(&mut fetch),
            }
        };
        if let Err(error) = running.await {
            tracing::warn!(%error, "fetching the keys after a rotation");
        }
    }

    /// Loads the revocations in force from the authority, once: calls wait for the load under way, and a failed
    /// load is tried again by the next call, which until then is `UNAVAILABLE`, so a restarted service never
    /// accepts a credential revoked before it started.
    async fn load_revocations(&self) -> Result<(), ApiError> {
        self.inner
            .revocations_loaded
            .get_or_try_init(|| async {
                let revoked = self.inner.authority.revocations().await?;
                let now = unix_now();
                let mut revocations = self.inner.revocations.write().unwrap_or_else(PoisonError::into_inner);
                for revocation in &revoked {
                    revocations.apply(revocation, now);
                }
                tracing::debug!(count = revoked.len(), "loaded the revocations in force");
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// Applies a revocation: from now on the credentials it names are refused.
    pub fn revoke(&self, revocation: &Revocation) {
        let now = unix_now();
        let mut revocations = self.inner.revocations.write().unwrap_or_else(PoisonError::into_inner);
        revocations.prune(now);
        revocations.apply(&revocation.credential(), now);
    }

    /// Subscribes to auth's revocation events on `bus` (as consumer group `group`, which must be unique to this
    /// process so that every replica sees every event; the group is removed when the feed is dropped, or by a
    /// later process once this one died) and applies them until the returned feed is dropped; then
    /// loads the revocations in force (retrying until auth answers), so that nothing revoked before this process
    /// started, nor between the load and the subscription, is missed.
    ///
    /// # Errors
    /// Returns an error when the subscriptions cannot be made.
    pub async fn follow(&self, bus: &Arc<dyn EventBus>, group: &str) -> Result<RevocationFeed, BusError> {
        let mut tasks = Vec::new();
        for topic in [TOKEN_REVOKED, USER_DEACTIVATED, SIGNING_KEY_ROTATED] {
            // From the oldest event still held: revocations announced before this process started apply too.
            let mut subscription = bus.subscribe_instance(topic, group, "verifier", Start::Oldest).await?;
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
                    if topic == SIGNING_KEY_ROTATED {
                        match SigningKeyRotated::decode(delivery.payload.as_ref()) {
                            Ok(rotated) => verifier.keys_rotated(&rotated.retired_kids).await,
                            Err(error) => tracing::warn!(%error, id = %delivery.id, "undecodable key rotation event"),
                        }
                    } else {
                        match decode(topic, &delivery.payload) {
                            Some(revocation) => verifier.revoke(&revocation),
                            None => tracing::warn!(topic, id = %delivery.id, "undecodable revocation event"),
                        }
                    }
                    if let Err(error) = delivery.ack().await {
                        tracing::warn!(%error, topic, "acknowledging a revocation event");
                    }
                }
            }));
        }
        let verifier = self.clone();
        tasks.push(tokio::spawn(async move {
            while let Err(error) = verifier.load_revocations().await {
                tracing::warn!(%error, "loading the revocations in force; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
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
        RevokedKind::User | RevokedKind::Unspecified => None,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(revocations: &Revocations, principal: &Principal) -> bool {
        revocations.refuses(principal, &Subjects::of(principal))
    }

    fn access(username: &str, session: &str, issued_at: i64) -> Principal {
        Principal {
            username: username.into(),
            roles: Vec::new(),
            groups: Vec::new(),
            credential: Credential::AccessToken {
                id: "jti".into(),
                session: session.into(),
            },
            issued_at,
            expires_at: Some(issued_at + 900),
        }
    }

    #[test]
    fn revocations_refuse_what_they_name_and_nothing_else() {
        let now = 1_000_000;
        let mut revocations = Revocations::default();
        for revocation in [
            Revocation::Session {
                id: "sessions/s1".into(),
                expires_at: now + 900,
            },
            Revocation::UserAccessTokens {
                username: "erin".into(),
                at: now,
            },
            Revocation::User {
                username: "dave".into(),
                at: now,
            },
            // Already expired: forgotten at once.
            Revocation::Session {
                id: "old".into(),
                expires_at: now - 1,
            },
        ] {
            revocations.apply(&revocation.credential(), now);
        }
        assert!(
            refused(&revocations, &access("alice", "s1", now - 10)),
            "the session, bare id"
        );
        assert!(
            !refused(&revocations, &access("alice", "s2", now - 10)),
            "another session"
        );
        assert!(
            !refused(&revocations, &access("alice", "old", now - 10)),
            "an expired revocation"
        );
        assert!(
            refused(&revocations, &access("erin", "s3", now)),
            "issued in the second of the revocation"
        );
        assert!(
            !refused(&revocations, &access("erin", "s3", now + 1)),
            "issued after it"
        );
        assert!(refused(&revocations, &access("dave", "s4", now - 100)));
        let api_token = Principal {
            credential: Credential::ApiToken {
                name: "users/dave/apiTokens/t".into(),
                scopes: Vec::new(),
            },
            ..access("dave", "", now - 1)
        };
        assert!(
            refused(&revocations, &api_token),
            "a user revocation covers API tokens too"
        );
        revocations.prune(now + 901);
        assert!(
            !refused(&revocations, &access("alice", "s1", now - 10)),
            "pruned after its expiry"
        );
    }

    #[test]
    fn of_two_revocations_of_one_user_the_later_holds() {
        let mut revocations = Revocations::default();
        let revoke = |at: i64| {
            Revocation::User {
                username: "dave".into(),
                at,
            }
            .credential()
        };
        revocations.apply(&revoke(200), 0);
        revocations.apply(&revoke(100), 0);
        assert!(refused(&revocations, &access("dave", "s", 150)));
    }

    #[test]
    fn listed_revocations_read_back_as_they_were() {
        for revocation in [
            Revocation::Session {
                id: "s1".into(),
                expires_at: 50,
            },
            Revocation::ApiToken {
                name: "users/a/apiTokens/t".into(),
                expires_at: 60,
            },
            Revocation::User {
                username: "a".into(),
                at: 70,
            },
            Revocation::UserAccessTokens {
                username: "a".into(),
                at: 80,
            },
        ] {
            let credential = revocation.credential();
            let listed = credential.to_proto();
            assert_eq!(listed.subject_sha256.len(), 64);
            assert_eq!(RevokedCredential::from_proto(&listed), Some(credential));
        }
        let mut malformed = Revocation::User {
            username: "a".into(),
            at: 1,
        }
        .credential()
        .to_proto();
        malformed.subject_sha256 = "zz".repeat(32);
        assert_eq!(RevokedCredential::from_proto(&malformed), None);
    }
}
