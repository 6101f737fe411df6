//! LDAP login against the real slapd of the test environment (`scripts/test-env.sh up ldap`).
//!
//! Each test that needs people or groups of its own adds them, with unique names, through an admin connection, and
//! the fixture deletes them when dropped, so the tests run in parallel and leave the seed as it was.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use cube_auth::ldap::{Directory, LdapError, LdapUser};
use cube_testkit::require;

mod support;

use support::directory::{Fixture, args, directory, unique};

/// Returns the message of the configuration error that flags must give.
fn config_error(flags: &[&str]) -> String {
    match Directory::from_args(&args(flags)) {
        Ok(_) => panic!("flags {flags:?} were accepted"),
        Err(e) => e.to_string(),
    }
}

/// A loopback address where nothing listens (the port was free a moment ago).
fn closed_port_url(scheme: &str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let port = listener.local_addr().expect("local address").port();
    drop(listener);
    format!("{scheme}://127.0.0.1:{port}")
}

fn assert_invalid_credentials(result: Result<LdapUser, LdapError>, what: &str) -> LdapError {
    match result {
        Err(e @ LdapError::InvalidCredentials) => e,
        other => panic!("{what}: expected InvalidCredentials, got {other:?}"),
    }
}

fn assert_unavailable(result: Result<LdapUser, LdapError>, server: &str, what: &str) -> String {
    match result {
        Err(e @ LdapError::Unavailable { .. }) => {
            let message = e.to_string();
            assert!(
                message.contains(server),
                "{what}: the error does not name {server}: {message}"
            );
            message
        }
        other => panic!("{what}: expected Unavailable, got {other:?}"),
    }
}

#[test]
fn an_unset_server_turns_ldap_off() {
    assert!(Directory::from_args(&args(&[])).expect("no flags are valid").is_none());
    assert!(
        Directory::from_args(&args(&["--ldap-server", ""]))
            .expect("an empty server is valid")
            .is_none()
    );
}

#[test]
fn invalid_or_contradictory_configuration_is_refused_naming_the_flag() {
    let server = "ldap://127.0.0.1:389";
    let cases: &[(&[&str], &str)] = &[
        (&["--ldap-server", server], "--ldap-search"),
        (
            &["--ldap-server", "http://127.0.0.1:389", "--ldap-search", "dc=x"],
            "--ldap-server",
        ),
        (&["--ldap-server", "ldap://", "--ldap-search", "dc=x"], "--ldap-server"),
        (
            &[
                "--ldap-server",
                server,
                "--ldap-username-format",
                "uid=%s,dc=x",
                "--ldap-append-domain",
                "x.com",
            ],
            "--ldap-username-format",
        ),
        (
            &["--ldap-server", server, "--ldap-username-format", "uid=alice,dc=x"],
            "%s",
        ),
        (
            &["--ldap-server", server, "--ldap-append-domain", "x.com"],
            "--ldap-search",
        ),
        (
            &[
                "--ldap-server",
                server,
                "--ldap-search",
                "dc=x",
                "--ldap-roles-mapping",
                "admin=cn=a,dc=x;admins",
            ],
            "\"admins\"",
        ),
        (
            &[
                "--ldap-server",
                server,
                "--ldap-search",
                "dc=x",
                "--ldap-roles-mapping",
                "=cn=a,dc=x",
            ],
            "--ldap-roles-mapping",
        ),
        (
            &[
                "--ldap-server",
                server,
                "--ldap-search",
                "dc=x",
                "--ldap-search-filter",
                "(objectClass=person",
            ],
            "--ldap-search-filter",
        ),
        (
            &[
                "--ldap-server",
                server,
                "--ldap-search",
                "dc=x",
                "--ldap-group-search",
                "dc=x",
                "--ldap-group-search-filter",
                "(member=x)",
            ],
            "{dn}",
        ),
        (
            &[
                "--ldap-server",
                server,
                "--ldap-search",
                "dc=x",
                "--ldap-bind-user",
                "cn=admin,dc=x",
            ],
            "--ldap-bind-password",
        ),
        (
            &[
                "--ldap-server",
                "ldaps://127.0.0.1:636",
                "--ldap-use-tls",
                "--ldap-search",
                "dc=x",
            ],
            "--ldap-use-tls",
        ),
        (
            &[
                "--ldap-server",
                server,
                "--ldap-search",
                "dc=x",
                "--ldap-tls-cacertfile",
                "/etc/hostname",
            ],
            "--ldap-tls-cacertfile",
        ),
        (
            &[
                "--ldap-server",
                "ldaps://127.0.0.1:636",
                "--ldap-search",
                "dc=x",
                "--ldap-tls-cacertfile",
                "/nonexistent/ca.pem",
            ],
            "/nonexistent/ca.pem",
        ),
        (
            &[
                "--ldap-server",
                "ldaps://127.0.0.1:636",
                "--ldap-search",
                "dc=x",
                "--ldap-tls-cacertfile",
                "/etc/hostname",
            ],
            "CERTIFICATE",
        ),
        (
            &["--ldap-server", server, "--ldap-search", "dc=x", "--ldap-timeout", "0s"],
            "--ldap-timeout",
        ),
    ];
    for (flags, expected) in cases {
        let message = config_error(flags);
        assert!(
            message.contains(expected),
            "flags {flags:?}: {message:?} does not mention {expected:?}"
        );
    }
}

