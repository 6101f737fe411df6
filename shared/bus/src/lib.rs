//! The event bus every Cube service publishes its state changes on.
//!
//! One trait, [`EventBus`], with two implementations that keep one contract:
//! - [`RedisBus`]: Redis Streams with consumer groups, for deployments with `--redis-url`;
//! - [`MemoryBus`]: an in-process bus for `cube up`, with the same semantics.
//!
//! The contract is the one of Redis Streams consumer groups. A group receives every event published after the
//! group was first created (by the first [`EventBus::subscribe`] naming it); within a group each event goes to one
//! consumer; a consumer acknowledges what it has handled ([`Delivery::ack`]), and an event delivered but not
//! acknowledged within [`BusOptions::redeliver_after`] is delivered again, to any consumer of the group, with a
//! higher [`Delivery::delivery_count`]. A consumer that subscribes again first receives its own unacknowledged
//! events. Delivery is at least once: consumers must tolerate duplicates, and since events are hints (every
//! consumer also reconciles periodically) a trimmed event delays a transition, it never loses one.

mod error;
mod memory;
mod redis_bus;

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use futures::future::BoxFuture;
use futures::stream::BoxStream;

pub use crate::error::BusError;
pub use crate::memory::MemoryBus;
pub use crate::redis_bus::RedisBus;

/// Publishes events to topics and subscribes consumer groups to them; object safe, shared as `Arc<dyn EventBus>`.
pub trait EventBus: Send + Sync + 'static {
    /// Appends an event to `topic` and returns its id once the event is stored. `key`, when given, is an id the
    /// publisher gave the event that stays the same when it publishes the event again (the outbox's event id), so
    /// that consumers can deduplicate on [`Delivery::key`].
    fn append<'a>(
        &'a self,
        topic: &'a str,
        key: Option<&'a str>,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<EventId, BusError>>;

    /// Appends an event without a key to `topic` (see [`EventBus::append`]).
    fn publish<'a>(&'a self, topic: &'a str, payload: Bytes) -> BoxFuture<'a, Result<EventId, BusError>> {
        self.append(topic, None, payload)
    }

    /// Subscribes `consumer` of `group` to `topic`, creating the group at the end of the topic if it is new.
    ///
    /// When the returned future resolves the group exists, so every event published afterwards reaches it. The
    /// subscription first yields the consumer's own unacknowledged events, then new ones and redeliveries.
    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        consumer: &'a str,
    ) -> BoxFuture<'a, Result<Subscription, BusError>>;

    /// Subscribes with a consumer group of this process instance's own, for events every replica must see (cache
    /// invalidations, revocations): the group is `instance:{group}` (`group` must be unique to the instance, e.g.
    /// carry a random id), created at the end of the topic or, `from` [`Start::Oldest`], at its oldest event.
    ///
    /// The group is removed when the subscription is dropped, so a topic does not collect the groups of stopped
    /// instances; groups of instances that died without removing theirs are removed by the next instance
    /// subscription to the topic once every consumer of theirs has been idle for
    /// [`BusOptions::dead_instance_after`].
    fn subscribe_instance<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        consumer: &'a str,
        from: Start,
    ) -> BoxFuture<'a, Result<Subscription, BusError>>;
}

/// Where a new consumer group starts reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// At the end of the topic: only events published afterwards.
    Latest,
    /// At the oldest event the topic still holds.
    Oldest,
}

/// The prefix of the consumer groups [`EventBus::subscribe_instance`] makes.
pub const INSTANCE_GROUP_PREFIX: &str = "instance:";

/// Identifies an event within its topic; opaque, in the `<milliseconds>-<sequence>` form of Redis stream ids.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EventId(String);

impl EventId {
    pub(crate) fn new(id: String) -> Self {
        Self(id)
    }

