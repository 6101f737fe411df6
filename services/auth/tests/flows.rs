//! The auth service's behaviour end to end, over gRPC, on SQLite, PostgreSQL and MariaDB.

mod support;

use std::time::Duration;

use cube_kit::identity::{TOKEN_REVOKED, USER_DEACTIVATED};
use cube_proto::cube::auth::v1::role_binding::Subject;
use cube_proto::cube::auth::v1::{
    ApiToken, ChangePasswordRequest, CheckPermissionRequest, CreateApiTokenRequest, CreateRoleBindingRequest,
    CreateRoleRequest, CredentialKind, DeleteApiTokenRequest, DeleteRoleBindingRequest, DeleteUserRequest,
    GetJwksRequest, GetUserRequest, ListApiTokensRequest, ListAuditEventsRequest, ListPermissionsRequest,
    ListUsersRequest, LogoutRequest, Permission, RefreshTokenRequest, Role, RoleBinding, RotateSigningKeyRequest,
    TokenRevoked, UpdateUserRequest, User, UserCreated, UserDeactivated, WhoAmIRequest,
};
use futures::StreamExt as _;
use prost::Message as _;
use tonic::Code;

use support::{ADMIN_PASSWORD, args, authed, expect_code, password_of, start};

async fn next(subscription: &mut cube_bus::Subscription) -> cube_bus::Delivery {
    tokio::time::timeout(Duration::from_secs(5), subscription.next())
        .await
        .expect("an event within 5 s")
        .expect("a delivery")
        .expect("readable")
}

cube_testkit::on_every_backend!(
    login_refresh_rotates_and_reuse_revokes_the_family,
    logout_ends_the_session_everywhere_at_once,
    api_tokens_authenticate_list_without_secrets_and_revoke,
    users_paginate_filter_and_deactivation_stops_tokens,
    roles_bind_to_users_and_groups_and_answer_permission_checks,
    audit_log_records_logins_and_changes_newest_first,
    events_announce_new_deactivated_users_and_revocations,
    rotated_keys_keep_earlier_tokens_valid,
    password_change_needs_the_current_one_and_ends_other_sessions,
);

async fn login_refresh_rotates_and_reuse_revokes_the_family(url: &str) {
    let auth = start(args(url)).await;
    let admin = auth.admin_token().await;
    auth.create_user(&admin, "alice").await;
    let first = auth.login("alice", &password_of("alice")).await;
    assert_eq!(first.user.as_ref().map(|u| u.name.as_str()), Some("users/alice"));

    let who = auth
        .auth()
        .who_am_i(authed(WhoAmIRequest {}, &first.access_token))
        .await
        .expect("whoami")
        .into_inner();
    assert_eq!(who.user.expect("user").name, "users/alice");
    assert_eq!(who.roles, ["roles/user"]);
    let credential = who.credential.expect("credential");
    assert_eq!(credential.kind(), CredentialKind::AccessToken);

    // Each refresh token works once and hands out a new one.
    let second = auth
        .auth()
        .refresh_token(RefreshTokenRequest {
            refresh_token: first.refresh_token.clone(),
        })
        .await
        .expect("refreshing")
        .into_inner();
    assert_ne!(second.refresh_token, first.refresh_token);
    let third = auth
        .auth()
        .refresh_token(RefreshTokenRequest {
            refresh_token: second.refresh_token.clone(),
        })
        .await
        .expect("refreshing again")
        .into_inner();

    // Reusing a rotated token revokes the family: the newest refresh token and the access tokens die too.
    expect_code(
        auth.auth()
            .refresh_token(RefreshTokenRequest {
                refresh_token: first.refresh_token.clone(),
            })
            .await,
        Code::Unauthenticated,
        "reusing a rotated refresh token",
    );
    expect_code(
        auth.auth()
            .refresh_token(RefreshTokenRequest {
                refresh_token: third.refresh_token.clone(),
            })
            .await,
        Code::Unauthenticated,
        "the newest refresh token of a revoked family",
    );
    expect_code(
        auth.auth()
            .who_am_i(authed(WhoAmIRequest {}, &third.access_token))
            .await,
        Code::Unauthenticated,
        "an access token of a revoked family",
    );
    // Another login is a new family and works.
    let again = auth.login("alice", &password_of("alice")).await;
    auth.auth()
        .who_am_i(authed(WhoAmIRequest {}, &again.access_token))
        .await
        .expect("a fresh login works");
}

