//! A minimal grpc-web client over raw HTTP/1.1 or HTTP/2 connections, for tests that need to send exactly the
//! bytes they choose (broken frames, bad headers) and for the gateway benchmark.

use std::net::SocketAddr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// The grpc-web wire format of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `application/grpc-web+proto`: length-prefixed binary frames.
    Binary,
    /// `application/grpc-web-text`: the same frames in base64.
    Text,
}

impl Mode {
    fn content_type(self) -> &'static str {
        match self {
            Self::Binary => "application/grpc-web+proto",
            Self::Text => "application/grpc-web-text",
        }
    }
}

/// The HTTP version a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Http {
    /// HTTP/1.1, as browsers use for grpc-web most often.
    One,
    /// HTTP/2 with prior knowledge.
    Two,
}

enum Sender {
    One(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Two(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// One connection that sends grpc-web calls.
pub struct GrpcWebClient {
    authority: String,
    sender: Sender,
}

impl std::fmt::Debug for GrpcWebClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcWebClient")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

/// The answer to a grpc-web call.
#[derive(Debug)]
pub struct GrpcWebReply {
    /// The HTTP status.
    pub http_status: http::StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    /// The messages of the response, without their frame headers.
    pub messages: Vec<Bytes>,
    /// The trailers from the body's trailer frame (empty for a trailers-only answer).
    pub trailers: HeaderMap,
}

impl GrpcWebReply {
    /// Returns the call's gRPC status, read from the trailers or, for a trailers-only answer, the headers.
    pub fn status(&self) -> tonic::Status {
        status_of(&self.headers, &self.trailers)
    }
}

/// A call's gRPC status: from the trailers, or the headers of a trailers-only answer.
fn status_of(headers: &HeaderMap, trailers: &HeaderMap) -> tonic::Status {
    let source = if trailers.contains_key("grpc-status") {
        trailers
    } else {
        headers
    };
    tonic::Status::from_header_map(source)
        .unwrap_or_else(|| tonic::Status::unknown(format!("no grpc-status in {source:?}")))
}

/// Frames `message` as one uncompressed gRPC message.
pub fn frame(message: &impl prost::Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(0);
    out.put_u32(u32::try_from(body.len()).unwrap_or(u32::MAX));
    out.put_slice(&body);
    out.freeze()
}

impl GrpcWebClient {
    /// Connects to `address` over `http`.
    ///
    /// # Errors
    /// Returns an error when the connection or handshake fails.
    pub async fn connect(address: SocketAddr, http: Http) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let stream = tokio::net::TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        let io = TokioIo::new(stream);
        let sender = match http {
            Http::One => {
                let (sender, connection) = hyper::client::conn::http1::handshake(io).await?;
                tokio::spawn(connection);
                Sender::One(sender)
            }
            Http::Two => {
                let (sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(connection);
                Sender::Two(sender)
            }
        };
        Ok(Self {
            authority: address.to_string(),
            sender,
        })
    }

    /// Sends `body` (already framed; see [`frame`]) to `path` in `mode`, with `headers` added, and reads the
    /// whole answer.
    ///
    /// # Errors
    /// Returns an error when the HTTP exchange fails or the answer's framing is broken.
    pub async fn call(
        &mut self,
        path: &str,
        mode: Mode,
        body: Bytes,
        headers: &[(&str, &str)],
    ) -> Result<GrpcWebReply, Box<dyn std::error::Error + Send + Sync>> {
        let response = self.send(path, mode, body, headers).await?;
        let (parts, body) = response.into_parts();
        let mut bytes = body.collect().await?.to_bytes();
        if mode == Mode::Text {
            bytes = decode_text(&bytes)?;
        }
        let (messages, trailers) = parse_frames(bytes)?;
        Ok(GrpcWebReply {
            http_status: parts.status,
            headers: parts.headers,
            messages,
            trailers,
        })
    }

    /// Sends `body` to the server-streaming method `path` in binary mode, with `headers` added, and returns the
    /// answer to read message by message as it arrives.
    ///
    /// # Errors
    /// Returns an error when the HTTP exchange fails.
    pub async fn open(
        &mut self,
        path: &str,
        body: Bytes,
        headers: &[(&str, &str)],
    ) -> Result<GrpcWebStream, Box<dyn std::error::Error + Send + Sync>> {
        let response = self.send(path, Mode::Binary, body, headers).await?;
        let (parts, body) = response.into_parts();
        Ok(GrpcWebStream {
            headers: parts.headers,
            body,
            buffer: BytesMut::new(),
            trailers: HeaderMap::new(),
        })
    }

    async fn send(
        &mut self,
        path: &str,
        mode: Mode,
        body: Bytes,
        headers: &[(&str, &str)],
    ) -> Result<http::Response<hyper::body::Incoming>, Box<dyn std::error::Error + Send + Sync>> {
        let body = match mode {
            Mode::Binary => body,
            Mode::Text => Bytes::from(STANDARD.encode(&body)),
        };
        let mut request = Request::post(format!("http://{}{path}", self.authority))
            .header("content-type", mode.content_type())
            .header("accept", mode.content_type())
            .header("x-grpc-web", "1")
            .body(Full::new(body))?;
        for (name, value) in headers {
            request
                .headers_mut()
                .insert(HeaderName::from_bytes(name.as_bytes())?, HeaderValue::from_str(value)?);
        }
        Ok(match &mut self.sender {
            Sender::One(sender) => {
                sender.ready().await?;
                sender.send_request(request).await?
            }
            Sender::Two(sender) => {
                *request.uri_mut() = format!("http://{}{path}", self.authority).parse()?;
                sender.ready().await?;
                sender.send_request(request).await?
            }
        })
    }
}

/// A grpc-web answer being read as it arrives (binary mode).
#[derive(Debug)]
pub struct GrpcWebStream {
    headers: HeaderMap,
    body: hyper::body::Incoming,
    buffer: BytesMut,
    trailers: HeaderMap,
}

impl GrpcWebStream {
    /// The next message, without its frame header; `None` once the trailers (or the end) came.
    ///
    /// # Errors
    /// Returns an error when the connection fails or the framing is broken.
    pub async fn message(&mut self) -> Result<Option<Bytes>, Box<dyn std::error::Error + Send + Sync>> {
        loop {
            if self.buffer.len() >= 5 {
                let size =
                    u32::from_be_bytes([self.buffer[1], self.buffer[2], self.buffer[3], self.buffer[4]]) as usize;
                if self.buffer.len() >= 5 + size {
                    let frame = self.buffer.split_to(5 + size).freeze();
                    let (mut messages, trailers) = parse_frames(frame)?;
                    if messages.is_empty() {
                        self.trailers = trailers;
                        return Ok(None);
                    }
                    return Ok(messages.pop());
                }
            }
            match self.body.frame().await {
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
                None if self.buffer.is_empty() => return Ok(None),
                None => return Err("grpc-web answer ends inside a frame".into()),
            }
        }
    }

    /// The call's gRPC status once the stream ended: from the trailers, or the headers of a trailers-only answer.
    pub fn status(&self) -> tonic::Status {
        status_of(&self.headers, &self.trailers)
    }
}

/// Decodes grpc-web-text, which may be several padded base64 runs back to back, four characters at a time.
fn decode_text(text: &[u8]) -> Result<Bytes, base64::DecodeError> {
    let mut out = BytesMut::with_capacity(text.len() / 4 * 3);
    for quad in text.chunks(4) {
        out.extend_from_slice(&STANDARD.decode(quad)?);
    }
    Ok(out.freeze())
}

fn parse_frames(mut bytes: Bytes) -> Result<(Vec<Bytes>, HeaderMap), Box<dyn std::error::Error + Send + Sync>> {
    let mut messages = Vec::new();
    let mut trailers = HeaderMap::new();
    while bytes.has_remaining() {
        if bytes.remaining() < 5 {
            return Err("grpc-web answer ends inside a frame header".into());
        }
        let flag = bytes.get_u8();
        let size = bytes.get_u32() as usize;
        if bytes.remaining() < size {
            return Err("grpc-web answer ends inside a frame".into());
        }
        let payload = bytes.split_to(size);
        if flag & 0x80 == 0 {
            messages.push(payload);
            continue;
        }
        for line in String::from_utf8_lossy(&payload).split("\r\n") {
            if let Some((name, value)) = line.split_once(':') {
                trailers.append(
                    HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes())?,
                    HeaderValue::from_str(value.trim())?,
                );
            }
        }
    }
    Ok((messages, trailers))
}
