//! Failed-login throttling, in process and in the real Redis of the test environment (`scripts/test-env.sh up
//! redis`). Every test runs against both stores; the Redis one uses a key prefix of its own.

use std::net::IpAddr;
use std::time::Duration;

use cube_auth::throttle::{LoginThrottle, ThrottleError, ThrottlePolicy};
use deadpool_redis::redis;

fn ip(text: &str) -> Option<IpAddr> {
    Some(text.parse().expect("an IP address"))
}

fn redis_pool() -> deadpool_redis::Pool {
    cube_kit::redis::pool(&cube_testkit::require("CUBE_TEST_REDIS_URL")).expect("a valid Redis URL")
}

/// The two stores with the same policy; the Redis one under a key prefix of its own.
fn throttles(policy: ThrottlePolicy) -> Vec<(&'static str, LoginThrottle)> {
    let prefix = format!("cube-auth-test:{}", uuid::Uuid::new_v4());
    vec![
        ("in-process", LoginThrottle::in_process(policy)),
        ("redis", LoginThrottle::redis(redis_pool(), policy).with_prefix(prefix)),
    ]
}

fn policy(per_user: u32, per_client: u32, window: Duration) -> ThrottlePolicy {
    ThrottlePolicy {
        max_failures_per_user: per_user,
        max_failures_per_client: per_client,
        window,
    }
}

/// Returns the retry-after of a limited login, failing the test when it was allowed.
async fn limited(throttle: &LoginThrottle, user: &str, client: Option<IpAddr>, what: &str) -> Duration {
    match throttle.check(user, client).await {
        Err(ThrottleError::Limited { retry_after }) => retry_after,
        other => panic!("{what}: expected Limited, got {other:?}"),
    }
}

async fn allowed(throttle: &LoginThrottle, user: &str, client: Option<IpAddr>, what: &str) {
    if let Err(e) = throttle.check(user, client).await {
        panic!("{what}: expected the login to be allowed, got {e:?}");
    }
}

async fn fail(throttle: &LoginThrottle, user: &str, client: Option<IpAddr>) {
    throttle.record_failure(user, client).await.expect("record a failure");
}

#[test]
fn the_default_policy_is_five_per_user_twenty_per_client_in_fifteen_minutes() {
    assert_eq!(ThrottlePolicy::default(), policy(5, 20, Duration::from_secs(15 * 60)));
}

#[tokio::test]
async fn a_user_is_limited_after_its_failures_from_any_client() {
    let window = Duration::from_secs(60);
    for (store, throttle) in throttles(policy(3, 100, window)) {
        let clients = ["192.0.2.1", "192.0.2.2", "192.0.2.3"];
        for (i, client) in clients.iter().enumerate() {
            allowed(
                &throttle,
                "alice",
                ip(client),
                &format!("{store}: before failure {}", i + 1),
            )
            .await;
            fail(&throttle, "alice", ip(client)).await;
        }
        let retry_after = limited(
            &throttle,
            "alice",
            ip("198.51.100.9"),
            &format!("{store}: a fourth client"),
        )
        .await;
        assert!(
            retry_after <= window && retry_after > window - Duration::from_secs(10),
            "{store}: retry after {retry_after:?} in a window of {window:?}"
        );
        limited(&throttle, "alice", None, &format!("{store}: no client address")).await;
        // Names differ only in case: the same user.
        limited(&throttle, "ALICE", ip("198.51.100.9"), &format!("{store}: ALICE")).await;
        allowed(&throttle, "bob", ip("192.0.2.1"), &format!("{store}: another user")).await;
    }
}

