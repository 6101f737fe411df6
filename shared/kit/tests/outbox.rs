//! Acceptance tests of the transactional outbox on SQLite, PostgreSQL and MariaDB, relayed to the in-process bus
//! and to Redis Streams: an event committed by a process killed before it relayed is published once after a
//! restart, and one published by a relay that crashed before deleting its row is published again under the same
//! id, which a consumer deduplicating by id handles once; events enqueued together are published in order under
//! the ids they were given.

use std::collections::HashSet;
use std::future::Future;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cube_bus::{BusError, BusOptions, Delivery, EventBus, EventId, MemoryBus, RedisBus, Start, Subscription};
use cube_kit::outbox::{self, RelayOptions};
use cube_kit::task::Background;
use cube_testkit::{Backend, FreshDatabase};
use futures::StreamExt as _;
use futures::future::BoxFuture;
use prost::Message as _;
use sea_orm::{ConnectionTrait as _, DatabaseConnection, Statement, TransactionTrait as _};
use sea_orm_migration::{MigrationTrait, MigratorTrait};
use tokio::io::AsyncBufReadExt as _;
use tokio::sync::Notify;

/// Set in the child process: the database URL it enqueues into.
const CHILD_DATABASE: &str = "CUBE_KIT_OUTBOX_CHILD_DATABASE";
/// Set in the child process: the topic it enqueues on.
const CHILD_TOPIC: &str = "CUBE_KIT_OUTBOX_CHILD_TOPIC";
/// What the child prints, followed by the event id, once its transaction committed.
const COMMITTED: &str = "outbox-child-committed ";
/// Longest wait for something that should happen at once.
const WAIT: Duration = Duration::from_secs(30);

/// The test's migrator: the outbox alone.
struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![outbox::migration()]
    }
}

/// The event the tests send: any protobuf message does.
fn event(seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos: 0 }
}

/// Acts as the child process of the `killed_after_commit` tests when they run this binary with [`CHILD_DATABASE`]
/// set: enqueues one event in a committed transaction, says so, and waits to be killed. Does nothing otherwise.
#[test]
fn outbox_child_process() {
    let (Ok(url), Ok(topic)) = (std::env::var(CHILD_DATABASE), std::env::var(CHILD_TOPIC)) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let db = cube_kit::db::connect::<Migrator>(&url, false)
            .await
            .expect("the child connects");
        let txn = db.begin().await.expect("begin");
        let id = outbox::enqueue(&txn, &topic, &event(42)).await.expect("enqueue");
        txn.commit().await.expect("commit");
        println!("{COMMITTED}{id}");
    });
    // Never relays: the parent kills this process with SIGKILL.
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// Which bus a test relays to.
#[derive(Clone, Copy, Debug)]
enum BusKind {
    Memory,
    Redis,
}

/// A bus of `kind` and a topic of the test's own, deleted from Redis when dropped.
struct TestBus {
    bus: Arc<dyn EventBus>,
    topic: String,
    redis: Option<deadpool_redis::Pool>,
}

impl TestBus {
    fn new(kind: BusKind) -> Self {
        let options = BusOptions {
            redeliver_after: Duration::from_secs(60),
            block: Duration::from_millis(200),
            ..BusOptions::default()
        };
        let topic = format!("test.outbox.{}", uuid::Uuid::new_v4().simple());
        match kind {
            BusKind::Memory => Self {
                bus: Arc::new(MemoryBus::new(options)),
                topic,
                redis: None,
            },
            BusKind::Redis => {
                let pool = cube_kit::redis::pool(&cube_testkit::require("CUBE_TEST_REDIS_URL"))
                    .expect("CUBE_TEST_REDIS_URL is a redis URL");
                Self {
                    bus: Arc::new(RedisBus::new(pool.clone(), options)),
                    topic,
                    redis: Some(pool),
                }
            }
        }
    }

    async fn subscribe(&self) -> Subscription {
        self.bus
            .subscribe(&self.topic, "consumers", "consumer-1")
            .await
            .expect("subscribe")
    }

    async fn clean_up(&self) {
        if let Some(pool) = &self.redis {
            let mut conn = pool.get().await.expect("a redis connection");
            let _: () = deadpool_redis::redis::cmd("DEL")
                .arg(RedisBus::stream_key(&BusOptions::default().namespace, &self.topic))
                .query_async(&mut conn)
                .await
                .expect("deleting the test stream");
        }
    }
}

