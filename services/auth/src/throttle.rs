//! Slows password guessing without letting a stranger lock a user out (OWASP ASVS 2.2.1): failed logins are
//! counted per user name *and* client address, per client address, and per user name, and a count that reaches
//! its limit locks its key out for a while that doubles with each further failure.
//!
//! - **User and address** (5 by default): a user's own mistakes, or a guesser at one address, lock out that user
//!   name from that address only. Another address, such as the user's own, is not affected.
//! - **Address** (20): one address guessing many user names is locked out for every name.
//! - **User** (100): many addresses guessing one user name (a botnet) lock out that name, but not from the
//!   addresses where the user logged in successfully during the last 30 days: a stranger cannot lock the user out
//!   of their usual address, whatever the number of addresses the stranger has.
//!
//! A lock-out lasts [`ThrottlePolicy::first_lockout`] when a key reaches its limit and doubles with each failure
//! after it (attempts refused while locked out are not failures), up to [`ThrottlePolicy::longest_lockout`]. A key's
//! count is forgotten [`ThrottlePolicy::window`] after its last failure. A successful login clears the count of
//! its user and address only: the address keeps its count, so that one good account does not let it go on
//! guessing others, and the user keeps theirs, so that logging in does not reset a distributed guesser's progress.
//!
//! The counts live in this process, or in Redis so that every replica of the auth service sees the same counts.
//! User names are compared case-insensitively (`Alice` and `alice` share a count), IPv4-mapped IPv6 addresses
//! count as their IPv4 address, and IPv6 clients count per /64 network, the block one host usually holds.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use deadpool_redis::Pool;
use deadpool_redis::redis;
use tokio::time::Instant;

/// The key prefix of the counts in Redis.
pub const DEFAULT_PREFIX: &str = "cube:auth:login-failures";

/// How many keys the in-process counts hold at most, so that a flood of made-up user names cannot exhaust memory.
const MAX_IN_PROCESS_KEYS: usize = 100_000;

/// Below this many in-process keys, expired ones are left for later.
const MIN_PRUNE_AT: usize = 1024;

/// Counts a failure for each pair of keys (`KEYS[2i-1]` the count, `KEYS[2i]` its lock-out), remembering the count
/// for `ARGV[1]` ms; a count at or past its limit (`ARGV[3+i]`, 0 for none) sets the lock-out for `ARGV[2]` ms,
/// doubled for each failure past the limit, at most `ARGV[3]` ms.
const RECORD_FAILURE: &str = r"
local window = tonumber(ARGV[1])
local first = tonumber(ARGV[2])
local longest = tonumber(ARGV[3])
for i = 1, #KEYS / 2 do
  local key = KEYS[2 * i - 1]
  local count = redis.call('INCR', key)
  redis.call('PEXPIRE', key, window)
  local limit = tonumber(ARGV[3 + i])
  if limit > 0 and count >= limit then
    local lock = first
    for _ = 1, count - limit do
      if lock >= longest then break end
      lock = lock * 2
    end
    if lock > longest then lock = longest end
    redis.call('SET', KEYS[2 * i], '1', 'PX', math.max(lock, 1))
  end
end
return 1
";

/// Returns the milliseconds left in each lock-out (negative when none): `KEYS[2]`, the user's, counts only when the
/// user has not logged in from this address (`KEYS[1]` unset); `KEYS[3..]` always count.
const READ_LOCKOUTS: &str = r"
local out = {}
if redis.call('EXISTS', KEYS[1]) == 1 then
  out[1] = -2
else
  out[1] = redis.call('PTTL', KEYS[2])
end
for i = 3, #KEYS do
  out[#out + 1] = redis.call('PTTL', KEYS[i])
end
return out
";

/// Clears the count and lock-out of a user at an address (`KEYS[1]`, `KEYS[2]`) and, when given, remembers the
/// address as the user's (`KEYS[3]`) for `ARGV[1]` ms.
const RECORD_SUCCESS: &str = r"
redis.call('DEL', KEYS[1], KEYS[2])
if KEYS[3] then
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[1])
end
return 1
";

/// How many failed logins are tolerated, how long lock-outs last, and how long failures are remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottlePolicy {
    /// Failed logins of one user name from one client address before that name is locked out from that address
    /// (0: no limit).
    pub max_failures_per_user_client: u32,
    /// Failed logins from one client address, for any user names, before the address is locked out (0: no limit).
    pub max_failures_per_client: u32,
    /// Failed logins of one user name, from every address together, before the name is locked out from the
    /// addresses the user has not logged in from lately (0: no limit).
    pub max_failures_per_user: u32,
    /// How long a key's failures are remembered after its last one.
    pub window: Duration,
    /// How long a key is locked out when its count reaches the limit; each further failure doubles it.
    pub first_lockout: Duration,
    /// The longest lock-out.
    pub longest_lockout: Duration,
    /// How long an address where a user logged in stays exempt from the user's lock-out.
    pub known_client_ttl: Duration,
}

