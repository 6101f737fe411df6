//! Reloading the clusters file on SIGHUP. In a test binary of its own: the signal goes to the whole process.

use std::time::Duration;

use cube_clusters::{ClusterRegistry, RegistryError};
use nix::sys::signal::{Signal, raise};
use serde_json::json;

#[tokio::test]
async fn sighup_reloads_the_file_until_the_task_is_dropped() {
    let dir = tempfile::tempdir().expect("a directory");
    let path = dir.path().join("clusters.json");
    let write = |clusters: serde_json::Value| {
        std::fs::write(&path, json!({ "clusters": clusters }).to_string()).expect("writing the clusters file");
    };
    write(json!([{"name": "alpha"}]));
    let registry = ClusterRegistry::load(&path).expect("the file");
    let reloads = cube_clusters::reload_on_sighup(registry.clone()).expect("listening for SIGHUP");

    write(json!([{"name": "alpha"}, {"name": "bravo", "default": true}]));
    raise(Signal::SIGHUP).expect("raising SIGHUP");
    cube_testkit::eventually("the reload after SIGHUP", Duration::from_secs(10), || async {
        (registry.names() == ["bravo", "alpha"]).then_some(())
    })
    .await;

    // A refused file is logged and changes nothing; the task goes on listening.
    write(json!([{"name": "Bravo!"}]));
    raise(Signal::SIGHUP).expect("raising SIGHUP");
    write(json!([{"name": "charlie"}]));
    raise(Signal::SIGHUP).expect("raising SIGHUP");
    cube_testkit::eventually("the reload after the refused one", Duration::from_secs(10), || async {
        (registry.names() == ["charlie"]).then_some(())
    })
    .await;

    // Dropped with the service's background work, it reloads no more.
    drop(reloads);
    let (sender, mut hooked) = tokio::sync::mpsc::unbounded_channel();
    let hook = cube_clusters::on_sighup(move || {
        let sender = sender.clone();
        async move {
            let _ = sender.send(());
            Ok::<(), RegistryError>(())
        }
    })
    .expect("listening for SIGHUP");
    write(json!([{"name": "delta"}]));
    raise(Signal::SIGHUP).expect("raising SIGHUP");
    tokio::time::timeout(Duration::from_secs(10), hooked.recv())
        .await
        .expect("the hook ran")
        .expect("a reload");
    assert_eq!(registry.names(), ["charlie"], "the dropped task did not reload");
    drop(hook);
}
