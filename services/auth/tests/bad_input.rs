//! Bad input: malformed usernames, empty and 10 MB passwords, malformed and forged bearer tokens, bad fields,
//! page tokens and filters. Each is refused as INVALID_ARGUMENT naming the field (or UNAUTHENTICATED), without a
//! panic and without leaving a row behind.

mod support;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use cube_kit::identity::jws::{Claims, SigningKey, key_id};
use cube_proto::cube::auth::v1::{
    ApiToken, ChangePasswordRequest, CreateApiTokenRequest, CreateRoleRequest, CreateUserRequest, GetJwksRequest,
    GetUserRequest, ListApiTokensRequest, ListAuditEventsRequest, ListRoleBindingsRequest, ListRolesRequest,
    ListUsersRequest, LoginRequest, Permission, Role, User, WhoAmIRequest,
};
use tonic::Code;
use tonic::metadata::{Ascii, MetadataValue};
use tonic_types::StatusExt as _;

use support::{ADMIN_PASSWORD, Harness, args, authed, expect_code, password_of, start};

cube_testkit::on_every_backend!(
    bad_usernames_are_refused_naming_the_field,
    empty_and_huge_passwords_are_refused_naming_the_field,
    malformed_and_forged_bearer_tokens_are_unauthenticated,
    refused_creates_leave_no_rows,
    bad_page_tokens_filters_and_sizes_are_refused_naming_the_field,
);

/// Ten mebibytes: far over the 1024-byte password limit, under the 16 MiB auth decodes.
const TEN_MB: usize = 10 << 20;

/// Asserts that `result` is INVALID_ARGUMENT whose `BadRequest` names exactly `fields` (in any order), with an
/// `ErrorInfo` `FIELD_INVALID` in `auth.cube.dev` and a message of reasonable size (no echo of a huge input).
fn expect_fields<T: std::fmt::Debug>(result: Result<T, tonic::Status>, fields: &[&str], what: &str) {
    let status = expect_code(result, Code::InvalidArgument, what);
    let details = status.get_error_details();
    let mut named: Vec<&str> = details
        .bad_request()
        .unwrap_or_else(|| panic!("{what}: no BadRequest in {status:?}"))
        .field_violations
        .iter()
        .map(|violation| violation.field.as_str())
        .collect();
    named.sort_unstable();
    let mut wanted = fields.to_vec();
    wanted.sort_unstable();
    assert_eq!(named, wanted, "{what}: the fields named: {status:?}");
    let info = details
        .error_info()
        .unwrap_or_else(|| panic!("{what}: no ErrorInfo in {status:?}"));
    assert_eq!(info.reason, "FIELD_INVALID", "{what}");
    assert_eq!(info.domain, "auth.cube.dev", "{what}");
    assert!(
        status.message().len() < 2048,
        "{what}: a {}-byte message",
        status.message().len()
    );
}

/// A started service with an admin token and a plain user (`plain`) with their token.
async fn setup(url: &str) -> (Harness, String, String) {
    let auth = start(args(url)).await;
    let admin = auth.admin_token().await;
    auth.create_user(&admin, "plain").await;
    let plain = auth.login("plain", &password_of("plain")).await.access_token;
    (auth, admin, plain)
}

async fn usernames(auth: &Harness, admin: &str) -> Vec<String> {
    auth.users()
        .list_users(authed(
            ListUsersRequest {
                page_size: 1000,
                ..ListUsersRequest::default()
            },
            admin,
        ))
        .await
        .expect("listing users")
        .into_inner()
        .users
        .into_iter()
        .map(|user| user.name)
        .collect()
}

async fn audit_events(auth: &Harness, admin: &str) -> Vec<String> {
    auth.audit()
        .list_audit_events(authed(
            ListAuditEventsRequest {
                page_size: 1000,
                ..ListAuditEventsRequest::default()
            },
            admin,
        ))
        .await
        .expect("listing audit events")
        .into_inner()
        .audit_events
        .into_iter()
        .map(|event| format!("{} {} {}", event.action, event.target, event.success))
        .collect()
}

