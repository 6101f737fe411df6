use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use deadpool_redis::Pool;
use deadpool_redis::redis::aio::{ConnectionLike, MultiplexedConnection};
use deadpool_redis::redis::{self, Value};
use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::time::Instant;

use crate::{
    Acker, BusError, BusOptions, Delivery, EventBus, EventId, INSTANCE_GROUP_PREFIX, Start, Subscription,
    validate_name, validate_names,
};

/// Name of the stream entry field that holds an event's payload.
const PAYLOAD_FIELD: &str = "p";
/// Name of the stream entry field that holds the key a publisher gave an event.
const KEY_FIELD: &str = "k";
/// Pause before the first retry of a failed subscription read; it doubles with every further failure.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between retries of a failed subscription read.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Extra time a blocking read is given over its BLOCK before the connection gives up on the reply.
const BLOCK_REPLY_GRACE: Duration = Duration::from_secs(5);

/// Keeps topics in Redis Streams, one stream per topic (`{namespace}:events:{topic}`, the namespace `cube` by
/// default), with consumer groups.
///
/// Publishing is `XADD` with an approximate `MAXLEN` cap; a subscription reads with `XREADGROUP … BLOCK` on a
/// connection of its own (taken out of the pool, so blocked reads never starve it), acknowledges with `XACK` and
/// takes over expired deliveries with `XAUTOCLAIM`. Needs Redis 6.2 or newer.
#[derive(Clone)]
pub struct RedisBus {
    pool: Pool,
    options: Arc<BusOptions>,
    /// Client ids of connections dropped while blocked in a read, to be unblocked before they take events.
    abandoned: Arc<Mutex<Vec<i64>>>,
}

impl RedisBus {
    /// Creates a bus that talks to Redis through `pool`.
    pub fn new(pool: Pool, options: BusOptions) -> Self {
        Self {
            pool,
            options: Arc::new(options),
            abandoned: Arc::default(),
        }
    }

    /// Returns the Redis key of the stream that holds `topic` in `namespace` ([`BusOptions::namespace`]):
    /// `{namespace}:events:{topic}`.
    pub fn stream_key(namespace: &str, topic: &str) -> String {
        format!("{namespace}:events:{topic}")
    }

    /// Returns the key of `topic`'s stream in this bus's namespace.
    fn key(&self, topic: &str) -> String {
        Self::stream_key(&self.options.namespace, topic)
    }
}

impl RedisBus {
    /// Appends an event with `XADD`, with the publisher's key when it gave one.
    fn append_event<'a>(
        &'a self,
        topic: &'a str,
        key: Option<&'a str>,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<EventId, BusError>> {
        Box::pin(async move {
            validate_name("topic", topic)?;
            let mut xadd = redis::cmd("XADD");
            xadd.arg(self.key(topic));
            if self.options.max_len > 0 {
                xadd.arg("MAXLEN").arg("~").arg(self.options.max_len);
            }
            xadd.arg("*").arg(PAYLOAD_FIELD).arg(payload.as_ref());
            if let Some(key) = key {
                xadd.arg(KEY_FIELD).arg(key);
            }
            let mut conn = self.pool.get().await?;
            unblock_abandoned(&self.abandoned, &mut conn).await;
            let reply: Value = xadd.query_async(&mut conn).await?;
            let id = text(&reply).ok_or_else(|| BusError::unexpected("XADD", format!("{reply:?}")))?;
            Ok(EventId::new(id))
        })
    }
}

