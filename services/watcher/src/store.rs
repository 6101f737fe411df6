//! The watcher's one store: the last published state of each object it watches (by uid), the history of events,
//! and the outbox and leases tables. A change is stored, recorded as an event and its transition enqueued in one
//! transaction, fenced by the lease of the cluster being watched, so a crash loses nothing and a deposed replica
//! writes nothing.
//!
//! Event ids come from one counter row that every recording transaction increments: the row stays locked until
//! the transaction ends, so events commit in the order of their ids, and a reader that has seen every event up to
//! an id can never later find a smaller one. That is what lets a stream resume from an id with no gap.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use cube_kit::time::{now_ms, timestamp_ms};

use cube_kit::lease::{self, Epoch, LeaseError};
use cube_kit::outbox::{self, OutboxError};
use cube_proto::cube::watcher::v1::{Event, ObjectKind, WorkloadState, WorkloadTransition};
use cube_runtime::WorkloadStatus;
use cube_runtime::transition::{self, TOPIC};
use prost::Message as _;
use sea_orm::{
    ActiveValue::Set, ColumnTrait as _, ConnectionTrait, DatabaseConnection, DbBackend, DbErr, EntityTrait as _,
    QueryFilter as _, QueryOrder as _, QuerySelect as _, Schema, TransactionTrait as _,
};
use sea_orm_migration::prelude::*;

/// The last published state of the objects watched.
pub mod object_state {
    use sea_orm::entity::prelude::*;

    /// A row of `object_states`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "object_states")]
    pub struct Model {
        /// The object's uid.
        #[sea_orm(primary_key, auto_increment = false)]
        pub uid: String,
        /// The cluster, as the registry names it.
        pub cluster: String,
        /// The kind (`pod`).
        pub kind: String,
        /// The last published status, JSON.
        #[sea_orm(column_type = "Text")]
        pub status: String,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The history: every transition recorded, by increasing id.
pub mod event {
    use sea_orm::entity::prelude::*;

    /// A row of `events`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "events")]
    pub struct Model {
        /// The event's id, from `event_sequence`: increasing in commit order.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i64,
        /// When it was recorded, Unix ms.
        pub time_ms: i64,
        /// The project, `projects/{project}`; empty for Nodes.
        pub project: String,
        /// The kind, as the filter names it (`POD`).
        pub kind: String,
        /// The cluster.
        pub cluster: String,
        /// The object's namespace.
        pub namespace: String,
        /// The object's name.
        pub name: String,
        /// The object's uid.
        pub uid: String,
        /// The state reached, as the filter names it (`RUNNING`).
        pub state: String,
        /// The reason, when one is told.
        pub reason: String,
        /// The transition, protobuf-encoded.
        pub transition: Vec<u8>,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Where each watch got to: the resourceVersion to resume a cluster's watch of a kind from.
pub mod watch_position {
    use sea_orm::entity::prelude::*;

    /// A row of `watch_positions`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "watch_positions")]
    pub struct Model {
        /// `{cluster}/{kind}`.
        #[sea_orm(primary_key, auto_increment = false)]
        pub watch: String,
        /// The resourceVersion of the last change handled.
        pub resource_version: String,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The one counter event ids are taken from.
pub mod event_sequence {
    use sea_orm::entity::prelude::*;

    /// The row of `event_sequence` (id 1).
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "event_sequence")]
    pub struct Model {
        /// Always 1.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i32,
        /// The last id given out (0: none yet).
        pub last: i64,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The watcher's migrations.
pub struct Migrator;

#[sea_orm_migration::async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateObjectStates),
            outbox::migration(),
            lease::migration(),
            Box::new(CreateEvents),
            Box::new(CreateWatchPositions),
        ]
    }
}

struct CreateObjectStates;

impl MigrationName for CreateObjectStates {
    fn name(&self) -> &str {
        "m20261204_000001_create_object_states"
    }
}

#[expect(
    elided_lifetimes_in_paths,
    reason = "the trait declares `&SchemaManager` with a late-bound lifetime that `<'_>` would make early-bound"
)]
#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateObjectStates {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let schema = Schema::new(manager.get_database_backend());
        manager
            .get_connection()
            .execute(&schema.create_table_from_entity(object_state::Entity))
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_object_states_cluster_kind")
                    .table(Alias::new("object_states"))
                    .col(Alias::new("cluster"))
                    .col(Alias::new("kind"))
                    .to_owned(),
            )
            .await
    }
}

