//! Extractors that answer in the JSON error contract instead of axum's plain-text rejections.

use crate::{ApiError, AuthError, Authenticator, User};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use cqrs_core::Metadata;
use serde::de::DeserializeOwned;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use uuid::Uuid;

/// A JSON body. Answers 415 for another content type (or two `Content-Type` headers), a
/// charset other than UTF-8, or a body
/// in a content or transfer coding (`Content-Encoding: gzip`, `Transfer-Encoding: gzip,
/// chunked`: the server reads bodies as sent), 400 `malformed_json` for broken JSON,
/// 422 `invalid_body` for JSON of the wrong shape (with serde's message), 413 for a body over
/// the limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

fn is_json(parts: &HeaderMap) -> bool {
    parts
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json"
                || mime
                    .strip_prefix("application/")
                    .is_some_and(|sub| sub.len() > "+json".len() && sub.ends_with("+json"))
        })
        .unwrap_or(false)
}

/// The `charset` of the content type when it is not UTF-8, clipped for quoting: JSON between
/// systems is UTF-8 (RFC 8259 8.1), and a body in another is not read as sent.
fn other_charset(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    value
        .split(';')
        .skip(1)
        .filter_map(|param| param.split_once('='))
        .filter(|(name, _)| name.trim().eq_ignore_ascii_case("charset"))
        .map(|(_, charset)| charset.trim().trim_matches('"'))
        .find(|charset| {
            !charset.eq_ignore_ascii_case("utf-8") && !charset.eq_ignore_ascii_case("utf8")
        })
        .map(|charset| clipped(charset, 40))
}

/// The first transfer coding of the body other than `chunked` (which hyper takes off),
/// clipped for quoting.
fn transfer_coding(headers: &HeaderMap) -> Option<String> {
    first_coding_but(headers, header::TRANSFER_ENCODING, "chunked")
}

/// The first content coding of the body other than `identity`, clipped for quoting: a body
/// in one (compressed) is not JSON as sent.
fn content_coding(headers: &HeaderMap) -> Option<String> {
    first_coding_but(headers, header::CONTENT_ENCODING, "identity")
}

/// The first coding `name` lists other than `except`, clipped for quoting.
fn first_coding_but(headers: &HeaderMap, name: header::HeaderName, except: &str) -> Option<String> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|value| {
            // A value that is not visible ASCII names no coding this server reads either.
            let text = value.to_str().unwrap_or("(not ASCII)");
            text.split(',').map(str::trim).collect::<Vec<_>>()
        })
        .find(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case(except))
        .map(|coding| clipped(coding, 40))
}

/// The error a request body fails with when it has not all arrived by its deadline: the
/// gateway gives every body one, half the request's time budget, so a body that stops or
/// trickles in is answered before the budget runs out. [`ApiJson`] answers it 408
/// `request_timeout`: the client's doing, so no advice to retry.
#[derive(Debug, Clone, Copy, Default, thiserror::Error)]
#[error("the request body did not arrive before its deadline")]
pub struct BodyDeadlineElapsed;

/// Whether reading the body failed because the client did not send it in time (the gateway's
/// body deadline, or tower-http's body timeout): the client's doing, so a 408, not a
/// retryable 503.
fn stalled(error: &BytesRejection) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = next {
        if error.is::<BodyDeadlineElapsed>() || error.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        next = error.source();
    }
    false
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // Two are refused, not the first taken: a proxy or filter in front that reads the
        // other would judge the body as something else.
        if req
            .headers()
            .get_all(header::CONTENT_TYPE)
            .iter()
            .nth(1)
            .is_some()
        {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send one `Content-Type` header, not several",
            ));
        }
        if !is_json(req.headers()) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with `Content-Type: application/json`",
            ));
        }
        if let Some(charset) = other_charset(req.headers()) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "the body is in the charset {charset:?}; JSON is UTF-8: send it as UTF-8, \
                     with `charset=utf-8` or no charset"
                ),
            ));
        }
        if let Some(coding) = transfer_coding(req.headers()) {
            // RFC 9112 6.1: a transfer coding the server does not decode. Read as it is, the
            // body would fail as "not valid JSON", or pass as JSON if the label lied.
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "the body is in the transfer coding {coding:?}, which this server does not \
                     decode: send it with `Transfer-Encoding: chunked` alone, or a Content-Length"
                ),
            ));
        }
        if let Some(coding) = content_coding(req.headers()) {
            // RFC 7694: a coding the server does not read is 415, naming what it takes. Read
            // as it is, a compressed body would fail as "not valid JSON", which it is.
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "the body is in the content coding {coding:?}, which this server does not \
                     decode: send it uncompressed, without `Content-Encoding`"
                ),
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| match e {
            BytesRejection::FailedToBufferBody(inner)
                if inner.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    crate::BODY_TOO_LARGE,
                )
            }
            other if stalled(&other) => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                crate::BODY_TOO_SLOW,
            ),
            other => ApiError::bad_request(
                "unreadable_body",
                format!("the body could not be read: {}", other.body_text()),
            ),
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Parses JSON with the contract's error codes. Every body of the API is an object: serde
/// would also take a struct's fields from an array, in order (`["<id>"]` for
/// `{"assignee_id": "<id>"}`, `[]` for a body of optional fields), so an array is refused.
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_none() {
        // serde would say "EOF while parsing a value at line 1 column 0".
        return Err(ApiError::bad_request(
            "malformed_json",
            "the body is empty: send a JSON object",
        ));
    }
    if first == Some(&b'[') {
        check_json(bytes)?;
        return Err(ApiError::unprocessable(
            "invalid_body",
            "the body must be a JSON object, not an array",
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        // The typed parse stops at the first thing it refuses, which may be a value of the
        // wrong shape before the syntax breaks further on, or valid JSON it files under
        // syntax (a number too large for the field's type, `1e400`). Read as any JSON at all
        // (this runs on the error path only), the body tells broken JSON, with where it
        // breaks, from JSON of the wrong shape.
        match check_json(bytes) {
            Ok(()) => wrong_shape(&e, wrong_shape_at::<T>(bytes)),
            Err(broken) => broken,
        }
    })
}

