//! Benchmarks the gateway: small unary calls at concurrency 1 and 64, sent directly to a service, through the
//! gateway over gRPC and over grpc-web, through Debian's nginx (`grpc_pass`) for comparison, and through the
//! gateway wired to the service in-process as `cube up` does. Prints requests/s, p50, p99 and the CPU seconds
//! per 1,000 requests of the process between client and service, with ratios to direct.
//!
//! Run: `cargo run --release -p cube-integration-tests --bin gateway-bench -- [--seconds 10]`.
//! The benchmark starts each server as a child process of its own (this binary, re-run in a server role), so
//! that each one's CPU time can be read from /proc.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use cube_integration_tests::bench::{Caller, Measurement, Server, measure, spawn_role};
use cube_integration_tests::echo::EchoRequest;
use cube_integration_tests::echo::echo_service_client::EchoServiceClient;
use cube_integration_tests::grpc_web::{GrpcWebClient, Http, Mode, frame};
use cube_integration_tests::{echo_gateway, echo_routes, start_echo, start_gateway, test_server_args};
use cube_kit::Channel;
use futures::future::BoxFuture;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[derive(Debug, Parser)]
#[command(about = "Benchmarks Cube's gateway against direct calls and nginx")]
struct Args {
    /// A server role, used when the benchmark re-runs itself as a child process.
    #[command(subcommand)]
    role: Option<Role>,
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// How many times each row is measured, rows taking turns; the median of each figure is printed.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds of warm-up before each measurement.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Threads each separate proxy may use: the gateway's --worker-threads, nginx's worker_processes (like a
    /// proxy pod with this many CPUs).
    #[arg(long, default_value_t = 1)]
    proxy_threads: usize,
    /// The nginx binary; the nginx rows are skipped when it is missing.
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
enum Role {
    /// Serves the echo service.
    Echo,
    /// Serves the gateway in front of the echo service at URL, on THREADS worker threads.
    Gateway {
        upstream: String,
        threads: std::num::NonZeroUsize,
    },
    /// Serves the gateway with the echo service in the same process, as `cube up` wires services.
    InProcess,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // A gateway role runs on the runtime its `--worker-threads` would give it; everything else on all CPUs.
    let threads = match &args.role {
        Some(Role::Gateway { threads, .. }) => Some(*threads),
        _ => None,
    };
    let runtime = cube_kit::cli::runtime(threads)?;
    match args.role {
        Some(role) => runtime.block_on(serve_role(role)),
        None => runtime.block_on(benchmark(&args)),
    }
}

async fn serve_role(role: Role) -> anyhow::Result<()> {
    let running = match role {
        Role::Echo => start_echo().await,
        Role::Gateway { upstream, .. } => start_gateway(echo_gateway(Channel::remote(&upstream)?, 4 << 20)).await,
        Role::InProcess => {
            let mut args = test_server_args();
            args.request_timeout = Duration::from_secs(30);
            cube_integration_tests::start_gateway_with(echo_gateway(Channel::in_process(echo_routes()), 4 << 20), args)
                .await
        }
    };
    println!("listening {}", running.address);
    // Runs until the benchmark kills this process.
    std::future::pending::<()>().await;
    Ok(())
}

async fn spawn_nginx(
    nginx: &Path,
    upstream: SocketAddr,
    workers: usize,
) -> anyhow::Result<(Server, tempfile_dir::Dir)> {
    let dir = tempfile_dir::Dir::new()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let config = format!(
        "worker_processes {workers};\ndaemon off;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
           fastcgi_temp_path {dir}/fastcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n\
           upstream echo {{ server {upstream}; keepalive 128; keepalive_requests 1000000000; }}\n\
           server {{\n    listen 127.0.0.1:{port} http2;\n    keepalive_requests 1000000000;\n\
             location / {{ grpc_pass grpc://echo; }}\n  }}\n}}\n",
        dir = dir.path().display(),
    );
    let config_path = dir.path().join("nginx.conf");
    std::fs::write(&config_path, config)?;
    let child = Command::new(nginx)
        .arg("-c")
        .arg(&config_path)
        .arg("-e")
        .arg(dir.path().join("error.log"))
        .kill_on_drop(true)
        .spawn()?;
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(address).await.is_err() {
        if Instant::now() > deadline {
            bail!("nginx did not listen on {address}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((Server { address, child }, dir))
}

/// A scratch directory removed on drop (nginx needs one for its config, pid and temp paths).
mod tempfile_dir {
    pub(crate) struct Dir(std::path::PathBuf);

    impl Dir {
        pub(crate) fn new() -> std::io::Result<Self> {
            let path = std::env::temp_dir().join(format!("cube-bench-{}", std::process::id()));
            std::fs::create_dir_all(&path)?;
            Ok(Self(path))
        }

        pub(crate) fn path(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Client {
    Grpc,
    GrpcWeb,
}

/// Calls Echo over gRPC.
struct GrpcEcho(EchoServiceClient<tonic::transport::Channel>);

impl Caller for GrpcEcho {
    fn call(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let request = EchoRequest {
                message: "hello".into(),
                ..EchoRequest::default()
            };
            self.0.echo(request).await.is_ok()
        })
    }
}

/// Calls Echo over grpc-web on HTTP/1.1.
struct GrpcWebEcho(GrpcWebClient, bytes::Bytes);

impl Caller for GrpcWebEcho {
    fn call(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let reply = self
                .0
                .call("/cube.testing.v1.EchoService/Echo", Mode::Binary, self.1.clone(), &[])
                .await;
            reply.is_ok_and(|reply| reply.status().code() == tonic::Code::Ok)
        })
    }
}

/// Returns `concurrency` callers of Echo at `address` over `client`'s protocol (gRPC ones share a connection).
async fn callers(address: SocketAddr, client: Client, concurrency: usize) -> anyhow::Result<Vec<Box<dyn Caller>>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut callers: Vec<Box<dyn Caller>> = Vec::new();
    for _ in 0..concurrency {
        callers.push(match client {
            Client::Grpc => Box::new(GrpcEcho(EchoServiceClient::new(channel.clone()))),
            Client::GrpcWeb => {
                let web = GrpcWebClient::connect(address, Http::One)
                    .await
                    .map_err(|error| anyhow::anyhow!("{error}"))?;
                let body = frame(&EchoRequest {
                    message: "hello".into(),
                    ..EchoRequest::default()
                });
                Box::new(GrpcWebEcho(web, body))
            }
        });
    }
    Ok(callers)
}

async fn benchmark(args: &Args) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.seconds);
    let warmup = Duration::from_secs(args.warmup);
    println!(
        "gateway benchmark: unary Echo(\"hello\"), {}s per row after {}s warm-up, median of {} rounds, {} cores, \
         {} thread(s) per proxy",
        args.seconds,
        args.warmup,
        args.rounds,
        std::thread::available_parallelism().map_or(0, usize::from),
        args.proxy_threads
    );

    let echo = spawn_role(&["echo"]).await?;
    let upstream = format!("http://{}", echo.address);
    let gateway = spawn_role(&["gateway", &upstream, &args.proxy_threads.to_string()]).await?;
    let in_process = spawn_role(&["in-process"]).await?;
    let nginx = if args.nginx.exists() {
        Some(spawn_nginx(&args.nginx, echo.address, args.proxy_threads).await?)
    } else {
        println!(
            "({} not found: the nginx rows are skipped; apt-get install nginx-light)",
            args.nginx.display()
        );
        None
    };

    // (row name, address, client, whose CPU counts)
    let mut rows: Vec<(&str, SocketAddr, Client, u32)> = vec![
        ("direct (gRPC to the service)", echo.address, Client::Grpc, echo.pid()?),
        ("gateway, gRPC", gateway.address, Client::Grpc, gateway.pid()?),
        (
            "gateway, grpc-web (HTTP/1.1)",
            gateway.address,
            Client::GrpcWeb,
            gateway.pid()?,
        ),
    ];
    if let Some((nginx, _)) = &nginx {
        rows.push(("nginx grpc_pass, gRPC", nginx.address, Client::Grpc, nginx.pid()?));
    }
    rows.push((
        "cube up (gateway + service in-process)",
        in_process.address,
        Client::Grpc,
        in_process.pid()?,
    ));

    for concurrency in [1, 64] {
        println!();
        println!("concurrency {concurrency}");
        println!(
            "{:<40} {:>10} {:>9} {:>9} {:>14} {:>9} {:>12} {:>7}",
            "path", "req/s", "p50 µs", "p99 µs", "CPU s/1k req", "× direct", "+p50 µs", "errors"
        );
        let mut runs: Vec<Vec<Measurement>> = rows.iter().map(|_| Vec::new()).collect();
        for _ in 0..args.rounds {
            for ((_, address, client, pid), runs) in rows.iter().zip(&mut runs) {
                let callers = callers(*address, *client, concurrency).await?;
                runs.push(measure(callers, warmup, duration, *pid).await?);
            }
        }
        let medians: Vec<Measurement> = runs.iter().map(|runs| Measurement::median(runs)).collect();
        let direct = &medians[0];
        for ((name, ..), m) in rows.iter().zip(&medians) {
            println!(
                "{:<40} {:>10.0} {:>9.0} {:>9.0} {:>14.4} {:>9.2} {:>12.0} {:>7}",
                name,
                m.rps(),
                m.p50_us,
                m.p99_us,
                m.cpu_per_1000(),
                m.rps() / direct.rps(),
                m.p50_us - direct.p50_us,
                m.errors
            );
        }
    }
    println!();
    println!("CPU s/1k req is the CPU time of the process between client and service (for direct, the service).");
    cube_up_readiness().await?;
    Ok(())
}

/// Times `cube up` from spawn to its ready line, when the `cube` binary was built beside this one.
async fn cube_up_readiness() -> anyhow::Result<()> {
    let cube = std::env::current_exe()?.with_file_name("cube");
    if !cube.exists() {
        println!("cube up readiness: skipped ({} not built)", cube.display());
        return Ok(());
    }
    let data_dir = tempfile_dir::Dir::new()?;
    let started = Instant::now();
    let mut child = Command::new(&cube)
        .args([
            "up",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data_dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let line = BufReader::new(stdout)
        .lines()
        .next_line()
        .await?
        .context("no ready line")?;
    let ready = started.elapsed();
    let address = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .context("no address")?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
        .connect()
        .await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "cube.auth.v1".into(),
        })
        .await?;
    let answered = started.elapsed();
    println!(
        "cube up readiness: ready line after {:.1} ms, first health answer through the gateway after {:.1} ms",
        ready.as_secs_f64() * 1000.0,
        answered.as_secs_f64() * 1000.0
    );
    Ok(())
}
