//! What the watcher's tests share: reading its transitions off the bus.

use cube_bus::Subscription;
use cube_proto::cube::watcher::v1::WorkloadTransition;
use futures::StreamExt as _;
use prost::Message as _;

/// The next transition published about an object of `namespace` (each delivery is acknowledged; those of other
/// namespaces, which other tests' pods cause, are skipped).
pub(crate) async fn next_in(subscription: &mut Subscription, namespace: &str) -> WorkloadTransition {
    loop {
        let delivery = subscription
            .next()
            .await
            .expect("the subscription is open")
            .expect("a delivery");
        delivery.ack().await.expect("acknowledging");
        let transition = WorkloadTransition::decode(delivery.payload.clone()).expect("a transition");
        if transition.namespace == namespace {
            return transition;
        }
    }
}