    /// Returns the id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Configures a bus: redelivery, stream length cap and read batching.
#[derive(Clone, Debug)]
pub struct BusOptions {
    /// How long a delivered event may stay unacknowledged before it is delivered again.
    pub redeliver_after: Duration,
    /// Approximate number of events kept per topic; older ones are trimmed even if unacknowledged (0: no cap).
    pub max_len: usize,
    /// Largest number of events fetched from Redis in one read.
    pub batch_size: usize,
    /// Longest time one Redis read blocks waiting for new events.
    pub block: Duration,
    /// How long every consumer of an instance's group must have been idle before another instance takes the group
    /// for one of a dead instance and removes it. A live consumer reads at least every [`BusOptions::block`].
    pub dead_instance_after: Duration,
    /// The prefix of the bus's Redis keys, so that several Cube installations (or test platforms) can share one
    /// Redis without seeing each other's events; `cube` by default.
    pub namespace: String,
}

impl Default for BusOptions {
    fn default() -> Self {
        Self {
            redeliver_after: Duration::from_secs(30),
            max_len: 100_000,
            batch_size: 32,
            block: Duration::from_secs(2),
            dead_instance_after: Duration::from_secs(600),
            namespace: "cube".to_owned(),
        }
    }
}

impl BusOptions {
    /// Returns how often a subscription looks for events whose delivery has expired.
    pub(crate) fn claim_interval(&self) -> Duration {
        (self.redeliver_after / 4).clamp(Duration::from_millis(10), self.block.max(Duration::from_millis(10)))
    }

    pub(crate) fn batch_size(&self) -> usize {
        self.batch_size.max(1)
    }
}

/// Carries one event to one consumer; acknowledge it with [`Delivery::ack`] once handled.
pub struct Delivery {
    /// The id the event was published under.
    pub id: EventId,
    /// The topic the event was published to.
    pub topic: String,
    /// The bytes the publisher sent.
    pub payload: Bytes,
    /// The key the publisher gave the event with [`EventBus::append`]: the same on every publication of one
    /// event, unlike [`Delivery::id`], so consumers deduplicate on it.
    pub key: Option<String>,
    /// How many times the event has been delivered in this group: 1 the first time, more on redelivery.
    pub delivery_count: u64,
    acker: Acker,
}

impl Delivery {
    /// Acknowledges the event, so that the group never delivers it again; acknowledging twice is harmless.
    ///
    /// Fails only when Redis cannot be reached, in which case the event is delivered again after
    /// [`BusOptions::redeliver_after`].
    pub async fn ack(&self) -> Result<(), BusError> {
        match &self.acker {
            Acker::Memory { group, seq } => {
                group.ack(*seq);
                Ok(())
            }
            Acker::Redis(group) => group.ack(&self.id).await,
        }
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("id", &self.id)
            .field("topic", &self.topic)
            .field("key", &self.key)
            .field("payload_len", &self.payload.len())
            .field("delivery_count", &self.delivery_count)
            .finish_non_exhaustive()
    }
}

/// Knows where to send the acknowledgement of one delivery.
enum Acker {
    Memory { group: Arc<memory::GroupHandle>, seq: u64 },
    Redis(Arc<redis_bus::GroupHandle>),
}

/// Streams the deliveries of one consumer; dropping it stops consuming.
///
/// Transient failures (a lost Redis connection) are retried inside the stream and logged; an `Err` item reports
/// an event that could not be read, and the stream goes on after it.
pub struct Subscription {
    topic: String,
    group: String,
    consumer: String,
    inner: BoxStream<'static, Result<Delivery, BusError>>,
    /// Removes an instance's group when the subscription is dropped.
    on_drop: Option<Box<dyn FnOnce() + Send>>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(remove) = self.on_drop.take() {
            remove();
        }
    }
}

impl Subscription {
    fn new(topic: &str, group: &str, consumer: &str, inner: BoxStream<'static, Result<Delivery, BusError>>) -> Self {
        Self {
            topic: topic.to_owned(),
            group: group.to_owned(),
            consumer: consumer.to_owned(),
            inner,
            on_drop: None,
        }
    }

    /// Makes dropping the subscription run `remove` (which removes the group).
    fn removing_group_on_drop(mut self, remove: impl FnOnce() + Send + 'static) -> Self {
        self.on_drop = Some(Box::new(remove));
        self
    }

    /// Returns the topic this subscription reads.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Returns the consumer group this subscription belongs to.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Returns the consumer name this subscription reads as.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }
}

impl Stream for Subscription {
    type Item = Result<Delivery, BusError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

const MAX_NAME_LEN: usize = 200;

/// Checks a topic, group or consumer name, so that names map to Redis keys one to one.
fn validate_name(field: &'static str, value: &str) -> Result<(), BusError> {
    let valid = !value.is_empty()
        && value.len() <= MAX_NAME_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'/'));
    if valid {
        Ok(())
    } else {
        Err(BusError::InvalidName {
            field,
            value: value.to_owned(),
        })
    }
}

fn validate_names(topic: &str, group: &str, consumer: &str) -> Result<(), BusError> {
    validate_name("topic", topic)?;
    validate_name("group", group)?;
    validate_name("consumer", consumer)
}
