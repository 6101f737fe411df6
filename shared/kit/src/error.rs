//! The one error type every Cube API boundary returns, mapped to `tonic::Status` with `google.rpc` details.
//!
//! Services keep their own `thiserror` enums and convert them into [`ApiError`] at the edge; [`ApiError::status`]
//! picks the gRPC code, attaches an `ErrorInfo` (reason from `cube.common.v1.ErrorReason`, the service's domain,
//! the values involved) and a `BadRequest` or `QuotaFailure` where it applies, and logs internal errors without
//! sending their detail to the client.
//!
//! An error's message and details travel in HTTP/2 headers, which gRPC clients limit (gRPC core refuses more than
//! 8 KiB by default: "metadata size exceeds hard limit"). [`ApiError::status`] keeps the first
//! [`MAX_FIELD_VIOLATIONS`] field violations and sums up the rest in one, shortens long texts, and [`fit_status`]
//! then holds the message and details together to [`MAX_STATUS_BYTES`]; servers apply [`fit_status_headers`] to
//! every answer, so errors built elsewhere are held to the same bound.

use std::borrow::Cow;
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
    /// A position the request names is outside what is kept (e.g. an event older than the history).
    #[error("{field}: {message}")]
    OutOfRange {
        /// The request field.
        field: &'static str,
        /// What is out of range, and what to do.
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
            Self::OutOfRange { .. } => Code::OutOfRange,
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
            Self::OutOfRange { .. } => ErrorReason::OutOfRange,
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
                // All of them: `fit_status` keeps the first ones and counts the rest.
                for violation in violations {
                    details.add_bad_request_violation(&violation.field, &violation.description);
                }
            }
            Self::NotFound { kind, name } | Self::AlreadyExists { kind, name } => {
                metadata.insert("kind".to_owned(), (*kind).to_owned());
                metadata.insert("name".to_owned(), name.clone());
            }
            Self::OutOfRange { field, message } => {
                details.add_bad_request_violation(*field, message);
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
        fit_status(self.code(), &self.to_string(), details)
    }
}

/// Describes the violations, each shortened, for the error's message: as many as fit in a few hundred bytes, then
/// a count of the rest (which the `BadRequest` detail lists, up to [`MAX_FIELD_VIOLATIONS`]).
fn describe_violations(violations: &[FieldViolation]) -> String {
    const DESCRIBED_BYTES: usize = 800;
    let mut text = String::new();
    let mut described = 0;
    for violation in violations {
        let part = format!(
            "{}: {}",
            shorten(&violation.field, 100),
            shorten(&violation.description, 200)
        );
        if described > 0 && text.len() + part.len() > DESCRIBED_BYTES {
            break;
        }
        if described > 0 {
            text.push_str("; ");
        }
        text.push_str(&part);
        described += 1;
    }
    if violations.len() > described {
        text.push_str(&format!("; and {} more", violations.len() - described));
    }
    text
}

/// The most field violations an error lists; one more violation, with an empty field, counts the others.
pub const MAX_FIELD_VIOLATIONS: usize = 10;

/// The most bytes an error's `grpc-message` and `grpc-status-details-bin` headers take together, as sent
/// (percent-encoded and base64).
pub const MAX_STATUS_BYTES: usize = 8 * 1024;

/// The longest error message, in bytes before percent-encoding.
const MAX_MESSAGE_BYTES: usize = 1024;

/// The longest text inside the details (a field, a description, a metadata value), in bytes.
const MAX_DETAIL_TEXT_BYTES: usize = 256;

/// The most metadata entries an `ErrorInfo` keeps.
const MAX_METADATA: usize = 16;