impl Default for ThrottlePolicy {
    fn default() -> Self {
        Self {
            max_failures_per_user_client: 5,
            max_failures_per_client: 20,
            max_failures_per_user: 100,
            window: Duration::from_secs(60 * 60),
            first_lockout: Duration::from_secs(30),
            longest_lockout: Duration::from_secs(15 * 60),
            known_client_ttl: Duration::from_secs(30 * 24 * 60 * 60),
        }
    }
}

impl ThrottlePolicy {
    /// Returns how long a key whose count reached `count` against `limit` is locked out: nothing below the limit,
    /// [`Self::first_lockout`] at it, doubled for each failure past it, at most [`Self::longest_lockout`].
    pub fn lockout(&self, count: u64, limit: u32) -> Duration {
        if limit == 0 || count < u64::from(limit) {
            return Duration::ZERO;
        }
        let doublings = u32::try_from(count - u64::from(limit)).unwrap_or(u32::MAX).min(32);
        self.first_lockout
            .saturating_mul(2_u32.saturating_pow(doublings))
            .min(self.longest_lockout)
    }
}

/// Why a login may not be attempted now, or why the counts could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ThrottleError {
    /// Too many failed logins for this user, from this client, or both: try again after `retry_after`.
    #[error("too many failed logins: retry after {}s", retry_after.as_secs().max(1))]
    Limited {
        /// Time left until the longest lock-out that applies ends.
        retry_after: Duration,
    },
    /// The store of the counts (Redis) failed; callers decide whether to refuse logins or let them through.
    #[error("login throttle store unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Counts failed logins and refuses logins that reached a limit; clones share the counts.
#[derive(Clone)]
pub struct LoginThrottle {
    policy: ThrottlePolicy,
    prefix: Arc<str>,
    store: Store,
}

#[derive(Clone)]
enum Store {
    InProcess(Arc<Mutex<Counts>>),
    Redis(Pool),
}

impl fmt::Debug for LoginThrottle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let store = match self.store {
            Store::InProcess(_) => "in-process",
            Store::Redis(_) => "redis",
        };
        f.debug_struct("LoginThrottle")
            .field("policy", &self.policy)
            .field("prefix", &self.prefix)
            .field("store", &store)
            .finish()
    }
}

/// A counted key with its limit; its lock-out is `<name>:lock`.
struct Key {
    name: String,
    limit: u32,
}

impl Key {
    fn lock(&self) -> String {
        format!("{}:lock", self.name)
    }
}

/// The keys of one login attempt.
struct Keys {
    /// The user at the address.
    pair: Key,
    /// The address, when known.
    client: Option<Key>,
    /// The user from anywhere.
    user: Key,
    /// Set while the address is one the user logged in from; only with an address.
    known: Option<String>,
}

impl Keys {
    /// The counted keys, the user's last.
    fn counted(&self) -> impl Iterator<Item = &Key> {
        std::iter::once(&self.pair)
            .chain(&self.client)
            .chain(std::iter::once(&self.user))
    }
}

impl LoginThrottle {
    /// Keeps the counts in this process: for a single replica, or when Redis is not configured.
    pub fn in_process(policy: ThrottlePolicy) -> Self {
        Self {
            policy,
            prefix: DEFAULT_PREFIX.into(),
            store: Store::InProcess(Arc::default()),
        }
    }

    /// Keeps the counts in Redis, shared by every replica, under keys `cube:auth:login-failures:user-client:<name>:
    /// <address>`, `…:client:<address>` and `…:user:<name>` (each with a `:lock` key while locked out), and
    /// `…:known:<name>:<address>` for the addresses users logged in from.
    pub fn redis(pool: Pool, policy: ThrottlePolicy) -> Self {
        Self {
            policy,
            prefix: DEFAULT_PREFIX.into(),
            store: Store::Redis(pool),
        }
    }

