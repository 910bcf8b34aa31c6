//! A move's question to the dispatch URL (`GET http://HOST:PORT/v1/route?room=R`), asked over a
//! nonblocking socket on the worker's epoll, as the first connects are ([`crate::connect`]).
//!
//! The request and the answer are plain HTTP/1.1 with `Connection: close`: the request is
//! built and the answer parsed from bytes here ([`request`], [`parse_answer`]: no socket, no
//! clock), and [`Ask`] moves those bytes over the socket. The answer must carry its body with a
//! `Content-Length` (the edge's `/v1/route` does) or end it by closing; a chunked answer is an
//! error, not something half read. The error classification is the one the blocking client
//! (reqwest) gave: a status other than 2xx is a [`Refused`] (`dispatch_http_503` in the counts),
//! a refused or reset connect the socket's own error (`dispatch_refused`, `dispatch_reset`).
//! An answer that cannot be used (not HTTP, a body without a usable URL) is a [`BadAnswer`]
//! (`dispatch_bad_answer`), and a host name the resolver does not know an [`Unresolved`]
//! (`dispatch_unresolved_host`): both used to fall under the catch-all `dispatch_handshake`.

use std::io::Read;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::worker::Refused;

/// How long a dispatch request may take from its connect to the end of its answer (the
/// blocking client's timeout).
pub const DISPATCH_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest dispatch answer taken, head and body (`/v1/route` answers ~100 bytes).
const ANSWER_LIMIT: usize = 64 * 1024;

/// An answer that cannot be used: a dispatch answer that is not HTTP, is chunked, or whose body
/// is not JSON or has no string `url`; or a URL (from dispatch or a goaway) that is not
/// `http://HOST...` / `ws://HOST[:PORT]/...`. Counted as `bad_answer` (`dispatch_bad_answer`).
#[derive(Debug)]
pub struct BadAnswer(pub String);

impl std::fmt::Display for BadAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadAnswer {}

fn bad(what: impl Into<String>) -> anyhow::Error {
    BadAnswer(what.into()).into()
}

/// A host name (in a dispatch URL, or the WebSocket URL dispatch answered) that the system's
/// resolver gave no IPv4 address for: counted as `unresolved_host` (`dispatch_unresolved_host`).
#[derive(Debug)]
pub struct Unresolved {
    /// The `HOST:PORT` looked up.
    pub authority: String,
    /// What the resolver said.
    pub detail: String,
}

impl std::fmt::Display for Unresolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no IPv4 address for {}: {}", self.authority, self.detail)
    }
}

impl std::error::Error for Unresolved {}

/// The address of `authority` (`HOST:PORT`): an IP parsed as it is, a name looked up with the
/// system's resolver (blocking: callers on a loop cache the answer), IPv4 only since members'
/// sockets are (their source addresses are). Fleets advertise names (`ws://edge-3.internal/ws`),
/// so a name in dispatch's answer is followed, not counted as a failure.
pub fn lookup(authority: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(a) = authority.parse() {
        return Ok(a);
    }
    let unresolved = |detail: String| anyhow::Error::from(Unresolved { authority: authority.to_owned(), detail });
    match authority.to_socket_addrs() {
        Ok(mut addrs) => {
            addrs.find(SocketAddr::is_ipv4).ok_or_else(|| unresolved("none of its addresses is IPv4".into()))
        }
        Err(e) => Err(unresolved(e.to_string())),
    }
}

/// `HOST:PORT` from a URL's host part, with `port` when it names none (`[::1]` is a host
/// without a port; `[::1]:9` has one).
pub fn with_port(host: &str, port: u16) -> String {
    if host.rsplit_once(':').is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        && !host.ends_with(']')
    {
        host.to_owned()
    } else {
        format!("{host}:{port}")
    }
}

