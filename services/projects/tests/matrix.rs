//! The isolation matrix: every projects RPC called by six callers (anonymous, a non-member, a viewer, a
//! developer, the owner, an admin) against a target project and against a project that does not exist, each
//! answer checked against the table below (gRPC code and `ErrorInfo` reason); then the rows each caller sees.
//! No answer a non-admin gets shows anything of a project they are not a member of, and to a non-member the
//! target looks exactly like a project that does not exist.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cube_proto::cube::projects::v1::member::Subject;
use cube_proto::cube::projects::v1::{
    CreateMemberRequest, CreateProjectRequest, DeleteMemberRequest, DeleteProjectRequest, GetMembershipRequest,
    GetProjectRequest, GetQuotaUsageRequest, ListMembersRequest, ListProjectsRequest, Member, Membership, Project,
    ProjectType, Quota, Role, Settings, UndeleteProjectRequest, UpdateMemberRequest, UpdateProjectRequest,
};
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

use support::{Platform, authed, start};

cube_testkit::on_every_backend!(every_rpc_answers_every_caller_as_the_table_says);

/// Who calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Who {
    /// No `authorization` metadata.
    Anonymous,
    /// `stranger`: not a member of the target; owns the other project.
    NonMember,
    /// `viewer`: a viewer of the target.
    Viewer,
    /// `developer`: a developer of the target.
    Developer,
    /// `owner`: the owner of the target (its creator).
    Owner,
    /// The admin: a member of neither.
    Admin,
}

const EVERYONE: [Who; 6] = [
    Who::Anonymous,
    Who::NonMember,
    Who::Viewer,
    Who::Developer,
    Who::Owner,
    Who::Admin,
];

impl Who {
    fn describe(self) -> &'static str {
        match self {
            Who::Anonymous => "anonymous",
            Who::NonMember => "non-member",
            Who::Viewer => "viewer",
            Who::Developer => "developer",
            Who::Owner => "owner",
            Who::Admin => "admin",
        }
    }

    /// The username (`anonymous` for the anonymous caller), also used in the names of what a call creates.
    fn slug(self) -> &'static str {
        match self {
            Who::Anonymous => "anonymous",
            Who::NonMember => "stranger",
            Who::Viewer => "viewer",
            Who::Developer => "developer",
            Who::Owner => "owner",
            Who::Admin => "admin",
        }
    }
}

/// What a row's request is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Place {
    /// The target project (or a fresh copy of it, for deletes and undeletes).
    Target,
    /// A project that does not exist.
    Missing,
}

/// One request of the table; [`call`] builds and sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Case {
    CreateProject,
    GetProject,
    ListProjects,
    ListMyProjects,
    UpdateProject,
    DeleteProject,
    UndeleteProject,
    UndeleteLiveProject,
    CreateMember,
    ListMembers,
    UpdateMember,
    DeleteMember,
    GetOwnMembership,
    GetPeerMembership,
    GetQuotaUsage,
}

/// A row: the RPC (as the proto names it), the request, and the code each of [`EVERYONE`] gets (anonymous,
/// non-member, viewer, developer, owner, admin).
struct Row {
    rpc: &'static str,
    request: &'static str,
    case: Case,
    place: Place,
    expect: [Code; 6],
}

const OK: Code = Code::Ok;
const UNAUTHENTICATED: Code = Code::Unauthenticated;
const DENIED: Code = Code::PermissionDenied;
const NOT_FOUND: Code = Code::NotFound;
const PRECONDITION: Code = Code::FailedPrecondition;

/// Any signed-in user.
const USERS: [Code; 6] = [UNAUTHENTICATED, OK, OK, OK, OK, OK];
/// Members of the project and admins.
const MEMBERS: [Code; 6] = [UNAUTHENTICATED, NOT_FOUND, OK, OK, OK, OK];
/// Owners of the project and admins; other members are refused, non-members do not see the project.
const OWNERS: [Code; 6] = [UNAUTHENTICATED, NOT_FOUND, DENIED, DENIED, OK, OK];
/// A project that does not exist: NOT_FOUND to every signed-in caller, admins included.
const NOWHERE: [Code; 6] = [UNAUTHENTICATED, NOT_FOUND, NOT_FOUND, NOT_FOUND, NOT_FOUND, NOT_FOUND];

const fn row(rpc: &'static str, request: &'static str, case: Case, place: Place, expect: [Code; 6]) -> Row {
    Row {
        rpc,
        request,
        case,
        place,
        expect,
    }
}

