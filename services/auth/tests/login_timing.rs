//! Failed logins through the `Login` RPC, with LDAP on (the real slapd): every failed path takes the same time,
//! and a stranger's wrong passwords do not lock a user out of their own address.

mod support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use cube_testkit::Backend;
use tonic::Code;

use support::directory::{Fixture, args as ldap_args};
use support::{ADMIN_PASSWORD, Harness, args, expect_code, password_of, start, trusting_loopback};

/// Starts auth with LDAP (search, then bind), believing the client addresses the tests send.
async fn with_ldap(url: &str, fx: &Fixture) -> Harness {
    let mut args = trusting_loopback(args(url));
    let flags = fx.search_flags();
    args.ldap = ldap_args(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    start(args).await
}

fn address(kind: u8, try_: u8) -> IpAddr {
    IpAddr::from([10, 77, kind, try_])
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let middle = samples.len() / 2;
    if samples.len().is_multiple_of(2) {
        (samples[middle - 1] + samples[middle]) / 2
    } else {
        samples[middle]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_take_the_same_time_on_every_path() {
    cube_testkit::on_fresh_database(Backend::Postgres, |url| async move {
        let fx = Fixture::new();
        let person = fx.add_person(&[]).await;
        let auth = with_ldap(&url, &fx).await;
        let admin = auth.admin_token().await;
        auth.create_user(&admin, "timing-local").await;
        let unknown = format!("nobody-{}", uuid::Uuid::new_v4().simple());
        let paths = [
            ("unknown user", unknown.as_str()),
            ("wrong local password", "timing-local"),
            ("wrong LDAP password", person.uid.as_str()),
        ];
        const TRIES: u8 = 20;
        const WARM_UP: u8 = 2;
        let mut samples = vec![Vec::new(); paths.len()];
        // Interleaved, each try from an address of its own so that the throttle never steps in.
        for attempt in 0..WARM_UP + TRIES {
            for (kind, (what, username)) in paths.iter().enumerate() {
                let kind = u8::try_from(kind).expect("three kinds");
                let started = Instant::now();
                let result = auth
                    .try_login_from(username, "not-the-password", address(kind, attempt))
                    .await;
                let took = started.elapsed();
                expect_code(result, Code::Unauthenticated, &format!("{what}, try {attempt}"));
                if attempt >= WARM_UP {
                    samples[usize::from(kind)].push(took);
                }
            }
        }
        let medians: Vec<Duration> = samples.into_iter().map(median).collect();
        for ((what, _), median) in paths.iter().zip(&medians) {
            println!("median failed login, {what}: {median:?}");
        }
        let fastest = medians.iter().min().copied().unwrap_or_default();
        let slowest = medians.iter().max().copied().unwrap_or_default();
        assert!(
            slowest.as_secs_f64() <= fastest.as_secs_f64() * 1.2,
            "medians differ by more than 20 %: {:?}",
            paths.iter().map(|(what, _)| what).zip(&medians).collect::<Vec<_>>()
        );
        assert!(
            fastest >= Duration::from_millis(150),
            "a failed login took only {fastest:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strangers_wrong_passwords_do_not_lock_the_user_out_of_their_own_address() {
    cube_testkit::on_fresh_database(Backend::Postgres, |url| async move {
        let fx = Fixture::new();
        let person = fx.add_person(&[]).await;
        let auth = with_ldap(&url, &fx).await;
        let (home, stranger) = (IpAddr::from([192, 0, 2, 1]), IpAddr::from([198, 51, 100, 66]));
        let admin = auth
            .try_login_from("admin", ADMIN_PASSWORD, home)
            .await
            .expect("the admin logs in from home")
            .access_token;
        auth.create_user(&admin, "victim").await;
        // The stranger tries the admin, a local user and an LDAP user, more than five times each.
        for (username, right) in [
            ("admin", ADMIN_PASSWORD.to_owned()),
            ("victim", password_of("victim")),
            (person.uid.as_str(), person.password.clone()),
        ] {
            for attempt in 0..5 {
                expect_code(
                    auth.try_login_from(username, "guessing-wrong", stranger).await,
                    Code::Unauthenticated,
                    &format!("the stranger's guess {attempt} for {username}"),
                );
            }
            // The stranger is locked out, even with the right password...
            let status = expect_code(
                auth.try_login_from(username, &right, stranger).await,
                Code::ResourceExhausted,
                &format!("the stranger's sixth try for {username}"),
            );
            let retry = tonic_types::StatusExt::get_error_details(&status)
                .retry_info()
                .and_then(|info| info.retry_delay)
                .expect("retry info");
            assert!(retry > Duration::ZERO && retry <= Duration::from_secs(30), "{retry:?}");
            // ...but the user logs in from home.
            let login = auth
                .try_login_from(username, &right, home)
                .await
                .unwrap_or_else(|status| panic!("{username} from home: {status:?}"));
            assert_eq!(login.user.expect("user").name, format!("users/{username}"));
        }
        // The user's own mistakes at home lock out only home, for that user.
        for attempt in 0..5 {
            expect_code(
                auth.try_login_from("victim", "typo", home).await,
                Code::Unauthenticated,
                &format!("the victim's typo {attempt}"),
            );
        }
        expect_code(
            auth.try_login_from("victim", &password_of("victim"), home).await,
            Code::ResourceExhausted,
            "the victim after five typos at home",
        );
        auth.try_login_from("admin", ADMIN_PASSWORD, home)
            .await
            .expect("the admin at the same address");
        auth.try_login_from("victim", &password_of("victim"), IpAddr::from([192, 0, 2, 2]))
            .await
            .expect("the victim from another address");
    })
    .await;
}
