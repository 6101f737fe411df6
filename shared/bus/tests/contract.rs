//! The contract of `EventBus`, written once and run against both `MemoryBus` and `RedisBus` (on the Redis of the
//! test environment, `CUBE_TEST_REDIS_URL`).

use std::collections::HashSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cube_bus::{BusError, BusOptions, Delivery, EventBus, EventId, MemoryBus, RedisBus, Start, Subscription};
use deadpool_redis::{Pool, Runtime};
use futures::{FutureExt, StreamExt};
use tokio::time::{Instant, timeout};

/// Short enough to keep the suite fast, long enough that a redelivery cannot be mistaken for a first delivery.
const REDELIVER_AFTER: Duration = Duration::from_millis(250);
/// How long a subscriber is watched to show that nothing (more) arrives.
const QUIET: Duration = Duration::from_millis(400);
/// Bound on waiting for a delivery that must come.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on a whole contract test.
const TEST_TIMEOUT: Duration = Duration::from_secs(8);

#[derive(Clone, Copy)]
enum Backend {
    Memory,
    Redis,
}

/// Hands a contract test its bus and unique topic names, and deletes what the test left in Redis.
struct Ctx {
    backend: Backend,
    pool: Option<Pool>,
    topics: Mutex<Vec<String>>,
}

impl Ctx {
    fn new(backend: Backend) -> Self {
        let pool = match backend {
            Backend::Memory => None,
            Backend::Redis => {
                let url = cube_testkit::require("CUBE_TEST_REDIS_URL");
                let pool = deadpool_redis::Config::from_url(url)
                    .create_pool(Some(Runtime::Tokio1))
                    .expect("CUBE_TEST_REDIS_URL should be a valid redis url");
                Some(pool)
            }
        };
        Self {
            backend,
            pool,
            topics: Mutex::new(Vec::new()),
        }
    }

    /// Returns a bus with a short redelivery delay.
    fn bus(&self) -> Arc<dyn EventBus> {
        self.bus_with(BusOptions {
            redeliver_after: REDELIVER_AFTER,
            max_len: 10_000,
            batch_size: 16,
            block: Duration::from_millis(200),
            ..BusOptions::default()
        })
    }

    fn bus_with(&self, options: BusOptions) -> Arc<dyn EventBus> {
        match (self.backend, &self.pool) {
            (Backend::Redis, Some(pool)) => Arc::new(RedisBus::new(pool.clone(), options)),
            _ => Arc::new(MemoryBus::new(options)),
        }
    }

    /// Returns a topic name no other test run uses.
    fn topic(&self, name: &str) -> String {
        let topic = format!("test.{name}.{}", uuid::Uuid::new_v4().simple());
        self.topics
            .lock()
            .expect("topics lock is never poisoned")
            .push(topic.clone());
        topic
    }

    async fn cleanup(&self) {
        let Some(pool) = &self.pool else { return };
        let keys: Vec<String> = self
            .topics
            .lock()
            .expect("topics lock is never poisoned")
            .iter()
            .map(|t| RedisBus::stream_key(&BusOptions::default().namespace, t))
            .collect();
        if keys.is_empty() {
            return;
        }
        let mut conn = pool.get().await.expect("a redis connection for cleanup");
        let _: () = deadpool_redis::redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .expect("deleting the test streams");
    }
}

async fn run<F, Fut>(backend: Backend, test: F)
where
    F: FnOnce(Arc<Ctx>) -> Fut,
    Fut: Future<Output = ()>,
{
    let ctx = Arc::new(Ctx::new(backend));
    // Cleans up after a failed test too, so failures leave no streams behind.
    let outcome = AssertUnwindSafe(timeout(TEST_TIMEOUT, test(Arc::clone(&ctx))))
        .catch_unwind()
        .await;
    ctx.cleanup().await;
    match outcome {
        Ok(finished) => finished.expect("the contract test should finish in time"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

macro_rules! contract_tests {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::run(super::Backend::Memory, super::$name).await;
                }
            )*
        }

        mod redis {
            $(
                #[tokio::test]
                async fn $name() {
                    super::run(super::Backend::Redis, super::$name).await;
                }
            )*
        }
    };
}

