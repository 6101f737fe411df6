//! Checking the gRPC framing of a request body while it streams through, without buffering messages.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use cube_kit::ApiError;
use http_body::{Body as HttpBody, Frame, SizeHint};

/// The first framing problem found in a request body, shared between the body and the call that forwards it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Violation(Arc<Mutex<Option<ApiError>>>);

impl Violation {
    fn record(&self, error: ApiError) {
        if let Ok(mut slot) = self.0.lock()
            && slot.is_none()
        {
            *slot = Some(error);
        }
    }

    /// Takes the recorded problem, if any.
    pub(crate) fn take(&self) -> Option<ApiError> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }
}

/// Where the checker is inside the stream of length-prefixed messages.
#[derive(Debug)]
enum Position {
    /// Reading a 5-byte message header; holds the bytes read so far.
    Header { bytes: [u8; 5], read: usize },
    /// Inside a message body; holds the bytes still to come and the message's size.
    Message { remaining: usize, size: usize },
}

/// What a request body must hold besides well-formed frames.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Rules {
    /// The called method takes exactly one request message (it is not client-streaming).
    pub(crate) single_message: bool,
    /// The request names a `grpc-encoding`, so messages may be compressed.
    pub(crate) compressed: bool,
}

#[derive(Debug)]
pub(crate) struct FrameChecker {
    limit: usize,
    rules: Rules,
    position: Position,
    messages: usize,
}

impl FrameChecker {
    pub(crate) fn new(limit: usize, rules: Rules) -> Self {
        Self {
            limit,
            rules,
            position: Position::Header { bytes: [0; 5], read: 0 },
            messages: 0,
        }
    }

    /// Advances over `data`, returning the first problem it shows.
    pub(crate) fn advance(&mut self, mut data: &[u8]) -> Result<(), ApiError> {
        while !data.is_empty() {
            match &mut self.position {
                Position::Header { bytes, read } => {
                    let take = (5 - *read).min(data.len());
                    bytes[*read..*read + take].copy_from_slice(&data[..take]);
                    *read += take;
                    data.advance(take);
                    if *read == 5 {
                        if bytes[0] > 1 {
                            return Err(ApiError::MalformedRequest(format!(
                                "message flag {:#04x} is neither 0 (plain) nor 1 (compressed)",
                                bytes[0]
                            )));
                        }
                        if bytes[0] == 1 && !self.rules.compressed {
                            return Err(ApiError::MalformedRequest(
                                "a message is marked compressed but the request names no grpc-encoding".into(),
                            ));
                        }
                        self.messages += 1;
                        if self.rules.single_message && self.messages > 1 {
                            return Err(ApiError::MalformedRequest(
                                "the method takes one request message, and the body holds more".into(),
                            ));
                        }
                        let size = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
                        if size > self.limit {
                            return Err(ApiError::MessageTooLarge {
                                limit: self.limit,
                                size,
                            });
                        }
                        self.position = Position::Message { remaining: size, size };
                        if size == 0 {
                            self.position = Position::Header { bytes: [0; 5], read: 0 };
                        }
                    }
                }
                Position::Message { remaining, .. } => {
                    let take = (*remaining).min(data.len());
                    *remaining -= take;
                    data.advance(take);
                    if *remaining == 0 {
                        self.position = Position::Header { bytes: [0; 5], read: 0 };
                    }
                }
            }
        }
        Ok(())
    }

    /// Returns whether the body may end here: between messages, and after the one message of a unary method.
    pub(crate) fn may_end(&self) -> bool {
        matches!(self.position, Position::Header { read: 0, .. }) && !(self.rules.single_message && self.messages == 0)
    }

    /// Checks that the body did not end inside a message, nor before the one message of a unary method.
    pub(crate) fn finish(&self) -> Result<(), ApiError> {
        match self.position {
            Position::Header { read: 0, .. } if self.rules.single_message && self.messages == 0 => Err(
                ApiError::MalformedRequest("the method takes one request message, and the body holds none".into()),
            ),
            Position::Header { read: 0, .. } => Ok(()),
            Position::Header { read, .. } => Err(ApiError::MalformedRequest(format!(
                "request body ends inside a message header ({read} of 5 bytes)"
            ))),
            Position::Message { remaining, size } => Err(ApiError::MalformedRequest(format!(
                "request body ends inside a message ({} of {size} bytes)",
                size - remaining
            ))),
        }
    }
}

pin_project_lite::pin_project! {
    /// A request body that checks framing and message sizes as it streams, and fails the stream (so the upstream
    /// call is reset) at the first problem, which it records in its [`Violation`].
    pub(crate) struct CheckedBody<B> {
        #[pin]
        inner: B,
        checker: FrameChecker,
        violation: Violation,
        failed: bool,
    }
}