/// Names that are not usernames: empty, too long, a separator at either end, and every character outside
/// letters, digits, `.`, `_` and `-` (LDAP filter and DN metacharacters, quotes, paths, spaces, non-ASCII).
fn bad_usernames() -> Vec<String> {
    let mut names: Vec<String> = [
        "",
        "-lead",
        "trail-",
        ".dot",
        "dot.",
        "_under",
        "under_",
        "a b",
        " admin",
        "admin ",
        "admin\n",
        "ü",
        "adm\u{0456}n",
        "a\0b",
        "users/x",
        "../admin",
        "x' OR 1=1 --",
        "admin'--",
        "\"; DROP TABLE users; --",
        "*)(uid=*",
        "admin)(|(uid=*",
        "cn=admin,dc=cube",
        "%",
        "a%",
        "a*",
        "a(b",
        "a)b",
        "a\\b",
        "a,b",
        "a=b",
        "a+b",
        "a<b",
        "a>b",
        "a#b",
        "a;b",
        "a\"b",
        "a'b",
        "a@b",
        "a:b",
        "a!b",
        "a\tb",
        "zh\u{e4}ng",
        "\u{5f20}\u{4e09}",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    names.push("a".repeat(64));
    names.push("a".repeat(1 << 20));
    names
}

async fn bad_usernames_are_refused_naming_the_field(url: &str) {
    let (auth, admin, _plain) = setup(url).await;
    let users_before = usernames(&auth, &admin).await;
    let events_before = audit_events(&auth, &admin).await;
    let names = bad_usernames();
    // Twice over: more attempts than the per-client limit of failed logins, which they must not count toward.
    for round in 0..2 {
        for name in &names {
            let shown: String = name.chars().take(40).collect();
            // The admin's real password: the username alone is refused.
            expect_fields(
                auth.auth()
                    .login(LoginRequest {
                        username: name.clone(),
                        password: ADMIN_PASSWORD.into(),
                    })
                    .await,
                &["username"],
                &format!("Login as {shown:?} (round {round})"),
            );
        }
    }
    for name in names.iter().map(String::as_str).chain(["me"]) {
        let shown: String = name.chars().take(40).collect();
        expect_fields(
            auth.users()
                .create_user(authed(
                    CreateUserRequest {
                        user: Some(User {
                            email: "someone@example.com".into(),
                            ..User::default()
                        }),
                        user_id: name.to_owned(),
                        password: "a-good-long-password".into(),
                    },
                    &admin,
                ))
                .await,
            &["user_id"],
            &format!("CreateUser {shown:?}"),
        );
    }
    for name in ["x' OR 1=1 --", "*)(uid=*", "a\0b", "", "a,b", "-a"] {
        expect_fields(
            auth.users()
                .get_user(authed(
                    GetUserRequest {
                        name: format!("users/{name}"),
                    },
                    &admin,
                ))
                .await,
            &["name"],
            &format!("GetUser users/{name:?}"),
        );
    }
    // Nothing was created or recorded, the bad logins were not counted, and the service still answers.
    assert_eq!(usernames(&auth, &admin).await, users_before);
    assert_eq!(audit_events(&auth, &admin).await, events_before);
    auth.login("admin", ADMIN_PASSWORD).await;
}

async fn empty_and_huge_passwords_are_refused_naming_the_field(url: &str) {
    let (auth, admin, plain) = setup(url).await;
    let huge = "p".repeat(TEN_MB);
    let too_long = "p".repeat(1025);
    for (password, what) in [
        ("", "empty"),
        (too_long.as_str(), "1025 bytes"),
        (huge.as_str(), "10 MB"),
    ] {
        expect_fields(
            auth.auth()
                .login(LoginRequest {
                    username: "admin".into(),
                    password: password.into(),
                })
                .await,
            &["password"],
            &format!("Login with an {what} password"),
        );
    }
    for (password, what) in [
        ("", "empty"),
        ("elevenchars", "11-byte"),
        (too_long.as_str(), "1025-byte"),
        (huge.as_str(), "10 MB"),
    ] {
        expect_fields(
            auth.users()
                .create_user(authed(
                    CreateUserRequest {
                        user: Some(User {
                            email: "newbie@example.com".into(),
                            ..User::default()
                        }),
                        user_id: "newbie".into(),
                        password: password.into(),
                    },
                    &admin,
                ))
                .await,
            &["password"],
            &format!("CreateUser with an {what} password"),
        );
        // An admin setting another user's password, and a user changing their own.
        for (token, name, current) in [
            (&admin, "users/plain", String::new()),
            (&plain, "users/me", password_of("plain")),
        ] {
            expect_fields(
                auth.users()
                    .change_password(authed(
                        ChangePasswordRequest {
                            name: name.into(),
                            current_password: current,
                            new_password: password.into(),
                        },
                        token,
                    ))
                    .await,
                &["new_password"],
                &format!("ChangePassword of {name} to an {what} password"),
            );
        }
    }
    for (current, what) in [("", "empty"), (huge.as_str(), "10 MB")] {
        expect_fields(
            auth.users()
                .change_password(authed(
                    ChangePasswordRequest {
                        name: "users/me".into(),
                        current_password: current.into(),
                        new_password: "a-good-long-password".into(),
                    },
                    &plain,
                ))
                .await,
            &["current_password"],
            &format!("ChangePassword giving an {what} current password"),
        );
    }
    // No user was made, no password changed, no session ended.
    assert_eq!(usernames(&auth, &admin).await, ["users/admin", "users/plain"]);
    auth.login("plain", &password_of("plain")).await;
    auth.auth()
        .who_am_i(authed(WhoAmIRequest {}, &plain))
        .await
        .expect("the plain user's session lives on");
}

/// A JWT segment: base64url of `json`.
fn segment(json: &str) -> String {
    URL_SAFE_NO_PAD.encode(json)
}

/// Wraps `message` with `value` as its `authorization` metadata, verbatim.
fn with_authorization<T>(message: T, value: &MetadataValue<Ascii>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", value.clone());
    request
}

fn claims_of(token: &str) -> Claims {
    let payload = token.split('.').nth(1).expect("a JWT payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("claims")
}

async fn malformed_and_forged_bearer_tokens_are_unauthenticated(url: &str) {
    let (auth, admin, plain) = setup(url).await;
    let kid = key_id(&admin).expect("the real key id");
    let [admin_header, admin_payload, admin_signature]: [&str; 3] =
        admin.split('.').collect::<Vec<_>>().try_into().expect("three parts");
    let [plain_header, plain_payload, plain_signature]: [&str; 3] =
        plain.split('.').collect::<Vec<_>>().try_into().expect("three parts");
    let mut escalated = claims_of(&plain);
    escalated.roles.push("admin".into());
    let escalated = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&escalated).expect("json"));

    // alg none, under the real key id, with the admin's real claims.
    let none = segment(&format!(r#"{{"alg":"none","typ":"JWT","kid":"{kid}"}}"#));
    let none_upper = segment(&format!(r#"{{"alg":"NONE","kid":"{kid}"}}"#));
    // HS256 keyed with the public key (raw bytes, and its base64url JWK form): the algorithm-confusion attack.
    let jwks = auth
        .auth()
        .get_jwks(GetJwksRequest {})
        .await
        .expect("the JWKS")
        .into_inner();
    let jwk = jwks
        .keys
        .iter()
        .find(|key| key.kid == kid)
        .expect("the real key in the JWKS");
    let public = URL_SAFE_NO_PAD.decode(&jwk.x).expect("base64url key");
    let hs256 = segment(&format!(r#"{{"alg":"HS256","typ":"JWT","kid":"{kid}"}}"#));
    let hmac = |secret: &[u8]| {
        let signed = format!("{hs256}.{admin_payload}");
        let tag = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
            signed.as_bytes(),
        );
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    };
    // Another key's token under its own (unknown) key id, and under no key id.
    let other = SigningKey::generate().expect("a key");
    let unknown_kid = other.sign(&claims_of(&admin)).expect("signing");
    let no_kid = SigningKey::from_pkcs8(String::new(), other.pkcs8().to_vec())
        .expect("a key without id")
        .sign(&claims_of(&admin))
        .expect("signing");
    let mut flipped = admin_signature.to_owned();
    let last = flipped.pop().expect("a character");
    flipped.push(if last == 'A' { 'B' } else { 'A' });
    let mut random = [0_u8; 48];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random).expect("random bytes");
    let nine_kb = format!(
        "Bearer {admin_header}.{}.{admin_signature}",
        URL_SAFE_NO_PAD.encode("x".repeat(9 * 1024))
    );
    assert!(nine_kb.len() > 9 * 1024);

    let cases: Vec<(&str, String)> = vec![
        ("the scheme alone", "Bearer".into()),
        ("the scheme and a space", "Bearer ".into()),
        ("another scheme", "Basic abc".into()),
        (
            "Basic with the admin's real password",
            format!("Basic {}", STANDARD.encode(format!("admin:{ADMIN_PASSWORD}"))),
        ),
        (
            "the admin's password as a bearer token",
            format!("Bearer {ADMIN_PASSWORD}"),
        ),
        ("a token without a scheme", admin.clone()),
        ("two parts", "Bearer a.b".into()),
        ("three garbage parts", "Bearer a.b.c".into()),
        ("four parts", "Bearer a.b.c.d".into()),
        ("random bytes, base64", format!("Bearer {}", STANDARD.encode(random))),
        ("a 9 KB token", nine_kb),
        ("the API-token prefix alone", "Bearer cube_".into()),
        ("a malformed API token", "Bearer cube_zzzz_yyy".into()),
        (
            "a well-formed API token nobody was given",
            format!("Bearer cube_{}_{}", "0123456789abcdef", "A".repeat(43)),
        ),
        (
            "alg none without a signature",
            format!("Bearer {none}.{admin_payload}."),
        ),
        (
            "alg none with the admin's real signature",
            format!("Bearer {none}.{admin_payload}.{admin_signature}"),
        ),
        ("alg NONE", format!("Bearer {none_upper}.{admin_payload}.")),
        ("HS256 keyed with the public key", format!("Bearer {}", hmac(&public))),
        (
            "HS256 keyed with the JWK's x",
            format!("Bearer {}", hmac(jwk.x.as_bytes())),
        ),
        (
            "a real token with the admin's payload swapped in",
            format!("Bearer {plain_header}.{admin_payload}.{plain_signature}"),
        ),
        (
            "a real token with the admin role added to its claims",
            format!("Bearer {plain_header}.{escalated}.{plain_signature}"),
        ),
        (
            "a real token with another token's signature",
            format!("Bearer {admin_header}.{plain_payload}.{admin_signature}"),
        ),
        (
            "a real token with a changed signature",
            format!("Bearer {admin_header}.{admin_payload}.{flipped}"),
        ),
        (
            "a real token without its signature",
            format!("Bearer {admin_header}.{admin_payload}."),
        ),
        ("two real tokens", format!("Bearer {admin} {admin}")),
        ("another key's token under its key id", format!("Bearer {unknown_kid}")),
        ("another key's token without key id", format!("Bearer {no_kid}")),
    ];
    let mut values: Vec<(&str, MetadataValue<Ascii>)> = cases
        .iter()
        .map(|(what, value)| {
            let parsed = value
                .parse()
                .unwrap_or_else(|error| panic!("{what} as metadata: {error}"));
            (*what, parsed)
        })
        .collect();
    let not_text = MetadataValue::try_from(b"Bearer \xff\xfe.\xfd".as_slice()).expect("obs-text metadata");
    values.push(("bytes that are not text", not_text));
    for (what, value) in values {
        let who = auth.auth().who_am_i(with_authorization(WhoAmIRequest {}, &value)).await;
        let status = expect_code(who, Code::Unauthenticated, &format!("WhoAmI with {what}"));
        let info = status
            .get_error_details()
            .error_info()
            .cloned()
            .unwrap_or_else(|| panic!("{what}: no ErrorInfo in {status:?}"));
        assert_eq!(info.reason, "UNAUTHENTICATED", "{what}");
        assert_eq!(info.domain, "auth.cube.dev", "{what}");
        assert!(status.message().len() < 512, "{what}: {status:?}");
        let users = auth
            .users()
            .list_users(with_authorization(ListUsersRequest::default(), &value))
            .await;
        expect_code(users, Code::Unauthenticated, &format!("ListUsers with {what}"));
    }
    // The real tokens still work, with the scheme in any case: the refusals were about the tokens.
    for scheme in ["Bearer", "bearer"] {
        let mut request = tonic::Request::new(WhoAmIRequest {});
        let value = format!("{scheme} {admin}").parse().expect("metadata");
        request.metadata_mut().insert("authorization", value);
        let who = auth
            .auth()
            .who_am_i(request)
            .await
            .expect("the admin's token")
            .into_inner();
        assert_eq!(who.user.expect("a user").name, "users/admin");
    }
    auth.users()
        .list_users(authed(ListUsersRequest::default(), &admin))
        .await
        .expect("the admin lists users");
}

fn scope(resource_type: &str, verb: &str) -> Permission {
    Permission {
        resource_type: resource_type.into(),
        verb: verb.into(),
    }
}

async fn api_tokens_of(auth: &Harness, admin: &str, parent: &str) -> Vec<String> {
    auth.tokens()
        .list_api_tokens(authed(
            ListApiTokensRequest {
                parent: parent.into(),
                page_size: 1000,
                ..ListApiTokensRequest::default()
            },
            admin,
        ))
        .await
        .expect("listing API tokens")
        .into_inner()
        .api_tokens
        .into_iter()
        .map(|token| token.name)
        .collect()
}

async fn role_names(auth: &Harness, admin: &str) -> Vec<String> {
    auth.roles()
        .list_roles(authed(
            ListRolesRequest {
                page_size: 1000,
                ..ListRolesRequest::default()
            },
            admin,
        ))
        .await
        .expect("listing roles")
        .into_inner()
        .roles
        .into_iter()
        .map(|role| role.name)
        .collect()
}

async fn refused_creates_leave_no_rows(url: &str) {
    let (auth, admin, plain) = setup(url).await;
    let users_before = usernames(&auth, &admin).await;
    let events_before = audit_events(&auth, &admin).await;

    // Users: several bad fields at once are all reported in one BadRequest.
    expect_fields(
        auth.users()
            .create_user(authed(
                CreateUserRequest {
                    user: Some(User {
                        email: "not-an-email".into(),
                        display_name: "bell\u{7}".into(),
                        ..User::default()
                    }),
                    user_id: "Bad User".into(),
                    password: String::new(),
                },
                &admin,
            ))
            .await,
        &["user_id", "user.email", "user.display_name", "password"],
        "CreateUser with four bad fields",
    );
    for (email, display_name, field) in [
        ("@example.com", "", "user.email"),
        ("someone@", "", "user.email"),
        ("some one@example.com", "", "user.email"),
        ("someone@example.com", "line\nbreak", "user.display_name"),
    ] {
        expect_fields(
            auth.users()
                .create_user(authed(
                    CreateUserRequest {
                        user: Some(User {
                            email: email.into(),
                            display_name: display_name.into(),
                            ..User::default()
                        }),
                        user_id: "partial-user".into(),
                        password: "a-good-long-password".into(),
                    },
                    &admin,
                ))
                .await,
            &[field],
            &format!("CreateUser with email {email:?} and display name {display_name:?}"),
        );
    }
    assert_eq!(usernames(&auth, &admin).await, users_before);

    // API tokens, the user's own and, as admin, someone else's.
    let past = prost_types::Timestamp {
        seconds: 1_000_000_000,
        nanos: 0,
    };
    let token = |display_name: &str, scopes: Vec<Permission>, expire_time: Option<prost_types::Timestamp>| {
        Some(ApiToken {
            display_name: display_name.into(),
            scopes,
            expire_time,
            ..ApiToken::default()
        })
    };
    let bad_tokens = [
        (
            token("ci", vec![scope("bad type", "")], None),
            vec!["api_token.scopes[0]"],
        ),
        (
            token("ci", vec![scope("projects", "list"), scope("Projects", "list")], None),
            vec!["api_token.scopes[1]"],
        ),
        (token("ci", vec![scope("", "get")], None), vec!["api_token.scopes[0]"]),
        (token("ci", Vec::new(), Some(past)), vec!["api_token.expire_time"]),
        (
            token(
                "ci",
                Vec::new(),
                Some(prost_types::Timestamp {
                    seconds: i64::MAX,
                    nanos: 999_999_999,
                }),
            ),
            vec!["api_token.expire_time"],
        ),
        (token("", Vec::new(), None), vec!["api_token.display_name"]),
        (token("   ", Vec::new(), None), vec!["api_token.display_name"]),
        (
            token(&"x".repeat(101), Vec::new(), None),
            vec!["api_token.display_name"],
        ),
        (token("a\nb", Vec::new(), None), vec!["api_token.display_name"]),
        (
            token("", vec![scope("bad type", "")], Some(past)),
            vec!["api_token.display_name", "api_token.expire_time", "api_token.scopes[0]"],
        ),
        (None, vec!["api_token"]),
    ];
    for (caller, parent) in [(&plain, "users/me"), (&admin, "users/plain")] {
        for (api_token, fields) in &bad_tokens {
            expect_fields(
                auth.tokens()
                    .create_api_token(authed(
                        CreateApiTokenRequest {
                            parent: parent.into(),
                            api_token: api_token.clone(),
                        },
                        caller,
                    ))
                    .await,
                fields,
                &format!("CreateApiToken for {parent} of {api_token:?}"),
            );
        }
    }
    for parent in ["users/Pl ain", "plain", "users/", "users/x' OR 1=1 --"] {
        expect_fields(
            auth.tokens()
                .create_api_token(authed(
                    CreateApiTokenRequest {
                        parent: parent.into(),
                        api_token: token("ci", Vec::new(), None),
                    },
                    &admin,
                ))
                .await,
            &["parent"],
            &format!("CreateApiToken for {parent:?}"),
        );
    }
    assert!(api_tokens_of(&auth, &admin, "users/plain").await.is_empty());
    assert!(api_tokens_of(&auth, &admin, "users/admin").await.is_empty());

    // Roles.
    let roles_before = role_names(&auth, &admin).await;
    let role = |title: &str, description: &str, permissions: Vec<Permission>| {
        Some(Role {
            title: title.into(),
            description: description.into(),
            permissions,
            ..Role::default()
        })
    };
    let bad_roles = [
        ("Bad Role", role("Bad", "", Vec::new()), vec!["role_id"]),
        ("", role("Empty", "", Vec::new()), vec!["role_id"]),
        ("roles/x", role("Slash", "", Vec::new()), vec!["role_id"]),
        (
            "good-role",
            role("Bad permission", "", vec![scope("bad type", "")]),
            vec!["role.permissions[0]"],
        ),
        (
            "good-role",
            role(
                "Bad verb",
                "",
                vec![scope("projects", "get"), scope("projects", "get it")],
            ),
            vec!["role.permissions[1]"],
        ),
        ("good-role", role(&"t".repeat(101), "", Vec::new()), vec!["role.title"]),
        (
            "good-role",
            role("Long", &"d".repeat(2001), Vec::new()),
            vec!["role.description"],
        ),
        (
            "Bad Role",
            role(&"t".repeat(101), &"d".repeat(2001), vec![scope("", "")]),
            vec!["role_id", "role.title", "role.description", "role.permissions[0]"],
        ),
    ];
    for (role_id, role, fields) in bad_roles {
        expect_fields(
            auth.roles()
                .create_role(authed(
                    CreateRoleRequest {
                        role_id: role_id.into(),
                        role,
                    },
                    &admin,
                ))
                .await,
            &fields,
            &format!("CreateRole {role_id:?}"),
        );
    }
    assert_eq!(role_names(&auth, &admin).await, roles_before);
    assert_eq!(roles_before, ["roles/admin", "roles/user"]);

    // Nothing refused left a trace in the audit log either.
    assert_eq!(audit_events(&auth, &admin).await, events_before);
}

async fn bad_page_tokens_filters_and_sizes_are_refused_naming_the_field(url: &str) {
    let (auth, admin, _plain) = setup(url).await;
    let list_users = |page_size: i32, page_token: &str, filter: &str| {
        let request = authed(
            ListUsersRequest {
                page_size,
                page_token: page_token.into(),
                filter: filter.into(),
            },
            &admin,
        );
        let mut client = auth.users();
        async move { client.list_users(request).await }
    };
    let list_events = |page_size: i32, page_token: &str, filter: &str| {
        let request = authed(
            ListAuditEventsRequest {
                page_size,
                page_token: page_token.into(),
                filter: filter.into(),
            },
            &admin,
        );
        let mut client = auth.audit();
        async move { client.list_audit_events(request).await }
    };
    // Real page tokens of each list, to hand to the other.
    let users_token = list_users(1, "", "")
        .await
        .expect("a page of users")
        .into_inner()
        .next_page_token;
    let events_token = list_events(1, "", "")
        .await
        .expect("a page of events")
        .into_inner()
        .next_page_token;
    assert!(!users_token.is_empty() && !events_token.is_empty());

    for page_token in ["garbage", "!!!", "e30", events_token.as_str()] {
        expect_fields(
            list_users(0, page_token, "").await,
            &["page_token"],
            &format!("ListUsers page_token {page_token:?}"),
        );
    }
    for page_token in ["garbage", "!!!", "e30", users_token.as_str()] {
        expect_fields(
            list_events(0, page_token, "").await,
            &["page_token"],
            &format!("ListAuditEvents page_token {page_token:?}"),
        );
    }
    for filter in [
        "nope = 1",
        "active = maybe",
        "source = nis",
        "active",
        "active = true OR active = false",
        "email = \"unterminated",
        "password_hash = x",
    ] {
        expect_fields(
            list_users(0, "", filter).await,
            &["filter"],
            &format!("ListUsers filter {filter:?}"),
        );
    }
    for filter in ["nope = 1", "success = maybe", "actor", "detail = x"] {
        expect_fields(
            list_events(0, "", filter).await,
            &["filter"],
            &format!("ListAuditEvents filter {filter:?}"),
        );
    }
    for page_size in [-1, i32::MIN] {
        expect_fields(
            list_users(page_size, "", "").await,
            &["page_size"],
            &format!("ListUsers page_size {page_size}"),
        );
        expect_fields(
            list_events(page_size, "", "").await,
            &["page_size"],
            &format!("ListAuditEvents page_size {page_size}"),
        );
    }
    // The other lists refuse garbage page tokens too.
    expect_fields(
        auth.tokens()
            .list_api_tokens(authed(
                ListApiTokensRequest {
                    parent: "users/me".into(),
                    page_token: "garbage".into(),
                    ..ListApiTokensRequest::default()
                },
                &admin,
            ))
            .await,
        &["page_token"],
        "ListApiTokens page_token garbage",
    );
    expect_fields(
        auth.roles()
            .list_roles(authed(
                ListRolesRequest {
                    page_token: "garbage".into(),
                    ..ListRolesRequest::default()
                },
                &admin,
            ))
            .await,
        &["page_token"],
        "ListRoles page_token garbage",
    );
    expect_fields(
        auth.roles()
            .list_role_bindings(authed(
                ListRoleBindingsRequest {
                    page_token: "garbage".into(),
                    ..ListRoleBindingsRequest::default()
                },
                &admin,
            ))
            .await,
        &["page_token"],
        "ListRoleBindings page_token garbage",
    );

    // Filter values are data, never SQL: quotes match nothing, and LIKE wildcards are no wildcards.
    for filter in ["email = \"x' OR '1'='1\"", "email = \"admin@cube.local' --\""] {
        let users = list_users(0, "", filter)
            .await
            .unwrap_or_else(|status| panic!("ListUsers filter {filter:?}: {status:?}"))
            .into_inner()
            .users;
        assert!(users.is_empty(), "ListUsers filter {filter:?}: {users:?}");
    }
    // A prefix no username can start with matches nothing, or is refused; in any case it is no pattern.
    for filter in [
        "username_prefix = \"' OR 1=1 --\"",
        "username_prefix = \"AD M\"",
        "username_prefix = \"%\"",
        "username_prefix = \"_\"",
        "username_prefix = \"pl_in\"",
    ] {
        match list_users(0, "", filter).await {
            Ok(response) => {
                let users = response.into_inner().users;
                assert!(
                    users.is_empty(),
                    "ListUsers filter {filter:?} matched users whose names do not start with it: {users:?}"
                );
            }
            Err(status) => {
                expect_fields(
                    Err::<(), _>(status),
                    &["filter"],
                    &format!("ListUsers filter {filter:?}"),
                );
            }
        }
    }
    let admins = list_users(0, "", "username_prefix = \"adm\"")
        .await
        .expect("a prefix filter")
        .into_inner()
        .users;
    assert_eq!(admins.len(), 1, "{admins:?}");
}
