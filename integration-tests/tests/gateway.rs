//! The gateway in front of a real upstream: every call shape, metadata, deadlines, error details, routing
//! failures and bad input, over gRPC and grpc-web.

use std::time::{Duration, Instant};

use bytes::Bytes;
use cube_integration_tests::echo::echo_service_client::EchoServiceClient;
use cube_integration_tests::echo::{EchoRequest, EchoStreamRequest};
use cube_integration_tests::grpc_web::{GrpcWebClient, Http, Mode, frame};
use cube_integration_tests::{Running, connect, echo_gateway, echo_routes, start_echo, start_gateway};
use cube_kit::Channel;
use futures::StreamExt;
use prost::Message;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

const ECHO: &str = "/cube.testing.v1.EchoService/Echo";

async fn remote_setup(max_message_bytes: usize) -> (Running, Running) {
    let echo = start_echo().await;
    let channel = Channel::remote(&echo.url()).expect("echo url");
    let gateway = start_gateway(echo_gateway(channel, max_message_bytes)).await;
    (echo, gateway)
}

fn request(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.to_owned(),
        ..EchoRequest::default()
    }
}

#[tokio::test]
async fn every_call_shape_streams_through_with_metadata() {
    let (_echo, gateway) = remote_setup(1 << 20).await;
    let mut client = EchoServiceClient::new(connect(&gateway).await);

    let mut call = tonic::Request::new(EchoRequest {
        message: "hello".into(),
        payload: vec![1, 2, 3],
        ..EchoRequest::default()
    });
    call.metadata_mut()
        .insert("x-request-id", "r-1".parse().expect("ascii"));
    let reply = client.echo(call).await.expect("echo").into_inner();
    assert_eq!(reply.message, "hello");
    assert_eq!(reply.payload, [1, 2, 3]);
    assert_eq!(reply.metadata.get("x-request-id").map(String::as_str), Some("r-1"));

    let replies: Vec<_> = client
        .echo_stream(EchoStreamRequest {
            message: "tick".into(),
            count: 5,
            interval_ms: 0,
        })
        .await
        .expect("stream")
        .into_inner()
        .map(|item| item.expect("item").message)
        .collect()
        .await;
    assert_eq!(replies, ["tick 0", "tick 1", "tick 2", "tick 3", "tick 4"]);

    let requests = futures::stream::iter(["a", "b", "c"].map(request));
    let collected = client.collect(requests).await.expect("collect").into_inner();
    assert_eq!(collected.message, "a,b,c");

    // Bidirectional: each answer arrives before the next request is sent, so nothing is buffered whole.
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    let mut answers = client
        .chat(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await
        .expect("chat")
        .into_inner();
    for word in ["one", "two", "three"] {
        sender.send(request(word)).await.expect("send");
        let answer = tokio::time::timeout(Duration::from_secs(5), answers.next())
            .await
            .expect("answer in time")
            .expect("an answer")
            .expect("ok answer");
        assert_eq!(answer.message, word);
    }
    drop(sender);
    assert!(answers.next().await.is_none(), "the stream ends after the client's end");
}

#[tokio::test]
async fn streams_are_relayed_as_they_happen_not_at_the_end() {
    let (_echo, gateway) = remote_setup(1 << 20).await;
    let mut client = EchoServiceClient::new(connect(&gateway).await);
    let started = Instant::now();
    let mut stream = client
        .echo_stream(EchoStreamRequest {
            message: "slow".into(),
            count: 3,
            interval_ms: 700,
        })
        .await
        .expect("stream")
        .into_inner();
    let first = stream.next().await.expect("first").expect("ok");
    assert_eq!(first.message, "slow 0");
    assert!(
        started.elapsed() < Duration::from_millis(600),
        "the first message took {:?}: the gateway held the stream back",
        started.elapsed()
    );
    assert_eq!(stream.count().await, 2);
}

#[tokio::test]
async fn error_details_survive_the_gateway() {
    let (_echo, gateway) = remote_setup(1 << 20).await;
    let mut client = EchoServiceClient::new(connect(&gateway).await);
    let status = client
        .echo(EchoRequest {
            message: "bad".into(),
            fail_code: Code::InvalidArgument as i32,
            ..EchoRequest::default()
        })
        .await
        .expect_err("asked to fail");
    assert_eq!(status.code(), Code::InvalidArgument);
    let details = status.get_error_details();
    assert_eq!(details.error_info().expect("error info").reason, "FIELD_INVALID");
    assert_eq!(details.error_info().expect("error info").domain, "echo.cube.dev");
    assert_eq!(
        details.bad_request().expect("bad request").field_violations[0].field,
        "message"
    );

    let status = client
        .echo(EchoRequest {
            message: "gone".into(),
            fail_code: Code::FailedPrecondition as i32,
            ..EchoRequest::default()
        })
        .await
        .expect_err("asked to fail");
    assert_eq!(status.code(), Code::FailedPrecondition);
    let info = status.get_details_error_info().expect("error info");
    assert_eq!(info.metadata.get("message").map(String::as_str), Some("gone"));
}

#[tokio::test]
async fn deadlines_are_kept() {
    let (_echo, gateway) = remote_setup(1 << 20).await;
    // A raw client, so that the gateway (not the client library) has to enforce the deadline.
    let mut client = GrpcWebClient::connect(gateway.address, Http::Two)
        .await
        .expect("connect");
    let late = EchoRequest {
        message: "late".into(),
        delay_ms: 3_000,
        ..EchoRequest::default()
    };
    let started = Instant::now();
    let reply = client
        .call(ECHO, Mode::Binary, frame(&late), &[("grpc-timeout", "200m")])
        .await
        .expect("answered");
    let status = reply.status();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );

    let mut grpc = EchoServiceClient::new(connect(&gateway).await);
    let mut call = tonic::Request::new(request("in time"));
    call.set_timeout(Duration::from_secs(5));
    let reply = grpc.echo(call).await.expect("in time").into_inner();
    let forwarded = reply
        .metadata
        .get("grpc-timeout")
        .expect("grpc-timeout reaches the service");
    assert!(
        forwarded.ends_with('m') || forwarded.ends_with('u') || forwarded.ends_with('n'),
        "{forwarded}"
    );
}