impl std::fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBus")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl EventBus for RedisBus {
    fn append<'a>(
        &'a self,
        topic: &'a str,
        key: Option<&'a str>,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<EventId, BusError>> {
        self.append_event(topic, key, payload)
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        consumer: &'a str,
    ) -> BoxFuture<'a, Result<Subscription, BusError>> {
        self.join(topic, group, consumer, "$")
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
            let start = match from {
                Start::Latest => "$",
                Start::Oldest => "0",
            };
            let subscription = self.join(topic, &group, consumer, start).await?;
            {
                // The consumer exists from now on, so its group is never taken for a dead instance's.
                let mut conn = self.pool.get().await?;
                redis::cmd("XGROUP")
                    .arg("CREATECONSUMER")
                    .arg(self.key(topic))
                    .arg(&group)
                    .arg(consumer)
                    .query_async::<()>(&mut conn)
                    .await?;
                self.remove_dead_instances(&mut conn, topic, &group).await;
            }
            let pool = self.pool.clone();
            let key = self.key(topic);
            Ok(subscription.removing_group_on_drop(move || {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    tracing::warn!(%key, %group, "no runtime to remove an instance's consumer group on");
                    return;
                };
                runtime.spawn(async move {
                    let removed = async {
                        let mut conn = pool.get().await?;
                        destroy_group(&mut conn, &key, &group).await
                    };
                    if let Err(error) = removed.await {
                        tracing::warn!(%error, %key, %group, "removing an instance's consumer group");
                    }
                });
            }))
        })
    }
}

/// Removes consumer group `group` of the stream at `key`.
async fn destroy_group(conn: &mut impl ConnectionLike, key: &str, group: &str) -> Result<(), BusError> {
    redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(key)
        .arg(group)
        .query_async::<()>(conn)
        .await?;
    tracing::debug!(%key, %group, "removed consumer group");
    Ok(())
}

impl RedisBus {
    /// Removes the instance groups of `topic` other than `own` all of whose consumers have been idle for
    /// [`BusOptions::dead_instance_after`]: groups of instances that died without removing theirs. Failures are
    /// logged; the next instance tries again.
    async fn remove_dead_instances(&self, conn: &mut impl ConnectionLike, topic: &str, own: &str) {
        let key = self.key(topic);
        let idle_limit = u64::try_from(self.options.dead_instance_after.as_millis()).unwrap_or(u64::MAX);
        let groups: Vec<HashMap<String, redis::Value>> =
            match redis::cmd("XINFO").arg("GROUPS").arg(&key).query_async(conn).await {
                Ok(groups) => groups,
                Err(error) => {
                    tracing::warn!(%error, %key, "listing consumer groups");
                    return;
                }
            };
        for group in groups {
            let Some(name) = group
                .get("name")
                .and_then(|name| redis::from_redis_value::<String>(name.clone()).ok())
            else {
                continue;
            };
            if name == own || !name.starts_with(INSTANCE_GROUP_PREFIX) {
                continue;
            }
            let consumers: Vec<HashMap<String, redis::Value>> = match redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(&key)
                .arg(&name)
                .query_async(conn)
                .await
            {
                Ok(consumers) => consumers,
                Err(error) => {
                    tracing::warn!(%error, %key, group = %name, "listing a group's consumers");
                    continue;
                }
            };
            let idle = |consumer: &HashMap<String, redis::Value>| {
                consumer
                    .get("idle")
                    .and_then(|idle| redis::from_redis_value::<u64>(idle.clone()).ok())
                    .is_some_and(|idle| idle >= idle_limit)
            };
            // A group without consumers is being made (its consumer comes right after): never take it for dead.
            if !consumers.is_empty() && consumers.iter().all(idle) {
                match destroy_group(conn, &key, &name).await {
                    Ok(()) => tracing::info!(%key, group = %name, "removed the consumer group of a dead instance"),
                    Err(error) => tracing::warn!(%error, %key, group = %name, "removing a dead instance's group"),
                }
            }
        }
    }
}

