//! The test environment's LDAP directory, with people and groups a test adds and removes again.

use std::collections::HashSet;
use std::sync::Mutex;

use clap::Parser;
use cube_auth::ldap::{Directory, LdapArgs};
use cube_testkit::require;
use ldap3::{Ldap, LdapConnAsync, Mod};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    ldap: LdapArgs,
}

/// Parses LDAP flags as the auth binary would.
pub fn args(flags: &[&str]) -> LdapArgs {
    Cli::try_parse_from(std::iter::once("cube-auth").chain(flags.iter().copied()))
        .unwrap_or_else(|e| panic!("flags {flags:?}: {e}"))
        .ldap
}

/// Builds a directory from flags that must be valid.
pub fn directory(flags: &[&str]) -> Directory {
    Directory::from_args(&args(flags))
        .unwrap_or_else(|e| panic!("flags {flags:?}: {e}"))
        .unwrap_or_else(|| panic!("flags {flags:?} configured no directory"))
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// The test environment's directory, and the entries a test added to it.
pub struct Fixture {
    pub url: String,
    pub base: String,
    pub admin_dn: String,
    pub admin_password: String,
    /// DNs to delete when the fixture is dropped, in the order they were added.
    created: Mutex<Vec<String>>,
}

/// A person a test added.
pub struct Person {
    pub uid: String,
    pub dn: String,
    pub password: String,
    pub mail: String,
    pub given_name: String,
    pub surname: String,
}

impl Fixture {
    pub fn new() -> Self {
        Self {
            url: require("CUBE_TEST_LDAP_URL"),
            base: require("CUBE_TEST_LDAP_BASE_DN"),
            admin_dn: require("CUBE_TEST_LDAP_ADMIN_DN"),
            admin_password: require("CUBE_TEST_LDAP_ADMIN_PASSWORD"),
            created: Mutex::default(),
        }
    }

    pub fn people(&self) -> String {
        format!("ou=people,{}", self.base)
    }

    pub fn groups(&self) -> String {
        format!("ou=groups,{}", self.base)
    }

    /// Flags for search-then-bind with the admin as the service account and group search under ou=groups.
    pub fn search_flags(&self) -> Vec<String> {
        vec![
            "--ldap-server".into(),
            self.url.clone(),
            "--ldap-search".into(),
            self.people(),
            "--ldap-bind-user".into(),
            self.admin_dn.clone(),
            "--ldap-bind-password".into(),
            self.admin_password.clone(),
            "--ldap-group-search".into(),
            self.groups(),
        ]
    }

    pub fn search_directory(&self, extra: &[&str]) -> Directory {
        let mut flags = self.search_flags();
        flags.extend(extra.iter().map(|s| (*s).to_owned()));
        directory(&flags.iter().map(String::as_str).collect::<Vec<_>>())
    }

    pub async fn admin(&self) -> Ldap {
        let (conn, mut ldap) = LdapConnAsync::new(&self.url)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url));
        ldap3::drive!(conn);
        ldap.simple_bind(&self.admin_dn, &self.admin_password)
            .await
            .expect("admin bind request")
            .success()
            .expect("admin bind");
        ldap
    }

    /// Adds a person under ou=people with a unique uid, and `extra` attributes.
    pub async fn add_person(&self, extra: &[(&str, &str)]) -> Person {
        let uid = unique("t");
        let person = Person {
            dn: format!("uid={uid},{}", self.people()),
            password: uuid::Uuid::new_v4().to_string(),
            mail: format!("{uid}@cube.test"),
            given_name: format!("Given {uid}"),
            surname: format!("Sur {uid}"),
            uid,
        };
        let cn = format!("{} {}", person.given_name, person.surname);
        let mut attrs: Vec<(&str, HashSet<&str>)> = vec![
            ("objectClass", HashSet::from(["inetOrgPerson"])),
            ("uid", HashSet::from([person.uid.as_str()])),
            ("cn", HashSet::from([cn.as_str()])),
            ("sn", HashSet::from([person.surname.as_str()])),
            ("givenName", HashSet::from([person.given_name.as_str()])),
            ("mail", HashSet::from([person.mail.as_str()])),
            ("userPassword", HashSet::from([person.password.as_str()])),
        ];
        for (name, value) in extra {
            attrs.push((name, HashSet::from([*value])));
        }
        self.add(&person.dn, attrs).await;
        person
    }

    /// Adds a groupOfNames under ou=groups with a unique cn and these members; returns its DN.
    pub async fn add_group(&self, members: &[&str]) -> String {
        let cn = unique("g");
        let dn = format!("cn={cn},{}", self.groups());
        let members: HashSet<&str> = members.iter().copied().collect();
        self.add(
            &dn,
            vec![
                ("objectClass", HashSet::from(["groupOfNames"])),
                ("cn", HashSet::from([cn.as_str()])),
                ("member", members),
            ],
        )
        .await;
        dn
    }

    pub async fn add(&self, dn: &str, attrs: Vec<(&str, HashSet<&str>)>) {
        let mut ldap = self.admin().await;
        ldap.add(dn, attrs)
            .await
            .expect("add request")
            .success()
            .unwrap_or_else(|e| panic!("add {dn}: {e}"));
        let _ = ldap.unbind().await;
        self.created.lock().expect("created list").push(dn.to_owned());
    }

    pub async fn add_member(&self, group: &str, member: &str) {
        let mut ldap = self.admin().await;
        ldap.modify(group, vec![Mod::Add("member", HashSet::from([member]))])
            .await
            .expect("modify request")
            .success()
            .unwrap_or_else(|e| panic!("add member {member} to {group}: {e}"));
        let _ = ldap.unbind().await;
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let created = std::mem::take(&mut *self.created.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        if created.is_empty() {
            return;
        }
        let (url, admin_dn, admin_password) = (self.url.clone(), self.admin_dn.clone(), self.admin_password.clone());
        // Drop cannot await, and the test's runtime is the one blocked here: delete on a runtime of our own.
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for clean-up");
            runtime.block_on(async move {
                let (conn, mut ldap) = LdapConnAsync::new(&url).await.expect("connect for clean-up");
                ldap3::drive!(conn);
                ldap.simple_bind(&admin_dn, &admin_password)
                    .await
                    .expect("admin bind request")
                    .success()
                    .expect("admin bind for clean-up");
                // Groups name people as members, so delete in reverse order of creation.
                for dn in created.iter().rev() {
                    let result = ldap.delete(dn).await.expect("delete request");
                    assert!(result.rc == 0, "delete {dn}: {result}");
                }
                let _ = ldap.unbind().await;
            });
        })
        .join();
        if deleted.is_err() && !std::thread::panicking() {
            panic!("could not delete the test's entries");
        }
    }
}