/// Where in valid JSON `bytes` the typed parse refused a value (`email`, `tags[2]`, a field
/// the route does not know), unless at the top (a missing field is the object's problem). Parsed again with
/// the path tracked, on the error path only: the parse that succeeds pays nothing for it.
fn wrong_shape_at<T: DeserializeOwned>(bytes: &[u8]) -> Option<String> {
    let mut parser = serde_json::Deserializer::from_slice(bytes);
    let error = serde_path_to_error::deserialize::<_, T>(&mut parser).err()?;
    let path = error.path().to_string();
    // A field's name or a map's key is the client's text: quoted briefly, as the message
    // after it may quote it again.
    (path != ".").then(|| clipped(&path, MAX_QUOTED_FIELD))
}

/// 400 `malformed_json` unless `bytes` is JSON: UTF-8 text (RFC 8259 8.1; serde's
/// `IgnoredAny` skips strings unread) of JSON's grammar. Not read into a `Value`, which would
/// refuse numbers past `f64` (`1e400`), valid JSON.
fn check_json(bytes: &[u8]) -> Result<(), ApiError> {
    if let Err(e) = std::str::from_utf8(bytes) {
        return Err(ApiError::bad_request(
            "malformed_json",
            format!(
                "the body is not valid JSON: it is not UTF-8 text (from byte {})",
                e.valid_up_to()
            ),
        ));
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
        .map(drop)
        .map_err(|e| malformed(&e))
}

/// serde's message in the API's words, clipped: serde quotes what it refused (an unknown
/// field's name, a variant, a string), and a client's 100 KB name must not come back whole.
fn parser_says(e: &serde_json::Error) -> String {
    clipped(
        &in_json_words(&without_rust_types(&e.to_string())),
        MAX_QUOTED,
    )
}

/// 400 `malformed_json`: the parser's error for a body that is not JSON.
fn malformed(e: &serde_json::Error) -> ApiError {
    ApiError::bad_request(
        "malformed_json",
        format!("the body is not valid JSON: {}", parser_says(e)),
    )
}

/// 422 `invalid_body`: the typed parse's error for a body that is valid JSON of the wrong
/// shape, with the value it refused in `details.field` (as `validation_failed` names a
/// field) unless that is the body itself.
fn wrong_shape(e: &serde_json::Error, field: Option<String>) -> ApiError {
    let why = parser_says(e);
    let at = field
        .as_ref()
        .map_or(String::new(), |field| format!(" at `{field}`"));
    // JSON's grammar takes a `\u` escape of half a surrogate pair alone, but it is no text:
    // serde_json says so in words about its parser ("unexpected end of hex escape").
    let message = if [
        "unexpected end of hex escape",
        "lone leading surrogate in hex escape",
    ]
    .iter()
    .any(|says| why.starts_with(says))
    {
        let position = why.find(" at line").map_or("", |i| &why[i..]);
        format!(
            "a string{at} holds half a surrogate pair (a `\\u` escape from D800 to DFFF without \
             its other half), which is no text{position}"
        )
    } else {
        format!("the body does not match the expected shape{at}: {why}")
    };
    let error = ApiError::unprocessable("invalid_body", message);
    match field {
        Some(field) => error.with_details(serde_json::json!({ "field": field })),
        None => error,
    }
}

/// serde's message with the Rust types it names (`expected struct LoginBody`, `expected
/// u64`) put in the API's words: they are the server's internals, and mean nothing to a
/// client.
fn without_rust_types(message: &str) -> String {
    const NUMBERS: [(&str, &str); 10] = [
        ("u8", "a whole number from 0 to 255"),
        ("u16", "a whole number from 0 to 65535"),
        ("u32", "a whole number from 0 to 4294967295"),
        ("u64", "a whole number from 0 to 18446744073709551615"),
        ("usize", "a whole number of at least 0"),
        ("i8", "a whole number"),
        ("i16", "a whole number"),
        ("i32", "a whole number"),
        ("i64", "a whole number"),
        ("isize", "a whole number"),
    ];
    // serde's own "expected ..." comes last, after anything of the client's it quotes (a
    // field's name, a string), which is left as it is.
    let Some(at) = message.rfind("expected ") else {
        return message.to_owned();
    };
    let (head, rest) = message.split_at(at + "expected ".len());
    let word_end = |s: &str| {
        s.find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(s.len())
    };
    if let Some(name) = rest.strip_prefix("struct ") {
        return format!("{head}an object{}", &name[word_end(name)..]);
    }
    let word = &rest[..word_end(rest)];
    match NUMBERS.iter().find(|(ty, _)| word == *ty) {
        Some((_, words)) => format!("{head}{words}{}", &rest[word.len()..]),
        None => message.to_owned(),
    }
}

/// serde's names for the kinds of value it found where another was expected (`invalid type:
/// map, expected a string`, `invalid value: integer `-1`, expected ...`) in JSON's words:
/// object, array, null, number. Only the kind right after the `invalid type: ` or `invalid
/// value: ` serde's message starts with is renamed, not the client's text quoted anywhere.
fn in_json_words(message: &str) -> String {
    const KINDS: [(&str, &str); 5] = [
        ("map", "object"),
        ("sequence", "array"),
        ("unit value", "null"),
        ("floating point", "number"),
        ("integer", "number"),
    ];
    let Some((prefix, found)) = ["invalid type: ", "invalid value: "]
        .iter()
        .find_map(|prefix| Some((*prefix, message.strip_prefix(prefix)?)))
    else {
        return message.to_owned();
    };
    KINDS
        .iter()
        .find_map(|(serde, json)| Some(format!("{prefix}{json}{}", found.strip_prefix(serde)?)))
        .unwrap_or_else(|| message.to_owned())
}

/// How much of a parser's message an error quotes.
const MAX_QUOTED: usize = 300;

/// How much of the path to a value of the wrong shape an error quotes.
const MAX_QUOTED_FIELD: usize = 64;

/// `text` cut to about `max` bytes, on character boundaries: its start and its end (serde
/// puts what was expected and where last), with what was cut out marked.
fn clipped(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut head = max * 2 / 3;
    while !text.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = text.len() - max / 3;
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{} [… cut …] {}", &text[..head], &text[tail..])
}

/// Path parameters; a malformed one is 400 `invalid_path`.
#[derive(Debug, Clone, Copy)]
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| ApiPath(v))
            .map_err(|e| {
                ApiError::bad_request("invalid_path", clipped(&path_problem(&e), MAX_QUOTED))
            })
    }
}

