//! The authorization matrix: every auth RPC called as anonymous, with an expired, a revoked and a forged
//! (wrong-signature) token, as a plain user and as admin, each answer checked against the table below; requests
//! that take a user target another user (the victim), and no answer the plain user gets names the victim.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cube_kit::identity::jws::{Claims, SigningKey, key_id};
use cube_proto::cube::auth::v1::role_binding::Subject;
use cube_proto::cube::auth::v1::{
    ApiToken, ChangePasswordRequest, CheckPermissionRequest, CreateApiTokenRequest, CreateRoleBindingRequest,
    CreateRoleRequest, CreateUserRequest, DeleteApiTokenRequest, DeleteRoleBindingRequest, DeleteRoleRequest,
    DeleteUserRequest, GetJwksRequest, GetRevocationListRequest, GetRoleRequest, GetUserRequest, ListApiTokensRequest,
    ListAuditEventsRequest, ListPermissionsRequest, ListRoleBindingsRequest, ListRolesRequest, ListUsersRequest,
    LoginRequest, LogoutRequest, Permission, RefreshTokenRequest, Role, RoleBinding, RotateSigningKeyRequest,
    UpdateRoleRequest, UpdateUserRequest, User, WhoAmIRequest,
};
use cube_proto::cube::auth::v1::{
    CreateServiceAccountRequest, DeleteServiceAccountRequest, GetServiceAccountRequest, ListServiceAccountsRequest,
};
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

use support::{ADMIN_PASSWORD, Harness, args, authed, password_of, start};

cube_testkit::on_every_backend!(every_rpc_answers_every_identity_as_the_table_says);

/// Who calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    /// No `authorization` metadata.
    Anonymous,
    /// An admin access token signed by the real key, past its `exp` (and cached by the verifier before that).
    Expired,
    /// An admin access token whose session ended with `Logout`.
    Revoked,
    /// A token with the real key id and an admin's real claims, signed by another key.
    WrongSignature,
    /// A user who holds the `user` role and a custom one, not `admin`.
    Plain,
    /// The admin.
    Admin,
}

const EVERYONE: [Who; 6] = [
    Who::Anonymous,
    Who::Expired,
    Who::Revoked,
    Who::WrongSignature,
    Who::Plain,
    Who::Admin,
];

impl Who {
    fn describe(self) -> &'static str {
        match self {
            Who::Anonymous => "anonymous",
            Who::Expired => "expired token",
            Who::Revoked => "revoked token",
            Who::WrongSignature => "wrong-signature token",
            Who::Plain => "plain user",
            Who::Admin => "admin",
        }
    }

    /// A word for names of what the call creates, so that each identity's attempt is told apart.
    fn slug(self) -> &'static str {
        match self {
            Who::Anonymous => "anonymous",
            Who::Expired => "expired",
            Who::Revoked => "revoked",
            Who::WrongSignature => "forged",
            Who::Plain => "plain",
            Who::Admin => "admin",
        }
    }
}

/// One request of the table; [`call`] builds and sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    LoginWrongPassword,
    RefreshBogusToken,
    Logout,
    WhoAmI,
    GetJwks,
    GetRevocationList,
    RotateSigningKey,
    CreateUser,
    GetTargetUser,
    GetOwnUser,
    GetMissingUser,
    ListUsers,
    UpdateTargetUser,
    UpdateOwnActive,
    DeleteTargetUser,
    ChangeTargetPassword,
    CreateTargetApiToken,
    ListTargetApiTokens,
    ListOwnApiTokens,
    DeleteTargetApiToken,
    DeleteTargetApiTokenAsOwn,
    CreateRole,
    GetRole,
    GetMissingRole,
    ListRoles,
    UpdateRole,
    DeleteRole,
    BindRoleToTarget,
    ListTargetRoleBindings,
    ListOwnRoleBindings,
    ListAllRoleBindings,
    DeleteTargetRoleBinding,
    CheckTargetPermission,
    CheckOwnPermission,
    ListTargetPermissions,
    ListOwnPermissions,
    ListAuditEvents,
    CreateServiceAccount,
    GetMissingServiceAccount,
    ListServiceAccounts,
    DeleteServiceAccount,
}

/// A row: the RPC (`Service.Method`, as in the protos), the request, and the code each of [`EVERYONE`] gets
/// (anonymous, expired, revoked, wrong signature, plain user, admin).
struct Row {
    rpc: &'static str,
    request: &'static str,
    case: Case,
    expect: [Code; 6],
}

const OK: Code = Code::Ok;
const UNAUTHENTICATED: Code = Code::Unauthenticated;
const DENIED: Code = Code::PermissionDenied;
const NOT_FOUND: Code = Code::NotFound;

/// Needs a valid token: the four bad credentials are UNAUTHENTICATED, then the plain user's and admin's codes.
const fn gated(plain: Code, admin: Code) -> [Code; 6] {
    [
        UNAUTHENTICATED,
        UNAUTHENTICATED,
        UNAUTHENTICATED,
        UNAUTHENTICATED,
        plain,
        admin,
    ]
}