#[tokio::test]
async fn unknown_services_and_unreachable_upstreams_get_clean_codes() {
    let dead = Channel::remote("http://127.0.0.1:1").expect("url");
    let gateway = start_gateway(echo_gateway(dead, 1 << 20)).await;
    let channel = connect(&gateway).await;

    let status = EchoServiceClient::new(channel.clone())
        .echo(request("anyone?"))
        .await
        .expect_err("nobody listens");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let info = status.get_details_error_info().expect("error info");
    assert_eq!(info.reason, "UPSTREAM_UNAVAILABLE");
    assert_eq!(info.domain, "gateway.cube.dev");

    let mut client = GrpcWebClient::connect(gateway.address, Http::Two)
        .await
        .expect("connect");
    let reply = client
        .call(
            "/cube.nothing.v1.NoService/Call",
            Mode::Binary,
            frame(&request("x")),
            &[],
        )
        .await
        .expect("answered");
    let status = reply.status();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert_eq!(status.get_details_error_info().expect("info").reason, "UNKNOWN_SERVICE");

    // The gateway's own health still answers.
    let health = HealthClient::new(channel)
        .check(HealthCheckRequest { service: String::new() })
        .await
        .expect("health");
    assert_eq!(health.into_inner().status(), ServingStatus::Serving);
}

#[tokio::test]
async fn grpc_web_binary_and_text_over_both_http_versions() {
    let (_echo, gateway) = remote_setup(1 << 20).await;
    for http in [Http::One, Http::Two] {
        let mut client = GrpcWebClient::connect(gateway.address, http).await.expect("connect");
        for mode in [Mode::Binary, Mode::Text] {
            let reply = client
                .call(ECHO, mode, frame(&request("web")), &[("x-client", "test")])
                .await
                .expect("call");
            assert_eq!(reply.http_status, 200);
            assert_eq!(
                reply.status().code(),
                Code::Ok,
                "{http:?} {mode:?}: {:?}",
                reply.status()
            );
            let answer = cube_integration_tests::echo::EchoResponse::decode(reply.messages[0].clone()).expect("decode");
            assert_eq!(answer.message, "web");
            assert_eq!(answer.metadata.get("x-client").map(String::as_str), Some("test"));
            let content_type = reply.headers.get("content-type").expect("content type");
            assert!(
                content_type
                    .to_str()
                    .expect("ascii")
                    .starts_with("application/grpc-web"),
                "{content_type:?}"
            );
        }
    }
}

