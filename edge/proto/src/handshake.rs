//! The HTTP/1.1 upgrade (RFC 6455 section 4.2), server side: parse a request with `httparse`,
//! answer 101 with `Sec-WebSocket-Accept` (SHA-1 + base64), or an HTTP error with a reason.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sha1::{Digest, Sha1};

use crate::Subprotocol;

/// Largest upgrade request accepted (431 above).
pub const MAX_REQUEST: usize = 8192;
/// Most headers parsed.
const MAX_HEADERS: usize = 32;
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A valid upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    pub path: String,
    /// Query parameters, percent-decoded, in order.
    pub query: Vec<(String, String)>,
    pub key: String,
    /// Subprotocols offered, in the client's order of preference.
    pub protocols: Vec<String>,
    pub origin: Option<String>,
}

/// Why an upgrade is refused: the HTTP status and a reason for the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeError {
    pub status: u16,
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
            .ok_or_else(|| refuse(400, "unsupported subprotocol: offer roomcast.json.v1 or roomcast.rkyv.v1"))
    }
}

fn header_has_token(value: &[u8], token: &str) -> bool {
    std::str::from_utf8(value).map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))).unwrap_or(false)
}

fn percent_decode(s: &str) -> Result<String, HandshakeError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = |c: u8| (c as char).to_digit(16);
                let (Some(h), Some(l)) = (b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex))
                else {
                    return Err(refuse(400, "bad percent-encoding in the query"));
                };
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| refuse(400, "query is not UTF-8"))
}

/// Parses an upgrade request. `Ok(None)`: incomplete, read more. `Ok(Some((upgrade, n)))`: the
/// request took `n` bytes (WebSocket frames may follow). `Err`: answer with [`error_response`]
/// and close.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Upgrade, usize)>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_REQUEST {
                return Err(refuse(431, "request header fields too large"));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(refuse(431, "too many header fields")),
        Err(e) => return Err(HandshakeError { status: 400, reason: format!("malformed HTTP request: {e}") }),
    };
    if n > MAX_REQUEST {
        return Err(refuse(431, "request header fields too large"));
    }
    if req.method != Some("GET") {
        return Err(refuse(405, "a WebSocket upgrade must be a GET"));
    }
    if req.version != Some(1) {
        return Err(refuse(400, "a WebSocket upgrade needs HTTP/1.1"));
    }
    let (mut host, mut upgrade, mut connection, mut version, mut key) = (false, false, false, None, None);
    let mut protocols = Vec::new();
    let mut origin = None;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            host = true;
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade |= header_has_token(h.value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection |= header_has_token(h.value, "upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            version = Some(h.value);
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            key = Some(h.value);
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            let v = std::str::from_utf8(h.value).map_err(|_| refuse(400, "Sec-WebSocket-Protocol is not text"))?;
            protocols.extend(v.split(',').map(|p| p.trim().to_owned()).filter(|p| !p.is_empty()));
        } else if name.eq_ignore_ascii_case("origin") {
            origin = std::str::from_utf8(h.value).ok().map(str::to_owned);
        }
    }
    if !host {
        return Err(refuse(400, "missing Host header"));
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
    let target = req.path.unwrap_or("/");
    let (path, query_str) = target.split_once('?').unwrap_or((target, ""));
    let mut query = Vec::new();
    for pair in query_str.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        query.push((percent_decode(k)?, percent_decode(v)?));
    }
    Ok(Some((Upgrade { path: path.to_owned(), query, key: key.to_owned(), protocols, origin }, n)))
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
    let mut r = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        accept_key(key)
    );
    if let Some(p) = subprotocol {
        r.push_str("Sec-WebSocket-Protocol: ");
        r.push_str(p.token());
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

fn status_text(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// An HTTP error answer with the reason as a text body; the connection closes after it.
pub fn error_response(err: &HandshakeError) -> Vec<u8> {
    let body = format!("{}\n", err.reason);
    let extra = if err.status == 426 { "Sec-WebSocket-Version: 13\r\n" } else { "" };
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
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn req(extra: &str) -> String {
        format!(
            "GET /ws?room=lobby&since=42&x=a%20b HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    #[test]
    fn rfc_sample_key() {
        assert_eq!(accept_key(KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn parses_a_valid_upgrade_and_leaves_following_bytes() {
        let mut r = req("Sec-WebSocket-Protocol: mqtt, roomcast.rkyv.v1\r\nOrigin: http://x\r\n").into_bytes();
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
        assert!(resp.contains("Sec-WebSocket-Protocol: roomcast.rkyv.v1\r\n"));
    }

    #[test]
    fn incomplete_until_the_blank_line() {
        let r = req("");
        for cut in 0..r.len() {
            assert_eq!(parse_request(&r.as_bytes()[..cut]).unwrap(), None, "cut {cut}");
        }
    }

    #[test]
    fn refusals_have_the_right_status() {
        let status = |s: &str| parse_request(s.as_bytes()).unwrap_err().status;
        assert_eq!(status("BLAH\r\n\r\n"), 400);
        assert_eq!(status(&req("").replacen("GET", "POST", 1)), 405);
        assert_eq!(status(&req("").replace("HTTP/1.1", "HTTP/1.0")), 400);
        assert_eq!(status(&req("").replace("Host: h\r\n", "")), 400);
        assert_eq!(status(&req("").replace("Upgrade: websocket\r\n", "")), 400);
        assert_eq!(status(&req("").replace("keep-alive, Upgrade", "keep-alive")), 400);
        assert_eq!(status(&req("").replace("Version: 13", "Version: 8")), 426);
        assert_eq!(status(&req("").replace(KEY, "short")), 400);
        assert_eq!(status(&req("").replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), "")), 400);
        assert_eq!(status(&req("").replace("a%20b", "a%zz")), 400);
        let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(status(&req(&many)), 431);
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_REQUEST));
        assert_eq!(parse_request(big.as_bytes()).unwrap_err().status, 431);
        let (up, _) = parse_request(req("Sec-WebSocket-Protocol: mqtt\r\n").as_bytes()).unwrap().unwrap();
        assert_eq!(up.select_subprotocol().unwrap_err().status, 400);
        let (up, _) = parse_request(req("").as_bytes()).unwrap().unwrap();
        assert_eq!(up.select_subprotocol().unwrap(), None);
    }

    #[test]
    fn error_responses_carry_the_reason() {
        let r = String::from_utf8(error_response(&refuse(426, "use 13"))).unwrap();
        assert!(r.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(r.contains("Sec-WebSocket-Version: 13\r\n"));
        assert!(r.ends_with("\r\n\r\nuse 13\n"));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 99;
        for len in 0..3000usize {
            let mut v = req("").into_bytes();
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