const fn row(rpc: &'static str, request: &'static str, case: Case, expect: [Code; 6]) -> Row {
    Row {
        rpc,
        request,
        case,
        expect,
    }
}

/// Needs no token: everyone gets the same answer.
const fn open(code: Code) -> [Code; 6] {
    [code; 6]
}

/// The matrix. `<target>` is the victim: another user, who holds an API token and a role binding. Calls that
/// would change what other rows rely on target throwaway resources when the admin makes them ("admin: …"); see
/// [`call`] for each request in full.
#[rustfmt::skip]
const TABLE: &[Row] = &[
    // Needs no token.
    row("AuthService.Login",              "unknown user, wrong password", Case::LoginWrongPassword,        open(UNAUTHENTICATED)),
    row("AuthService.RefreshToken",       "never-issued token",           Case::RefreshBogusToken,         open(UNAUTHENTICATED)),
    row("AuthService.GetJwks",            "{}",                           Case::GetJwks,                   open(OK)),
    row("AuthService.GetRevocationList",  "{}",                           Case::GetRevocationList,         open(OK)),
    // Self-service.
    row("AuthService.Logout",             "own session (fresh login)",    Case::Logout,                    gated(OK, OK)),
    row("AuthService.WhoAmI",             "{}",                           Case::WhoAmI,                    gated(OK, OK)),
    row("UserService.GetUser",            "users/me",                     Case::GetOwnUser,                gated(OK, OK)),
    row("UserService.GetUser",            "users/no-such-user",           Case::GetMissingUser,            gated(NOT_FOUND, NOT_FOUND)),
    row("ApiTokenService.ListApiTokens",  "users/me",                     Case::ListOwnApiTokens,          gated(OK, OK)),
    row("RoleService.GetRole",            "roles/bound-role",             Case::GetRole,                   gated(OK, OK)),
    row("RoleService.GetRole",            "roles/no-such-role",           Case::GetMissingRole,            gated(NOT_FOUND, NOT_FOUND)),
    row("RoleService.ListRoles",          "{}",                           Case::ListRoles,                 gated(OK, OK)),
    row("RoleService.ListRoleBindings",   "users/me",                     Case::ListOwnRoleBindings,       gated(OK, OK)),
    row("RoleService.CheckPermission",    "users/me",                     Case::CheckOwnPermission,        gated(OK, OK)),
    row("RoleService.ListPermissions",    "users/me",                     Case::ListOwnPermissions,        gated(OK, OK)),
    // Another user's data: NOT_FOUND to a plain user.
    row("UserService.GetUser",            "users/<target>",               Case::GetTargetUser,             gated(NOT_FOUND, OK)),
    row("UserService.UpdateUser",         "users/<target>",               Case::UpdateTargetUser,          gated(NOT_FOUND, OK)),
    row("UserService.ChangePassword",     "users/<target>",               Case::ChangeTargetPassword,      gated(NOT_FOUND, OK)),
    row("ApiTokenService.CreateApiToken", "users/<target>",               Case::CreateTargetApiToken,      gated(NOT_FOUND, OK)),
    row("ApiTokenService.ListApiTokens",  "users/<target>",               Case::ListTargetApiTokens,       gated(NOT_FOUND, OK)),
    row("ApiTokenService.DeleteApiToken", "<target>'s token (admin: …)",  Case::DeleteTargetApiToken,      gated(NOT_FOUND, OK)),
    row("ApiTokenService.DeleteApiToken", "users/me/…/<target>'s",        Case::DeleteTargetApiTokenAsOwn, gated(NOT_FOUND, NOT_FOUND)),
    row("RoleService.ListRoleBindings",   "users/<target>",               Case::ListTargetRoleBindings,    gated(NOT_FOUND, OK)),
    row("RoleService.CheckPermission",    "users/<target>",               Case::CheckTargetPermission,     gated(NOT_FOUND, OK)),
    row("RoleService.ListPermissions",    "users/<target>",               Case::ListTargetPermissions,     gated(NOT_FOUND, OK)),
    // Admins only: PERMISSION_DENIED to a plain user.
    row("AuthService.RotateSigningKey",   "{}",                           Case::RotateSigningKey,          gated(DENIED, OK)),
    row("UserService.CreateUser",         "made-by-<caller>",             Case::CreateUser,                gated(DENIED, OK)),
    row("UserService.ListUsers",          "{}",                           Case::ListUsers,                 gated(DENIED, OK)),
    row("UserService.UpdateUser",         "users/me active",              Case::UpdateOwnActive,           gated(DENIED, OK)),
    row("UserService.DeleteUser",         "users/<target> (admin: …)",    Case::DeleteTargetUser,          gated(DENIED, OK)),
    row("RoleService.CreateRole",         "role-by-<caller>",             Case::CreateRole,                gated(DENIED, OK)),
    row("RoleService.UpdateRole",         "fixture-role",                 Case::UpdateRole,                gated(DENIED, OK)),
    row("RoleService.DeleteRole",         "fixture-role (admin: …)",      Case::DeleteRole,                gated(DENIED, OK)),
    row("RoleService.CreateRoleBinding",  "fixture-role to <target>",     Case::BindRoleToTarget,          gated(DENIED, OK)),
    row("RoleService.ListRoleBindings",   "every binding",                Case::ListAllRoleBindings,       gated(DENIED, OK)),
    row("RoleService.DeleteRoleBinding",  "<target>'s (admin: …)",        Case::DeleteTargetRoleBinding,   gated(DENIED, OK)),
    row("AuditService.ListAuditEvents",   "{}",                           Case::ListAuditEvents,           gated(DENIED, OK)),
    row("ServiceAccountService.CreateServiceAccount", "sa-by-<caller>",     Case::CreateServiceAccount,      gated(DENIED, OK)),
    row("ServiceAccountService.GetServiceAccount",    "serviceAccounts/no-such", Case::GetMissingServiceAccount, gated(DENIED, NOT_FOUND)),
    row("ServiceAccountService.ListServiceAccounts",  "{}",                 Case::ListServiceAccounts,       gated(DENIED, OK)),
    row("ServiceAccountService.DeleteServiceAccount", "doomed-sa (admin: made first)", Case::DeleteServiceAccount, gated(DENIED, OK)),
];