#[tokio::test]
async fn bad_input_gets_grpc_errors_and_the_gateway_keeps_serving() {
    let (_echo, gateway) = remote_setup(1024).await;
    let mut client = GrpcWebClient::connect(gateway.address, Http::One)
        .await
        .expect("connect");

    // A body that ends inside a message.
    let whole = frame(&request("truncated"));
    let reply = client
        .call(ECHO, Mode::Binary, whole.slice(..whole.len() - 3), &[])
        .await
        .expect("answered");
    let status = reply.status();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        status.get_details_error_info().expect("info").reason,
        "MALFORMED_REQUEST"
    );
    assert!(
        status.message().contains("ends inside a message"),
        "{}",
        status.message()
    );

    // Text mode whose body is not base64.
    let mut text = GrpcWebClient::connect(gateway.address, Http::One)
        .await
        .expect("connect");
    let reply = text
        .call(
            ECHO,
            Mode::Binary,
            Bytes::from_static(b"!!!! not base64 !!!!"),
            &[("content-type", "application/grpc-web-text")],
        )
        .await
        .expect("answered");
    let status = reply.status();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        status.get_details_error_info().expect("info").reason,
        "MALFORMED_REQUEST"
    );

    // A message over the configured limit.
    let big = EchoRequest {
        payload: vec![7; 4096],
        ..EchoRequest::default()
    };
    let reply = client
        .call(ECHO, Mode::Binary, frame(&big), &[])
        .await
        .expect("answered");
    let status = reply.status();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let info = status.get_details_error_info().expect("info");
    assert_eq!(info.reason, "MESSAGE_TOO_LARGE");
    assert_eq!(info.metadata.get("limit").map(String::as_str), Some("1024"));

    // A garbage grpc-timeout.
    let reply = client
        .call(
            ECHO,
            Mode::Binary,
            frame(&request("when?")),
            &[("grpc-timeout", "soon")],
        )
        .await
        .expect("answered");
    let status = reply.status();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let details = status.get_error_details();
    assert_eq!(
        details.bad_request().expect("bad request").field_violations[0].field,
        "grpc-timeout"
    );

    // And after all that, the same connection and a new gRPC one still work.
    let reply = client
        .call(ECHO, Mode::Binary, frame(&request("still here")), &[])
        .await
        .expect("call");
    assert_eq!(reply.status().code(), Code::Ok, "{:?}", reply.status());
    let mut grpc = EchoServiceClient::new(connect(&gateway).await);
    assert_eq!(
        grpc.echo(request("and here")).await.expect("echo").into_inner().message,
        "and here"
    );
}

#[tokio::test]
async fn in_process_upstreams_work_like_remote_ones() {
    let gateway = start_gateway(echo_gateway(Channel::in_process(echo_routes()), 1 << 20)).await;
    let mut client = EchoServiceClient::new(connect(&gateway).await);
    assert_eq!(
        client.echo(request("local")).await.expect("echo").into_inner().message,
        "local"
    );
    let status = client
        .echo(EchoRequest {
            fail_code: Code::InvalidArgument as i32,
            ..request("x")
        })
        .await
        .expect_err("fails");
    assert_eq!(
        status
            .get_error_details()
            .bad_request()
            .expect("bad request")
            .field_violations
            .len(),
        1
    );
}

