//! The transactional outbox: a service writes the event that announces a change in the same database transaction
//! as the change ([`enqueue`]), and a relay ([`relay`]) publishes committed events on the bus afterwards, so an
//! event is published if and only if its change committed.
//!
//! Every event gets a stable id when it is enqueued (a UUIDv7, kept in its row), which the bus carries as the
//! delivery's [`cube_bus::Delivery::key`]. The relay deletes a row only after the bus has stored the event, so a
//! crash between the two publishes the event again under the same id; several replicas relaying one database may
//! also publish a row twice. Delivery is therefore at least once, and consumers deduplicate on the id.
//!
//! The table, `outbox_events`, comes with the migration [`migration`], which each service adds to its own
//! migrator.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cube_bus::{BusError, EventBus};
use sea_orm::sea_query::{ColumnDef, Index, Table};
use sea_orm::{
    ActiveValue::Set, ColumnTrait as _, ConnectionTrait, DatabaseConnection, DbBackend, DbErr, EntityTrait as _,
    QueryFilter as _, QueryOrder as _, QuerySelect as _,
};
use sea_orm_migration::{MigrationName, MigrationTrait, SchemaManager};
use tokio::sync::Notify;
use uuid::Uuid;

/// The name of the outbox table.
pub const TABLE: &str = "outbox_events";

/// The outbox table as a sea-orm entity; only this module reads and writes it.
mod row {
    use sea_orm::entity::prelude::*;

    /// A row of `outbox_events`: one event waiting to be published.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "outbox_events")]
    pub(super) struct Model {
        /// Increasing id: the publication order.
        #[sea_orm(primary_key)]
        pub(super) id: i64,
        /// The event's stable id, a UUIDv7 in hyphenated form, carried by every publication of the event.
        pub(super) event_id: String,
        /// The bus topic.
        pub(super) topic: String,
        /// The encoded event.
        pub(super) payload: Vec<u8>,
        /// Enqueued, Unix ms.
        pub(super) created_ms: i64,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(super) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Describes why the outbox could not write or publish events.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// Reports a failed statement on the outbox table.
    #[error("outbox database statement failed: {0}")]
    Database(#[from] DbErr),
    /// Reports that the bus did not store an event; the event stays in the outbox and is published later.
    #[error("publishing an outbox event: {0}")]
    Bus(#[from] BusError),
}

/// Writes `event`, encoded, into the outbox on `db` (the caller's transaction), to be published on `topic` once
/// that transaction commits; returns the event's id, which consumers see as the delivery's key.
///
/// # Errors
/// Returns [`OutboxError::Database`] when the row cannot be written; the caller's transaction should then roll
/// back.
pub async fn enqueue(db: &impl ConnectionTrait, topic: &str, event: &impl prost::Message) -> Result<Uuid, OutboxError> {
    enqueue_encoded(db, topic, event.encode_to_vec()).await
}

/// Writes an already encoded event into the outbox on `db`, like [`enqueue`].
///
/// # Errors
/// Returns [`OutboxError::Database`] when the row cannot be written.
pub async fn enqueue_encoded(db: &impl ConnectionTrait, topic: &str, payload: Vec<u8>) -> Result<Uuid, OutboxError> {
    let (event_id, row) = new_row(topic, payload, now_ms());
    row::Entity::insert(row).exec_without_returning(db).await?;
    Ok(event_id)
}

/// Writes `events`, encoded and in order, into the outbox on `db` (the caller's transaction) with one statement
/// per 500 events, like [`enqueue`] for each; returns their ids in the same order.
///
/// # Errors
/// Returns [`OutboxError::Database`] when the rows cannot be written; the caller's transaction should then roll
/// back.
pub async fn enqueue_all<M: prost::Message>(
    db: &impl ConnectionTrait,
    topic: &str,
    events: &[M],
) -> Result<Vec<Uuid>, OutboxError> {
    const ROWS_PER_STATEMENT: usize = 500;
    let created_ms = now_ms();
    let mut ids = Vec::with_capacity(events.len());
    for chunk in events.chunks(ROWS_PER_STATEMENT) {
        let (chunk_ids, rows): (Vec<Uuid>, Vec<row::ActiveModel>) = chunk
            .iter()
            .map(|event| new_row(topic, event.encode_to_vec(), created_ms))
            .unzip();
        row::Entity::insert_many(rows).exec_without_returning(db).await?;
        ids.extend(chunk_ids);
    }
    Ok(ids)
}

/// A new outbox row for `payload` on `topic`, under a new event id.
fn new_row(topic: &str, payload: Vec<u8>, created_ms: i64) -> (Uuid, row::ActiveModel) {
    let event_id = Uuid::now_v7();
    let row = row::ActiveModel {
        event_id: Set(event_id.hyphenated().to_string()),
        topic: Set(topic.to_owned()),
        payload: Set(payload),
        created_ms: Set(created_ms),
        ..Default::default()
    };
    (event_id, row)
}

/// Publishes up to `limit` committed events from the outbox on `db`, oldest first, each keyed by its id, then
/// deletes the rows of those the bus stored (in one statement); returns how many were published.
///
/// # Errors
/// Returns the first failure; the events published before it are deleted, the others stay for the next call.
pub async fn publish_pending(db: &impl ConnectionTrait, bus: &dyn EventBus, limit: u64) -> Result<usize, OutboxError> {
    let batch = row::Entity::find()
        .order_by_asc(row::Column::Id)
        .limit(limit)
        .all(db)
        .await?;
    let mut published = Vec::with_capacity(batch.len());
    let mut failure = None;
    for event in &batch {
        match bus
            .append(&event.topic, Some(&event.event_id), event.payload.clone().into())
            .await
        {
            Ok(_) => published.push(event.id),
            Err(error) => {
                failure = Some(error);
                break;
            }
        }
    }
    if !published.is_empty() {
        row::Entity::delete_many()
            .filter(row::Column::Id.is_in(published.iter().copied()))
            .exec(db)
            .await?;
    }
    match failure {
        Some(error) => Err(error.into()),
        None => Ok(published.len()),
    }
}

/// Configures [`relay`].
#[derive(Clone, Debug)]
pub struct RelayOptions {
    /// How often the relay looks at the outbox without being woken: it covers a missed wake-up, rows written by
    /// another replica, and rows left by a crash.
    pub poll_interval: Duration,
    /// The largest number of events published per database read.
    pub batch_size: u64,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(1),
            batch_size: 500,
        }
    }
}

/// Publishes the outbox on `db` to `bus` forever: woken by `wake` (notify it with [`Notify::notify_one`] after
/// each commit that enqueued events), and every [`RelayOptions::poll_interval`] in any case.
///
/// Failures are logged and retried at the next poll; run it as background work
/// ([`crate::task::Background::spawn`]).
pub async fn relay(db: DatabaseConnection, bus: Arc<dyn EventBus>, wake: Arc<Notify>, options: RelayOptions) {
    let batch_size = options.batch_size.max(1);
    loop {
        match publish_pending(&db, bus.as_ref(), batch_size).await {
            Ok(published) if u64::try_from(published).is_ok_and(|published| published == batch_size) => continue,
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "publishing the outbox"),
        }
        // A wake-up that came while publishing left a permit, so this returns at once and nothing waits a poll.
        let _ = tokio::time::timeout(options.poll_interval, wake.notified()).await;
    }
}

