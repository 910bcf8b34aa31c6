//! The HTTP/1.1 upgrade (RFC 6455 section 4.2), server side: parse a request, answer 101 with
//! `Sec-WebSocket-Accept` (SHA-1 + base64), or an HTTP error with a reason.
//!
//! The request line is read here, so that every request-target form (RFC 7230 §5.3) and every
//! HTTP version gets a deliberate answer; header fields are read with `httparse`.
//!
//! What a request must be, and the answer when it is not:
//!
//! | rule | where | else |
//! |---|---|---|
//! | request line `method SP target SP HTTP/d.d` | RFC 7230 §3.1.1 | 400 |
//! | HTTP/1.1 or a later 1.x (a later minor is read as 1.1) | RFC 6455 §4.2.1 (1), RFC 7230 §2.6 | 400; HTTP/2 and up 505 |
//! | method `GET` | RFC 6455 §4.2.1 (1) | 405 with `Allow: GET` |
//! | target in origin-form (`/ws?room=r`) or absolute-form (`http://host/ws?room=r`; schemes http, https, ws, wss; no path means `/`) | RFC 7230 §5.3.1-2 | 400 for asterisk-form (`*`), authority-form (`host:port`), other schemes, fragments |
//! | `Host` exactly once, a valid host | RFC 6455 §4.2.1 (2), RFC 7230 §5.4 | 400 |
//! | `Upgrade` lists the token `websocket` (any case; repeated fields are combined) | RFC 6455 §4.2.1 (3) | 400 |
//! | `Connection` lists the token `Upgrade` (any case; repeated fields are combined) | RFC 6455 §4.2.1 (4) | 400 |
//! | `Sec-WebSocket-Version` exactly once | RFC 6455 §11.3.5 | 400 |
//! | `Sec-WebSocket-Version` is `13` (missing counts as another version) | RFC 6455 §4.2.1 (6), §4.2.2 | 426 with `Sec-WebSocket-Version: 13` |
//! | `Sec-WebSocket-Key` exactly once, base64 of 16 bytes | RFC 6455 §4.2.1 (5), §11.3.1 | 400 |
//! | `Origin` at most once | RFC 6454 §7.3 | 400 |
//! | no body (`Transfer-Encoding`, or a `Content-Length` other than 0) | bytes after the head are WebSocket frames | 400 |
//! | head within [`MAX_REQUEST`] bytes and [`MAX_HEADERS`] fields | | 431 (414 when the request line alone does not end) |
//!
//! `Sec-WebSocket-Protocol` and `Sec-WebSocket-Extensions` may repeat (RFC 6455 §11.3.2, §11.3.4):
//! every `Sec-WebSocket-Protocol` field is read and their lists joined in order, and so is every
//! `Sec-WebSocket-Extensions` field ([`Upgrade::extensions`]; a list that does not follow the
//! grammar of RFC 6455 §9.1 is a 400). Which extension is accepted is the server's call
//! ([`crate::deflate::negotiate`]).
//!
//! The same port serves the SSE fallback ([`parse`]): a request whose path is [`SSE_PATH`] is
//! held to the same request line (but `OPTIONS` is a CORS preflight), `Host`, `Origin`, body and
//! size rules, needs none of the upgrade fields, and may carry `Last-Event-ID` at most once.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sha1::{Digest, Sha1};

use crate::Subprotocol;

/// Largest upgrade request head accepted: request line and header fields together, up to and
/// including the blank line. Above it: 431 (414 when the request line alone does not end within
/// it).
///
/// Sized for browsers behind proxies and CDNs: a browser sends about 15 header fields of its own,
/// proxies and CDNs add `X-Forwarded-*`, `Forwarded`, `Via`, `CF-*`, tracing headers, and a
/// `Cookie` of several KiB is common. 16 KiB is the default of Node.js (`max-http-header-size`)
/// and half of nginx's `large_client_header_buffers 4 8k` (nginx bounds each line at 8 KiB and the
/// head at 32 KiB; here only the whole head is bounded, so one cookie may take most of it).
///
/// The trade-off is memory per connection in handshake: the shard keeps a connection's bytes
/// until its head ends, up to this plus one receive buffer (16 + 4 KiB by default). 10^5
/// connections held mid-handshake (a reconnect storm, or a slow-loris until
/// `ws.handshake_timeout_ms`) could pin about 2 GB, twice what 8 KiB allowed; an ordinary
/// browser request is 0.5 to 2 KiB, so typical memory does not change. The request is parsed again
/// from its start on each read, so the work per handshake also grows with size x reads; this
/// bounds it.
pub const MAX_REQUEST: usize = 16 * 1024;

/// Most header fields accepted (431 above). Browsers send about 15 and proxies/CDNs commonly add
/// 10 to 25; 64 leaves headroom (Apache's default is 100). The cost is the parser's table, 64
/// entries of 32 bytes on the stack during a parse, nothing per connection.
pub const MAX_HEADERS: usize = 64;

const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A valid upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// The path of the request target, as sent (not percent-decoded). An absolute-form target is
    /// reduced to its path (`/` when it has none).
    pub path: String,
    /// Query parameters, percent-decoded, in order.
    pub query: Vec<(String, String)>,
    /// `Sec-WebSocket-Key`: base64 of 16 bytes (checked), the input of the accept key.
    pub key: String,
    /// Subprotocols offered, in the client's order of preference, from every
    /// `Sec-WebSocket-Protocol` field in order.
    pub protocols: Vec<String>,
    /// The `Origin` header (browsers send it; checked against `ws.allowed_origins`).
    pub origin: Option<String>,
    /// The token of an `Authorization: Bearer TOKEN` header (native clients; browsers pass
    /// `?token=` instead, as they cannot set headers on an upgrade).
    pub bearer: Option<String>,
    /// Extensions offered in `Sec-WebSocket-Extensions`, from every such field in order.
    pub extensions: Vec<crate::deflate::Extension>,
}