#[tokio::test]
async fn direct_bind_with_the_username_format_reads_the_users_attributes() {
    let fx = Fixture::new();
    let person = fx.add_person(&[]).await;
    let format = format!("uid=%s,{}", fx.people());
    let dir = directory(&["--ldap-server", &fx.url, "--ldap-username-format", &format]);

    let user = dir.authenticate(&person.uid, &person.password).await.expect("login");
    assert_eq!(
        user,
        LdapUser {
            dn: person.dn.clone(),
            uid: person.uid.clone(),
            email: Some(person.mail.clone()),
            given_name: Some(person.given_name.clone()),
            surname: Some(person.surname.clone()),
            groups: vec![],
        }
    );

    // A seeded user, with the group search that finds her team.
    let dir = directory(&[
        "--ldap-server",
        &fx.url,
        "--ldap-username-format",
        &format,
        "--ldap-group-search",
        &fx.groups(),
    ]);
    let alice = dir
        .authenticate("alice", &require("CUBE_TEST_LDAP_ALICE_PASSWORD"))
        .await
        .expect("alice logs in");
    assert_eq!(alice.email.as_deref(), Some("alice@cube.test"));
    assert_eq!(alice.given_name.as_deref(), Some("Alice"));
    assert_eq!(alice.surname.as_deref(), Some("Liddell"));
    assert_eq!(alice.groups, [format!("cn=ml-team,{}", fx.groups())]);
}

#[tokio::test]
async fn direct_bind_with_a_search_base_finds_the_entry_by_uid() {
    let fx = Fixture::new();
    let person = fx.add_person(&[]).await;
    let format = format!("uid=%s,{}", fx.people());
    let dir = directory(&[
        "--ldap-server",
        &fx.url,
        "--ldap-username-format",
        &format,
        "--ldap-search",
        &fx.people(),
    ]);
    let user = dir.authenticate(&person.uid, &person.password).await.expect("login");
    assert_eq!(user.dn, person.dn);
    assert_eq!(user.email.as_deref(), Some(person.mail.as_str()));
}

#[tokio::test]
async fn a_refused_append_domain_bind_is_invalid_credentials() {
    // slapd has no user@domain names (Active Directory's): it refuses the bind name as an invalid DN, which is the
    // user's input and so must read as wrong credentials, not as a directory fault.
    let fx = Fixture::new();
    let dir = directory(&[
        "--ldap-server",
        &fx.url,
        "--ldap-append-domain",
        "cube.test",
        "--ldap-search",
        &fx.people(),
    ]);
    assert_invalid_credentials(
        dir.authenticate("alice", &require("CUBE_TEST_LDAP_ALICE_PASSWORD"))
            .await,
        "bind as alice@cube.test",
    );
}

