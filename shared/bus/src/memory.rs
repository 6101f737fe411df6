use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::{
    Acker, BusError, BusOptions, Delivery, EventBus, EventId, INSTANCE_GROUP_PREFIX, Start, Subscription,
    validate_name, validate_names,
};

/// Runs the bus inside this process, for `cube up`: the semantics of [`crate::RedisBus`] without Redis.
///
/// Events live in memory only, so they do not survive a restart. Each topic keeps the events some group has not
/// acknowledged yet, capped at [`BusOptions::max_len`]; clones share the same topics.
#[derive(Clone)]
pub struct MemoryBus {
    shared: Arc<Shared>,
}

impl MemoryBus {
    /// Creates an empty bus.
    pub fn new(options: BusOptions) -> Self {
        Self {
            shared: Arc::new(Shared {
                options,
                topics: Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl std::fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBus")
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

impl EventBus for MemoryBus {
    fn append<'a>(
        &'a self,
        topic: &'a str,
        key: Option<&'a str>,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<EventId, BusError>> {
        self.append_event(topic, key.map(str::to_owned), payload)
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        consumer: &'a str,
    ) -> BoxFuture<'a, Result<Subscription, BusError>> {
        self.join(topic, group, consumer, false)
    }

    fn subscribe_instance<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        consumer: &'a str,
        from: Start,
    ) -> BoxFuture<'a, Result<Subscription, BusError>> {
        Box::pin(async move {
            let group = format!("{INSTANCE_GROUP_PREFIX}{group}");
            let subscription = self.join(topic, &group, consumer, from == Start::Oldest).await?;
            let shared = Arc::clone(&self.shared);
            let topic = topic.to_owned();
            Ok(subscription.removing_group_on_drop(move || {
                let mut topics = shared.lock();
                if let Some(state) = topics.get_mut(&topic) {
                    state.groups.remove(&group);
                    state.trim(shared.options.max_len);
                }
            }))
        })
    }
}

impl MemoryBus {
    /// Appends an event, with the publisher's key when it gave one.
    fn append_event<'a>(
        &'a self,
        topic: &'a str,
        key: Option<String>,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<EventId, BusError>> {
        Box::pin(async move {
            validate_name("topic", topic)?;
            let (id, notify) = {
                let mut topics = self.shared.lock();
                let state = topics.entry(topic.to_owned()).or_default();
                let seq = state.next_seq;
                state.next_seq += 1;
                let millis = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis();
                let id = EventId::new(format!("{millis}-{seq}"));
                state.events.push_back(Event {
                    seq,
                    id: id.clone(),
                    key,
                    payload,
                });
                state.trim(self.shared.options.max_len);
                (id, Arc::clone(&state.notify))
            };
            notify.notify_waiters();
            Ok(id)
        })
    }
}

impl MemoryBus {
    /// The consumer groups of `topic`, sorted.
    pub fn groups(&self, topic: &str) -> Vec<String> {
        let mut groups: Vec<String> = self
            .shared
            .lock()
            .get(topic)
            .map(|state| state.groups.keys().cloned().collect())
            .unwrap_or_default();
        groups.sort();
        groups
    }
}

impl MemoryBus {
    /// Subscribes, creating the group at the end of the topic or, with `retained`, at its oldest event.
    fn join<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        consumer: &'a str,
        retained: bool,
    ) -> BoxFuture<'a, Result<Subscription, BusError>> {
        Box::pin(async move {
            validate_names(topic, group, consumer)?;
            let notify = {
                let mut topics = self.shared.lock();
                let state = topics.entry(topic.to_owned()).or_default();
                let start = match state.events.front() {
                    Some(oldest) if retained => oldest.seq,
                    _ => state.next_seq,
                };
                state.groups.entry(group.to_owned()).or_insert_with(|| {
                    tracing::debug!(topic, group, "created consumer group");
                    Group::starting_at(start)
                });
                Arc::clone(&state.notify)
            };
            let consumer_state = Consumer {
                group: Arc::new(GroupHandle {
                    shared: Arc::clone(&self.shared),
                    topic: topic.to_owned(),
                    group: group.to_owned(),
                }),
                consumer: consumer.to_owned(),
                history_after: Some(0),
                notify,
            };
            let stream = futures::stream::unfold(consumer_state, |mut consumer| async move {
                let delivery = consumer.next().await;
                Some((Ok(delivery), consumer))
            });
            Ok(Subscription::new(topic, group, consumer, stream.boxed()))
        })
    }
}

