//! Command-line and environment option groups that every Cube binary flattens into its own `clap` parser.
//!
//! Every flag also reads an environment variable (`CUBE_…`, or the OpenTelemetry standard name), so the same
//! binary is configured by flags on a laptop and by env in a Kubernetes manifest. Only `main` reads either.

use std::net::SocketAddr;
use std::time::Duration;

/// Where a gRPC server listens and how it treats calls.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Address the gRPC server listens on (host:port; port 0 picks a free one).
    #[arg(long = "listen", env = "CUBE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Address of the admin HTTP server that serves /metrics (Prometheus text) and /healthz.
    #[arg(long = "admin-listen", env = "CUBE_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,

    /// Longest a call may run when the client sets no shorter deadline (e.g. 30s, 500ms, 2m).
    #[arg(long = "request-timeout", env = "CUBE_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Threads that serve calls (default: the CPUs this process may use). With 1, the server runs on a
    /// single-threaded runtime, the cheapest per call: no cross-thread wake-ups, as in one nginx worker.
    #[arg(long = "worker-threads", env = "CUBE_WORKER_THREADS")]
    pub worker_threads: Option<std::num::NonZeroUsize>,

    /// How long shutdown waits for calls in flight to finish before it closes their connections.
    #[arg(long = "shutdown-grace", env = "CUBE_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
}

/// How a binary logs and traces.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryArgs {
    /// Which logs to keep, as a tracing `EnvFilter` (e.g. `info`, `cube_gateway=debug,info`).
    #[arg(long = "log-filter", env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,

    /// Log line format.
    #[arg(long = "log-format", env = "CUBE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// OTLP/gRPC collector to export traces to (e.g. http://otel-collector:4317); no export when unset.
    #[arg(long = "otlp-endpoint", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// The format of log lines on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Which database a service keeps its tables in.
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseArgs {
    /// Database URL: sqlite://PATH, postgres://USER@HOST/DB or mysql://USER@HOST/DB.
    #[arg(long = "database-url", env = "CUBE_DATABASE_URL")]
    pub database_url: String,

    /// Whether to bring the service's tables up to date at start-up.
    #[arg(long = "migrate", env = "CUBE_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,
}

/// Which Redis a service uses for its event bus and caches.
#[derive(Debug, Clone, clap::Args)]
pub struct RedisArgs {
    /// Redis URL (redis://HOST:PORT/DB); when unset, events stay inside this process.
    #[arg(long = "redis-url", env = "CUBE_REDIS_URL")]
    pub redis_url: Option<String>,
    /// The prefix of the bus's Redis keys: installations sharing one Redis each take their own.
    #[arg(long = "redis-namespace", env = "CUBE_REDIS_NAMESPACE", default_value = "cube")]
    pub redis_namespace: String,
}

/// Where a service finds the auth service that issues the tokens it verifies.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthClientArgs {
    /// The auth service's gRPC URL: its keys verify access tokens, and it checks API tokens.
    #[arg(long = "auth-url", env = "CUBE_AUTH_URL", default_value = "http://cube-auth:8080")]
    pub auth_url: String,
}

/// Parses durations written as a number followed by `ms`, `s`, `m`, `h` or `d` (`500ms`, `30s`, `2m`, `1h`, `7d`).
///
/// # Errors
/// Returns a message showing the accepted forms when the text is anything else.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || {
        format!(
            "invalid duration {text:?}: expected a whole number followed by ms, s, m, h or d (e.g. 500ms, 30s, 2m, 7d)"
        )
    };
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(invalid)?;
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits.parse().map_err(|_| invalid())?;
    match unit {
        "ms" => Ok(Duration::from_millis(value)),
        "s" => Ok(Duration::from_secs(value)),
        "m" => Ok(Duration::from_secs(value.saturating_mul(60))),
        "h" => Ok(Duration::from_secs(value.saturating_mul(3600))),
        "d" => Ok(Duration::from_secs(value.saturating_mul(86_400))),
        _ => Err(invalid()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_bad_ones_name_the_forms() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        for bad in ["", "s", "10", "1.5s", "10w", "-1s"] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains("expected a whole number"), "{err}");
        }
    }
}
