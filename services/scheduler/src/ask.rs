//! What `Place` and `Admit` both read from a request: the project, the workload's kind and its resource
//! strings, each malformed field reported by name.

use cube_kit::FieldViolation;
use cube_proto::cube::scheduler::v1::WorkloadKind as KindMessage;
use cube_resources::{CpuSpec, GpuSpec, MemorySpec};

use crate::placement::WorkloadKind;

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