impl RedisBus {
    /// Subscribes, creating the group at stream id `start` (`$`: the end, `0`: the oldest entry) when it is new.
    fn join<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        consumer: &'a str,
        start: &'static str,
    ) -> BoxFuture<'a, Result<Subscription, BusError>> {
        Box::pin(async move {
            validate_names(topic, group, consumer)?;
            let handle = Arc::new(GroupHandle {
                pool: self.pool.clone(),
                key: self.key(topic),
                topic: topic.to_owned(),
                group: group.to_owned(),
            });
            {
                let mut conn = self.pool.get().await?;
                unblock_abandoned(&self.abandoned, &mut conn).await;
                handle.create_group(&mut conn, start).await?;
            }
            let reader = Reader {
                handle,
                consumer: consumer.to_owned(),
                options: Arc::clone(&self.options),
                abandoned: Arc::clone(&self.abandoned),
                conn: None,
                blocked_client: None,
                buffer: VecDeque::new(),
                history_after: Some("0".to_owned()),
                claim_cursor: "0-0".to_owned(),
                next_claim: Instant::now(),
                failures: 0,
            };
            let stream = futures::stream::unfold(reader, |mut reader| async move {
                let item = reader.next().await;
                Some((item, reader))
            });
            Ok(Subscription::new(topic, group, consumer, stream.boxed()))
        })
    }
}

/// Points at one consumer group of one stream, for acknowledgements and group creation.
pub(crate) struct GroupHandle {
    pool: Pool,
    key: String,
    topic: String,
    group: String,
}

impl GroupHandle {
    pub(crate) async fn ack(&self, id: &EventId) -> Result<(), BusError> {
        let mut conn = self.pool.get().await?;
        self.xack(&mut conn, id.as_str()).await
    }

    async fn xack(&self, conn: &mut impl ConnectionLike, id: &str) -> Result<(), BusError> {
        redis::cmd("XACK")
            .arg(&self.key)
            .arg(&self.group)
            .arg(id)
            .query_async::<()>(conn)
            .await?;
        Ok(())
    }

    /// Creates the group at stream id `start` (creating the stream too), unless it exists.
    async fn create_group(&self, conn: &mut impl ConnectionLike, start: &str) -> Result<(), BusError> {
        let created = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.key)
            .arg(&self.group)
            .arg(start)
            .arg("MKSTREAM")
            .query_async::<()>(conn)
            .await;
        match created {
            Ok(()) => {
                tracing::debug!(topic = %self.topic, group = %self.group, "created consumer group");
                Ok(())
            }
            Err(error) if error.code() == Some("BUSYGROUP") => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}

/// Reads one consumer's deliveries: its own pending entries first, then expired ones of the group and new ones.
struct Reader {
    handle: Arc<GroupHandle>,
    consumer: String,
    options: Arc<BusOptions>,
    abandoned: Arc<Mutex<Vec<i64>>>,
    /// The dedicated connection and its client id (when `CLIENT ID` answered); `None` after a failure.
    conn: Option<(MultiplexedConnection, Option<i64>)>,
    /// The client id of the connection while a blocking read is on the wire, to unblock if the reader is dropped.
    blocked_client: Option<i64>,
    buffer: VecDeque<Result<Delivery, BusError>>,
    /// While replaying this consumer's pending entries, the id to read after.
    history_after: Option<String>,
    claim_cursor: String,
    next_claim: Instant,
    failures: u32,
}

impl Reader {
    async fn next(&mut self) -> Result<Delivery, BusError> {
        loop {
            if let Some(item) = self.buffer.pop_front() {
                return item;
            }
            match self.fill().await {
                Ok(()) => self.failures = 0,
                Err(error) => {
                    self.failures = self.failures.saturating_add(1);
                    let delay = MIN_BACKOFF
                        .saturating_mul(2u32.saturating_pow(self.failures - 1))
                        .min(MAX_BACKOFF);
                    tracing::warn!(
                        topic = %self.handle.topic,
                        group = %self.handle.group,
                        consumer = %self.consumer,
                        attempt = self.failures,
                        retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        %error,
                        "event bus read failed"
                    );
                    tokio::time::sleep(delay).await;
                    if is_missing_group(&error) {
                        // The stream or group was deleted under us: start again from its end.
                        self.recreate_group().await;
                    }
                }
            }
        }
    }

    async fn recreate_group(&mut self) {
        let created = match self.handle.pool.get().await {
            Ok(mut conn) => self.handle.create_group(&mut conn, "$").await,
            Err(error) => Err(error.into()),
        };
        if let Err(error) = created {
            tracing::warn!(
                topic = %self.handle.topic,
                group = %self.handle.group,
                %error,
                "recreating consumer group failed"
            );
        }
        self.history_after = Some("0".to_owned());
        self.claim_cursor = "0-0".to_owned();
    }

