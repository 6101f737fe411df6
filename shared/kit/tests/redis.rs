//! `cube_kit::redis::pool` against the real Redis of the test environment.

use std::time::{Duration, Instant};

use deadpool_redis::redis::AsyncCommands;

#[tokio::test]
async fn a_pooled_connection_sets_reads_and_deletes_a_key() {
    let pool = cube_kit::redis::pool(&cube_testkit::require("CUBE_TEST_REDIS_URL")).expect("a valid Redis URL");
    let key = format!("cube-kit-test:{}", uuid::Uuid::new_v4());
    let value = uuid::Uuid::new_v4().to_string();

    let mut connection = pool.get().await.expect("a connection from the pool");
    // The expiry cleans up after a run that fails half-way.
    let () = connection.set_ex(&key, &value, 60).await.expect("SET");
    let read: Option<String> = connection.get(&key).await.expect("GET");
    assert_eq!(read.as_deref(), Some(value.as_str()));
    drop(connection);

    // A connection handed back to the pool is reused, and sees the same data.
    let mut connection = pool.get().await.expect("the connection again");
    assert_eq!(pool.status().size, 1, "the pool opened a second connection");
    let deleted: u32 = connection.del(&key).await.expect("DEL");
    assert_eq!(deleted, 1);
    let read: Option<String> = connection.get(&key).await.expect("GET after DEL");
    assert_eq!(read, None);
}

#[test]
fn an_invalid_url_shows_the_expected_form() {
    let err = cube_kit::redis::pool("http://127.0.0.1:6379").expect_err("http is not a Redis URL");
    let message = err.to_string();
    assert!(message.contains("redis://HOST:PORT/DB"), "{message}");
    assert!(message.contains("http://127.0.0.1:6379"), "{message}");
}

#[test]
fn an_invalid_url_does_not_reveal_its_password() {
    let err = cube_kit::redis::pool("redis://:hunter2@127.0.0.1:port/0").expect_err("the port is not a number");
    let message = err.to_string();
    assert!(!message.contains("hunter2"), "{message}");
    assert!(message.contains("127.0.0.1:port"), "{message}");
}

#[tokio::test]
async fn an_unreachable_redis_fails_on_first_use_in_bounded_time() {
    // Connections open lazily, so the pool itself is created; port 1 on loopback refuses connections.
    let pool = cube_kit::redis::pool("redis://127.0.0.1:1/0").expect("a valid Redis URL");
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(30), pool.get())
        .await
        .expect("getting a connection gave up by itself");
    assert!(result.is_err(), "got a connection to a closed port");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}
