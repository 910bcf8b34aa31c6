//! Server-Sent Events (WHATWG HTML, "Server-sent events"): the `text/event-stream` framing of
//! the `/sse` fallback transport, for networks that break WebSocket upgrades.
//!
//! An event's `data` is exactly the JSON envelope a `roomcast.json.v1` WebSocket member gets in
//! a text frame, so a browser parses both alike. Events that complete a position in a room
//! carry `id: EPOCH:SEQ` (the room's epoch as 16 hex digits, the last seq the client now holds),
//! which the browser sends back as `Last-Event-ID` when it reconnects on its own.
//!
//! Like the WebSocket framing, an event is built once and its bytes are shared by every member:
//! nothing here depends on the connection.

/// The heartbeat: a comment line, which `EventSource` ignores, and which keeps proxies and NAT
/// tables from timing the stream out.
pub const HEARTBEAT: &[u8] = b":\n\n";

/// The media type of an event stream.
pub const CONTENT_TYPE: &str = "text/event-stream";

/// One event: an optional `id:` line, then the data, one `data:` line per line of it, then the
/// blank line that dispatches it. A line break inside `data` (CRLF, LF or CR; in the envelope
/// only JSON whitespace in a publisher's raw body can hold one) becomes a new `data:` line, which
/// the browser joins with LF: the data arrives as the same JSON, its breaks as LF.
pub fn event(id: Option<&str>, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(data.len() + 16 + id.map_or(0, |i| i.len() + 5));
    if let Some(id) = id {
        v.extend_from_slice(b"id: ");
        // An id never holds a line break (they are made by `event_id`); refuse to split one.
        v.extend(id.bytes().filter(|&b| b != b'\n' && b != b'\r' && b != 0));
        v.push(b'\n');
    }
    v.extend_from_slice(b"data: ");
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'\r' => {
                v.extend_from_slice(b"\ndata: ");
                if data.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => v.extend_from_slice(b"\ndata: "),
            b => v.push(b),
        }
        i += 1;
    }
    v.extend_from_slice(b"\n\n");
    v
}

/// The `id` of an event that leaves the client at `seq` in the numbering `epoch_text`.
pub fn event_id(epoch_text: &str, seq: u64) -> String {
    format!("{epoch_text}:{seq}")
}

/// A `Last-Event-ID` (or an `id` this edge sent) read back: `EPOCH:SEQ` or a bare `SEQ`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position<'a> {
    /// The epoch text as sent (None for a bare seq).
    pub epoch: Option<&'a str>,
    /// The last seq the client received.
    pub seq: u64,
}

/// Parses a `Last-Event-ID`. `Ok(None)`: empty (the browser had no id yet). `Err`: a reason for
/// a 400.
pub fn parse_last_event_id(s: &str) -> Result<Option<Position<'_>>, &'static str> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let (epoch, seq) = match s.split_once(':') {
        Some((e, q)) => (Some(e), q),
        None => (None, s),
    };
    const BAD: &str = "bad Last-Event-ID: expected EPOCH:SEQ (16 lowercase hex digits, a colon, a number) or SEQ";
    // The epoch exactly as the edge sent it: another text would read as another numbering.
    if epoch.is_some_and(|e| crate::envelope::validate_epoch(e).is_err()) {
        return Err(BAD);
    }
    // Digits only: `u64::from_str` would also take a leading `+`, which no id of ours has.
    match crate::envelope::parse_seq(seq) {
        Some(seq) => Ok(Some(Position { epoch, seq })),
        None => Err(BAD),
    }
}

/// The `retry:` field (milliseconds the browser waits before reconnecting), sent once at the
/// start of a stream.
pub fn retry(ms: u32) -> Vec<u8> {
    format!("retry: {ms}\n\n").into_bytes()
}

/// CORS answer headers for a request from `origin`: None when the request had no `Origin` (same
/// origin, or not a browser), else the origin allowed (`*` when every origin is).
fn cors(allow: Option<&str>) -> String {
    match allow {
        Some(o) => format!("Access-Control-Allow-Origin: {o}\r\nVary: Origin\r\n"),
        None => String::new(),
    }
}