contract_tests!(
    published_event_reaches_a_subscriber_and_ack_stops_redelivery,
    every_group_receives_every_event,
    consumers_of_a_group_split_events_exactly_once,
    unacked_event_is_redelivered_to_the_same_consumer,
    unacked_event_of_a_gone_consumer_goes_to_another,
    resubscribed_consumer_first_gets_its_pending_events,
    group_does_not_see_events_published_before_it_existed,
    an_instance_group_from_the_oldest_catches_up_on_the_events_still_held,
    order_is_preserved,
    dropped_subscription_takes_no_more_events,
    invalid_names_are_rejected,
    a_keyed_event_carries_its_key_and_a_republished_one_the_same,
);

fn payload(text: &str) -> Bytes {
    Bytes::from(text.to_owned())
}

async fn subscribe(bus: &Arc<dyn EventBus>, topic: &str, group: &str, consumer: &str) -> Subscription {
    bus.subscribe(topic, group, consumer)
        .await
        .expect("subscribe should succeed")
}

async fn publish(bus: &Arc<dyn EventBus>, topic: &str, text: &str) -> EventId {
    bus.publish(topic, payload(text)).await.expect("publish should succeed")
}

/// Waits for the next delivery, failing the test if none comes in time.
async fn next(sub: &mut Subscription) -> Delivery {
    timeout(DELIVERY_TIMEOUT, sub.next())
        .await
        .unwrap_or_else(|_| panic!("no delivery for {} within {DELIVERY_TIMEOUT:?}", sub.consumer()))
        .expect("a subscription never ends")
        .expect("the delivery should be readable")
}

/// Fails the test if anything is delivered within `window`.
async fn assert_quiet(sub: &mut Subscription, window: Duration) {
    if let Ok(item) = timeout(window, sub.next()).await {
        panic!("{} expected nothing within {window:?}, got {item:?}", sub.consumer());
    }
}

async fn ack(delivery: &Delivery) {
    delivery.ack().await.expect("ack should succeed");
}

async fn published_event_reaches_a_subscriber_and_ack_stops_redelivery(ctx: Arc<Ctx>) {
    let bus = ctx.bus();
    let topic = ctx.topic("basic");
    let mut sub = subscribe(&bus, &topic, "g", "c1").await;

    let id = publish(&bus, &topic, "hello").await;
    let delivery = next(&mut sub).await;
    assert_eq!(delivery.id, id);
    assert_eq!(delivery.topic, topic);
    assert_eq!(delivery.payload, payload("hello"));
    assert_eq!(delivery.delivery_count, 1);
    ack(&delivery).await;

    assert_quiet(&mut sub, REDELIVER_AFTER + QUIET).await;
}

/// A publisher's key (the outbox's event id) reaches consumers, also when the event is published twice, as a
/// relay that crashed after publishing does; unkeyed events carry none.
async fn a_keyed_event_carries_its_key_and_a_republished_one_the_same(ctx: Arc<Ctx>) {
    let bus = ctx.bus();
    let topic = ctx.topic("keyed");
    let mut sub = subscribe(&bus, &topic, "g", "c1").await;

    let first = bus
        .append(&topic, Some("event-1"), payload("once"))
        .await
        .expect("a keyed append should succeed");
    let again = bus
        .append(&topic, Some("event-1"), payload("once"))
        .await
        .expect("a keyed append should succeed");
    publish(&bus, &topic, "plain").await;
    assert_ne!(first, again, "each publication is an event of its own");
    let mut keys = Vec::new();
    for _ in 0..3 {
        let delivery = next(&mut sub).await;
        keys.push(delivery.key.clone());
        ack(&delivery).await;
    }
    assert_eq!(keys, [Some("event-1".to_owned()), Some("event-1".to_owned()), None]);
}