#[tokio::test]
async fn a_client_is_limited_after_its_failures_for_any_user() {
    let window = Duration::from_secs(60);
    for (store, throttle) in throttles(policy(100, 3, window)) {
        let client = ip("203.0.113.5");
        for user in ["u1", "u2", "u3"] {
            allowed(&throttle, "u4", client, &format!("{store}: before {user}'s failure")).await;
            fail(&throttle, user, client).await;
        }
        let retry_after = limited(&throttle, "u4", client, &format!("{store}: a fourth user")).await;
        assert!(
            retry_after <= window && retry_after > Duration::ZERO,
            "{store}: {retry_after:?}"
        );
        allowed(&throttle, "u4", ip("203.0.113.6"), &format!("{store}: another client")).await;
        allowed(&throttle, "u1", None, &format!("{store}: no client address")).await;
        // One host's IPv6 addresses share its /64.
        let v6 = ["2001:db8:5:6::1", "2001:db8:5:6::2", "2001:db8:5:6:aaaa::3"];
        for (user, client) in ["v1", "v2", "v3"].into_iter().zip(v6) {
            fail(&throttle, user, ip(client)).await;
        }
        limited(&throttle, "v4", ip("2001:db8:5:6::99"), &format!("{store}: same /64")).await;
        allowed(&throttle, "v4", ip("2001:db8:5:7::1"), &format!("{store}: another /64")).await;
    }
}

#[tokio::test]
async fn one_users_failures_do_not_limit_another_user_from_another_client() {
    for (store, throttle) in throttles(policy(2, 2, Duration::from_secs(60))) {
        let attacker = ip("192.0.2.66");
        fail(&throttle, "victim", attacker).await;
        fail(&throttle, "victim", attacker).await;
        allowed(&throttle, "bystander", ip("192.0.2.77"), &format!("{store}: bystander")).await;
        limited(
            &throttle,
            "victim",
            ip("192.0.2.77"),
            &format!("{store}: the victim's name, elsewhere"),
        )
        .await;
        limited(
            &throttle,
            "bystander",
            attacker,
            &format!("{store}: the attacker's address"),
        )
        .await;
    }
}

#[tokio::test]
async fn retry_after_is_the_longer_of_the_two_windows() {
    let window = Duration::from_secs(30);
    for (store, throttle) in throttles(policy(1, 2, window)) {
        let client = ip("198.51.100.20");
        // The user's window opens now, the client's a little later.
        fail(&throttle, "early", None).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        fail(&throttle, "late1", client).await;
        fail(&throttle, "late2", client).await;

        let user_only = limited(&throttle, "early", None, &format!("{store}: user")).await;
        let client_only = limited(&throttle, "someone", client, &format!("{store}: client")).await;
        let both = limited(&throttle, "early", client, &format!("{store}: both")).await;
        assert!(
            client_only > user_only + Duration::from_millis(150),
            "{store}: the client's window ({client_only:?}) opened after the user's ({user_only:?})"
        );
        assert!(
            both > user_only + Duration::from_millis(150),
            "{store}: {both:?} vs {user_only:?}"
        );
        assert!(
            both <= client_only && both <= window,
            "{store}: {both:?} vs {client_only:?}"
        );
    }
}

#[tokio::test]
async fn a_success_clears_the_users_count_but_not_the_clients() {
    for (store, throttle) in throttles(policy(2, 3, Duration::from_secs(60))) {
        let client = ip("192.0.2.10");
        fail(&throttle, "carol", client).await;
        fail(&throttle, "carol", client).await;
        limited(
            &throttle,
            "carol",
            ip("192.0.2.11"),
            &format!("{store}: carol after two failures"),
        )
        .await;

        throttle.record_success("Carol").await.expect("record a success");
        allowed(
            &throttle,
            "carol",
            ip("192.0.2.11"),
            &format!("{store}: carol after a success"),
        )
        .await;
        // The count starts again from zero: one failure is not yet the limit.
        fail(&throttle, "carol", ip("192.0.2.11")).await;
        allowed(
            &throttle,
            "carol",
            ip("192.0.2.11"),
            &format!("{store}: carol after one new failure"),
        )
        .await;

        // The client still has its two failures: a third reaches its limit of three.
        allowed(&throttle, "dave", client, &format!("{store}: client at two")).await;
        fail(&throttle, "dave", client).await;
        limited(&throttle, "erin", client, &format!("{store}: client at three")).await;
    }
}

