//! An API server of a test's own, on the test environment's etcd under a prefix of its own (so an empty cluster
//! no other test sees), that the test can restart: for what a restart of the control plane does to a client.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::kubernetes::{client_from, unique_name};
use crate::require;

/// How long a start may take.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// A running kube-apiserver of the test's own, stopped when dropped.
pub struct ApiServer {
    dir: tempfile::TempDir,
    port: u16,
    prefix: String,
    flags: Vec<String>,
    child: Option<Child>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("port", &self.port)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl ApiServer {
    /// Starts an API server with `flags` added to the test environment's, and waits until it serves.
    pub async fn start(flags: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|error| panic!("a directory for an API server: {error}"));
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|address| address.port())
            .unwrap_or_else(|error| panic!("a free port: {error}"));
        let mut server = Self {
            dir,
            port,
            prefix: format!("/{}", unique_name("cube-private")),
            flags: flags.iter().map(|flag| (*flag).to_owned()).collect(),
            child: None,
        };
        server.run().await;
        server
    }

    /// The kubeconfig of its admin (`system:masters`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// Stops it at once (SIGKILL) and starts it again on the same port and data, waiting until it serves.
    pub async fn restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
        self.run().await;
    }

    async fn run(&mut self) {
        let kube_dir = PathBuf::from(require("CUBE_TEST_KUBE_DIR"));
        let certs = self.dir.path().join("pki");
        let log = std::fs::File::create(self.dir.path().join("apiserver.log"))
            .unwrap_or_else(|error| panic!("an API server log: {error}"));
        let child = Command::new(require("CUBE_TEST_KUBE_APISERVER"))
            .args([
                "--etcd-servers",
                &require("CUBE_TEST_ETCD_URL"),
                "--etcd-prefix",
                &self.prefix,
            ])
            .args(["--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1"])
            .args(["--secure-port", &self.port.to_string(), "--insecure-port", "0"])
            .arg("--cert-dir")
            .arg(&certs)
            .arg("--token-auth-file")
            .arg(kube_dir.join("tokens.csv"))
            .args(["--authorization-mode", "RBAC"])
            .arg("--service-account-key-file")
            .arg(kube_dir.join("sa.pub"))
            .arg("--service-account-signing-key-file")
            .arg(kube_dir.join("sa.key"))
            .args([
                "--service-account-issuer",
                "https://kubernetes.default.svc.cluster.local",
            ])
            .args(["--disable-admission-plugins", "ServiceAccount"])
            .args([
                "--service-cluster-ip-range",
                "10.96.0.0/16",
                "--endpoint-reconciler-type",
                "none",
            ])
            .args(["--profiling=false"])
            .args(&self.flags)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| panic!("starting kube-apiserver: {error}"));
        self.child = Some(child);
        let token = std::fs::read_to_string(kube_dir.join("tokens.csv"))
            .ok()
            .and_then(|tokens| tokens.split(',').next().map(str::to_owned))
            .unwrap_or_else(|| panic!("no token in {}", kube_dir.display()));
        let ready = tokio::time::timeout(START_TIMEOUT, async {
            loop {
                if let Some(config) = self.write_kubeconfig(&certs, &token) {
                    let path = config.display().to_string();
                    let client = client_from(&path).await;
                    if client.apiserver_version().await.is_ok()
                        && kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client)
                            .get("default")
                            .await
                            .is_ok()
                    {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        if ready.is_err() {
            let log = std::fs::read_to_string(self.dir.path().join("apiserver.log")).unwrap_or_default();
            panic!("the API server did not serve within {START_TIMEOUT:?}:\n{log}");
        }
    }

    /// Writes the kubeconfig once the server wrote its certificate.
    fn write_kubeconfig(&self, certs: &Path, token: &str) -> Option<PathBuf> {
        use base64::Engine as _;
        let certificate = std::fs::read(certs.join("apiserver.crt")).ok()?;
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: private\n  cluster:\n    server: https://127.0.0.1:{}\n    \
             certificate-authority-data: {}\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: \
             private\n  context:\n    cluster: private\n    user: admin\ncurrent-context: private\n",
            self.port,
            base64::engine::general_purpose::STANDARD.encode(&certificate)
        );
        let path = self.kubeconfig();
        std::fs::write(&path, config).ok()?;
        Some(path)
    }
}