    /// Reads the next batch into the buffer; a failure drops the connection, so the retry opens a new one.
    async fn fill(&mut self) -> Result<(), BusError> {
        let (mut conn, client_id) = match self.conn.take() {
            Some(conn) => conn,
            None => self.open().await?,
        };
        if let Some(after) = self.history_after.clone() {
            let entries = self.read(&mut conn, &after, None).await?;
            let last = entries.last().map(|entry| entry.id.clone());
            self.push_redelivered(&mut conn, entries).await?;
            self.history_after = last;
        } else if Instant::now() >= self.next_claim {
            let entries = self.claim_expired(&mut conn).await?;
            self.push_redelivered(&mut conn, entries).await?;
        } else {
            let block = self
                .next_claim
                .saturating_duration_since(Instant::now())
                .min(self.options.block)
                .max(Duration::from_millis(1));
            self.blocked_client = client_id;
            let entries = self.read(&mut conn, ">", Some(block)).await;
            self.blocked_client = None;
            for entry in entries? {
                self.push(&mut conn, entry, 1).await?;
            }
        }
        self.conn = Some((conn, client_id));
        Ok(())
    }

    async fn open(&self) -> Result<(MultiplexedConnection, Option<i64>), BusError> {
        let mut conn = deadpool_redis::Connection::take(self.handle.pool.get().await?);
        conn.set_response_timeout(self.options.block + BLOCK_REPLY_GRACE);
        let client_id = match redis::cmd("CLIENT").arg("ID").query_async::<i64>(&mut conn).await {
            Ok(id) => Some(id),
            Err(error) => {
                tracing::debug!(%error, "client id unavailable, abandoned reads will not be unblocked");
                None
            }
        };
        Ok((conn, client_id))
    }

    /// Reads this consumer's entries after `after`: its own pending history for an id, new entries for `>`
    /// (then waiting up to `block` for some to arrive).
    async fn read(
        &self,
        conn: &mut MultiplexedConnection,
        after: &str,
        block: Option<Duration>,
    ) -> Result<Vec<Entry>, BusError> {
        let mut command = redis::cmd("XREADGROUP");
        command
            .arg("GROUP")
            .arg(&self.handle.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(self.options.batch_size());
        if let Some(block) = block {
            command
                .arg("BLOCK")
                .arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX));
        }
        let reply: Value = command
            .arg("STREAMS")
            .arg(&self.handle.key)
            .arg(after)
            .query_async(conn)
            .await?;
        parse_read_reply(reply)
    }

    async fn claim_expired(&mut self, conn: &mut MultiplexedConnection) -> Result<Vec<Entry>, BusError> {
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(&self.handle.key)
            .arg(&self.handle.group)
            .arg(&self.consumer)
            .arg(u64::try_from(self.options.redeliver_after.as_millis()).unwrap_or(u64::MAX))
            .arg(&self.claim_cursor)
            .arg("COUNT")
            .arg(self.options.batch_size())
            .query_async(conn)
            .await?;
        let (cursor, entries) = parse_autoclaim_reply(reply)?;
        if cursor == "0-0" {
            // The whole pending list was scanned: rest until the next interval.
            self.next_claim = Instant::now() + self.options.claim_interval();
        }
        self.claim_cursor = cursor;
        Ok(entries)
    }