#[tokio::test]
async fn health_is_the_gateways_own_and_asks_upstreams_for_theirs() {
    let (echo, gateway) = remote_setup(1 << 20).await;
    let mut health = HealthClient::new(connect(&gateway).await);
    let check = |service: &str| HealthCheckRequest {
        service: service.to_owned(),
    };
    let own = health.check(check("")).await.expect("own").into_inner();
    assert_eq!(own.status(), ServingStatus::Serving);
    for name in ["cube.testing.v1", "cube.testing.v1.EchoService"] {
        let upstream = health.check(check(name)).await.expect(name).into_inner();
        assert_eq!(upstream.status(), ServingStatus::Serving, "{name}");
    }
    let status = health.check(check("cube.unknown.v1")).await.expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound);

    // Watch relays the upstream's changes: stopping it ends in NOT_SERVING or a closed stream.
    let mut watch = health
        .watch(check("cube.testing.v1"))
        .await
        .expect("watch")
        .into_inner();
    let first = watch.next().await.expect("first").expect("ok");
    assert_eq!(first.status(), ServingStatus::Serving);
    echo.stop().await;
    let next = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("the watch notices the upstream stopping");
    if let Some(Ok(update)) = next {
        assert_eq!(update.status(), ServingStatus::NotServing);
    }
}

#[tokio::test]
async fn shutdown_ends_health_watches_and_stops_promptly() {
    let (_echo, gateway) = remote_setup(1 << 20).await;
    let mut health = HealthClient::new(connect(&gateway).await);
    let mut watch = health
        .watch(HealthCheckRequest { service: String::new() })
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(
        watch.next().await.expect("first").expect("ok").status(),
        ServingStatus::Serving
    );
    let started = Instant::now();
    let stopping = tokio::spawn(gateway.stop());
    let update = watch.next().await.expect("an update").expect("ok");
    assert_eq!(update.status(), ServingStatus::NotServing);
    assert!(watch.next().await.is_none(), "the watch ends");
    stopping.await.expect("stopped");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn reflection_describes_the_routed_apis() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let (_echo, gateway) = remote_setup(1 << 20).await;
    let mut client = ServerReflectionClient::new(connect(&gateway).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses.next().await.expect("a response").expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response {response:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|service| service.name).collect();
    for expected in ["cube.testing.v1.EchoService", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|name| name == expected),
            "{expected} missing from {names:?}"
        );
    }
}

#[tokio::test]
async fn unary_calls_take_exactly_one_request_message() {
    let (_echo, gateway) = remote_setup(1 << 20).await;
    for http in [Http::One, Http::Two] {
        let mut client = GrpcWebClient::connect(gateway.address, http).await.expect("connect");
        let two = [frame(&request("one")), frame(&request("two"))].concat();
        for (what, body) in [("two messages", Bytes::from(two.clone())), ("no message", Bytes::new())] {
            let reply = client.call(ECHO, Mode::Binary, body, &[]).await.expect("answered");
            let status = reply.status();
            assert_eq!(status.code(), Code::InvalidArgument, "{http:?} {what}: {status:?}");
            let info = status.get_details_error_info().expect("error info");
            assert_eq!(info.reason, "MALFORMED_REQUEST", "{what}");
            assert_eq!(info.domain, "gateway.cube.dev", "{what}");
            assert!(reply.messages.is_empty(), "{what}: the call was not answered");
        }
        // A client-streaming method takes any number, and the connection still serves.
        let reply = client
            .call(
                "/cube.testing.v1.EchoService/Collect",
                Mode::Binary,
                Bytes::from(two),
                &[],
            )
            .await
            .expect("answered");
        assert_eq!(reply.status().code(), Code::Ok, "{:?}", reply.status());
        let collected = cube_integration_tests::echo::EchoResponse::decode(reply.messages[0].clone()).expect("decode");
        assert_eq!(collected.message, "one,two");

        // A message marked compressed in a request that names no grpc-encoding.
        let mut compressed = frame(&request("zip")).to_vec();
        compressed[0] = 1;
        let reply = client
            .call(ECHO, Mode::Binary, Bytes::from(compressed), &[])
            .await
            .expect("answered");
        let status = reply.status();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(
            status.get_details_error_info().expect("info").reason,
            "MALFORMED_REQUEST"
        );
    }
}

