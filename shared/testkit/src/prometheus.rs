//! A real Prometheus server of the test's own, scraping an [`Exporter`] the test serves, for code that queries
//! Prometheus (usage, autoscaling) and must be tested against the real query engine rather than a canned answer.
//!
//! The server is the binary `scripts/test-env.sh up prometheus` installs (`CUBE_TEST_PROMETHEUS`); each
//! [`Prometheus`] runs it on a free loopback port with its own configuration and storage in a temporary directory.
//! Both speak plain HTTP/1.0–1.1 written by hand: the few requests they make need no HTTP client.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::task::{JoinHandle, JoinSet};

use crate::require;

/// How long a Prometheus server may take to answer `/-/ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one HTTP exchange with an exporter's client or with Prometheus may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest request head the exporter reads.
const MAX_REQUEST: usize = 64 * 1024;

/// How many lines of its log a failing Prometheus shows.
const LOG_TAIL_LINES: usize = 40;

/// The samples an exporter serves: per metric name, per label set (sorted by label name), the value.
type Samples = BTreeMap<String, BTreeMap<BTreeMap<String, String>, f64>>;

/// An HTTP server on a free loopback port that serves the samples a test sets at `GET /metrics`, in Prometheus's
/// text exposition format; stopped when dropped.
pub struct Exporter {
    address: SocketAddr,
    samples: Arc<Mutex<Samples>>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Exporter {
    /// Starts serving no samples on a free `127.0.0.1` port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|error| panic!("binding an exporter to 127.0.0.1:0: {error}"));
        let address = listener
            .local_addr()
            .unwrap_or_else(|error| panic!("the exporter's address: {error}"));
        let samples = Arc::new(Mutex::new(Samples::new()));
        let task = tokio::spawn(accept(listener, Arc::clone(&samples)));
        Self { address, samples, task }
    }

    /// Returns the `127.0.0.1:PORT` it serves on, as a scrape target.
    pub fn address(&self) -> String {
        self.address.to_string()
    }

    /// Sets the sample `name{labels}` to `value`, replacing the one with the same name and labels (in any order).
    /// A name ending in `_total` is exposed as a counter, any other as a gauge.
    pub fn set(&self, name: &str, labels: &[(&str, &str)], value: f64) {
        let labels = label_set(name, labels);
        self.lock().entry(name.to_owned()).or_default().insert(labels, value);
    }

    /// Removes the sample `name{labels}`, so the next scrapes no longer see it; nothing when there is none.
    pub fn remove(&self, name: &str, labels: &[(&str, &str)]) {
        let labels = label_set(name, labels);
        let mut samples = self.lock();
        if let Some(series) = samples.get_mut(name) {
            series.remove(&labels);
            if series.is_empty() {
                samples.remove(name);
            }
        }
    }

    /// Locks the samples; a panic elsewhere while holding the lock leaves them whole, so poisoning is ignored.
    fn lock(&self) -> std::sync::MutexGuard<'_, Samples> {
        self.samples.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts the connections in flight too.
        self.task.abort();
    }
}

/// Checks the metric and label names (a typo would otherwise only show as a scrape error in Prometheus's log) and
/// returns the labels sorted by name.
fn label_set(name: &str, labels: &[(&str, &str)]) -> BTreeMap<String, String> {
    assert!(
        valid_name(name, true),
        "{name:?} is not a Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)"
    );
    labels
        .iter()
        .map(|(label, value)| {
            assert!(
                valid_name(label, false) && !label.starts_with("__"),
                "{label:?} is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*, not starting with __)"
            );
            ((*label).to_owned(), (*value).to_owned())
        })
        .collect()
}

/// Returns whether `name` is a metric name (`colons`) or a label name.
fn valid_name(name: &str, colons: bool) -> bool {
    let allowed = |c: char, first: bool| {
        c == '_' || (colons && c == ':') || c.is_ascii_alphabetic() || (!first && c.is_ascii_digit())
    };
    let mut chars = name.chars();
    chars.next().is_some_and(|c| allowed(c, true)) && chars.all(|c| allowed(c, false))
}