/// Builds a status whose message and details fit in [`MAX_STATUS_BYTES`]: texts are shortened (ending in `…`),
/// at most [`MAX_FIELD_VIOLATIONS`] field violations are listed and fewer while the whole is still too large (a
/// last violation, with an empty field, counts the others), and if even that is too large only the `ErrorInfo`
/// is kept. Details other than error info, bad request, quota failure and retry info are dropped.
pub fn fit_status(code: Code, message: &str, details: ErrorDetails) -> tonic::Status {
    let message = shorten(message, MAX_MESSAGE_BYTES);
    let message_bytes = encoded_message_len(&message);
    let violations = details
        .bad_request()
        .map(|bad| bad.field_violations.as_slice())
        .unwrap_or_default();
    for listed in (0..=violations.len().min(MAX_FIELD_VIOLATIONS)).rev() {
        let status = tonic::Status::with_error_details(code, message.as_ref(), shorten_details(&details, listed));
        if message_bytes + encoded_details_len(status.details()) <= MAX_STATUS_BYTES {
            return status;
        }
    }
    let mut bare = ErrorDetails::new();
    if let Some(info) = shorten_details(&details, 0).error_info() {
        bare.set_error_info(&info.reason, &info.domain, info.metadata.clone());
    }
    tonic::Status::with_error_details(code, message.as_ref(), bare)
}

/// Holds the gRPC status in `headers` (the trailers of an answer, or the headers of a trailers-only one) to
/// [`MAX_STATUS_BYTES`]; returns whether it had to shorten it.
pub fn fit_status_headers(headers: &mut http::HeaderMap) -> bool {
    let sent = |name: &str| headers.get(name).map_or(0, |value| value.len());
    if sent("grpc-message") + sent("grpc-status-details-bin") <= MAX_STATUS_BYTES {
        return false;
    }
    let Some(status) = tonic::Status::from_header_map(headers) else {
        return false;
    };
    let fitted = fit_status(status.code(), status.message(), status.get_error_details());
    headers.remove("grpc-message");
    headers.remove("grpc-status-details-bin");
    if let Err(error) = fitted.add_header(headers) {
        tracing::warn!(%error, "the shortened status does not fit in headers");
    }
    tracing::warn!(code = ?status.code(), "an error's message and details exceeded the size clients accept; shortened");
    true
}

/// Returns `text` cut to at most `max` bytes on a character boundary, ending in `…` when it was cut.
fn shorten(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…", &text[..end]))
}

/// Returns the details a client can act on (error info, bad request, quota failure, retry info) with every text
/// shortened, at most [`MAX_METADATA`] metadata entries, the first `listed` field violations and one more that
/// counts the others.
fn shorten_details(details: &ErrorDetails, listed: usize) -> ErrorDetails {
    let text = |value: &str| shorten(value, MAX_DETAIL_TEXT_BYTES).into_owned();
    let mut out = ErrorDetails::new();
    if let Some(info) = details.error_info() {
        let mut entries: Vec<_> = info.metadata.iter().collect();
        entries.sort();
        let metadata: HashMap<String, String> = entries
            .into_iter()
            .take(MAX_METADATA)
            .map(|(key, value)| (text(key), text(value)))
            .collect();
        out.set_error_info(text(&info.reason), text(&info.domain), metadata);
    }
    if let Some(bad) = details.bad_request() {
        let violations = &bad.field_violations;
        for violation in violations.iter().take(listed) {
            out.add_bad_request_violation(text(&violation.field), text(&violation.description));
        }
        if violations.len() > listed {
            let unlisted = violations.len() - listed;
            out.add_bad_request_violation("", format!("and {unlisted} more violations not listed"));
        }
    }
    if let Some(quota) = details.quota_failure() {
        for violation in quota.violations.iter().take(MAX_FIELD_VIOLATIONS) {
            out.add_quota_failure_violation(text(&violation.subject), text(&violation.description));
        }
    }
    if let Some(retry) = details.retry_info() {
        out.set_retry_info(retry.retry_delay);
    }
    out
}

/// The length of `message` as sent in `grpc-message` (tonic percent-encodes controls, non-ASCII and a few
/// punctuation characters).
fn encoded_message_len(message: &str) -> usize {
    message
        .bytes()
        .map(|byte| {
            if !(0x20..0x7f).contains(&byte) || b" \"#%<>`?{}".contains(&byte) {
                3
            } else {
                1
            }
        })
        .sum()
}