/// What is wrong with a path, naming the parameter and the value (axum's text begins
/// "Invalid URL:", though the URL is well formed).
fn path_problem(rejection: &PathRejection) -> String {
    use axum::extract::path::ErrorKind;
    let PathRejection::FailedToDeserializePathParams(failed) = rejection else {
        return format!("invalid path parameter: {}", rejection.body_text());
    };
    match failed.kind() {
        ErrorKind::DeserializeError {
            key,
            value,
            message,
        } => format!("path parameter `{key}` is not valid ({message}): `{value}`"),
        ErrorKind::ParseErrorAtKey { key, value, .. } => {
            format!("path parameter `{key}` is not valid: `{value}`")
        }
        other => format!("invalid path parameter: {other}"),
    }
}

/// Query parameters; invalid ones are 400 `invalid_query`.
#[derive(Debug, Clone, Copy)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| ApiQuery(v))
            .map_err(|e| {
                ApiError::bad_request(
                    "invalid_query",
                    format!(
                        "invalid query parameter: {}",
                        clipped(&e.body_text(), MAX_QUOTED)
                    ),
                )
            })
    }
}

/// The authenticated caller, from `Authorization: Bearer <token>`. Any missing, malformed,
/// empty or invalid credential is 401 `unauthorized`. The gateway puts the
/// [`Authenticator`] in the request extensions.
#[derive(Debug, Clone)]
pub struct Authenticated(pub User);

/// Reads the bearer token of `Authorization`, if any; two headers are refused.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().ok_or(AuthError::Missing)?;
    if values.next().is_some() {
        return Err(AuthError::Repeated);
    }
    let value = value.to_str().map_err(|_| AuthError::Malformed)?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(AuthError::Malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

impl<S: Send + Sync> FromRequestParts<S> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let authenticator = parts
            .extensions
            .get::<Arc<dyn Authenticator>>()
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "starting",
                    "authentication is not set up yet",
                )
            })?;
        let token = bearer_token(&parts.headers)?;
        Ok(Authenticated(authenticator.verify(token).await?))
    }
}

/// The metadata a request's commands and queries start from, so what they record can be traced
/// back to the request: the correlation id is the request's `X-Request-Id` when it is a
/// hyphenated, non-nil UUID (the gateway gives every request one and echoes it in the
/// response), and the W3C
/// `traceparent` / `tracestate` headers, when well-formed, go into the trace context. Anything
/// else is ignored: a client's odd header never fails a request.
///
/// ```
/// use axum::extract::FromRequestParts;
/// use helpdesk_api::RequestMetadata;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let request = axum::http::Request::builder()
///     .header("x-request-id", "0192f0c1-9a4e-7bb1-a2c3-0d4e5f607182")
///     .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
///     .body(())
///     .unwrap();
/// let (mut parts, ()) = request.into_parts();
/// let RequestMetadata(metadata) = RequestMetadata::from_request_parts(&mut parts, &()).await.unwrap();
/// assert_eq!(metadata.correlation_id.to_string(), "0192f0c1-9a4e-7bb1-a2c3-0d4e5f607182");
/// assert!(metadata.trace_context.contains_key("traceparent"));
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct RequestMetadata(pub Metadata);

impl RequestMetadata {
    /// The metadata of a request with these headers.
    pub fn from_headers(headers: &HeaderMap) -> Metadata {
        let mut metadata = Metadata::new();
        if let Some(id) = headers
            .get(X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| hyphenated_uuid(v.trim()))
        {
            metadata = metadata.with_correlation_id(id);
        }
        if let Some(parent) = header_str(headers, TRACEPARENT).filter(|v| is_traceparent(v)) {
            metadata = metadata.with_trace_field(TRACEPARENT, parent);
            // `tracestate` means nothing without a parent.
            if let Some(state) = header_str(headers, TRACESTATE)
                .filter(|v| v.len() <= 512 && v.bytes().all(|b| (0x20..0x7f).contains(&b)))
            {
                metadata = metadata.with_trace_field(TRACESTATE, state);
            }
        }
        metadata
    }

