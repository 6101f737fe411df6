//! Background work tied to an owner: a spawned task that stops when its handle is dropped.

use std::future::Future;

/// A spawned task that is aborted when this handle is dropped.
#[derive(Debug)]
pub struct Background(tokio::task::JoinHandle<()>);

impl Background {
    /// Spawns `work` on the current runtime.
    pub fn spawn(work: impl Future<Output = ()> + Send + 'static) -> Self {
        Self(tokio::spawn(work))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.0.abort();
    }
}