/// Why an upgrade is refused: the HTTP status and a reason for the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeError {
    /// The HTTP status of the refusal (400, 403, 405, 426, 431, 503...).
    pub status: u16,
    /// Why, in words: the body of the answer.
    pub reason: String,
}

fn refuse(status: u16, reason: &str) -> HandshakeError {
    HandshakeError { status, reason: reason.to_owned() }
}

impl Upgrade {
    /// The first value of query parameter `name`.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The first offered subprotocol the edge speaks. None offered: `Ok(None)` (JSON, the
    /// default). Some offered, none known: 400, rather than an upgrade the client would reject.
    pub fn select_subprotocol(&self) -> Result<Option<Subprotocol>, HandshakeError> {
        if self.protocols.is_empty() {
            return Ok(None);
        }
        self.protocols
            .iter()
            .find_map(|p| Subprotocol::from_token(p))
            .map(Some)
            .ok_or_else(|| refuse(400, "unsupported subprotocol: offer roomcast.json.v1 or roomcast.rkyv.v2"))
    }
}

fn header_has_token(value: &[u8], token: &str) -> bool {
    std::str::from_utf8(value).is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Decodes `%XX` escapes (the `percent-encoding` crate) and `+` (a space, as in HTML forms). A
/// truncated or non-hex escape, or a result that is not UTF-8, is a 400: the crate, like the
/// WHATWG URL parser, keeps a malformed escape as it is, which would let `a%zz` and `a%25zz`
/// name one room; it never panics, whatever the bytes.
fn percent_decode(s: &str) -> Result<String, HandshakeError> {
    let escapes_ok = s
        .split('%')
        .skip(1)
        .all(|after| after.as_bytes().get(..2).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)));
    if !escapes_ok {
        return Err(refuse(400, "bad percent-encoding in the query"));
    }
    // `+` first: an escaped one (`%2B`) stays a plus.
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(std::borrow::Cow::into_owned)
        .map_err(|_| refuse(400, "query is not UTF-8 after percent-decoding"))
}

/// `tchar` of RFC 7230 §3.2.6: the bytes of a method.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A host as in `Host` or an authority (RFC 3986 §3.2): reg-name, IP literal, port, userinfo
/// when `userinfo` is allowed. Not empty: a `ws`/`http` URI always has a host (RFC 7230 §2.7.1).
fn is_host(v: &[u8], userinfo: bool) -> bool {
    !v.is_empty()
        && v.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:[]%".contains(&b) || (userinfo && b == b'@'))
}

/// The request line (RFC 7230 §3.1.1).
#[derive(Debug)]
struct RequestLine<'a> {
    method: &'a str,
    target: &'a str,
    major: u8,
    minor: u8,
}

/// Reads the request line at the start of `buf`, after any empty lines (RFC 7230 §3.5 asks to
/// skip them). `Ok(None)`: it has not ended yet and nothing so far is wrong. Bytes are checked
/// as they arrive, so a client speaking something else (TLS, say) is refused at once rather than
/// at the size limit. A single LF ends a line as CRLF does (RFC 7230 §3.5, as `httparse` reads
/// header fields). Returns the line and where the header fields start.
fn request_line(buf: &[u8]) -> Result<Option<(RequestLine<'_>, usize)>, HandshakeError> {
    let bad = || refuse(400, "malformed HTTP request line: expected `GET /ws?room=ROOM HTTP/1.1`");
    let mut i = 0;
    loop {
        match &buf[i..] {
            [b'\r', b'\n', ..] => i += 2,
            [b'\n', ..] => i += 1,
            [] | [b'\r'] => return Ok(None),
            _ => break,
        }
    }
    // method SP
    let start = i;
    let Some(m_end) = buf[start..].iter().position(|&b| !is_tchar(b)).map(|p| start + p) else { return Ok(None) };
    if m_end == start || buf[m_end] != b' ' {
        return Err(bad());
    }
    // request-target SP: visible ASCII (RFC 3986 characters; anything else must be escaped)
    let t_start = m_end + 1;
    let Some(t_end) = buf[t_start..].iter().position(|&b| !b.is_ascii_graphic()).map(|p| t_start + p) else {
        return Ok(None);
    };
    if t_end == t_start || buf[t_end] != b' ' {
        return Err(bad());
    }
    // HTTP-version = "HTTP/" DIGIT "." DIGIT, then CRLF
    let v_start = t_end + 1;
    for (k, &want) in b"HTTP/0.0".iter().enumerate() {
        match buf.get(v_start + k) {
            None => return Ok(None),
            Some(&b) if b == want || (want == b'0' && b.is_ascii_digit()) => {}
            Some(_) => return Err(bad()),
        }
    }
    let after = v_start + 8;
    let line_end = match &buf[after..] {
        [] | [b'\r'] => return Ok(None),
        [b'\r', b'\n', ..] => after + 2,
        [b'\n', ..] => after + 1,
        _ => return Err(bad()),
    };
    let text = |a: usize, b: usize| std::str::from_utf8(&buf[a..b]).map_err(|_| bad());
    let line = RequestLine {
        method: text(start, m_end)?,
        target: text(t_start, t_end)?,
        major: buf[v_start + 5] - b'0',
        minor: buf[v_start + 7] - b'0',
    };
    Ok(Some((line, line_end)))
}