/// The matrix. `<target>` is the target project, `<missing>` a project that does not exist, `<caller>` the
/// caller's username; see [`call`] for each request in full. Every change a row makes is undone after its cell
/// (or made on a fresh copy), so the rows do not depend on each other's order.
#[rustfmt::skip]
const TABLE: &[Row] = &[
    row("CreateProject",   "iso-made-by-<caller>, type ORG",          Case::CreateProject,       Place::Target,  USERS),
    row("GetProject",      "projects/<target>",                       Case::GetProject,          Place::Target,  MEMBERS),
    row("GetProject",      "projects/<missing>",                      Case::GetProject,          Place::Missing, NOWHERE),
    row("ListProjects",    "{}",                                      Case::ListProjects,        Place::Target,  USERS),
    row("ListProjects",    "filter mine = true",                      Case::ListMyProjects,      Place::Target,  USERS),
    row("UpdateProject",   "<target> description",                    Case::UpdateProject,       Place::Target,  OWNERS),
    row("UpdateProject",   "<missing> description",                   Case::UpdateProject,       Place::Missing, NOWHERE),
    row("DeleteProject",   "a fresh copy of <target>",                Case::DeleteProject,       Place::Target,  OWNERS),
    row("DeleteProject",   "projects/<missing>",                      Case::DeleteProject,       Place::Missing, NOWHERE),
    row("UndeleteProject", "a deleted fresh copy of <target>",        Case::UndeleteProject,     Place::Target,  OWNERS),
    row("UndeleteProject", "projects/<missing>",                      Case::UndeleteProject,     Place::Missing, NOWHERE),
    row("UndeleteProject", "<target>, not deleted",                   Case::UndeleteLiveProject, Place::Target,
        [UNAUTHENTICATED, NOT_FOUND, DENIED, DENIED, PRECONDITION, PRECONDITION]),
    row("CreateMember",    "users/added-by-<caller> in <target>",     Case::CreateMember,        Place::Target,  OWNERS),
    row("CreateMember",    "users/added-by-<caller> in <missing>",    Case::CreateMember,        Place::Missing, NOWHERE),
    row("ListMembers",     "<target>",                                Case::ListMembers,         Place::Target,  MEMBERS),
    row("ListMembers",     "<missing>",                               Case::ListMembers,         Place::Missing, NOWHERE),
    row("UpdateMember",    "a fresh viewer of <target> to developer", Case::UpdateMember,        Place::Target,  OWNERS),
    row("UpdateMember",    "<missing>/members/u-tmp-<caller>",        Case::UpdateMember,        Place::Missing, NOWHERE),
    row("DeleteMember",    "a fresh viewer of <target>",              Case::DeleteMember,        Place::Target,  OWNERS),
    row("DeleteMember",    "<missing>/members/u-gone-<caller>",       Case::DeleteMember,        Place::Missing, NOWHERE),
    row("GetMembership",   "users/me in <target>",                    Case::GetOwnMembership,    Place::Target,  MEMBERS),
    row("GetMembership",   "users/me in <missing>",                   Case::GetOwnMembership,    Place::Missing, NOWHERE),
    row("GetMembership",   "users/peer in <target>",                  Case::GetPeerMembership,   Place::Target,
        [UNAUTHENTICATED, NOT_FOUND, NOT_FOUND, NOT_FOUND, OK, OK]),
    row("GetMembership",   "users/peer in <missing>",                 Case::GetPeerMembership,   Place::Missing, NOWHERE),
    row("GetQuotaUsage",   "<target>",                                Case::GetQuotaUsage,       Place::Target,  MEMBERS),
    row("GetQuotaUsage",   "<missing>",                               Case::GetQuotaUsage,       Place::Missing, NOWHERE),
];

/// The target project: owned by `owner`, with `viewer`, `developer`, `peer` and an LDAP group as members.
const TARGET: &str = "iso-target";
/// The other project: owned by `stranger`, the non-member of the target.
const OTHER: &str = "iso-other";
/// A project of the admin's own.
const ADMINS: &str = "iso-admins";
/// A project that does not exist.
const MISSING: &str = "no-such-project";
/// A member of the target (developer) who never calls: whom `GetMembership` asks about.
const PEER: &str = "peer";
/// An LDAP group that is a viewer of the target.
const GROUP_DN: &str = "cn=iso-ml-team,ou=groups,dc=example,dc=com";
const TARGET_DESCRIPTION: &str = "target secret description zq";

/// The running platform, the callers' tokens and the fixture projects as created.
struct Fixture {
    platform: Platform,
    admin: String,
    stranger: String,
    viewer: String,
    developer: String,
    owner: String,
    target: Project,
    other: Project,
    /// Numbers the fresh copies of the target.
    copies: AtomicUsize,
}

impl Fixture {
    fn token(&self, who: Who) -> Option<&str> {
        match who {
            Who::Anonymous => None,
            Who::NonMember => Some(&self.stranger),
            Who::Viewer => Some(&self.viewer),
            Who::Developer => Some(&self.developer),
            Who::Owner => Some(&self.owner),
            Who::Admin => Some(&self.admin),
        }
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

/// A failed setup step, as the status of the cell that needed it: UNKNOWN, which no row expects, so that the
/// matrix goes on and reports it.
fn setup_failed(what: &str) -> impl FnOnce(Status) -> Status + '_ {
    move |status| Status::unknown(format!("setting up {what}: {:?} {}", status.code(), status.message()))
}

fn mask(path: &str) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask {
        paths: vec![path.into()],
    })
}