/// Accepts connections for ever, answering each on a task of its own.
async fn accept(listener: TcpListener, samples: Arc<Mutex<Samples>>) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        match listener.accept().await {
            Ok((stream, _)) => {
                let samples = Arc::clone(&samples);
                connections.spawn(async move {
                    let _ = tokio::time::timeout(HTTP_TIMEOUT, answer(stream, &samples)).await;
                });
            }
            Err(error) => {
                eprintln!("exporter: accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads one request and answers it: the samples for `GET /metrics`, 404 for anything else; then closes.
async fn answer(mut stream: TcpStream, samples: &Mutex<Samples>) {
    let mut request = Vec::new();
    let mut buffer = [0; 4096];
    while !request.windows(4).any(|window| window == b"\r\n\r\n") {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => request.extend_from_slice(&buffer[..read]),
        }
        if request.len() > MAX_REQUEST {
            return;
        }
    }
    let request = String::from_utf8_lossy(&request);
    let mut words = request.split_whitespace();
    let (method, target) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default();
    let (status, body) = if method == "GET" && path == "/metrics" {
        let text = render(&samples.lock().unwrap_or_else(PoisonError::into_inner));
        ("200 OK", text)
    } else {
        ("404 Not Found", "only GET /metrics is served\n".to_owned())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    if stream.write_all(head.as_bytes()).await.is_ok() && stream.write_all(body.as_bytes()).await.is_ok() {
        let _ = stream.shutdown().await;
    }
}

/// Renders the samples in the text exposition format (version 0.0.4), with a `# TYPE` line per metric.
fn render(samples: &Samples) -> String {
    use std::fmt::Write as _;

    let mut text = String::new();
    for (name, series) in samples {
        let kind = if name.ends_with("_total") { "counter" } else { "gauge" };
        let _ = writeln!(text, "# TYPE {name} {kind}");
        for (labels, value) in series {
            text.push_str(name);
            if !labels.is_empty() {
                let labels: Vec<String> = labels
                    .iter()
                    .map(|(label, value)| format!("{label}=\"{}\"", escape_label_value(value)))
                    .collect();
                let _ = write!(text, "{{{}}}", labels.join(","));
            }
            let _ = writeln!(text, " {}", format_value(*value));
        }
    }
    text
}

/// Escapes a label value as the format requires: backslash, double quote and line feed.
fn escape_label_value(value: &str) -> String {
    value.replace('\\', r"\\").replace('"', r#"\""#).replace('\n', r"\n")
}

/// Formats a sample value as the format spells it (`NaN`, `+Inf`, `-Inf`, else a decimal).
fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        value.to_string()
    }
}

/// One element of a query's result: the series' labels and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The series' labels, `__name__` included when the result keeps it.
    pub labels: BTreeMap<String, String>,
    /// The value at the query's time.
    pub value: f64,
}

/// A Prometheus server of the test's own (the binary at `CUBE_TEST_PROMETHEUS`) on a free loopback port, with its
/// configuration and storage in a temporary directory, scraping the given targets as job `exporter`; killed when
/// dropped.
pub struct Prometheus {
    port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for Prometheus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prometheus")
            .field("port", &self.port)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl Prometheus {
    /// Starts a server scraping `targets` (`host:port`, such as [`Exporter::address`]) every `interval` (which is
    /// also its scrape timeout and rule evaluation interval), and waits until it is ready; panics with the end of
    /// its log when it is not within 30 s. Ready takes a fraction of a second, but its first scrape comes about 5 s
    /// later (Prometheus applies new targets on a fixed 5 s tick), so give [`Self::wait_for_sample`] 15 s or more.
    pub async fn start(targets: &[String], interval: Duration) -> Self {
        let binary = require("CUBE_TEST_PROMETHEUS");
        assert!(
            interval >= Duration::from_millis(1),
            "a scrape interval of {interval:?}: Prometheus counts in milliseconds, give at least 1ms"
        );
        let dir = tempfile::tempdir().unwrap_or_else(|error| panic!("a directory for Prometheus: {error}"));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|address| address.port())
            .unwrap_or_else(|error| panic!("a free port: {error}"));
        let interval = format!("{}ms", interval.as_millis());
        // YAML takes JSON's string and list syntax, which serde_json quotes correctly.
        let targets = serde_json::to_string(targets).unwrap_or_else(|error| panic!("the targets as JSON: {error}"));
        let config = format!(
            "global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}\n  evaluation_interval: {interval}\n\
             scrape_configs:\n  - job_name: exporter\n    static_configs:\n      - targets: {targets}\n"
        );
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config)
            .unwrap_or_else(|error| panic!("writing {}: {error}", config_file.display()));
        let log_file = dir.path().join("prometheus.log");
        let log = std::fs::File::create(&log_file).unwrap_or_else(|error| panic!("a Prometheus log: {error}"));
        let child = Command::new(&binary)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| panic!("starting {binary}: {error}"));
        let mut prometheus = Self { port, child, dir };
        prometheus.wait_until_ready().await;
        prometheus
    }

    /// Returns its base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs the instant query `query` now and returns its result: the samples of a vector (empty when nothing
    /// matches), or one sample without labels for a scalar; an error when Prometheus cannot be reached or fails.
    /// Panics when Prometheus rejects the query itself, which no retry would fix.
    pub async fn query(&self, query: &str) -> Result<Vec<Sample>, String> {
        let parameters = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", query)
            .finish();
        let path = format!("/api/v1/query?{parameters}");
        let (status, body) = get(self.port, &path).await?;
        let response: serde_json::Value =
            serde_json::from_str(&body).map_err(|error| format!("HTTP {status}, not JSON ({error}): {body}"))?;
        if response["status"] != "success" {
            let message = format!(
                "{}: {}",
                response["errorType"].as_str().unwrap_or("?"),
                response["error"].as_str().unwrap_or(&body)
            );
            if response["errorType"] == "bad_data" {
                panic!("Prometheus rejects the query {query:?}: {message}");
            }
            return Err(message);
        }
        let data = &response["data"];
        let result = match data["resultType"].as_str() {
            Some("vector") => data["result"].as_array().cloned().unwrap_or_default(),
            Some("scalar") => vec![serde_json::json!({ "metric": {}, "value": data["result"] })],
            other => panic!("the query {query:?} gives a {other:?}, not an instant vector or scalar"),
        };
        result
            .iter()
            .map(|element| {
                let labels = element["metric"]
                    .as_object()
                    .map(|metric| {
                        metric
                            .iter()
                            .map(|(label, value)| (label.clone(), value.as_str().unwrap_or_default().to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                let value = element["value"][1]
                    .as_str()
                    .and_then(parse_value)
                    .ok_or_else(|| format!("a result element without a value: {element}"))?;
                Ok(Sample { labels, value })
            })
            .collect()
    }

    /// Polls the instant query `query` until its result is not empty and returns it; panics with the last error
    /// and the end of the server's log when `timeout` passes first.
    pub async fn wait_for_sample(&self, query: &str, timeout: Duration) -> Vec<Sample> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.query(query).await {
                Ok(samples) if !samples.is_empty() => return samples,
                Ok(_) => "an empty result".to_owned(),
                Err(error) => error,
            };
            if Instant::now() >= deadline {
                panic!(
                    "Prometheus gave no sample for {query:?} within {timeout:?} (last: {last}); its log ends:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `/-/ready` answers 200; panics with the end of the log when the server exits or takes too long.
    async fn wait_until_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match get(self.port, "/-/ready").await {
                Ok((200, _)) => return,
                Ok(_) | Err(_) if Instant::now() >= deadline => {
                    panic!(
                        "Prometheus was not ready within {READY_TIMEOUT:?}; its log ends:\n{}",
                        self.log_tail()
                    )
                }
                Ok(_) | Err(_) => {}
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "Prometheus exited while starting ({status}); its log ends:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Returns the last lines of the server's log.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // Kill and reap it before the temporary directory goes, so it writes nothing into a directory being removed.
        let _ = self.child.start_kill();
        let deadline = Instant::now() + Duration::from_secs(2);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Sends `GET path` over HTTP/1.0 (so the answer is never chunked) to `127.0.0.1:port`, and returns the status and
/// body.
async fn get(port: u16, path: &str) -> Result<(u16, String), String> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("GET {path}: no answer within {HTTP_TIMEOUT:?}"))?
        .map_err(|error| format!("GET {path}: {error}"))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("GET {path}: an answer without the end of its headers: {response:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|status| status.parse().ok())
        .ok_or_else(|| format!("GET {path}: an answer without a status: {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// Parses a value as Prometheus's API spells it (`NaN`, `+Inf`, `-Inf`, else a decimal).
fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => text.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LABELS: [(&str, &str); 3] = [("namespace", "ns"), ("pod", "p"), ("container", "main")];

    #[test]
    fn renders_the_text_format_with_types_and_escaped_labels() {
        let mut samples = Samples::new();
        let set = |samples: &mut Samples, name: &str, labels: &[(&str, &str)], value: f64| {
            samples
                .entry(name.to_owned())
                .or_default()
                .insert(label_set(name, labels), value);
        };
        set(&mut samples, "requests_total", &[("path", "a\\b\"c\nd")], 3.0);
        set(&mut samples, "temperature", &[("b", "2"), ("a", "1")], -1.5);
        set(&mut samples, "temperature", &[("a", "1"), ("b", "2")], 21.25);
        set(&mut samples, "up", &[], f64::INFINITY);
        assert_eq!(
            render(&samples),
            "# TYPE requests_total counter\nrequests_total{path=\"a\\\\b\\\"c\\nd\"} 3\n\
             # TYPE temperature gauge\ntemperature{a=\"1\",b=\"2\"} 21.25\n\
             # TYPE up gauge\nup +Inf\n"
        );
    }

    #[tokio::test]
    async fn exporter_serves_what_is_set_and_forgets_what_is_removed() {
        let exporter = Exporter::start().await;
        let port = exporter.address.port();
        exporter.set("container_memory_working_set_bytes", &LABELS, 1024.0);
        exporter.set("gone", &[], 1.0);
        exporter.remove("gone", &[]);
        let (status, body) = get(port, "/metrics").await.unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(status, 200);
        assert_eq!(
            body,
            "# TYPE container_memory_working_set_bytes gauge\n\
             container_memory_working_set_bytes{container=\"main\",namespace=\"ns\",pod=\"p\"} 1024\n"
        );
        let (status, _) = get(port, "/other").await.unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(status, 404);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prometheus_scrapes_the_exporter_and_answers_range_functions() {
        let exporter = Arc::new(Exporter::start().await);
        exporter.set("container_memory_working_set_bytes", &LABELS, 256.0 * 1024.0 * 1024.0);
        let rising = tokio::spawn({
            let exporter = Arc::clone(&exporter);
            async move {
                for tick in 0_u32.. {
                    exporter.set("container_cpu_usage_seconds_total", &LABELS, f64::from(tick) * 0.05);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });

        let started = Instant::now();
        let prometheus = Prometheus::start(&[exporter.address()], Duration::from_secs(1)).await;
        eprintln!("prometheus at {} ready after {:?}", prometheus.url(), started.elapsed());

        let memory = prometheus
            .wait_for_sample(
                "max_over_time(container_memory_working_set_bytes{pod=\"p\"}[1m])",
                Duration::from_secs(30),
            )
            .await;
        assert_eq!(memory.len(), 1, "{memory:?}");
        assert_eq!(memory[0].value, 256.0 * 1024.0 * 1024.0);
        assert_eq!(memory[0].labels.get("container").map(String::as_str), Some("main"));

        // rate needs two scrapes within its window; `> 0` keeps the result empty until the rate is positive.
        let cpu = prometheus
            .wait_for_sample(
                "rate(container_cpu_usage_seconds_total{pod=\"p\"}[5s]) > 0",
                Duration::from_secs(30),
            )
            .await;
        assert_eq!(cpu.len(), 1, "{cpu:?}");
        assert!(cpu[0].value > 0.0, "{cpu:?}");
        eprintln!("rate positive after {:?}: {cpu:?}", started.elapsed());
        rising.abort();
    }
}