async fn every_group_receives_every_event(ctx: Arc<Ctx>) {
    let bus = ctx.bus();
    let topic = ctx.topic("groups");
    let mut first = subscribe(&bus, &topic, "g1", "c").await;
    let mut second = subscribe(&bus, &topic, "g2", "c").await;

    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(publish(&bus, &topic, &format!("e{i}")).await);
    }
    for sub in [&mut first, &mut second] {
        let mut got = Vec::new();
        for _ in 0..5 {
            let delivery = next(sub).await;
            assert_eq!(delivery.delivery_count, 1);
            ack(&delivery).await;
            got.push(delivery.id);
        }
        assert_eq!(got, ids, "group {} should get every event in order", sub.group());
    }
}

async fn consumers_of_a_group_split_events_exactly_once(ctx: Arc<Ctx>) {
    let bus = ctx.bus();
    let topic = ctx.topic("split");
    let mut c1 = subscribe(&bus, &topic, "g", "c1").await;
    let mut c2 = subscribe(&bus, &topic, "g", "c2").await;

    let mut published = Vec::new();
    for i in 0..20 {
        published.push(publish(&bus, &topic, &format!("e{i}")).await);
    }
    let mut received = Vec::new();
    while received.len() < published.len() {
        let delivery = tokio::select! {
            delivery = next(&mut c1) => delivery,
            delivery = next(&mut c2) => delivery,
        };
        assert_eq!(delivery.delivery_count, 1, "{delivery:?} should be a first delivery");
        ack(&delivery).await;
        received.push(delivery.id);
    }
    let distinct: HashSet<_> = received.iter().cloned().collect();
    assert_eq!(
        distinct.len(),
        received.len(),
        "no event may reach two consumers of a group: {received:?}"
    );
    assert_eq!(distinct, published.into_iter().collect::<HashSet<_>>());

    tokio::join!(assert_quiet(&mut c1, QUIET), assert_quiet(&mut c2, QUIET));
}

async fn unacked_event_is_redelivered_to_the_same_consumer(ctx: Arc<Ctx>) {
    let bus = ctx.bus();
    let topic = ctx.topic("redeliver-same");
    let mut sub = subscribe(&bus, &topic, "g", "c1").await;
    publish(&bus, &topic, "acked").await;
    let unacked = publish(&bus, &topic, "unacked").await;

    let first = next(&mut sub).await;
    assert_eq!(first.payload, payload("acked"));
    ack(&first).await;
    let second = next(&mut sub).await;
    assert_eq!((second.id.clone(), second.delivery_count), (unacked.clone(), 1));
    let delivered_at = Instant::now();

    let again = next(&mut sub).await;
    assert_eq!((again.id.clone(), again.delivery_count), (unacked, 2));
    assert!(
        delivered_at.elapsed() >= REDELIVER_AFTER.mul_f32(0.8),
        "redelivered after {:?}, before redeliver_after {REDELIVER_AFTER:?}",
        delivered_at.elapsed()
    );
    ack(&again).await;

    assert_quiet(&mut sub, REDELIVER_AFTER + QUIET).await;
}

async fn unacked_event_of_a_gone_consumer_goes_to_another(ctx: Arc<Ctx>) {
    let bus = ctx.bus();
    let topic = ctx.topic("redeliver-other");
    let mut gone = subscribe(&bus, &topic, "g", "gone").await;
    publish(&bus, &topic, "acked").await;
    let unacked = publish(&bus, &topic, "unacked").await;
    ack(&next(&mut gone).await).await;
    let held = next(&mut gone).await;
    assert_eq!(held.id, unacked);
    let delivered_at = Instant::now();
    drop(gone);

    let mut other = subscribe(&bus, &topic, "g", "other").await;
    let redelivered = next(&mut other).await;
    assert_eq!((redelivered.id.clone(), redelivered.delivery_count), (unacked, 2));
    assert_eq!(redelivered.payload, payload("unacked"));
    assert!(
        delivered_at.elapsed() >= REDELIVER_AFTER.mul_f32(0.8),
        "redelivered too early"
    );
    ack(&redelivered).await;

    assert_quiet(&mut other, REDELIVER_AFTER + QUIET).await;
}

