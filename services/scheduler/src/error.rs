//! The scheduler's errors: the platform's common ones ([`ApiError`]) and the few it words itself, turned into a
//! `tonic::Status` in one place ([`Error::status`]) with the same `google.rpc` details as every Cube service.

use cube_kit::ApiError;
use tonic::Status;
use tonic_types::StatusExt as _;

use crate::DOMAIN;
use crate::names::shown;

/// Why a scheduler call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// One of the platform's common errors.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// A cluster name that is not registered; the message lists the registered ones.
    #[error("cluster {} not found (registered: {})", shown(.name), .registered.join(", "))]
    UnknownCluster {
        /// The name asked for, `clusters/{cluster}`.
        name: String,
        /// The registered clusters' ids.
        registered: Vec<String>,
    },
}

impl Error {
    /// The gRPC status a client receives: [`ApiError::status`]'s for the common errors; for an unknown cluster
    /// NOT_FOUND, with an `ErrorInfo` (reason `NOT_FOUND`) naming the kind, the name and the registered clusters.
    pub fn status(self) -> Status {
        match self {
            Self::Api(error) => error.status(DOMAIN),
            Self::UnknownCluster { name, registered } => {
                let message = Self::UnknownCluster {
                    name: name.clone(),
                    registered: registered.clone(),
                }
                .to_string();
                let status = ApiError::NotFound { kind: "cluster", name }.status(DOMAIN);
                let mut details = status.get_error_details();
                if let Some(info) = details.error_info() {
                    let mut metadata = info.metadata.clone();
                    metadata.insert("registered".to_owned(), registered.join(","));
                    let (reason, domain) = (info.reason.clone(), info.domain.clone());
                    details.set_error_info(reason, domain, metadata);
                }
                Status::with_error_details(status.code(), message, details)
            }
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        error.status()
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn an_unknown_cluster_is_named_apart_from_the_registered_ones() {
        let status = Error::UnknownCluster {
            name: "clusters/nope".into(),
            registered: vec!["local".into(), "gpu".into()],
        }
        .status();
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(
            status.message(),
            "cluster \"clusters/nope\" not found (registered: local, gpu)"
        );
        let details = status.get_error_details();
        let info = details.error_info().expect("an ErrorInfo");
        assert_eq!((info.reason.as_str(), info.domain.as_str()), ("NOT_FOUND", DOMAIN));
        assert_eq!(info.metadata.get("name").map(String::as_str), Some("clusters/nope"));
        assert_eq!(info.metadata.get("registered").map(String::as_str), Some("local,gpu"));
    }

    #[test]
    fn common_errors_keep_their_status() {
        let status = Error::from(ApiError::invalid("workload", "is required")).status();
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let fields: Vec<&str> = details
            .bad_request()
            .map(|bad| bad.field_violations.iter().map(|v| v.field.as_str()).collect())
            .unwrap_or_default();
        assert_eq!(fields, ["workload"]);
    }
}