#[tokio::test]
async fn search_then_bind_with_the_service_account_finds_the_user_and_groups() {
    let fx = Fixture::new();
    let person = fx.add_person(&[]).await;
    let other = fx.add_person(&[]).await;
    let team = fx.add_group(&[&person.dn, &other.dn]).await;
    let elsewhere = fx.add_group(&[&other.dn]).await;
    let dir = fx.search_directory(&[]);

    let user = dir.authenticate(&person.uid, &person.password).await.expect("login");
    assert_eq!(user.dn, person.dn);
    assert_eq!(user.uid, person.uid);
    assert_eq!(user.email.as_deref(), Some(person.mail.as_str()));
    assert_eq!(user.given_name.as_deref(), Some(person.given_name.as_str()));
    assert_eq!(user.surname.as_deref(), Some(person.surname.as_str()));
    assert_eq!(
        user.groups,
        std::slice::from_ref(&team),
        "only the group that lists the user"
    );

    let user = dir
        .authenticate(&other.uid, &other.password)
        .await
        .expect("other logs in");
    let mut expected = vec![team, elsewhere];
    expected.sort();
    assert_eq!(user.groups, expected);
}

#[tokio::test]
async fn search_then_bind_works_anonymously_without_a_service_account() {
    let fx = Fixture::new();
    let person = fx.add_person(&[]).await;
    let group = fx.add_group(&[&person.dn]).await;
    let dir = directory(&[
        "--ldap-server",
        &fx.url,
        "--ldap-search",
        &fx.people(),
        "--ldap-group-search",
        &fx.groups(),
    ]);
    let user = dir.authenticate(&person.uid, &person.password).await.expect("login");
    assert_eq!(user.dn, person.dn);
    assert_eq!(user.groups, [group]);
    let err = dir.authenticate(&person.uid, "wrong").await;
    assert_invalid_credentials(err, "wrong password, anonymous search");
}

#[tokio::test]
async fn the_search_filter_restricts_who_may_log_in() {
    let fx = Fixture::new();
    let marker = unique("cube");
    let allowed = fx.add_person(&[("employeeType", &marker)]).await;
    let refused = fx.add_person(&[]).await;
    let filter = format!("(employeeType={marker})");
    let dir = fx.search_directory(&["--ldap-search-filter", &filter]);
    dir.authenticate(&allowed.uid, &allowed.password)
        .await
        .expect("the matching user logs in");
    assert_invalid_credentials(
        dir.authenticate(&refused.uid, &refused.password).await,
        "a user outside the filter, with the right password",
    );
}

#[tokio::test]
async fn roles_come_from_the_mapping_case_insensitively() {
    let fx = Fixture::new();
    let person = fx.add_person(&[]).await;
    let admins = fx.add_group(&[&person.dn]).await;
    let users = fx.add_group(&[&person.dn]).await;
    let unmapped = fx.add_group(&[&person.dn]).await;
    // Another spelling of the same DNs: upper case, spaces after the commas.
    let shout = |dn: &str| dn.to_uppercase().replace(',', ", ");
    let mapping = format!(
        "admin={};user={};user={};viewer=cn=nobody,{}",
        shout(&admins),
        users,
        admins,
        fx.groups()
    );
    let dir = fx.search_directory(&["--ldap-roles-mapping", &mapping]);

    let user = dir.authenticate(&person.uid, &person.password).await.expect("login");
    assert_eq!(user.groups.len(), 3, "groups: {:?}", user.groups);
    assert!(user.groups.contains(&unmapped));
    assert_eq!(dir.mapped_roles(&user.groups), ["admin", "user"]);
    assert_eq!(dir.mapped_roles(std::slice::from_ref(&users)), ["user"]);
    assert!(dir.mapped_roles(&[unmapped]).is_empty());
    assert!(dir.mapped_roles(&[]).is_empty());

    // The seed's groups, as the brief's example mapping names them.
    let seeded = format!("admin=cn=admins,{0};user=cn=ml-team,{0}", fx.groups());
    let dir = fx.search_directory(&["--ldap-roles-mapping", &seeded]);
    let bob = dir
        .authenticate("bob", &require("CUBE_TEST_LDAP_BOB_PASSWORD"))
        .await
        .expect("bob logs in");
    assert_eq!(dir.mapped_roles(&bob.groups), ["admin"]);
    let carol = dir
        .authenticate("carol", &require("CUBE_TEST_LDAP_CAROL_PASSWORD"))
        .await
        .expect("carol logs in");
    assert_eq!(dir.mapped_roles(&carol.groups), ["user"]);
}

