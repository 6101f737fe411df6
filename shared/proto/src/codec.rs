//! The codec every generated Cube client and server uses: prost's, except that a message that cannot be decoded
//! is the sender's mistake, answered `INVALID_ARGUMENT` with the `MALFORMED_REQUEST` reason, not `INTERNAL`.
//!
//! tonic-prost maps every `prost::DecodeError` to `INTERNAL` (gRPC's table of status codes does). For a server
//! that tells a client "retry, we broke" about bytes the client sent, so the build sets this codec with
//! tonic-prost-build's `codec_path` for every service. Each proto package names its own [`Domain`], so the
//! error's `ErrorInfo` carries the domain of the service that refused the message (e.g. `auth.cube.dev`).
//!
//! Clients share the codec (tonic-prost-build has one codec path for both sides): an answer a client cannot decode
//! is reported the same way, under the domain of the package that answered.

use std::collections::HashMap;
use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;
use tonic_types::{ErrorDetails, StatusExt};

use crate::cube::common::v1::ErrorReason;

/// The `ErrorInfo` domain of the services of one proto package.
pub trait Domain: Send + Sync + 'static {
    /// The domain, e.g. `auth.cube.dev`.
    const DOMAIN: &'static str;
}

/// The domain of `cube.auth.v1`.
#[derive(Debug, Clone, Copy)]
pub struct Auth;

impl Domain for Auth {
    const DOMAIN: &'static str = "auth.cube.dev";
}

/// The domain of `cube.projects.v1`.
#[derive(Debug, Clone, Copy)]
pub struct Projects;

impl Domain for Projects {
    const DOMAIN: &'static str = "projects.cube.dev";
}

/// The domain of `cube.scheduler.v1`.
#[derive(Debug, Clone, Copy)]
pub struct Scheduler;

impl Domain for Scheduler {
    const DOMAIN: &'static str = "scheduler.cube.dev";
}

/// The domain of `cube.watcher.v1`.
#[derive(Debug, Clone, Copy)]
pub struct Watcher;

impl Domain for Watcher {
    const DOMAIN: &'static str = "watcher.cube.dev";
}

/// The domain of `cube.workflow.v1`.
#[derive(Debug, Clone, Copy)]
pub struct Workflow;

impl Domain for Workflow {
    const DOMAIN: &'static str = "workflow.cube.dev";
}

/// The domain of `cube.common.v1`, whose services several Cube services implement.
#[derive(Debug, Clone, Copy)]
pub struct Common;

impl Domain for Common {
    const DOMAIN: &'static str = "cube.dev";
}

/// A prost codec that answers undecodable messages with `INVALID_ARGUMENT` and `MALFORMED_REQUEST`.
#[derive(Debug)]
pub struct CubeCodec<T, U, D> {
    _types: PhantomData<(T, U, D)>,
}

impl<T, U, D> Default for CubeCodec<T, U, D> {
    fn default() -> Self {
        Self { _types: PhantomData }
    }
}

impl<T, U, D> Codec for CubeCodec<T, U, D>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
    D: Domain,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CubeDecoder<U, D>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        CubeDecoder { _types: PhantomData }
    }
}

/// Decodes `U` with prost, refusing malformed bytes as the sender's mistake.
#[derive(Debug)]
pub struct CubeDecoder<U, D> {
    _types: PhantomData<(U, D)>,
}

impl<U, D> Decoder for CubeDecoder<U, D>
where
    U: Message + Default,
    D: Domain,
{
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        decode::<U, D>(buf).map(Some)
    }
}

/// Decodes one `U` from `buf`.
fn decode<U: Message + Default, D: Domain>(buf: impl bytes::Buf) -> Result<U, Status> {
    U::decode(buf).map_err(malformed::<D>)
}

/// The status of a message that is not valid protobuf for its type: prost's description names the field path.
fn malformed<D: Domain>(error: prost::DecodeError) -> Status {
    let reason = ErrorReason::MalformedRequest.as_str_name();
    let reason = reason.strip_prefix("ERROR_REASON_").unwrap_or(reason);
    let details = ErrorDetails::with_error_info(reason, D::DOMAIN, HashMap::new());
    Status::with_error_details(
        tonic::Code::InvalidArgument,
        format!("malformed request: the message is not valid protobuf: {error}"),
        details,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cube::auth::v1::LoginRequest;

    #[test]
    fn undecodable_bytes_are_invalid_argument_with_malformed_request() {
        // Field 1 (username) holding bytes that are not UTF-8; a truncated varint; wire type 7.
        for bytes in [&[0x0a, 0x02, 0xff, 0xfe][..], &[0x08, 0xff], &[0x0f]] {
            let status = decode::<LoginRequest, Auth>(bytes).expect_err("malformed");
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bytes:?}: {status:?}");
            let info = status.get_details_error_info().expect("error info");
            assert_eq!(info.reason, "MALFORMED_REQUEST");
            assert_eq!(info.domain, "auth.cube.dev");
            assert!(
                status.message().starts_with("malformed request"),
                "{}",
                status.message()
            );
        }
    }

    #[test]
    fn valid_messages_decode() {
        let message = LoginRequest {
            username: "lena".into(),
            password: "secret".into(),
        };
        let decoded = decode::<LoginRequest, Auth>(message.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(decoded, message);
    }
}