    /// Buffers entries read a second time or more, with their delivery counts from `XPENDING`.
    async fn push_redelivered(
        &mut self,
        conn: &mut MultiplexedConnection,
        entries: Vec<Entry>,
    ) -> Result<(), BusError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for entry in &entries {
            pipe.cmd("XPENDING")
                .arg(&self.handle.key)
                .arg(&self.handle.group)
                .arg(&entry.id)
                .arg(&entry.id)
                .arg(1);
        }
        let replies: Vec<Value> = pipe.query_async(conn).await?;
        for (entry, reply) in entries.into_iter().zip(replies) {
            // Acknowledged by someone else since: it still arrived, and it was not the first time.
            let count = parse_pending_count(&reply).unwrap_or(2);
            self.push(conn, entry, count).await?;
        }
        Ok(())
    }

    async fn push(
        &mut self,
        conn: &mut MultiplexedConnection,
        entry: Entry,
        delivery_count: u64,
    ) -> Result<(), BusError> {
        let payload = match entry.payload {
            EntryPayload::Present(payload) => payload,
            EntryPayload::Trimmed => {
                tracing::warn!(
                    topic = %self.handle.topic,
                    group = %self.handle.group,
                    id = %entry.id,
                    "pending event was trimmed before it was acknowledged"
                );
                return self.handle.xack(conn, &entry.id).await;
            }
            EntryPayload::Missing => {
                // Acknowledged so that it is not redelivered forever; the consumer still hears about it.
                tracing::warn!(topic = %self.handle.topic, id = %entry.id, "stream entry without payload field");
                self.handle.xack(conn, &entry.id).await?;
                self.buffer.push_back(Err(BusError::unexpected(
                    "XREADGROUP",
                    format!(
                        "entry {} of {} has no field {PAYLOAD_FIELD:?}",
                        entry.id, self.handle.key
                    ),
                )));
                return Ok(());
            }
        };
        self.buffer.push_back(Ok(Delivery {
            id: EventId::new(entry.id),
            topic: self.handle.topic.clone(),
            key: entry.key,
            payload,
            delivery_count,
            acker: Acker::Redis(Arc::clone(&self.handle)),
        }));
        Ok(())
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        // Redis keeps a blocked XREADGROUP until it sees the dropped connection close, and could hand it events
        // for a consumer that is gone in between: unblock it (as if timed out) from another connection. The next
        // publish or subscribe on this bus does it first too, on the connection it then uses, so no event of
        // this bus can reach the abandoned read.
        let Some(client_id) = self.blocked_client else {
            return;
        };
        self.abandoned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(client_id);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let pool = self.handle.pool.clone();
            let abandoned = Arc::clone(&self.abandoned);
            runtime.spawn(async move {
                if let Ok(mut conn) = pool.get().await {
                    unblock_abandoned(&abandoned, &mut conn).await;
                }
            });
        }
    }
}

/// Unblocks the reads of dropped subscriptions, so that they return without taking any event.
///
/// Ids are forgotten only once their `CLIENT UNBLOCK` has been answered: a caller that finds the list empty knows
/// that Redis has processed every unblock sent so far, before anything it sends next on its own connection.
async fn unblock_abandoned(abandoned: &Mutex<Vec<i64>>, conn: &mut impl ConnectionLike) {
    let ids = abandoned.lock().unwrap_or_else(PoisonError::into_inner).clone();
    if ids.is_empty() {
        return;
    }
    for &client_id in &ids {
        if let Err(error) = redis::cmd("CLIENT")
            .arg("UNBLOCK")
            .arg(client_id)
            .query_async::<()>(conn)
            .await
        {
            tracing::warn!(client_id, %error, "unblocking an abandoned read failed");
        }
    }
    abandoned
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .retain(|id| !ids.contains(id));
}

fn is_missing_group(error: &BusError) -> bool {
    matches!(error, BusError::Redis(error) if error.code() == Some("NOGROUP"))
}

/// One stream entry as read from Redis.
struct Entry {
    id: String,
    key: Option<String>,
    payload: EntryPayload,
}