#[tokio::test]
async fn a_group_membership_change_is_seen_at_the_next_login() {
    let fx = Fixture::new();
    let person = fx.add_person(&[]).await;
    let other = fx.add_person(&[]).await;
    let group = fx.add_group(&[&other.dn]).await;
    let mapping = format!("operator={group}");
    let dir = fx.search_directory(&["--ldap-roles-mapping", &mapping]);

    let before = dir
        .authenticate(&person.uid, &person.password)
        .await
        .expect("login before");
    assert!(before.groups.is_empty(), "groups before: {:?}", before.groups);
    assert!(dir.mapped_roles(&before.groups).is_empty());

    fx.add_member(&group, &person.dn).await;
    let after = dir
        .authenticate(&person.uid, &person.password)
        .await
        .expect("login after");
    assert_eq!(after.groups, [group]);
    assert_eq!(dir.mapped_roles(&after.groups), ["operator"]);
}

#[tokio::test]
async fn groups_are_read_from_the_group_field_too() {
    // The test slapd has no memberOf overlay: seeAlso, a DN-valued attribute of inetOrgPerson, stands in for it.
    let fx = Fixture::new();
    let listed = format!("cn={},{}", unique("listed"), fx.groups());
    let person = fx.add_person(&[("seeAlso", &listed)]).await;
    let searched = fx.add_group(&[&person.dn]).await;
    let dir = fx.search_directory(&["--ldap-group-field", "seeAlso"]);
    let user = dir.authenticate(&person.uid, &person.password).await.expect("login");
    let mut expected = vec![listed, searched];
    expected.sort();
    assert_eq!(user.groups, expected);
}

#[tokio::test]
async fn a_wrong_password_and_an_unknown_user_give_the_same_error() {
    let fx = Fixture::new();
    let person = fx.add_person(&[]).await;
    let format = format!("uid=%s,{}", fx.people());
    let direct = directory(&["--ldap-server", &fx.url, "--ldap-username-format", &format]);
    let search = fx.search_directory(&[]);
    let nobody = unique("nobody");

    for (mode, dir) in [("direct bind", &direct), ("search then bind", &search)] {
        let wrong = assert_invalid_credentials(
            dir.authenticate(&person.uid, &format!("{}x", person.password)).await,
            &format!("{mode}: wrong password"),
        );
        let unknown = assert_invalid_credentials(
            dir.authenticate(&nobody, &person.password).await,
            &format!("{mode}: unknown user"),
        );
        assert_eq!(wrong.to_string(), unknown.to_string(), "{mode}");
        // Another user's password is as wrong as any.
        assert_invalid_credentials(
            dir.authenticate("alice", &require("CUBE_TEST_LDAP_BOB_PASSWORD")).await,
            &format!("{mode}: alice with bob's password"),
        );
    }
}

#[tokio::test]
async fn an_ambiguous_name_is_refused_even_with_the_right_password() {
    let fx = Fixture::new();
    // Two people share a value of the field used as the login name.
    let shared = unique("shared");
    let first = fx.add_person(&[("employeeNumber", &shared)]).await;
    let _second = fx.add_person(&[("employeeNumber", &shared)]).await;
    let dir = fx.search_directory(&["--ldap-uid-field", "employeeNumber"]);
    assert_invalid_credentials(dir.authenticate(&shared, &first.password).await, "ambiguous login name");

    let single = unique("single");
    let third = fx.add_person(&[("employeeNumber", &single)]).await;
    let user = dir
        .authenticate(&single, &third.password)
        .await
        .expect("an unambiguous name logs in");
    assert_eq!(user.dn, third.dn);
    assert_eq!(user.uid, single, "the uid field is employeeNumber");
}

