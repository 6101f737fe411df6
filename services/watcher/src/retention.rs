//! Keeping the history within `--event-retention` (age) and `--event-retention-count`: every replica prunes
//! now and then; deleting what another replica already deleted does nothing.

use std::time::Duration;

use sea_orm::DatabaseConnection;

use crate::store;

/// How long events are kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Events older than this go.
    pub age: Duration,
    /// At most this many events are kept (the newest).
    pub count: u64,
}

/// How often the history is pruned.
const EVERY: Duration = Duration::from_secs(60);

/// Runs forever: prunes the history every minute.
pub(crate) async fn prune(db: DatabaseConnection, retention: Retention) {
    loop {
        match store::prune(&db, retention.age, retention.count).await {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, "pruned the event history"),
            Err(error) => tracing::warn!(%error, "pruning the event history"),
        }
        tokio::time::sleep(EVERY).await;
    }
}