/// Path and query of a request target (RFC 7230 §5.3). Origin-form (`/ws?room=r`) is taken as
/// is. Absolute-form (`http://host:port/ws?room=r`), which a server MUST accept (§5.3.2), is
/// reduced to its path and query; its authority wins over `Host` (§5.4) but the edge has no use
/// for either. Asterisk-form and authority-form are for `OPTIONS` and `CONNECT`: refused.
fn path_and_query(target: &str) -> Result<(&str, &str), HandshakeError> {
    if target.contains('#') {
        return Err(refuse(400, "request target has a fragment ('#'): not allowed in a request (RFC 7230 §5.3)"));
    }
    if target.starts_with('/') {
        return Ok(target.split_once('?').unwrap_or((target, "")));
    }
    if target == "*" {
        return Err(refuse(
            400,
            "asterisk-form request target ('*') is for server-wide OPTIONS, not a WebSocket upgrade: \
             request /ws?room=ROOM",
        ));
    }
    let scheme_ok = |s: &str| {
        s.as_bytes().first().is_some_and(u8::is_ascii_alphabetic)
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    };
    if let Some((scheme, rest)) = target.split_once("://")
        && scheme_ok(scheme)
    {
        if !["http", "https", "ws", "wss"].iter().any(|s| scheme.eq_ignore_ascii_case(s)) {
            return Err(HandshakeError {
                status: 400,
                reason: format!("absolute-form request target with scheme {scheme:?}: use http, https, ws or wss"),
            });
        }
        let a_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if !is_host(&rest.as_bytes()[..a_end], true) {
            return Err(refuse(400, "absolute-form request target without a valid host"));
        }
        let rest = &rest[a_end..];
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        return Ok((if path.is_empty() { "/" } else { path }, query));
    }
    if !target.contains(['/', '?']) {
        return Err(refuse(
            400,
            "authority-form request target (host:port) is for CONNECT, not a WebSocket upgrade: \
             request /ws?room=ROOM",
        ));
    }
    Err(refuse(400, "malformed request target: expected /ws?room=ROOM or http://host/ws?room=ROOM"))
}

/// Records a header field that must not repeat.
fn once<'a>(slot: &mut Option<&'a [u8]>, value: &'a [u8], why: &str) -> Result<(), HandshakeError> {
    if slot.replace(value).is_some() {
        return Err(refuse(400, why));
    }
    Ok(())
}

/// Parses an upgrade request. `Ok(None)`: incomplete, read more. `Ok(Some((upgrade, n)))`: the
/// request took `n` bytes (WebSocket frames may follow). `Err`: answer with [`error_response`]
/// and close. The checks, in order, are listed in the [module documentation](self).
pub fn parse_request(buf: &[u8]) -> Result<Option<(Upgrade, usize)>, HandshakeError> {
    match parse(buf)? {
        None => Ok(None),
        Some((Request::WebSocket(up), n)) => Ok(Some((up, n))),
        Some(_) => Err(refuse(404, "not a WebSocket endpoint: connect to /ws?room=ROOM")),
    }
}

/// The path of the Server-Sent Events transport (`GET /sse?room=ROOM`).
pub const SSE_PATH: &str = "/sse";

/// A request for the Server-Sent Events transport (`GET /sse?...`): what the edge needs of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventStream {
    /// Query parameters, percent-decoded, in order (the same as a WebSocket upgrade takes).
    pub query: Vec<(String, String)>,
    /// The `Origin` header (browsers send it; checked against `ws.allowed_origins`).
    pub origin: Option<String>,
    /// `Authorization: Bearer TOKEN` (non-browser clients; `EventSource` cannot set headers and
    /// passes `?token=`).
    pub bearer: Option<String>,
    /// `Last-Event-ID`, as the browser sends it back when it reconnects on its own.
    pub last_event_id: Option<String>,
}

impl EventStream {
    /// The first value of query parameter `name`.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A request the edge's port serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A WebSocket upgrade (any path but [`SSE_PATH`]; the shard answers 404 for paths other
    /// than `/ws`).
    WebSocket(Upgrade),
    /// `GET /sse?...`: an event stream.
    EventStream(EventStream),
    /// `OPTIONS /sse`: a CORS preflight (`Origin` as sent, if any).
    Preflight {
        /// The `Origin` header, if sent.
        origin: Option<String>,
    },
}