#[tokio::test]
async fn counts_expire_with_their_window() {
    let window = Duration::from_secs(1);
    for (store, throttle) in throttles(policy(2, 100, window)) {
        let client = ip("192.0.2.30");
        fail(&throttle, "frank", client).await;
        fail(&throttle, "frank", client).await;
        let retry_after = limited(&throttle, "frank", client, &format!("{store}: frank")).await;
        assert!(retry_after <= window, "{store}: {retry_after:?}");

        cube_testkit::eventually(
            &format!("{store}: frank's window to end"),
            Duration::from_secs(5),
            || {
                let throttle = throttle.clone();
                async move { throttle.check("frank", client).await.ok() }
            },
        )
        .await;
        // A new window: one failure is below the limit again.
        fail(&throttle, "frank", client).await;
        allowed(&throttle, "frank", client, &format!("{store}: frank in a new window")).await;
    }
}

#[tokio::test]
async fn redis_keys_are_named_per_user_and_client_and_expire() {
    let window = Duration::from_secs(60);
    let prefix = format!("cube-auth-test:{}", uuid::Uuid::new_v4());
    let pool = redis_pool();
    let throttle = LoginThrottle::redis(pool.clone(), policy(5, 20, window)).with_prefix(prefix.clone());
    throttle
        .record_failure("Grace", ip("192.0.2.40"))
        .await
        .expect("record");
    throttle
        .record_failure("grace", ip("192.0.2.41"))
        .await
        .expect("record");

    let mut connection = pool.get().await.expect("a Redis connection");
    let user_key = format!("{prefix}:user:grace");
    let client_key = format!("{prefix}:client:192.0.2.40");
    let user: Option<u32> = redis::cmd("GET")
        .arg(&user_key)
        .query_async(&mut connection)
        .await
        .expect("GET");
    let client: Option<u32> = redis::cmd("GET")
        .arg(&client_key)
        .query_async(&mut connection)
        .await
        .expect("GET");
    assert_eq!((user, client), (Some(2), Some(1)));
    for key in [&user_key, &client_key] {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut connection)
            .await
            .expect("PTTL");
        assert!(ttl > 0 && ttl <= 60_000, "{key} expires in {ttl} ms");
    }

    throttle.record_success("grace").await.expect("record a success");
    let exists: u32 = redis::cmd("EXISTS")
        .arg(&user_key)
        .arg(&client_key)
        .query_async(&mut connection)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 1, "the user's key is gone, the client's stays");
    let _: u32 = redis::cmd("DEL")
        .arg(&client_key)
        .query_async(&mut connection)
        .await
        .expect("DEL");
}

#[tokio::test]
async fn a_limit_of_zero_is_no_limit() {
    for (store, throttle) in throttles(policy(0, 1, Duration::from_secs(60))) {
        allowed(&throttle, "judy", None, &format!("{store}: no failures yet")).await;
        for _ in 0..3 {
            fail(&throttle, "judy", None).await;
        }
        allowed(&throttle, "judy", None, &format!("{store}: the user limit is off")).await;
        fail(&throttle, "judy", ip("192.0.2.60")).await;
        limited(
            &throttle,
            "judy",
            ip("192.0.2.60"),
            &format!("{store}: the client limit still holds"),
        )
        .await;
    }
}

#[tokio::test]
async fn clones_share_their_counts() {
    for (store, throttle) in throttles(policy(1, 100, Duration::from_secs(60))) {
        let other = throttle.clone();
        fail(&throttle, "heidi", None).await;
        limited(&other, "heidi", None, &format!("{store}: the clone sees the failure")).await;
    }
}

#[tokio::test]
async fn an_unreachable_redis_is_unavailable() {
    // Port 1 on loopback refuses connections.
    let pool = cube_kit::redis::pool("redis://127.0.0.1:1/0").expect("a valid Redis URL");
    let throttle = LoginThrottle::redis(pool, ThrottlePolicy::default());
    let check = tokio::time::timeout(Duration::from_secs(10), throttle.check("ivan", ip("192.0.2.50")))
        .await
        .expect("check gave up by itself");
    assert!(matches!(check, Err(ThrottleError::Unavailable(_))), "{check:?}");
    let record = throttle.record_failure("ivan", None).await;
    assert!(matches!(record, Err(ThrottleError::Unavailable(_))), "{record:?}");
    let success = throttle.record_success("ivan").await;
    assert!(matches!(success, Err(ThrottleError::Unavailable(_))), "{success:?}");
}
