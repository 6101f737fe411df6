//! Slows password guessing: counts failed logins per user name and per client address, and refuses further
//! attempts while either count is at its limit.
//!
//! A window opens with the first failure of a key and lasts [`ThrottlePolicy::window`]; failures inside it add up,
//! and the count is forgotten when it ends (a fixed window per key, as Redis `INCR` + `PEXPIRE` gives). The counts
//! live in this process, or in Redis so that every replica of the auth service sees the same counts.
//!
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

/// Counts a failure for each key (`KEYS`) and starts its window (`ARGV[1]`, in ms) when the key has none.
const RECORD_FAILURE: &str = r"
for _, key in ipairs(KEYS) do
  redis.call('INCR', key)
  if redis.call('PTTL', key) < 0 then
    redis.call('PEXPIRE', key, ARGV[1])
  end
end
return 1
";

/// Returns, for each key (`KEYS`), its count and the milliseconds left in its window (negative when none).
const READ_COUNTS: &str = r"
local out = {}
for _, key in ipairs(KEYS) do
  out[#out + 1] = tonumber(redis.call('GET', key) or '0')
  out[#out + 1] = redis.call('PTTL', key)
end
return out
";

/// How many failed logins are tolerated, and for how long they are remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottlePolicy {
    /// Failed logins for one user name, from any client, before its logins are refused (0: no limit).
    pub max_failures_per_user: u32,
    /// Failed logins from one client address, for any user name, before its logins are refused (0: no limit).
    pub max_failures_per_client: u32,
    /// How long a window lasts from a key's first failure.
    pub window: Duration,
}

impl Default for ThrottlePolicy {
    fn default() -> Self {
        Self {
            max_failures_per_user: 5,
            max_failures_per_client: 20,
            window: Duration::from_secs(15 * 60),
        }
    }
}

/// Why a login may not be attempted now, or why the counts could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ThrottleError {
    /// Too many failed logins for this user or from this client: try again after `retry_after`.
    #[error("too many failed logins: retry after {}s", retry_after.as_secs().max(1))]
    Limited {
        /// Time left until the window that reached its limit ends.
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

/// A key with its limit.
struct Key {
    name: String,
    limit: u32,
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

    /// Keeps the counts in Redis, shared by every replica, under keys `cube:auth:login-failures:user:<name>` and
    /// `cube:auth:login-failures:client:<address>`.
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

    /// Checks, before a password is checked, whether the user name or the client address reached its limit.
    ///
    /// # Errors
    /// [`ThrottleError::Limited`] when either did, with the time left in its window (the longer one when both
    /// did); [`ThrottleError::Unavailable`] when Redis fails.
    pub async fn check(&self, username: &str, client: Option<IpAddr>) -> Result<(), ThrottleError> {
        let keys = self.keys(username, client);
        let states: Vec<(u64, Duration)> = match &self.store {
            Store::InProcess(counts) => {
                let counts = counts.lock().unwrap_or_else(PoisonError::into_inner);
                let now = Instant::now();
                keys.iter().map(|key| counts.get(&key.name, now)).collect()
            }
            Store::Redis(pool) => read_redis(pool, &keys).await?,
        };
        let retry_after = keys
            .iter()
            .zip(states)
            .filter(|(key, (count, _))| key.limit > 0 && *count >= u64::from(key.limit))
            .map(|(_, (_, left))| left)
            .max();
        match retry_after {
            Some(retry_after) => {
                tracing::debug!(user = %username, ?client, ?retry_after, "login throttled");
                Err(ThrottleError::Limited { retry_after })
            }
            None => Ok(()),
        }
    }

    /// Counts one failed login for the user name and for the client address.
    ///
    /// # Errors
    /// [`ThrottleError::Unavailable`] when Redis fails.
    pub async fn record_failure(&self, username: &str, client: Option<IpAddr>) -> Result<(), ThrottleError> {
        let keys = self.keys(username, client);
        match &self.store {
            Store::InProcess(counts) => {
                let mut counts = counts.lock().unwrap_or_else(PoisonError::into_inner);
                let now = Instant::now();
                for key in &keys {
                    counts.increment(&key.name, now, self.policy.window);
                }
                Ok(())
            }
            Store::Redis(pool) => {
                let mut connection = pool.get().await.map_err(unavailable)?;
                let mut eval = redis::cmd("EVAL");
                eval.arg(RECORD_FAILURE).arg(keys.len());
                for key in &keys {
                    eval.arg(&key.name);
                }
                eval.arg(window_millis(self.policy.window));
                let _: i64 = eval.query_async(&mut *connection).await.map_err(unavailable)?;
                Ok(())
            }
        }
    }

    /// Forgets the user name's failures after a successful login; the client's count stays, so that one good
    /// account does not let a client go on guessing others.
    ///
    /// # Errors
    /// [`ThrottleError::Unavailable`] when Redis fails.
    pub async fn record_success(&self, username: &str) -> Result<(), ThrottleError> {
        let key = self.user_key(username);
        match &self.store {
            Store::InProcess(counts) => {
                counts.lock().unwrap_or_else(PoisonError::into_inner).remove(&key.name);
                Ok(())
            }
            Store::Redis(pool) => {
                let mut connection = pool.get().await.map_err(unavailable)?;
                let _: i64 = redis::cmd("DEL")
                    .arg(&key.name)
                    .query_async(&mut *connection)
                    .await
                    .map_err(unavailable)?;
                Ok(())
            }
        }
    }

    fn user_key(&self, username: &str) -> Key {
        Key {
            name: format!("{}:user:{}", self.prefix, username.to_lowercase()),
            limit: self.policy.max_failures_per_user,
        }
    }

    fn keys(&self, username: &str, client: Option<IpAddr>) -> Vec<Key> {
        let mut keys = vec![self.user_key(username)];
        if let Some(client) = client {
            keys.push(Key {
                name: format!("{}:client:{}", self.prefix, client_id(client)),
                limit: self.policy.max_failures_per_client,
            });
        }
        keys
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

fn window_millis(window: Duration) -> u64 {
    u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn unavailable(error: impl std::error::Error + Send + Sync + 'static) -> ThrottleError {
    ThrottleError::Unavailable(Box::new(error))
}

/// Reads each key's count and the time left in its window.
async fn read_redis(pool: &Pool, keys: &[Key]) -> Result<Vec<(u64, Duration)>, ThrottleError> {
    let mut connection = pool.get().await.map_err(unavailable)?;
    let mut eval = redis::cmd("EVAL");
    eval.arg(READ_COUNTS).arg(keys.len());
    for key in keys {
        eval.arg(&key.name);
    }
    let values: Vec<i64> = eval.query_async(&mut *connection).await.map_err(unavailable)?;
    Ok(values
        .chunks_exact(2)
        .map(|pair| {
            let count = u64::try_from(pair[0]).unwrap_or(0);
            // -1 (no expiry) cannot happen since the script sets one; -2 is a key that just expired.
            let left = Duration::from_millis(u64::try_from(pair[1]).unwrap_or(0));
            (count, left)
        })
        .collect())
}

/// In-process counts with the end of their windows.
#[derive(Default)]
struct Counts {
    entries: HashMap<String, Entry>,
    /// When `entries` grows past this, expired entries are pruned (amortized: it doubles with what is left).
    prune_at: usize,
}

struct Entry {
    count: u64,
    ends: Instant,
}

impl Counts {
    fn get(&self, key: &str, now: Instant) -> (u64, Duration) {
        match self.entries.get(key) {
            Some(entry) if entry.ends > now => (entry.count, entry.ends - now),
            _ => (0, Duration::ZERO),
        }
    }

    fn increment(&mut self, key: &str, now: Instant, window: Duration) {
        if let Some(entry) = self.entries.get_mut(key) {
            if entry.ends > now {
                entry.count += 1;
            } else {
                *entry = Entry {
                    count: 1,
                    ends: now + window,
                };
            }
            return;
        }
        if self.entries.len() >= self.prune_at.max(MIN_PRUNE_AT) {
            self.prune(now);
        }
        self.entries.insert(
            key.to_owned(),
            Entry {
                count: 1,
                ends: now + window,
            },
        );
    }

    fn remove(&mut self, key: &str) {
        self.entries.remove(key);
    }

    /// Drops expired entries; when the live ones still reach the cap, drops those whose windows end first, down to
    /// nine tenths of the cap so that the next pruning is thousands of failures away.
    fn prune(&mut self, now: Instant) {
        self.entries.retain(|_, entry| entry.ends > now);
        if self.entries.len() >= MAX_IN_PROCESS_KEYS {
            let excess = self.entries.len() - MAX_IN_PROCESS_KEYS * 9 / 10;
            let mut ends: Vec<Instant> = self.entries.values().map(|entry| entry.ends).collect();
            let (_, cutoff, _) = ends.select_nth_unstable(excess - 1);
            let cutoff = *cutoff;
            self.entries.retain(|_, entry| entry.ends > cutoff);
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
    fn pruning_keeps_the_counts_bounded() {
        let mut counts = Counts::default();
        let now = Instant::now();
        for i in 0..MAX_IN_PROCESS_KEYS + 10 {
            counts.increment(
                &format!("k{i}"),
                now + Duration::from_millis(i as u64),
                Duration::from_secs(60),
            );
        }
        assert!(
            counts.entries.len() <= MAX_IN_PROCESS_KEYS,
            "{} keys",
            counts.entries.len()
        );
        // The newest key survives the eviction.
        let newest = format!("k{}", MAX_IN_PROCESS_KEYS + 9);
        assert_eq!(counts.get(&newest, now).0, 1);
    }

    #[test]
    fn expired_counts_are_pruned() {
        let mut counts = Counts::default();
        let start = Instant::now();
        for i in 0..1500 {
            counts.increment(&format!("old{i}"), start, Duration::from_secs(1));
        }
        let later = start + Duration::from_secs(2);
        for i in 0..1000 {
            counts.increment(&format!("new{i}"), later, Duration::from_secs(1));
        }
        assert_eq!(counts.entries.len(), 1000, "expired keys left behind");
        assert!(counts.entries.keys().all(|k| k.starts_with("new")));
    }
}
