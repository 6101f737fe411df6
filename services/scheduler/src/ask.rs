//! What `Place` and `Admit` both read: the project, the workload's kind and its resource strings from a request,
//! each malformed field reported by name; and the project's settings and quotas with the caller's membership,
//! asked of the projects service and kept for a short time ([`ProjectCache`]).

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash as _, Hasher as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use cube_kit::identity::{Principal, forward_token};
use cube_kit::{ApiError, Channel, FieldViolation};
use cube_proto::cube::projects::v1::project_service_client::ProjectServiceClient;
use cube_proto::cube::projects::v1::{GetMembershipRequest, GetProjectRequest, Quota, Settings};
use cube_proto::cube::scheduler::v1::WorkloadKind as KindMessage;
use cube_resources::{CpuSpec, GpuSpec, MemorySpec};
use tonic::{Request, Status};

use crate::placement::{PlacementConfig, WorkloadKind};

/// A workload's project, kind and resources, read from a request.
#[derive(Debug, Clone)]
pub(crate) struct Ask {
    /// The project id.
    pub(crate) project: String,
    /// The kind of workload, as placement sees it.
    pub(crate) kind: WorkloadKind,
    /// What its admission is stored and counted as: `train`, `notebook`, `service` (one of the kind's own),
    /// `run` (one run, no resources) or `task` (a run's task: resources, no run).
    pub(crate) admitted_as: &'static str,
    /// CPU request and limit.
    pub(crate) cpu: CpuSpec,
    /// Memory request and limit.
    pub(crate) memory: MemorySpec,
    /// GPUs.
    pub(crate) gpu: GpuSpec,
}

/// The raw fields of a request that asks for resources.
pub(crate) struct Fields<'a> {
    pub(crate) project: &'a str,
    pub(crate) kind: KindMessage,
    pub(crate) cpu: &'a str,
    pub(crate) memory: &'a str,
    pub(crate) gpu: &'a str,
}

/// The longest resource string (`cpu`, `memory`, `gpu`) read, in bytes.
const MAX_RESOURCE_STRING: usize = 64;

/// Reads the fields, adding a violation for each malformed one; `None` when any was. The project is checked
/// against the rule projects applies to ids, so a malformed one is refused here rather than asked of projects.
pub(crate) fn read(fields: Fields<'_>, violations: &mut Vec<FieldViolation>) -> Option<Ask> {
    let project = crate::names::project_id("project", fields.project)
        .map_err(|violation| violations.push(violation))
        .ok();
    let (kind, admitted_as) = match fields.kind {
        KindMessage::Train => (Some(WorkloadKind::Train), "train"),
        KindMessage::Notebook => (Some(WorkloadKind::Notebook), "notebook"),
        KindMessage::Service => (Some(WorkloadKind::Service), "service"),
        KindMessage::Task => (Some(WorkloadKind::Train), "task"),
        KindMessage::Run => (Some(WorkloadKind::Train), "run"),
        KindMessage::Unspecified => {
            violations.push(FieldViolation::new(
                "kind",
                "is required: WORKLOAD_KIND_TRAIN, WORKLOAD_KIND_NOTEBOOK, WORKLOAD_KIND_SERVICE, \
                 WORKLOAD_KIND_RUN or WORKLOAD_KIND_TASK",
            ));
            (None, "")
        }
    };
    if admitted_as == "run" {
        // A run holds no resources itself: its tasks do.
        for (field, text) in [("cpu", fields.cpu), ("memory", fields.memory), ("gpu", fields.gpu)] {
            if !text.is_empty() {
                violations.push(FieldViolation::new(
                    field,
                    "must be empty for WORKLOAD_KIND_RUN: a run holds no resources; admit its tasks as WORKLOAD_KIND_TASK",
                ));
            }
        }
        return Some(Ask {
            project: project?,
            kind: kind?,
            admitted_as,
            cpu: CpuSpec::new(0, 1).ok()?,
            memory: MemorySpec::new(0, 1 << 20).ok()?,
            gpu: GpuSpec::default(),
        });
    }
    let cpu = resource::<CpuSpec>("cpu", fields.cpu, "2, 0.5 or 1~4", violations);
    let memory = resource::<MemorySpec>("memory", fields.memory, "4G, 512M or 2G~8G", violations);
    let gpu = resource::<GpuSpec>(
        "gpu",
        fields.gpu,
        "empty, 0, 1, 2(T4), 1(nvidia,V100) or 0.25",
        violations,
    );
    Some(Ask {
        project: project?,
        kind: kind?,
        admitted_as,
        cpu: cpu?,
        memory: memory?,
        gpu: gpu?,
    })
}