/// Runs `test` on a fresh migrated database of `backend` and a bus of `kind`.
async fn with_setup<F, Fut>(backend: Backend, kind: BusKind, test: F)
where
    F: FnOnce(String, DatabaseConnection, Arc<TestBus>) -> Fut,
    Fut: Future<Output = ()>,
{
    let database = FreshDatabase::create(backend).await;
    let db = cube_kit::db::connect::<Migrator>(&database.url, true)
        .await
        .expect("connect and migrate");
    let bus = Arc::new(TestBus::new(kind));
    test(database.url.clone(), db.clone(), bus.clone()).await;
    bus.clean_up().await;
    db.close().await.expect("close");
}

/// Counts the rows the outbox holds.
async fn pending(db: &DatabaseConnection) -> i64 {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) FROM outbox_events",
        ))
        .await
        .expect("count")
        .expect("a row");
    row.try_get_by_index::<i64>(0).expect("a count")
}

/// Waits until the relay has deleted every published row (it deletes a row just after the bus stored its event).
async fn assert_drained(db: &DatabaseConnection) {
    cube_testkit::eventually("published events to leave the outbox", WAIT, || async {
        (pending(db).await == 0).then_some(())
    })
    .await;
}

/// Waits for the next delivery and acknowledges it.
async fn next(subscription: &mut Subscription) -> Delivery {
    let delivery = tokio::time::timeout(WAIT, subscription.next())
        .await
        .expect("a delivery in time")
        .expect("the subscription goes on")
        .expect("a readable delivery");
    delivery.ack().await.expect("ack");
    delivery
}

/// Enqueues a last event and returns the keys of every delivery up to and including it: the relay publishes in
/// enqueue order, so nothing published before it can arrive after it.
async fn drain_until_sentinel(
    db: &DatabaseConnection,
    wake: &Notify,
    topic: &str,
    subscription: &mut Subscription,
) -> Vec<String> {
    let txn = db.begin().await.expect("begin");
    let sentinel = outbox::enqueue(&txn, topic, &event(0))
        .await
        .expect("enqueue")
        .to_string();
    txn.commit().await.expect("commit");
    wake.notify_one();
    let mut keys = Vec::new();
    loop {
        let key = next(subscription).await.key.expect("outbox events carry a key");
        let done = key == sentinel;
        keys.push(key);
        if done {
            return keys;
        }
    }
}

fn relay(db: &DatabaseConnection, bus: Arc<dyn EventBus>, wake: Arc<Notify>) -> Background {
    Background::spawn(outbox::relay(
        db.clone(),
        bus,
        wake,
        RelayOptions {
            poll_interval: Duration::from_millis(100),
            batch_size: 10,
        },
    ))
}

/// A child process commits an event and is killed before relaying; a relay started afterwards publishes it once.
async fn killed_after_commit(backend: Backend, kind: BusKind) {
    with_setup(backend, kind, |url, db, bus| async move {
        let mut child = tokio::process::Command::new(std::env::current_exe().expect("the test binary"))
            .args(["outbox_child_process", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_DATABASE, &url)
            .env(CHILD_TOPIC, &bus.topic)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the child");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let id = tokio::time::timeout(WAIT, async {
            while let Some(line) = lines.next_line().await.expect("the child's output") {
                // libtest may have written the test's name on the same line.
                if let Some((_, id)) = line.split_once(COMMITTED) {
                    return id.trim().to_owned();
                }
            }
            panic!("the child exited without committing");
        })
        .await
        .expect("the child commits in time");
        // `kill` sends SIGKILL: the child gets no chance to relay anything.
        child.kill().await.expect("kill the child");
        assert_eq!(pending(&db).await, 1, "the committed event waits in the outbox");

        let mut subscription = bus.subscribe().await;
        let wake = Arc::new(Notify::new());
        let _relay = relay(&db, bus.bus.clone(), wake.clone());
        let first = next(&mut subscription).await;
        assert_eq!(
            first.key.as_deref(),
            Some(id.as_str()),
            "the delivery carries the event id"
        );
        assert_eq!(
            prost_types::Timestamp::decode(first.payload).expect("the payload decodes"),
            event(42)
        );
        let rest = drain_until_sentinel(&db, &wake, &bus.topic, &mut subscription).await;
        assert!(!rest.contains(&id), "published once, then {rest:?}");
        assert_drained(&db).await;
    })
    .await;
}

/// A bus that stores the first event it is given and then never answers, as if its relay crashed right after
/// the bus stored the event and before the row was deleted.
struct CrashAfterPublish {
    inner: Arc<dyn EventBus>,
    published: Arc<Notify>,
}