async fn logout_ends_the_session_everywhere_at_once(url: &str) {
    let auth = start(args(url)).await;
    let admin = auth.admin_token().await;
    auth.create_user(&admin, "bob").await;
    let session = auth.login("bob", &password_of("bob")).await;
    let other = auth.login("bob", &password_of("bob")).await;
    auth.auth()
        .logout(authed(LogoutRequest {}, &session.access_token))
        .await
        .expect("logout");
    expect_code(
        auth.auth()
            .who_am_i(authed(WhoAmIRequest {}, &session.access_token))
            .await,
        Code::Unauthenticated,
        "access token after logout",
    );
    expect_code(
        auth.auth()
            .refresh_token(RefreshTokenRequest {
                refresh_token: session.refresh_token,
            })
            .await,
        Code::Unauthenticated,
        "refresh token after logout",
    );
    auth.auth()
        .who_am_i(authed(WhoAmIRequest {}, &other.access_token))
        .await
        .expect("another session lives on");
}

async fn api_tokens_authenticate_list_without_secrets_and_revoke(url: &str) {
    let auth = start(args(url)).await;
    let admin = auth.admin_token().await;
    auth.create_user(&admin, "carol").await;
    let carol = auth.login("carol", &password_of("carol")).await.access_token;
    let mut created = Vec::new();
    for name in ["ci-nightly", "sdk", "notebook"] {
        let response = auth
            .tokens()
            .create_api_token(authed(
                CreateApiTokenRequest {
                    parent: "users/me".into(),
                    api_token: Some(ApiToken {
                        display_name: name.into(),
                        scopes: if name == "sdk" {
                            vec![Permission {
                                resource_type: "projects".into(),
                                verb: "list".into(),
                            }]
                        } else {
                            Vec::new()
                        },
                        ..ApiToken::default()
                    }),
                },
                &carol,
            ))
            .await
            .expect("creating an API token")
            .into_inner();
        assert!(response.secret.starts_with("cube_"), "{}", response.secret);
        let token = response.api_token.expect("token");
        assert!(response.secret.starts_with(&token.prefix));
        created.push((token, response.secret));
    }
    let (ci, ci_secret) = &created[0];
    let who = auth
        .auth()
        .who_am_i(authed(WhoAmIRequest {}, ci_secret))
        .await
        .expect("API token works")
        .into_inner();
    let credential = who.credential.expect("credential");
    assert_eq!(credential.kind(), CredentialKind::ApiToken);
    assert_eq!(credential.id, ci.name);

    // Scopes narrow what the token may do.
    let sdk_secret = &created[1].1;
    let check = |resource: &str, verb: &str| CheckPermissionRequest {
        user: String::new(),
        permission: Some(Permission {
            resource_type: resource.into(),
            verb: verb.into(),
        }),
    };
    let allowed = auth
        .roles()
        .check_permission(authed(check("projects", "list"), sdk_secret))
        .await
        .expect("check")
        .into_inner();
    assert!(allowed.allowed);
    let denied = auth
        .roles()
        .check_permission(authed(check("projects", "create"), sdk_secret))
        .await
        .expect("check")
        .into_inner();
    assert!(
        !denied.allowed,
        "a scoped token may not use permissions outside its scopes"
    );
    let full = auth
        .roles()
        .check_permission(authed(check("projects", "create"), &carol))
        .await
        .expect("check")
        .into_inner();
    assert!(full.allowed);

    // Listing pages newest first and never shows a secret.
    let mut names = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = auth
            .tokens()
            .list_api_tokens(authed(
                ListApiTokensRequest {
                    parent: "users/carol".into(),
                    page_size: 2,
                    page_token,
                },
                &carol,
            ))
            .await
            .expect("listing")
            .into_inner();
        for token in &page.api_tokens {
            assert!(
                !format!("{token:?}").contains(&created[0].1[20..]),
                "a secret leaked into a listing"
            );
            names.push(token.display_name.clone());
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    names.sort();
    assert_eq!(names, ["ci-nightly", "notebook", "sdk"]);

    // A scoped token reaches only its scopes, also among the self-service RPCs.
    expect_code(
        auth.users()
            .update_user(authed(
                UpdateUserRequest {
                    user: Some(User {
                        name: "users/me".into(),
                        email: "mallory@example.com".into(),
                        ..User::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["email".into()],
                    }),
                },
                sdk_secret,
            ))
            .await,
        Code::PermissionDenied,
        "a token scoped to projects.list changing the profile",
    );
    expect_code(
        auth.tokens()
            .delete_api_token(authed(DeleteApiTokenRequest { name: ci.name.clone() }, sdk_secret))
            .await,
        Code::PermissionDenied,
        "a token scoped to projects.list revoking another token",
    );
    auth.tokens()
        .delete_api_token(authed(DeleteApiTokenRequest { name: ci.name.clone() }, &carol))
        .await
        .expect("revoking");
    expect_code(
        auth.auth().who_am_i(authed(WhoAmIRequest {}, ci_secret)).await,
        Code::Unauthenticated,
        "a revoked API token",
    );
    // A secret with one character changed is refused.
    let mut forged = created[2].1.clone();
    let last = forged.pop().expect("a character");
    forged.push(if last == 'A' { 'B' } else { 'A' });
    expect_code(
        auth.auth().who_am_i(authed(WhoAmIRequest {}, &forged)).await,
        Code::Unauthenticated,
        "a forged secret",
    );
}

async fn users_paginate_filter_and_deactivation_stops_tokens(url: &str) {
    let auth = start(args(url)).await;
    let admin = auth.admin_token().await;
    for name in ["user-a", "user-b", "user-c", "user-d", "other"] {
        auth.create_user(&admin, name).await;
    }
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = auth
            .users()
            .list_users(authed(
                ListUsersRequest {
                    page_size: 2,
                    page_token,
                    filter: r#"username_prefix = "user-""#.into(),
                },
                &admin,
            ))
            .await
            .expect("listing users")
            .into_inner();
        assert!(page.users.len() <= 2);
        seen.extend(page.users.into_iter().map(|user| user.name));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen, ["users/user-a", "users/user-b", "users/user-c", "users/user-d"]);

    let session = auth.login("user-b", &password_of("user-b")).await;
    let token = auth
        .tokens()
        .create_api_token(authed(
            CreateApiTokenRequest {
                parent: "users/me".into(),
                api_token: Some(ApiToken {
                    display_name: "ci".into(),
                    ..ApiToken::default()
                }),
            },
            &session.access_token,
        ))
        .await
        .expect("token")
        .into_inner()
        .secret;
    let updated = auth
        .users()
        .update_user(authed(
            UpdateUserRequest {
                user: Some(User {
                    name: "users/user-b".into(),
                    active: false,
                    ..User::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["active".into()],
                }),
            },
            &admin,
        ))
        .await
        .expect("deactivating")
        .into_inner();
    assert!(!updated.active);
    for (what, credential) in [("access token", &session.access_token), ("API token", &token)] {
        expect_code(
            auth.auth().who_am_i(authed(WhoAmIRequest {}, credential)).await,
            Code::Unauthenticated,
            &format!("{what} of a deactivated user"),
        );
    }
    expect_code(
        auth.try_login("user-b", &password_of("user-b")).await,
        Code::Unauthenticated,
        "deactivated login",
    );
    let inactive = auth
        .users()
        .list_users(authed(
            ListUsersRequest {
                filter: "active = false".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .expect("filtering")
        .into_inner();
    assert_eq!(
        inactive.users.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(),
        ["users/user-b"]
    );

    // Deleting removes the user and their credentials.
    let other = auth.login("other", &password_of("other")).await.access_token;
    auth.users()
        .delete_user(authed(
            DeleteUserRequest {
                name: "users/other".into(),
            },
            &admin,
        ))
        .await
        .expect("deleting");
    expect_code(
        auth.auth().who_am_i(authed(WhoAmIRequest {}, &other)).await,
        Code::Unauthenticated,
        "deleted user's token",
    );
    expect_code(
        auth.users()
            .get_user(authed(
                GetUserRequest {
                    name: "users/other".into(),
                },
                &admin,
            ))
            .await,
        Code::NotFound,
        "a deleted user",
    );
}

async fn roles_bind_to_users_and_groups_and_answer_permission_checks(url: &str) {
    let auth = start(args(url)).await;
    let admin = auth.admin_token().await;
    auth.create_user(&admin, "dave").await;
    let role = auth
        .roles()
        .create_role(authed(
            CreateRoleRequest {
                role_id: "pipeline-operator".into(),
                role: Some(Role {
                    title: "Pipeline operator".into(),
                    permissions: vec![Permission {
                        resource_type: "pipelines".into(),
                        verb: "*".into(),
                    }],
                    ..Role::default()
                }),
            },
            &admin,
        ))
        .await
        .expect("creating a role")
        .into_inner();
    assert_eq!(role.name, "roles/pipeline-operator");
    let check = |user: &str, verb: &str| CheckPermissionRequest {
        user: user.into(),
        permission: Some(Permission {
            resource_type: "pipelines".into(),
            verb: verb.into(),
        }),
    };
    let before = auth
        .roles()
        .check_permission(authed(check("users/dave", "run"), &admin))
        .await
        .expect("check")
        .into_inner();
    assert!(!before.allowed);
    let binding = auth
        .roles()
        .create_role_binding(authed(
            CreateRoleBindingRequest {
                role_binding: Some(RoleBinding {
                    role: "roles/pipeline-operator".into(),
                    subject: Some(Subject::User("users/dave".into())),
                    ..RoleBinding::default()
                }),
            },
            &admin,
        ))
        .await
        .expect("binding")
        .into_inner();
    expect_code(
        auth.roles()
            .create_role_binding(authed(
                CreateRoleBindingRequest {
                    role_binding: Some(RoleBinding {
                        role: "roles/pipeline-operator".into(),
                        subject: Some(Subject::User("users/dave".into())),
                        ..RoleBinding::default()
                    }),
                },
                &admin,
            ))
            .await,
        Code::AlreadyExists,
        "binding twice",
    );
    let after = auth
        .roles()
        .check_permission(authed(check("users/dave", "run"), &admin))
        .await
        .expect("check")
        .into_inner();
    assert!(after.allowed);
    assert_eq!(after.granted_by, ["roles/pipeline-operator"]);
    // Dave's new login carries the role; his permissions list it.
    let dave = auth.login("dave", &password_of("dave")).await.access_token;
    let listed = auth
        .roles()
        .list_permissions(authed(ListPermissionsRequest::default(), &dave))
        .await
        .expect("list")
        .into_inner();
    assert!(
        listed.roles.contains(&"roles/pipeline-operator".to_owned()),
        "{listed:?}"
    );
    assert!(
        listed
            .permissions
            .iter()
            .any(|p| p.resource_type == "pipelines" && p.verb == "*")
    );
    // Dave may not look at admin's permissions.
    expect_code(
        auth.roles()
            .check_permission(authed(check("users/admin", "run"), &dave))
            .await,
        Code::NotFound,
        "checking someone else's permissions",
    );
    // Removing the binding makes Dave's live token stale: it stops working until he refreshes.
    auth.roles()
        .delete_role_binding(authed(
            DeleteRoleBindingRequest {
                name: binding.name.clone(),
            },
            &admin,
        ))
        .await
        .expect("unbinding");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fresh = auth.login("dave", &password_of("dave")).await.access_token;
    let listed = auth
        .roles()
        .list_permissions(authed(ListPermissionsRequest::default(), &fresh))
        .await
        .expect("list")
        .into_inner();
    assert!(
        !listed.roles.contains(&"roles/pipeline-operator".to_owned()),
        "{listed:?}"
    );
    expect_code(
        auth.auth().who_am_i(authed(WhoAmIRequest {}, &dave)).await,
        Code::Unauthenticated,
        "a token naming a removed role",
    );

    // Built-in roles cannot be deleted, and the last admin binding stays.
    let bindings = auth
        .roles()
        .list_role_bindings(authed(
            cube_proto::cube::auth::v1::ListRoleBindingsRequest {
                user: "users/admin".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .expect("listing bindings")
        .into_inner();
    let admin_binding = bindings
        .role_bindings
        .iter()
        .find(|b| b.role == "roles/admin")
        .expect("admin binding");
    expect_code(
        auth.roles()
            .delete_role_binding(authed(
                DeleteRoleBindingRequest {
                    name: admin_binding.name.clone(),
                },
                &admin,
            ))
            .await,
        Code::FailedPrecondition,
        "removing the last admin",
    );
    expect_code(
        auth.roles()
            .delete_role(authed(
                cube_proto::cube::auth::v1::DeleteRoleRequest {
                    name: "roles/admin".into(),
                },
                &admin,
            ))
            .await,
        Code::FailedPrecondition,
        "deleting a built-in role",
    );
}

async fn audit_log_records_logins_and_changes_newest_first(url: &str) {
    let auth = start(args(url)).await;
    let admin = auth.admin_token().await;
    auth.create_user(&admin, "erin").await;
    expect_code(
        auth.try_login("erin", "not-her-password").await,
        Code::Unauthenticated,
        "wrong password",
    );
    auth.login("erin", &password_of("erin")).await;
    let events = auth
        .audit()
        .list_audit_events(authed(
            ListAuditEventsRequest {
                filter: r#"actor = "users/erin""#.into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .expect("listing audit events")
        .into_inner()
        .audit_events;
    let summary: Vec<(String, bool)> = events.iter().map(|e| (e.action.clone(), e.success)).collect();
    assert_eq!(summary, [("login".to_owned(), true), ("login".to_owned(), false)]);
    assert!(events.iter().all(|event| !event.detail.contains("not-her-password")));
    let creations = auth
        .audit()
        .list_audit_events(authed(
            ListAuditEventsRequest {
                filter: r#"action = "user.create" AND target = "users/erin""#.into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .expect("filtering")
        .into_inner()
        .audit_events;
    assert_eq!(creations.len(), 1);
    assert_eq!(creations[0].actor, "users/admin");
    // Pages of one, newest first, cover everything once.
    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = auth
            .audit()
            .list_audit_events(authed(
                ListAuditEventsRequest {
                    page_size: 1,
                    page_token,
                    filter: String::new(),
                },
                &admin,
            ))
            .await
            .expect("paging")
            .into_inner();
        ids.extend(page.audit_events.iter().map(|e| e.name.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let mut sorted = ids.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len());
    assert!(ids.len() >= 5, "{ids:?}");
}

async fn events_announce_new_deactivated_users_and_revocations(url: &str) {
    let auth = start(args(url)).await;
    let mut created = auth
        .bus
        .subscribe(cube_auth::USER_CREATED, "test", "t")
        .await
        .expect("subscribing");
    let mut deactivated = auth
        .bus
        .subscribe(USER_DEACTIVATED, "test", "t")
        .await
        .expect("subscribing");
    let mut revoked = auth
        .bus
        .subscribe(TOKEN_REVOKED, "test", "t")
        .await
        .expect("subscribing");
    let admin = auth.admin_token().await;
    auth.create_user(&admin, "frank").await;
    let event = UserCreated::decode(next(&mut created).await.payload).expect("UserCreated");
    assert_eq!(event.user, "users/frank");
    let session = auth.login("frank", &password_of("frank")).await;
    auth.auth()
        .logout(authed(LogoutRequest {}, &session.access_token))
        .await
        .expect("logout");
    let event = TokenRevoked::decode(next(&mut revoked).await.payload).expect("TokenRevoked");
    assert_eq!(event.user, "users/frank");
    assert!(event.id.starts_with("sessions/"));
    auth.users()
        .delete_user(authed(
            DeleteUserRequest {
                name: "users/frank".into(),
            },
            &admin,
        ))
        .await
        .expect("delete");
    let event = UserDeactivated::decode(next(&mut deactivated).await.payload).expect("UserDeactivated");
    assert_eq!(event.user, "users/frank");
    assert!(event.deleted);
}

async fn rotated_keys_keep_earlier_tokens_valid(url: &str) {
    let auth = start(args(url)).await;
    let admin = auth.admin_token().await;
    let before = auth
        .auth()
        .get_jwks(GetJwksRequest {})
        .await
        .expect("jwks")
        .into_inner()
        .keys;
    assert_eq!(before.len(), 1);
    let new_key = auth
        .auth()
        .rotate_signing_key(authed(RotateSigningKeyRequest {}, &admin))
        .await
        .expect("rotating")
        .into_inner();
    let after = auth
        .auth()
        .get_jwks(GetJwksRequest {})
        .await
        .expect("jwks")
        .into_inner()
        .keys;
    assert_eq!(after.len(), 2, "the old key stays published while its tokens live");
    assert_eq!(after[0].kid, new_key.kid, "newest first");
    auth.auth()
        .who_am_i(authed(WhoAmIRequest {}, &admin))
        .await
        .expect("a token of the old key still works");
    let fresh = auth.admin_token().await;
    assert_eq!(cube_kit::identity::jws::key_id(&fresh).expect("kid"), new_key.kid);
    // Refused at most until the verifier's next key fetch (one 500 ms interval) or the rotation event.
    cube_testkit::eventually(
        "a token of the new key works",
        std::time::Duration::from_secs(5),
        || {
            let mut client = auth.auth();
            let fresh = fresh.clone();
            async move { client.who_am_i(authed(WhoAmIRequest {}, &fresh)).await.ok() }
        },
    )
    .await;
    assert!(ADMIN_PASSWORD.len() >= 12);
}

async fn password_change_needs_the_current_one_and_ends_other_sessions(url: &str) {
    let auth = start(args(url)).await;
    let admin = auth.admin_token().await;
    auth.create_user(&admin, "gina").await;
    let here = auth.login("gina", &password_of("gina")).await.access_token;
    let elsewhere = auth.login("gina", &password_of("gina")).await;
    let change = |current: &str| ChangePasswordRequest {
        name: "users/me".into(),
        current_password: current.into(),
        new_password: "a brand new passphrase".into(),
    };
    let status = expect_code(
        auth.users()
            .change_password(authed(change("wrong-password"), &here))
            .await,
        Code::InvalidArgument,
        "a wrong current password",
    );
    assert!(status.message().contains("current_password"), "{status:?}");
    auth.users()
        .change_password(authed(change(&password_of("gina")), &here))
        .await
        .expect("changing");
    auth.auth()
        .who_am_i(authed(WhoAmIRequest {}, &here))
        .await
        .expect("this session lives on");
    expect_code(
        auth.auth()
            .refresh_token(RefreshTokenRequest {
                refresh_token: elsewhere.refresh_token,
            })
            .await,
        Code::Unauthenticated,
        "the other session",
    );
    expect_code(
        auth.try_login("gina", &password_of("gina")).await,
        Code::Unauthenticated,
        "the old password",
    );
    auth.login("gina", "a brand new passphrase").await;
}
