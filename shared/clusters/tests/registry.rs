//! The cluster registry: reading and checking the clusters file, the default cluster, local clusters, and the
//! cached Kubernetes clients across reloads. Clients are built from kubeconfigs pointing at an address nobody
//! listens on: building a client does not connect.

use std::path::{Path, PathBuf};

use clap::Parser;
use cube_clusters::{ClientError, ClusterConfig, ClusterRegistry, ClustersArgs, RegistryError};
use serde_json::json;

/// Writes a kubeconfig named `name` under `dir` that reaches an API server at `server`.
fn kubeconfig(dir: &Path, name: &str, server: &str) -> PathBuf {
    let path = dir.join(format!("{name}.kubeconfig"));
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: {server}
    insecure-skip-tls-verify: true
users:
- name: test
  user:
    token: not-a-real-token
contexts:
- name: test
  context:
    cluster: test
    user: test
current-context: test
"
    );
    std::fs::write(&path, text).expect("writing the kubeconfig");
    path
}

/// The error `registry` answers when asked for the client of `name`, which `why` says it has none.
async fn refused(registry: &ClusterRegistry, name: &str, why: &str) -> ClientError {
    match registry.client(name).await {
        Ok(_) => panic!("{name} has a client, though {why}"),
        Err(error) => error,
    }
}

/// A clusters file under a temporary directory that tests rewrite between reloads.
struct ClustersFile {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl ClustersFile {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("a directory");
        let path = dir.path().join("clusters.json");
        Self { dir, path }
    }

    fn write(&self, clusters: serde_json::Value) {
        self.write_text(&json!({ "clusters": clusters }).to_string());
    }

    fn write_text(&self, text: &str) {
        std::fs::write(&self.path, text).expect("writing the clusters file");
    }

    fn kubeconfig(&self, name: &str) -> String {
        kubeconfig(self.dir.path(), name, "https://127.0.0.1:1")
            .display()
            .to_string()
    }
}

#[test]
fn a_missing_file_is_refused_naming_it() {
    let file = ClustersFile::new();
    let error = ClusterRegistry::load(&file.path).expect_err("no file");
    assert!(matches!(error, RegistryError::Read { .. }), "{error:?}");
    assert!(error.to_string().contains(&file.path.display().to_string()), "{error}");
}

