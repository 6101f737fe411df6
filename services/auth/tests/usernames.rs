//! Usernames as real directories spell them: dots, underscores and capitals log in, locally and through LDAP, and
//! each maps to one lower-case user id; LDAP filter and DN metacharacters are refused; a local account shadows a
//! directory user of the same name.

mod support;

use cube_proto::cube::auth::v1::{
    CreateUserRequest, GetUserRequest, ListUsersRequest, LoginRequest, User, UserSource, WhoAmIRequest,
};
use tonic::Code;
use tonic_types::StatusExt as _;

use support::directory::{Fixture, args as ldap_args};
use support::{ADMIN_PASSWORD, Harness, args, authed, expect_code, start};

cube_testkit::on_every_backend!(
    local_usernames_with_dots_underscores_and_capitals_log_in_as_one_lower_case_user,
    directory_usernames_with_dots_underscores_and_capitals_log_in_as_one_lower_case_user,
    metacharacters_are_refused_before_anything_is_asked,
    a_local_account_shadows_the_directory_user_of_the_same_name,
);

/// Starts auth with LDAP configured by `flags`.
async fn with_ldap(url: &str, flags: &[String]) -> Harness {
    let mut args = args(url);
    args.ldap = ldap_args(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    start(args).await
}

async fn whoami(auth: &Harness, token: &str) -> String {
    auth.auth()
        .who_am_i(authed(WhoAmIRequest {}, token))
        .await
        .expect("whoami")
        .into_inner()
        .user
        .expect("user")
        .name
}

async fn create(auth: &Harness, admin: &str, user_id: &str, email: &str) -> Result<User, tonic::Status> {
    auth.users()
        .create_user(authed(
            CreateUserRequest {
                user: Some(User {
                    email: email.into(),
                    ..User::default()
                }),
                user_id: user_id.into(),
                password: format!("{}-long-password", user_id.to_lowercase()),
            },
            admin,
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn listed(auth: &Harness, admin: &str, filter: &str) -> Vec<String> {
    auth.users()
        .list_users(authed(
            ListUsersRequest {
                page_size: 1000,
                filter: filter.into(),
                ..ListUsersRequest::default()
            },
            admin,
        ))
        .await
        .unwrap_or_else(|status| panic!("listing users with {filter:?}: {status:?}"))
        .into_inner()
        .users
        .into_iter()
        .map(|user| user.name)
        .collect()
}

async fn local_usernames_with_dots_underscores_and_capitals_log_in_as_one_lower_case_user(url: &str) {
    let auth = start(args(url)).await;
    // The admin types their name with a capital.
    let admin = auth.login("Admin", ADMIN_PASSWORD).await;
    assert_eq!(admin.user.expect("user").name, "users/admin");
    let admin = admin.access_token;

    // (as created, as typed at login, the user id); the email is optional.
    let cases = [
        ("John.Smith", "JOHN.SMITH", "john.smith", "john@example.com"),
        ("john_smith", "John_Smith", "john_smith", ""),
        ("zhang.san", "Zhang.San", "zhang.san", "zhang@example.com"),
        ("O-Neil.2", "o-neil.2", "o-neil.2", ""),
        ("x", "X", "x", ""),
        ("1234", "1234", "1234", ""),
    ];
    for (created, typed, id, email) in cases {
        let user = create(&auth, &admin, created, email)
            .await
            .unwrap_or_else(|status| panic!("creating {created:?}: {status:?}"));
        assert_eq!(user.name, format!("users/{id}"), "created as {created:?}");
        assert_eq!(user.email, email);
        let password = format!("{id}-long-password");
        for name in [created, typed, id] {
            let login = auth
                .try_login(name, &password)
                .await
                .unwrap_or_else(|status| panic!("logging in as {name:?}: {status:?}"));
            assert_eq!(
                whoami(&auth, &login.access_token).await,
                format!("users/{id}"),
                "typed {name:?}"
            );
        }
        // Resource names take any case too.
        let got = auth
            .users()
            .get_user(authed(
                GetUserRequest {
                    name: format!("users/{typed}"),
                },
                &admin,
            ))
            .await
            .unwrap_or_else(|status| panic!("GetUser users/{typed}: {status:?}"))
            .into_inner();
        assert_eq!(got.name, format!("users/{id}"));
    }
    // The longest username, 63 characters; one more is too long.
    let longest = "Q".repeat(63);
    let user = create(&auth, &admin, &longest, "")
        .await
        .expect("creating the longest username");
    assert_eq!(user.name, format!("users/{}", longest.to_lowercase()));
    expect_code(
        create(&auth, &admin, &"q".repeat(64), "").await,
        Code::InvalidArgument,
        "a 64-character username",
    );
    // One user per lower-case name: another case is the same user, already there.
    expect_code(
        create(&auth, &admin, "JOHN.smith", "").await,
        Code::AlreadyExists,
        "JOHN.smith after John.Smith",
    );
    // `_` is not a wildcard in the prefix filter, and the prefix takes any case.
    assert_eq!(
        listed(&auth, &admin, "username_prefix = \"john_\"").await,
        ["users/john_smith"]
    );
    assert_eq!(
        listed(&auth, &admin, "username_prefix = \"JOHN\"").await,
        ["users/john.smith", "users/john_smith"]
    );
}

async fn directory_usernames_with_dots_underscores_and_capitals_log_in_as_one_lower_case_user(url: &str) {
    let fx = Fixture::new();
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let auth = with_ldap(url, &fx.search_flags()).await;
    let admin = auth.admin_token().await;
    let mut ids = Vec::new();
    // Some entries are named by cn, as in directories whose login attribute is not the one naming the entry.
    for (base, named_by_cn) in [
        ("John.Smith", true),
        ("j_smith", false),
        ("zhang.san", true),
        ("Mary-Ann.O_Neil", false),
    ] {
        let uid = format!("{base}.{suffix}");
        let person = fx.add_person_with_uid(&uid, named_by_cn).await;
        let id = uid.to_lowercase();
        for typed in [uid.clone(), uid.to_uppercase(), id.clone()] {
            let login = auth
                .try_login(&typed, &person.password)
                .await
                .unwrap_or_else(|status| panic!("logging in as {typed:?}: {status:?}"));
            let user = login.user.expect("user");
            assert_eq!(user.name, format!("users/{id}"), "typed {typed:?}");
            assert_eq!(user.source(), UserSource::Ldap);
            assert_eq!(user.email, person.mail);
        }
        ids.push(format!("users/{id}"));
    }
    ids.sort();
    let prefix_of = |id: &str| {
        id.trim_start_matches("users/")
            .split('.')
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let mut found = Vec::new();
    for id in &ids {
        found.extend(
            listed(&auth, &admin, &format!("username_prefix = \"{}\"", prefix_of(id)))
                .await
                .into_iter()
                .filter(|name| name.ends_with(suffix)),
        );
    }
    found.sort();
    found.dedup();
    assert_eq!(found, ids, "each directory user is one user, whatever the case typed");
}

async fn metacharacters_are_refused_before_anything_is_asked(url: &str) {
    let fx = Fixture::new();
    let auth = with_ldap(url, &fx.search_flags()).await;
    let alice = cube_testkit::require("CUBE_TEST_LDAP_ALICE_PASSWORD");
    // Each of these, were it sent to the directory unescaped, could match alice or change the DN.
    let names = [
        "*",
        "alic*",
        "alice)(uid=*",
        "*)(|(uid=alice)",
        "alice\\2a",
        "alice,ou=people",
        "uid=alice",
        "alice+cn=x",
        "alice<",
        "alice>",
        "#alice",
        "alice;",
        "\"alice\"",
        "alice\0",
        " alice",
        "alice ",
        "alice@cube.test",
        "ALICE*",
    ];
    for name in names {
        let status = expect_code(
            auth.auth()
                .login(LoginRequest {
                    username: name.into(),
                    password: alice.clone(),
                })
                .await,
            Code::InvalidArgument,
            &format!("login as {name:?}"),
        );
        let details = status.get_error_details();
        let fields: Vec<&str> = details
            .bad_request()
            .map(|bad| bad.field_violations.iter().map(|v| v.field.as_str()).collect())
            .unwrap_or_default();
        assert_eq!(fields, ["username"], "{name:?}: {status:?}");
    }
    // The real name, in any case, logs in.
    auth.login("Alice", &alice).await;
}

async fn a_local_account_shadows_the_directory_user_of_the_same_name(url: &str) {
    let fx = Fixture::new();
    let person = fx.add_person(&[]).await;
    let auth = with_ldap(url, &fx.search_flags()).await;
    let admin = auth.admin_token().await;
    // The local account is created in another case: it is the same name.
    let local = create(&auth, &admin, &person.uid.to_uppercase(), "")
        .await
        .expect("creating");
    assert_eq!(local.name, format!("users/{}", person.uid));
    expect_code(
        auth.try_login(&person.uid, &person.password).await,
        Code::Unauthenticated,
        "the directory password of a name a local account holds",
    );
    let login = auth.login(&person.uid, &format!("{}-long-password", person.uid)).await;
    let user = login.user.expect("user");
    assert_eq!(user.source(), UserSource::Local);
    assert!(user.groups.is_empty(), "{:?}", user.groups);
}