enum EntryPayload {
    Present(Bytes),
    /// The entry is still pending but the stream no longer holds it (trimmed by `MAXLEN`).
    Trimmed,
    /// The entry has no payload field: something other than this bus wrote it.
    Missing,
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// Parses the reply of `XREADGROUP` on one stream: nil on timeout, else `[[key, entries]]` (a map in RESP3).
fn parse_read_reply(reply: Value) -> Result<Vec<Entry>, BusError> {
    let streams = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(streams) => streams
            .into_iter()
            .map(|stream| match stream {
                Value::Array(mut pair) if pair.len() == 2 => Ok(pair.swap_remove(1)),
                other => Err(BusError::unexpected("XREADGROUP", format!("stream {other:?}"))),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Value::Map(pairs) => pairs.into_iter().map(|(_, entries)| entries).collect(),
        other => return Err(BusError::unexpected("XREADGROUP", format!("{other:?}"))),
    };
    let mut entries = Vec::new();
    for stream in streams {
        entries.extend(parse_entries("XREADGROUP", stream)?);
    }
    Ok(entries)
}

/// Parses the reply of `XAUTOCLAIM`: `[next cursor, entries, deleted ids]` (no deleted ids before Redis 7).
fn parse_autoclaim_reply(reply: Value) -> Result<(String, Vec<Entry>), BusError> {
    let Value::Array(mut items) = reply else {
        return Err(BusError::unexpected("XAUTOCLAIM", format!("{reply:?}")));
    };
    if items.len() < 2 {
        return Err(BusError::unexpected("XAUTOCLAIM", format!("{items:?}")));
    }
    let entries = parse_entries("XAUTOCLAIM", items.swap_remove(1))?;
    let cursor = text(&items[0]).ok_or_else(|| BusError::unexpected("XAUTOCLAIM", format!("cursor {:?}", items[0])))?;
    Ok((cursor, entries))
}

fn parse_entries(command: &'static str, entries: Value) -> Result<Vec<Entry>, BusError> {
    let Value::Array(entries) = entries else {
        return Err(BusError::unexpected(command, format!("entries {entries:?}")));
    };
    entries
        .into_iter()
        // Redis 6.2 answers XAUTOCLAIM with nil for entries deleted from the stream.
        .filter(|entry| !matches!(entry, Value::Nil))
        .map(|entry| parse_entry(command, entry))
        .collect()
}

/// Parses `[id, [field, value, …]]`, where the fields are nil when the entry was trimmed.
fn parse_entry(command: &'static str, entry: Value) -> Result<Entry, BusError> {
    let Value::Array(mut parts) = entry else {
        return Err(BusError::unexpected(command, format!("entry {entry:?}")));
    };
    if parts.len() != 2 {
        return Err(BusError::unexpected(command, format!("entry {parts:?}")));
    }
    let fields = parts.swap_remove(1);
    let id = text(&parts[0]).ok_or_else(|| BusError::unexpected(command, format!("entry id {:?}", parts[0])))?;
    let pairs: Vec<(Value, Value)> = match fields {
        Value::Nil => {
            return Ok(Entry {
                id,
                key: None,
                payload: EntryPayload::Trimmed,
            });
        }
        Value::Array(flat) => {
            let mut flat = flat.into_iter();
            let mut pairs = Vec::new();
            while let (Some(field), Some(value)) = (flat.next(), flat.next()) {
                pairs.push((field, value));
            }
            pairs
        }
        Value::Map(pairs) => pairs,
        other => {
            return Err(BusError::unexpected(command, format!("fields of {id}: {other:?}")));
        }
    };
    let mut payload = None;
    let mut key = None;
    for (field, value) in pairs {
        match (text(&field).as_deref(), value) {
            (Some(PAYLOAD_FIELD), Value::BulkString(bytes)) => payload = Some(Bytes::from(bytes)),
            (Some(KEY_FIELD), value) => key = text(&value),
            _ => {}
        }
    }
    Ok(Entry {
        id,
        key,
        payload: payload.map_or(EntryPayload::Missing, EntryPayload::Present),
    })
}

/// Reads the delivery count out of `XPENDING key group id id 1`: `[[id, consumer, idle ms, count]]`.
fn parse_pending_count(reply: &Value) -> Option<u64> {
    let Value::Array(rows) = reply else {
        return None;
    };
    let Value::Array(row) = rows.first()? else {
        return None;
    };
    match row.get(3)? {
        Value::Int(count) => u64::try_from(*count).ok(),
        _ => None,
    }
}