/// Parses the resource string of `field`, adding a violation when it is malformed; one too long to be a resource
/// string is refused without being parsed or repeated.
fn resource<T>(field: &str, text: &str, forms: &str, violations: &mut Vec<FieldViolation>) -> Option<T>
where
    T: std::str::FromStr<Err = cube_resources::ParseError>,
{
    if text.len() > MAX_RESOURCE_STRING {
        violations.push(FieldViolation::new(
            field,
            format!(
                "is {} bytes long; resource strings are at most {MAX_RESOURCE_STRING} bytes, e.g. {forms}",
                text.len()
            ),
        ));
        return None;
    }
    text.parse::<T>()
        .map_err(|error| violations.push(FieldViolation::new(field, error.to_string())))
        .ok()
}

/// The configured GPU vendor names, which a lone word in a GPU string (`1(nvidia)`) names instead of a type.
#[derive(Debug, Clone, Default)]
pub(crate) struct GpuVendors {
    whole: BTreeSet<String>,
    shares: BTreeSet<String>,
}

impl GpuVendors {
    /// The vendors of a placement configuration.
    pub(crate) fn of(config: &PlacementConfig) -> Self {
        Self {
            whole: config
                .gpu_vendors
                .keys()
                .map(|vendor| vendor.to_ascii_lowercase())
                .collect(),
            shares: config
                .vgpu_vendors
                .keys()
                .map(|vendor| vendor.to_ascii_lowercase())
                .collect(),
        }
    }
}

impl Ask {
    /// The GPU type the ask's GPUs count against: the type its GPU string names, read as placement reads it (a
    /// lone word that is a configured vendor names the vendor), upper-case like node labels and quota keys.
    pub(crate) fn gpu_type(&self, vendors: &GpuVendors) -> Option<String> {
        let gpu_type = self.gpu.gpu_type()?;
        let known = match self.gpu {
            GpuSpec::Fraction { .. } => &vendors.shares,
            _ => &vendors.whole,
        };
        if self.gpu.vendor().is_none() && known.contains(&gpu_type.to_ascii_lowercase()) {
            return None;
        }
        Some(gpu_type.to_ascii_uppercase())
    }
}

/// A project as one caller sees it: its settings and quota, and the caller's own quota inside it.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProjectView {
    /// The project's settings (cluster, namespaces, resource group, node selector).
    pub(crate) settings: Settings,
    /// The project's quota.
    pub(crate) quota: Option<Quota>,
    /// The caller's member quota, when the caller is a member with one.
    pub(crate) member_quota: Option<Quota>,
}

/// One cached answer and what it was given for.
struct Cached {
    read: Instant,
    /// The caller's roles, groups and token scopes, which the answer depends on besides the username.
    caller: u64,
    view: Arc<ProjectView>,
}

/// Reads a project and the caller's membership from the projects service (`GetProject` and `GetMembership`,
/// with the caller's token), keeping each answer per project and username for `ttl`. Only answers are kept:
/// a refusal (a non-member's NOT_FOUND) is asked again next time. [`ProjectCache::forget`] drops a project's
/// answers when its members change.
pub(crate) struct ProjectCache {
    channel: Channel,
    ttl: Duration,
    /// Project id → username → answer.
    answers: RwLock<HashMap<String, HashMap<String, Cached>>>,
    /// How many times anything was forgotten: an answer asked for before a forget is not kept after it.
    forgets: AtomicU64,
}

/// The most answers kept; past it the cache starts over.
const MAX_ANSWERS: usize = 100_000;

fn fingerprint(caller: &Principal) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    caller.is_admin().hash(&mut hasher);
    caller.roles.hash(&mut hasher);
    caller.groups.hash(&mut hasher);
    caller.scopes().hash(&mut hasher);
    hasher.finish()
}

