//! The scheduler's tables: what each quota has reserved, each workload's admission, and the balancer's moves.

use sea_orm::{ConnectionTrait, Schema};
use sea_orm_migration::prelude::*;

/// Reserved amounts per quota scope (a project, or a user inside a project).
pub mod usage {
    use sea_orm::entity::prelude::*;

    /// A row of `quota_usage`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "quota_usage")]
    pub struct Model {
        /// `projects/{project}` or `projects/{project}/members/u-{username}`; with `#gpu-type={TYPE}` appended,
        /// what the scope's workloads using GPUs of that type reserve (only its GPUs are limited).
        #[sea_orm(primary_key, auto_increment = false)]
        pub scope: String,
        /// Reserved CPU, millicores.
        pub cpu_millis: i64,
        /// Reserved memory, bytes.
        pub memory_bytes: i64,
        /// Reserved GPUs, thousandths.
        pub gpu_millis: i64,
        /// Admitted notebooks.
        pub notebooks: i64,
        /// Admitted services.
        pub services: i64,
        /// Admitted runs.
        pub runs: i64,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Workloads' admissions.
pub mod reservation {
    use sea_orm::entity::prelude::*;

    /// A row of `reservations`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "reservations")]
    pub struct Model {
        /// The workload's resource name.
        #[sea_orm(primary_key, auto_increment = false)]
        pub workload: String,
        /// The project id.
        pub project: String,
        /// The user who asked.
        pub username: String,
        /// `train`, `notebook` or `service`.
        pub kind: String,
        /// Reserved CPU, millicores.
        pub cpu_millis: i64,
        /// Reserved memory, bytes.
        pub memory_bytes: i64,
        /// Reserved GPUs, thousandths.
        pub gpu_millis: i64,
        /// The GPU type the GPUs count against (`T4`); empty when the GPU string names none.
        pub gpu_type: String,
        /// `admitted` or `queued`.
        pub state: String,
        /// Why it is queued.
        #[sea_orm(column_type = "Text")]
        pub reason: String,
        /// The blockers, JSON.
        #[sea_orm(column_type = "Text")]
        pub blockers: String,
        /// Admitted or queued, Unix ms.
        pub created_ms: i64,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Nodes the balancer moved between resource groups.
pub mod node_move {
    use sea_orm::entity::prelude::*;

    /// A row of `node_moves`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "node_moves")]
    pub struct Model {
        /// The move's id (a UUID v7, so ids sort by time).
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// The cluster.
        pub cluster: String,
        /// The node.
        pub node: String,
        /// `cpu` or `gpu`.
        pub class: String,
        /// The group it left.
        pub from_group: String,
        /// The group it joined.
        pub to_group: String,
        /// Why, for people.
        #[sea_orm(column_type = "Text")]
        pub reason: String,
        /// The replica that made it.
        pub replica: String,
        /// When, Unix ms.
        pub created_ms: i64,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The scheduler's migrations.
#[derive(Debug)]
pub struct Migrator;

#[sea_orm_migration::async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(CreateTables), Box::new(CreateMoves), Box::new(AddGpuType)]
    }
}

struct CreateTables;

impl MigrationName for CreateTables {
    fn name(&self) -> &str {
        "m20261123_000001_create_admission_tables"
    }
}

#[expect(
    elided_lifetimes_in_paths,
    reason = "the trait declares `&SchemaManager` with a late-bound lifetime that `<'_>` would make early-bound"
)]
#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateTables {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let schema = Schema::new(manager.get_database_backend());
        let db = manager.get_connection();
        db.execute(&schema.create_table_from_entity(usage::Entity)).await?;
        db.execute(&schema.create_table_from_entity(reservation::Entity))
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_reservations_project")
                    .table(Alias::new("reservations"))
                    .col(Alias::new("project"))
                    .to_owned(),
            )
            .await
    }
}

struct CreateMoves;

impl MigrationName for CreateMoves {
    fn name(&self) -> &str {
        "m20261123_000002_create_node_moves"
    }
}

#[expect(
    elided_lifetimes_in_paths,
    reason = "the trait declares `&SchemaManager` with a late-bound lifetime that `<'_>` would make early-bound"
)]
#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateMoves {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let schema = Schema::new(manager.get_database_backend());
        manager
            .get_connection()
            .execute(&schema.create_table_from_entity(node_move::Entity))
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_node_moves_cluster")
                    .table(Alias::new("node_moves"))
                    .col(Alias::new("cluster"))
                    .col(Alias::new("created_ms"))
                    .to_owned(),
            )
            .await
    }
}

struct AddGpuType;

impl MigrationName for AddGpuType {
    fn name(&self) -> &str {
        "m20261124_000003_reservation_gpu_type"
    }
}

#[expect(
    elided_lifetimes_in_paths,
    reason = "the trait declares `&SchemaManager` with a late-bound lifetime that `<'_>` would make early-bound"
)]
#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for AddGpuType {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // The first migration creates `reservations` from the entity as it is now, so on a new database the
        // column is already there; reservations made before GPU types counted hold none.
        if manager.has_column("reservations", "gpu_type").await? {
            return Ok(());
        }
        manager
            .alter_table(
                Table::alter()
                    .table(Alias::new("reservations"))
                    .add_column(
                        ColumnDef::new(Alias::new("gpu_type"))
                            .string_len(63)
                            .not_null()
                            .default(""),
                    )
                    .to_owned(),
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use sea_orm::{ConnectionTrait as _, EntityTrait as _, IntoActiveModel as _};
    use sea_orm_migration::MigratorTrait as _;

    use super::*;

    /// A private in-memory database on one connection that stays open, as `cube up` opens it.
    async fn memory() -> sea_orm::DatabaseConnection {
        cube_kit::db::connect::<Migrator>("sqlite::memory:", false)
            .await
            .unwrap_or_else(|error| panic!("an in-memory database: {error}"))
    }

    #[tokio::test]
    async fn the_gpu_type_column_is_added_to_reservations_made_before_it() -> Result<(), DbErr> {
        let db = memory().await;
        Migrator::up(&db, Some(2)).await?;
        // The first migration creates the table as the entity is now; take the column away as it was then.
        db.execute_unprepared("ALTER TABLE reservations DROP COLUMN gpu_type")
            .await?;
        Migrator::up(&db, None).await?;
        let row = reservation::Model {
            workload: "projects/p/runs/r".into(),
            project: "p".into(),
            username: "lena".into(),
            kind: "train".into(),
            cpu_millis: 1000,
            memory_bytes: 0,
            gpu_millis: 1000,
            gpu_type: "T4".into(),
            state: "admitted".into(),
            reason: String::new(),
            blockers: "[]".into(),
            created_ms: 0,
        };
        reservation::Entity::insert(row.clone().into_active_model())
            .exec_without_returning(&db)
            .await?;
        let read = reservation::Entity::find_by_id(row.workload.clone()).one(&db).await?;
        assert_eq!(read, Some(row));
        // On a new database the column is there from the start, and the migration changes nothing.
        let fresh = memory().await;
        Migrator::up(&fresh, None).await?;
        assert!(
            SchemaManager::new(&fresh)
                .has_column("reservations", "gpu_type")
                .await?
        );
        Ok(())
    }
}
