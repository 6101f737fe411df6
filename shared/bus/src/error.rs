use deadpool_redis::redis::RedisError;

/// Describes why a bus operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// Reports a topic, group or consumer name the bus does not accept.
    #[error(
        "invalid {field} {value:?}: expected 1 to 200 characters among ASCII letters, digits, '.', '_', '-', ':' \
         and '/', e.g. \"workflow.task-transitions\""
    )]
    InvalidName {
        /// Which name was rejected: `topic`, `group` or `consumer`.
        field: &'static str,
        /// The rejected name.
        value: String,
    },

    /// Reports that no Redis connection could be taken from the pool.
    #[error("no redis connection available: {0}")]
    Pool(#[from] deadpool_redis::PoolError),

    /// Reports a Redis command that failed.
    #[error("redis command failed: {0}")]
    Redis(#[from] RedisError),

    /// Reports a Redis reply or stream entry the bus cannot read, such as an entry without a payload field.
    #[error("unexpected reply to {command}: {detail}")]
    UnexpectedReply {
        /// The command whose reply was not understood.
        command: &'static str,
        /// What was wrong with it.
        detail: String,
    },
}

impl BusError {
    pub(crate) fn unexpected(command: &'static str, detail: impl Into<String>) -> Self {
        Self::UnexpectedReply {
            command,
            detail: detail.into(),
        }
    }
}