/// The request asking dispatch URL `url` (`http://HOST[:PORT]/PATH?QUERY`) where room `room`
/// should connect, and the URL's authority (`HOST:PORT`, port 80 when none) to connect to. A
/// goaway's URL names the room already; a configured dispatch URL does not, and gets
/// `room=r<room>` added, as the blocking client did.
pub fn request(url: &str, room: u32) -> anyhow::Result<(String, Vec<u8>)> {
    let rest = url.strip_prefix("http://").ok_or_else(|| bad(format!("not an http:// dispatch URL: {url}")))?;
    let ask = if rest.contains("room=") {
        rest.to_owned()
    } else {
        format!("{rest}{}room=r{room}", if rest.contains('?') { '&' } else { '?' })
    };
    let end = ask.find(['/', '?']).unwrap_or(ask.len());
    let (host, target) = ask.split_at(end);
    if host.is_empty() {
        return Err(bad(format!("no host in dispatch URL {url}")));
    }
    let target = if target.starts_with('/') { target.to_owned() } else { format!("/{target}") };
    let authority = with_port(host, 80);
    let req = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\nConnection: close\r\n\r\n");
    Ok((authority, req.into_bytes()))
}

/// Reads a dispatch answer from its bytes so far (`eof`: the server closed after them).
/// `Ok(None)`: incomplete, read more. `Ok(Some(url))`: a 2xx whose JSON body has a string
/// `url` (the WebSocket URL to connect to). Errors: another status ([`Refused`], as soon as the
/// head is in); a head that does not parse, a chunked or otherwise encoded body, a body that is
/// not JSON or has no `url` ([`BadAnswer`]); or an answer cut short (`UnexpectedEof`). Never
/// panics on input.
pub fn parse_answer(buf: &[u8], eof: bool) -> anyhow::Result<Option<String>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if eof => return Err(cut_short("head")),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(bad(format!("dispatch answer does not parse: {e}"))),
    };
    let code = resp.code.unwrap_or(0);
    if !(200..300).contains(&code) {
        let line = format!("dispatch answered {code} {}", resp.reason.unwrap_or(""));
        return Err(Refused { status: code, line: line.trim_end().to_owned() }.into());
    }
    let header = |name: &str| resp.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
    if let Some(te) = header("Transfer-Encoding") {
        return Err(bad(format!(
            "dispatch answered with Transfer-Encoding {:?}: only Content-Length bodies are read",
            String::from_utf8_lossy(te)
        )));
    }
    let body = &buf[head_len..];
    let body = match header("Content-Length") {
        Some(v) => {
            let len: usize = std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| bad(format!("bad Content-Length {:?}", String::from_utf8_lossy(v))))?;
            if len > ANSWER_LIMIT {
                return Err(bad(format!("dispatch answer body of {len} bytes is too long")));
            }
            match body.get(..len) {
                Some(b) => b,
                None if eof => return Err(cut_short("body")),
                None => return Ok(None),
            }
        }
        // No length: the body ends where the server closes (we asked for `Connection: close`).
        None if eof => body,
        None => return Ok(None),
    };
    Ok(Some(url_of(body)?))
}

/// The string `url` of a dispatch answer's JSON body.
pub fn url_of(body: &[u8]) -> anyhow::Result<String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("dispatch answer body is not JSON: {e}")))?;
    let url = v["url"].as_str().ok_or_else(|| bad(format!("dispatch answer without url: {v}")))?;
    Ok(url.to_owned())
}

/// The server closed before the whole answer: counted as `closed_in_handshake`.
fn cut_short(what: &str) -> anyhow::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("dispatch closed inside its answer's {what}")).into()
}

/// One dispatch request in flight on a nonblocking socket.
pub struct Ask {
    sock: Socket,
    started: Instant,
    req: Vec<u8>,
    sent: usize,
    answer: Vec<u8>,
}

/// Where a dispatch request stands after its socket was ready.
pub enum AskStep {
    /// Waiting for the socket (connect, room to write, the rest of the answer).
    Wait,
    /// Answered: the WebSocket URL to connect to.
    Done(String),
    /// Refused, reset, cut short, or not a usable answer.
    Failed(anyhow::Error),
}

