//! A TCP proxy in front of a server, which a test can take down and bring back: a directory that goes away.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Forwards connections from a loopback port to a target while up; while down, closes them at once.
pub struct Proxy {
    /// Where the proxy listens, as `<scheme>://127.0.0.1:<port>`.
    pub url: String,
    up: Arc<AtomicBool>,
    connections: Arc<std::sync::Mutex<JoinSet<()>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy to `target`, a URL such as `ldap://127.0.0.1:389`.
    pub async fn start(target: &str) -> Self {
        let (scheme, address) = target.split_once("://").expect("a URL with a scheme");
        let address = address.trim_end_matches('/').to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let url = format!("{scheme}://{}", listener.local_addr().expect("proxy address"));
        let up = Arc::new(AtomicBool::new(true));
        let connections = Arc::new(std::sync::Mutex::new(JoinSet::new()));
        let task = tokio::spawn({
            let up = up.clone();
            let connections = connections.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let address = address.clone();
                    connections.lock().expect("connections").spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(&address).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                }
            }
        });
        Self {
            url,
            up,
            connections,
            task,
        }
    }

    /// Closes every open connection and every new one, until [`Proxy::up`].
    pub fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.connections.lock().expect("connections").abort_all();
    }

    /// Forwards new connections again.
    pub fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