/// Parses a request on the edge's port: a WebSocket upgrade, or (path [`SSE_PATH`]) an event
/// stream or its CORS preflight. `Ok(None)`: incomplete, read more. `Ok(Some((request, n)))`: the
/// request took `n` bytes. `Err`: answer with [`error_response`] and close. An event-stream
/// request follows the same rules as an upgrade for the request line, `Host`, `Origin`, a body
/// and the size bounds; it needs no upgrade header fields, and may repeat `Last-Event-ID` at
/// most once.
pub fn parse(buf: &[u8]) -> Result<Option<(Request, usize)>, HandshakeError> {
    let Some((line, line_end)) = request_line(buf)? else {
        if buf.len() > MAX_REQUEST {
            return Err(refuse(414, "request line too long"));
        }
        return Ok(None);
    };
    if line_end > MAX_REQUEST {
        return Err(refuse(414, "request line too long"));
    }
    if line.major >= 2 {
        return Err(refuse(505, "HTTP/2 and later are not spoken here: a WebSocket upgrade needs HTTP/1.1"));
    }
    if (line.major, line.minor) < (1, 1) {
        return Err(refuse(400, "a WebSocket upgrade needs HTTP/1.1"));
    }
    let sse = path_and_query(line.target).is_ok_and(|(p, _)| p == SSE_PATH);
    let preflight = sse && line.method == "OPTIONS";
    if line.method != "GET" && !preflight {
        if sse {
            return Err(refuse(405, "an event stream is a GET"));
        }
        return Err(refuse(405, "a WebSocket upgrade must be a GET"));
    }
    let (path, query_str) = path_and_query(line.target)?;

    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let (n, fields) = match httparse::parse_headers(&buf[line_end..], &mut headers) {
        Ok(httparse::Status::Complete((n, fields))) => (line_end + n, fields),
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_REQUEST {
                return Err(refuse(431, "request header fields too large"));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HandshakeError {
                status: 431,
                reason: format!("too many header fields (at most {MAX_HEADERS})"),
            });
        }
        Err(e) => return Err(HandshakeError { status: 400, reason: format!("malformed HTTP header field: {e}") }),
    };
    if n > MAX_REQUEST {
        return Err(refuse(431, "request header fields too large"));
    }

    let (mut host, mut version, mut key, mut origin, mut auth) = (None, None, None, None, None);
    let mut last_event_id = None;
    let (mut upgrade, mut connection, mut body) = (false, false, false);
    let mut protocols = Vec::new();
    let mut extensions = Vec::new();
    for h in fields {
        let (name, value) = (h.name, h.value);
        if name.eq_ignore_ascii_case("host") {
            once(&mut host, value, "more than one Host header (RFC 7230 §5.4)")?;
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade |= header_has_token(value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection |= header_has_token(value, "upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            once(&mut version, value, "more than one Sec-WebSocket-Version header (RFC 6455 §11.3.5)")?;
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            once(&mut key, value, "more than one Sec-WebSocket-Key header (RFC 6455 §11.3.1)")?;
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            let v = std::str::from_utf8(value).map_err(|_| refuse(400, "Sec-WebSocket-Protocol is not text"))?;
            protocols.extend(v.split(',').map(|p| p.trim().to_owned()).filter(|p| !p.is_empty()));
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            crate::deflate::parse_extensions(value, &mut extensions).map_err(|why| refuse(400, why))?;
        } else if name.eq_ignore_ascii_case("origin") {
            once(&mut origin, value, "more than one Origin header (RFC 6454 §7.3)")?;
        } else if name.eq_ignore_ascii_case("authorization") {
            once(&mut auth, value, "more than one Authorization header")?;
        } else if name.eq_ignore_ascii_case("last-event-id") {
            once(&mut last_event_id, value, "more than one Last-Event-ID header")?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            body = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            body |= value != b"0";
        }
    }
    let Some(host) = host else {
        return Err(refuse(400, "missing Host header"));
    };
    if !is_host(host, false) {
        return Err(refuse(400, "bad Host header"));
    }
    // An Origin that is not UTF-8 is still an Origin: kept (lossily) so that an allow-list
    // refuses it, rather than read as absent (a non-browser client, left to the token).
    let origin = origin.map(|o| String::from_utf8_lossy(o).into_owned());
    // Only the Bearer scheme carries a token; anything else is as if absent.
    let bearer = auth.and_then(|a| std::str::from_utf8(a).ok()).and_then(|a| {
        let (scheme, token) = a.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
    });
    if sse {
        if body {
            return Err(refuse(400, "an event-stream request has no body (Content-Length or Transfer-Encoding)"));
        }
        if preflight {
            return Ok(Some((Request::Preflight { origin }, n)));
        }
        let last_event_id = match last_event_id.map(std::str::from_utf8) {
            None => None,
            Some(Ok(v)) => Some(v.trim().to_owned()),
            Some(Err(_)) => return Err(refuse(400, "Last-Event-ID is not text")),
        };
        let query = parse_query(query_str)?;
        return Ok(Some((Request::EventStream(EventStream { query, origin, bearer, last_event_id }), n)));
    }
    if !upgrade {
        return Err(refuse(400, "missing 'Upgrade: websocket' header (this port speaks WebSocket only)"));
    }
    if !connection {
        return Err(refuse(400, "missing 'Connection: Upgrade' header"));
    }
    if version != Some(b"13".as_slice()) {
        return Err(refuse(426, "unsupported Sec-WebSocket-Version: use 13"));
    }
    let key = key.ok_or_else(|| refuse(400, "missing Sec-WebSocket-Key header"))?;
    let key = std::str::from_utf8(key).map_err(|_| refuse(400, "bad Sec-WebSocket-Key"))?.trim();
    match B64.decode(key) {
        Ok(raw) if raw.len() == 16 => {}
        _ => return Err(refuse(400, "Sec-WebSocket-Key must be base64 of 16 bytes")),
    }
    if body {
        return Err(refuse(400, "an upgrade request has no body (Content-Length or Transfer-Encoding)"));
    }
    let query = parse_query(query_str)?;
    Ok(Some((
        Request::WebSocket(Upgrade {
            path: path.to_owned(),
            query,
            key: key.to_owned(),
            protocols,
            origin,
            bearer,
            extensions,
        }),
        n,
    )))
}

/// Query parameters, percent-decoded, in order.
fn parse_query(query_str: &str) -> Result<Vec<(String, String)>, HandshakeError> {
    let mut query = Vec::new();
    for pair in query_str.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        query.push((percent_decode(k)?, percent_decode(v)?));
    }
    Ok(query)
}

/// `Sec-WebSocket-Accept` for a key.
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(GUID);
    B64.encode(h.finalize())
}

/// The 101 answer.
pub fn response_101(key: &str, subprotocol: Option<Subprotocol>) -> Vec<u8> {
    response_101_with(key, subprotocol, None)
}