impl std::fmt::Debug for ProjectCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectCache")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl ProjectCache {
    /// Reads from the projects service behind `channel`, keeping answers for `ttl` (zero keeps none).
    pub(crate) fn new(channel: Channel, ttl: Duration) -> Self {
        Self {
            channel,
            ttl,
            answers: RwLock::new(HashMap::new()),
            forgets: AtomicU64::new(0),
        }
    }

    /// Drops every answer about `project`.
    pub(crate) fn forget(&self, project: &str) {
        self.forgets.fetch_add(1, Ordering::AcqRel);
        self.answers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(project);
    }

    /// The project `project` (an id) as the caller of `request` sees it; NOT_FOUND when it does not exist or the
    /// caller is not a member (nor an admin).
    pub(crate) async fn view<T>(
        &self,
        request: &Request<T>,
        caller: &Principal,
        project: &str,
    ) -> Result<Arc<ProjectView>, ApiError> {
        let who = fingerprint(caller);
        if !self.ttl.is_zero() {
            let answers = self.answers.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(cached) = answers.get(project).and_then(|users| users.get(&caller.username))
                && cached.caller == who
                && cached.read.elapsed() < self.ttl
            {
                return Ok(cached.view.clone());
            }
        }
        let forgets = self.forgets.load(Ordering::Acquire);
        let read = Instant::now();
        let view = Arc::new(self.ask(request, project).await?);
        if !self.ttl.is_zero() {
            let mut answers = self.answers.write().unwrap_or_else(PoisonError::into_inner);
            // A membership change announced while projects was being asked may not be in its answer.
            if self.forgets.load(Ordering::Acquire) == forgets {
                if answers.values().map(HashMap::len).sum::<usize>() >= MAX_ANSWERS {
                    answers.clear();
                }
                answers.entry(project.to_owned()).or_default().insert(
                    caller.username.clone(),
                    Cached {
                        read,
                        caller: who,
                        view: view.clone(),
                    },
                );
            }
        }
        Ok(view)
    }

    /// Asks projects for the project and the caller's membership, at once.
    async fn ask<T>(&self, request: &Request<T>, project: &str) -> Result<ProjectView, ApiError> {
        let upstream = |status: Status| peer_error("projects", &format!("projects/{project}"), status);
        let mut get = Request::new(GetProjectRequest {
            name: format!("projects/{project}"),
        });
        forward_token(request, &mut get)?;
        let mut membership = Request::new(GetMembershipRequest {
            project: format!("projects/{project}"),
            user: String::new(),
        });
        forward_token(request, &mut membership)?;
        let mut projects = ProjectServiceClient::new(self.channel.clone());
        let mut members = projects.clone();
        let (found, membership) = tokio::join!(projects.get_project(get), members.get_membership(membership));
        let found = found.map_err(upstream)?.into_inner();
        let membership = membership.map_err(upstream)?.into_inner();
        Ok(ProjectView {
            settings: found.settings.unwrap_or_default(),
            quota: found.quota,
            member_quota: membership.quota,
        })
    }
}

/// What an error answer of the peer `service` about `project` (`projects/{project}`) means to the scheduler's
/// caller. The peer's client errors stay client errors, since they say something about the request (or about
/// the caller) that asking again will not change: NOT_FOUND (the project is missing or hidden from the caller),
/// UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT (on the project, the one field the scheduler passes on),
/// FAILED_PRECONDITION, ALREADY_EXISTS, OUT_OF_RANGE and ABORTED. Only the peer's own failures (UNAVAILABLE,
/// DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL, UNKNOWN, …) are UNAVAILABLE, which clients retry.
pub(crate) fn peer_error(service: &str, project: &str, status: Status) -> ApiError {
    use tonic::Code;
    use tonic_types::StatusExt as _;
    let message = status.message().to_owned();
    match status.code() {
        Code::NotFound => ApiError::NotFound {
            kind: "project",
            name: project.to_owned(),
        },
        Code::Unauthenticated => ApiError::Unauthenticated { message },
        Code::PermissionDenied => {
            let details = status.get_error_details();
            let permission = details
                .error_info()
                .and_then(|info| info.metadata.get("permission").cloned())
                .unwrap_or_else(|| "projects.get".to_owned());
            ApiError::PermissionDenied { permission }
        }
        Code::InvalidArgument | Code::OutOfRange => ApiError::invalid(
            "project",
            format!("{service} refused {}: {message}", crate::names::shown(project)),
        ),
        Code::FailedPrecondition | Code::AlreadyExists => ApiError::FailedPrecondition { message },
        Code::Aborted => ApiError::Aborted { message },
        _ => ApiError::Unavailable {
            service: service.to_owned(),
            source: Box::new(status),
        },
    }
}