#[tokio::test]
async fn an_empty_password_is_refused_without_contacting_the_server() {
    // Nothing listens there: contacting it would give Unavailable, not InvalidCredentials.
    let url = closed_port_url("ldap");
    let format = "uid=%s,ou=people,dc=cube,dc=test";
    let dir = directory(&["--ldap-server", &url, "--ldap-username-format", format]);
    assert_invalid_credentials(dir.authenticate("alice", "").await, "empty password");
    assert_invalid_credentials(dir.authenticate("", "secret").await, "empty username");

    // And against the real server, where an empty password would be an anonymous bind that succeeds.
    let fx = Fixture::new();
    let format = format!("uid=%s,{}", fx.people());
    let dir = directory(&["--ldap-server", &fx.url, "--ldap-username-format", &format]);
    assert_invalid_credentials(dir.authenticate("alice", "").await, "empty password, real server");
    assert_invalid_credentials(
        fx.search_directory(&[]).authenticate("alice", "").await,
        "empty password, search",
    );
}

#[tokio::test]
async fn filter_and_dn_metacharacters_in_the_username_match_no_one() {
    let fx = Fixture::new();
    let person = fx.add_person(&[]).await;
    let search = fx.search_directory(&[]);
    // Unescaped, each of these filters would find the person (and the password would then be right).
    let prefix = &person.uid[..person.uid.len() - 4];
    let wildcard = format!("{prefix}*");
    let injected = format!("{})(uid=*", person.uid);
    let or_injection = format!("*)(|(uid={})", person.uid);
    for name in ["*", wildcard.as_str(), injected.as_str(), or_injection.as_str()] {
        assert_invalid_credentials(
            search.authenticate(name, &person.password).await,
            &format!("search for {name:?}"),
        );
    }
    // The real name still works, so the password was right all along.
    search
        .authenticate(&person.uid, &person.password)
        .await
        .expect("the real name logs in");

    // In a DN, a comma or an equals sign must not add components.
    let format = format!("uid=%s,{}", fx.people());
    let direct = directory(&["--ldap-server", &fx.url, "--ldap-username-format", &format]);
    let dn_injection = format!("{},ou=people", person.uid);
    for name in ["*", dn_injection.as_str(), "alice+cn=x"] {
        assert_invalid_credentials(
            direct.authenticate(name, &person.password).await,
            &format!("direct bind as {name:?}"),
        );
    }
}

#[tokio::test]
async fn a_stopped_server_is_unavailable_and_named() {
    let url = closed_port_url("ldap");
    let dir = directory(&["--ldap-server", &url, "--ldap-search", "dc=cube,dc=test"]);
    let started = Instant::now();
    let message = assert_unavailable(dir.authenticate("alice", "secret").await, &url, "closed port");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(message.contains("connect"), "{message}");
}

#[tokio::test]
async fn a_server_that_never_answers_is_unavailable_after_the_timeout() {
    // The kernel completes the TCP handshake for the listener's backlog; nothing ever reads or answers.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let port = listener.local_addr().expect("local address").port();
    for scheme in ["ldap", "ldaps"] {
        let url = format!("{scheme}://127.0.0.1:{port}");
        let dir = directory(&[
            "--ldap-server",
            &url,
            "--ldap-search",
            "dc=cube,dc=test",
            "--ldap-timeout",
            "300ms",
        ]);
        let started = Instant::now();
        let message = assert_unavailable(dir.authenticate("alice", "secret").await, &url, "silent server");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300), "{scheme}: gave up after {took:?}");
        assert!(took < Duration::from_secs(3), "{scheme}: took {took:?}");
        assert!(message.contains("300ms"), "{scheme}: {message}");
    }
    drop(listener);
}

