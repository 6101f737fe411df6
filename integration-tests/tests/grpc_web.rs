//! Drives the gateway with grpc-web clients Cube did not write, from `web/client.mjs` under Node: Connect's
//! grpc-web transport in binary mode and the official grpc-web client, inside a jsdom page on an allowed origin,
//! in text mode. Each makes a unary call, a server-streaming call, a cancelled health Watch and a call that fails
//! with `google.rpc` details; the script also sends CORS requests by hand. This test judges what they saw.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cube_integration_tests::{ECHO_DOMAIN, echo, echo_gateway, start_echo, start_gateway};
use cube_kit::Channel;
use tokio::process::Command;

/// The npm project holding the client script and its pinned dependencies.
const WEB_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/web");

/// The oldest Node the pinned packages accept (jsdom asks for 20.19).
const NODE_AT_LEAST: (u32, u32) = (20, 19);

const INSTALL_TIMEOUT: Duration = Duration::from_secs(300);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

const ALLOWED_ORIGIN: &str = "http://web.test";
const DETAIL_TYPES: &str = "google.rpc.ErrorInfo,google.rpc.BadRequest";

#[tokio::test]
async fn grpc_web_clients_in_binary_and_text_mode_call_through_the_gateway() {
    check_node().await;
    install_client().await;

    let echo_server = start_echo().await;
    let channel = Channel::remote(&echo_server.url()).expect("the echo URL is valid");
    let gateway = start_gateway(echo_gateway(channel, 4 * 1024 * 1024)).await;

    let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("grpc-web-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("the test's scratch directory can be created");
    let echo_descriptors = scratch.join("echo.binpb");
    let health_descriptors = scratch.join("health.binpb");
    std::fs::write(&echo_descriptors, echo::FILE_DESCRIPTOR_SET).expect("the echo descriptors can be written");
    std::fs::write(&health_descriptors, tonic_health::pb::FILE_DESCRIPTOR_SET)
        .expect("the health descriptors can be written");

    let run = Command::new("node")
        .arg("client.mjs")
        .arg(gateway.url())
        .arg(&echo_descriptors)
        .arg(&health_descriptors)
        .current_dir(WEB_DIR)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(CLIENT_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| panic!("node client.mjs did not finish within {CLIENT_TIMEOUT:?}"))
        .expect("node runs client.mjs");
    let _ = std::fs::remove_dir_all(&scratch);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "node client.mjs failed ({}):\n{stderr}\nwhat it saw:\n{stdout}",
        output.status
    );
    let report = parse_report(&stdout);

    let mut expectations = Vec::new();
    for (mode, content_type) in [
        ("binary", "application/grpc-web+proto"),
        ("text", "application/grpc-web-text+proto"),
    ] {
        let key = |item: &str| format!("{mode}.{item}");
        expectations.extend([
            (key("unary.contentType"), Expect::Is(content_type.to_owned())),
            (key("unary.message"), Expect::Is(format!("hello {mode}"))),
            (key("unary.header"), Expect::Is(format!("{mode}-header"))),
            (
                key("stream.messages"),
                Expect::Is(format!("{mode} 0,{mode} 1,{mode} 2")),
            ),
            (key("watch.status"), Expect::Is("SERVING".to_owned())),
            (key("watch.end"), Expect::Is("cancelled".to_owned())),
            (key("error.code"), Expect::Is("3".to_owned())),
            (key("error.message"), Expect::Contains("\"refuse me\" is not accepted")),
            (key("error.detailTypes"), Expect::Is(DETAIL_TYPES.to_owned())),
            (key("error.reason"), Expect::Is("FIELD_INVALID".to_owned())),
            (key("error.domain"), Expect::Is(ECHO_DOMAIN.to_owned())),
            (key("error.violationFields"), Expect::Is("message".to_owned())),
        ]);
    }
    expectations.extend([
        // Connect's own reading of grpc-status-details-bin agrees with the script's.
        (
            "binary.error.connectDetailTypes".to_owned(),
            Expect::Is(DETAIL_TYPES.to_owned()),
        ),
        // A page on an origin the gateway does not allow is stopped by CORS before its call is sent.
        ("text.otherOrigin.code".to_owned(), Expect::Not("0")),
        ("cors.preflight.status".to_owned(), Expect::Success),
        (
            "cors.preflight.allowOrigin".to_owned(),
            Expect::Is(ALLOWED_ORIGIN.to_owned()),
        ),
        ("cors.preflight.allowMethods".to_owned(), Expect::Lists(&["POST"])),
        (
            "cors.preflight.allowHeaders".to_owned(),
            Expect::Lists(&["content-type", "x-grpc-web", "x-user-agent"]),
        ),
        ("cors.post.status".to_owned(), Expect::Is("200".to_owned())),
        (
            "cors.post.allowOrigin".to_owned(),
            Expect::Is(ALLOWED_ORIGIN.to_owned()),
        ),
        (
            "cors.post.exposeHeaders".to_owned(),
            Expect::Lists(&["grpc-status", "grpc-message", "grpc-status-details-bin"]),
        ),
        ("cors.otherOrigin.allowOrigin".to_owned(), Expect::Absent),
    ]);
    let problems: Vec<String> = expectations
        .iter()
        .filter_map(|(key, expect)| expect.problem(key, &report))
        .collect();
    assert!(
        problems.is_empty(),
        "the grpc-web clients saw what they should not have:\n  {}\nwhat they saw:\n{stdout}",
        problems.join("\n  ")
    );
}

