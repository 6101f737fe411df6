//! The scheduler's tables: what each quota has reserved, and each workload's admission.

use sea_orm::{ConnectionTrait, Schema};
use sea_orm_migration::prelude::*;

/// Reserved amounts per quota scope (a project, or a user inside a project).
pub mod usage {
    use sea_orm::entity::prelude::*;

    /// A row of `quota_usage`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "quota_usage")]
    pub struct Model {
        /// `projects/{project}` or `projects/{project}/members/u-{username}`.
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

/// The scheduler's migrations.
#[derive(Debug)]
pub struct Migrator;

#[sea_orm_migration::async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(CreateTables)]
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