struct CreateEvents;

impl MigrationName for CreateEvents {
    fn name(&self) -> &str {
        "m20261204_000002_create_events"
    }
}

#[expect(
    elided_lifetimes_in_paths,
    reason = "the trait declares `&SchemaManager` with a late-bound lifetime that `<'_>` would make early-bound"
)]
#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateEvents {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let mut transition = ColumnDef::new(event::Column::Transition);
        match manager.get_database_backend() {
            // MySQL's `blob` stops at 64 KiB; a node's labels and a long message fit a `mediumblob` easily.
            DbBackend::MySql => transition.custom(Alias::new("mediumblob")),
            _ => transition.blob(),
        };
        let text = |column: event::Column, length: u32| ColumnDef::new(column).string_len(length).not_null().to_owned();
        manager
            .create_table(
                Table::create()
                    .table(event::Entity)
                    .col(ColumnDef::new(event::Column::Id).big_integer().not_null().primary_key())
                    .col(ColumnDef::new(event::Column::TimeMs).big_integer().not_null())
                    .col(text(event::Column::Project, 200))
                    .col(text(event::Column::Kind, 20))
                    .col(text(event::Column::Cluster, 100))
                    .col(text(event::Column::Namespace, 100))
                    .col(text(event::Column::Name, 253))
                    .col(text(event::Column::Uid, 300))
                    .col(text(event::Column::State, 20))
                    .col(text(event::Column::Reason, 100))
                    .col(transition.not_null())
                    .to_owned(),
            )
            .await?;
        for (name, column) in [
            ("idx_events_project", event::Column::Project),
            ("idx_events_time", event::Column::TimeMs),
            ("idx_events_uid", event::Column::Uid),
        ] {
            manager
                .create_index(
                    Index::create()
                        .name(name)
                        .table(event::Entity)
                        .col(column)
                        .col(event::Column::Id)
                        .to_owned(),
                )
                .await?;
        }
        manager
            .create_table(
                Table::create()
                    .table(event_sequence::Entity)
                    .col(
                        ColumnDef::new(event_sequence::Column::Id)
                            .integer()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(event_sequence::Column::Last).big_integer().not_null())
                    .to_owned(),
            )
            .await?;
        event_sequence::Entity::insert(event_sequence::ActiveModel {
            id: Set(1),
            last: Set(0),
        })
        .exec_without_returning(manager.get_connection())
        .await?;
        Ok(())
    }
}

struct CreateWatchPositions;

impl MigrationName for CreateWatchPositions {
    fn name(&self) -> &str {
        "m20261204_000003_create_watch_positions"
    }
}

#[expect(
    elided_lifetimes_in_paths,
    reason = "the trait declares `&SchemaManager` with a late-bound lifetime that `<'_>` would make early-bound"
)]
#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateWatchPositions {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(watch_position::Entity)
                    .col(
                        ColumnDef::new(watch_position::Column::Watch)
                            .string_len(200)
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(watch_position::Column::ResourceVersion)
                            .string_len(100)
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await
    }
}

/// Why a change could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A statement failed.
    #[error("database: {0}")]
    Database(#[from] DbErr),
    /// The transition could not be enqueued.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// The lease guarding the cluster is no longer this replica's.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// A stored status could not be encoded.
    #[error("encoding a status: {0}")]
    Encoding(#[from] serde_json::Error),
    /// A stored event could not be decoded.
    #[error("decoding an event: {0}")]
    Decoding(#[from] prost::DecodeError),
}

/// The text a kind is stored as.
pub(crate) fn kind_text(kind: ObjectKind) -> &'static str {
    match kind {
        ObjectKind::Pod => "pod",
        ObjectKind::Deployment => "deployment",
        ObjectKind::Node => "node",
        ObjectKind::LocalProcess => "local-process",
        ObjectKind::Unspecified => "unspecified",
    }
}

/// Who may write: the lease of the cluster and the epoch this replica holds it at.
#[derive(Debug, Clone, Copy)]
pub struct Fence<'a> {
    /// The lease's name ([`crate::lease_name`]).
    pub lease: &'a str,
    /// The epoch this replica holds it at.
    pub epoch: Epoch,
}