    /// The metadata, acted by `user`.
    pub fn by(self, user: &User) -> Metadata {
        self.0.with_actor(user.id.to_string())
    }
}

/// A UUID in the hyphenated form (`8-4-4-4-12` hex digits, either case) the gateway hands out,
/// not nil: `Uuid::parse_str` also takes the simple, braced and URN forms, and the nil UUID
/// would give every client that sends it one shared correlation.
fn hyphenated_uuid(value: &str) -> Option<Uuid> {
    let bytes = value.as_bytes();
    let well_formed = bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    well_formed
        .then(|| Uuid::parse_str(value).ok())
        .flatten()
        .filter(|id| !id.is_nil())
}

const X_REQUEST_ID: &str = "x-request-id";
const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// `version-traceid-parentid-flags` in lowercase hex (W3C Trace Context, level 1 lengths); an
/// all-zero trace or parent id is invalid.
fn is_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    matches!(parts.as_slice(), [version, trace, parent, flags]
        if version.len() == 2 && *version != "ff" && trace.len() == 32 && parent.len() == 16
            && flags.len() == 2 && parts.iter().all(|p| hex(p)) && nonzero(trace) && nonzero(parent))
}

impl<S: Send + Sync> FromRequestParts<S> for RequestMetadata {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(RequestMetadata(Self::from_headers(&parts.headers)))
    }
}

/// One address, or a range of them in CIDR form: what `HELPDESK_TRUSTED_PROXIES` lists. A
/// cloud load balancer's or an ingress's nodes change addresses within a subnet, so they are
/// trusted as a range.
///
/// ```
/// use helpdesk_api::AddressRange;
///
/// let subnet: AddressRange = "10.0.0.0/8".parse().unwrap();
/// assert!(subnet.contains("10.20.30.40".parse().unwrap()));
/// assert!(!subnet.contains("11.0.0.1".parse().unwrap()));
/// let one: AddressRange = "::1".parse().unwrap();
/// assert_eq!(one.to_string(), "::1/128");
/// // Bits set past the prefix are most likely a typo, and said so.
/// let typo = "10.0.0.1/8".parse::<AddressRange>().unwrap_err();
/// assert!(typo.contains("10.0.0.0/8"), "{typo}");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressRange {
    first: IpAddr,
    prefix: u8,
}

impl AddressRange {
    /// Whether the range is broader than one organisation's network: shorter than an IPv4 /8
    /// (`10.0.0.0/8` is not), or than an IPv6 /32 (a provider's allocation) unless it lies
    /// within the private `fc00::/7` or the link-local `fe80::/10`; like `0.0.0.0/0` and
    /// `::/0`. Trusting one as proxies lets every client in it that reaches the server
    /// directly choose its own address.
    pub fn is_broad(&self) -> bool {
        match self.first {
            IpAddr::V4(_) => self.prefix < 8,
            IpAddr::V6(first) => {
                let top = first.segments()[0];
                let private = self.prefix >= 7 && top & 0xfe00 == 0xfc00;
                let link_local = self.prefix >= 10 && top & 0xffc0 == 0xfe80;
                self.prefix < 32 && !private && !link_local
            }
        }
    }

    /// Whether `ip` (IPv4-mapped IPv6 as its IPv4 form) is in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.first, ip.to_canonical()) {
            (IpAddr::V4(first), IpAddr::V4(ip)) => {
                masked_v4(u32::from(ip), self.prefix) == u32::from(first)
            }
            (IpAddr::V6(first), IpAddr::V6(ip)) => {
                masked_v6(u128::from(ip), self.prefix) == u128::from(first)
            }
            _ => false,
        }
    }
}

fn masked_v4(bits: u32, prefix: u8) -> u32 {
    bits.checked_shr(32 - u32::from(prefix))
        .map_or(0, |b| b << (32 - u32::from(prefix)))
}

fn masked_v6(bits: u128, prefix: u8) -> u128 {
    bits.checked_shr(128 - u32::from(prefix))
        .map_or(0, |b| b << (128 - u32::from(prefix)))
}

impl From<IpAddr> for AddressRange {
    /// The one address (IPv4-mapped IPv6 as its IPv4 form).
    fn from(ip: IpAddr) -> Self {
        let first = ip.to_canonical();
        let prefix = if first.is_ipv4() { 32 } else { 128 };
        Self { first, prefix }
    }
}

impl std::str::FromStr for AddressRange {
    type Err = String;