    /// Puts the keys under another prefix, so that separate deployments (or tests) sharing a Redis keep apart.
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into().into();
        self
    }

    /// Returns the policy the throttle applies.
    pub fn policy(&self) -> ThrottlePolicy {
        self.policy
    }

    /// Checks, before a password is checked, whether the user at this address, the address, or the user (unless
    /// they logged in from this address lately) is locked out.
    ///
    /// # Errors
    /// [`ThrottleError::Limited`] when one is, with the time left in the longest lock-out that applies;
    /// [`ThrottleError::Unavailable`] when Redis fails.
    pub async fn check(&self, username: &str, client: Option<IpAddr>) -> Result<(), ThrottleError> {
        let keys = self.keys(username, client);
        let left: Vec<Duration> = match &self.store {
            Store::InProcess(counts) => {
                let counts = counts.lock().unwrap_or_else(PoisonError::into_inner);
                let now = Instant::now();
                let known = keys.known.as_deref().is_some_and(|known| counts.is_set(known, now));
                let mut left = vec![counts.lockout_left(&keys.pair.name, now)];
                if let Some(client) = &keys.client {
                    left.push(counts.lockout_left(&client.name, now));
                }
                if !known {
                    left.push(counts.lockout_left(&keys.user.name, now));
                }
                left
            }
            Store::Redis(pool) => {
                let mut names = vec![
                    keys.known.clone().unwrap_or_else(|| format!("{}:known:-", self.prefix)),
                    keys.user.lock(),
                    keys.pair.lock(),
                ];
                names.extend(keys.client.as_ref().map(Key::lock));
                read_lockouts(pool, &names).await?
            }
        };
        match left.into_iter().max().filter(|left| !left.is_zero()) {
            Some(retry_after) => {
                tracing::debug!(user = %username, ?client, ?retry_after, "login throttled");
                Err(ThrottleError::Limited { retry_after })
            }
            None => Ok(()),
        }
    }

    /// Counts one failed login for the user at the address, the address and the user, locking out each key that
    /// reaches its limit.
    ///
    /// # Errors
    /// [`ThrottleError::Unavailable`] when Redis fails.
    pub async fn record_failure(&self, username: &str, client: Option<IpAddr>) -> Result<(), ThrottleError> {
        let keys = self.keys(username, client);
        match &self.store {
            Store::InProcess(counts) => {
                let mut counts = counts.lock().unwrap_or_else(PoisonError::into_inner);
                let now = Instant::now();
                for key in keys.counted() {
                    counts.fail(&key.name, key.limit, now, &self.policy);
                }
                Ok(())
            }
            Store::Redis(pool) => {
                let mut connection = pool.get().await.map_err(unavailable)?;
                let counted: Vec<&Key> = keys.counted().collect();
                let mut eval = redis::cmd("EVAL");
                eval.arg(RECORD_FAILURE).arg(counted.len() * 2);
                for key in &counted {
                    eval.arg(&key.name).arg(key.lock());
                }
                eval.arg(millis(self.policy.window))
                    .arg(millis(self.policy.first_lockout))
                    .arg(millis(self.policy.longest_lockout));
                for key in &counted {
                    eval.arg(key.limit);
                }
                let _: i64 = eval.query_async(&mut *connection).await.map_err(unavailable)?;
                Ok(())
            }
        }
    }

    /// Clears the failures of the user at this address after a successful login, and remembers the address as
    /// the user's, exempt from the user's lock-out for [`ThrottlePolicy::known_client_ttl`].
    ///
    /// # Errors
    /// [`ThrottleError::Unavailable`] when Redis fails.
    pub async fn record_success(&self, username: &str, client: Option<IpAddr>) -> Result<(), ThrottleError> {
        let keys = self.keys(username, client);
        match &self.store {
            Store::InProcess(counts) => {
                let mut counts = counts.lock().unwrap_or_else(PoisonError::into_inner);
                counts.remove(&keys.pair.name);
                if let Some(known) = &keys.known {
                    counts.set(known, Instant::now(), self.policy.known_client_ttl);
                }
                Ok(())
            }
            Store::Redis(pool) => {
                let mut connection = pool.get().await.map_err(unavailable)?;
                let mut eval = redis::cmd("EVAL");
                eval.arg(RECORD_SUCCESS)
                    .arg(if keys.known.is_some() { 3 } else { 2 })
                    .arg(&keys.pair.name)
                    .arg(keys.pair.lock());
                if let Some(known) = &keys.known {
                    eval.arg(known);
                }
                eval.arg(millis(self.policy.known_client_ttl));
                let _: i64 = eval.query_async(&mut *connection).await.map_err(unavailable)?;
                Ok(())
            }
        }
    }

    fn keys(&self, username: &str, client: Option<IpAddr>) -> Keys {
        let user = username.to_lowercase();
        let client = client.map(client_id);
        let at = client.as_deref().unwrap_or("-");
        Keys {
            pair: Key {
                name: format!("{}:user-client:{user}:{at}", self.prefix),
                limit: self.policy.max_failures_per_user_client,
            },
            client: client.as_ref().map(|client| Key {
                name: format!("{}:client:{client}", self.prefix),
                limit: self.policy.max_failures_per_client,
            }),
            user: Key {
                name: format!("{}:user:{user}", self.prefix),
                limit: self.policy.max_failures_per_user,
            },
            known: client.map(|client| format!("{}:known:{user}:{client}", self.prefix)),
        }
    }
}