async fn resubscribed_consumer_first_gets_its_pending_events(ctx: Arc<Ctx>) {
    // Redelivery after a long delay only, so what comes back early can only be the consumer's own pending events.
    let bus = ctx.bus_with(BusOptions {
        redeliver_after: Duration::from_secs(60),
        ..BusOptions::default()
    });
    let topic = ctx.topic("resubscribe");
    let mut sub = subscribe(&bus, &topic, "g", "c1").await;
    let a = publish(&bus, &topic, "a").await;
    let b = publish(&bus, &topic, "b").await;
    assert_eq!(next(&mut sub).await.id, a);
    assert_eq!(next(&mut sub).await.id, b);
    drop(sub);
    let c = publish(&bus, &topic, "c").await;

    let mut other = subscribe(&bus, &topic, "g", "c2").await;
    let mut sub = subscribe(&bus, &topic, "g", "c1").await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let delivery = next(&mut sub).await;
        ack(&delivery).await;
        got.push((delivery.id, delivery.delivery_count));
    }
    assert_eq!(got, [(a, 2), (b, 2), (c, 1)]);
    // Another consumer neither got the pending events nor the new one.
    assert_quiet(&mut other, Duration::from_millis(100)).await;
}

async fn group_does_not_see_events_published_before_it_existed(ctx: Arc<Ctx>) {
    let bus = ctx.bus();
    let topic = ctx.topic("late-group");
    publish(&bus, &topic, "before").await;
    let mut early = subscribe(&bus, &topic, "early", "c").await;
    publish(&bus, &topic, "middle").await;
    let mut late = subscribe(&bus, &topic, "late", "c").await;
    publish(&bus, &topic, "after").await;

    for expected in ["middle", "after"] {
        let delivery = next(&mut early).await;
        assert_eq!(delivery.payload, payload(expected));
        ack(&delivery).await;
    }
    let delivery = next(&mut late).await;
    assert_eq!(delivery.payload, payload("after"));
    ack(&delivery).await;
    tokio::join!(assert_quiet(&mut early, QUIET), assert_quiet(&mut late, QUIET));
}

async fn an_instance_group_from_the_oldest_catches_up_on_the_events_still_held(ctx: Arc<Ctx>) {
    let bus = ctx.bus();
    let topic = ctx.topic("catch-up");
    // A group that has not acknowledged anything keeps the events held (the in-process bus drops what every
    // group has acknowledged).
    let _early = subscribe(&bus, &topic, "early", "c").await;
    publish(&bus, &topic, "first").await;
    publish(&bus, &topic, "second").await;
    let mut late = bus
        .subscribe_instance(&topic, "late", "c", Start::Oldest)
        .await
        .expect("subscribing from the oldest event");
    let mut new = subscribe(&bus, &topic, "new", "c").await;
    publish(&bus, &topic, "third").await;
    for expected in ["first", "second", "third"] {
        let delivery = next(&mut late).await;
        assert_eq!(delivery.payload, payload(expected));
        ack(&delivery).await;
    }
    let delivery = next(&mut new).await;
    assert_eq!(
        delivery.payload,
        payload("third"),
        "a plain subscription starts at the end"
    );
    ack(&delivery).await;
    assert_quiet(&mut late, QUIET).await;
}

async fn order_is_preserved(ctx: Arc<Ctx>) {
    let bus = ctx.bus();
    let topic = ctx.topic("order");
    let mut sub = subscribe(&bus, &topic, "g", "c").await;
    let mut published = Vec::new();
    for i in 0..50 {
        published.push((publish(&bus, &topic, &format!("e{i}")).await, payload(&format!("e{i}"))));
    }
    let mut received = Vec::new();
    for _ in 0..published.len() {
        let delivery = next(&mut sub).await;
        ack(&delivery).await;
        received.push((delivery.id, delivery.payload));
    }
    assert_eq!(received, published);
}