struct Shared {
    options: BusOptions,
    topics: Mutex<HashMap<String, Topic>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Topic>> {
        // Nothing panics while the lock is held, and every update leaves the maps consistent.
        self.topics.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Topic {
    /// Sequence number of the next event; sequence numbers of `events` are contiguous and end before it.
    next_seq: u64,
    events: VecDeque<Event>,
    groups: HashMap<String, Group>,
    notify: Arc<Notify>,
}

impl Default for Topic {
    fn default() -> Self {
        Self {
            next_seq: 1,
            events: VecDeque::new(),
            groups: HashMap::new(),
            notify: Arc::new(Notify::new()),
        }
    }
}

impl Topic {
    /// Drops the events every group has acknowledged, then the oldest ones beyond `max_len`.
    fn trim(&mut self, max_len: usize) {
        let floor = self.groups.values().map(Group::floor).min().unwrap_or(self.next_seq);
        while self.events.front().is_some_and(|event| event.seq < floor) {
            self.events.pop_front();
        }
        if max_len > 0 {
            while self.events.len() > max_len {
                self.events.pop_front();
            }
        }
    }

    fn event(events: &VecDeque<Event>, seq: u64) -> Option<&Event> {
        let first = events.front()?.seq;
        let index = usize::try_from(seq.checked_sub(first)?).ok()?;
        events.get(index)
    }
}

struct Event {
    seq: u64,
    id: EventId,
    key: Option<String>,
    payload: Bytes,
}

struct Group {
    /// Sequence number of the first event not yet delivered to this group.
    next_new: u64,
    pending: BTreeMap<u64, Pending>,
}

impl Group {
    fn starting_at(next_new: u64) -> Self {
        Self {
            next_new,
            pending: BTreeMap::new(),
        }
    }

    /// Returns the lowest sequence number this group may still need.
    fn floor(&self) -> u64 {
        self.pending
            .keys()
            .next()
            .map_or(self.next_new, |&seq| seq.min(self.next_new))
    }
}

struct Pending {
    consumer: String,
    delivered_at: Instant,
    count: u64,
}

/// Points at one group of one topic, for acknowledgements.
pub(crate) struct GroupHandle {
    shared: Arc<Shared>,
    topic: String,
    group: String,
}

impl GroupHandle {
    pub(crate) fn ack(&self, seq: u64) {
        let mut topics = self.shared.lock();
        if let Some(topic) = topics.get_mut(&self.topic) {
            if let Some(group) = topic.groups.get_mut(&self.group) {
                group.pending.remove(&seq);
            }
            topic.trim(self.shared.options.max_len);
        }
    }
}

struct Consumer {
    group: Arc<GroupHandle>,
    consumer: String,
    /// While replaying this consumer's own pending events, the sequence number replayed last.
    history_after: Option<u64>,
    notify: Arc<Notify>,
}

impl Consumer {
    async fn next(&mut self) -> Delivery {
        let notify = Arc::clone(&self.notify);
        loop {
            // Registered before looking at the topic, so a publish in between still wakes us.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_next() {
                Ok(delivery) => return delivery,
                Err(Some(deadline)) => {
                    tokio::select! {
                        () = &mut notified => {}
                        () = tokio::time::sleep_until(deadline) => {}
                    }
                }
                Err(None) => notified.await,
            }
        }
    }

    /// Takes the next delivery for this consumer, or returns when the next redelivery falls due, if any.
    fn try_next(&mut self) -> Result<Delivery, Option<Instant>> {
        let handle = &self.group;
        let options = &handle.shared.options;
        let mut topics = handle.shared.lock();
        let topic = topics.entry(handle.topic.clone()).or_default();
        let next_seq = topic.next_seq;
        let Topic { events, groups, .. } = topic;
        let group = groups
            .entry(handle.group.clone())
            .or_insert_with(|| Group::starting_at(next_seq));
        let now = Instant::now();

        // First the events this consumer was given and has not acknowledged, as after a restart.
        while let Some(after) = self.history_after {
            let own = group
                .pending
                .range(after + 1..)
                .find(|(_, pending)| pending.consumer == self.consumer)
                .map(|(&seq, _)| seq);
            let Some(seq) = own else {
                self.history_after = None;
                break;
            };
            self.history_after = Some(seq);
            if let Some(delivery) = self.redeliver(events, group, seq, now) {
                return Ok(delivery);
            }
        }

        // Then events whose delivery expired, whichever consumer had them.
        loop {
            let expired = group
                .pending
                .iter()
                .find(|(_, pending)| pending.delivered_at + options.redeliver_after <= now)
                .map(|(&seq, _)| seq);
            let Some(seq) = expired else { break };
            if let Some(delivery) = self.redeliver(events, group, seq, now) {
                return Ok(delivery);
            }
        }

        // Then new events, skipping any trimmed before this group got to them.
        while group.next_new < next_seq {
            let seq = group.next_new;
            group.next_new += 1;
            if let Some(event) = Topic::event(events, seq) {
                group.pending.insert(
                    seq,
                    Pending {
                        consumer: self.consumer.clone(),
                        delivered_at: now,
                        count: 1,
                    },
                );
                return Ok(self.delivery(event, 1));
            }
        }

        Err(group
            .pending
            .values()
            .map(|pending| pending.delivered_at + options.redeliver_after)
            .min())
    }

    /// Hands a pending event to this consumer again, or forgets it when it was trimmed.
    fn redeliver(&self, events: &VecDeque<Event>, group: &mut Group, seq: u64, now: Instant) -> Option<Delivery> {
        let Some(event) = Topic::event(events, seq) else {
            group.pending.remove(&seq);
            tracing::warn!(
                topic = %self.group.topic,
                group = %self.group.group,
                seq,
                "pending event was trimmed before it was acknowledged"
            );
            return None;
        };
        let pending = group.pending.get_mut(&seq)?;
        pending.consumer.clone_from(&self.consumer);
        pending.delivered_at = now;
        pending.count += 1;
        let count = pending.count;
        Some(self.delivery(event, count))
    }

    fn delivery(&self, event: &Event, delivery_count: u64) -> Delivery {
        Delivery {
            id: event.id.clone(),
            topic: self.group.topic.clone(),
            key: event.key.clone(),
            payload: event.payload.clone(),
            delivery_count,
            acker: Acker::Memory {
                group: Arc::clone(&self.group),
                seq: event.seq,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;

    use super::*;

    fn bus(max_len: usize) -> MemoryBus {
        MemoryBus::new(BusOptions {
            max_len,
            redeliver_after: Duration::from_secs(60),
            ..BusOptions::default()
        })
    }

    fn held(bus: &MemoryBus, topic: &str) -> usize {
        bus.shared.lock().get(topic).map_or(0, |topic| topic.events.len())
    }

    #[tokio::test]
    async fn events_no_group_needs_are_not_kept() {
        let bus = bus(1000);
        for _ in 0..10 {
            bus.publish("t", Bytes::from_static(b"x")).await.expect("publish");
        }
        assert_eq!(held(&bus, "t"), 0);
    }

    #[tokio::test]
    async fn events_every_group_acknowledged_are_trimmed() {
        let bus = bus(1000);
        let mut first = bus.subscribe("t", "g1", "c").await.expect("subscribe");
        let mut second = bus.subscribe("t", "g2", "c").await.expect("subscribe");
        for _ in 0..10 {
            bus.publish("t", Bytes::from_static(b"x")).await.expect("publish");
        }
        for _ in 0..10 {
            first
                .next()
                .await
                .expect("delivery")
                .expect("readable")
                .ack()
                .await
                .expect("ack");
        }
        assert_eq!(held(&bus, "t"), 10, "g2 has not read anything yet");
        let unacked = second.next().await.expect("delivery").expect("readable");
        for _ in 1..10 {
            second
                .next()
                .await
                .expect("delivery")
                .expect("readable")
                .ack()
                .await
                .expect("ack");
        }
        assert_eq!(held(&bus, "t"), 10, "g2 still holds the first event");
        unacked.ack().await.expect("ack");
        assert_eq!(held(&bus, "t"), 0);
    }

    #[tokio::test]
    async fn topics_are_capped_at_max_len() {
        let bus = bus(5);
        let _sub = bus.subscribe("t", "g", "c").await.expect("subscribe");
        for _ in 0..20 {
            bus.publish("t", Bytes::from_static(b"x")).await.expect("publish");
        }
        assert_eq!(held(&bus, "t"), 5);
    }
}