/// What one object of a kind is now, as a watch read it.
#[derive(Debug, Clone)]
pub struct Change {
    /// The object's uid.
    pub uid: String,
    /// Its status; `None` when it is gone.
    pub status: Option<WorkloadStatus>,
}

/// How many objects one statement reads, writes or deletes.
const CHUNK: usize = 500;

/// Stores what the objects of `kind` in `changes` now are, in order, and, for each that differs from the last
/// state published (or from an earlier change in `changes`), records the event and enqueues its transition; all
/// in one transaction, with `position` when there was a transition. Returns the events recorded.
pub async fn record(
    db: &DatabaseConnection,
    fence: Fence<'_>,
    kind: ObjectKind,
    changes: &[Change],
    position: Option<&Position<'_>>,
) -> Result<Vec<Event>, StoreError> {
    let txn = db.begin().await?;
    lease::check(&txn, fence.lease, fence.epoch).await?;
    // uid → (whether a row is stored, the state now).
    let mut states: HashMap<String, (bool, Option<WorkloadStatus>)> = HashMap::new();
    let uids: Vec<&str> = changes.iter().map(|change| change.uid.as_str()).collect();
    for chunk in uids.chunks(CHUNK) {
        let rows = object_state::Entity::find()
            .filter(object_state::Column::Uid.is_in(chunk.iter().copied()))
            .all(&txn)
            .await?;
        for row in rows {
            let status = serde_json::from_str::<WorkloadStatus>(&row.status)?;
            states.insert(row.uid, (true, Some(status)));
        }
    }
    let time = SystemTime::now();
    let mut transitions = Vec::new();
    // The objects with a transition, in order, and the same as a set.
    let mut changed: Vec<&str> = Vec::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for change in changes {
        let (_, before) = states.entry(change.uid.clone()).or_insert((false, None));
        let event = match (&change.status, &*before) {
            (Some(after), _) => transition::transition(kind, &change.uid, before.as_ref(), after, time),
            (None, Some(last)) => Some(transition::deleted(kind, &change.uid, last, time)),
            (None, None) => None,
        };
        if let Some(event) = event {
            transitions.push(event);
            before.clone_from(&change.status);
            if seen.insert(&change.uid) {
                changed.push(&change.uid);
            }
        }
    }
    if transitions.is_empty() {
        return Ok(Vec::new());
    }
    // The objects' states now: written with one statement per chunk, deleted ones removed with one.
    let mut written = Vec::new();
    let mut removed = Vec::new();
    for uid in changed {
        match states.get(uid) {
            Some((_, Some(now))) => written.push(object_state::ActiveModel {
                uid: Set(uid.to_owned()),
                cluster: Set(now.key.cluster.clone()),
                kind: Set(kind_text(kind).to_owned()),
                status: Set(serde_json::to_string(now)?),
            }),
            Some((true, None)) => removed.push(uid.to_owned()),
            Some((false, None)) | None => {}
        }
    }
    for chunk in written.chunks(CHUNK) {
        object_state::Entity::insert_many(chunk.iter().cloned())
            .on_conflict(
                sea_orm::sea_query::OnConflict::column(object_state::Column::Uid)
                    .update_column(object_state::Column::Status)
                    .to_owned(),
            )
            .exec_without_returning(&txn)
            .await?;
    }
    for chunk in removed.chunks(CHUNK) {
        object_state::Entity::delete_many()
            .filter(object_state::Column::Uid.is_in(chunk.iter().cloned()))
            .exec(&txn)
            .await?;
    }
    outbox::enqueue_all(&txn, TOPIC, &transitions).await?;
    if let Some(position) = position {
        save_position(&txn, position).await?;
    }
    // Last, so that the counter row is held for as short a time as possible.
    let recorded = insert_events(&txn, kind, transitions).await?;
    txn.commit().await?;
    Ok(recorded)
}

