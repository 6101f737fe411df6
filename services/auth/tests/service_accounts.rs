//! Service accounts on SQLite, PostgreSQL and MariaDB: admin-only management with the token shown once, the token
//! alone acting as no user, acting for a user with that user's roles (never an admin's powers), users refused when
//! they try to act for others, the audit log naming `service for user`, and deletion ending the token at once.

mod support;

use cube_kit::identity::ON_BEHALF_OF;
use cube_proto::cube::auth::v1::audit_service_client::AuditServiceClient;
use cube_proto::cube::auth::v1::service_account_service_client::ServiceAccountServiceClient;
use cube_proto::cube::auth::v1::{
    CreateApiTokenRequest, CreateServiceAccountRequest, CreateUserRequest, CredentialKind, DeleteServiceAccountRequest,
    GetServiceAccountRequest, ListAuditEventsRequest, ListServiceAccountsRequest, ServiceAccount, User, WhoAmIRequest,
};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

use support::{ADMIN_PASSWORD, Harness, args, authed, start};

cube_testkit::on_every_backend!(
    admins_manage_service_accounts_and_the_token_is_shown_once,
    a_service_account_acts_only_for_a_user_and_as_that_user,
    a_deleted_service_accounts_token_stops_working,
);

fn accounts(harness: &Harness) -> ServiceAccountServiceClient<Channel> {
    ServiceAccountServiceClient::new(harness.channel.clone())
}

/// `message` as a service account acting for `user`.
fn acting<T>(message: T, token: &str, user: &str) -> tonic::Request<T> {
    let mut request = authed(message, token);
    request
        .metadata_mut()
        .insert(ON_BEHALF_OF, user.parse().expect("metadata"));
    request
}

async fn create(harness: &Harness, admin: &str, id: &str) -> (ServiceAccount, String) {
    let created = accounts(harness)
        .create_service_account(authed(
            CreateServiceAccountRequest {
                service_account_id: id.to_owned(),
                service_account: Some(ServiceAccount {
                    display_name: format!("the {id} service"),
                    ..ServiceAccount::default()
                }),
            },
            admin,
        ))
        .await
        .expect("creating a service account")
        .into_inner();
    (created.service_account.expect("the account"), created.token)
}

/// Creates the plain user `username` and returns their access token.
async fn user(harness: &Harness, admin: &str, username: &str) -> String {
    harness
        .users()
        .create_user(authed(
            CreateUserRequest {
                user: Some(User {
                    email: format!("{username}@example.com"),
                    ..User::default()
                }),
                user_id: username.to_owned(),
                password: format!("{username} long password"),
            },
            admin,
        ))
        .await
        .expect("creating a user");
    harness
        .login(username, &format!("{username} long password"))
        .await
        .access_token
}

async fn admins_manage_service_accounts_and_the_token_is_shown_once(url: &str) {
    let harness = start(args(url)).await;
    let admin = harness.login("admin", ADMIN_PASSWORD).await.access_token;
    let lena = user(&harness, &admin, "lena").await;
    let (account, token) = create(&harness, &admin, "workflow").await;
    assert_eq!(account.name, "serviceAccounts/workflow");
    assert!(
        token.starts_with(&account.prefix),
        "{token} begins with {}",
        account.prefix
    );
    let read = accounts(&harness)
        .get_service_account(authed(
            GetServiceAccountRequest {
                name: account.name.clone(),
            },
            &admin,
        ))
        .await
        .expect("reading")
        .into_inner();
    assert_eq!(read, account, "the token is never shown again");

    let again = accounts(&harness)
        .create_service_account(authed(
            CreateServiceAccountRequest {
                service_account_id: "workflow".into(),
                service_account: None,
            },
            &admin,
        ))
        .await
        .expect_err("a second of the same id");
    assert_eq!(again.code(), Code::AlreadyExists);
    let bad = accounts(&harness)
        .create_service_account(authed(
            CreateServiceAccountRequest {
                service_account_id: "Not Valid".into(),
                service_account: Some(ServiceAccount {
                    display_name: "x".repeat(101),
                    ..ServiceAccount::default()
                }),
            },
            &admin,
        ))
        .await
        .expect_err("bad input");
    assert_eq!(bad.code(), Code::InvalidArgument);
    let fields: Vec<String> = bad
        .get_details_bad_request()
        .expect("field violations")
        .field_violations
        .into_iter()
        .map(|violation| violation.field)
        .collect();
    assert_eq!(fields, ["service_account_id", "service_account.display_name"]);

    for (id, _) in [("notebook", ()), ("serving", ())] {
        create(&harness, &admin, id).await;
    }
    let mut names = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = accounts(&harness)
            .list_service_accounts(authed(
                ListServiceAccountsRequest {
                    page_size: 2,
                    page_token: page_token.clone(),
                },
                &admin,
            ))
            .await
            .expect("listing")
            .into_inner();
        names.extend(page.service_accounts.into_iter().map(|account| account.name));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(
        names,
        [
            "serviceAccounts/notebook",
            "serviceAccounts/serving",
            "serviceAccounts/workflow"
        ]
    );

    // Neither a user nor a service account manages service accounts.
    for caller in [&lena, &token] {
        let refused = accounts(&harness)
            .list_service_accounts(authed(ListServiceAccountsRequest::default(), caller))
            .await
            .expect_err("not an admin");
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        let refused = accounts(&harness)
            .delete_service_account(authed(
                DeleteServiceAccountRequest {
                    name: "serviceAccounts/notebook".into(),
                },
                caller,
            ))
            .await
            .expect_err("not an admin");
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    }
}