/// Names a client: its IPv4 address (IPv4-mapped IPv6 ones too), or its IPv6 /64 network.
fn client_id(client: IpAddr) -> String {
    match client.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let network = u128::from(v6) & (u128::MAX << 64);
            format!("{}/64", Ipv6Addr::from(network))
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn unavailable(error: impl std::error::Error + Send + Sync + 'static) -> ThrottleError {
    ThrottleError::Unavailable(Box::new(error))
}

/// Reads the time left in each lock-out (see [`READ_LOCKOUTS`] for the order of `names`).
async fn read_lockouts(pool: &Pool, names: &[String]) -> Result<Vec<Duration>, ThrottleError> {
    let mut connection = pool.get().await.map_err(unavailable)?;
    let mut eval = redis::cmd("EVAL");
    eval.arg(READ_LOCKOUTS).arg(names.len());
    for name in names {
        eval.arg(name);
    }
    let values: Vec<i64> = eval.query_async(&mut *connection).await.map_err(unavailable)?;
    // -2 is a key that does not exist (or an exempt user); -1, no expiry, cannot happen since locks are set with PX.
    Ok(values
        .into_iter()
        .map(|left| Duration::from_millis(u64::try_from(left).unwrap_or(0)))
        .collect())
}

/// In-process counts, lock-outs and known addresses, with when each is forgotten.
#[derive(Default)]
struct Counts {
    entries: HashMap<String, Entry>,
    /// When `entries` grows past this, expired entries are pruned (amortized: it doubles with what is left).
    prune_at: usize,
}

struct Entry {
    count: u64,
    /// When the count is forgotten (or, for a known address, when it stops being known).
    ends: Instant,
    /// When the lock-out ends; in the past when there is none.
    locked_until: Instant,
}

impl Entry {
    fn live_until(&self) -> Instant {
        self.ends.max(self.locked_until)
    }
}

impl Counts {
    fn lockout_left(&self, key: &str, now: Instant) -> Duration {
        self.entries.get(key).map_or(Duration::ZERO, |entry| {
            entry.locked_until.saturating_duration_since(now)
        })
    }

    fn is_set(&self, key: &str, now: Instant) -> bool {
        self.entries.get(key).is_some_and(|entry| entry.ends > now)
    }

    #[cfg(test)]
    fn count(&self, key: &str, now: Instant) -> u64 {
        self.entries
            .get(key)
            .filter(|entry| entry.ends > now)
            .map_or(0, |entry| entry.count)
    }

    fn entry(&mut self, key: &str, now: Instant) -> &mut Entry {
        if !self.entries.contains_key(key) && self.entries.len() >= self.prune_at.max(MIN_PRUNE_AT) {
            self.prune(now);
        }
        self.entries.entry(key.to_owned()).or_insert(Entry {
            count: 0,
            ends: now,
            locked_until: now,
        })
    }

    fn fail(&mut self, key: &str, limit: u32, now: Instant, policy: &ThrottlePolicy) {
        let entry = self.entry(key, now);
        if entry.ends <= now {
            entry.count = 0;
        }
        entry.count += 1;
        entry.ends = now + policy.window;
        let lockout = policy.lockout(entry.count, limit);
        if !lockout.is_zero() {
            entry.locked_until = now + lockout;
        }
    }

    fn set(&mut self, key: &str, now: Instant, ttl: Duration) {
        let entry = self.entry(key, now);
        entry.ends = now + ttl;
    }

    fn remove(&mut self, key: &str) {
        self.entries.remove(key);
    }

    /// Drops expired entries; when the live ones still reach the cap, drops those forgotten first, down to nine
    /// tenths of the cap so that the next pruning is thousands of failures away.
    fn prune(&mut self, now: Instant) {
        self.entries.retain(|_, entry| entry.live_until() > now);
        if self.entries.len() >= MAX_IN_PROCESS_KEYS {
            let excess = self.entries.len() - MAX_IN_PROCESS_KEYS * 9 / 10;
            let mut ends: Vec<Instant> = self.entries.values().map(Entry::live_until).collect();
            let (_, cutoff, _) = ends.select_nth_unstable(excess - 1);
            let cutoff = *cutoff;
            self.entries.retain(|_, entry| entry.live_until() > cutoff);
            tracing::warn!(
                cap = MAX_IN_PROCESS_KEYS,
                kept = self.entries.len(),
                "login throttle tracks too many keys: forgot the failures that expire first"
            );
        }
        self.prune_at = (self.entries.len() * 2).clamp(MIN_PRUNE_AT, MAX_IN_PROCESS_KEYS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_named_by_ipv4_address_or_ipv6_network() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("an address");
        assert_eq!(client_id(ip("192.0.2.7")), "192.0.2.7");
        assert_eq!(client_id(ip("::ffff:192.0.2.7")), "192.0.2.7");
        assert_eq!(client_id(ip("2001:db8:1:2:3:4:5:6")), "2001:db8:1:2::/64");
        assert_eq!(client_id(ip("2001:db8:1:2:ffff::1")), "2001:db8:1:2::/64");
    }

    #[test]
    fn lockouts_start_at_the_limit_and_double_up_to_the_longest() {
        let policy = ThrottlePolicy::default();
        let secs = Duration::from_secs;
        let cases = [
            (0, 5, secs(0)),
            (4, 5, secs(0)),
            (5, 5, secs(30)),
            (6, 5, secs(60)),
            (7, 5, secs(120)),
            (9, 5, secs(480)),
            (10, 5, secs(900)),
            (11, 5, secs(900)),
            (u64::MAX, 5, secs(900)),
            (1000, 0, secs(0)),
        ];
        for (count, limit, expected) in cases {
            assert_eq!(
                policy.lockout(count, limit),
                expected,
                "{count} failures, limit {limit}"
            );
        }
    }

    #[test]
    fn in_process_failures_lock_out_at_the_limit_and_are_forgotten_after_the_window() {
        let policy = ThrottlePolicy {
            window: Duration::from_secs(60),
            first_lockout: Duration::from_secs(5),
            longest_lockout: Duration::from_secs(20),
            ..ThrottlePolicy::default()
        };
        let mut counts = Counts::default();
        let start = Instant::now();
        for i in 0..2 {
            counts.fail("k", 3, start + Duration::from_secs(i), &policy);
        }
        assert_eq!(counts.lockout_left("k", start + Duration::from_secs(2)), Duration::ZERO);
        counts.fail("k", 3, start + Duration::from_secs(2), &policy);
        assert_eq!(
            counts.lockout_left("k", start + Duration::from_secs(2)),
            Duration::from_secs(5)
        );
        counts.fail("k", 3, start + Duration::from_secs(8), &policy);
        assert_eq!(
            counts.lockout_left("k", start + Duration::from_secs(8)),
            Duration::from_secs(10)
        );
        assert_eq!(counts.count("k", start + Duration::from_secs(8)), 4);
        // A minute after the last failure, the count starts over.
        let later = start + Duration::from_secs(8 + 61);
        assert_eq!(counts.count("k", later), 0);
        counts.fail("k", 3, later, &policy);
        assert_eq!(counts.count("k", later), 1);
        assert_eq!(counts.lockout_left("k", later), Duration::ZERO);
    }

    #[test]
    fn pruning_keeps_the_counts_bounded() {
        let policy = ThrottlePolicy {
            window: Duration::from_secs(60),
            ..ThrottlePolicy::default()
        };
        let mut counts = Counts::default();
        let now = Instant::now();
        for i in 0..MAX_IN_PROCESS_KEYS + 10 {
            counts.fail(&format!("k{i}"), 0, now + Duration::from_millis(i as u64), &policy);
        }
        assert!(
            counts.entries.len() <= MAX_IN_PROCESS_KEYS,
            "{} keys",
            counts.entries.len()
        );
        // The newest key survives the eviction.
        let newest = format!("k{}", MAX_IN_PROCESS_KEYS + 9);
        assert_eq!(counts.count(&newest, now), 1);
    }

    #[test]
    fn expired_counts_are_pruned() {
        let policy = ThrottlePolicy {
            window: Duration::from_secs(1),
            ..ThrottlePolicy::default()
        };
        let mut counts = Counts::default();
        let start = Instant::now();
        for i in 0..1500 {
            counts.fail(&format!("old{i}"), 0, start, &policy);
        }
        let later = start + Duration::from_secs(2);
        for i in 0..1000 {
            counts.fail(&format!("new{i}"), 0, later, &policy);
        }
        assert_eq!(counts.entries.len(), 1000, "expired keys left behind");
        assert!(counts.entries.keys().all(|k| k.starts_with("new")));
    }
}