/// What the `Place` and `Admit` of one scheduler share: the project cache, and placement's verdicts.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Projects and memberships as recently read.
    pub(crate) projects: ProjectCache,
    /// Placement's node shapes and verdicts per cluster.
    pub(crate) verdicts: crate::place::Verdicts,
}

impl Shared {
    /// State over the projects service behind `channel`, keeping its answers for `ttl`.
    pub(crate) fn new(channel: Channel, ttl: Duration) -> Self {
        Self {
            projects: ProjectCache::new(channel, ttl),
            verdicts: crate::place::Verdicts::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(gpu: &str) -> Ask {
        let mut violations = Vec::new();
        read(
            Fields {
                project: "projects/vision",
                kind: KindMessage::Train,
                cpu: "1",
                memory: "1G",
                gpu,
            },
            &mut violations,
        )
        .unwrap_or_else(|| panic!("{violations:?}"))
    }

    #[test]
    fn a_peers_client_errors_stay_client_errors() {
        use tonic::Code;
        let table = [
            (Code::NotFound, Code::NotFound),
            (Code::Unauthenticated, Code::Unauthenticated),
            (Code::PermissionDenied, Code::PermissionDenied),
            (Code::InvalidArgument, Code::InvalidArgument),
            (Code::OutOfRange, Code::InvalidArgument),
            (Code::FailedPrecondition, Code::FailedPrecondition),
            (Code::AlreadyExists, Code::FailedPrecondition),
            (Code::Aborted, Code::Aborted),
            (Code::Unavailable, Code::Unavailable),
            (Code::DeadlineExceeded, Code::Unavailable),
            (Code::ResourceExhausted, Code::Unavailable),
            (Code::Internal, Code::Unavailable),
            (Code::Unknown, Code::Unavailable),
            (Code::Unimplemented, Code::Unavailable),
        ];
        for (peer, ours) in table {
            let error = peer_error("projects", "projects/vision", Status::new(peer, "the peer said no"));
            assert_eq!(error.code(), ours, "{peer:?} became {error:?}");
        }
        let error = peer_error(
            "projects",
            "projects/vision",
            Status::not_found("project \"projects/vision\" not found"),
        );
        assert_eq!(error.to_string(), "project \"projects/vision\" not found");
        let denied = ApiError::PermissionDenied {
            permission: "projects.get".into(),
        }
        .status("projects.cube.dev");
        match peer_error("projects", "projects/vision", denied) {
            ApiError::PermissionDenied { permission } => assert_eq!(permission, "projects.get"),
            other => panic!("{other:?}"),
        }
        let refused = peer_error(
            "projects",
            "projects/vision",
            ApiError::invalid("name", "bad").status("projects.cube.dev"),
        );
        let ApiError::InvalidArgument(violations) = refused else {
            panic!("{refused:?}");
        };
        assert_eq!(violations[0].field, "project");
    }

    #[test]
    fn malformed_fields_are_refused_by_name_without_repeating_them_whole() {
        let mut violations = Vec::new();
        let long = "9".repeat(100_000);
        let ask = read(
            Fields {
                project: "projects/a b",
                kind: KindMessage::Unspecified,
                cpu: &long,
                memory: "lots",
                gpu: "1",
            },
            &mut violations,
        );
        assert!(ask.is_none());
        let fields: Vec<&str> = violations.iter().map(|violation| violation.field.as_str()).collect();
        assert_eq!(fields, ["project", "kind", "cpu", "memory"]);
        assert!(
            violations.iter().all(|violation| violation.description.len() < 400),
            "{violations:?}"
        );
    }

    #[test]
    fn gpu_types_are_read_as_placement_reads_them() {
        let vendors = GpuVendors::of(&PlacementConfig::default());
        assert_eq!(ask("2(T4)").gpu_type(&vendors).as_deref(), Some("T4"));
        assert_eq!(ask("1(nvidia,V100)").gpu_type(&vendors).as_deref(), Some("V100"));
        assert_eq!(ask("0.5(t4)").gpu_type(&vendors).as_deref(), Some("T4"));
        // A lone configured vendor names the vendor, not a type.
        assert_eq!(ask("1(nvidia)").gpu_type(&vendors), None);
        assert_eq!(ask("1").gpu_type(&vendors), None);
        assert_eq!(ask("").gpu_type(&vendors), None);
    }
}
