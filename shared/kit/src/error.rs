//! The one error type every Cube API boundary returns, mapped to `tonic::Status` with `google.rpc` details.
//!
//! Services keep their own `thiserror` enums and convert them into [`ApiError`] at the edge; [`ApiError::status`]
//! picks the gRPC code, attaches an `ErrorInfo` (reason from `cube.common.v1.ErrorReason`, the service's domain,
//! the values involved) and a `BadRequest` or `QuotaFailure` where it applies, and logs internal errors without
//! sending their detail to the client.

use std::collections::HashMap;

use cube_proto::cube::common::v1::ErrorReason;
use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

/// A boxed error from a dependency (database, network, …) whose detail stays in the logs.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One malformed request field: which field, and what would have been accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The field's path in the request, e.g. `project.quota.gpu`.
    pub field: String,
    /// What is wrong and what the field accepts.
    pub description: String,
}

impl FieldViolation {
    /// Builds a violation of `field` described by `description`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// A failed API call, in the terms a client can act on.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Request fields are malformed.
    #[error("invalid request: {}", describe_violations(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// The named resource does not exist (or the caller may not know it does).
    #[error("{kind} {name:?} not found")]
    NotFound {
        /// The kind of resource, e.g. `project`.
        kind: &'static str,
        /// Its resource name.
        name: String,
    },
    /// A resource with that name already exists.
    #[error("{kind} {name:?} already exists")]
    AlreadyExists {
        /// The kind of resource, e.g. `project`.
        kind: &'static str,
        /// Its resource name.
        name: String,
    },
    /// The resource's state does not allow the call.
    #[error("{message}")]
    FailedPrecondition {
        /// What state blocks the call, for people.
        message: String,
    },
    /// The resource changed since the caller read it, or a concurrent change won.
    #[error("{message}")]
    Aborted {
        /// What changed, and what to do.
        message: String,
    },
    /// The call carried no valid credentials.
    #[error("{message}")]
    Unauthenticated {
        /// Why the credentials were refused.
        message: String,
    },
    /// The caller lacks a permission.
    #[error("permission {permission} denied")]
    PermissionDenied {
        /// The permission the call needs, e.g. `projects.update`.
        permission: String,
    },
    /// A quota would be exceeded.
    #[error("quota exceeded: {subject}: {description}")]
    QuotaExceeded {
        /// What the quota applies to, e.g. `projects/vision:gpu`.
        subject: String,
        /// How much was asked for and how much is left.
        description: String,
    },
    /// Too many failed attempts; the caller may retry after `retry_after`.
    #[error("too many failed attempts for {subject}, retry in {} s", .retry_after.as_secs().max(1))]
    TooManyAttempts {
        /// What is limited, e.g. `user alice` or `client 10.0.0.7`.
        subject: String,
        /// How long until the limit lifts.
        retry_after: std::time::Duration,
    },
    /// A message is larger than the receiver accepts.
    #[error("message of {size} bytes is larger than the {limit}-byte limit")]
    MessageTooLarge {
        /// The limit in bytes.
        limit: usize,
        /// The size the message declared.
        size: usize,
    },
    /// The request's gRPC or grpc-web framing or headers are broken.
    #[error("malformed request: {0}")]
    MalformedRequest(String),
    /// No service serves the called method.
    #[error("no Cube service serves {method}")]
    UnknownService {
        /// The full method path that was called.
        method: String,
    },
    /// The service that serves the call cannot be reached.
    #[error("service {service} is unavailable, retry later")]
    Unavailable {
        /// Which service.
        service: String,
        /// The underlying failure, logged and not sent.
        #[source]
        source: BoxError,
    },
    /// The deadline passed before the call finished.
    #[error("deadline exceeded after {0:?}")]
    DeadlineExceeded(std::time::Duration),
    /// Something failed inside the service.
    #[error("internal error")]
    Internal(#[source] BoxError),
}

impl ApiError {
    /// Builds an [`ApiError::InvalidArgument`] for a single field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    /// Builds an [`ApiError::Internal`] from any error.
    pub fn internal(error: impl Into<BoxError>) -> Self {
        Self::Internal(error.into())
    }