    /// An address (`127.0.0.1`, `::1`) or a range (`10.0.0.0/8`, `2001:db8::/32`).
    fn from_str(value: &str) -> Result<Self, String> {
        let shape = || {
            format!(
                "`{value}` is no IP address or range: expected one like 127.0.0.1, ::1, \
                 10.0.0.0/8 or 2001:db8::/32"
            )
        };
        let Some((address, prefix)) = value.split_once('/') else {
            return value.parse::<IpAddr>().map(Self::from).map_err(|_| shape());
        };
        let address: IpAddr = address.parse().map_err(|_| shape())?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= if address.is_ipv4() { 32 } else { 128 })
            .ok_or_else(|| {
                format!(
                    "`{value}`: a prefix length is at most {} for an IPv{} address",
                    if address.is_ipv4() { 32 } else { 128 },
                    if address.is_ipv4() { 4 } else { 6 }
                )
            })?;
        // An IPv4-mapped range (`::ffff:10.0.0.0/104`) as the IPv4 range it holds: peers are
        // compared in their IPv4 form.
        let (address, prefix) = match address {
            IpAddr::V6(v6) if prefix >= 96 && v6.to_ipv4_mapped().is_some() => (
                IpAddr::V4(
                    v6.to_ipv4_mapped()
                        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
                ),
                prefix - 96,
            ),
            other => (other, prefix),
        };
        let first = match address {
            IpAddr::V4(v4) => IpAddr::V4(masked_v4(u32::from(v4), prefix).into()),
            IpAddr::V6(v6) => IpAddr::V6(masked_v6(u128::from(v6), prefix).into()),
        };
        if first != address {
            return Err(format!(
                "`{value}` has bits set past its prefix: did you mean {first}/{prefix}?"
            ));
        }
        Ok(Self { first, prefix })
    }
}

impl std::fmt::Display for AddressRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.first, self.prefix)
    }
}

/// The reverse proxies whose `X-Forwarded-For` the gateway believes, by address or range.
/// The gateway puts it in the request extensions (`HELPDESK_TRUSTED_PROXIES`); without it,
/// every request's [`ClientAddr`] is its peer address, and the header, which any client can
/// send, is ignored.
///
/// A request that carries `X-Forwarded-For` from a peer it does not trust is logged at
/// `warn`, once per peer (an IPv4 address, an IPv6 /64; for the first 16): a proxy left off the list makes every
/// client behind it one address, which the login throttles and connection limits then count
/// as one client. Once per peer, not once in all, so that a client sending the header itself
/// (a scanner) does not use up the line meant for a proxy.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    ranges: Arc<[AddressRange]>,
    told_untrusted: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

/// The most peers [`TrustedProxies`] warns of.
const MOST_UNTRUSTED_TOLD: usize = 16;

impl TrustedProxies {
    /// Trusts these addresses and ranges.
    pub fn new(ranges: impl IntoIterator<Item = AddressRange>) -> Self {
        Self {
            ranges: ranges.into_iter().collect(),
            told_untrusted: Arc::default(),
        }
    }

    /// Whether `ip` is one of the trusted proxies.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|range| range.contains(ip))
    }

    /// Logs, the first time for each peer (of the first [`MOST_UNTRUSTED_TOLD`]), that
    /// `peer`, which is not trusted, sent `X-Forwarded-For`.
    fn untrusted_forwarder(&self, peer: IpAddr) {
        let first = {
            let mut told = self
                .told_untrusted
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            // By client (an IPv6 /64), so one host's many addresses use up one place.
            told.len() < MOST_UNTRUSTED_TOLD && told.insert(crate::client_key(Some(peer)))
        };
        if first {
            tracing::warn!(
                %peer,
                "a request from {peer} carries X-Forwarded-For, which is ignored: \
                 HELPDESK_TRUSTED_PROXIES does not list {peer}. If it is your load balancer or \
                 proxy, every client behind it counts as this one address (login throttles, \
                 connection limits): list it, or its subnet (a range such as 10.0.0.0/8). Said \
                 once for this peer."
            );
        }
    }
}

/// The client's address (for login throttling): the peer address of the connection, or,
/// when the peer is a [`TrustedProxies`] entry, the right-most address in `X-Forwarded-For`
/// that is not (each proxy appends the address it got the request from, so what a client
/// writes there itself stands further left and is not believed).
///
/// ```
/// use axum::extract::{ConnectInfo, FromRequestParts};
/// use helpdesk_api::{ClientAddr, TrustedProxies};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let request = axum::http::Request::builder()
///     .header("x-forwarded-for", "198.51.100.9, 203.0.113.7")
///     .extension(ConnectInfo("127.0.0.1:5000".parse::<std::net::SocketAddr>().unwrap()))
///     .extension(TrustedProxies::new(["127.0.0.1".parse().unwrap()]))
///     .body(())
///     .unwrap();
/// let (mut parts, ()) = request.into_parts();
/// let ClientAddr(client) = ClientAddr::from_request_parts(&mut parts, &()).await.unwrap();
/// assert_eq!(client, Some("203.0.113.7".parse().unwrap()));
///
/// // A server bound to `[::]` sees the same proxy as an IPv4-mapped address: still trusted.
/// let request = axum::http::Request::builder()
///     .header("x-forwarded-for", "203.0.113.9")
///     .extension(ConnectInfo("[::ffff:127.0.0.1]:5000".parse::<std::net::SocketAddr>().unwrap()))
///     .extension(TrustedProxies::new(["127.0.0.1".parse().unwrap()]))
///     .body(())
///     .unwrap();
/// let (mut parts, ()) = request.into_parts();
/// let ClientAddr(client) = ClientAddr::from_request_parts(&mut parts, &()).await.unwrap();
/// assert_eq!(client, Some("203.0.113.9".parse().unwrap()));
/// # });
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        // Canonical: a server bound to `[::]` sees IPv4 peers as `::ffff:a.b.c.d`.
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip().to_canonical());
        let Some(proxies) = parts.extensions.get::<TrustedProxies>() else {
            return Ok(ClientAddr(peer));
        };
        let Some(peer) = peer.filter(|ip| proxies.trusts(*ip)) else {
            if let Some(peer) = peer
                && parts.headers.contains_key("x-forwarded-for")
            {
                proxies.untrusted_forwarder(peer);
            }
            return Ok(ClientAddr(peer));
        };
        // Entry by entry, not header by header: a proxy appends the real address to the
        // client's own header, so a byte that is no text in the client's part must not hide
        // the entries after it (it stops the walk where it is, as any garbage does).
        let hops: Vec<Option<&str>> = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(|hop| std::str::from_utf8(hop).ok().map(str::trim))
            .collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            // An address we cannot read: nothing to its left can be believed either.
            let Some(ip) = hop.and_then(forwarded_address) else {
                break;
            };
            client = ip;
            if !proxies.trusts(ip) {
                break;
            }
        }
        Ok(ClientAddr(Some(client)))
    }
}