impl<B> CheckedBody<B> {
    pub(crate) fn new(inner: B, limit: usize, rules: Rules, violation: Violation) -> Self {
        Self {
            inner,
            checker: FrameChecker::new(limit, rules),
            violation,
            failed: false,
        }
    }
}

/// The error a [`CheckedBody`] fails its stream with; the proxy answers with the recorded [`Violation`] instead.
#[derive(Debug, thiserror::Error)]
#[error("request body rejected by the gateway")]
pub(crate) struct Rejected;

impl<B> HttpBody for CheckedBody<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = Rejected;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Rejected>>> {
        let this = self.project();
        if *this.failed {
            return Poll::Ready(Some(Err(Rejected)));
        }
        let error = match ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => match frame.data_ref().map(|data| this.checker.advance(data)) {
                Some(Err(error)) => error,
                _ => return Poll::Ready(Some(Ok(frame))),
            },
            Some(Err(error)) => ApiError::MalformedRequest(format!("cannot read the request body: {error}")),
            None => match this.checker.finish() {
                Ok(()) => return Poll::Ready(None),
                Err(error) => error,
            },
        };
        tracing::debug!(%error, "rejecting request body");
        this.violation.record(error);
        *this.failed = true;
        Poll::Ready(Some(Err(Rejected)))
    }

    fn is_end_stream(&self) -> bool {
        // Inside a message, or before a unary method's message, the sender must poll once more so that the
        // problem is seen and reported.
        !self.failed && self.inner.is_end_stream() && self.checker.may_end()
    }

    fn size_hint(&self) -> SizeHint {
        // tonic-web passes on the size of the base64 text for grpc-web-text, which is not the size of the decoded
        // body; an exact hint would become a wrong content-length upstream, so none is given.
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&u32::try_from(payload.len()).expect("small").to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn whole_messages_pass_in_any_chunking() {
        let mut stream = frame(b"hello");
        stream.extend(frame(b""));
        stream.extend(frame(&[7; 300]));
        for chunk in [1, 2, 3, 5, 7, 64, 1000] {
            let mut checker = FrameChecker::new(1024, Rules::default());
            for piece in stream.chunks(chunk) {
                checker.advance(piece).expect("valid");
            }
            checker.finish().expect("complete");
        }
    }

    #[test]
    fn unary_methods_take_exactly_one_message() {
        let unary = Rules {
            single_message: true,
            ..Rules::default()
        };
        let checker = FrameChecker::new(1024, unary);
        assert!(!checker.may_end(), "an empty body is not a unary request");
        let err = checker.finish().expect_err("no message");
        assert!(err.to_string().contains("holds none"), "{err}");

        let mut checker = FrameChecker::new(1024, unary);
        checker.advance(&frame(b"one")).expect("one message");
        assert!(checker.may_end());
        checker.finish().expect("one message is complete");
        let err = checker.advance(&frame(b"two")).expect_err("a second message");
        assert!(matches!(err, ApiError::MalformedRequest(_)), "{err}");
        assert!(err.to_string().contains("holds more"), "{err}");

        // An empty message is still a message.
        let mut checker = FrameChecker::new(1024, unary);
        checker.advance(&frame(b"")).expect("one empty message");
        checker.finish().expect("complete");

        let mut streaming = FrameChecker::new(1024, Rules::default());
        streaming.finish().expect("a client stream may be empty");
        for _ in 0..3 {
            streaming.advance(&frame(b"x")).expect("a client stream may hold many");
        }
    }

    #[test]
    fn truncation_oversize_and_bad_flags_are_caught() {
        let mut checker = FrameChecker::new(1024, Rules::default());
        checker.advance(&frame(b"hello")[..7]).expect("partial is fine so far");
        let err = checker.finish().expect_err("truncated");
        assert!(err.to_string().contains("2 of 5 bytes"), "{err}");

        let mut checker = FrameChecker::new(4, Rules::default());
        let err = checker.advance(&frame(b"hello")).expect_err("too large");
        assert!(matches!(err, ApiError::MessageTooLarge { limit: 4, size: 5 }), "{err}");

        let mut checker = FrameChecker::new(1024, Rules::default());
        let err = checker.advance(&[9, 0, 0, 0, 1, 0]).expect_err("flag");
        assert!(err.to_string().contains("0x09"), "{err}");

        let mut checker = FrameChecker::new(1024, Rules::default());
        let err = checker
            .advance(&[1, 0, 0, 0, 1, 0])
            .expect_err("compressed without an encoding");
        assert!(err.to_string().contains("grpc-encoding"), "{err}");
        let compressed = Rules {
            compressed: true,
            ..Rules::default()
        };
        FrameChecker::new(1024, compressed)
            .advance(&[1, 0, 0, 0, 1, 0])
            .expect("compressed with an encoding");

        let mut checker = FrameChecker::new(1024, Rules::default());
        checker.advance(&[0, 0]).expect("half a header");
        assert!(checker.finish().is_err());
    }
}
