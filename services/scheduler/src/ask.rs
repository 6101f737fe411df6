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
    /// The kind of workload.
    pub(crate) kind: WorkloadKind,
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

/// Reads the fields, adding a violation for each malformed one; `None` when any was.
pub(crate) fn read(fields: Fields<'_>, violations: &mut Vec<FieldViolation>) -> Option<Ask> {
    let project = fields
        .project
        .strip_prefix("projects/")
        .filter(|id| !id.is_empty())
        .map(str::to_owned);
    if project.is_none() {
        violations.push(FieldViolation::new(
            "project",
            format!("expected projects/{{project}}, got {:?}", fields.project),
        ));
    }
    let kind = match fields.kind {
        KindMessage::Train => Some(WorkloadKind::Train),
        KindMessage::Notebook => Some(WorkloadKind::Notebook),
        KindMessage::Service => Some(WorkloadKind::Service),
        KindMessage::Unspecified => {
            violations.push(FieldViolation::new(
                "kind",
                "is required: WORKLOAD_KIND_TRAIN, WORKLOAD_KIND_NOTEBOOK or WORKLOAD_KIND_SERVICE",
            ));
            None
        }
    };
    let mut refuse = |field: &str, error: cube_resources::ParseError| {
        violations.push(FieldViolation::new(field, error.to_string()));
    };
    let cpu = fields.cpu.parse::<CpuSpec>().map_err(|error| refuse("cpu", error)).ok();
    let memory = fields
        .memory
        .parse::<MemorySpec>()
        .map_err(|error| refuse("memory", error))
        .ok();
    let gpu = fields.gpu.parse::<GpuSpec>().map_err(|error| refuse("gpu", error)).ok();
    Some(Ask {
        project: project?,
        kind: kind?,
        cpu: cpu?,
        memory: memory?,
        gpu: gpu?,
    })
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
        let upstream = |status: Status| match status.code() {
            tonic::Code::NotFound => ApiError::NotFound {
                kind: "project",
                name: format!("projects/{project}"),
            },
            tonic::Code::Unauthenticated => ApiError::Unauthenticated {
                message: status.message().to_owned(),
            },
            _ => ApiError::Unavailable {
                service: "projects".into(),
                source: Box::new(status),
            },
        };
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
                project: "projects/p",
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
