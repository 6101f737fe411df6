//! Telling streams when to look again: at the history, after each event this process records (at once) and
//! each transition another replica publishes (it is published after it is recorded), through the bus; and at
//! the caller's memberships, after projects announces a membership change or a deleted project. Streams read
//! the history again when told, so what they send always comes from the history, in id order.

use std::sync::Arc;

use cube_bus::{EventBus, Start, Subscription};
use cube_runtime::transition::TOPIC;
use futures::StreamExt as _;
use tokio::sync::watch;

/// The topic projects announces membership changes on.
const MEMBERS_CHANGED: &str = "project.members.changed";
/// The topic projects announces deleted projects on.
const PROJECT_DELETED: &str = "project.deleted";

/// Counts of news, for streams to wait on.
#[derive(Debug)]
pub(crate) struct Live {
    /// Something was recorded (here or elsewhere).
    news: watch::Sender<u64>,
    /// A membership changed or a project was deleted.
    memberships: watch::Sender<u64>,
}

fn bump(counter: &watch::Sender<u64>) {
    counter.send_modify(|count| *count = count.wrapping_add(1));
}

impl Live {
    /// Nothing new yet.
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            news: watch::Sender::new(0),
            memberships: watch::Sender::new(0),
        })
    }

    /// Something was recorded.
    pub(crate) fn recorded(&self) {
        bump(&self.news);
    }

    /// A receiver that changes whenever something is recorded.
    pub(crate) fn news(&self) -> watch::Receiver<u64> {
        self.news.subscribe()
    }

    /// A receiver that changes whenever memberships may have changed.
    pub(crate) fn memberships(&self) -> watch::Receiver<u64> {
        self.memberships.subscribe()
    }
}

/// This process's subscriptions to what tells its streams to look again.
pub(crate) struct Feeds {
    transitions: Subscription,
    members: Subscription,
    deleted: Subscription,
}

/// Subscribes this process (a group of its own per topic) to every replica's transitions and to projects'
/// membership announcements.
///
/// # Errors
/// Returns the bus's error when a subscription cannot be made.
pub(crate) async fn subscribe(bus: &Arc<dyn EventBus>) -> Result<Feeds, cube_bus::BusError> {
    let instance = cube_kit::identity::jws::random_id(9)
        .unwrap_or_else(|_| format!("{}-{}", std::process::id(), cube_kit::time::now_ms()));
    let group = format!("watcher-live-{instance}");
    Ok(Feeds {
        transitions: bus.subscribe_instance(TOPIC, &group, &instance, Start::Latest).await?,
        members: bus
            .subscribe_instance(MEMBERS_CHANGED, &group, &instance, Start::Latest)
            .await?,
        deleted: bus
            .subscribe_instance(PROJECT_DELETED, &group, &instance, Start::Latest)
            .await?,
    })
}

/// Runs until the subscriptions end: each delivery tells the streams to look again.
pub(crate) async fn follow(feeds: Feeds, live: Arc<Live>) {
    tokio::join!(
        each(feeds.transitions, &live.news),
        each(feeds.members, &live.memberships),
        each(feeds.deleted, &live.memberships),
    );
}

async fn each(mut subscription: Subscription, counter: &watch::Sender<u64>) {
    while let Some(delivery) = subscription.next().await {
        bump(counter);
        if let Ok(delivery) = delivery {
            let _ = delivery.ack().await;
        }
    }
}
