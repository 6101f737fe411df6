//! Why a resource string was refused, in words users read in gRPC field violations.

use std::fmt;

/// Names which resource a string describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    /// CPU cores.
    Cpu,
    /// Memory.
    Memory,
    /// GPUs, whole or a vGPU share.
    Gpu,
}

impl ResourceKind {
    /// Returns the forms this kind accepts, as the error message shows them.
    pub fn accepted(self) -> &'static str {
        match self {
            Self::Cpu => {
                "expected cores as \"2\" or \"0.5\" (above 0, at most 3 decimals), or request~limit as \"1~4\" or \"0~4\""
            }
            Self::Memory => {
                "expected a whole number with unit M, G or T (binary; Mi, Gi, Ti also accepted) as \"4G\" or \"512M\", or request~limit as \"2G~8G\" or \"0~8G\""
            }
            Self::Gpu => {
                "expected whole GPUs as \"1\", \"2(T4)\" (type) or \"1(nvidia,V100)\" (vendor,type), a vGPU share below 1 as \"0.25\", or \"0\" for none"
            }
        }
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Memory => "memory",
            Self::Gpu => "gpu",
        })
    }
}

/// Describes what is wrong with a refused resource string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Problem {
    /// The text is empty (CPU and memory; an empty GPU string means no GPU).
    Empty,
    /// The text does not follow the grammar at all.
    Malformed,
    /// A number is negative.
    Negative,
    /// A plain value or a limit is 0.
    Zero,
    /// A number has more than 3 decimals.
    TooManyDecimals,
    /// A number does not fit.
    TooLarge,
    /// The request of a range is above its limit.
    RequestAboveLimit,
    /// CPU was written with Kubernetes' `m` suffix.
    Millicores,
    /// A memory amount has a fraction.
    FractionalMemory,
    /// A memory amount above 0 has no unit.
    MissingUnit,
    /// A memory unit is not one of M, G, T, Mi, Gi, Ti.
    UnknownUnit(String),
    /// A GPU count of 1 or more is not an integer.
    NotWholeGpu,
    /// A GPU type is not a node label value.
    BadGpuType(String),
    /// A GPU vendor is not a name.
    BadVendor(String),
    /// The GPU string names a type or vendor but asks for no GPU.
    QualifierWithoutGpu,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("it is empty"),
            Self::Malformed => f.write_str("it is not in the resource grammar"),
            Self::Negative => f.write_str("it is negative"),
            Self::Zero => f.write_str("it must be above 0 (only the request of a range may be 0)"),
            Self::TooManyDecimals => f.write_str("it has more than 3 decimals"),
            Self::TooLarge => f.write_str("it is too large"),
            Self::RequestAboveLimit => f.write_str("the request (left of ~) is above the limit (right of ~)"),
            Self::Millicores => f.write_str("cores take no unit: write 0.5 for 500m"),
            Self::FractionalMemory => f.write_str("memory takes whole numbers: write 1536M for 1.5G"),
            Self::MissingUnit => f.write_str("it has no unit"),
            Self::UnknownUnit(unit) => write!(f, "{unit:?} is not a unit"),
            Self::NotWholeGpu => f.write_str("whole GPUs must be an integer (a vGPU share is a number below 1)"),
            Self::BadGpuType(gpu_type) => write!(
                f,
                "{gpu_type:?} is not a GPU type: at most 63 letters, digits, '-', '_' or '.', alphanumeric at both ends"
            ),
            Self::BadVendor(vendor) => write!(
                f,
                "{vendor:?} is not a GPU vendor: at most 63 letters, digits, '-', '_' or '.', alphanumeric at both ends"
            ),
            Self::QualifierWithoutGpu => f.write_str("it names a GPU type or vendor but asks for no GPU"),
        }
    }
}

/// Reports a refused resource string: which kind, the text as given, what is wrong and what would be accepted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, thiserror::Error)]
#[error("{kind} {text:?} is not valid: {problem}; {}", kind.accepted())]
pub struct ParseError {
    /// Which resource the text describes.
    pub kind: ResourceKind,
    /// The refused text, as given.
    pub text: String,
    /// What is wrong with it.
    pub problem: Problem,
}

impl ParseError {
    pub(crate) fn new(kind: ResourceKind, text: &str, problem: Problem) -> Self {
        Self {
            kind,
            text: text.to_owned(),
            problem,
        }
    }
}
