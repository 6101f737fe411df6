//! The watcher's one store: the last published state of each object it watches (by uid), and the outbox and
//! leases tables. A change is stored and its transition enqueued in one transaction, fenced by the lease of the
//! cluster being watched, so a crash loses nothing and a deposed replica writes nothing.

use std::time::SystemTime;

use cube_kit::lease::{self, Epoch, LeaseError};
use cube_kit::outbox::{self, OutboxError};
use cube_proto::cube::watcher::v1::{ObjectKind, WorkloadTransition};
use cube_runtime::WorkloadStatus;
use cube_runtime::transition::{self, TOPIC};
use sea_orm::{
    ActiveValue::Set, ColumnTrait as _, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait as _, QueryFilter as _,
    Schema, TransactionTrait as _,
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

/// The watcher's migrations.
pub struct Migrator;

#[sea_orm_migration::async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(CreateObjectStates), outbox::migration(), lease::migration()]
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
}

/// The text a kind is stored as.
fn kind_text(kind: ObjectKind) -> &'static str {
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
pub(crate) struct Fence<'a> {
    pub(crate) lease: &'a str,
    pub(crate) epoch: Epoch,
}

/// Stores what object `uid` of `kind` now is (`None`: it is gone) and enqueues the transition when it differs
/// from the last one published; returns that transition.
pub(crate) async fn record(
    db: &DatabaseConnection,
    fence: Fence<'_>,
    kind: ObjectKind,
    uid: &str,
    now: Option<&WorkloadStatus>,
) -> Result<Option<WorkloadTransition>, StoreError> {
    let txn = db.begin().await?;
    lease::check(&txn, fence.lease, fence.epoch).await?;
    let row = object_state::Entity::find_by_id(uid.to_owned()).one(&txn).await?;
    let before = match &row {
        Some(row) => Some(serde_json::from_str::<WorkloadStatus>(&row.status)?),
        None => None,
    };
    let event = match (now, &before) {
        (Some(after), _) => transition::transition(kind, uid, before.as_ref(), after, SystemTime::now()),
        (None, Some(last)) => Some(transition::deleted(kind, uid, last, SystemTime::now())),
        (None, None) => None,
    };
    let Some(event) = event else {
        return Ok(None);
    };
    match now {
        Some(after) => {
            let status = serde_json::to_string(after)?;
            if row.is_some() {
                object_state::Entity::update_many()
                    .col_expr(object_state::Column::Status, Expr::value(status))
                    .filter(object_state::Column::Uid.eq(uid))
                    .exec(&txn)
                    .await?;
            } else {
                object_state::Entity::insert(object_state::ActiveModel {
                    uid: Set(uid.to_owned()),
                    cluster: Set(after.key.cluster.clone()),
                    kind: Set(kind_text(kind).to_owned()),
                    status: Set(status),
                })
                .exec_without_returning(&txn)
                .await?;
            }
        }
        None => {
            object_state::Entity::delete_by_id(uid.to_owned()).exec(&txn).await?;
        }
    }
    outbox::enqueue(&txn, TOPIC, &event).await?;
    txn.commit().await?;
    Ok(Some(event))
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
