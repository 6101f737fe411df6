//! `RefreshToken` for LDAP users against the real slapd of the test environment: the directory is asked again at
//! each refresh, so a group taken away drops its role (and the access tokens that carried it), a deleted entry ends
//! the session, and a directory that is down refreshes nothing until it is back.

mod support;

use cube_proto::cube::auth::v1::{ApiToken, CreateApiTokenRequest, LoginResponse, RefreshTokenRequest, WhoAmIRequest};
use tonic::Code;

use support::directory::{Fixture, args as ldap_args};
use support::proxy::Proxy;
use support::{Harness, args, authed, expect_code, start};

cube_testkit::on_every_backend!(
    a_group_taken_away_drops_its_role_and_earlier_tokens_at_the_next_refresh,
    a_deleted_entry_ends_every_session_at_the_next_refresh,
    a_directory_that_is_down_refreshes_nothing_until_it_is_back,
    direct_bind_without_a_service_account_rereads_anonymously,
    without_ldap_an_ldap_users_session_does_not_refresh,
);

/// Starts auth with LDAP configured by `flags`.
async fn with_ldap(url: &str, flags: &[String]) -> Harness {
    let mut args = args(url);
    args.ldap = ldap_args(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    start(args).await
}

/// The roles an access token carries, or the status it is refused with.
async fn roles(auth: &Harness, token: &str) -> Result<Vec<String>, tonic::Status> {
    auth.auth()
        .who_am_i(authed(WhoAmIRequest {}, token))
        .await
        .map(|response| response.into_inner().roles)
}

async fn try_refresh(auth: &Harness, refresh_token: &str) -> Result<LoginResponse, tonic::Status> {
    auth.auth()
        .refresh_token(RefreshTokenRequest {
            refresh_token: refresh_token.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn refresh(auth: &Harness, refresh_token: &str) -> LoginResponse {
    try_refresh(auth, refresh_token)
        .await
        .unwrap_or_else(|status| panic!("refreshing: {status:?}"))
}

async fn a_group_taken_away_drops_its_role_and_earlier_tokens_at_the_next_refresh(url: &str) {
    let fx = Fixture::new();
    let person = fx.add_person(&[]).await;
    // groupOfNames needs a member: the directory's admin stays in every group the person leaves.
    let admins = fx.add_group(&[&person.dn, &fx.admin_dn]).await;
    let team = fx.add_group(&[&person.dn, &fx.admin_dn]).await;
    let operators = fx.add_group(&[&fx.admin_dn]).await;
    let mut flags = fx.search_flags();
    flags.extend([
        "--ldap-roles-mapping".into(),
        format!("admin={admins};operator={operators}"),
    ]);
    let auth = with_ldap(url, &flags).await;

    let login = auth.login(&person.uid, &person.password).await;
    assert_eq!(
        roles(&auth, &login.access_token).await.expect("whoami"),
        ["roles/admin", "roles/user"]
    );

    // Nothing changed: the refresh keeps the roles, and the earlier access token keeps working.
    let same = refresh(&auth, &login.refresh_token).await;
    assert_eq!(
        roles(&auth, &same.access_token).await.expect("whoami"),
        ["roles/admin", "roles/user"]
    );
    roles(&auth, &login.access_token)
        .await
        .expect("an unchanged user's earlier token still works");

    // A role given in the directory arrives at the next refresh, without ending anything.
    fx.add_member(&operators, &person.dn).await;
    let grown = refresh(&auth, &same.refresh_token).await;
    assert_eq!(
        roles(&auth, &grown.access_token).await.expect("whoami"),
        ["roles/admin", "roles/operator", "roles/user"]
    );
    roles(&auth, &same.access_token)
        .await
        .expect("a role given does not end earlier tokens");

    // The admin group is taken away: the next refresh drops the role, and every earlier access token, which
    // carries it, is refused.
    fx.remove_member(&admins, &person.dn).await;
    let shrunk = refresh(&auth, &grown.refresh_token).await;
    assert_eq!(
        roles(&auth, &shrunk.access_token)
            .await
            .expect("whoami with the new token"),
        ["roles/operator", "roles/user"]
    );
    let user = shrunk.user.expect("the user");
    assert_eq!(user.groups.len(), 2, "{:?}", user.groups);
    assert!(!user.groups.iter().any(|group| group.eq_ignore_ascii_case(&admins)));
    for (what, token) in [
        ("login", &login.access_token),
        ("the last refresh", &grown.access_token),
    ] {
        expect_code(
            roles(&auth, token).await,
            Code::Unauthenticated,
            &format!("the access token of {what}, carrying roles/admin"),
        );
    }

    // A group without a role counts too: its holders may reach projects through it.
    fx.remove_member(&team, &person.dn).await;
    let fewer = refresh(&auth, &shrunk.refresh_token).await;
    assert_eq!(fewer.user.expect("the user").groups, [operators]);
    expect_code(
        roles(&auth, &shrunk.access_token).await,
        Code::Unauthenticated,
        "the access token that carried the team group",
    );
    roles(&auth, &fewer.access_token).await.expect("the newest token works");
}

async fn a_deleted_entry_ends_every_session_at_the_next_refresh(url: &str) {
    let fx = Fixture::new();
    let person = fx.add_person(&[]).await;
    let auth = with_ldap(url, &fx.search_flags()).await;
    let laptop = auth.login(&person.uid, &person.password).await;
    let phone = auth.login(&person.uid, &person.password).await;
    refresh(&auth, &laptop.refresh_token).await;
    let api_token = auth
        .tokens()
        .create_api_token(authed(
            CreateApiTokenRequest {
                parent: "users/me".into(),
                api_token: Some(ApiToken {
                    display_name: "ci".into(),
                    ..ApiToken::default()
                }),
            },
            &laptop.access_token,
        ))
        .await
        .expect("an API token")
        .into_inner()
        .secret;

    fx.delete(&person.dn).await;
    let status = expect_code(
        try_refresh(&auth, &phone.refresh_token).await,
        Code::Unauthenticated,
        "refreshing after the entry was deleted",
    );
    assert!(status.message().contains("no longer in the directory"), "{status:?}");
    // Every session of the user ended: the phone's and the laptop's access tokens are refused, and so is the
    // laptop's refresh token, which was never used since.
    // The user is deactivated: every session ended, and the API token made before is refused too.
    for (what, token) in [
        ("phone", &phone.access_token),
        ("laptop", &laptop.access_token),
        ("API", &api_token),
    ] {
        expect_code(
            roles(&auth, token).await,
            Code::Unauthenticated,
            &format!("the {what}'s access token"),
        );
    }
    expect_code(
        try_refresh(&auth, &laptop.refresh_token).await,
        Code::Unauthenticated,
        "the laptop's refresh token",
    );
    expect_code(
        auth.try_login(&person.uid, &person.password).await,
        Code::Unauthenticated,
        "logging in again",
    );
}

async fn a_directory_that_is_down_refreshes_nothing_until_it_is_back(url: &str) {
    let fx = Fixture::new();
    let person = fx.add_person(&[]).await;
    let admins = fx.add_group(&[&person.dn, &fx.admin_dn]).await;
    let proxy = Proxy::start(&fx.url).await;
    let mut flags = vec![
        "--ldap-server".into(),
        proxy.url.clone(),
        "--ldap-search".into(),
        fx.people(),
        "--ldap-bind-user".into(),
        fx.admin_dn.clone(),
        "--ldap-bind-password".into(),
        fx.admin_password.clone(),
        "--ldap-group-search".into(),
        fx.groups(),
        "--ldap-timeout".into(),
        "2s".into(),
    ];
    flags.extend(["--ldap-roles-mapping".into(), format!("admin={admins}")]);
    let auth = with_ldap(url, &flags).await;
    let login = auth.login(&person.uid, &person.password).await;

    proxy.down();
    // Meanwhile the directory takes the admin group away, which nobody can learn while it is unreachable.
    fx.remove_member(&admins, &person.dn).await;
    let status = expect_code(
        try_refresh(&auth, &login.refresh_token).await,
        Code::Unavailable,
        "refreshing while the directory is down",
    );
    assert!(status.message().contains("LDAP"), "{status:?}");
    let details = tonic_types::StatusExt::get_error_details(&status);
    let info = details.error_info().expect("error info");
    assert_eq!(info.reason, "UPSTREAM_UNAVAILABLE");
    assert!(
        info.metadata
            .get("service")
            .is_some_and(|service| service.contains(&proxy.url)),
        "{info:?}"
    );
    // Nothing was issued and nothing ended: the access token in hand lives out its lifetime.
    roles(&auth, &login.access_token)
        .await
        .expect("the access token already issued");

    // Back again: the same refresh token trades, and the roles are the directory's of now.
    proxy.up();
    let back = refresh(&auth, &login.refresh_token).await;
    assert_eq!(roles(&auth, &back.access_token).await.expect("whoami"), ["roles/user"]);
    expect_code(
        roles(&auth, &login.access_token).await,
        Code::Unauthenticated,
        "the token that carried roles/admin",
    );
}

async fn direct_bind_without_a_service_account_rereads_anonymously(url: &str) {
    let fx = Fixture::new();
    let person = fx.add_person(&[]).await;
    let admins = fx.add_group(&[&person.dn, &fx.admin_dn]).await;
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
    let login = auth.login(&person.uid, &person.password).await;
    assert_eq!(
        roles(&auth, &login.access_token).await.expect("whoami"),
        ["roles/admin", "roles/user"]
    );
    fx.remove_member(&admins, &person.dn).await;
    let refreshed = refresh(&auth, &login.refresh_token).await;
    assert_eq!(
        roles(&auth, &refreshed.access_token).await.expect("whoami"),
        ["roles/user"]
    );
    fx.delete(&person.dn).await;
    expect_code(
        try_refresh(&auth, &refreshed.refresh_token).await,
        Code::Unauthenticated,
        "refreshing after the entry was deleted",
    );
    expect_code(
        roles(&auth, &refreshed.access_token).await,
        Code::Unauthenticated,
        "the access token of the ended session",
    );
}

async fn without_ldap_an_ldap_users_session_does_not_refresh(url: &str) {
    let fx = Fixture::new();
    let person = fx.add_person(&[]).await;
    let login = with_ldap(url, &fx.search_flags())
        .await
        .login(&person.uid, &person.password)
        .await;
    // The same database, served by auth without LDAP: nobody can tell whether the user is still in the directory.
    let without = start(args(url)).await;
    let status = expect_code(
        try_refresh(&without, &login.refresh_token).await,
        Code::Unauthenticated,
        "refreshing an LDAP user's session without LDAP",
    );
    assert!(status.message().contains("LDAP"), "{status:?}");
    // Local users still refresh there.
    let admin = without.login("admin", support::ADMIN_PASSWORD).await;
    refresh(&without, &admin.refresh_token).await;
}