/// The 101 answer, with the accepted extensions' `Sec-WebSocket-Extensions` value if any.
pub fn response_101_with(key: &str, subprotocol: Option<Subprotocol>, extensions: Option<&str>) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        accept_key(key)
    );
    if let Some(p) = subprotocol {
        r.push_str("Sec-WebSocket-Protocol: ");
        r.push_str(p.token());
        r.push_str("\r\n");
    }
    if let Some(e) = extensions {
        r.push_str("Sec-WebSocket-Extensions: ");
        r.push_str(e);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

fn status_text(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        414 => "URI Too Long",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// An HTTP error answer with the reason as a text body; the connection closes after it. A 426
/// names the version the edge speaks (RFC 6455 §4.2.2); a 405 names the method it allows
/// (RFC 7231 §6.5.5).
pub fn error_response(err: &HandshakeError) -> Vec<u8> {
    let body = format!("{}\n", err.reason);
    let extra = match err.status {
        426 => "Sec-WebSocket-Version: 13\r\n",
        405 => "Allow: GET\r\n",
        401 => "WWW-Authenticate: Bearer\r\n",
        // Over a rate or a capacity bound: come back later (seconds, RFC 9110 §10.2.3).
        429 | 503 => "Retry-After: 1\r\n",
        _ => "",
    };
    format!(
        "HTTP/1.1 {} {}\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{extra}\r\n{body}",
        err.status,
        status_text(err.status),
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn req(extra: &str) -> String {
        format!(
            "GET /ws?room=lobby&since=42&x=a%20b HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    /// A valid request with the given request target.
    fn req_to(target: &str) -> String {
        req("").replacen("/ws?room=lobby&since=42&x=a%20b", target, 1)
    }

    fn status(s: &str) -> u16 {
        match parse_request(s.as_bytes()) {
            Err(e) => e.status,
            Ok(Some(_)) => 101,
            Ok(None) => 0,
        }
    }

    #[test]
    fn rfc_sample_key() {
        assert_eq!(accept_key(KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn parses_a_valid_upgrade_and_leaves_following_bytes() {
        let mut r = req("Sec-WebSocket-Protocol: mqtt, roomcast.rkyv.v2\r\nOrigin: http://x\r\n").into_bytes();
        let n0 = r.len();
        r.extend_from_slice(&[0x81, 0x80]);
        let (up, n) = parse_request(&r).unwrap().unwrap();
        assert_eq!(n, n0);
        assert_eq!(up.path, "/ws");
        assert_eq!(up.query_param("room"), Some("lobby"));
        assert_eq!(up.query_param("since"), Some("42"));
        assert_eq!(up.query_param("x"), Some("a b"));
        assert_eq!(up.select_subprotocol().unwrap(), Some(Subprotocol::Rkyv));
        assert_eq!(up.origin.as_deref(), Some("http://x"));
        let resp = String::from_utf8(response_101(&up.key, Some(Subprotocol::Rkyv))).unwrap();
        assert!(resp.starts_with("HTTP/1.1 101 "));
        assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(resp.contains("Sec-WebSocket-Protocol: roomcast.rkyv.v2\r\n"));
    }

    #[test]
    fn incomplete_until_the_blank_line() {
        for r in [req(""), format!("\r\n{}", req_to("http://h/ws?room=r")), req("").replace("\r\n", "\n")] {
            for cut in 0..r.len() {
                assert_eq!(parse_request(&r.as_bytes()[..cut]).unwrap(), None, "cut {cut} of {r:?}");
            }
            assert_eq!(status(&r), 101, "{r:?}");
        }
    }

    #[test]
    fn refusals_have_the_right_status() {
        assert_eq!(status("BLAH\r\n\r\n"), 400);
        assert_eq!(status(&req("").replacen("GET", "POST", 1)), 405);
        assert_eq!(status(&req("").replace("HTTP/1.1", "HTTP/1.0")), 400);
        assert_eq!(status(&req("").replace("Host: h\r\n", "")), 400);
        assert_eq!(status(&req("").replace("Upgrade: websocket\r\n", "")), 400);
        assert_eq!(status(&req("").replace("keep-alive, Upgrade", "keep-alive")), 400);
        assert_eq!(status(&req("").replace("Version: 13", "Version: 8")), 426);
        assert_eq!(status(&req("").replace("Sec-WebSocket-Version: 13\r\n", "")), 426);
        assert_eq!(status(&req("").replace(KEY, "short")), 400);
        assert_eq!(status(&req("").replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), "")), 400);
        assert_eq!(status(&req("").replace("a%20b", "a%zz")), 400);
        let many: String = (0..MAX_HEADERS).fold(String::new(), |mut s, i| {
            let _ = write!(s, "X-{i}: y\r\n");
            s
        });
        assert_eq!(status(&req(&many)), 431);
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_REQUEST));
        assert_eq!(status(&big), 431);
        let big = format!("GET / HTTP/1.1\r\nHost: h\r\nX: {}\r\n\r\n", "a".repeat(MAX_REQUEST));
        assert_eq!(status(&big), 431);
        assert_eq!(status(&format!("GET /{}", "a".repeat(MAX_REQUEST))), 414);
        let (up, _) = parse_request(req("Sec-WebSocket-Protocol: mqtt\r\n").as_bytes()).unwrap().unwrap();
        assert_eq!(up.select_subprotocol().unwrap_err().status, 400);
        let (up, _) = parse_request(req("").as_bytes()).unwrap().unwrap();
        assert_eq!(up.select_subprotocol().unwrap(), None);
    }

    /// Failed before the fix: the target was taken literally, so the path was
    /// `http://h:8080/ws` (404 at the shard) and the query came from the whole URI.
    #[test]
    fn absolute_form_targets_are_accepted() {
        for (target, path, room) in [
            ("http://h:8080/ws?room=r", "/ws", Some("r")),
            ("HTTPS://h/ws?room=r&since=1", "/ws", Some("r")),
            ("ws://127.0.0.1:9/ws?room=a%3Ab", "/ws", Some("a:b")),
            ("wss://[::1]:443/ws", "/ws", None),
            ("http://user@h/ws?room=r", "/ws", Some("r")),
            ("http://h", "/", None),
            ("http://h?room=r", "/", Some("r")),
            ("http://h/?room=r", "/", Some("r")),
        ] {
            let (up, _) = parse_request(req_to(target).as_bytes()).unwrap().unwrap_or_else(|| panic!("{target}"));
            assert_eq!(up.path, path, "{target}");
            assert_eq!(up.query_param("room"), room, "{target}");
        }
    }

    /// Failed before the fix: `*` and `host:port` were taken as paths and the upgrade accepted
    /// (the shard then answered 404); a fragment ended up in the last query value.
    #[test]
    fn other_target_forms_are_refused_with_400() {
        for target in
            ["*", "h:8080", "example.com", "ftp://h/ws", "http:///ws", "http://h:1/ws?room=r#frag", "ws?room=r"]
        {
            let e = parse_request(req_to(target).as_bytes()).unwrap_err();
            assert_eq!(e.status, 400, "{target}: {e:?}");
        }
        let e = parse_request(req_to("*").as_bytes()).unwrap_err();
        assert!(e.reason.contains("asterisk-form"), "{e:?}");
        let e = parse_request(req_to("h:8080").as_bytes()).unwrap_err();
        assert!(e.reason.contains("authority-form"), "{e:?}");
    }

    /// Failed before the fix: the last Key/Version/Host/Origin won, so a request with two keys
    /// (RFC 6455 §11.3.1: MUST NOT appear more than once) was upgraded.
    #[test]
    fn fields_that_must_not_repeat_are_refused() {
        let twice = |line: &str| req(&format!("{line}\r\n"));
        assert_eq!(status(&twice(&format!("Sec-WebSocket-Key: {KEY}"))), 400);
        assert_eq!(status(&twice("sec-websocket-key: AAAAAAAAAAAAAAAAAAAAAA==")), 400);
        assert_eq!(status(&twice("Sec-WebSocket-Version: 13")), 400);
        assert_eq!(status(&twice("Host: other")), 400);
        assert_eq!(status(&req("Origin: http://a\r\nOrigin: http://b\r\n")), 400);
        let e = parse_request(twice(&format!("Sec-WebSocket-Key: {KEY}")).as_bytes()).unwrap_err();
        assert!(e.reason.contains("Sec-WebSocket-Key"), "{e:?}");
        // List fields may repeat; their values are combined.
        let split =
            req("").replace("Connection: keep-alive, Upgrade\r\n", "Connection: keep-alive\r\nConnection: UPGRADE\r\n");
        assert_eq!(status(&split), 101);
        let split = req("").replace("Upgrade: websocket\r\n", "Upgrade: h2c\r\nUpgrade: WebSocket\r\n");
        assert_eq!(status(&split), 101);
        assert_eq!(status(&req("Sec-WebSocket-Extensions: a\r\nSec-WebSocket-Extensions: b\r\n")), 101);
    }

    /// Passed before the fix (a guard): every Sec-WebSocket-Protocol field counts, in order.
    #[test]
    fn repeated_subprotocol_fields_are_all_considered() {
        let r = req("Sec-WebSocket-Protocol: mqtt\r\nSec-WebSocket-Protocol: x, roomcast.rkyv.v2\r\n");
        let (up, _) = parse_request(r.as_bytes()).unwrap().unwrap();
        assert_eq!(up.protocols, ["mqtt", "x", "roomcast.rkyv.v2"]);
        assert_eq!(up.select_subprotocol().unwrap(), Some(Subprotocol::Rkyv));
    }

    #[test]
    fn extension_fields_are_joined_and_malformed_ones_refused() {
        let r = req(
            "Sec-WebSocket-Extensions: x-foo\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
        );
        let (up, _) = parse_request(r.as_bytes()).unwrap().unwrap();
        let names: Vec<&str> = up.extensions.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["x-foo", "permessage-deflate"]);
        let a = crate::deflate::negotiate(&up.extensions, false).unwrap();
        let resp = String::from_utf8(response_101_with(&up.key, None, Some(&a.response_value()))).unwrap();
        assert!(resp.contains(
            "\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n\r\n"
        ));
        assert_eq!(status(&req("Sec-WebSocket-Extensions: permessage-deflate; =15\r\n")), 400);
        assert_eq!(status(&req("Sec-WebSocket-Extensions: permessage-deflate; a=\"b c\"\r\n")), 400);
        // Well-formed but not honourable: declined, not refused.
        assert_eq!(status(&req("Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=99\r\n")), 101);
    }

    /// Failed before the fix: HTTP/1.2 was a malformed request (400) though a server SHOULD
    /// read a later minor version as the one it implements (RFC 7230 §2.6), and HTTP/2.0 was a
    /// 400 too instead of 505.
    #[test]
    fn http_versions() {
        assert_eq!(status(&req("").replace("HTTP/1.1", "HTTP/1.2")), 101);
        assert_eq!(status(&req("").replace("HTTP/1.1", "HTTP/1.9")), 101);
        assert_eq!(status(&req("").replace("HTTP/1.1", "HTTP/2.0")), 505);
        assert_eq!(status(&req("").replace("HTTP/1.1", "HTTP/0.9")), 400);
        assert_eq!(status(&req("").replace("HTTP/1.1", "HTTP/1.10")), 400);
        assert_eq!(status(&req("").replace("HTTP/1.1", "http/1.1")), 400);
        assert_eq!(status(&req("").replacen("GET", "get", 1)), 405);
        assert_eq!(status("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), 505);
    }

    /// Failed before the fix: 40 header fields were over the old 32 (431), and a 12 KiB cookie
    /// over the old 8 KiB. A browser behind a CDN and two proxies: upgraded.
    #[test]
    fn browser_behind_proxies_fits() {
        assert_eq!(status(&browser_request("/ws?room=r", 40, 6 * 1024)), 101);
        // A 12 KiB cookie: over the old 8 KiB bound, within 16 KiB.
        let r = browser_request("/ws?room=r", 40, 12 * 1024);
        assert!(r.len() > 8192 && r.len() < MAX_REQUEST, "{}", r.len());
        assert_eq!(status(&r), 101);
        // MAX_HEADERS fields fit, one more is 431 (not 400), also when the head is incomplete.
        assert_eq!(status(&browser_request("/ws", MAX_HEADERS, 100)), 101);
        assert_eq!(status(&browser_request("/ws", MAX_HEADERS + 1, 100)), 431);
        let r = browser_request("/ws", MAX_HEADERS + 1, 100);
        assert_eq!(status(&r[..r.len() - 2]), 431);
    }

    /// A realistic Chrome request through a CDN and proxies: `fields` header fields in all,
    /// one of them a cookie of `cookie` bytes.
    fn browser_request(target: &str, fields: usize, cookie: usize) -> String {
        let mut h = vec![
            "Host: live.example.com".to_owned(),
            "Connection: Upgrade".to_owned(),
            "Pragma: no-cache".to_owned(),
            "Cache-Control: no-cache".to_owned(),
            "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36".to_owned(),
            "Upgrade: websocket".to_owned(),
            "Origin: https://www.example.com".to_owned(),
            "Sec-WebSocket-Version: 13".to_owned(),
            "Accept-Encoding: gzip, deflate, br, zstd".to_owned(),
            "Accept-Language: en-US,en;q=0.9,de;q=0.8".to_owned(),
            format!("Cookie: {}", cookie_value(cookie)),
            format!("Sec-WebSocket-Key: {KEY}"),
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits".to_owned(),
            "Sec-WebSocket-Protocol: roomcast.json.v1".to_owned(),
            "X-Forwarded-For: 203.0.113.7, 198.51.100.2".to_owned(),
            "X-Forwarded-Proto: https".to_owned(),
            "X-Forwarded-Host: live.example.com".to_owned(),
            "X-Forwarded-Port: 443".to_owned(),
            "X-Real-IP: 203.0.113.7".to_owned(),
            "Forwarded: for=203.0.113.7;proto=https;host=live.example.com".to_owned(),
            "Via: 1.1 varnish, 1.1 proxy.internal".to_owned(),
            "CF-Connecting-IP: 203.0.113.7".to_owned(),
            "CF-IPCountry: DE".to_owned(),
            "CF-Ray: 8f1a2b3c4d5e6f70-FRA".to_owned(),
            "CF-Visitor: {\"scheme\":\"https\"}".to_owned(),
            "CDN-Loop: cloudflare".to_owned(),
            "True-Client-IP: 203.0.113.7".to_owned(),
            "X-Request-ID: 5f0c6f1e-9c1a-4c8e-bb3e-1f2a3b4c5d6e".to_owned(),
            "Traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
            "X-Amzn-Trace-Id: Root=1-67891233-abcdef012345678912345678".to_owned(),
            "Sec-Ch-Ua: \"Chromium\";v=\"131\", \"Not_A Brand\";v=\"24\"".to_owned(),
            "Sec-Ch-Ua-Mobile: ?0".to_owned(),
            "Sec-Ch-Ua-Platform: \"Linux\"".to_owned(),
            "Sec-Fetch-Dest: empty".to_owned(),
            "Sec-Fetch-Mode: websocket".to_owned(),
            "Sec-Fetch-Site: same-site".to_owned(),
            "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1MSJ9.c2lnbmF0dXJl".to_owned(),
            "X-Envoy-External-Address: 203.0.113.7".to_owned(),
            "X-B3-TraceId: 80f198ee56343ba864fe8b2a57d3eff7".to_owned(),
            "X-B3-SpanId: e457b5a2e4d86bd1".to_owned(),
        ];
        let mut i = 0;
        while h.len() < fields {
            h.push(format!("X-Proxy-Hop-{i}: edge-{i}.internal"));
            i += 1;
        }
        h.truncate(fields);
        let mut r = format!("GET {target} HTTP/1.1\r\n");
        for line in h {
            r.push_str(&line);
            r.push_str("\r\n");
        }
        r.push_str("\r\n");
        r
    }

    /// A cookie header value of about `len` bytes: analytics, session and consent cookies.
    fn cookie_value(len: usize) -> String {
        let mut c = String::from("_ga=GA1.2.1234567890.1700000000; session=s%3Aabcdef0123456789.XyZ; consent=all");
        let mut i = 0;
        while c.len() < len {
            c.push_str(&format!("; pref_{i}={}", "v".repeat(40)));
            i += 1;
        }
        c.truncate(len);
        c
    }

    /// Failed before the fix: a body was accepted and its bytes would have been read as frames;
    /// a Host that is not a host was accepted; a 405 lacked `Allow`.
    #[test]
    fn bodies_bad_hosts_and_405_answers() {
        assert_eq!(status(&req("Content-Length: 5\r\n")), 400);
        assert_eq!(status(&req("Transfer-Encoding: chunked\r\n")), 400);
        assert_eq!(status(&req("Content-Length: 0\r\n")), 101);
        assert_eq!(status(&req("").replace("Host: h\r\n", "Host:\r\n")), 400);
        assert_eq!(status(&req("").replace("Host: h\r\n", "Host: a b\r\n")), 400);
        assert_eq!(status(&req("").replace("Host: h\r\n", "Host: [::1]:8080\r\n")), 101);
        let r = String::from_utf8(error_response(&refuse(405, "GET only"))).unwrap();
        assert!(r.contains("\r\nAllow: GET\r\n"), "{r}");
    }

    fn sse(extra: &str) -> Result<Option<(Request, usize)>, HandshakeError> {
        parse(
            format!("GET /sse?room=r&since=3 HTTP/1.1\r\nHost: h\r\nAccept: text/event-stream\r\n{extra}\r\n")
                .as_bytes(),
        )
    }

    /// An event-stream request needs no upgrade fields; Last-Event-ID, Origin and a bearer
    /// token are read; a body, a second Last-Event-ID or another method are refused.
    #[test]
    fn event_stream_requests() {
        let Some((Request::EventStream(es), _)) =
            sse("Last-Event-ID: 00000000000000ab:7\r\nOrigin: https://a\r\nAuthorization: Bearer t0k\r\n").unwrap()
        else {
            panic!("an event stream")
        };
        assert_eq!(es.query_param("room"), Some("r"));
        assert_eq!(es.query_param("since"), Some("3"));
        assert_eq!(es.last_event_id.as_deref(), Some("00000000000000ab:7"));
        assert_eq!(es.origin.as_deref(), Some("https://a"));
        assert_eq!(es.bearer.as_deref(), Some("t0k"));
        assert!(matches!(sse(""), Ok(Some((Request::EventStream(EventStream { last_event_id: None, .. }), _)))));
        assert_eq!(sse("Last-Event-ID: 1\r\nLast-Event-ID: 2\r\n").unwrap_err().status, 400);
        assert_eq!(sse("Content-Length: 3\r\n").unwrap_err().status, 400);
        assert_eq!(
            sse("").unwrap().unwrap().1,
            "GET /sse?room=r&since=3 HTTP/1.1\r\nHost: h\r\nAccept: text/event-stream\r\n\r\n".len()
        );
        let post = parse(b"POST /sse?room=r HTTP/1.1\r\nHost: h\r\n\r\n").unwrap_err();
        assert_eq!(post.status, 405);
        assert!(matches!(
            parse(b"OPTIONS /sse HTTP/1.1\r\nHost: h\r\nOrigin: https://a\r\n\r\n"),
            Ok(Some((Request::Preflight { origin: Some(_) }, _)))
        ));
        // OPTIONS elsewhere stays a 405; a /ws upgrade is unchanged.
        assert_eq!(parse(b"OPTIONS /ws HTTP/1.1\r\nHost: h\r\n\r\n").unwrap_err().status, 405);
        assert!(matches!(parse(req("").as_bytes()), Ok(Some((Request::WebSocket(_), _)))));
        // Missing Host and HTTP/1.0 are refused as for an upgrade.
        assert_eq!(parse(b"GET /sse?room=r HTTP/1.1\r\n\r\n").unwrap_err().status, 400);
        assert_eq!(parse(b"GET /sse?room=r HTTP/1.0\r\nHost: h\r\n\r\n").unwrap_err().status, 400);
        // Incomplete until the blank line.
        let full = "GET /sse?room=r HTTP/1.1\r\nHost: h\r\n\r\n";
        for cut in 0..full.len() {
            assert_eq!(parse(&full.as_bytes()[..cut]).unwrap(), None, "cut {cut}");
        }
    }

    #[test]
    fn error_responses_carry_the_reason() {
        let r = String::from_utf8(error_response(&refuse(426, "use 13"))).unwrap();
        assert!(r.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(r.contains("Sec-WebSocket-Version: 13\r\n"));
        assert!(r.ends_with("\r\n\r\nuse 13\n"));
        for s in [414, 431, 505] {
            let r = String::from_utf8(error_response(&refuse(s, "x"))).unwrap();
            assert!(!r.starts_with(&format!("HTTP/1.1 {s} Error")), "{r}");
        }
    }

    /// Passed before the fix (a guard): malformed queries are a 400 or decode to something,
    /// never a panic.
    #[test]
    fn malformed_queries_never_panic() {
        for q in [
            "%",
            "%4",
            "a=%",
            "a=%%",
            "a=%g0",
            "a=%0g",
            "%ff",
            "a=%c3",
            "a=%c3%28",
            "=",
            "&&=&",
            "a==b",
            "+%2",
            "a=%é",
            "é=%C3%A9",
        ] {
            let r = parse_request(req_to(&format!("/ws?{q}")).as_bytes());
            assert!(matches!(&r, Ok(Some(_)) | Err(HandshakeError { status: 400, .. })), "{q}: {r:?}");
        }
        let (up, _) = parse_request(req_to("/ws?a=%C3%A9+b&c").as_bytes()).unwrap().unwrap();
        assert_eq!(up.query, [("a".to_owned(), "é b".to_owned()), ("c".to_owned(), String::new())]);
        // Every query of up to 3 bytes from an alphabet of the troublesome ones.
        let alphabet = [b'%', b'=', b'&', b'+', b'a', b'F', b'0', b'?'];
        for len in 0..=3u32 {
            for n in 0..alphabet.len().pow(len) {
                let q: String =
                    (0..len).map(|d| alphabet[n / alphabet.len().pow(d) % alphabet.len()] as char).collect();
                let _ = parse_request(req_to(&format!("/ws?{q}")).as_bytes());
                let _ = parse_request(req_to(&format!("http://h/ws?{q}")).as_bytes());
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 99;
        for len in 0..3000usize {
            let mut v = if len % 2 == 0 { req("") } else { req_to("http://h:1/ws?room=a%41") }.into_bytes();
            for _ in 0..(len % 64) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % v.len();
                v[i] = x as u8;
            }
            let _ = parse_request(&v[..len % (v.len() + 1)]);
        }
    }
}