async fn a_service_account_acts_only_for_a_user_and_as_that_user(url: &str) {
    let harness = start(args(url)).await;
    let admin = harness.login("admin", ADMIN_PASSWORD).await.access_token;
    let lena = user(&harness, &admin, "lena").await;
    let (_, token) = create(&harness, &admin, "workflow").await;

    // Alone, the token is the account: no user, no roles.
    let alone = harness
        .auth()
        .who_am_i(authed(WhoAmIRequest {}, &token))
        .await
        .expect("who am i")
        .into_inner();
    assert_eq!(alone.user.expect("user").name, "serviceAccounts/workflow");
    assert!(alone.roles.is_empty());
    let credential = alone.credential.expect("credential");
    assert_eq!(credential.kind(), CredentialKind::ServiceAccount);
    assert!(
        credential.id.starts_with("serviceAccounts/workflow/tokens/"),
        "{}",
        credential.id
    );

    // Acting for lena, it is lena with her roles.
    let as_lena = harness
        .auth()
        .who_am_i(acting(WhoAmIRequest {}, &token, "users/lena"))
        .await
        .expect("acting for lena")
        .into_inner();
    assert_eq!(as_lena.user.expect("user").name, "users/lena");
    assert_eq!(as_lena.roles, ["roles/user"]);
    assert_eq!(
        as_lena.credential.expect("credential").kind(),
        CredentialKind::ServiceAccount
    );

    // Acting for an admin brings no admin powers, and an account never makes API tokens for anyone.
    let refused = accounts(&harness)
        .list_service_accounts(acting(ListServiceAccountsRequest::default(), &token, "users/admin"))
        .await
        .expect_err("no admin powers");
    assert_eq!(refused.code(), Code::PermissionDenied);
    let refused = harness
        .tokens()
        .create_api_token(acting(
            CreateApiTokenRequest {
                parent: "users/me".into(),
                api_token: None,
            },
            &token,
            "users/lena",
        ))
        .await
        .expect_err("no API tokens");
    assert_eq!(refused.code(), Code::PermissionDenied);

    // A user cannot act for another; nobody acts for a user who does not exist; malformed names are named.
    let refused = harness
        .auth()
        .who_am_i(acting(WhoAmIRequest {}, &lena, "users/admin"))
        .await
        .expect_err("a user acting for another");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains(ON_BEHALF_OF), "{refused:?}");
    let refused = harness
        .auth()
        .who_am_i(acting(WhoAmIRequest {}, &token, "users/nobody"))
        .await
        .expect_err("an unknown user");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let malformed = harness
        .auth()
        .who_am_i(acting(WhoAmIRequest {}, &token, "lena"))
        .await
        .expect_err("not a user name");
    assert_eq!(malformed.code(), Code::InvalidArgument, "{malformed:?}");

    // The audit log names the account and the user it acted for.
    let events = AuditServiceClient::new(harness.channel.clone())
        .list_audit_events(authed(
            ListAuditEventsRequest {
                filter: "action = \"service-account.act-for\"".into(),
                ..ListAuditEventsRequest::default()
            },
            &admin,
        ))
        .await
        .expect("the audit log")
        .into_inner();
    assert!(
        events
            .audit_events
            .iter()
            .any(|event| event.actor == "serviceAccounts/workflow for users/lena" && event.target == "users/lena"),
        "{events:?}"
    );
}

async fn a_deleted_service_accounts_token_stops_working(url: &str) {
    let harness = start(args(url)).await;
    let admin = harness.login("admin", ADMIN_PASSWORD).await.access_token;
    user(&harness, &admin, "lena").await;
    let (account, token) = create(&harness, &admin, "workflow").await;
    harness
        .auth()
        .who_am_i(acting(WhoAmIRequest {}, &token, "users/lena"))
        .await
        .expect("works before");
    accounts(&harness)
        .delete_service_account(authed(
            DeleteServiceAccountRequest {
                name: account.name.clone(),
            },
            &admin,
        ))
        .await
        .expect("deleting");
    for request in [
        authed(WhoAmIRequest {}, &token),
        acting(WhoAmIRequest {}, &token, "users/lena"),
    ] {
        let refused = harness.auth().who_am_i(request).await.expect_err("deleted");
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    }
    let missing = accounts(&harness)
        .delete_service_account(authed(DeleteServiceAccountRequest { name: account.name }, &admin))
        .await
        .expect_err("deleted already");
    assert_eq!(missing.code(), Code::NotFound);
    // An account made again under the same id gets a new token; the old one stays dead.
    let (_, renewed) = create(&harness, &admin, "workflow").await;
    harness
        .auth()
        .who_am_i(authed(WhoAmIRequest {}, &renewed))
        .await
        .expect("the new token works");
    let refused = harness
        .auth()
        .who_am_i(authed(WhoAmIRequest {}, &token))
        .await
        .expect_err("the old token");
    assert_eq!(refused.code(), Code::Unauthenticated);
}