/// The length of `details` as sent in `grpc-status-details-bin` (base64 without padding).
fn encoded_details_len(details: &[u8]) -> usize {
    (details.len() * 4).div_ceil(3)
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

    /// The bytes the status's message and details take as response headers.
    fn sent_bytes(status: tonic::Status) -> usize {
        let response = status.into_http::<()>();
        ["grpc-message", "grpc-status-details-bin"]
            .iter()
            .map(|name| response.headers().get(*name).map_or(0, |value| value.len()))
            .sum()
    }

    #[test]
    fn a_thousand_violations_list_the_first_ones_and_count_the_rest() {
        let violations: Vec<_> = (0..1000)
            .map(|index| FieldViolation::new(format!("labels[\"k{index}{}\"]", "x".repeat(300)), "é".repeat(400)))
            .collect();
        let status = ApiError::InvalidArgument(violations).status("projects.cube.dev");
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        assert_eq!(details.error_info().expect("error info").reason, "FIELD_INVALID");
        let listed = &details.bad_request().expect("bad request").field_violations;
        assert!(listed.len() <= MAX_FIELD_VIOLATIONS + 1, "{} violations", listed.len());
        assert!(listed[0].field.starts_with("labels[\"k0x"), "{}", listed[0].field);
        let summary = listed.last().expect("a summary");
        assert_eq!(summary.field, "");
        let shown = listed.len() - 1;
        assert_eq!(
            summary.description,
            format!("and {} more violations not listed", 1000 - shown)
        );
        assert!(status.message().ends_with("; and 998 more"), "{}", status.message());
        let sent = sent_bytes(status);
        assert!(sent <= MAX_STATUS_BYTES, "{sent} bytes of message and details");
    }

    #[test]
    fn long_names_and_messages_are_shortened_to_fit() {
        let name = "ü".repeat(100_000);
        let status = ApiError::NotFound { kind: "project", name }.status("projects.cube.dev");
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().ends_with('…'), "{}", status.message());
        assert!(status.message().len() <= MAX_MESSAGE_BYTES);
        let info = status.get_details_error_info().expect("error info");
        assert_eq!(info.reason, "NOT_FOUND");
        assert!(info.metadata["name"].len() <= MAX_DETAIL_TEXT_BYTES);
        let sent = sent_bytes(status);
        assert!(sent <= MAX_STATUS_BYTES, "{sent} bytes");
    }

    #[test]
    fn oversized_statuses_built_elsewhere_are_shortened_in_their_headers() {
        let mut details = ErrorDetails::new();
        details.set_error_info(
            "ECHO_FAILURE",
            "echo.cube.dev",
            HashMap::from([("k".to_owned(), "v".repeat(50_000))]),
        );
        for index in 0..2000 {
            details.add_bad_request_violation(format!("field{index}"), "bad ".repeat(20));
        }
        let status = tonic::Status::with_error_details(Code::FailedPrecondition, "%".repeat(100_000), details);
        let mut headers = http::HeaderMap::new();
        status.add_header(&mut headers).expect("headers");
        assert!(fit_status_headers(&mut headers), "the status was too large");
        let sent: usize = ["grpc-message", "grpc-status-details-bin"]
            .iter()
            .map(|name| headers.get(*name).map_or(0, |value| value.len()))
            .sum();
        assert!(sent <= MAX_STATUS_BYTES, "{sent} bytes");
        let fitted = tonic::Status::from_header_map(&headers).expect("a status");
        assert_eq!(fitted.code(), Code::FailedPrecondition);
        assert_eq!(
            fitted.get_details_error_info().expect("error info").reason,
            "ECHO_FAILURE"
        );

        // Small statuses are left as they are.
        let small = tonic::Status::not_found("nothing here");
        let mut headers = http::HeaderMap::new();
        small.add_header(&mut headers).expect("headers");
        assert!(!fit_status_headers(&mut headers));
        assert_eq!(
            headers.get("grpc-message").map(http::HeaderValue::as_bytes),
            Some(&b"nothing%20here"[..])
        );
    }
}