impl EventBus for CrashAfterPublish {
    fn append<'a>(
        &'a self,
        topic: &'a str,
        key: Option<&'a str>,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<EventId, BusError>> {
        Box::pin(async move {
            self.inner.append(topic, key, payload).await?;
            self.published.notify_one();
            futures::future::pending().await
        })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        consumer: &'a str,
    ) -> BoxFuture<'a, Result<Subscription, BusError>> {
        self.inner.subscribe(topic, group, consumer)
    }

    fn subscribe_instance<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        consumer: &'a str,
        from: Start,
    ) -> BoxFuture<'a, Result<Subscription, BusError>> {
        self.inner.subscribe_instance(topic, group, consumer, from)
    }
}

/// A relay publishes an event and dies before deleting its row; the next relay publishes it again under the same
/// id, and a consumer that deduplicates by id handles it once.
async fn crashed_after_publish(backend: Backend, kind: BusKind) {
    with_setup(backend, kind, |_url, db, bus| async move {
        let txn = db.begin().await.expect("begin");
        let id = outbox::enqueue(&txn, &bus.topic, &event(7))
            .await
            .expect("enqueue")
            .to_string();
        txn.commit().await.expect("commit");
        let mut subscription = bus.subscribe().await;

        let published = Arc::new(Notify::new());
        let crashing = Arc::new(CrashAfterPublish {
            inner: bus.bus.clone(),
            published: published.clone(),
        });
        let wake = Arc::new(Notify::new());
        let doomed = relay(&db, crashing, wake.clone());
        tokio::time::timeout(WAIT, published.notified())
            .await
            .expect("the first relay publishes");
        drop(doomed);
        assert_eq!(pending(&db).await, 1, "the crashed relay did not delete the row");

        let _relay = relay(&db, bus.bus.clone(), wake.clone());
        let mut keys = vec![next(&mut subscription).await.key.expect("a key")];
        keys.extend(drain_until_sentinel(&db, &wake, &bus.topic, &mut subscription).await);
        let copies = keys.iter().filter(|key| **key == id).count();
        assert_eq!(copies, 2, "published by both relays under one id: {keys:?}");
        let mut seen = HashSet::new();
        let handled: Vec<&String> = keys.iter().filter(|key| seen.insert(*key)).collect();
        assert_eq!(
            handled.iter().filter(|key| ***key == id).count(),
            1,
            "deduplicated by id"
        );
        assert_drained(&db).await;
    })
    .await;
}

/// Events enqueued together (more than one statement's worth) are published once each, in the order given, under
/// the ids `enqueue_all` returned; a rolled-back `enqueue_all` leaves nothing.
async fn enqueued_together(backend: Backend, kind: BusKind) {
    with_setup(backend, kind, |_url, db, bus| async move {
        let events: Vec<prost_types::Timestamp> = (1..=1200).map(event).collect();
        let txn = db.begin().await.expect("begin");
        outbox::enqueue_all(&txn, &bus.topic, &events[..10])
            .await
            .expect("enqueue_all");
        txn.rollback().await.expect("rollback");
        assert_eq!(pending(&db).await, 0, "a rolled-back enqueue_all leaves nothing");

        let txn = db.begin().await.expect("begin");
        let ids = outbox::enqueue_all(&txn, &bus.topic, &events)
            .await
            .expect("enqueue_all");
        txn.commit().await.expect("commit");
        assert_eq!(ids.len(), events.len(), "an id per event");
        let mut subscription = bus.subscribe().await;
        let wake = Arc::new(Notify::new());
        let _relay = relay(&db, bus.bus.clone(), wake.clone());
        wake.notify_one();
        for (id, sent) in ids.iter().zip(&events) {
            let delivery = next(&mut subscription).await;
            assert_eq!(
                delivery.key.as_deref(),
                Some(id.to_string().as_str()),
                "published in order, under its id"
            );
            let received = prost_types::Timestamp::decode(delivery.payload.clone()).expect("an event");
            assert_eq!(&received, sent);
        }
        assert_drained(&db).await;
    })
    .await;
}

macro_rules! on_every_backend_and_bus {
    ($($backend:ident => $variant:expr),* $(,)?) => {
        $(mod $backend {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn killed_after_commit_memory_bus() {
                killed_after_commit($variant, BusKind::Memory).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn killed_after_commit_redis_bus() {
                killed_after_commit($variant, BusKind::Redis).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn crashed_after_publish_memory_bus() {
                crashed_after_publish($variant, BusKind::Memory).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn crashed_after_publish_redis_bus() {
                crashed_after_publish($variant, BusKind::Redis).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn enqueued_together_memory_bus() {
                enqueued_together($variant, BusKind::Memory).await;
            }
        })*
    };
}

on_every_backend_and_bus!(
    sqlite => Backend::Sqlite,
    postgres => Backend::Postgres,
    mariadb => Backend::MariaDb,
);
