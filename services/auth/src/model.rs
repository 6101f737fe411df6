//! Auth's tables, as sea-orm entities, and the migrations that create them. Times are Unix milliseconds in
//! `BIGINT` columns, which read the same on SQLite, PostgreSQL and MariaDB.

use sea_orm::{ConnectionTrait, Schema};
use sea_orm_migration::prelude::*;

/// Users.
pub mod user {
    use sea_orm::entity::prelude::*;

    /// A row of `users`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "users")]
    pub struct Model {
        /// The username.
        #[sea_orm(primary_key, auto_increment = false)]
        pub username: String,
        /// The email address.
        pub email: String,
        /// The display name.
        pub display_name: String,
        /// Whether the user may log in.
        pub active: bool,
        /// `local` or `ldap`.
        pub source: String,
        /// The Argon2id PHC string; `None` for LDAP users.
        #[sea_orm(column_type = "Text", nullable)]
        pub password_hash: Option<String>,
        /// The LDAP group DNs read at the last login, as a JSON array.
        #[sea_orm(column_type = "Text")]
        pub groups: String,
        /// Created, Unix ms.
        pub created_ms: i64,
        /// Last changed, Unix ms.
        pub updated_ms: i64,
        /// Last login, Unix ms.
        pub last_login_ms: Option<i64>,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Custom and built-in roles.
pub mod role {
    use sea_orm::entity::prelude::*;

    /// A row of `roles`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "roles")]
    pub struct Model {
        /// The role id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// The title.
        pub title: String,
        /// The description.
        #[sea_orm(column_type = "Text")]
        pub description: String,
        /// The permissions, a JSON array of `[resource_type, verb]`.
        #[sea_orm(column_type = "Text")]
        pub permissions: String,
        /// Built-in roles cannot change.
        pub builtin: bool,
        /// Created, Unix ms.
        pub created_ms: i64,
        /// Last changed, Unix ms.
        pub updated_ms: i64,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Role bindings to users and LDAP groups.
pub mod role_binding {
    use sea_orm::entity::prelude::*;

    /// A row of `role_bindings`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "role_bindings")]
    pub struct Model {
        /// The binding id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// The role id.
        pub role: String,
        /// `user` or `group`.
        pub subject_kind: String,
        /// The username or the group DN.
        pub subject: String,
        /// Created, Unix ms.
        pub created_ms: i64,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// API tokens (hashes only).
pub mod api_token {
    use sea_orm::entity::prelude::*;

    /// A row of `api_tokens`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "api_tokens")]
    pub struct Model {
        /// The token id (also in the secret's prefix).
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// The owner.
        pub username: String,
        /// What the token is for.
        pub display_name: String,
        /// SHA-256 of the whole secret, hex.
        pub secret_hash: String,
        /// The scopes, a JSON array of `[resource_type, verb]`.
        #[sea_orm(column_type = "Text")]
        pub scopes: String,
        /// Expires, Unix ms.
        pub expire_ms: Option<i64>,
        /// Created, Unix ms.
        pub created_ms: i64,
        /// Revoked, Unix ms.
        pub revoked_ms: Option<i64>,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Login sessions: one per login, shared by the chain of refresh tokens rotated from it.
pub mod session {
    use sea_orm::entity::prelude::*;

    /// A row of `sessions`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sessions")]
    pub struct Model {
        /// The session id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// The user.
        pub username: String,
        /// Created, Unix ms.
        pub created_ms: i64,
        /// Expires, Unix ms.
        pub expire_ms: i64,
        /// Revoked, Unix ms.
        pub revoked_ms: Option<i64>,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Refresh tokens (hashes only), each usable once.
pub mod refresh_token {
    use sea_orm::entity::prelude::*;

    /// A row of `refresh_tokens`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "refresh_tokens")]
    pub struct Model {
        /// SHA-256 of the token, hex.
        #[sea_orm(primary_key, auto_increment = false)]
        pub hash: String,
        /// The session it belongs to.
        pub session_id: String,
        /// Created, Unix ms.
        pub created_ms: i64,
        /// Traded for a new one, Unix ms.
        pub used_ms: Option<i64>,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The Ed25519 keys that sign access tokens.
pub mod signing_key {
    use sea_orm::entity::prelude::*;

    /// A row of `signing_keys`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "signing_keys")]
    pub struct Model {
        /// The key id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub kid: String,
        /// The PKCS#8 document, base64.
        #[sea_orm(column_type = "Text")]
        pub pkcs8: String,
        /// Created, Unix ms; the newest key signs.
        pub created_ms: i64,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The audit log.
pub mod audit_event {
    use sea_orm::entity::prelude::*;

    /// A row of `audit_events`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "audit_events")]
    pub struct Model {
        /// Increasing id.
        #[sea_orm(primary_key)]
        pub id: i64,
        /// When, Unix ms.
        pub time_ms: i64,
        /// Who, `users/{username}`.
        pub actor: String,
        /// What.
        pub action: String,
        /// To what.
        pub target: String,
        /// Whether it succeeded.
        pub success: bool,
        /// From where.
        pub client_address: String,
        /// Why it failed, or other detail.
        #[sea_orm(column_type = "Text")]
        pub detail: String,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Service accounts: the identities Cube's services act as when no user is calling.
pub mod service_account {
    use sea_orm::entity::prelude::*;

    /// A row of `service_accounts`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "service_accounts")]
    pub struct Model {
        /// The account id, the last part of `serviceAccounts/{id}`.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// What the account is for.
        pub display_name: String,
        /// The token's id (also in the token's prefix); unique.
        #[sea_orm(unique)]
        pub token_id: String,
        /// SHA-256 of the whole token, hex.
        pub token_hash: String,
        /// Created, Unix ms.
        pub created_ms: i64,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Revocations in force, which every service's verifier loads before it answers after a start.
pub mod revocation {
    use sea_orm::entity::prelude::*;