#[tokio::test]
async fn a_wrong_service_account_password_is_a_directory_error() {
    let fx = Fixture::new();
    let dir = directory(&[
        "--ldap-server",
        &fx.url,
        "--ldap-search",
        &fx.people(),
        "--ldap-bind-user",
        &fx.admin_dn,
        "--ldap-bind-password",
        "not-the-admin-password",
    ]);
    match dir
        .authenticate("alice", &require("CUBE_TEST_LDAP_ALICE_PASSWORD"))
        .await
    {
        Err(LdapError::Directory(message)) => {
            assert!(message.contains(&fx.admin_dn), "{message}");
            assert!(message.contains("invalidCredentials"), "{message}");
        }
        other => panic!("expected a directory error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_missing_search_base_is_a_directory_error() {
    let fx = Fixture::new();
    let base = format!("ou={},{}", unique("nowhere"), fx.base);
    let dir = directory(&[
        "--ldap-server",
        &fx.url,
        "--ldap-search",
        &base,
        "--ldap-bind-user",
        &fx.admin_dn,
        "--ldap-bind-password",
        &fx.admin_password,
    ]);
    match dir
        .authenticate("alice", &require("CUBE_TEST_LDAP_ALICE_PASSWORD"))
        .await
    {
        Err(LdapError::Directory(message)) => assert!(message.contains("noSuchObject"), "{message}"),
        other => panic!("expected a directory error, got {other:?}"),
    }
}

/// Logs alice in over TLS with these extra flags.
async fn tls_login(server: &str, extra: &[&str]) -> Result<LdapUser, LdapError> {
    let format = "uid=%s,ou=people,dc=cube,dc=test";
    let mut flags = vec!["--ldap-server", server, "--ldap-username-format", format];
    flags.extend_from_slice(extra);
    directory(&flags)
        .authenticate("alice", &require("CUBE_TEST_LDAP_ALICE_PASSWORD"))
        .await
}

#[tokio::test]
async fn ldaps_with_the_ca_file_works() {
    let ca = require("CUBE_TEST_LDAP_CA_FILE");
    let user = tls_login(&require("CUBE_TEST_LDAPS_URL"), &["--ldap-tls-cacertfile", &ca])
        .await
        .expect("login over ldaps");
    assert_eq!(user.email.as_deref(), Some("alice@cube.test"));
}

#[tokio::test]
async fn starttls_with_the_ca_file_works() {
    let ca = require("CUBE_TEST_LDAP_CA_FILE");
    let user = tls_login(
        &require("CUBE_TEST_LDAP_URL"),
        &["--ldap-use-tls", "--ldap-tls-cacertfile", &ca],
    )
    .await
    .expect("login over StartTLS");
    assert_eq!(user.email.as_deref(), Some("alice@cube.test"));
}

#[tokio::test]
async fn tls_without_trusting_the_ca_is_unavailable() {
    let ldaps = require("CUBE_TEST_LDAPS_URL");
    let message = assert_unavailable(tls_login(&ldaps, &[]).await, &ldaps, "ldaps, system roots");
    assert!(message.to_lowercase().contains("certificate"), "{message}");

    let ldap = require("CUBE_TEST_LDAP_URL");
    let message = assert_unavailable(
        tls_login(&ldap, &["--ldap-use-tls"]).await,
        &ldap,
        "StartTLS, system roots",
    );
    assert!(message.to_lowercase().contains("certificate"), "{message}");
}

#[tokio::test]
async fn tls_with_another_ca_is_unavailable() {
    // A CA file that holds a real CA, but not the one that signed slapd's certificate.
    let other_ca = std::env::temp_dir().join(format!("{}.pem", unique("other-ca")));
    let ca_pem = std::fs::read_to_string(require("CUBE_TEST_LDAP_CA_FILE")).expect("read the test CA");
    let system = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt").expect("read the system CAs");
    assert!(!system.contains(ca_pem.trim()), "the test CA is trusted system-wide");
    let first = system
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .expect("a system CA");
    std::fs::write(&other_ca, first).expect("write a CA file");
    let ldaps = require("CUBE_TEST_LDAPS_URL");
    let result = tls_login(
        &ldaps,
        &["--ldap-tls-cacertfile", other_ca.to_str().expect("utf-8 path")],
    )
    .await;
    let _ = std::fs::remove_file(&other_ca);
    let message = assert_unavailable(result, &ldaps, "ldaps, another CA");
    assert!(message.to_lowercase().contains("certificate"), "{message}");
}

#[tokio::test]
async fn tls_with_allow_self_signed_works_without_the_ca() {
    let user = tls_login(&require("CUBE_TEST_LDAPS_URL"), &["--ldap-allow-self-signed"])
        .await
        .expect("login over ldaps without verification");
    assert_eq!(user.uid, "alice");
    let user = tls_login(
        &require("CUBE_TEST_LDAP_URL"),
        &["--ldap-use-tls", "--ldap-allow-self-signed"],
    )
    .await
    .expect("login over StartTLS without verification");
    assert_eq!(user.uid, "alice");
}
