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

/// A policy with these limits (user at an address, address, user), a minute's memory and lock-outs of 10 s
/// doubling up to 40 s.
fn policy(per_user_client: u32, per_client: u32, per_user: u32) -> ThrottlePolicy {
    ThrottlePolicy {
        max_failures_per_user_client: per_user_client,
        max_failures_per_client: per_client,
        max_failures_per_user: per_user,
        window: Duration::from_secs(60),
        first_lockout: Duration::from_secs(10),
        longest_lockout: Duration::from_secs(40),
        known_client_ttl: Duration::from_secs(60),
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

/// Asserts that a retry-after is `expected`, give or take the few seconds a test takes.
fn about(retry_after: Duration, expected: Duration, what: &str) {
    assert!(
        retry_after <= expected && retry_after + Duration::from_secs(3) > expected,
        "{what}: retry after {retry_after:?}, expected about {expected:?}"
    );
}

#[test]
fn the_default_policy_follows_owasp_asvs_2_2_1() {
    assert_eq!(
        ThrottlePolicy::default(),
        ThrottlePolicy {
            max_failures_per_user_client: 5,
            max_failures_per_client: 20,
            max_failures_per_user: 100,
            window: Duration::from_secs(3600),
            first_lockout: Duration::from_secs(30),
            longest_lockout: Duration::from_secs(15 * 60),
            known_client_ttl: Duration::from_secs(30 * 24 * 3600),
        }
    );
}

#[tokio::test]
async fn a_user_is_locked_out_only_at_the_address_of_their_failures() {
    for (store, throttle) in throttles(policy(3, 100, 100)) {
        let here = ip("192.0.2.1");
        for attempt in 1..=3 {
            allowed(&throttle, "alice", here, &format!("{store}: before failure {attempt}")).await;
            fail(&throttle, "alice", here).await;
        }
        let retry_after = limited(&throttle, "alice", here, &format!("{store}: after three failures")).await;
        about(retry_after, Duration::from_secs(10), store);
        // Names differ only in case: the same user.
        limited(&throttle, "ALICE", here, &format!("{store}: ALICE")).await;
        allowed(
            &throttle,
            "alice",
            ip("192.0.2.2"),
            &format!("{store}: alice elsewhere"),
        )
        .await;
        allowed(&throttle, "alice", None, &format!("{store}: alice with no address")).await;
        allowed(&throttle, "bob", here, &format!("{store}: another user at the address")).await;
    }
}

#[tokio::test]
async fn a_strangers_failures_do_not_lock_the_user_out_of_their_own_address() {
    for (store, throttle) in throttles(ThrottlePolicy::default()) {
        let own = ip("192.0.2.10");
        // One stranger, hammering on regardless of the lock-outs.
        for _ in 0..60 {
            fail(&throttle, "victim", ip("198.51.100.66")).await;
        }
        limited(
            &throttle,
            "victim",
            ip("198.51.100.66"),
            &format!("{store}: the stranger"),
        )
        .await;
        allowed(
            &throttle,
            "victim",
            own,
            &format!("{store}: the victim at home, one stranger"),
        )
        .await;

        // Where the victim logs in successfully becomes their address.
        throttle.record_success("victim", own).await.expect("record a success");
        // Many strangers, each from an address of its own: together they reach the user's limit of 100.
        for i in 0..120 {
            fail(&throttle, "victim", ip(&format!("203.0.113.{}", i % 250))).await;
        }
        let retry_after = limited(
            &throttle,
            "victim",
            ip("192.0.2.99"),
            &format!("{store}: a new address"),
        )
        .await;
        assert!(retry_after > Duration::ZERO, "{store}: {retry_after:?}");
        limited(&throttle, "victim", None, &format!("{store}: no address")).await;
        allowed(
            &throttle,
            "victim",
            own,
            &format!("{store}: the victim at home, many strangers"),
        )
        .await;
        allowed(
            &throttle,
            "bystander",
            ip("192.0.2.99"),
            &format!("{store}: another user"),
        )
        .await;
        // The victim's own mistakes still count at home.
        for _ in 0..5 {
            fail(&throttle, "victim", own).await;
        }
        limited(&throttle, "victim", own, &format!("{store}: five mistakes at home")).await;
    }
}

#[tokio::test]
async fn lockouts_double_with_each_further_failure_up_to_the_longest() {
    for (store, throttle) in throttles(policy(2, 100, 100)) {
        let client = ip("192.0.2.20");
        fail(&throttle, "dora", client).await;
        allowed(&throttle, "dora", client, &format!("{store}: one failure")).await;
        for expected in [10, 20, 40, 40] {
            fail(&throttle, "dora", client).await;
            let retry_after = limited(&throttle, "dora", client, store).await;
            about(
                retry_after,
                Duration::from_secs(expected),
                &format!("{store}: lock-out of {expected} s"),
            );
        }
    }
}

#[tokio::test]
async fn an_address_is_locked_out_for_every_user_after_its_failures() {
    for (store, throttle) in throttles(policy(100, 3, 100)) {
        let client = ip("203.0.113.5");
        for user in ["u1", "u2", "u3"] {
            allowed(&throttle, "u4", client, &format!("{store}: before {user}'s failure")).await;
            fail(&throttle, user, client).await;
        }
        let retry_after = limited(&throttle, "u4", client, &format!("{store}: a fourth user")).await;
        about(retry_after, Duration::from_secs(10), store);
        allowed(&throttle, "u4", ip("203.0.113.6"), &format!("{store}: another address")).await;
        allowed(&throttle, "u1", None, &format!("{store}: no address")).await;
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
async fn retry_after_is_the_longest_lockout_that_applies() {
    for (store, throttle) in throttles(policy(1, 3, 100)) {
        let client = ip("198.51.100.20");
        // erin's failures at the address lock her out there for 10 s, then 20 s, then 40 s; the third one also
        // reaches the address's limit of three, which locks it out for 10 s.
        for _ in 0..3 {
            fail(&throttle, "erin", client).await;
        }
        let erin = limited(&throttle, "erin", client, &format!("{store}: erin")).await;
        let someone = limited(&throttle, "someone", client, &format!("{store}: someone")).await;
        about(erin, Duration::from_secs(40), &format!("{store}: erin"));
        about(someone, Duration::from_secs(10), &format!("{store}: someone else"));
    }
}

#[tokio::test]
async fn a_success_clears_the_users_failures_at_that_address_only() {
    for (store, throttle) in throttles(policy(2, 4, 100)) {
        let (a, b) = (ip("192.0.2.30"), ip("192.0.2.31"));
        fail(&throttle, "carol", a).await;
        fail(&throttle, "carol", b).await;
        throttle.record_success("Carol", a).await.expect("record a success");
        // At a the count starts again from zero; at b it stays at one, so a second failure there locks it.
        fail(&throttle, "carol", a).await;
        allowed(
            &throttle,
            "carol",
            a,
            &format!("{store}: carol at a after one new failure"),
        )
        .await;
        fail(&throttle, "carol", b).await;
        limited(
            &throttle,
            "carol",
            b,
            &format!("{store}: carol at b after two failures"),
        )
        .await;
        // The address keeps its failures (two at a): two more reach its limit of four, for every user.
        fail(&throttle, "dave", a).await;
        allowed(&throttle, "erin", a, &format!("{store}: address at three")).await;
        fail(&throttle, "dave", a).await;
        limited(&throttle, "erin", a, &format!("{store}: address at four")).await;
    }
}

#[tokio::test]
async fn a_lockout_ends_but_the_count_goes_on_within_the_window() {
    let policy = ThrottlePolicy {
        window: Duration::from_millis(1500),
        first_lockout: Duration::from_millis(200),
        longest_lockout: Duration::from_secs(1),
        ..policy(2, 100, 100)
    };
    for (store, throttle) in throttles(policy) {
        let client = ip("192.0.2.40");
        fail(&throttle, "frank", client).await;
        fail(&throttle, "frank", client).await;
        let retry_after = limited(&throttle, "frank", client, &format!("{store}: frank")).await;
        assert!(retry_after <= Duration::from_millis(200), "{store}: {retry_after:?}");
        cube_testkit::eventually(
            &format!("{store}: frank's lock-out to end"),
            Duration::from_secs(5),
            || {
                let throttle = throttle.clone();
                async move { throttle.check("frank", client).await.ok() }
            },
        )
        .await;
        // Within the window the count goes on: the next failure locks again, for twice as long.
        fail(&throttle, "frank", client).await;
        let retry_after = limited(&throttle, "frank", client, &format!("{store}: frank again")).await;
        assert!(
            retry_after > Duration::from_millis(200) && retry_after <= Duration::from_millis(400),
            "{store}: {retry_after:?}"
        );
    }
}

#[tokio::test]
async fn redis_keys_are_named_per_user_address_and_both_and_expire() {
    let prefix = format!("cube-auth-test:{}", uuid::Uuid::new_v4());
    let pool = redis_pool();
    let throttle = LoginThrottle::redis(pool.clone(), policy(2, 20, 100)).with_prefix(prefix.clone());
    throttle
        .record_failure("Grace", ip("192.0.2.40"))
        .await
        .expect("record");
    throttle
        .record_failure("grace", ip("192.0.2.40"))
        .await
        .expect("record");
    throttle
        .record_failure("grace", ip("192.0.2.41"))
        .await
        .expect("record");

    let mut connection = pool.get().await.expect("a Redis connection");
    let pair = format!("{prefix}:user-client:grace:192.0.2.40");
    let client = format!("{prefix}:client:192.0.2.40");
    let user = format!("{prefix}:user:grace");
    let lock = format!("{pair}:lock");
    let known = format!("{prefix}:known:grace:192.0.2.41");
    for (key, expected, longest) in [
        (&pair, 2, 60_000),
        (&client, 2, 60_000),
        (&user, 3, 60_000),
        (&lock, 1, 10_000),
    ] {
        let value: Option<u32> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut connection)
            .await
            .expect("GET");
        assert_eq!(value, Some(expected), "{key}");
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut connection)
            .await
            .expect("PTTL");
        assert!(ttl > 0 && ttl <= longest, "{key} expires in {ttl} ms");
    }

    throttle
        .record_success("grace", ip("192.0.2.41"))
        .await
        .expect("record a success");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&known)
        .query_async(&mut connection)
        .await
        .expect("PTTL");
    assert!(ttl > 0 && ttl <= 60_000, "{known} expires in {ttl} ms");
    throttle
        .record_success("grace", ip("192.0.2.40"))
        .await
        .expect("record a success");
    let exists: u32 = redis::cmd("EXISTS")
        .arg(&pair)
        .arg(&lock)
        .arg(&client)
        .arg(&user)
        .query_async(&mut connection)
        .await
        .expect("EXISTS");
    assert_eq!(
        exists, 2,
        "the pair's count and lock are gone, the address's and user's counts stay"
    );
    let _: u32 = redis::cmd("DEL")
        .arg(&client)
        .arg(&user)
        .arg(&known)
        .arg(format!("{prefix}:known:grace:192.0.2.40"))
        .arg(format!("{prefix}:user-client:grace:192.0.2.41"))
        .arg(format!("{prefix}:client:192.0.2.41"))
        .query_async(&mut connection)
        .await
        .expect("DEL");
}

#[tokio::test]
async fn a_limit_of_zero_is_no_limit() {
    for (store, throttle) in throttles(policy(0, 1, 0)) {
        allowed(&throttle, "judy", None, &format!("{store}: no failures yet")).await;
        for _ in 0..3 {
            fail(&throttle, "judy", None).await;
        }
        allowed(&throttle, "judy", None, &format!("{store}: the user limits are off")).await;
        fail(&throttle, "judy", ip("192.0.2.60")).await;
        limited(
            &throttle,
            "judy",
            ip("192.0.2.60"),
            &format!("{store}: the address limit still holds"),
        )
        .await;
    }
}

#[tokio::test]
async fn clones_share_their_counts() {
    for (store, throttle) in throttles(policy(1, 100, 100)) {
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
    let success = throttle.record_success("ivan", ip("192.0.2.50")).await;
    assert!(matches!(success, Err(ThrottleError::Unavailable(_))), "{success:?}");
}