/// The other user whose data the requests aim at.
const VICTIM: &str = "victim";
/// A user that does not exist, to check that the victim's existence does not show in the answers.
const NOBODY: &str = "nobody";
/// The role the victim (and the plain user) hold.
const BOUND_ROLE: &str = "bound-role";
/// The role the admin-only role RPCs aim at.
const FIXTURE_ROLE: &str = "fixture-role";

/// The running service, its users, and a token for each identity.
struct Fixture {
    auth: Harness,
    admin: String,
    plain: String,
    expired: String,
    revoked: String,
    forged: String,
    /// For the Logout row: an expired and a forged token of sessions no other row uses, so that a Logout wrongly
    /// accepted cannot end the session behind the tokens the other rows check (and hide their failures).
    expired_spare: String,
    forged_spare: String,
    /// The victim's API token (its name and prefix), made before the matrix.
    victim_token: ApiToken,
    /// The victim's binding of `roles/bound-role`.
    victim_binding: String,
}

impl Fixture {
    fn token(&self, who: Who) -> Option<&str> {
        match who {
            Who::Anonymous => None,
            Who::Expired => Some(&self.expired),
            Who::Revoked => Some(&self.revoked),
            Who::WrongSignature => Some(&self.forged),
            Who::Plain => Some(&self.plain),
            Who::Admin => Some(&self.admin),
        }
    }

    fn victim_token_id(&self) -> &str {
        self.victim_token.name.rsplit('/').next().expect("a token id")
    }
}

/// Wraps `message` with `token` as bearer token, or with no credential at all.
fn with<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    match token {
        Some(token) => authed(message, token),
        None => tonic::Request::new(message),
    }
}

/// The answer as text (for the leak check), or the refusal.
fn show<T: std::fmt::Debug>(result: Result<tonic::Response<T>, Status>) -> Result<String, Status> {
    result.map(|response| format!("{:?}", response.into_inner()))
}

fn permission(resource_type: &str, verb: &str) -> Permission {
    Permission {
        resource_type: resource_type.into(),
        verb: verb.into(),
    }
}

/// A failed setup step, as the status of the cell that needed it (so that the matrix goes on and reports it).
fn setup_failed(what: &str) -> impl FnOnce(Status) -> Status + '_ {
    move |status| Status::new(status.code(), format!("setting up {what}: {}", status.message()))
}

async fn create_user(auth: &Harness, admin: &str, username: &str) -> Result<User, Status> {
    auth.users()
        .create_user(authed(
            CreateUserRequest {
                user: Some(User {
                    email: format!("{username}@example.com"),
                    ..User::default()
                }),
                user_id: username.into(),
                password: password_of(username),
            },
            admin,
        ))
        .await
        .map(tonic::Response::into_inner)
        .map_err(setup_failed(username))
}

async fn create_role(auth: &Harness, admin: &str, id: &str) -> Result<Role, Status> {
    auth.roles()
        .create_role(authed(
            CreateRoleRequest {
                role_id: id.into(),
                role: Some(Role {
                    title: format!("Role {id}"),
                    permissions: vec![permission("pipelines", "run")],
                    ..Role::default()
                }),
            },
            admin,
        ))
        .await
        .map(tonic::Response::into_inner)
        .map_err(setup_failed(id))
}