    /// A row of `revocations`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "revocations")]
    pub struct Model {
        /// Increasing id.
        #[sea_orm(primary_key)]
        pub id: i64,
        /// What is revoked: `session`, `api_token`, `user` or `user_access_tokens`.
        pub subject: String,
        /// The lowercase hex SHA-256 of the session id, API token name or username.
        pub subject_sha256: String,
        /// Credentials issued at or before this Unix second are refused (`i64::MAX`: whenever issued).
        pub issued_until: i64,
        /// When the row may be deleted, Unix seconds.
        pub forget_after: i64,
    }

    /// No relations are navigated.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Auth's migrations.
#[derive(Debug)]
pub struct Migrator;

#[sea_orm_migration::async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(CreateTables),
            Box::new(CreateRevocations),
            cube_kit::outbox::migration(),
            Box::new(MoveOutbox),
            Box::new(CreateServiceAccounts),
        ]
    }
}

struct CreateTables;

impl MigrationName for CreateTables {
    fn name(&self) -> &str {
        "m20261123_000001_create_auth_tables"
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
        for statement in [
            schema.create_table_from_entity(user::Entity),
            schema.create_table_from_entity(role::Entity),
            schema.create_table_from_entity(role_binding::Entity),
            schema.create_table_from_entity(api_token::Entity),
            schema.create_table_from_entity(session::Entity),
            schema.create_table_from_entity(refresh_token::Entity),
            schema.create_table_from_entity(signing_key::Entity),
            schema.create_table_from_entity(audit_event::Entity),
        ] {
            db.execute(&statement).await?;
        }
        // The outbox auth had before cube-kit's; `MoveOutbox` moves its rows over and drops it.
        manager
            .create_table(
                Table::create()
                    .table(Alias::new(LEGACY_OUTBOX))
                    .col(
                        ColumnDef::new(Alias::new("id"))
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Alias::new("topic")).string().not_null())
                    .col(ColumnDef::new(Alias::new("payload")).blob().not_null())
                    .col(ColumnDef::new(Alias::new("created_ms")).big_integer().not_null())
                    .to_owned(),
            )
            .await?;
        let indexes = [
            (
                "idx_role_bindings_subject",
                "role_bindings",
                vec!["subject_kind", "subject", "role"],
                true,
            ),
            ("idx_role_bindings_role", "role_bindings", vec!["role"], false),
            (
                "idx_api_tokens_user",
                "api_tokens",
                vec!["username", "created_ms"],
                false,
            ),
            ("idx_sessions_user", "sessions", vec!["username"], false),
            (
                "idx_refresh_tokens_session",
                "refresh_tokens",
                vec!["session_id"],
                false,
            ),
            ("idx_users_email", "users", vec!["email"], false),
        ];
        for (name, table, columns, unique) in indexes {
            let mut index = Index::create();
            index.name(name).table(Alias::new(table));
            for column in columns {
                index.col(Alias::new(column));
            }
            if unique {
                index.unique();
            }
            manager.create_index(index.to_owned()).await?;
        }
        Ok(())
    }
}

/// The table of auth's own outbox, replaced by cube-kit's.
const LEGACY_OUTBOX: &str = "outbox";

/// Moves the events left in auth's own outbox into cube-kit's, each under a new event id, and drops the old table.
struct MoveOutbox;

impl MigrationName for MoveOutbox {
    fn name(&self) -> &str {
        "m20261203_000002_move_outbox_to_kit"
    }
}

#[expect(
    elided_lifetimes_in_paths,
    reason = "the trait declares `&SchemaManager` with a late-bound lifetime that `<'_>` would make early-bound"
)]
#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for MoveOutbox {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let select = Query::select()
            .columns([Alias::new("topic"), Alias::new("payload")])
            .from(Alias::new(LEGACY_OUTBOX))
            .order_by(Alias::new("id"), Order::Asc)
            .to_owned();
        for row in db.query_all(&select).await? {
            let topic: String = row.try_get("", "topic")?;
            let payload: Vec<u8> = row.try_get("", "payload")?;
            cube_kit::outbox::enqueue_encoded(db, &topic, payload)
                .await
                .map_err(|error| DbErr::Migration(error.to_string()))?;
        }
        manager
            .drop_table(Table::drop().table(Alias::new(LEGACY_OUTBOX)).to_owned())
            .await
    }
}

struct CreateRevocations;

impl MigrationName for CreateRevocations {
    fn name(&self) -> &str {
        "m20261203_000001_create_revocations"
    }
}

#[expect(
    elided_lifetimes_in_paths,
    reason = "the trait declares `&SchemaManager` with a late-bound lifetime that `<'_>` would make early-bound"
)]
#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateRevocations {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let schema = Schema::new(manager.get_database_backend());
        manager
            .get_connection()
            .execute(&schema.create_table_from_entity(revocation::Entity))
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_revocations_forget_after")
                    .table(Alias::new("revocations"))
                    .col(Alias::new("forget_after"))
                    .to_owned(),
            )
            .await
    }
}

struct CreateServiceAccounts;

impl MigrationName for CreateServiceAccounts {
    fn name(&self) -> &str {
        "m20261204_000001_create_service_accounts"
    }
}

#[expect(
    elided_lifetimes_in_paths,
    reason = "the trait declares `&SchemaManager` with a late-bound lifetime that `<'_>` would make early-bound"
)]
#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for CreateServiceAccounts {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let schema = Schema::new(manager.get_database_backend());
        manager
            .get_connection()
            .execute(&schema.create_table_from_entity(service_account::Entity))
            .await
            .map(drop)
    }
}