/// The address of one `X-Forwarded-For` entry, canonical: a bare address (`203.0.113.7`,
/// `2001:db8::1`), or, as some proxies write it, with a port (`203.0.113.7:51234`,
/// `[2001:db8::1]:443`) or in brackets without one (`[2001:db8::1]`). `None` for anything else.
fn forwarded_address(hop: &str) -> Option<IpAddr> {
    let ip = hop
        .parse::<IpAddr>()
        .or_else(|_| hop.parse::<SocketAddr>().map(|addr| addr.ip()))
        .or_else(|_| {
            hop.strip_prefix('[')
                .and_then(|rest| rest.strip_suffix(']'))
                .ok_or(())
                .and_then(|inner| inner.parse::<std::net::Ipv6Addr>().map_err(|_| ()))
                .map(IpAddr::V6)
        })
        .ok()?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ranges at the edges of their prefixes, and IPv4-mapped ones, hold what they should.
    #[test]
    fn address_ranges_hold_their_addresses() {
        let range = |r: &str| r.parse::<AddressRange>().unwrap();
        let ip = |a: &str| a.parse::<IpAddr>().unwrap();
        assert!(range("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(!range("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(range("192.0.2.7/32").contains(ip("192.0.2.7")));
        assert!(!range("192.0.2.7/32").contains(ip("192.0.2.8")));
        assert!(range("192.0.2.0/31").contains(ip("192.0.2.1")));
        assert!(!range("192.0.2.0/31").contains(ip("192.0.2.2")));
        assert!(range("::/0").contains(ip("2001:db8::1")));
        assert!(range("2001:db8::1/128").contains(ip("2001:db8::1")));
        assert!(!range("2001:db8::1/128").contains(ip("2001:db8::2")));
        assert!(range("2001:db8::/32").contains(ip("2001:db8:ffff::1")));
        assert!(!range("2001:db8::/32").contains(ip("2001:db9::1")));
        // A peer on a dual-stack listener shows IPv4-mapped: compared as IPv4.
        assert!(range("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        // A range written IPv4-mapped is the IPv4 range it holds.
        assert_eq!(range("::ffff:10.0.0.0/104"), range("10.0.0.0/8"));
        assert!(range("::ffff:127.0.0.1/128").contains(ip("127.0.0.1")));
        assert_eq!(range("::ffff:127.0.0.1"), range("127.0.0.1"));
        for bad in ["10.0.0.0/", "10.0.0.0/-1", "2001:db8::/129", "10.0.0.0/8/8"] {
            assert!(bad.parse::<AddressRange>().is_err(), "{bad}");
        }
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    enum Priority {
        Low,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct LoginBody {
        email: String,
        version: Option<u64>,
        priority: Option<Priority>,
    }

    /// Valid JSON that serde_json refuses under "syntax" (a number too large for any type, a
    /// value of the wrong kind for an enum) is a body of the wrong shape (422), not malformed
    /// JSON (400); no message names the server's Rust types, and the client's own text it
    /// quotes is left as it is.
    #[test]
    fn out_of_range_numbers_are_invalid_bodies_in_the_apis_words() {
        for body in [
            &br#"{"email": "a@b.c", "version": 1e400}"#[..],
            br#"{"email": "a@b.c", "priority": 3}"#,
        ] {
            let error = parse_json::<LoginBody>(body).unwrap_err();
            assert_eq!(
                error.status,
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                "{error:?}"
            );
        }
        let broken =
            parse_json::<LoginBody>(br#"{"email": "a@b.c", "version": 1e400,,}"#).unwrap_err();
        assert_eq!(
            broken.status,
            axum::http::StatusCode::BAD_REQUEST,
            "{broken:?}"
        );
        let quoted = parse_json::<LoginBody>(br#"{"expected u64": 1}"#).unwrap_err();
        let message = quoted.body().error.message;
        assert!(message.contains("`expected u64`"), "{message}");
        for (body, says) in [
            (&br#""x""#[..], "expected an object"),
            (
                br#"{"email": "a@b.c", "version": -1}"#,
                "expected a whole number from 0 to",
            ),
        ] {
            let error = parse_json::<LoginBody>(body).unwrap_err();
            let message = error.body().error.message;
            assert!(message.contains(says), "{message}");
            assert!(
                !message.contains("LoginBody") && !message.contains("u64"),
                "{message}"
            );
        }
        let broken = parse_json::<LoginBody>(b"{\"email\": ").unwrap_err();
        assert_eq!(broken.status, axum::http::StatusCode::BAD_REQUEST);
    }

    /// Broken JSON is 400 `malformed_json` whatever the typed parse met first: a field of
    /// the wrong shape before the break, text that is not UTF-8. They were 422
    /// `invalid_body`, and the message pointed at the field instead of the break. (A lone
    /// surrogate, `"\ud800"`, is JSON's grammar, but no text: 422.)
    #[test]
    fn broken_json_is_malformed_whatever_comes_before_the_break() {
        for body in [
            &br#"{"bogus": 1,"#[..],
            br#"{"email": 1,,,,"#,
            b"{\"email\": \"\xff\"}",
            b"[\"\xff\"]",
        ] {
            let error = parse_json::<LoginBody>(body).unwrap_err();
            assert_eq!(
                (error.status, error.body().error.code.as_str()),
                (axum::http::StatusCode::BAD_REQUEST, "malformed_json"),
                "{}: {error:?}",
                String::from_utf8_lossy(body)
            );
        }
        // Where it breaks (the second comma), not where the typed parse stopped (the 3, column 32).
        let error =
            parse_json::<LoginBody>(br#"{"email": "a@b.c", "priority": 3,,,}"#).unwrap_err();
        let message = error.body().error.message;
        assert!(message.contains("column 34"), "{message}");
        for body in [&br#"{"email": "\ud800"}"#[..], br#"{"email": "a\udc00b"}"#] {
            let error = parse_json::<LoginBody>(body).unwrap_err();
            assert_eq!(
                error.status,
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                "{error:?}"
            );
            let message = error.body().error.message;
            assert!(message.contains("half a surrogate pair"), "{message}");
            assert!(message.contains("at line 1 column"), "{message}");
        }
    }

    /// A value of the wrong shape is named where it is, in the message and in
    /// `details.field` (as `validation_failed` names its field), down into arrays and
    /// objects, and a field the body must not have; a field it lacks names none; an empty body
    /// is told as such.
    #[test]
    fn a_value_of_the_wrong_shape_is_named_where_it_is() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Tagged {
            tags: Vec<String>,
            owner: Option<LoginBody>,
        }
        let named = |error: ApiError, field: &str| {
            let body = error.body().error;
            assert_eq!(body.code, "invalid_body");
            assert_eq!(body.details, Some(serde_json::json!({ "field": field })));
            let says = format!("the body does not match the expected shape at `{field}`: ");
            assert!(body.message.starts_with(&says), "{}", body.message);
        };
        for (body, field) in [
            (&br#"{"email": null}"#[..], "email"),
            (br#"{"email": "a@b.c", "version": "7"}"#, "version"),
        ] {
            named(parse_json::<LoginBody>(body).unwrap_err(), field);
        }
        for (body, field) in [
            (&br#"{"tags": ["a", 3]}"#[..], "tags[1]"),
            (br#"{"tags": [], "owner": {"email": 1}}"#, "owner.email"),
        ] {
            named(parse_json::<Tagged>(body).unwrap_err(), field);
        }
        // A field the body must not have is named too; one it lacks is the body's problem.
        named(
            parse_json::<LoginBody>(br#"{"email": "a@b.c", "bogus": 1}"#).unwrap_err(),
            "bogus",
        );
        let missing = parse_json::<LoginBody>(br#"{"version": 1}"#).unwrap_err();
        let missing = missing.body().error;
        assert_eq!(missing.details, None, "{}", missing.message);
        assert!(
            missing
                .message
                .starts_with("the body does not match the expected shape: missing field `email`"),
            "{}",
            missing.message
        );
        for empty in [&b""[..], b" \r\n"] {
            let error = parse_json::<LoginBody>(empty).unwrap_err();
            assert_eq!(error.status, axum::http::StatusCode::BAD_REQUEST);
            let body = error.body().error;
            assert_eq!(
                (body.code.as_str(), body.message.as_str()),
                ("malformed_json", "the body is empty: send a JSON object")
            );
        }
    }

    /// A value of the wrong kind is named as JSON names it.
    #[test]
    fn kinds_of_value_are_named_in_jsons_words() {
        for (body, says) in [
            (
                &br#"{"email": {}}"#[..],
                "invalid type: object, expected a string",
            ),
            (
                br#"{"email": []}"#,
                "invalid type: array, expected a string",
            ),
            (br#"{"email": 1.5}"#, "invalid type: number `1.5`"),
            (br#"{"email": 3}"#, "invalid type: number `3`"),
            (
                br#"{"email": "a@b.c", "version": -1}"#,
                "invalid value: number `-1`",
            ),
            // The client's own text, quoted in serde's message, is left as it is.
            (br#"{"invalid type: map": 1}"#, "`invalid type: map`"),
        ] {
            let message = parse_json::<LoginBody>(body)
                .unwrap_err()
                .body()
                .error
                .message;
            assert!(message.contains(says), "{message}");
        }
        // The client's own text is left as it is.
        assert_eq!(
            in_json_words("invalid type: string \"map\", expected u64"),
            "invalid type: string \"map\", expected u64"
        );
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, value.parse().unwrap());
        }
        headers
    }

    /// An `X-Forwarded-For` entry may carry a port, or brackets around an IPv6 address;
    /// anything else is not an address.
    #[test]
    fn forwarded_addresses_are_read_with_or_without_a_port() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(forwarded_address("203.0.113.7"), ip("203.0.113.7"));
        assert_eq!(forwarded_address("203.0.113.7:51234"), ip("203.0.113.7"));
        assert_eq!(forwarded_address("2001:db8::1"), ip("2001:db8::1"));
        assert_eq!(forwarded_address("[2001:db8::1]:443"), ip("2001:db8::1"));
        assert_eq!(forwarded_address("[2001:db8::1]"), ip("2001:db8::1"));
        assert_eq!(forwarded_address("[::ffff:192.0.2.1]:80"), ip("192.0.2.1"));
        assert_eq!(forwarded_address("::ffff:192.0.2.1"), ip("192.0.2.1"));
        for garbage in [
            "",
            "unknown",
            "_hidden",
            "203.0.113.7:",
            "203.0.113.7:99999",
            "[203.0.113.7]",
            "[203.0.113.7]:80",
            "[2001:db8::1",
            "2001:db8::1]",
            "[2001:db8::1]:",
            "[[2001:db8::1]]",
            "203.0.113.7 :80",
        ] {
            assert_eq!(forwarded_address(garbage), None, "{garbage:?}");
        }
    }

    /// Behind a trusted proxy, entries with ports are read too: the client is told apart by
    /// its address, and an entry that is no address still stops the walk.
    #[test]
    fn the_client_address_is_read_from_entries_with_ports() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let client_bytes = |forwarded: &[u8]| {
            let request = axum::http::Request::builder()
                .header(
                    "x-forwarded-for",
                    axum::http::HeaderValue::from_bytes(forwarded).unwrap(),
                )
                .extension(ConnectInfo("127.0.0.1:5000".parse::<SocketAddr>().unwrap()))
                .extension(TrustedProxies::new([
                    "127.0.0.1".parse().unwrap(),
                    "10.0.0.1".parse().unwrap(),
                ]))
                .body(())
                .unwrap();
            let (mut parts, ()) = request.into_parts();
            let ClientAddr(client) = runtime
                .block_on(ClientAddr::from_request_parts(&mut parts, &()))
                .unwrap();
            client.map(|ip| ip.to_string())
        };
        let client = |forwarded: &str| client_bytes(forwarded.as_bytes());
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(client("198.51.100.1:5000"), some("198.51.100.1"));
        assert_eq!(
            client("198.51.100.1, [2001:db8::7]:443, 10.0.0.1:80"),
            some("2001:db8::7")
        );
        assert_eq!(client("[2001:db8::7]"), some("2001:db8::7"));
        // Garbage stops the walk at the last address read, as before.
        assert_eq!(
            client("198.51.100.1, garbage, 10.0.0.1:80"),
            some("10.0.0.1")
        );
        assert_eq!(client("garbage"), some("127.0.0.1"));
        // A byte that is no text in the client's own part does not hide the address the
        // proxy appended (it hid the whole header: the client became the proxy); it stops
        // the walk like garbage.
        assert_eq!(client_bytes(b"\x80, 203.0.113.7"), some("203.0.113.7"));
        assert_eq!(
            client_bytes(b"198.51.100.1, \x80, 10.0.0.1"),
            some("10.0.0.1")
        );
    }

    #[test]
    fn request_metadata_takes_the_request_id_and_a_well_formed_trace_context() {
        let id = "0192f0c1-9a4e-7bb1-a2c3-0d4e5f607182";
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let metadata = RequestMetadata::from_headers(&headers(&[
            ("x-request-id", id),
            ("traceparent", parent),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]));
        assert_eq!(metadata.correlation_id.to_string(), id);
        assert_ne!(metadata.message_id, metadata.correlation_id);
        assert_eq!(metadata.trace_context["traceparent"], parent);
        assert_eq!(metadata.trace_context["tracestate"], "congo=t61rcWkgMzE");
    }

    /// Only the hyphenated form the gateway itself hands out is a correlation id: not the nil
    /// UUID (every client sending it would share one correlation), nor the simple, braced or
    /// URN forms `Uuid::parse_str` also takes.
    #[test]
    fn request_metadata_takes_only_a_hyphenated_non_nil_request_id() {
        let id = "0192f0c1-9a4e-7bb1-a2c3-0d4e5f607182";
        for accepted in [
            id,
            " 0192f0c1-9a4e-7bb1-a2c3-0d4e5f607182 ",
            &id.to_uppercase(),
        ] {
            let metadata = RequestMetadata::from_headers(&headers(&[("x-request-id", accepted)]));
            assert_eq!(metadata.correlation_id.to_string(), id, "{accepted}");
        }
        for refused in [
            "00000000-0000-0000-0000-000000000000",
            "0192f0c19a4e7bb1a2c30d4e5f607182",
            "{0192f0c1-9a4e-7bb1-a2c3-0d4e5f607182}",
            "urn:uuid:0192f0c1-9a4e-7bb1-a2c3-0d4e5f607182",
            "0192f0c1-9a4e7-bb1-a2c3-0d4e5f607182",
            "+192f0c1-9a4e-7bb1-a2c3-0d4e5f607182",
        ] {
            let metadata = RequestMetadata::from_headers(&headers(&[("x-request-id", refused)]));
            assert_eq!(metadata.correlation_id, metadata.message_id, "{refused}");
        }
    }

    #[test]
    fn request_metadata_ignores_what_is_not_well_formed() {
        for parent in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            let metadata = RequestMetadata::from_headers(&headers(&[
                ("x-request-id", "not-a-uuid"),
                ("traceparent", parent),
                ("tracestate", "a=b"),
            ]));
            assert_eq!(metadata.correlation_id, metadata.message_id, "{parent}");
            assert!(metadata.trace_context.is_empty(), "{parent}");
        }
        let long_state = "a=".to_owned() + &"b".repeat(600);
        let metadata = RequestMetadata::from_headers(&headers(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", &long_state),
        ]));
        assert!(metadata.trace_context.contains_key("traceparent"));
        assert!(!metadata.trace_context.contains_key("tracestate"));
    }
}