async fn bind(auth: &Harness, admin: &str, role: &str, subject: Subject) -> Result<RoleBinding, Status> {
    auth.roles()
        .create_role_binding(authed(
            CreateRoleBindingRequest {
                role_binding: Some(RoleBinding {
                    role: format!("roles/{role}"),
                    subject: Some(subject),
                    ..RoleBinding::default()
                }),
            },
            admin,
        ))
        .await
        .map(tonic::Response::into_inner)
        .map_err(setup_failed(role))
}

async fn create_api_token(auth: &Harness, token: &str, parent: &str, display_name: &str) -> Result<ApiToken, Status> {
    auth.tokens()
        .create_api_token(authed(
            CreateApiTokenRequest {
                parent: parent.into(),
                api_token: Some(ApiToken {
                    display_name: display_name.into(),
                    ..ApiToken::default()
                }),
            },
            token,
        ))
        .await
        .map_err(setup_failed(parent))?
        .into_inner()
        .api_token
        .ok_or_else(|| Status::internal("CreateApiToken answered without the token"))
}

/// Sends `case` as `who`, aiming at the user `target` where the request takes a user.
async fn call(fx: &Fixture, case: Case, who: Who, target: &str) -> Result<String, Status> {
    let auth = &fx.auth;
    let token = fx.token(who);
    let target_user = format!("users/{target}");
    match case {
        Case::LoginWrongPassword => show(
            auth.auth()
                .login(with(
                    LoginRequest {
                        username: format!("ghost-{}", who.slug()),
                        password: "not-the-password".into(),
                    },
                    token,
                ))
                .await,
        ),
        Case::RefreshBogusToken => show(
            auth.auth()
                .refresh_token(with(
                    RefreshTokenRequest {
                        refresh_token: "bm90LWEtcmVmcmVzaC10b2tlbg".into(),
                    },
                    token,
                ))
                .await,
        ),
        Case::Logout => {
            // Logging out must not end the session the other rows use.
            let fresh = match who {
                Who::Plain => Some(auth.login("plain", &password_of("plain")).await.access_token),
                Who::Admin => Some(auth.admin_token().await),
                Who::Expired => Some(fx.expired_spare.clone()),
                Who::WrongSignature => Some(fx.forged_spare.clone()),
                Who::Anonymous | Who::Revoked => token.map(str::to_owned),
            };
            show(auth.auth().logout(with(LogoutRequest {}, fresh.as_deref())).await)
        }
        Case::WhoAmI => show(auth.auth().who_am_i(with(WhoAmIRequest {}, token)).await),
        Case::GetJwks => show(auth.auth().get_jwks(with(GetJwksRequest {}, token)).await),
        Case::GetRevocationList => show(
            auth.auth()
                .get_revocation_list(with(GetRevocationListRequest {}, token))
                .await,
        ),
        Case::RotateSigningKey => show(
            auth.auth()
                .rotate_signing_key(with(RotateSigningKeyRequest {}, token))
                .await,
        ),
        Case::CreateUser => {
            let username = format!("made-by-{}", who.slug());
            show(
                auth.users()
                    .create_user(with(
                        CreateUserRequest {
                            user: Some(User {
                                email: format!("{username}@example.com"),
                                ..User::default()
                            }),
                            user_id: username.clone(),
                            password: password_of(&username),
                        },
                        token,
                    ))
                    .await,
            )
        }
        Case::GetTargetUser | Case::GetOwnUser | Case::GetMissingUser => {
            let name = match case {
                Case::GetTargetUser => target_user,
                Case::GetOwnUser => "users/me".into(),
                _ => "users/no-such-user".into(),
            };
            show(auth.users().get_user(with(GetUserRequest { name }, token)).await)
        }
        Case::ListUsers => show(auth.users().list_users(with(ListUsersRequest::default(), token)).await),
        Case::UpdateTargetUser => show(
            auth.users()
                .update_user(with(
                    UpdateUserRequest {
                        user: Some(User {
                            name: target_user,
                            display_name: format!("Updated by {}", who.slug()),
                            ..User::default()
                        }),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["display_name".into()],
                        }),
                    },
                    token,
                ))
                .await,
        ),
        Case::UpdateOwnActive => show(
            auth.users()
                .update_user(with(
                    UpdateUserRequest {
                        user: Some(User {
                            name: "users/me".into(),
                            active: true,
                            ..User::default()
                        }),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["active".into()],
                        }),
                    },
                    token,
                ))
                .await,
        ),
        Case::DeleteTargetUser => {
            let name = if who == Who::Admin {
                create_user(auth, &fx.admin, "doomed-user").await?.name
            } else {
                target_user
            };
            show(auth.users().delete_user(with(DeleteUserRequest { name }, token)).await)
        }
        Case::ChangeTargetPassword => show(
            auth.users()
                .change_password(with(
                    ChangePasswordRequest {
                        name: target_user,
                        current_password: password_of("plain"),
                        new_password: password_of(target),
                    },
                    token,
                ))
                .await,
        ),
        Case::CreateTargetApiToken => show(
            auth.tokens()
                .create_api_token(with(
                    CreateApiTokenRequest {
                        parent: target_user,
                        api_token: Some(ApiToken {
                            display_name: format!("made-by-{}", who.slug()),
                            ..ApiToken::default()
                        }),
                    },
                    token,
                ))
                .await,
        ),
        Case::ListTargetApiTokens | Case::ListOwnApiTokens => {
            let parent = if case == Case::ListOwnApiTokens {
                "users/me".into()
            } else {
                target_user
            };
            show(
                auth.tokens()
                    .list_api_tokens(with(
                        ListApiTokensRequest {
                            parent,
                            ..ListApiTokensRequest::default()
                        },
                        token,
                    ))
                    .await,
            )
        }
        Case::DeleteTargetApiToken => {
            let name = if who == Who::Admin {
                create_api_token(auth, &fx.admin, "users/victim", "doomed").await?.name
            } else {
                format!("{target_user}/apiTokens/{}", fx.victim_token_id())
            };
            show(
                auth.tokens()
                    .delete_api_token(with(DeleteApiTokenRequest { name }, token))
                    .await,
            )
        }
        Case::DeleteTargetApiTokenAsOwn => show(
            auth.tokens()
                .delete_api_token(with(
                    DeleteApiTokenRequest {
                        name: format!("users/me/apiTokens/{}", fx.victim_token_id()),
                    },
                    token,
                ))
                .await,
        ),
        Case::CreateRole => show(
            auth.roles()
                .create_role(with(
                    CreateRoleRequest {
                        role_id: format!("role-by-{}", who.slug()),
                        role: Some(Role {
                            title: "Made in the matrix".into(),
                            permissions: vec![permission("*", "*")],
                            ..Role::default()
                        }),
                    },
                    token,
                ))
                .await,
        ),
        Case::GetRole | Case::GetMissingRole => {
            let name = if case == Case::GetRole {
                format!("roles/{BOUND_ROLE}")
            } else {
                "roles/no-such-role".into()
            };
            show(auth.roles().get_role(with(GetRoleRequest { name }, token)).await)
        }
        Case::ListRoles => show(auth.roles().list_roles(with(ListRolesRequest::default(), token)).await),
        Case::UpdateRole => show(
            auth.roles()
                .update_role(with(
                    UpdateRoleRequest {
                        role: Some(Role {
                            name: format!("roles/{FIXTURE_ROLE}"),
                            title: format!("Role {FIXTURE_ROLE}"),
                            ..Role::default()
                        }),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["title".into()],
                        }),
                    },
                    token,
                ))
                .await,
        ),
        Case::DeleteRole => {
            let id = if who == Who::Admin {
                create_role(auth, &fx.admin, "doomed-role").await?;
                "doomed-role"
            } else {
                FIXTURE_ROLE
            };
            show(
                auth.roles()
                    .delete_role(with(
                        DeleteRoleRequest {
                            name: format!("roles/{id}"),
                        },
                        token,
                    ))
                    .await,
            )
        }
        Case::BindRoleToTarget => show(
            auth.roles()
                .create_role_binding(with(
                    CreateRoleBindingRequest {
                        role_binding: Some(RoleBinding {
                            role: format!("roles/{FIXTURE_ROLE}"),
                            subject: Some(Subject::User(target_user)),
                            ..RoleBinding::default()
                        }),
                    },
                    token,
                ))
                .await,
        ),
        Case::ListTargetRoleBindings | Case::ListOwnRoleBindings | Case::ListAllRoleBindings => {
            let user = match case {
                Case::ListTargetRoleBindings => target_user,
                Case::ListOwnRoleBindings => "users/me".into(),
                _ => String::new(),
            };
            show(
                auth.roles()
                    .list_role_bindings(with(
                        ListRoleBindingsRequest {
                            user,
                            ..ListRoleBindingsRequest::default()
                        },
                        token,
                    ))
                    .await,
            )
        }
        Case::DeleteTargetRoleBinding => {
            let name = if who == Who::Admin {
                // A group binding: removing a user's binding would also expire that user's access tokens.
                let group = Subject::Group("cn=doomed,ou=groups,dc=example,dc=com".into());
                bind(auth, &fx.admin, BOUND_ROLE, group).await?.name
            } else {
                fx.victim_binding.clone()
            };
            show(
                auth.roles()
                    .delete_role_binding(with(DeleteRoleBindingRequest { name }, token))
                    .await,
            )
        }
        Case::CheckTargetPermission | Case::CheckOwnPermission => {
            let user = if case == Case::CheckTargetPermission {
                target_user
            } else {
                String::new()
            };
            show(
                auth.roles()
                    .check_permission(with(
                        CheckPermissionRequest {
                            user,
                            permission: Some(permission("projects", "create")),
                        },
                        token,
                    ))
                    .await,
            )
        }
        Case::ListTargetPermissions | Case::ListOwnPermissions => {
            let user = if case == Case::ListTargetPermissions {
                target_user
            } else {
                "users/me".into()
            };
            show(
                auth.roles()
                    .list_permissions(with(ListPermissionsRequest { user }, token))
                    .await,
            )
        }
        Case::ListAuditEvents => show(
            auth.audit()
                .list_audit_events(with(ListAuditEventsRequest::default(), token))
                .await,
        ),
        Case::CreateServiceAccount => show(
            service_accounts(auth)
                .create_service_account(with(
                    CreateServiceAccountRequest {
                        service_account_id: format!("sa-by-{}", who.slug()),
                        service_account: None,
                    },
                    token,
                ))
                .await,
        ),
        Case::GetMissingServiceAccount => show(
            service_accounts(auth)
                .get_service_account(with(
                    GetServiceAccountRequest {
                        name: "serviceAccounts/no-such".into(),
                    },
                    token,
                ))
                .await,
        ),
        Case::ListServiceAccounts => show(
            service_accounts(auth)
                .list_service_accounts(with(ListServiceAccountsRequest::default(), token))
                .await,
        ),
        Case::DeleteServiceAccount => {
            if who == Who::Admin {
                service_accounts(auth)
                    .create_service_account(authed(
                        CreateServiceAccountRequest {
                            service_account_id: "doomed-sa".into(),
                            service_account: None,
                        },
                        &fx.admin,
                    ))
                    .await?;
            }
            show(
                service_accounts(auth)
                    .delete_service_account(with(
                        DeleteServiceAccountRequest {
                            name: "serviceAccounts/doomed-sa".into(),
                        },
                        token,
                    ))
                    .await,
            )
        }
    }
}