impl Ask {
    /// Starts `req` to `dst` over `sock` (made nonblocking here; the connect is under way when
    /// this returns).
    pub fn start(sock: Socket, dst: SocketAddr, req: Vec<u8>) -> anyhow::Result<Self> {
        let started = Instant::now();
        sock.set_nonblocking(true)?;
        match sock.connect(&dst.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(Self { sock, started, req, sent: 0, answer: Vec::new() })
    }

    /// Its socket, for epoll.
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Whether it has been in flight longer than [`DISPATCH_TIMEOUT`].
    pub fn expired(&self, now: Instant) -> bool {
        now.duration_since(self.started) > DISPATCH_TIMEOUT
    }

    /// Takes it as far as its socket allows now (`tmp`: scratch space for reading).
    pub fn drive(&mut self, tmp: &mut [u8]) -> AskStep {
        match self.advance(tmp) {
            Ok(None) => AskStep::Wait,
            Ok(Some(url)) => AskStep::Done(url),
            Err(e) => AskStep::Failed(e),
        }
    }

    fn advance(&mut self, tmp: &mut [u8]) -> anyhow::Result<Option<String>> {
        use std::io::ErrorKind as K;
        if !crate::connect::send_request(&self.sock, &self.req, &mut self.sent)? {
            return Ok(None);
        }
        loop {
            match (&self.sock).read(tmp) {
                // At the close, parse_answer answers or fails (never "read more").
                Ok(0) => {
                    return parse_answer(&self.answer, true).and_then(|u| u.ok_or_else(|| cut_short("head")).map(Some));
                }
                Ok(n) => {
                    self.answer.extend_from_slice(&tmp[..n]);
                    if let Some(url) = parse_answer(&self.answer, false)? {
                        return Ok(Some(url));
                    }
                    if self.answer.len() > ANSWER_LIMIT {
                        return Err(bad("dispatch answer too long"));
                    }
                }
                Err(e) if e.kind() == K::WouldBlock => return Ok(None),
                Err(e) if e.kind() == K::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{lookup, parse_answer, request, with_port};
    use crate::worker::failure_reason;

    /// The reason a move's failed dispatch is counted under (`dispatch_` + this).
    fn reason(r: anyhow::Result<Option<String>>) -> String {
        failure_reason(&r.expect_err("an error"))
    }

    #[test]
    fn the_request_is_what_the_blocking_client_sent() {
        let (to, req) = request("http://127.0.0.1:8081/v1/route", 7).unwrap();
        assert_eq!(to, "127.0.0.1:8081");
        assert_eq!(
            String::from_utf8(req).unwrap(),
            "GET /v1/route?room=r7 HTTP/1.1\r\nHost: 127.0.0.1:8081\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        // A goaway's URL names its room already; other parameters are kept.
        let (_, req) = request("http://10.0.0.1:80/v1/route?room=r3", 7).unwrap();
        assert!(req.starts_with(b"GET /v1/route?room=r3 HTTP/1.1\r\n"));
        let (_, req) = request("http://10.0.0.1:80/v1/route?region=eu", 7).unwrap();
        assert!(req.starts_with(b"GET /v1/route?region=eu&room=r7 HTTP/1.1\r\n"));
        // No port: 80. No path: "/".
        let (to, req) = request("http://dispatch.example", 1).unwrap();
        assert_eq!(to, "dispatch.example:80");
        assert!(req.starts_with(b"GET /?room=r1 HTTP/1.1\r\nHost: dispatch.example\r\n"));
        assert!(request("https://x/v1/route", 1).is_err(), "https is not asked by hand");
        assert!(request("http:///v1/route", 1).is_err());
    }

    #[test]
    fn an_answer_with_a_url_is_taken_once_complete() {
        let full = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 43\r\n\r\n\
                     {\"url\":\"ws://127.0.0.1:9/ws?room=r1\",\"x\":1}";
        for cut in 0..full.len() {
            assert_eq!(parse_answer(&full[..cut], false).unwrap(), None, "incomplete at {cut}");
        }
        assert_eq!(parse_answer(full, false).unwrap().as_deref(), Some("ws://127.0.0.1:9/ws?room=r1"));
        // Bytes past the body (none are expected) are not read as body.
        let mut more = full.to_vec();
        more.extend_from_slice(b"junk");
        assert_eq!(parse_answer(&more, false).unwrap().as_deref(), Some("ws://127.0.0.1:9/ws?room=r1"));
        // No Content-Length: the body ends at the close.
        let closed = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"url\":\"ws://h:1\"}";
        assert_eq!(parse_answer(closed, false).unwrap(), None);
        assert_eq!(parse_answer(closed, true).unwrap().as_deref(), Some("ws://h:1"));
    }

    #[test]
    fn another_status_is_counted_by_its_code_as_soon_as_the_head_is_in() {
        let r = parse_answer(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 100\r\n\r\n", false);
        let e = r.expect_err("a 503");
        assert_eq!(failure_reason(&e), "http_503");
        assert_eq!(e.to_string(), "refused: dispatch answered 503 Service Unavailable");
        assert_eq!(reason(parse_answer(b"HTTP/1.1 404 Not Found\r\n\r\n", false)), "http_404");
        assert_eq!(reason(parse_answer(b"HTTP/1.1 302 Found\r\nLocation: /x\r\n\r\n", false)), "http_302");
    }

    #[test]
    fn unusable_answers_are_clear_errors() {
        let err = |b: &[u8], eof| parse_answer(b, eof).expect_err("an error").to_string();
        // A 200 without a url, or not JSON.
        assert!(err(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", false).contains("without url"));
        assert!(err(b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n{\"url\": 12 }", false).contains("without url"));
        assert!(!err(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc", false).is_empty());
        // Chunked: said so, not half read.
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n11\r\n{\"url\":\"ws://h:1\"}\r\n0\r\n\r\n";
        assert!(err(chunked, false).contains("only Content-Length bodies"), "{}", err(chunked, false));
        // Garbage, a bad length, an oversized length.
        assert!(err(b"\x16\x03\x01\x02\x00garbage\r\n\r\n", false).contains("does not parse"));
        assert!(err(b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", false).contains("Content-Length"));
        assert!(err(b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999\r\n\r\n", false).contains("too long"));
        // Closed inside the head or the body: counted as a close in the handshake.
        assert_eq!(reason(parse_answer(b"HTTP/1.1 200 O", true)), "closed_in_handshake");
        assert_eq!(reason(parse_answer(b"", true)), "closed_in_handshake");
        assert_eq!(
            reason(parse_answer(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{}", true)),
            "closed_in_handshake"
        );
        // The rest are answers that cannot be used, under a name of their own (they were
        // under the catch-all `handshake`).
        for answer in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc",
            b"\x16\x03\x01\x02\x00garbage\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        ] {
            assert_eq!(reason(parse_answer(answer, false)), "bad_answer", "{}", String::from_utf8_lossy(answer));
        }
        assert_eq!(reason(request("http:///v1/route", 1).map(|_| None)), "bad_answer");
    }

    /// IPs are taken as they are, names through the resolver (`localhost` is in every
    /// /etc/hosts); a name it does not know is `unresolved_host`, not the catch-all.
    #[test]
    fn hosts_are_parsed_or_looked_up() {
        assert_eq!(lookup("10.1.2.3:9").unwrap(), "10.1.2.3:9".parse::<std::net::SocketAddr>().unwrap());
        assert_eq!(lookup("localhost:9").unwrap(), "127.0.0.1:9".parse::<std::net::SocketAddr>().unwrap());
        let e = lookup("no-such-host.invalid:9").expect_err("RFC 2606 .invalid never resolves");
        assert_eq!(failure_reason(&e), "unresolved_host");
        assert!(e.to_string().contains("no-such-host.invalid:9"), "{e}");
        assert_eq!(with_port("h", 80), "h:80");
        assert_eq!(with_port("h:81", 80), "h:81");
        assert_eq!(with_port("[::1]", 80), "[::1]:80");
        assert_eq!(with_port("[::1]:9", 80), "[::1]:9");
    }

    /// Every prefix of every answer above, and arbitrary bytes, give an answer or an error.
    #[test]
    fn no_input_panics() {
        let mut rng = fastrand::Rng::with_seed(7);
        let seeds: [&[u8]; 3] = [
            b"HTTP/1.1 200 OK\r\ncontent-length: 18\r\n\r\n{\"url\":\"ws://h:1\"}",
            b"HTTP/1.1 503 X\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        ];
        for s in seeds {
            for cut in 0..=s.len() {
                for eof in [false, true] {
                    let _ = parse_answer(&s[..cut], eof);
                }
            }
        }
        for _ in 0..10_000 {
            let mut b = seeds[rng.usize(..seeds.len())].to_vec();
            for _ in 0..rng.usize(1..4) {
                let at = rng.usize(..b.len());
                b[at] = rng.u8(..);
            }
            let _ = parse_answer(&b, rng.bool());
        }
    }
}
