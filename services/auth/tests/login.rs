//! Login through the auth service's `Login` RPC against the real slapd (direct bind, search-then-bind, group
//! roles re-read at every login, LDAP down) and the failed-login throttle, on every database backend.

mod support;

use std::time::Duration;

use cube_proto::cube::auth::v1::role_binding::Subject;
use cube_proto::cube::auth::v1::{CreateRoleBindingRequest, RoleBinding, UserCreated, UserSource, WhoAmIRequest};
use futures::StreamExt as _;
use prost::Message as _;
use tonic::Code;
use tonic_types::StatusExt as _;

use support::directory::{Fixture, args as ldap_args};
use support::{Harness, args, authed, expect_code, start};

cube_testkit::on_every_backend!(
    direct_bind_provisions_the_user_and_maps_groups_to_roles,
    search_then_bind_rereads_groups_at_every_login,
    wrong_passwords_and_unknown_users_look_the_same,
    an_unreachable_directory_is_unavailable,
    repeated_failures_are_throttled_with_retry_info,
);

/// Starts auth with LDAP configured by `flags`.
async fn with_ldap(url: &str, flags: &[String]) -> Harness {
    let mut args = args(url);
    args.ldap = ldap_args(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    start(args).await
}

async fn roles(auth: &Harness, token: &str) -> Vec<String> {
    auth.auth()
        .who_am_i(authed(WhoAmIRequest {}, token))
        .await
        .expect("whoami")
        .into_inner()
        .roles
}

async fn direct_bind_provisions_the_user_and_maps_groups_to_roles(url: &str) {
    let fx = Fixture::new();
    let person = fx.add_person(&[]).await;
    let admins = fx.add_group(&[&person.dn]).await;
    let flags = vec![
        "--ldap-server".into(),
        fx.url.clone(),
        "--ldap-username-format".into(),
        format!("uid=%s,{}", fx.people()),
        "--ldap-group-search".into(),
        fx.groups(),
        "--ldap-roles-mapping".into(),
        format!("admin={admins}"),
    ];
    let auth = with_ldap(url, &flags).await;
    let mut created = auth
        .bus
        .subscribe(cube_auth::USER_CREATED, "test", "t")
        .await
        .expect("subscribing");
    let login = auth.login(&person.uid, &person.password).await;
    let user = login.user.expect("user");
    assert_eq!(user.source(), UserSource::Ldap);
    assert_eq!(user.email, person.mail);
    assert_eq!(user.display_name, format!("{} {}", person.given_name, person.surname));
    assert_eq!(user.groups.len(), 1, "{:?}", user.groups);
    assert_eq!(roles(&auth, &login.access_token).await, ["roles/admin", "roles/user"]);
    let event = tokio::time::timeout(Duration::from_secs(5), created.next())
        .await
        .expect("user.created within 5 s")
        .expect("a delivery")
        .expect("readable");
    let event = UserCreated::decode(event.payload).expect("UserCreated");
    assert_eq!(event.user, format!("users/{}", person.uid));
    assert_eq!(event.source(), UserSource::Ldap);

    // Without the directory, the provisioned user has no password that works.
    let without = start(args(url)).await;
    expect_code(
        without.try_login(&person.uid, &person.password).await,
        Code::Unauthenticated,
        "an LDAP user against auth without LDAP",
    );
}

async fn search_then_bind_rereads_groups_at_every_login(url: &str) {
    let fx = Fixture::new();
    let person = fx.add_person(&[]).await;
    let operators = fx.add_group(&[&fx.admin_dn]).await;
    let admins = fx.add_group(&[&fx.admin_dn]).await;
    let mut flags = fx.search_flags();
    flags.extend(["--ldap-roles-mapping".into(), format!("admin={admins}")]);
    let auth = with_ldap(url, &flags).await;
    let admin = auth.admin_token().await;
    // A custom role bound to the operators group, through the API.
    auth.roles()
        .create_role(authed(
            cube_proto::cube::auth::v1::CreateRoleRequest {
                role_id: "operator".into(),
                role: Some(cube_proto::cube::auth::v1::Role::default()),
            },
            &admin,
        ))
        .await
        .expect("creating a role");
    auth.roles()
        .create_role_binding(authed(
            CreateRoleBindingRequest {
                role_binding: Some(RoleBinding {
                    role: "roles/operator".into(),
                    subject: Some(Subject::Group(operators.clone())),
                    ..RoleBinding::default()
                }),
            },
            &admin,
        ))
        .await
        .expect("binding the group");

    let first = auth.login(&person.uid, &person.password).await;
    assert_eq!(roles(&auth, &first.access_token).await, ["roles/user"]);
    fx.add_member(&operators, &person.dn).await;
    fx.add_member(&admins, &person.dn).await;
    let second = auth.login(&person.uid, &person.password).await;
    assert_eq!(
        roles(&auth, &second.access_token).await,
        ["roles/admin", "roles/operator", "roles/user"],
        "group changes take effect at the next login"
    );
    let user = second.user.expect("user");
    assert_eq!(user.groups.len(), 2, "{:?}", user.groups);
}

async fn wrong_passwords_and_unknown_users_look_the_same(url: &str) {
    let fx = Fixture::new();
    let person = fx.add_person(&[]).await;
    let auth = with_ldap(url, &fx.search_flags()).await;
    let wrong = expect_code(
        auth.try_login(&person.uid, "not-the-password").await,
        Code::Unauthenticated,
        "wrong password",
    );
    let unknown = expect_code(
        auth.try_login("nobody-by-this-name", "not-the-password").await,
        Code::Unauthenticated,
        "unknown user",
    );
    assert_eq!(wrong.message(), unknown.message());
    let reason = |status: &tonic::Status| status.get_error_details().error_info().map(|info| info.reason.clone());
    assert_eq!(reason(&wrong), reason(&unknown));
    // A local user's name is not looked up in the directory, and the seed's LDAP users log in.
    let alice = cube_testkit::require("CUBE_TEST_LDAP_ALICE_PASSWORD");
    auth.login("alice", &alice).await;
}

async fn an_unreachable_directory_is_unavailable(url: &str) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding");
    let port = listener.local_addr().expect("address").port();
    drop(listener);
    let server = format!("ldap://127.0.0.1:{port}");
    let flags = vec![
        "--ldap-server".into(),
        server.clone(),
        "--ldap-username-format".into(),
        "uid=%s,ou=people,dc=cube,dc=test".into(),
    ];
    let auth = with_ldap(url, &flags).await;
    let status = expect_code(
        auth.try_login("alice", "whatever-password").await,
        Code::Unavailable,
        "LDAP down",
    );
    assert!(status.message().contains("LDAP"), "{status:?}");
    let info = status.get_error_details().error_info().cloned().expect("error info");
    assert_eq!(info.reason, "UPSTREAM_UNAVAILABLE");
    assert!(
        info.metadata
            .get("service")
            .is_some_and(|service| service.contains(&server)),
        "{info:?}"
    );
    // Local accounts still log in while the directory is down.
    auth.admin_token().await;
}

async fn repeated_failures_are_throttled_with_retry_info(url: &str) {
    let auth = start(args(url)).await;
    let admin = auth.admin_token().await;
    auth.create_user(&admin, "mallory").await;
    for attempt in 0..5 {
        expect_code(
            auth.try_login("mallory", "guessing-wrong").await,
            Code::Unauthenticated,
            &format!("wrong password {attempt}"),
        );
    }
    let status = expect_code(
        auth.try_login("mallory", &support::password_of("mallory")).await,
        Code::ResourceExhausted,
        "the right password after five failures",
    );
    let details = status.get_error_details();
    let retry = details
        .retry_info()
        .and_then(|info| info.retry_delay)
        .expect("retry info");
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_secs(15 * 60),
        "{retry:?}"
    );
    assert_eq!(details.error_info().expect("info").reason, "TOO_MANY_ATTEMPTS");
    // Another user is not limited by mallory's failures.
    auth.admin_token().await;
}