#[tokio::test]
async fn made_up_methods_do_not_grow_the_gateways_metrics() {
    const CALLS: usize = 20_000;
    let echo = start_echo().await;
    let gateway = echo_gateway(Channel::remote(&echo.url()).expect("echo url"), 1 << 20);
    let mut registry = prometheus_client::registry::Registry::with_prefix("cube");
    let metrics = cube_kit::metrics::RpcMetrics::register(&mut registry);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let signal = shutdown.clone().cancelled_owned();
    let server = tokio::spawn(async move {
        gateway
            .serve(listener, &cube_integration_tests::test_server_args(), &metrics, signal)
            .await
    });
    let encode = |registry: &prometheus_client::registry::Registry| {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
        text
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let call = |path: String, timeout: Option<Duration>| {
        let channel = channel.clone();
        async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready().await.expect("ready");
            let mut request = tonic::Request::new(request("made up"));
            if let Some(timeout) = timeout {
                request.set_timeout(timeout);
            }
            grpc.unary::<_, cube_integration_tests::echo::EchoResponse, _>(
                request,
                http::uri::PathAndQuery::try_from(path).expect("path"),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .map(|_| Code::Ok)
            .unwrap_or_else(|status| status.code())
        }
    };
    assert_eq!(call(ECHO.to_owned(), None).await, Code::Ok);
    let before = encode(&registry);

    let started = Instant::now();
    let codes: Vec<Code> = futures::stream::iter(0..CALLS)
        .map(|index| match index % 4 {
            // Forwarded to the echo service, which does not serve it.
            0 => call(format!("/cube.testing.v1.EchoService/Made{index}"), None),
            // No route.
            1 => call(format!("/cube.x{index}.v1.Nothing/Call"), None),
            // Not even a method path.
            2 => call(format!("/n{index}"), None),
            // A deadline that passes at once: answered with something else than UNIMPLEMENTED.
            _ => call(
                format!("/cube.testing.v1.EchoService/Late{index}"),
                Some(Duration::from_nanos(1)),
            ),
        })
        .buffer_unordered(64)
        .collect()
        .await;
    assert!(
        codes.iter().all(|code| *code != Code::Ok),
        "a made-up method answered OK"
    );
    let after = encode(&registry);
    let growth = after.len().saturating_sub(before.len());
    eprintln!(
        "{CALLS} made-up calls through the gateway in {:?}: metrics grew from {} to {} bytes ({growth})",
        started.elapsed(),
        before.len(),
        after.len()
    );
    assert!(
        growth < 10 * 1024,
        "the gateway's metrics grew by {growth} bytes:\n{after}"
    );
    assert!(
        after.contains(r#"grpc_service="cube.testing.v1.EchoService",grpc_method="Echo",grpc_code="OK"} 1"#),
        "{after}"
    );
    shutdown.cancel();
    server.await.expect("gateway task").expect("gateway");
}

#[tokio::test]
async fn reflection_lists_only_the_services_the_gateway_serves() {
    // The services listed through one version of the reflection API (the two differ only in their types).
    macro_rules! listed_services {
        ($version:ident, $gateway:expr) => {{
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
            let request = tonic_reflection::pb::$version::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let response = ServerReflectionClient::new(connect($gateway).await)
                .server_reflection_info(futures::stream::iter([request]))
                .await
                .expect("reflection")
                .into_inner()
                .next()
                .await
                .expect("a response")
                .expect("ok");
            let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
                panic!("unexpected reflection response {response:?}");
            };
            list.service
                .into_iter()
                .map(|service| service.name)
                .collect::<Vec<String>>()
        }};
    }

    let echo = start_echo().await;
    let channel = Channel::remote(&echo.url()).expect("echo url");
    // Listing services asks no upstream, so any channel serves as the projects route.
    let gateway = start_gateway(echo_gateway(channel.clone(), 1 << 20).route("cube.projects.v1", channel)).await;
    for names in [listed_services!(v1, &gateway), listed_services!(v1alpha, &gateway)] {
        for served in [
            "cube.projects.v1.ProjectService",
            "cube.testing.v1.EchoService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            assert!(
                names.iter().any(|name| name == served),
                "{served} missing from {names:?}"
            );
        }
        // Described by the gateway's descriptor sets, but served by no route.
        for unrouted in ["cube.common.v1.ProjectWorkloadService", "cube.auth.v1.AuthService"] {
            assert!(
                !names.iter().any(|name| name == unrouted),
                "{unrouted} listed in {names:?}"
            );
        }
    }
}