async fn dropped_subscription_takes_no_more_events(ctx: Arc<Ctx>) {
    let bus = ctx.bus();
    let topic = ctx.topic("drop");
    let mut dropped = subscribe(&bus, &topic, "g", "dropped").await;
    let mut kept = subscribe(&bus, &topic, "g", "kept").await;
    // Leaves a read of `dropped` waiting for events, as a subscription dropped from a select! would.
    assert_quiet(&mut dropped, Duration::from_millis(50)).await;
    drop(dropped);

    for i in 0..3 {
        publish(&bus, &topic, &format!("e{i}")).await;
    }
    for i in 0..3 {
        let delivery = next(&mut kept).await;
        assert_eq!(delivery.payload, payload(&format!("e{i}")));
        assert_eq!(
            delivery.delivery_count, 1,
            "e{i} went to the dropped subscription first"
        );
        ack(&delivery).await;
    }
}

async fn invalid_names_are_rejected(ctx: Arc<Ctx>) {
    let bus = ctx.bus();
    let topic = ctx.topic("names");
    let published = bus.publish("has space", payload("x")).await;
    assert!(
        matches!(published, Err(BusError::InvalidName { field: "topic", .. })),
        "{published:?}"
    );
    let subscribed = bus.subscribe(&topic, "", "c").await;
    assert!(
        matches!(subscribed, Err(BusError::InvalidName { field: "group", .. })),
        "{subscribed:?}"
    );
    let subscribed = bus.subscribe(&topic, "g", "c\n").await;
    assert!(
        matches!(subscribed, Err(BusError::InvalidName { field: "consumer", .. })),
        "{subscribed:?}"
    );
    let subscribed = bus.subscribe(&"t".repeat(201), "g", "c").await;
    assert!(
        matches!(subscribed, Err(BusError::InvalidName { field: "topic", .. })),
        "{subscribed:?}"
    );
}

#[tokio::test]
async fn redis_streams_are_capped_near_max_len() {
    run(Backend::Redis, streams_are_capped_near_max_len).await;
}

async fn streams_are_capped_near_max_len(ctx: Arc<Ctx>) {
    let bus = ctx.bus_with(BusOptions {
        max_len: 10,
        ..BusOptions::default()
    });
    let topic = ctx.topic("capped");
    for i in 0..500 {
        publish(&bus, &topic, &format!("e{i}")).await;
    }
    let pool = ctx.pool.as_ref().expect("a redis context has a pool");
    let mut conn = pool.get().await.expect("a redis connection");
    let len: usize = deadpool_redis::redis::cmd("XLEN")
        .arg(RedisBus::stream_key(&BusOptions::default().namespace, &topic))
        .query_async(&mut conn)
        .await
        .expect("XLEN should succeed");
    // MAXLEN ~ trims whole radix-tree nodes (100 entries by default), so the length stays near, not at, the cap.
    assert!(len < 200, "stream holds {len} events despite max_len 10");
}

#[tokio::test]
async fn redis_subscription_survives_its_stream_being_deleted() {
    run(Backend::Redis, subscription_survives_its_stream_being_deleted).await;
}