impl Fixture {
    /// Adds a person under ou=people with this uid (which the test makes unique), like [`Fixture::add_person`];
    /// the entry is named by its uid, or by its cn (`cn=Given <uid> Sur <uid>`) as some directories name people.
    pub async fn add_person_with_uid(&self, uid: &str, named_by_cn: bool) -> Person {
        let dn = if named_by_cn {
            format!("cn=Given {uid} Sur {uid},{}", self.people())
        } else {
            format!("uid={uid},{}", self.people())
        };
        let person = Person {
            uid: uid.to_owned(),
            dn,
            password: uuid::Uuid::new_v4().to_string(),
            mail: format!("{}@cube.test", uid.to_lowercase()),
            given_name: format!("Given {uid}"),
            surname: format!("Sur {uid}"),
        };
        let cn = format!("{} {}", person.given_name, person.surname);
        let attrs: Vec<(&str, HashSet<&str>)> = vec![
            ("objectClass", HashSet::from(["inetOrgPerson"])),
            ("uid", HashSet::from([person.uid.as_str()])),
            ("cn", HashSet::from([cn.as_str()])),
            ("sn", HashSet::from([person.surname.as_str()])),
            ("givenName", HashSet::from([person.given_name.as_str()])),
            ("mail", HashSet::from([person.mail.as_str()])),
            ("userPassword", HashSet::from([person.password.as_str()])),
        ];
        self.add(&person.dn, attrs).await;
        person
    }

    /// Removes a member from a group.
    pub async fn remove_member(&self, group: &str, member: &str) {
        let mut ldap = self.admin().await;
        ldap.modify(group, vec![Mod::Delete("member", HashSet::from([member]))])
            .await
            .expect("modify request")
            .success()
            .unwrap_or_else(|e| panic!("remove member {member} from {group}: {e}"));
        let _ = ldap.unbind().await;
    }

    /// Deletes an entry the test added (a person no group lists any more, or a group).
    pub async fn delete(&self, dn: &str) {
        let mut ldap = self.admin().await;
        ldap.delete(dn)
            .await
            .expect("delete request")
            .success()
            .unwrap_or_else(|e| panic!("delete {dn}: {e}"));
        let _ = ldap.unbind().await;
        self.created
            .lock()
            .expect("created list")
            .retain(|created| created != dn);
    }
}
