//! What can go wrong running a workload.

use crate::spec::ObjectKey;

/// A runtime operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No workload (or object) of that key exists.
    #[error("{0} does not exist")]
    NotFound(ObjectKey),
    /// The spec cannot be run as given: `field` names the part of the spec (`containers[0].image`,
    /// `volumes`), `message` says why.
    #[error("{field}: {message}")]
    Invalid {
        /// The spec field at fault.
        field: String,
        /// Why it is refused.
        message: String,
    },
    /// The cluster, or the part of it asked (a pod's node for logs), cannot be reached now; trying again later may
    /// work.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The API server refused the request for a reason other than the above.
    #[error("the cluster refused: {0}")]
    Refused(String),
    /// A local file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

impl RuntimeError {
    /// An [`RuntimeError::Io`] saying what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// The gRPC code a service answers with when this error reaches a caller.
    pub fn code(&self) -> cube_proto::tonic::Code {
        use cube_proto::tonic::Code;
        match self {
            Self::NotFound(_) => Code::NotFound,
            Self::Invalid { .. } => Code::InvalidArgument,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Refused(_) => Code::FailedPrecondition,
            Self::Io { .. } => Code::Internal,
        }
    }
}