fn user_member(username: &str, role: Role) -> Member {
    Member {
        subject: Some(Subject::User(format!("users/{username}"))),
        role: role as i32,
        ..Member::default()
    }
}

async fn create_project(platform: &Platform, token: &str, id: &str, project: Project) -> Result<Project, Status> {
    platform
        .projects()
        .create_project(authed(
            CreateProjectRequest {
                project: Some(project),
                project_id: id.into(),
            },
            token,
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn add_member(platform: &Platform, token: &str, project: &str, member: Member) -> Result<Member, Status> {
    platform
        .projects()
        .create_member(authed(
            CreateMemberRequest {
                parent: format!("projects/{project}"),
                member: Some(member),
            },
            token,
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn get_project(platform: &Platform, token: &str, id: &str) -> Result<Project, Status> {
    platform
        .projects()
        .get_project(authed(
            GetProjectRequest {
                name: format!("projects/{id}"),
            },
            token,
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn delete_project(platform: &Platform, token: &str, id: &str) -> Result<Project, Status> {
    platform
        .projects()
        .delete_project(authed(
            DeleteProjectRequest {
                name: format!("projects/{id}"),
                etag: String::new(),
            },
            token,
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn delete_member(platform: &Platform, token: &str, project: &str, member_id: &str) -> Result<(), Status> {
    platform
        .projects()
        .delete_member(authed(
            DeleteMemberRequest {
                name: format!("projects/{project}/members/{member_id}"),
            },
            token,
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn members(platform: &Platform, token: &str, project: &str) -> Result<Vec<Member>, Status> {
    platform
        .projects()
        .list_members(authed(
            ListMembersRequest {
                parent: format!("projects/{project}"),
                page_size: 1000,
                page_token: String::new(),
            },
            token,
        ))
        .await
        .map(|response| response.into_inner().members)
}

async fn list_projects(platform: &Platform, token: &str, filter: &str) -> Result<Vec<Project>, Status> {
    platform
        .projects()
        .list_projects(authed(
            ListProjectsRequest {
                page_size: 1000,
                page_token: String::new(),
                filter: filter.into(),
            },
            token,
        ))
        .await
        .map(|response| response.into_inner().projects)
}

async fn membership(platform: &Platform, token: &str, project: &str, user: &str) -> Result<Membership, Status> {
    platform
        .projects()
        .get_membership(authed(
            GetMembershipRequest {
                project: format!("projects/{project}"),
                user: user.into(),
            },
            token,
        ))
        .await
        .map(tonic::Response::into_inner)
}

/// Whether the project is live, as the admin sees it.
async fn live(fx: &Fixture, id: &str) -> Result<bool, Status> {
    match get_project(&fx.platform, &fx.admin, id).await {
        Ok(_) => Ok(true),
        Err(status) if status.code() == NOT_FOUND => Ok(false),
        Err(status) => Err(status),
    }
}

/// The role of `member_id` in the target, as the admin sees it; `None` when it is not a member.
async fn target_role(fx: &Fixture, member_id: &str) -> Result<Option<Role>, Status> {
    let name = format!("projects/{TARGET}/members/{member_id}");
    Ok(members(&fx.platform, &fx.admin, TARGET)
        .await?
        .iter()
        .find(|member| member.name == name)
        .map(Member::role))
}

/// Checks that a cell's change happened exactly when its call succeeded; `changed` is what the admin sees after.
fn changed_iff_ok(
    result: &Result<String, Status>,
    changed: Result<bool, Status>,
    what: &str,
    problems: &mut Vec<String>,
) {
    match (result, changed) {
        (Ok(_), Ok(true)) | (Err(_), Ok(false)) => {}
        (Ok(_), Ok(false)) => problems.push(format!("answered OK, but {what} did not happen")),
        (Err(status), Ok(true)) => problems.push(format!("refused ({:?}), yet {what} happened", status.code())),
        (_, Err(status)) => problems.push(format!(
            "checking whether {what} happened: {:?} {}",
            status.code(),
            status.message()
        )),
    }
}

/// Records a failed clean-up step.
fn cleanup(result: Result<impl Sized, Status>, what: &str, problems: &mut Vec<String>) {
    if let Err(status) = result {
        problems.push(format!(
            "cleaning up ({what}): {:?} {}",
            status.code(),
            status.message()
        ));
    }
}

/// A fresh copy of the target's membership: a project owned by `owner` with `viewer` and `developer`.
async fn copy_of_target(fx: &Fixture) -> Result<String, Status> {
    let id = format!("iso-copy-{}", fx.copies.fetch_add(1, Ordering::Relaxed));
    let project = Project {
        display_name: format!("Copy {id}"),
        r#type: ProjectType::Org as i32,
        ..Project::default()
    };
    create_project(&fx.platform, &fx.owner, &id, project)
        .await
        .map_err(setup_failed(&id))?;
    for (username, role) in [("viewer", Role::Viewer), ("developer", Role::Developer)] {
        add_member(&fx.platform, &fx.owner, &id, user_member(username, role))
            .await
            .map_err(setup_failed(&id))?;
    }
    Ok(id)
}

/// Sends `case` as `who` about `place`; sets `project` to the id of the project the request named, and adds to
/// `problems` what went wrong around the call (its effect, the clean-up).
async fn call(
    fx: &Fixture,
    case: Case,
    who: Who,
    place: Place,
    project: &mut String,
    problems: &mut Vec<String>,
) -> Result<String, Status> {
    let platform = &fx.platform;
    let admin = fx.admin.as_str();
    let token = fx.token(who);
    let slug = who.slug();
    let target = place == Place::Target;
    *project = if target { TARGET } else { MISSING }.to_owned();
    let name = format!("projects/{project}");
    match case {
        Case::CreateProject => {
            let id = format!("iso-made-by-{slug}");
            project.clone_from(&id);
            let result = show(
                platform
                    .projects()
                    .create_project(with(
                        CreateProjectRequest {
                            project: Some(Project {
                                display_name: format!("Made by {slug}"),
                                description: "made in the isolation matrix".into(),
                                r#type: ProjectType::Org as i32,
                                ..Project::default()
                            }),
                            project_id: id.clone(),
                        },
                        token,
                    ))
                    .await,
            );
            let created = live(fx, &id).await;
            let made = matches!(created, Ok(true));
            changed_iff_ok(&result, created, "the project's creation", problems);
            if made {
                // The creator is its only member, as owner.
                match members(platform, admin, &id).await {
                    Ok(list) => {
                        let got: Vec<(String, Role)> = list.iter().map(|m| (subject(m), m.role())).collect();
                        if got != [(format!("users/{slug}"), Role::Owner)] {
                            problems.push(format!(
                                "the new project's members are {got:?}, not its creator as owner"
                            ));
                        }
                    }
                    Err(status) => problems.push(format!("listing the new project's members: {status:?}")),
                }
                cleanup(delete_project(platform, admin, &id).await, "deleting it", problems);
            }
            result
        }
        Case::GetProject => show(
            platform
                .projects()
                .get_project(with(GetProjectRequest { name }, token))
                .await,
        ),
        Case::ListProjects | Case::ListMyProjects => {
            let filter = if case == Case::ListMyProjects {
                "mine = true"
            } else {
                ""
            };
            show(
                platform
                    .projects()
                    .list_projects(with(
                        ListProjectsRequest {
                            page_size: 1000,
                            page_token: String::new(),
                            filter: filter.into(),
                        },
                        token,
                    ))
                    .await,
            )
        }
        Case::UpdateProject => {
            let description = format!("described by {slug}");
            let result = show(
                platform
                    .projects()
                    .update_project(with(
                        UpdateProjectRequest {
                            project: Some(Project {
                                name,
                                description: description.clone(),
                                ..Project::default()
                            }),
                            update_mask: mask("description"),
                        },
                        token,
                    ))
                    .await,
            );
            if target {
                let now = get_project(platform, admin, TARGET).await;
                let changed = now
                    .as_ref()
                    .map(|now| now.description != TARGET_DESCRIPTION)
                    .map_err(Clone::clone);
                if let Ok(now) = &now
                    && now.description != TARGET_DESCRIPTION
                {
                    if now.description != description {
                        problems.push(format!("the description became {:?}", now.description));
                    }
                    let restored = platform
                        .projects()
                        .update_project(authed(
                            UpdateProjectRequest {
                                project: Some(Project {
                                    name: format!("projects/{TARGET}"),
                                    description: TARGET_DESCRIPTION.into(),
                                    ..Project::default()
                                }),
                                update_mask: mask("description"),
                            },
                            admin,
                        ))
                        .await;
                    cleanup(restored, "restoring the description", problems);
                }
                changed_iff_ok(&result, changed, "the description's change", problems);
            }
            result
        }
        Case::DeleteProject => {
            if target {
                *project = copy_of_target(fx).await?;
            }
            let result = show(
                platform
                    .projects()
                    .delete_project(with(
                        DeleteProjectRequest {
                            name: format!("projects/{project}"),
                            etag: String::new(),
                        },
                        token,
                    ))
                    .await,
            );
            if target {
                let still = live(fx, project).await;
                let left = matches!(still, Ok(true));
                changed_iff_ok(&result, still.map(|live| !live), "the deletion", problems);
                if left {
                    cleanup(
                        delete_project(platform, admin, project).await,
                        "deleting the copy",
                        problems,
                    );
                }
            }
            result
        }
        Case::UndeleteProject => {
            if target {
                *project = copy_of_target(fx).await?;
                delete_project(platform, &fx.owner, project)
                    .await
                    .map_err(setup_failed("deleting the copy"))?;
            }
            let result = show(
                platform
                    .projects()
                    .undelete_project(with(
                        UndeleteProjectRequest {
                            name: format!("projects/{project}"),
                        },
                        token,
                    ))
                    .await,
            );
            if target {
                let back = live(fx, project).await;
                let restored = matches!(back, Ok(true));
                changed_iff_ok(&result, back, "the restoration", problems);
                if restored {
                    cleanup(
                        delete_project(platform, admin, project).await,
                        "deleting the copy again",
                        problems,
                    );
                }
            }
            result
        }
        Case::UndeleteLiveProject => show(
            platform
                .projects()
                .undelete_project(with(UndeleteProjectRequest { name }, token))
                .await,
        ),
        Case::CreateMember => {
            let added = format!("added-by-{slug}");
            let result = show(
                platform
                    .projects()
                    .create_member(with(
                        CreateMemberRequest {
                            parent: name,
                            member: Some(user_member(&added, Role::Viewer)),
                        },
                        token,
                    ))
                    .await,
            );
            if target {
                let member_id = format!("u-{added}");
                let role = target_role(fx, &member_id).await;
                let present = matches!(role, Ok(Some(_)));
                changed_iff_ok(&result, role.map(|role| role.is_some()), "the addition", problems);
                if present {
                    cleanup(
                        delete_member(platform, admin, TARGET, &member_id).await,
                        "removing the member",
                        problems,
                    );
                }
            }
            result
        }
        Case::ListMembers => show(
            platform
                .projects()
                .list_members(with(
                    ListMembersRequest {
                        parent: name,
                        page_size: 1000,
                        page_token: String::new(),
                    },
                    token,
                ))
                .await,
        ),
        Case::UpdateMember => {
            let member_id = format!("u-tmp-{slug}");
            if target {
                add_member(
                    platform,
                    admin,
                    TARGET,
                    user_member(&format!("tmp-{slug}"), Role::Viewer),
                )
                .await
                .map_err(setup_failed(&member_id))?;
            }
            let result = show(
                platform
                    .projects()
                    .update_member(with(
                        UpdateMemberRequest {
                            member: Some(Member {
                                name: format!("{name}/members/{member_id}"),
                                role: Role::Developer as i32,
                                ..Member::default()
                            }),
                            update_mask: mask("role"),
                        },
                        token,
                    ))
                    .await,
            );
            if target {
                let role = target_role(fx, &member_id).await;
                let changed = match role {
                    Ok(Some(Role::Developer)) => Ok(true),
                    Ok(Some(Role::Viewer)) => Ok(false),
                    Ok(other) => Err(Status::unknown(format!("the member's role is {other:?}"))),
                    Err(status) => Err(status),
                };
                changed_iff_ok(&result, changed, "the role change", problems);
                cleanup(
                    delete_member(platform, admin, TARGET, &member_id).await,
                    "removing the member",
                    problems,
                );
            }
            result
        }
        Case::DeleteMember => {
            let member_id = format!("u-gone-{slug}");
            if target {
                add_member(
                    platform,
                    admin,
                    TARGET,
                    user_member(&format!("gone-{slug}"), Role::Viewer),
                )
                .await
                .map_err(setup_failed(&member_id))?;
            }
            let result = show(
                platform
                    .projects()
                    .delete_member(with(
                        DeleteMemberRequest {
                            name: format!("{name}/members/{member_id}"),
                        },
                        token,
                    ))
                    .await,
            );
            if target {
                let role = target_role(fx, &member_id).await;
                let left = matches!(role, Ok(Some(_)));
                changed_iff_ok(&result, role.map(|role| role.is_none()), "the removal", problems);
                if left {
                    cleanup(
                        delete_member(platform, admin, TARGET, &member_id).await,
                        "removing the member",
                        problems,
                    );
                }
            }
            result
        }
        Case::GetOwnMembership | Case::GetPeerMembership => {
            let user = if case == Case::GetOwnMembership {
                "users/me".to_owned()
            } else {
                format!("users/{PEER}")
            };
            show(
                platform
                    .projects()
                    .get_membership(with(GetMembershipRequest { project: name, user }, token))
                    .await,
            )
        }
        Case::GetQuotaUsage => show(
            platform
                .projects()
                .get_quota_usage(with(GetQuotaUsageRequest { name }, token))
                .await,
        ),
    }
}

/// A member's subject as text: `users/{username}` or `group {dn}`.
fn subject(member: &Member) -> String {
    match &member.subject {
        Some(Subject::User(user)) => user.clone(),
        Some(Subject::Group(dn)) => format!("group {dn}"),
        None => "nobody".into(),
    }
}

/// What shows a project in an answer: its id, display name, description and distinctive settings.
fn needles(project: &Project) -> Vec<String> {
    let settings = project.settings.clone().unwrap_or_default();
    let mut needles = vec![
        project.name.trim_start_matches("projects/").to_owned(),
        project.display_name.clone(),
        project.description.clone(),
        settings.resource_group,
        settings.volume_mounts,
        settings.service_external_ip,
    ];
    needles.extend(settings.node_selector.into_values());
    assert!(
        needles.iter().all(|needle| needle.len() >= 8),
        "every needle is distinctive: {needles:?}"
    );
    needles
}

/// The answer, comparable between two projects: `project` replaced by `<project>`, the `ErrorInfo` included.
fn normalized(project: &str, result: &Result<String, Status>) -> String {
    let text = match result {
        Ok(answer) => format!("OK {answer}"),
        Err(status) => {
            let details = status.get_error_details();
            let info = details.error_info().map(|info| {
                let metadata: BTreeMap<&String, &String> = info.metadata.iter().collect();
                format!("{} {} {metadata:?}", info.reason, info.domain)
            });
            format!("{:?} {:?} {info:?}", status.code(), status.message())
        }
    };
    text.replace(project, "<project>")
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

/// The RPCs `projects.proto` declares.
fn rpcs_in_proto() -> BTreeSet<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../proto/cube/projects/v1/projects.proto"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|error| panic!("reading {path}: {error}"));
    text.lines()
        .map(str::trim)
        .filter_map(|line| line.strip_prefix("rpc "))
        .map(|rest| rest.split('(').next().unwrap_or_default().trim().to_owned())
        .collect()
}

/// Makes the users, the target, the other project and the admin's own, and waits until every user has joined
/// `public`.
async fn fixture(url: &str) -> Fixture {
    let platform = start(url).await;
    let admin = platform.admin().await;
    let (owner, viewer, developer, stranger, _peer) = tokio::join!(
        platform.user(&admin, "owner"),
        platform.user(&admin, "viewer"),
        platform.user(&admin, "developer"),
        platform.user(&admin, "stranger"),
        platform.user(&admin, PEER),
    );
    let target = create_project(
        &platform,
        &owner,
        TARGET,
        Project {
            display_name: "Target Secret Display".into(),
            description: TARGET_DESCRIPTION.into(),
            r#type: ProjectType::Org as i32,
            settings: Some(Settings {
                cluster: "gpu".into(),
                resource_group: "target-rg-zq".into(),
                node_selector: [("disk".to_owned(), "target-ssd-zq".to_owned())].into(),
                volume_mounts: "target-data-zq(pvc):/mnt/target-zq".into(),
                service_external_ip: "10.0.0.5|target-zq.example.com".into(),
                ..Settings::default()
            }),
            quota: Some(Quota {
                cpu: Some(12.5),
                ..Quota::default()
            }),
            ..Project::default()
        },
    )
    .await
    .expect("creating the target");
    for member in [
        user_member("viewer", Role::Viewer),
        user_member("developer", Role::Developer),
        user_member(PEER, Role::Developer),
        Member {
            subject: Some(Subject::Group(GROUP_DN.into())),
            role: Role::Viewer as i32,
            ..Member::default()
        },
    ] {
        add_member(&platform, &owner, TARGET, member)
            .await
            .expect("adding a member to the target");
    }
    let other = create_project(
        &platform,
        &stranger,
        OTHER,
        Project {
            display_name: "Other Secret Display".into(),
            description: "other secret description zq".into(),
            r#type: ProjectType::Org as i32,
            settings: Some(Settings {
                cluster: "dev".into(),
                resource_group: "other-rg-zq".into(),
                node_selector: [("disk".to_owned(), "other-nvme-zq".to_owned())].into(),
                volume_mounts: "other-data-zq(pvc):/mnt/other-zq".into(),
                service_external_ip: "10.0.0.6|other-zq.example.com".into(),
                ..Settings::default()
            }),
            ..Project::default()
        },
    )
    .await
    .expect("creating the other project");
    create_project(
        &platform,
        &admin,
        ADMINS,
        Project {
            display_name: "The admin's own".into(),
            r#type: ProjectType::Org as i32,
            ..Project::default()
        },
    )
    .await
    .expect("creating the admin's project");
    {
        let (platform, admin) = (&platform, &admin);
        cube_testkit::eventually(
            "every user joining public",
            Duration::from_secs(15),
            move || async move {
                let joined: BTreeSet<String> = members(platform, admin, "public")
                    .await
                    .ok()?
                    .iter()
                    .map(subject)
                    .collect();
                ["owner", "viewer", "developer", "stranger", PEER]
                    .iter()
                    .all(|username| joined.contains(&format!("users/{username}")))
                    .then_some(())
            },
        )
        .await;
    }
    Fixture {
        platform,
        admin,
        stranger,
        viewer,
        developer,
        owner,
        target,
        other,
        copies: AtomicUsize::new(0),
    }
}

async fn every_rpc_answers_every_caller_as_the_table_says(url: &str) {
    // The table covers every RPC of the proto.
    let declared = rpcs_in_proto();
    let covered: BTreeSet<String> = TABLE.iter().map(|row| row.rpc.to_owned()).collect();
    assert_eq!(
        covered, declared,
        "the table must cover exactly the RPCs projects.proto declares"
    );
    assert_eq!(declared.len(), 12, "{declared:?}");
    // Every row about a missing project has its row about the target, and a non-member gets the same code.
    for missing in TABLE.iter().filter(|row| row.place == Place::Missing) {
        let twin = TABLE
            .iter()
            .find(|row| row.case == missing.case && row.place == Place::Target)
            .unwrap_or_else(|| panic!("{:?} about a missing project has no row about the target", missing.case));
        assert_eq!(twin.expect[1], missing.expect[1], "{:?}", missing.case);
    }

    let started = std::time::Instant::now();
    let fx = fixture(url).await;
    let mut failures = Vec::new();
    // Every OK answer, by cell and caller, for the leak check.
    let mut answers: Vec<(String, Who, String)> = Vec::new();
    // The non-member's answers, comparable between the target and a missing project.
    let mut non_member: BTreeMap<(Case, Place), String> = BTreeMap::new();
    for row in TABLE {
        for (who, expected) in EVERYONE.into_iter().zip(row.expect) {
            let cell = format!("{:<16} {:<42} {:<11}", row.rpc, row.request, who.describe());
            let mut project = String::new();
            let mut problems = Vec::new();
            let result = call(&fx, row.case, who, row.place, &mut project, &mut problems).await;
            failures.extend(problems.into_iter().map(|problem| format!("{cell} {problem}")));
            if who == Who::NonMember {
                non_member.insert((row.case, row.place), normalized(&project, &result));
            }
            match result {
                Ok(answer) if expected == OK => answers.push((cell, who, answer)),
                Ok(answer) => failures.push(format!("{cell} expected {expected:?}, got OK: {}", brief(&answer))),
                Err(status) if status.code() == expected => {
                    let reason = match expected {
                        UNAUTHENTICATED => "UNAUTHENTICATED",
                        DENIED => "PERMISSION_DENIED",
                        PRECONDITION => "FAILED_PRECONDITION",
                        _ => "NOT_FOUND",
                    };
                    match status.get_error_details().error_info() {
                        Some(info) if info.reason == reason && info.domain == "projects.cube.dev" => {}
                        other => failures.push(format!(
                            "{cell} expected {expected:?} with ErrorInfo {reason} in projects.cube.dev, got {other:?}"
                        )),
                    }
                }
                Err(status) => failures.push(format!(
                    "{cell} expected {expected:?}, got {:?}: {}",
                    status.code(),
                    status.message()
                )),
            }
        }
    }

    // To a non-member, the target looks exactly like a project that does not exist.
    for ((case, place), target) in &non_member {
        if *place != Place::Target {
            continue;
        }
        if let Some(missing) = non_member.get(&(*case, Place::Missing))
            && target != missing
        {
            failures.push(format!(
                "{case:?} as non-member tells the target from a missing project:\n    target:  {target}\n    missing: {missing}"
            ));
        }
    }

    // The rows each caller sees, with the fixture as it was made (every cell undid its change).
    let platform = &fx.platform;
    let mine = [TARGET, "public"];
    let lists: [(Who, &str, Vec<&str>); 11] = [
        (Who::NonMember, "", vec![OTHER, "public"]),
        (Who::NonMember, "mine = true", vec![OTHER, "public"]),
        (Who::NonMember, "deleted = true", vec!["iso-made-by-stranger"]),
        (Who::Viewer, "", mine.to_vec()),
        (Who::Viewer, "mine = true", mine.to_vec()),
        (Who::Developer, "", mine.to_vec()),
        (Who::Developer, "mine = true", mine.to_vec()),
        (Who::Owner, "", mine.to_vec()),
        (Who::Owner, "mine = true", mine.to_vec()),
        (Who::Admin, "", vec![ADMINS, OTHER, TARGET, "public"]),
        (Who::Admin, "mine = true", vec![ADMINS]),
    ];
    let mut admin_list = String::new();
    for (who, filter, want) in lists {
        let cell = format!(
            "{:<16} {:<42} {:<11}",
            "ListProjects",
            format!("visible rows, {filter:?}"),
            who.describe()
        );
        let token = fx.token(who).expect("a signed-in caller");
        match list_projects(platform, token, filter).await {
            Ok(projects) => {
                let ids: Vec<&str> = projects
                    .iter()
                    .map(|project| project.name.trim_start_matches("projects/"))
                    .collect();
                if ids != want {
                    failures.push(format!("{cell} expected {want:?}, got {ids:?}"));
                }
                let answer = format!("{projects:?}");
                if who == Who::Admin && filter.is_empty() {
                    admin_list.clone_from(&answer);
                }
                answers.push((cell, who, answer));
            }
            Err(status) => failures.push(format!("{cell} expected OK, got {status:?}")),
        }
    }

    // Members list the target's members, the LDAP group included; the stranger lists the other project's.
    let target_members: Vec<(String, Role)> = vec![
        (format!("group {GROUP_DN}"), Role::Viewer),
        ("users/developer".into(), Role::Developer),
        ("users/owner".into(), Role::Owner),
        (format!("users/{PEER}"), Role::Developer),
        ("users/viewer".into(), Role::Viewer),
    ];
    let member_lists = [
        (Who::Viewer, TARGET, target_members.clone()),
        (Who::Developer, TARGET, target_members.clone()),
        (Who::Owner, TARGET, target_members.clone()),
        (Who::Admin, TARGET, target_members),
        (Who::NonMember, OTHER, vec![("users/stranger".into(), Role::Owner)]),
    ];
    for (who, project, want) in member_lists {
        let cell = format!(
            "{:<16} {:<42} {:<11}",
            "ListMembers",
            format!("visible rows of {project}"),
            who.describe()
        );
        match members(platform, fx.token(who).expect("a signed-in caller"), project).await {
            Ok(list) => {
                let got: Vec<(String, Role)> = list.iter().map(|member| (subject(member), member.role())).collect();
                if got != want {
                    failures.push(format!("{cell} expected {want:?}, got {got:?}"));
                }
                for member in &list {
                    let id = member
                        .name
                        .strip_prefix(&format!("projects/{project}/members/"))
                        .unwrap_or_default();
                    let well_named = match &member.subject {
                        Some(Subject::User(user)) => {
                            user.strip_prefix("users/").map(|u| format!("u-{u}")) == Some(id.to_owned())
                        }
                        Some(Subject::Group(_)) => {
                            id.len() == 18
                                && id.starts_with("g-")
                                && id[2..]
                                    .bytes()
                                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                        }
                        None => false,
                    };
                    if !well_named {
                        failures.push(format!(
                            "{cell} the member {} is named {:?}",
                            subject(member),
                            member.name
                        ));
                    }
                }
                answers.push((cell, who, format!("{list:?}")));
            }
            Err(status) => failures.push(format!("{cell} expected OK, got {status:?}")),
        }
    }

    // GetMembership says each caller's own role, and the peer's to those who may ask.
    let memberships = [
        (Who::Viewer, TARGET, "users/me", Role::Viewer, "u-viewer"),
        (Who::Developer, TARGET, "users/me", Role::Developer, "u-developer"),
        (Who::Owner, TARGET, "users/me", Role::Owner, "u-owner"),
        (Who::Admin, TARGET, "users/me", Role::Unspecified, ""),
        (Who::NonMember, OTHER, "", Role::Owner, "u-stranger"),
        (Who::Owner, TARGET, "users/peer", Role::Developer, "u-peer"),
        (Who::Admin, TARGET, "users/peer", Role::Developer, "u-peer"),
    ];
    for (who, project, user, role, granted) in memberships {
        let cell = format!(
            "{:<16} {:<42} {:<11}",
            "GetMembership",
            format!("{user:?} in {project}"),
            who.describe()
        );
        match membership(platform, fx.token(who).expect("a signed-in caller"), project, user).await {
            Ok(answer) => {
                let want_granted: Vec<String> = if granted.is_empty() {
                    Vec::new()
                } else {
                    vec![format!("projects/{project}/members/{granted}")]
                };
                if answer.role() != role
                    || answer.granted_by != want_granted
                    || answer.project != format!("projects/{project}")
                {
                    failures.push(format!(
                        "{cell} expected {role:?} granted by {want_granted:?}, got {answer:?}"
                    ));
                }
                answers.push((cell, who, format!("{answer:?}")));
            }
            Err(status) => failures.push(format!("{cell} expected OK, got {status:?}")),
        }
    }

    // The target is as it was made: refused changes changed nothing, accepted ones were undone.
    match get_project(platform, &fx.admin, TARGET).await {
        Ok(now) => {
            let made = &fx.target;
            if (
                &now.display_name,
                &now.description,
                &now.settings,
                &now.quota,
                now.r#type,
            ) != (
                &made.display_name,
                &made.description,
                &made.settings,
                &made.quota,
                made.r#type,
            ) {
                failures.push(format!("the target changed: made {made:?}, now {now:?}"));
            }
        }
        Err(status) => failures.push(format!("the target is gone: {status:?}")),
    }

    // Zero rows of another project: nothing a non-admin is answered shows a project they are not a member of.
    let target_needles = needles(&fx.target);
    let other_needles = needles(&fx.other);
    let mut checked = 0;
    for (cell, who, answer) in &answers {
        let foreign: Vec<&String> = match who {
            Who::Admin => continue,
            Who::NonMember => target_needles.iter().collect(),
            Who::Viewer | Who::Developer | Who::Owner => other_needles.iter().collect(),
            Who::Anonymous => target_needles.iter().chain(&other_needles).collect(),
        };
        checked += 1;
        for needle in foreign {
            if answer.contains(needle.as_str()) {
                failures.push(format!(
                    "{cell} the answer shows {needle:?} of another project: {}",
                    brief(answer)
                ));
            }
        }
    }
    // The check had answers to look at, and its needles do find both projects where the admin looks.
    if checked < 45 {
        failures.push(format!("only {checked} answers of non-admins were checked for leaks"));
    }
    for needle in target_needles.iter().chain(&other_needles) {
        if !admin_list.contains(needle.as_str()) {
            failures.push(format!("the admin's project list does not show {needle:?}"));
        }
    }

    assert!(
        failures.is_empty(),
        "{} cell(s) of the isolation matrix failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("the isolation matrix passed in {:?}", started.elapsed());
}
