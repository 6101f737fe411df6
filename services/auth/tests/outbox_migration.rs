//! Upgrading a database made before auth used cube-kit's outbox: the events waiting in auth's own `outbox` table
//! move to `outbox_events`, in order, and the old table goes.

use cube_auth::model::Migrator;
use sea_orm::{ConnectionTrait as _, DatabaseConnection, Statement};
use sea_orm_migration::MigratorTrait as _;

async fn rows(db: &DatabaseConnection, sql: &str) -> Vec<sea_orm::QueryResult> {
    db.query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .expect("query")
}

async fn waiting_events_move_to_the_kit_outbox(url: &str) {
    let db = cube_kit::db::connect::<Migrator>(url, false).await.expect("connect");
    // The two migrations auth had before the shared outbox.
    Migrator::up(&db, Some(2)).await.expect("the old migrations");
    for (topic, payload) in [("first.topic", "0102"), ("second.topic", "0304")] {
        let hex = match db.get_database_backend() {
            sea_orm::DbBackend::Postgres => format!("'\\x{payload}'"),
            _ => format!("X'{payload}'"),
        };
        db.execute_unprepared(&format!(
            "INSERT INTO outbox (topic, payload, created_ms) VALUES ('{topic}', {hex}, 1)"
        ))
        .await
        .expect("a waiting event");
    }

    Migrator::up(&db, None).await.expect("the new migrations");

    let moved = rows(&db, "SELECT topic, payload, event_id FROM outbox_events ORDER BY id").await;
    let moved: Vec<(String, Vec<u8>, String)> = moved
        .iter()
        .map(|row| {
            (
                row.try_get_by_index(0).expect("topic"),
                row.try_get_by_index(1).expect("payload"),
                row.try_get_by_index(2).expect("event id"),
            )
        })
        .collect();
    assert_eq!(
        moved
            .iter()
            .map(|(topic, payload, _)| (topic.as_str(), payload.clone()))
            .collect::<Vec<_>>(),
        [("first.topic", vec![1, 2]), ("second.topic", vec![3, 4])]
    );
    assert_ne!(moved[0].2, moved[1].2, "each event gets an id of its own");
    let old = db.execute_unprepared("SELECT COUNT(*) FROM outbox").await;
    assert!(old.is_err(), "the old outbox table is dropped");
    db.close().await.expect("close");
}

cube_testkit::on_every_backend!(waiting_events_move_to_the_kit_outbox);