/// What one observation of the client script should be.
#[derive(Debug)]
enum Expect {
    /// Exactly this text.
    Is(String),
    /// Text that contains this.
    Contains(&'static str),
    /// Anything but this text.
    Not(&'static str),
    /// A 2xx HTTP status.
    Success,
    /// A comma-separated list holding each of these, in any case.
    Lists(&'static [&'static str]),
    /// Nothing: the header was absent.
    Absent,
}

impl Expect {
    /// Returns what is wrong with the observation `key` of `report`, if anything.
    fn problem(&self, key: &str, report: &HashMap<String, Option<String>>) -> Option<String> {
        let Some(seen) = report.get(key) else {
            return Some(format!("{key}: not reported"));
        };
        let text = seen.as_deref().unwrap_or_default();
        let good = match self {
            Self::Is(expected) => seen.as_deref() == Some(expected.as_str()),
            Self::Contains(part) => text.contains(part),
            Self::Not(unwanted) => seen.as_deref() != Some(*unwanted),
            Self::Success => text.len() == 3 && text.starts_with('2'),
            Self::Lists(items) => items
                .iter()
                .all(|item| text.split(',').any(|listed| listed.trim().eq_ignore_ascii_case(item))),
            Self::Absent => seen.is_none(),
        };
        (!good).then(|| format!("{key}: expected {self:?}, saw {seen:?}"))
    }
}

/// Fails the test, saying how to install Node, unless a recent enough `node` and `npm` are on the PATH.
async fn check_node() {
    let how = "install Node.js 20.19 or later with npm (`apt-get install nodejs npm`)";
    let output = Command::new("node")
        .arg("--version")
        .output()
        .await
        .unwrap_or_else(|error| {
            panic!("this test runs grpc-web clients under Node, but `node` did not run ({error}): {how}")
        });
    let version = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let mut numbers = version
        .trim_start_matches('v')
        .split('.')
        .map(|part| part.parse::<u32>().unwrap_or(0));
    let found = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    assert!(
        found >= NODE_AT_LEAST,
        "`node --version` says {version:?}, too old for the pinned packages: {how}"
    );
    Command::new("npm")
        .arg("--version")
        .output()
        .await
        .unwrap_or_else(|error| panic!("`npm` did not run ({error}): {how}"));
}

/// Installs the client's pinned packages with `npm ci` unless they are installed already, holding a lock so
/// that concurrent test runs do not install over each other.
async fn install_client() {
    let web = Path::new(WEB_DIR);
    let lock_path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("grpc-web-npm-ci.lock");
    let lock = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::create(&lock_path).expect("the npm lock file can be created");
        file.lock().expect("the npm lock file can be locked");
        file
    })
    .await
    .expect("locking does not panic");

    let modified = |path: &Path| std::fs::metadata(path).and_then(|meta| meta.modified()).ok();
    // npm writes node_modules/.package-lock.json last; one older than the lock file means a stale install.
    let installed = modified(&web.join("node_modules/.package-lock.json"));
    let wanted = modified(&web.join("package-lock.json")).expect("web/package-lock.json exists");
    if installed.is_some_and(|installed| installed >= wanted) {
        return;
    }
    let install = Command::new("npm")
        .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund"])
        .current_dir(web)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(INSTALL_TIMEOUT, install)
        .await
        .unwrap_or_else(|_| panic!("`npm ci` in {WEB_DIR} did not finish within {INSTALL_TIMEOUT:?}"))
        .expect("npm runs");
    assert!(
        output.status.success(),
        "`npm ci` in {WEB_DIR} failed ({}); it needs the npm registry:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    drop(lock);
}

/// Reads the client's flat JSON report: every value is a string, or null where a check passed without a note.
fn parse_report(text: &str) -> HashMap<String, Option<String>> {
    serde_json::from_str(text.trim())
        .unwrap_or_else(|error| panic!("the client printed no JSON report ({error}): {text}"))
}