    /// Returns the gRPC code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) | Self::MalformedRequest(_) => Code::InvalidArgument,
            Self::NotFound { .. } => Code::NotFound,
            Self::AlreadyExists { .. } => Code::AlreadyExists,
            Self::FailedPrecondition { .. } => Code::FailedPrecondition,
            Self::Unauthenticated { .. } => Code::Unauthenticated,
            Self::Aborted { .. } => Code::Aborted,
            Self::PermissionDenied { .. } => Code::PermissionDenied,
            Self::QuotaExceeded { .. } | Self::MessageTooLarge { .. } | Self::TooManyAttempts { .. } => {
                Code::ResourceExhausted
            }
            Self::UnknownService { .. } => Code::Unimplemented,
            Self::Unavailable { .. } => Code::Unavailable,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::Internal(_) => Code::Internal,
        }
    }

    /// Returns the `ErrorInfo` reason this error carries.
    pub fn reason(&self) -> ErrorReason {
        match self {
            Self::InvalidArgument(_) => ErrorReason::FieldInvalid,
            Self::NotFound { .. } => ErrorReason::NotFound,
            Self::AlreadyExists { .. } => ErrorReason::AlreadyExists,
            Self::FailedPrecondition { .. } => ErrorReason::FailedPrecondition,
            Self::Unauthenticated { .. } => ErrorReason::Unauthenticated,
            Self::Aborted { .. } => ErrorReason::Aborted,
            Self::PermissionDenied { .. } => ErrorReason::PermissionDenied,
            Self::QuotaExceeded { .. } => ErrorReason::QuotaExceeded,
            Self::MessageTooLarge { .. } => ErrorReason::MessageTooLarge,
            Self::TooManyAttempts { .. } => ErrorReason::TooManyAttempts,
            Self::MalformedRequest(_) => ErrorReason::MalformedRequest,
            Self::UnknownService { .. } => ErrorReason::UnknownService,
            Self::Unavailable { .. } => ErrorReason::UpstreamUnavailable,
            Self::DeadlineExceeded(_) => ErrorReason::DeadlineExceeded,
            Self::Internal(_) => ErrorReason::Internal,
        }
    }

    /// Converts the error into the `tonic::Status` a client receives, with `domain` (e.g. `auth.cube.dev`) in its
    /// `ErrorInfo`. Internal and unavailable errors are logged here with their cause, which the client never sees.
    pub fn status(self, domain: &str) -> tonic::Status {
        let mut metadata = HashMap::new();
        let mut details = ErrorDetails::new();
        match &self {
            Self::InvalidArgument(violations) => {
                for violation in violations {
                    details.add_bad_request_violation(&violation.field, &violation.description);
                }
            }
            Self::NotFound { kind, name } | Self::AlreadyExists { kind, name } => {
                metadata.insert("kind".to_owned(), (*kind).to_owned());
                metadata.insert("name".to_owned(), name.clone());
            }
            Self::PermissionDenied { permission } => {
                metadata.insert("permission".to_owned(), permission.clone());
            }
            Self::QuotaExceeded { subject, description } => {
                details.add_quota_failure_violation(subject, description);
            }
            Self::TooManyAttempts { retry_after, .. } => {
                details.set_retry_info(Some(*retry_after));
            }
            Self::MessageTooLarge { limit, size } => {
                metadata.insert("limit".to_owned(), limit.to_string());
                metadata.insert("size".to_owned(), size.to_string());
            }
            Self::UnknownService { method } => {
                metadata.insert("method".to_owned(), method.clone());
            }
            Self::Unavailable { service, source } => {
                tracing::warn!(%service, error = %source, "upstream unavailable");
                metadata.insert("service".to_owned(), service.clone());
            }
            Self::Internal(source) => {
                tracing::error!(error = %source, "internal error");
                if let Some(trace_id) = crate::telemetry::current_trace_id() {
                    metadata.insert("trace_id".to_owned(), trace_id);
                }
            }
            Self::FailedPrecondition { .. }
            | Self::Aborted { .. }
            | Self::Unauthenticated { .. }
            | Self::MalformedRequest(_)
            | Self::DeadlineExceeded(_) => {}
        }
        let reason = self.reason().as_str_name();
        let reason = reason.strip_prefix("ERROR_REASON_").unwrap_or(reason);
        details.set_error_info(reason, domain, metadata);
        tonic::Status::with_error_details(self.code(), self.to_string(), details)
    }
}

fn describe_violations(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_names_each_field_in_bad_request_and_error_info() {
        let status = ApiError::InvalidArgument(vec![
            FieldViolation::new("name", "must not be empty"),
            FieldViolation::new("quota.gpu", "expected \"1\", \"2(T4)\" or \"0.25\""),
        ])
        .status("projects.cube.dev");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains("name: must not be empty"),
            "{}",
            status.message()
        );
        let details = status.get_error_details();
        let info = details.error_info().expect("error info");
        assert_eq!(info.reason, "FIELD_INVALID");
        assert_eq!(info.domain, "projects.cube.dev");
        let fields: Vec<_> = details
            .bad_request()
            .expect("bad request")
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, ["name", "quota.gpu"]);
    }

    #[test]
    fn internal_errors_hide_their_cause() {
        let status = ApiError::internal("password for db is hunter2").status("auth.cube.dev");
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("hunter2"));
        assert_eq!(
            status.get_error_details().error_info().expect("info").reason,
            "INTERNAL"
        );
    }

    #[test]
    fn quota_and_size_errors_are_resource_exhausted_with_their_numbers() {
        let status = ApiError::QuotaExceeded {
            subject: "projects/vision:gpu".into(),
            description: "asked 4, 1 left".into(),
        }
        .status("scheduler.cube.dev");
        assert_eq!(status.code(), Code::ResourceExhausted);
        let details = status.get_error_details();
        assert_eq!(
            details.quota_failure().expect("quota").violations[0].subject,
            "projects/vision:gpu"
        );

        let status = ApiError::MessageTooLarge { limit: 10, size: 11 }.status("gateway.cube.dev");
        let info = status.get_error_details().error_info().cloned().expect("info");
        assert_eq!(info.reason, "MESSAGE_TOO_LARGE");
        assert_eq!(info.metadata.get("limit").map(String::as_str), Some("10"));
    }
}