/// The head of a stream: `200` with the event-stream type, no caching, no proxy buffering
/// (`X-Accel-Buffering: no`, which nginx honours), CORS for `allow_origin`. The body has no
/// length: it ends when the connection closes (RFC 9112 §6.3), which is when the stream ends.
pub fn response_200(allow_origin: Option<&str>) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE}\r\nCache-Control: no-cache\r\nX-Accel-Buffering: no\r\n\
         Connection: close\r\n{}\r\n",
        cors(allow_origin)
    )
    .into_bytes()
}

/// The answer to a CORS preflight (`OPTIONS /sse`): GET with `Last-Event-ID` (and the
/// `Cache-Control` some polyfills add) may be sent from `allow_origin`.
pub fn preflight_204(allow_origin: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 204 No Content\r\n{}Access-Control-Allow-Methods: GET\r\n\
         Access-Control-Allow-Headers: Last-Event-ID, Cache-Control, Authorization\r\n\
         Access-Control-Max-Age: 600\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        cors(Some(allow_origin))
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_id_then_data_lines_then_a_blank_line() {
        let e = event(Some("00000000000000ab:42"), br#"{"type":"batch"}"#);
        assert_eq!(e, b"id: 00000000000000ab:42\ndata: {\"type\":\"batch\"}\n\n");
        assert_eq!(event(None, b"x"), b"data: x\n\n");
    }

    /// A raw body with line breaks (JSON whitespace) is split into data lines, so it never ends
    /// the event early; the browser joins them with LF.
    #[test]
    fn line_breaks_in_data_become_data_lines() {
        let e = event(None, b"{\"a\":\r\n1,\r\"b\":\n2}");
        assert_eq!(e, b"data: {\"a\":\ndata: 1,\ndata: \"b\":\ndata: 2}\n\n");
        // No blank line before the end, whatever the input.
        for data in [&b"\n\n"[..], b"\r\r", b"\r\n\r\n", b""] {
            let e = event(None, data);
            assert_eq!(e.windows(2).filter(|w| w == b"\n\n").count(), 1, "{e:?}");
            assert!(e.ends_with(b"\n\n"));
        }
        // An id can never smuggle a line in.
        assert_eq!(event(Some("a\nb\r"), b"x"), b"id: ab\ndata: x\n\n");
    }

    #[test]
    fn last_event_ids_are_epoch_and_seq_or_a_bare_seq() {
        assert_eq!(
            parse_last_event_id("00000000000000ab:42"),
            Ok(Some(Position { epoch: Some("00000000000000ab"), seq: 42 }))
        );
        assert_eq!(parse_last_event_id("7"), Ok(Some(Position { epoch: None, seq: 7 })));
        assert_eq!(parse_last_event_id(" 7 "), Ok(Some(Position { epoch: None, seq: 7 })));
        assert_eq!(parse_last_event_id(""), Ok(None));
        for bad in [
            "x",
            ":5",
            "ab:",
            "ab:x",
            "zz:5",
            "-1",
            "+5",
            "1:2:3",
            "99999999999999999999",
            // An epoch other than the edge's 16 lowercase hex digits would read as another
            // numbering (a reset the client did not cause).
            "ab:5",
            "00000000000000AB:5",
            "000000000000000ab:5",
        ] {
            assert!(parse_last_event_id(bad).is_err(), "{bad}");
        }
        let id = event_id("00000000000000ab", 9);
        assert_eq!(parse_last_event_id(&id), Ok(Some(Position { epoch: Some("00000000000000ab"), seq: 9 })));
    }

    #[test]
    fn the_head_names_the_stream_and_cors() {
        let h = String::from_utf8(response_200(Some("https://a.example"))).unwrap();
        assert!(h.starts_with("HTTP/1.1 200 OK\r\n"));
        for line in [
            "Content-Type: text/event-stream\r\n",
            "Cache-Control: no-cache\r\n",
            "X-Accel-Buffering: no\r\n",
            "Access-Control-Allow-Origin: https://a.example\r\n",
        ] {
            assert!(h.contains(line), "{h}");
        }
        assert!(h.ends_with("\r\n\r\n"));
        let h = String::from_utf8(response_200(None)).unwrap();
        assert!(!h.contains("Access-Control"));
        let p = String::from_utf8(preflight_204("*")).unwrap();
        assert!(p.starts_with("HTTP/1.1 204 "), "{p}");
        assert!(p.contains("Last-Event-ID"), "{p}");
        assert_eq!(retry(1500), b"retry: 1500\n\n");
    }
}
