//! The projects service's tables, as sea-orm entities, and the migration that creates them. Times are Unix
//! milliseconds; settings and quotas are JSON text, validated before they are written.

use sea_orm::{ConnectionTrait, Schema};
use sea_orm_migration::prelude::*;

/// Projects.
pub mod project {
    use sea_orm::entity::prelude::*;

    /// A row of `projects`.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "projects")]
    pub struct Model {
        /// The project id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// The display name.
        pub display_name: String,
        /// The description.
        #[sea_orm(column_type = "Text")]
        pub description: String,
        /// `org`, `template-category` or `model-group`.
        pub kind: String,
        /// The settings, JSON.
        #[sea_orm(column_type = "Text")]
        pub settings: String,
        /// The quota, JSON.
        #[sea_orm(column_type = "Text")]
        pub quota: String,
        /// Bumped by every change of the project or its members: the etag, and the lock of member changes.
        pub version: i64,
        /// Created, Unix ms.
        pub created_ms: i64,
        /// Last changed, Unix ms.
        pub updated_ms: i64,
        /// Deleted (softly), Unix ms.
        pub deleted_ms: Option<i64>,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Members of projects: users and LDAP groups with a role.
pub mod member {
    use sea_orm::entity::prelude::*;

    /// A row of `members`.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "members")]
    pub struct Model {
        /// The project id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub project: String,
        /// `u-<username>` or `g-<digest of the group DN>`.
        #[sea_orm(primary_key, auto_increment = false)]
        pub member_id: String,
        /// `user` or `group`.
        pub kind: String,
        /// The username or the group DN.
        pub subject: String,
        /// `owner`, `developer` or `viewer`.
        pub role: String,
        /// The member's quota, JSON.
        #[sea_orm(column_type = "Text")]
        pub quota: String,
        /// Added, Unix ms.
        pub created_ms: i64,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The projects service's migrations.
#[derive(Debug)]
pub struct Migrator;

#[sea_orm_migration::async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateTables),
            Box::new(NormalizeGroupDns),
            cube_kit::outbox::migration(),
        ]
    }
}

struct CreateTables;

impl MigrationName for CreateTables {
    fn name(&self) -> &str {
        "m20261123_000001_create_project_tables"
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
        db.execute(&schema.create_table_from_entity(project::Entity)).await?;
        db.execute(&schema.create_table_from_entity(member::Entity)).await?;
        // Finding a user's projects (ListProjects, GetMembership) goes through the subject.
        manager
            .create_index(
                Index::create()
                    .name("idx_members_subject")
                    .table(Alias::new("members"))
                    .col(Alias::new("kind"))
                    .col(Alias::new("subject"))
                    .col(Alias::new("project"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_projects_deleted")
                    .table(Alias::new("projects"))
                    .col(Alias::new("deleted_ms"))
                    .to_owned(),
            )
            .await
    }
}

/// Rewrites the DNs of group members written before they were normalised into the normal form of
/// [`cube_kit::dn`], so that `ListProjects` (which matches the caller's normalised groups in SQL) finds them.
///
/// Member ids are kept, so member names stay stable; two rows of one project that turn out to name the same group
/// both stay (the higher role counts, and an owner can delete either).
struct NormalizeGroupDns;

impl MigrationName for NormalizeGroupDns {
    fn name(&self) -> &str {
        "m20261201_000001_normalize_group_dns"
    }
}

#[expect(
    elided_lifetimes_in_paths,
    reason = "the trait declares `&SchemaManager` with a late-bound lifetime that `<'_>` would make early-bound"
)]
#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for NormalizeGroupDns {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        use sea_orm::{ActiveModelTrait as _, ColumnTrait as _, EntityTrait as _, IntoActiveModel as _};
        use sea_orm::{ActiveValue::Set, QueryFilter as _};

        let db = manager.get_connection();
        let groups = member::Entity::find()
            .filter(member::Column::Kind.eq("group"))
            .all(db)
            .await?;
        let mut rewritten = 0_usize;
        for row in groups {
            let normal = cube_kit::dn::normalize_lenient(&row.subject);
            if normal == row.subject {
                continue;
            }
            let mut active = row.into_active_model();
            active.subject = Set(normal);
            active.update(db).await?;
            rewritten += 1;
        }
        if rewritten > 0 {
            tracing::info!(rewritten, "normalised the DNs of group members");
        }
        Ok(())
    }
}