/// A client of `ServiceAccountService`.
fn service_accounts(
    auth: &Harness,
) -> cube_proto::cube::auth::v1::service_account_service_client::ServiceAccountServiceClient<tonic::transport::Channel>
{
    cube_proto::cube::auth::v1::service_account_service_client::ServiceAccountServiceClient::new(auth.channel.clone())
}

/// The start of a long answer, for failure messages.
fn brief(answer: &str) -> String {
    if answer.len() <= 300 {
        return answer.to_owned();
    }
    let end = (0..=300)
        .rev()
        .find(|index| answer.is_char_boundary(*index))
        .unwrap_or(0);
    format!("{}…", &answer[..end])
}

/// The RPCs the protos declare, as `Service.Method`.
fn rpcs_in_protos() -> BTreeSet<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../proto/cube/auth/v1");
    let mut rpcs = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|error| panic!("reading {dir}: {error}")) {
        let path = entry.expect("a directory entry").path();
        if path.extension().is_none_or(|extension| extension != "proto") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("reading {path:?}: {error}"));
        let mut service = None;
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.split_whitespace().next().map(str::to_owned);
            } else if let Some(rest) = line.strip_prefix("rpc ") {
                let method = rest.split('(').next().unwrap_or_default().trim();
                let service = service.as_deref().expect("an rpc inside a service");
                rpcs.insert(format!("{service}.{method}"));
            }
        }
    }
    rpcs
}

