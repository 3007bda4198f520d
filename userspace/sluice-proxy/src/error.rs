//! Typed errors: start-up errors and per-request errors that become short HTTP responses.

use std::io;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{ProxyBody, full};
use crate::headers::{put_field, put_status_line};

/// A configuration problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value is out of range or inconsistent.
    #[error("invalid config: {0}")]
    Invalid(String),
    /// A file named by the config could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// A certificate or key could not be used.
    #[error("tls: {0}")]
    Tls(String),
}

/// A start-up or serving error of the proxy as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Binding a listener failed.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: io::Error,
    },
    /// Another I/O failure.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Why a request was answered by the proxy itself instead of a replica.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RequestError {
    /// Malformed or ambiguous request (smuggling vectors, bad authority, unsafe headers).
    #[error("{0}")]
    BadRequest(&'static str),
    /// Request target too long.
    #[error("request target too long")]
    UriTooLong,
    /// Header block too large.
    #[error("request headers too large")]
    HeadersTooLarge,
    /// Body over the server's limit.
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(u64),
    /// No server claims this domain (status is configurable: 503 or 404).
    #[error("no server for this domain")]
    UnknownDomain(StatusCode),
    /// The server exists but has no ready replica.
    #[error("no ready replica")]
    NoReplica,
    /// Connecting to or talking to the replica failed before a response.
    #[error("upstream: {0}")]
    Upstream(String),
    /// The replica did not answer in time.
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// The server is at its in-flight limit.
    #[error("server at its in-flight limit")]
    Overloaded,
    /// The proxy is shutting down.
    #[error("shutting down")]
    ShuttingDown,
    /// Proxy auth: credentials missing or wrong (401). `close`: the request body was not
    /// drained, so an HTTP/1.1 connection must close.
    #[error("missing or invalid credentials")]
    Unauthenticated {
        /// Close the HTTP/1.1 connection.
        close: bool,
    },
    /// Proxy auth: the token is not allowed for this server (403).
    #[error("token not allowed for this server")]
    Forbidden {
        /// Close the HTTP/1.1 connection.
        close: bool,
    },
}

impl RequestError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            RequestError::BadRequest(_) => StatusCode::BAD_REQUEST,
            RequestError::UriTooLong => StatusCode::URI_TOO_LONG,
            RequestError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            RequestError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            RequestError::UnknownDomain(s) => *s,
            RequestError::NoReplica | RequestError::Overloaded | RequestError::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            RequestError::Upstream(_) => StatusCode::BAD_GATEWAY,
            RequestError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            RequestError::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            RequestError::Forbidden { .. } => StatusCode::FORBIDDEN,
        }
    }

    /// A stable name for why sluice answered itself (the access log's `error`).
    pub fn reason(&self) -> &'static str {
        match self {
            RequestError::BadRequest(_) => "bad_request",
            RequestError::UriTooLong => "uri_too_long",
            RequestError::HeadersTooLarge => "headers_too_large",
            RequestError::BodyTooLarge(_) => "body_too_large",
            RequestError::UnknownDomain(_) => "unknown_domain",
            RequestError::NoReplica => "no_replica",
            RequestError::Upstream(_) => "upstream",
            RequestError::UpstreamTimeout => "upstream_timeout",
            RequestError::Overloaded => "overloaded",
            RequestError::ShuttingDown => "shutting_down",
            RequestError::Unauthenticated { .. } => "unauthenticated",
            RequestError::Forbidden { .. } => "forbidden",
        }
    }

    /// Whether an HTTP/1.1 connection must close after this answer (the request's framing
    /// or body is unknowable or was left unread).
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            RequestError::BadRequest(_)
                | RequestError::BodyTooLarge(_)
                | RequestError::Unauthenticated { close: true }
                | RequestError::Forbidden { close: true }
        )
    }

    /// The reason the client is told. A 503 for a domain no server claims reads exactly
    /// like one for a server without a ready replica, so a prober cannot tell which names
    /// exist; logs keep the difference ([`std::fmt::Display`]).
    fn public_reason(&self) -> std::borrow::Cow<'static, str> {
        match self {
            RequestError::UnknownDomain(s) if *s == StatusCode::SERVICE_UNAVAILABLE => {
                RequestError::NoReplica.to_string().into()
            }
            other => other.to_string().into(),
        }
    }

    /// The plain-text body every answer of sluice's own carries: status, reason, request id.
    fn text(&self, request_id: &str) -> String {
        let status = self.status();
        format!(
            "{} {}: {}\nrequest id: {}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            self.public_reason(),
            request_id
        )
    }

    /// The same answer as [`Self::into_response`], written as HTTP/1.1 bytes onto `out`
    /// (the HTTP/1.1 fast path frames its own responses); `close` adds `connection: close`.
    /// Returns the length of the body.
    pub(crate) fn write_h1(
        &self,
        request_id_header: &header::HeaderName,
        request_id: &str,
        close: bool,
        out: &mut Vec<u8>,
    ) -> usize {
        let status = self.status();
        let text = self.text(request_id);
        put_status_line(out, status);
        out.extend_from_slice(
            b"content-type: text/plain; charset=utf-8\r\ncache-control: no-store\r\n",
        );
        put_field(out, request_id_header.as_str().as_bytes(), request_id.as_bytes());
        if status == StatusCode::UNAUTHORIZED {
            out.extend_from_slice(b"www-authenticate: Sluice realm=\"sluice\"\r\n");
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            out.extend_from_slice(b"retry-after: 1\r\n");
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(text.len()).as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(text.as_bytes());
        text.len()
    }

    /// A short plain-text response carrying the reason and the request id.
    pub fn into_response(
        self,
        request_id_header: &header::HeaderName,
        request_id: &str,
    ) -> Response<ProxyBody> {
        let status = self.status();
        let text = self.text(request_id);
        let mut resp = Response::new(full(Bytes::from(text)));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(v) = crate::headers::request_id_value(request_id) {
            h.insert(request_id_header.clone(), v);
        }
        if status == StatusCode::UNAUTHORIZED {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Sluice realm=\"sluice\""));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}
