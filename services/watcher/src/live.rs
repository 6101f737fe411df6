//! Telling streams that there is something new to read: each event this process records, at once, and each
//! transition another replica publishes (it is published after it is recorded), through the bus. Streams read the
//! history again when told, so what they send always comes from the history, in id order.

use std::sync::Arc;

use cube_bus::{EventBus, Start, Subscription};
use cube_runtime::transition::TOPIC;
use futures::StreamExt as _;
use tokio::sync::watch;

/// How many times something new was recorded (here or elsewhere), for streams to wait on.
#[derive(Debug)]
pub(crate) struct Live {
    news: watch::Sender<u64>,
}

impl Live {
    /// Nothing new yet.
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            news: watch::Sender::new(0),
        })
    }

    /// Something was recorded.
    pub(crate) fn recorded(&self) {
        self.news.send_modify(|count| *count = count.wrapping_add(1));
    }

    /// A receiver that changes whenever something is recorded.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.news.subscribe()
    }
}

/// Subscribes this process to every replica's transitions.
///
/// # Errors
/// Returns the bus's error when the subscription cannot be made.
pub(crate) async fn subscribe(bus: &Arc<dyn EventBus>) -> Result<Subscription, cube_bus::BusError> {
    let instance = cube_kit::identity::jws::random_id(9)
        .unwrap_or_else(|_| format!("{}-{}", std::process::id(), cube_kit::time::now_ms()));
    bus.subscribe_instance(TOPIC, &format!("watcher-live-{instance}"), &instance, Start::Latest)
        .await
}

/// Runs until the subscription ends: each transition published tells the streams to look.
pub(crate) async fn follow(mut transitions: Subscription, live: Arc<Live>) {
    while let Some(delivery) = transitions.next().await {
        live.recorded();
        if let Ok(delivery) = delivery {
            let _ = delivery.ack().await;
        }
    }
}