/// Re-signs `token`'s claims (an admin's) under its own key id with another key.
fn forge(token: &str) -> String {
    let kid = key_id(token).expect("a key id");
    let payload = token.split('.').nth(1).expect("a JWT payload");
    let claims: Claims =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("the admin's claims");
    assert!(claims.roles.iter().any(|role| role == "admin"), "{claims:?}");
    let other = SigningKey::generate().expect("a key");
    let forged = SigningKey::from_pkcs8(kid.clone(), other.pkcs8().to_vec())
        .expect("the other key under the real key id")
        .sign(&claims)
        .expect("signing");
    assert_eq!(key_id(&forged).expect("the forged token's key id"), kid);
    forged
}

/// Makes the users, the victim's data and a token for each identity.
async fn fixture(url: &str) -> Fixture {
    let auth = start(args(url)).await;
    let admin = auth.admin_token().await;
    auth.create_user(&admin, "plain").await;
    auth.create_user(&admin, VICTIM).await;
    create_role(&auth, &admin, BOUND_ROLE).await.expect("a role");
    create_role(&auth, &admin, FIXTURE_ROLE).await.expect("a role");
    let victim_binding = bind(&auth, &admin, BOUND_ROLE, Subject::User(format!("users/{VICTIM}")))
        .await
        .expect("the victim's binding")
        .name;
    bind(&auth, &admin, BOUND_ROLE, Subject::User("users/plain".into()))
        .await
        .expect("the plain user's binding");
    let victim_token = create_api_token(&auth, &admin, &format!("users/{VICTIM}"), "victim-ci")
        .await
        .expect("the victim's token");
    // The plain user logs in after being bound, so that their token carries the role.
    let plain = auth.login("plain", &password_of("plain")).await.access_token;
    create_api_token(&auth, &plain, "users/me", "plain-ci")
        .await
        .expect("the plain user's token");

    // Revoked: an admin session ended by Logout.
    let revoked = auth.admin_token().await;
    auth.auth()
        .logout(authed(LogoutRequest {}, &revoked))
        .await
        .expect("logging out");

    // Wrong signature: admin tokens' own claims, under the real key id, signed by another key.
    let kid = key_id(&admin).expect("the admin token's key id");
    let forged = forge(&admin);
    let forged_spare = forge(&auth.admin_token().await);

    // Expired: from a second replica on the same database (same keys) whose tokens live one second. The tokens
    // are verified (and so cached) by the main replica while live, then must be refused once past their expiry.
    let (expired, expired_spare, expire_seconds) = {
        let mut short = args(url);
        short.access_token_ttl = Duration::from_secs(1);
        let short = start(short).await;
        let mut attempts = 0;
        'issue: loop {
            attempts += 1;
            assert!(attempts <= 10, "no 1-second token was still live when checked");
            let mut tokens = Vec::new();
            for _ in 0..2 {
                let login = short.login("admin", ADMIN_PASSWORD).await;
                assert_eq!(
                    key_id(&login.access_token).expect("key id"),
                    kid,
                    "the replicas share keys"
                );
                let seconds = login.access_token_expire_time.map(|time| time.seconds);
                tokens.push((login.access_token, seconds.expect("an expiry")));
            }
            for (token, _) in &tokens {
                match auth.auth().who_am_i(authed(WhoAmIRequest {}, token)).await {
                    Ok(_) => {}
                    // The second ended between issue and check: the token was already expired. Try again.
                    Err(status) if status.code() == Code::Unauthenticated => continue 'issue,
                    Err(status) => panic!("a live 1-second token: {status:?}"),
                }
            }
            let [(expired, first), (spare, second)]: [(String, i64); 2] = tokens.try_into().expect("two tokens");
            break (expired, spare, first.max(second));
        }
    };
    let now_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("a clock after 1970")
            .as_millis(),
    )
    .expect("milliseconds");
    let wait_ms = u64::try_from(expire_seconds * 1000 - now_ms + 100).unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(wait_ms)).await;

    Fixture {
        auth,
        admin,
        plain,
        expired,
        revoked,
        forged,
        expired_spare,
        forged_spare,
        victim_token,
        victim_binding,
    }
}