#[test]
fn invalid_files_are_refused_saying_what_is_wrong() {
    let file = ClustersFile::new();
    let cases = [
        ("not json", "expected {\"clusters\""),
        (r#"{"clusters": [{"name": "dev", "kubconfig": "/x"}]}"#, "kubconfig"),
        (r#"{"clusters": []}"#, "lists no clusters"),
        (
            r#"{"clusters": [{"name": "Dev!"}]}"#,
            "clusters[0].name \"Dev!\" must be 2 to 63 lowercase",
        ),
        (
            r#"{"clusters": [{"name": "dev"}, {"name": "dev"}]}"#,
            "clusters[1].name \"dev\" appears twice",
        ),
        (
            r#"{"clusters": [{"name": "dev", "default": true}, {"name": "gpu", "default": true}]}"#,
            "more than one cluster is marked default",
        ),
    ];
    for (text, expected) in cases {
        file.write_text(text);
        let error = ClusterRegistry::load(&file.path).expect_err(text);
        assert!(matches!(error, RegistryError::Invalid { .. }), "{text}: {error:?}");
        let message = error.to_string();
        assert!(message.contains(&file.path.display().to_string()), "{text}: {message}");
        assert!(message.contains(expected), "{text}: {message} should say {expected:?}");
    }
}

#[test]
fn clusters_given_in_code_are_checked_too() {
    let error = ClusterRegistry::new(Vec::new()).expect_err("no clusters");
    assert!(matches!(error, RegistryError::Clusters { .. }), "{error:?}");
    assert!(error.to_string().contains("lists no clusters"), "{error}");
    let error = ClusterRegistry::new(vec![ClusterConfig::new("x", None)]).expect_err("a short name");
    assert!(error.to_string().contains("clusters[0].name \"x\""), "{error}");
}

#[test]
fn the_default_cluster_is_the_one_marked_or_else_the_first_and_comes_first() {
    let file = ClustersFile::new();
    file.write(json!([{"name": "dev"}, {"name": "gpu", "default": true}, {"name": "cpu"}]));
    let registry = ClusterRegistry::load(&file.path).expect("the file");
    assert_eq!(registry.default_cluster(), "gpu");
    assert_eq!(registry.names(), ["gpu", "dev", "cpu"]);
    let gpu = registry.get("gpu").expect("gpu");
    assert!(gpu.default);
    assert_eq!(
        (gpu.pipeline_namespace.as_str(), gpu.notebook_namespace.as_str()),
        ("pipeline", "jupyter")
    );
    assert_eq!(
        (gpu.service_namespace.as_str(), gpu.service_domain.as_str()),
        ("service", "cluster.local")
    );
    assert!(registry.get("elsewhere").is_none());

    let registry =
        ClusterRegistry::new(vec![ClusterConfig::new("dev", None), ClusterConfig::new("gpu", None)]).expect("valid");
    assert_eq!(registry.default_cluster(), "dev");
    assert!(registry.clusters().first().is_some_and(|cluster| cluster.default));
    assert!(!registry.get("gpu").expect("gpu").default);
}

#[tokio::test]
async fn a_cluster_without_kubeconfig_or_in_cluster_is_local_and_has_no_client() {
    let file = ClustersFile::new();
    assert!(ClusterConfig::new("local", None).is_local());
    assert!(!ClusterConfig::new("dev", Some(file.kubeconfig("dev").into())).is_local());
    let in_cluster = ClusterConfig {
        in_cluster: true,
        ..ClusterConfig::new("home", None)
    };
    assert!(!in_cluster.is_local());

    let embedded = ClusterRegistry::embedded();
    assert_eq!(embedded.names(), ["local"]);
    assert_eq!(embedded.default_cluster(), "local");
    assert!(embedded.get("local").expect("local").is_local());
    let error = refused(&embedded, "local", "no API").await;
    assert!(matches!(error, ClientError::Local), "{error:?}");
    assert!(error.to_string().contains("no Kubernetes API"), "{error}");
    let error = refused(&embedded, "gpu", "not registered").await;
    assert!(matches!(error, ClientError::UnknownCluster { .. }), "{error:?}");
    assert!(
        error.to_string().contains("\"local\""),
        "names the registered clusters: {error}"
    );
    assert_eq!(embedded.clients_built(), 0);
}

#[tokio::test]
async fn a_client_is_built_once_per_cluster_and_shared_by_clones() {
    let file = ClustersFile::new();
    file.write(json!([
        {"name": "alpha", "kubeconfig": file.kubeconfig("alpha")},
        {"name": "bravo", "kubeconfig": file.kubeconfig("bravo")},
        {"name": "local"},
    ]));
    let registry = ClusterRegistry::load(&file.path).expect("the file");
    assert!(
        registry.cached_clients().is_empty(),
        "clients are built when first asked for"
    );
    registry.client("alpha").await.expect("alpha's client");
    registry.client("alpha").await.expect("alpha's client again");
    registry
        .clone()
        .client("alpha")
        .await
        .expect("alpha's client through a clone");
    assert_eq!(registry.clients_built(), 1);
    registry.clone().client("bravo").await.expect("bravo's client");
    assert_eq!(registry.clients_built(), 2);
    assert_eq!(registry.cached_clients(), ["alpha", "bravo"]);
}

#[tokio::test]
async fn a_client_that_cannot_be_built_says_why_and_is_tried_again() {
    let file = ClustersFile::new();
    let missing = file.dir.path().join("missing.kubeconfig");
    let registry =
        ClusterRegistry::new(vec![ClusterConfig::new("dev", Some(missing.clone()))]).expect("a valid registry");
    let error = refused(&registry, "dev", "no kubeconfig file").await;
    assert!(matches!(error, ClientError::ReadKubeconfig { .. }), "{error:?}");
    assert!(error.to_string().contains(&missing.display().to_string()), "{error}");
    assert!(registry.cached_clients().is_empty());

    kubeconfig(file.dir.path(), "missing", "https://127.0.0.1:1");
    registry.client("dev").await.expect("built once the file exists");
    assert_eq!(registry.clients_built(), 1);
}

#[tokio::test]
async fn a_reload_keeps_the_clients_of_clusters_reached_as_before() {
    let file = ClustersFile::new();
    let (alpha, bravo, bravo_moved) = (
        file.kubeconfig("alpha"),
        file.kubeconfig("bravo"),
        file.kubeconfig("moved"),
    );
    file.write(json!([
        {"name": "alpha", "kubeconfig": alpha},
        {"name": "bravo", "kubeconfig": bravo, "default": true},
    ]));
    let registry = ClusterRegistry::load(&file.path).expect("the file");
    registry.client("alpha").await.expect("alpha's client");
    registry.client("bravo").await.expect("bravo's client");
    assert_eq!(registry.clients_built(), 2);

    // alpha changes what does not touch its connection (default, namespace, host); bravo gets another kubeconfig.
    file.write(json!([
        {"name": "alpha", "kubeconfig": alpha, "default": true, "pipeline_namespace": "jobs", "external_host": "x.io"},
        {"name": "bravo", "kubeconfig": bravo_moved},
        {"name": "charlie", "kubeconfig": alpha},
    ]));
    registry.reload().expect("a reload");
    assert_eq!(registry.names(), ["alpha", "bravo", "charlie"]);
    assert_eq!(registry.get("alpha").expect("alpha").pipeline_namespace, "jobs");
    assert_eq!(
        registry.cached_clients(),
        ["alpha"],
        "bravo's client was dropped, charlie has none yet"
    );
    registry.client("alpha").await.expect("alpha's kept client");
    assert_eq!(registry.clients_built(), 2, "alpha's client was kept");
    registry.client("bravo").await.expect("bravo's new client");
    registry.client("charlie").await.expect("charlie's client");
    assert_eq!(registry.clients_built(), 4);

    // Moving alpha in-cluster changes how it is reached, too.
    file.write(json!([
        {"name": "alpha", "kubeconfig": alpha, "in_cluster": true},
        {"name": "bravo", "kubeconfig": bravo_moved},
        {"name": "charlie", "kubeconfig": alpha},
    ]));
    registry.reload().expect("a reload");
    assert_eq!(registry.cached_clients(), ["bravo", "charlie"]);
}

#[tokio::test]
async fn a_reload_drops_the_client_of_a_removed_cluster() {
    let file = ClustersFile::new();
    let (alpha, bravo) = (file.kubeconfig("alpha"), file.kubeconfig("bravo"));
    file.write(json!([{"name": "alpha", "kubeconfig": alpha}, {"name": "bravo", "kubeconfig": bravo}]));
    let registry = ClusterRegistry::load(&file.path).expect("the file");
    registry.client("alpha").await.expect("alpha's client");
    registry.client("bravo").await.expect("bravo's client");

    file.write(json!([{"name": "bravo", "kubeconfig": bravo}]));
    registry.reload().expect("a reload");
    assert_eq!(registry.names(), ["bravo"]);
    assert_eq!(registry.default_cluster(), "bravo");
    assert_eq!(registry.cached_clients(), ["bravo"]);
    let error = refused(&registry, "alpha", "alpha is gone").await;
    assert!(matches!(error, ClientError::UnknownCluster { .. }), "{error:?}");

    // Coming back, alpha gets a new client rather than the one it had.
    file.write(json!([{"name": "bravo", "kubeconfig": bravo}, {"name": "alpha", "kubeconfig": alpha}]));
    registry.reload().expect("a reload");
    registry.client("alpha").await.expect("alpha's new client");
    assert_eq!(registry.clients_built(), 3);
}

#[tokio::test]
async fn a_refused_reload_changes_nothing() {
    let file = ClustersFile::new();
    let alpha = file.kubeconfig("alpha");
    file.write(json!([{"name": "alpha", "kubeconfig": alpha}]));
    let registry = ClusterRegistry::load(&file.path).expect("the file");
    registry.client("alpha").await.expect("alpha's client");

    file.write(json!([{"name": "Alpha!"}]));
    let error = registry.reload().expect_err("refused");
    assert!(error.to_string().contains("clusters[0].name"), "{error}");
    std::fs::remove_file(&file.path).expect("removing the file");
    let error = registry.reload().expect_err("no file");
    assert!(matches!(error, RegistryError::Read { .. }), "{error:?}");
    assert_eq!(registry.names(), ["alpha"]);
    assert_eq!(registry.cached_clients(), ["alpha"]);

    // A registry not read from a file has nothing to reload.
    let embedded = ClusterRegistry::embedded();
    embedded.reload().expect("nothing to do");
    assert_eq!(embedded.names(), ["local"]);
}

#[test]
fn the_clusters_file_flag_flattens_into_a_command() {
    #[derive(Debug, Parser)]
    struct Command {
        #[command(flatten)]
        clusters: ClustersArgs,
    }
    let file = ClustersFile::new();
    file.write(json!([{"name": "local"}]));
    let command =
        Command::try_parse_from(["cube", "--clusters-file", &file.path.display().to_string()]).expect("flags");
    assert_eq!(command.clusters.clusters_file, file.path);
    let registry = command.clusters.registry().expect("the file");
    assert_eq!(registry.names(), ["local"]);
}

#[test]
fn names_follow_dns_label_rules() {
    for (name, valid, label) in [
        ("dev", true, true),
        ("gpu-a100", true, true),
        ("a", false, true),
        ("1gpu", false, true),
        ("dev-", false, false),
        ("-dev", false, false),
        ("Dev", false, false),
        ("de_v", false, false),
        ("", false, false),
        (&"a".repeat(63), true, true),
        (&"a".repeat(64), false, false),
    ] {
        assert_eq!(cube_clusters::valid_name(name), valid, "valid_name({name:?})");
        assert_eq!(cube_clusters::dns_label(name), label, "dns_label({name:?})");
    }
}