/// Returns the migration that creates the outbox table, for a service's own migrator; it runs on SQLite,
/// PostgreSQL and MySQL/MariaDB.
pub fn migration() -> Box<dyn MigrationTrait> {
    Box::new(CreateOutbox)
}

/// Creates `outbox_events`.
struct CreateOutbox;

impl MigrationName for CreateOutbox {
    fn name(&self) -> &str {
        "m20261203_900001_cube_kit_outbox"
    }
}

#[expect(
    elided_lifetimes_in_paths,
    reason = "the trait declares `&SchemaManager` with a late-bound lifetime that `<'_>` would make early-bound"
)]
#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateOutbox {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let mut payload = ColumnDef::new(row::Column::Payload);
        match manager.get_database_backend() {
            // MySQL's `blob` stops at 64 KiB; a `mediumblob` holds 16 MiB, more than any event.
            DbBackend::MySql => payload.custom(sea_orm::sea_query::Alias::new("mediumblob")),
            _ => payload.blob(),
        };
        manager
            .create_table(
                Table::create()
                    .table(row::Entity)
                    .col(
                        ColumnDef::new(row::Column::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(row::Column::EventId).string_len(36).not_null())
                    .col(ColumnDef::new(row::Column::Topic).string_len(200).not_null())
                    .col(payload.not_null())
                    .col(ColumnDef::new(row::Column::CreatedMs).big_integer().not_null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_outbox_events_event_id")
                    .table(row::Entity)
                    .col(row::Column::EventId)
                    .unique()
                    .to_owned(),
            )
            .await
    }
}

fn now_ms() -> i64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}