async fn every_rpc_answers_every_identity_as_the_table_says(url: &str) {
    // The table covers every RPC of the six services.
    let declared = rpcs_in_protos();
    let covered: BTreeSet<String> = TABLE.iter().map(|row| row.rpc.to_owned()).collect();
    assert_eq!(
        covered, declared,
        "the table must cover exactly the RPCs the protos declare"
    );
    assert_eq!(declared.len(), 31, "{declared:?}");

    let fx = fixture(url).await;
    let mut failures = Vec::new();
    let mut plain_answers = Vec::new();
    let mut admin_answers = Vec::new();
    for row in TABLE {
        for (who, expected) in EVERYONE.into_iter().zip(row.expect) {
            let cell = format!("{} ({}) as {}", row.rpc, row.request, who.describe());
            match call(&fx, row.case, who, VICTIM).await {
                Ok(answer) if expected == OK => match who {
                    Who::Plain => plain_answers.push((cell, answer)),
                    Who::Admin => admin_answers.push((row.case, answer)),
                    _ => {}
                },
                Ok(answer) => failures.push(format!("{cell}: expected {expected:?}, got OK: {}", brief(&answer))),
                Err(status) if status.code() == expected => {
                    let info = status.get_error_details().error_info().cloned();
                    let reason = match expected {
                        UNAUTHENTICATED => "UNAUTHENTICATED",
                        DENIED => "PERMISSION_DENIED",
                        _ => "NOT_FOUND",
                    };
                    match info {
                        Some(info) if info.reason == reason && info.domain == "auth.cube.dev" => {}
                        other => failures.push(format!(
                            "{cell}: {expected:?} should carry ErrorInfo {reason} in auth.cube.dev, got {other:?}"
                        )),
                    }
                }
                Err(status) => failures.push(format!(
                    "{cell}: expected {expected:?}, got {:?}: {}",
                    status.code(),
                    status.message()
                )),
            }
        }
    }

    // Nothing a plain user is answered names the victim: not their username, email or any token of theirs.
    let victim_tokens = fx
        .auth
        .tokens()
        .list_api_tokens(authed(
            ListApiTokensRequest {
                parent: format!("users/{VICTIM}"),
                page_size: 1000,
                ..ListApiTokensRequest::default()
            },
            &fx.admin,
        ))
        .await
        .expect("listing the victim's tokens as admin")
        .into_inner()
        .api_tokens;
    let mut needles = vec![
        VICTIM.to_owned(),
        format!("{VICTIM}@example.com"),
        fx.victim_token.prefix.clone(),
        fx.victim_token.name.clone(),
    ];
    for token in &victim_tokens {
        needles.push(token.prefix.clone());
        needles.push(token.name.clone());
    }
    for (cell, answer) in &plain_answers {
        for needle in &needles {
            if answer.contains(needle.as_str()) {
                failures.push(format!(
                    "{cell}: the answer shows the victim's {needle:?}: {}",
                    brief(answer)
                ));
            }
        }
    }
    // The plain user was answered at all, and the same needles do find the victim in the admin's answers.
    if plain_answers.len() < 10 {
        failures.push(format!(
            "the plain user got only {} answers to check",
            plain_answers.len()
        ));
    }
    for (case, needle) in [
        (Case::GetTargetUser, format!("{VICTIM}@example.com")),
        (Case::ListTargetApiTokens, fx.victim_token.prefix.clone()),
    ] {
        let found = admin_answers
            .iter()
            .any(|(answered, answer)| *answered == case && answer.contains(needle.as_str()));
        if !found {
            failures.push(format!("{case:?} as admin does not show the victim's {needle:?}"));
        }
    }

    // To a plain user, the victim's data looks exactly like a user who does not exist.
    for case in [
        Case::GetTargetUser,
        Case::UpdateTargetUser,
        Case::ChangeTargetPassword,
        Case::CreateTargetApiToken,
        Case::ListTargetApiTokens,
        Case::DeleteTargetApiToken,
        Case::ListTargetRoleBindings,
        Case::CheckTargetPermission,
        Case::ListTargetPermissions,
    ] {
        let answer = |result: Result<String, Status>| match result {
            Ok(answer) => format!("OK {answer}"),
            Err(status) => format!("{:?} {}", status.code(), status.message()),
        };
        let victim = answer(call(&fx, case, Who::Plain, VICTIM).await).replace(VICTIM, NOBODY);
        let nobody = answer(call(&fx, case, Who::Plain, NOBODY).await);
        if victim != nobody {
            failures.push(format!(
                "{case:?} as plain user tells the victim from a missing user: {victim:?} vs {nobody:?}"
            ));
        }
    }

    assert!(
        failures.is_empty(),
        "{} cell(s) of the authorization matrix failed:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // The refused calls changed nothing; the admin's calls did just what they asked.
    let users: Vec<String> = fx
        .auth
        .users()
        .list_users(authed(ListUsersRequest::default(), &fx.admin))
        .await
        .expect("listing users")
        .into_inner()
        .users
        .into_iter()
        .map(|user| user.name)
        .collect();
    assert_eq!(
        users,
        ["users/admin", "users/made-by-admin", "users/plain", "users/victim"]
    );
    let victim = fx
        .auth
        .users()
        .get_user(authed(
            GetUserRequest {
                name: format!("users/{VICTIM}"),
            },
            &fx.admin,
        ))
        .await
        .expect("the victim")
        .into_inner();
    assert_eq!(victim.display_name, "Updated by admin");
    assert!(victim.active);
    // The admin set the victim's password to what it was: it still works.
    fx.auth.login(VICTIM, &password_of(VICTIM)).await;
    let mut token_states: Vec<(String, bool)> = victim_tokens
        .iter()
        .map(|token| (token.display_name.clone(), token.revoke_time.is_some()))
        .collect();
    token_states.sort();
    assert_eq!(
        token_states,
        [
            ("doomed".to_owned(), true),
            ("made-by-admin".to_owned(), false),
            ("victim-ci".to_owned(), false)
        ]
    );
    let roles: Vec<String> = fx
        .auth
        .roles()
        .list_roles(authed(ListRolesRequest::default(), &fx.admin))
        .await
        .expect("listing roles")
        .into_inner()
        .roles
        .into_iter()
        .map(|role| role.name)
        .collect();
    assert_eq!(
        roles,
        [
            "roles/admin",
            "roles/bound-role",
            "roles/fixture-role",
            "roles/role-by-admin",
            "roles/user"
        ]
    );
    let victim_bindings: Vec<(String, String)> = fx
        .auth
        .roles()
        .list_role_bindings(authed(
            ListRoleBindingsRequest {
                user: format!("users/{VICTIM}"),
                ..ListRoleBindingsRequest::default()
            },
            &fx.admin,
        ))
        .await
        .expect("listing the victim's bindings")
        .into_inner()
        .role_bindings
        .into_iter()
        .map(|binding| (binding.name, binding.role))
        .collect();
    assert_eq!(victim_bindings.len(), 2, "{victim_bindings:?}");
    assert!(
        victim_bindings
            .iter()
            .any(|(name, role)| *name == fx.victim_binding && role == "roles/bound-role"),
        "{victim_bindings:?}"
    );
    assert!(
        victim_bindings.iter().any(|(_, role)| role == "roles/fixture-role"),
        "{victim_bindings:?}"
    );
}
