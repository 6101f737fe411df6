//! Checks the OpenLDAP server of the test environment: its admin and seeded users bind, and its directory holds
//! the people and groups of `scripts/test-env/seed.ldif`.

use cube_testkit::require;
use ldap3::{Ldap, LdapConnAsync, Scope, SearchEntry};

/// The `invalidCredentials` result code of RFC 4511.
const INVALID_CREDENTIALS: u32 = 49;

struct Directory {
    url: String,
    base_dn: String,
}

impl Directory {
    fn from_env() -> Self {
        Self {
            url: require("CUBE_TEST_LDAP_URL"),
            base_dn: require("CUBE_TEST_LDAP_BASE_DN"),
        }
    }

    fn person_dn(&self, uid: &str) -> String {
        format!("uid={uid},ou=people,{}", self.base_dn)
    }

    async fn connect(&self) -> Ldap {
        let (conn, ldap) = LdapConnAsync::new(&self.url)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url));
        ldap3::drive!(conn);
        ldap
    }

    /// Binds as `dn` on a new connection and returns the server's result code.
    async fn bind_rc(&self, dn: &str, password: &str) -> u32 {
        let mut ldap = self.connect().await;
        let result = ldap.simple_bind(dn, password).await.expect("simple bind request");
        let _ = ldap.unbind().await;
        result.rc
    }

    /// Searches as the admin and returns the entries found.
    async fn search(&self, base: &str, filter: &str, attrs: &[&str]) -> Vec<SearchEntry> {
        let admin = (
            require("CUBE_TEST_LDAP_ADMIN_DN"),
            require("CUBE_TEST_LDAP_ADMIN_PASSWORD"),
        );
        self.search_as(&admin, base, filter, attrs).await
    }

    /// Searches as the user `(dn, password)` and returns the entries found.
    async fn search_as(
        &self,
        (dn, password): &(String, String),
        base: &str,
        filter: &str,
        attrs: &[&str],
    ) -> Vec<SearchEntry> {
        let mut ldap = self.connect().await;
        ldap.simple_bind(dn, password)
            .await
            .expect("bind request")
            .success()
            .unwrap_or_else(|e| panic!("bind as {dn}: {e}"));
        let (entries, _) = ldap
            .search(base, Scope::Subtree, filter, attrs.to_vec())
            .await
            .expect("search request")
            .success()
            .unwrap_or_else(|e| panic!("search {filter} under {base}: {e}"));
        let _ = ldap.unbind().await;
        entries.into_iter().map(SearchEntry::construct).collect()
    }
}

#[tokio::test]
async fn admin_binds() {
    let dir = Directory::from_env();
    let rc = dir
        .bind_rc(
            &require("CUBE_TEST_LDAP_ADMIN_DN"),
            &require("CUBE_TEST_LDAP_ADMIN_PASSWORD"),
        )
        .await;
    assert_eq!(rc, 0, "admin bind result code");
}

#[tokio::test]
async fn alice_binds_with_her_password() {
    let dir = Directory::from_env();
    let rc = dir
        .bind_rc(&dir.person_dn("alice"), &require("CUBE_TEST_LDAP_ALICE_PASSWORD"))
        .await;
    assert_eq!(rc, 0, "alice bind result code");
}

#[tokio::test]
async fn wrong_password_is_invalid_credentials() {
    let dir = Directory::from_env();
    let wrong = format!("{}-wrong", require("CUBE_TEST_LDAP_ALICE_PASSWORD"));
    let rc = dir.bind_rc(&dir.person_dn("alice"), &wrong).await;
    assert_eq!(rc, INVALID_CREDENTIALS, "alice bind with a wrong password");
    // Another user's password is wrong too.
    let rc = dir
        .bind_rc(&dir.person_dn("alice"), &require("CUBE_TEST_LDAP_BOB_PASSWORD"))
        .await;
    assert_eq!(rc, INVALID_CREDENTIALS, "alice bind with bob's password");
}

#[tokio::test]
async fn finds_alice_and_her_mail() {
    let dir = Directory::from_env();
    let people = format!("ou=people,{}", dir.base_dn);
    let found = dir.search(&people, "(uid=alice)", &["uid", "cn", "mail"]).await;
    assert_eq!(found.len(), 1, "entries for (uid=alice): {found:?}");
    let alice = &found[0];
    assert_eq!(alice.dn, dir.person_dn("alice"));
    assert_eq!(
        alice.attrs.get("mail"),
        Some(&vec!["alice@cube.test".to_owned()]),
        "alice's mail"
    );

    // Another user reads alice's entry, but not her password.
    let bob = (dir.person_dn("bob"), require("CUBE_TEST_LDAP_BOB_PASSWORD"));
    let found = dir.search_as(&bob, &people, "(uid=alice)", &["*"]).await;
    assert_eq!(found.len(), 1, "entries bob finds for (uid=alice): {found:?}");
    assert_eq!(
        found[0].attrs.get("cn"),
        Some(&vec!["Alice Liddell".to_owned()]),
        "alice's cn, read by bob"
    );
    assert!(
        !found[0].attrs.contains_key("userPassword"),
        "bob must not read alice's password: {:?}",
        found[0]
    );

    let nobody = dir.search(&people, "(uid=mallory)", &["uid"]).await;
    assert!(nobody.is_empty(), "entries for (uid=mallory): {nobody:?}");
}

#[tokio::test]
async fn finds_the_groups_alice_is_a_member_of() {
    let dir = Directory::from_env();
    let groups = format!("ou=groups,{}", dir.base_dn);
    let filter = format!("(&(objectClass=groupOfNames)(member={}))", dir.person_dn("alice"));
    let found = dir.search(&groups, &filter, &["cn"]).await;
    let mut names: Vec<&str> = found
        .iter()
        .flat_map(|g| g.attrs.get("cn").into_iter().flatten())
        .map(String::as_str)
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["ml-team"], "groups of alice");

    let filter = format!("(&(objectClass=groupOfNames)(member={}))", dir.person_dn("bob"));
    let found = dir.search(&groups, &filter, &["cn"]).await;
    let names: Vec<&str> = found
        .iter()
        .flat_map(|g| g.attrs.get("cn").into_iter().flatten())
        .map(String::as_str)
        .collect();
    assert_eq!(names, ["admins"], "groups of bob");
}
