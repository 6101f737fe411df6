//! The Redis connection pool services share for the event bus and caches.

use deadpool_redis::{Config, Pool, Runtime};

/// Why a Redis pool could not be created.
#[derive(Debug, thiserror::Error)]
#[error("invalid Redis URL {url:?} (expected redis://HOST:PORT/DB): {source}")]
pub struct RedisError {
    /// The URL as given, its password redacted.
    url: String,
    source: deadpool_redis::CreatePoolError,
}

/// Creates a pool of connections to the Redis at `url`; connections open on first use.
///
/// # Errors
/// Returns an error when the URL is not a Redis URL.
pub fn pool(url: &str) -> Result<Pool, RedisError> {
    Config::from_url(url)
        .create_pool(Some(Runtime::Tokio1))
        .map_err(|source| RedisError {
            url: crate::db::redact(url),
            source,
        })
}

/// Returns the event bus a service publishes on: Redis Streams (under the flags' namespace) when a Redis URL is
/// set, otherwise an in-process bus (events then reach only this process).
///
/// # Errors
/// Returns an error when the URL is not a Redis URL.
pub fn bus(args: &crate::config::RedisArgs) -> Result<std::sync::Arc<dyn cube_bus::EventBus>, RedisError> {
    Ok(match &args.redis_url {
        Some(url) => std::sync::Arc::new(cube_bus::RedisBus::new(
            pool(url)?,
            cube_bus::BusOptions {
                namespace: args.redis_namespace.clone(),
                ..cube_bus::BusOptions::default()
            },
        )),
        None => std::sync::Arc::new(cube_bus::MemoryBus::new(cube_bus::BusOptions::default())),
    })
}