async fn subscription_survives_its_stream_being_deleted(ctx: Arc<Ctx>) {
    let bus = ctx.bus();
    let topic = ctx.topic("deleted");
    let key = RedisBus::stream_key(&BusOptions::default().namespace, &topic);
    let pool = ctx.pool.clone().expect("a redis context has a pool");
    let mut sub = subscribe(&bus, &topic, "g", "c").await;
    publish(&bus, &topic, "first").await;
    ack(&next(&mut sub).await).await;

    let mut conn = pool.get().await.expect("a redis connection");
    let _: () = deadpool_redis::redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("DEL");
    drop(conn);
    // Reading fails with NOGROUP until the subscription recreates its group, from the end of the new stream.
    let reading = tokio::spawn(async move { next(&mut sub).await });
    cube_testkit::eventually("the consumer group to be recreated", Duration::from_secs(3), || {
        let pool = pool.clone();
        let key = key.clone();
        async move {
            let mut conn = pool.get().await.ok()?;
            let groups: deadpool_redis::redis::Value = deadpool_redis::redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .ok()?;
            matches!(groups, deadpool_redis::redis::Value::Array(ref g) if !g.is_empty()).then_some(())
        }
    })
    .await;
    publish(&bus, &topic, "second").await;
    let delivery = timeout(TEST_TIMEOUT, reading)
        .await
        .expect("in time")
        .expect("the reading task should not panic");
    assert_eq!((delivery.payload, delivery.delivery_count), (payload("second"), 1));
}

/// The consumer groups of `topic`'s stream in Redis.
async fn redis_groups(pool: &Pool, topic: &str) -> Vec<String> {
    let mut conn = pool.get().await.expect("a redis connection");
    let groups: Vec<std::collections::HashMap<String, deadpool_redis::redis::Value>> =
        deadpool_redis::redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(RedisBus::stream_key(&BusOptions::default().namespace, topic))
            .query_async(&mut conn)
            .await
            .expect("XINFO GROUPS");
    let mut names: Vec<String> = groups
        .iter()
        .filter_map(|group| deadpool_redis::redis::from_redis_value(group.get("name")?.clone()).ok())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn memory_an_instance_group_goes_with_its_subscription() {
    let bus = MemoryBus::new(BusOptions::default());
    let shared = bus
        .subscribe("test.instances", "workers", "c")
        .await
        .expect("a shared group");
    let own = bus
        .subscribe_instance("test.instances", "cache-abc", "c", Start::Latest)
        .await
        .expect("an instance group");
    assert_eq!(bus.groups("test.instances"), ["instance:cache-abc", "workers"]);
    drop(own);
    assert_eq!(bus.groups("test.instances"), ["workers"]);
    drop(shared);
}

#[tokio::test]
async fn redis_an_instance_group_goes_with_its_subscription() {
    run(Backend::Redis, |ctx| async move {
        let bus = ctx.bus();
        let pool = ctx.pool.clone().expect("a redis context has a pool");
        let topic = ctx.topic("instances");
        let _shared = subscribe(&bus, &topic, "workers", "c").await;
        let mut own = bus
            .subscribe_instance(&topic, "cache-abc", "c", Start::Latest)
            .await
            .expect("an instance group");
        assert_eq!(redis_groups(&pool, &topic).await, ["instance:cache-abc", "workers"]);
        publish(&bus, &topic, "seen").await;
        assert_eq!(next(&mut own).await.payload, Bytes::from("seen"));
        drop(own);
        let deadline = Instant::now() + DELIVERY_TIMEOUT;
        while redis_groups(&pool, &topic).await != ["workers"] {
            assert!(Instant::now() < deadline, "the instance's group is still there");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn redis_the_group_of_a_dead_instance_is_removed_by_the_next_instance() {
    run(Backend::Redis, |ctx| async move {
        let pool = ctx.pool.clone().expect("a redis context has a pool");
        let topic = ctx.topic("dead-instances");
        let bus = ctx.bus_with(BusOptions {
            dead_instance_after: Duration::from_millis(100),
            block: Duration::from_millis(50),
            ..BusOptions::default()
        });
        // An instance that was killed: its group stays, its consumer stops reading. A shared group stays too.
        let dead = bus
            .subscribe_instance(&topic, "cache-dead", "c", Start::Latest)
            .await
            .expect("an instance group");
        std::mem::forget(dead);
        let _shared = subscribe(&bus, &topic, "workers", "c").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _live = bus
            .subscribe_instance(&topic, "cache-live", "c", Start::Latest)
            .await
            .expect("an instance group");
        assert_eq!(redis_groups(&pool, &topic).await, ["instance:cache-live", "workers"]);
    })
    .await;
}