/// Where a cluster's watch of a kind got to.
#[derive(Debug, Clone, Copy)]
pub struct Position<'a> {
    /// The cluster.
    pub cluster: &'a str,
    /// The kind watched.
    pub kind: ObjectKind,
    /// The resourceVersion of the last change handled.
    pub resource_version: &'a str,
}

fn watch_key(cluster: &str, kind: ObjectKind) -> String {
    format!("{cluster}/{}", kind_text(kind))
}

/// Remembers where a watch got to.
pub async fn save_position(db: &impl ConnectionTrait, position: &Position<'_>) -> Result<(), StoreError> {
    watch_position::Entity::insert(watch_position::ActiveModel {
        watch: Set(watch_key(position.cluster, position.kind)),
        resource_version: Set(position.resource_version.to_owned()),
    })
    .on_conflict(
        sea_orm::sea_query::OnConflict::column(watch_position::Column::Watch)
            .update_column(watch_position::Column::ResourceVersion)
            .to_owned(),
    )
    .exec_without_returning(db)
    .await?;
    Ok(())
}

/// Where the watch of `kind` on `cluster` got to, when it was remembered.
pub async fn position(
    db: &impl ConnectionTrait,
    cluster: &str,
    kind: ObjectKind,
) -> Result<Option<String>, StoreError> {
    Ok(watch_position::Entity::find_by_id(watch_key(cluster, kind))
        .one(db)
        .await?
        .map(|row| row.resource_version))
}

/// The text a state is stored and filtered as (`RUNNING`).
pub(crate) fn state_text(state: WorkloadState) -> &'static str {
    match state {
        WorkloadState::Pending => "PENDING",
        WorkloadState::Running => "RUNNING",
        WorkloadState::Succeeded => "SUCCEEDED",
        WorkloadState::Failed => "FAILED",
        WorkloadState::Unknown => "UNKNOWN",
        WorkloadState::Deleted => "DELETED",
        WorkloadState::Unspecified => "UNSPECIFIED",
    }
}

/// The text a kind is filtered as (`POD`).
pub(crate) fn kind_filter_text(kind: ObjectKind) -> &'static str {
    match kind {
        ObjectKind::Pod => "POD",
        ObjectKind::Deployment => "DEPLOYMENT",
        ObjectKind::Node => "NODE",
        ObjectKind::LocalProcess => "LOCAL_PROCESS",
        ObjectKind::Unspecified => "UNSPECIFIED",
    }
}

/// Takes the next event ids and stores `transitions` under them, in order, in the caller's transaction.
async fn insert_events(
    txn: &impl ConnectionTrait,
    kind: ObjectKind,
    transitions: Vec<WorkloadTransition>,
) -> Result<Vec<Event>, StoreError> {
    let count = <i64 as TryFrom<usize>>::try_from(transitions.len()).unwrap_or(i64::MAX);
    event_sequence::Entity::update_many()
        .col_expr(
            event_sequence::Column::Last,
            Expr::col(event_sequence::Column::Last).add(count),
        )
        .filter(event_sequence::Column::Id.eq(1))
        .exec(txn)
        .await?;
    let first = last_event_id(txn).await? - count + 1;
    let rows = transitions.iter().zip(first..).map(|(transition, id)| {
        let time_ms = transition.time.as_ref().map_or_else(now_ms, timestamp_ms);
        event::ActiveModel {
            id: Set(id),
            time_ms: Set(time_ms),
            project: Set(transition.project.clone()),
            kind: Set(kind_filter_text(kind).to_owned()),
            cluster: Set(transition.cluster.clone()),
            namespace: Set(transition.namespace.clone()),
            name: Set(transition.name.clone()),
            uid: Set(transition.uid.clone()),
            state: Set(state_text(transition.to_state()).to_owned()),
            reason: Set(transition.reason.clone()),
            transition: Set(transition.encode_to_vec()),
        }
    });
    event::Entity::insert_many(rows).exec_without_returning(txn).await?;
    Ok(transitions
        .into_iter()
        .zip(first..)
        .map(|(transition, id)| Event {
            name: event_name(id),
            transition: Some(transition),
        })
        .collect())
}

/// The resource name of event `id`.
pub fn event_name(id: i64) -> String {
    format!("events/{id}")
}

/// The last event id given out (0 before the first).
pub(crate) async fn last_event_id(db: &impl ConnectionTrait) -> Result<i64, StoreError> {
    Ok(event_sequence::Entity::find_by_id(1)
        .one(db)
        .await?
        .map_or(0, |row| row.last))
}

/// The smallest event id still kept, when any is.
pub(crate) async fn first_event_id(db: &impl ConnectionTrait) -> Result<Option<i64>, StoreError> {
    Ok(event::Entity::find()
        .order_by_asc(event::Column::Id)
        .limit(1)
        .one(db)
        .await?
        .map(|row| row.id))
}

/// What events a reader asks for and may see.
#[derive(Debug, Clone, Default)]
pub(crate) struct EventQuery {
    /// `None`: every project (and Nodes); otherwise only events of these projects (`projects/{p}`).
    pub(crate) visible: Option<Vec<String>>,
    /// Column conditions, each `column = value`.
    pub(crate) equal: Vec<(event::Column, String)>,
    /// Recorded at or after, Unix ms.
    pub(crate) after_ms: Option<i64>,
    /// Recorded before, Unix ms.
    pub(crate) before_ms: Option<i64>,
}

/// The events matching `query` with ids above `after`, oldest first, at most `limit`, with their ids.
pub(crate) async fn events(
    db: &impl ConnectionTrait,
    query: &EventQuery,
    after: i64,
    limit: u64,
) -> Result<Vec<(i64, Event)>, StoreError> {
    let mut select = event::Entity::find().filter(event::Column::Id.gt(after));
    if let Some(visible) = &query.visible {
        select = select.filter(event::Column::Project.is_in(visible.iter().cloned()));
    }
    for (column, value) in &query.equal {
        select = select.filter(column.eq(value.clone()));
    }
    if let Some(after_ms) = query.after_ms {
        select = select.filter(event::Column::TimeMs.gte(after_ms));
    }
    if let Some(before_ms) = query.before_ms {
        select = select.filter(event::Column::TimeMs.lt(before_ms));
    }
    let rows = select.order_by_asc(event::Column::Id).limit(limit).all(db).await?;
    rows.into_iter()
        .map(|row| {
            let event = Event {
                name: event_name(row.id),
                transition: Some(WorkloadTransition::decode(row.transition.as_slice())?),
            };
            Ok((row.id, event))
        })
        .collect()
}

/// Deletes the events older than `age` and all but the newest `count`; returns how many went.
pub(crate) async fn prune(db: &impl ConnectionTrait, age: Duration, count: u64) -> Result<u64, StoreError> {
    let oldest_kept = now_ms().saturating_sub(<i64 as TryFrom<u128>>::try_from(age.as_millis()).unwrap_or(i64::MAX));
    let by_age = event::Entity::delete_many()
        .filter(event::Column::TimeMs.lt(oldest_kept))
        .exec(db)
        .await?
        .rows_affected;
    // Ids are given out one by one, so the newest `count` are those above `last - count`.
    let last = last_event_id(db).await?;
    let by_count = event::Entity::delete_many()
        .filter(event::Column::Id.lte(last.saturating_sub(<i64 as TryFrom<u64>>::try_from(count).unwrap_or(i64::MAX))))
        .exec(db)
        .await?
        .rows_affected;
    Ok(by_age + by_count)
}

/// The uids of the objects of `kind` on `cluster` whose state is stored.
pub(crate) async fn known(
    db: &impl ConnectionTrait,
    cluster: &str,
    kind: ObjectKind,
) -> Result<Vec<String>, StoreError> {
    Ok(object_state::Entity::find()
        .filter(object_state::Column::Cluster.eq(cluster))
        .filter(object_state::Column::Kind.eq(kind_text(kind)))
        .all(db)
        .await?
        .into_iter()
        .map(|row| row.uid)
        .collect())
}
