//! permessage-deflate (RFC 7692), server side: the `Sec-WebSocket-Extensions` offers, the
//! answer, and compressing or inflating one message. Pure: no I/O, no clock.
//!
//! The edge always answers with `server_no_context_takeover`: every message it sends is
//! compressed on its own (the compressor is reset before each one), so the compressed bytes of a
//! room's batch depend only on the batch and the window size, and one compressed frame serves
//! every member that negotiated the same window (see [`Agreed::server_window_bits`]).
//!
//! Messages are raw DEFLATE (RFC 1951) flushed with a sync flush, without the trailing
//! `00 00 ff ff` of the empty stored block that flush ends with (RFC 7692 §7.2.1); the receiver
//! appends those four bytes before inflating (§7.2.2).

use flate2::{Compress, Compression, FlushCompress, FlushDecompress, Status};

/// flate2's raw-DEFLATE inflater, as [`new_inflater`] makes it and [`inflate`] takes it.
pub use flate2::Decompress;

/// The extension's token.
pub const PERMESSAGE_DEFLATE: &str = "permessage-deflate";

/// The tail a sync flush ends with, taken off by the sender and put back by the receiver.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Below this payload size the edge does not try to compress: the block header and Huffman
/// tables cost more than the few repeats such a message holds. RFC 7692 §6 lets a sender choose
/// per message (RSV1 clear: not compressed).
pub const MIN_COMPRESS: usize = 64;

/// One extension of a `Sec-WebSocket-Extensions` list (RFC 6455 §9.1): its name and parameters,
/// quoted values unquoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// The extension's token, as sent.
    pub name: String,
    /// Its parameters in order: name, and value if any.
    pub params: Vec<(String, Option<String>)>,
}

/// `tchar` of RFC 7230 §3.2.6.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parses one `Sec-WebSocket-Extensions` field value and appends its extensions to `out`.
/// Empty list elements are skipped (RFC 7230 §7). Errors name what is malformed: the upgrade is
/// refused (400) rather than guessed at.
pub fn parse_extensions(value: &[u8], out: &mut Vec<Extension>) -> Result<(), &'static str> {
    let mut i = 0;
    let ows = |i: &mut usize| {
        while value.get(*i).is_some_and(|&b| b == b' ' || b == b'\t') {
            *i += 1;
        }
    };
    let token = |i: &mut usize| -> Option<String> {
        let start = *i;
        while value.get(*i).copied().is_some_and(is_tchar) {
            *i += 1;
        }
        (*i > start).then(|| String::from_utf8_lossy(&value[start..*i]).into_owned())
    };
    loop {
        ows(&mut i);
        match value.get(i) {
            None => return Ok(()),
            Some(b',') => {
                i += 1;
                continue;
            }
            Some(_) => {}
        }
        let name = token(&mut i).ok_or("malformed Sec-WebSocket-Extensions: expected an extension token")?;
        let mut params = Vec::new();
        loop {
            ows(&mut i);
            match value.get(i) {
                None | Some(b',') => break,
                Some(b';') => i += 1,
                Some(_) => return Err("malformed Sec-WebSocket-Extensions: expected ';' or ',' after a token"),
            }
            ows(&mut i);
            let pname = token(&mut i).ok_or("malformed Sec-WebSocket-Extensions: expected a parameter token")?;
            ows(&mut i);
            let mut pvalue = None;
            if value.get(i) == Some(&b'=') {
                i += 1;
                ows(&mut i);
                let v = if value.get(i) == Some(&b'"') {
                    i += 1;
                    let mut v = Vec::new();
                    loop {
                        match value.get(i) {
                            None => return Err("malformed Sec-WebSocket-Extensions: unterminated quoted string"),
                            Some(b'"') => {
                                i += 1;
                                break;
                            }
                            Some(b'\\') => {
                                let &c = value
                                    .get(i + 1)
                                    .ok_or("malformed Sec-WebSocket-Extensions: unterminated quoted string")?;
                                v.push(c);
                                i += 2;
                            }
                            Some(&c) => {
                                v.push(c);
                                i += 1;
                            }
                        }
                    }
                    // RFC 6455 §9.1: a quoted value must be a token once unquoted.
                    if v.is_empty() || !v.iter().copied().all(is_tchar) {
                        return Err("malformed Sec-WebSocket-Extensions: a quoted value must be a token");
                    }
                    String::from_utf8_lossy(&v).into_owned()
                } else {
                    token(&mut i).ok_or("malformed Sec-WebSocket-Extensions: expected a parameter value")?
                };
                pvalue = Some(v);
            }
            params.push((pname, pvalue));
        }
        out.push(Extension { name, params });
    }
}

/// A permessage-deflate offer whose parameters are valid (RFC 7692 §7.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offer {
    /// `server_no_context_takeover`: the client asks the server not to keep its context.
    pub server_no_context_takeover: bool,
    /// `client_no_context_takeover`: the client says it will not keep its own context.
    pub client_no_context_takeover: bool,
    /// `server_max_window_bits=N`: the server must compress with a window of at most 2^N.
    pub server_max_window_bits: Option<u8>,
    /// `client_max_window_bits[=N]`: the client lets the server limit its window (`Some(None)`:
    /// no value given).
    pub client_max_window_bits: Option<Option<u8>>,
}

/// Why an offer is declined (RFC 7692 §7: the server takes the next one, or none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decline {
    /// Another extension.
    NotDeflate,
    /// A parameter not defined for an offer.
    UnknownParam,
    /// A parameter given twice.
    Repeated,
    /// A parameter with a value it may not have (or without one it needs).
    BadValue,
}

/// A window-bits value: `1*DIGIT` without a leading zero, 8 to 15 (RFC 7692 §7.1.2).
fn window_bits(v: &str) -> Option<u8> {
    if v.is_empty() || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) || v.len() > 2 {
        return None;
    }
    v.parse::<u8>().ok().filter(|n| (8..=15).contains(n))
}

impl Offer {
    /// Reads one offered extension; `Err` says why it is declined.
    pub fn from_extension(ext: &Extension) -> Result<Self, Decline> {
        if !ext.name.eq_ignore_ascii_case(PERMESSAGE_DEFLATE) {
            return Err(Decline::NotDeflate);
        }
        let mut o = Offer::default();
        let mut seen = [false; 4];
        for (name, value) in &ext.params {
            let idx = match name.to_ascii_lowercase().as_str() {
                "server_no_context_takeover" => 0,
                "client_no_context_takeover" => 1,
                "server_max_window_bits" => 2,
                "client_max_window_bits" => 3,
                _ => return Err(Decline::UnknownParam),
            };
            if std::mem::replace(&mut seen[idx], true) {
                return Err(Decline::Repeated);
            }
            match (idx, value.as_deref()) {
                (0, None) => o.server_no_context_takeover = true,
                (1, None) => o.client_no_context_takeover = true,
                (2, Some(v)) => o.server_max_window_bits = Some(window_bits(v).ok_or(Decline::BadValue)?),
                (3, None) => o.client_max_window_bits = Some(None),
                (3, Some(v)) => o.client_max_window_bits = Some(Some(window_bits(v).ok_or(Decline::BadValue)?)),
                _ => return Err(Decline::BadValue),
            }
        }
        Ok(o)
    }
}

/// What the server settled on for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// The window the server compresses with, 9 to 15 (the parameter set a shared compressed
    /// frame is keyed by: `server_no_context_takeover` always holds).
    pub server_window_bits: u8,
    /// `server_max_window_bits` to echo in the answer (when the offer had it).
    pub answer_server_bits: Option<u8>,
    /// The client compresses every message on its own (`client_no_context_takeover` in the
    /// answer): its messages are inflated with no context kept between them.
    pub client_no_context_takeover: bool,
}

impl Agreed {
    /// The `Sec-WebSocket-Extensions` value of the 101 answer.
    pub fn response_value(&self) -> String {
        let mut v = format!("{PERMESSAGE_DEFLATE}; server_no_context_takeover");
        if self.client_no_context_takeover {
            v.push_str("; client_no_context_takeover");
        }
        if let Some(n) = self.answer_server_bits {
            v.push_str(&format!("; server_max_window_bits={n}"));
        }
        v
    }
}

/// Picks the first permessage-deflate offer the server can honour (RFC 7692 §5: offers are in
/// the client's order of preference). `keep_client_context`: let clients keep their context
/// between messages when they do not offer `client_no_context_takeover`; when false the answer
/// always carries `client_no_context_takeover` (which a server MAY include, §7.1.1.2), so no
/// inflate context outlives a message.
///
/// The edge never keeps its own context, so `server_no_context_takeover` is always in the
/// answer; a `server_max_window_bits` of 9 to 15 is honoured by compressing with that window.
/// An offer of `server_max_window_bits=8` is declined (the next offer is taken): zlib cannot
/// deflate raw data with a 256-byte window (it would use 512, which a client that asked for 8
/// may not read). The client's window is never limited (`client_max_window_bits` is not
/// answered: inflating with a 2^15 window reads any smaller one).
pub fn negotiate(extensions: &[Extension], keep_client_context: bool) -> Option<Agreed> {
    extensions.iter().find_map(|ext| {
        let offer = Offer::from_extension(ext).ok()?;
        let bits = offer.server_max_window_bits;
        if bits == Some(8) {
            return None;
        }
        Some(Agreed {
            server_window_bits: bits.unwrap_or(15),
            answer_server_bits: bits,
            client_no_context_takeover: offer.client_no_context_takeover || !keep_client_context,
        })
    })
}

/// A raw-DEFLATE compressor per window size, reset before each message (no context takeover).
/// Each holds zlib's window and hash tables (about 256 KiB at 15 bits): keep one per thread.
#[derive(Default)]
pub struct Compressor {
    by_bits: [Option<Box<Compress>>; 8],
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor").finish_non_exhaustive()
    }
}

impl Compressor {
    /// Compresses `payload` as one message with a window of 2^`bits` (9 to 15) and appends it to
    /// `out` without the `00 00 ff ff` tail. Returns false (and leaves `out` as it was) if the
    /// compressed form is not smaller than `payload`: send it plain.
    pub fn compress(&mut self, bits: u8, payload: &[u8], out: &mut Vec<u8>) -> bool {
        let bits = bits.clamp(9, 15);
        let c = self.by_bits[usize::from(bits - 8)]
            .get_or_insert_with(|| Box::new(Compress::new_with_window_bits(Compression::default(), false, bits)));
        c.reset();
        let start = out.len();
        let in0 = c.total_in();
        out.reserve(payload.len() / 2 + 64);
        loop {
            let consumed = (c.total_in() - in0) as usize;
            if c.compress_vec(&payload[consumed..], out, FlushCompress::Sync).is_err() {
                out.truncate(start);
                return false;
            }
            let all_in = (c.total_in() - in0) as usize == payload.len();
            // Output room left over: the flush is complete.
            if all_in && out.len() < out.capacity() {
                break;
            }
            if out.len() - start > payload.len() + 64 {
                out.truncate(start);
                return false;
            }
            out.reserve(out.capacity().max(256));
        }
        if out[start..].ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        if out.len() - start >= payload.len() {
            out.truncate(start);
            return false;
        }
        true
    }
}

/// Why a compressed message could not be inflated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates to more than the bound (a deflate bomb, or just too big): close 1009.
    TooBig,
    /// Not valid DEFLATE data: close 1007 (invalid payload data).
    Corrupt,
}

/// A raw-DEFLATE inflater with a 2^15 window (reads any window the client used).
pub fn new_inflater() -> Decompress {
    Decompress::new_with_window_bits(false, 15)
}

/// Inflates one message (`data` without its tail) into `out` (cleared first), never letting
/// `out` pass `max` bytes: memory stays bounded whatever the input claims. The caller resets `d`
/// between messages when no context is kept.
pub fn inflate(d: &mut Decompress, data: &[u8], max: usize, out: &mut Vec<u8>) -> Result<(), InflateError> {
    out.clear();
    for chunk in [data, &TAIL[..]] {
        let mut pos = 0;
        loop {
            if out.len() == out.capacity() {
                // Grow by doubling, up to one byte past the bound (which then says: too big).
                let room = (max + 1).saturating_sub(out.len());
                if room == 0 {
                    return Err(InflateError::TooBig);
                }
                out.reserve_exact(out.len().max(1024).min(room));
            }
            let (in0, out0) = (d.total_in(), out.len());
            let status =
                d.decompress_vec(&chunk[pos..], out, FlushDecompress::Sync).map_err(|_| InflateError::Corrupt)?;
            pos += (d.total_in() - in0) as usize;
            if out.len() > max {
                return Err(InflateError::TooBig);
            }
            if status == Status::StreamEnd {
                // A final block (BFINAL) ends the stream: nothing after it belongs to the
                // message. Start afresh for the next one.
                d.reset(false);
                return Ok(());
            }
            let room_left = out.len() < out.capacity();
            if pos == chunk.len() && room_left {
                break;
            }
            if room_left && d.total_in() == in0 && out.len() == out0 {
                // Neither input taken nor output made with room to spare: stuck.
                return Err(InflateError::Corrupt);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &str) -> Result<Vec<Extension>, &'static str> {
        let mut out = Vec::new();
        parse_extensions(v.as_bytes(), &mut out).map(|()| out)
    }

    fn offer(v: &str) -> Result<Offer, Decline> {
        Offer::from_extension(&parse(v).unwrap()[0])
    }

    #[test]
    fn extension_lists_parse_with_quotes_and_empty_elements() {
        let e = parse("permessage-deflate; client_max_window_bits, foo;a=\"1\"; b = 2 ,, x-webkit").unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].name, "permessage-deflate");
        assert_eq!(e[0].params, vec![("client_max_window_bits".to_owned(), None)]);
        assert_eq!(e[1].params, vec![("a".into(), Some("1".into())), ("b".into(), Some("2".into()))]);
        assert_eq!(e[2].name, "x-webkit");
        assert_eq!(parse("").unwrap(), vec![]);
        for bad in [
            "permessage-deflate; ",
            "permessage-deflate;;",
            "permessage-deflate; a=",
            "permessage-deflate; a=\"1",
            "permessage-deflate; a=\"1 2\"",
            "permessage-deflate; a=\"\"",
            "permessage-deflate x",
            "=x",
            "a; b=c=d",
            "ext; \u{e9}",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be malformed");
        }
    }

    #[test]
    fn offers_are_validated_as_rfc7692_section7_says() {
        assert_eq!(offer("permessage-deflate").unwrap(), Offer::default());
        let o = offer(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
             server_max_window_bits=10; client_max_window_bits",
        )
        .unwrap();
        assert!(o.server_no_context_takeover && o.client_no_context_takeover);
        assert_eq!((o.server_max_window_bits, o.client_max_window_bits), (Some(10), Some(None)));
        assert_eq!(
            offer("permessage-deflate; client_max_window_bits=\"8\"").unwrap().client_max_window_bits,
            Some(Some(8))
        );
        assert_eq!(offer("x-other"), Err(Decline::NotDeflate));
        assert_eq!(offer("permessage-deflate; foo"), Err(Decline::UnknownParam));
        assert_eq!(
            offer("permessage-deflate; server_no_context_takeover; server_no_context_takeover"),
            Err(Decline::Repeated)
        );
        for bad in [
            "server_max_window_bits",
            "server_max_window_bits=7",
            "server_max_window_bits=16",
            "server_max_window_bits=010",
            "client_max_window_bits=abc",
            "server_no_context_takeover=1",
            "client_no_context_takeover=\"x\"",
        ] {
            assert_eq!(offer(&format!("permessage-deflate; {bad}")), Err(Decline::BadValue), "{bad}");
        }
    }

    #[test]
    fn negotiation_takes_the_first_offer_it_can_honour() {
        let exts = parse("permessage-deflate; server_max_window_bits=99, permessage-deflate; server_max_window_bits=10, permessage-deflate").unwrap();
        let a = negotiate(&exts, false).unwrap();
        assert_eq!((a.server_window_bits, a.answer_server_bits, a.client_no_context_takeover), (10, Some(10), true));
        assert_eq!(
            a.response_value(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10"
        );
        // Chromium's offer.
        let a = negotiate(&parse("permessage-deflate; client_max_window_bits").unwrap(), true).unwrap();
        assert_eq!(a.response_value(), "permessage-deflate; server_no_context_takeover");
        assert!(!a.client_no_context_takeover);
        let a = negotiate(&parse("permessage-deflate; client_no_context_takeover").unwrap(), true).unwrap();
        assert!(a.client_no_context_takeover);
        // A window of 8 bits is declined; the next offer is taken.
        let a = negotiate(&parse("permessage-deflate; server_max_window_bits=8, permessage-deflate").unwrap(), true);
        assert_eq!(a.unwrap().answer_server_bits, None);
        assert_eq!(negotiate(&parse("x-webkit-deflate-frame, permessage-deflate; bogus").unwrap(), true), None);
        assert_eq!(negotiate(&[], true), None);
    }

    fn json(n: usize) -> Vec<u8> {
        let mut v = b"{\"type\":\"batch\",\"room\":\"lobby\",\"messages\":[".to_vec();
        for i in 0..n {
            v.extend_from_slice(
                format!(
                    "{{\"seq\":{i},\"kind\":\"gift\",\"user\":\"u{}\",\"body\":{{\"rose\":{}}}}},",
                    i * 7 % 13,
                    i % 5
                )
                .as_bytes(),
            );
        }
        v.extend_from_slice(b"]}");
        v
    }

    #[test]
    fn round_trip_at_every_window_and_the_tail_is_removed() {
        let mut c = Compressor::default();
        let payload = json(300);
        for bits in 9..=15u8 {
            let mut out = Vec::new();
            assert!(c.compress(bits, &payload, &mut out));
            assert!(out.len() * 4 < payload.len(), "{} of {}", out.len(), payload.len());
            assert!(!out.ends_with(&TAIL));
            // The client's window is what the server promised: 2^bits.
            let mut d = Decompress::new_with_window_bits(false, bits);
            let mut back = Vec::new();
            inflate(&mut d, &out, 1 << 20, &mut back).unwrap();
            assert_eq!(back, payload, "bits {bits}");
        }
        // The same input gives the same bytes: messages are compressed on their own.
        let (mut a, mut b) = (Vec::new(), Vec::new());
        c.compress(15, &payload, &mut a);
        c.compress(15, b"other message, other message, other message, other message!", &mut Vec::new());
        c.compress(15, &payload, &mut b);
        assert_eq!(a, b);
        // Incompressible or tiny: not worth it.
        assert!(!c.compress(15, b"ab", &mut a));
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let before = a.clone();
        assert!(!c.compress(15, &noise, &mut a));
        assert_eq!(a, before);
    }

    #[test]
    fn a_bomb_stops_at_the_bound() {
        let zeros = vec![0u8; 8 << 20];
        let mut c = Compressor::default();
        let mut bomb = Vec::new();
        assert!(c.compress(15, &zeros, &mut bomb));
        assert!(bomb.len() < 16 * 1024, "{}", bomb.len());
        let mut d = new_inflater();
        let mut out = Vec::new();
        assert_eq!(inflate(&mut d, &bomb, 65536, &mut out), Err(InflateError::TooBig));
        assert!(out.capacity() <= 65536 + 1, "{}", out.capacity());
        // Exactly at the bound is fine.
        let mut d = new_inflater();
        let mut at = Vec::new();
        c.compress(15, &zeros[..65536], &mut at);
        inflate(&mut d, &at, 65536, &mut out).unwrap();
        assert_eq!(out.len(), 65536);
        // Garbage is corrupt, never a panic.
        let mut d = new_inflater();
        assert_eq!(inflate(&mut d, &[0xff, 0xff, 0xff, 0xff, 0x07], 65536, &mut out), Err(InflateError::Corrupt));
    }

    #[test]
    fn context_takeover_inflates_messages_that_refer_back() {
        // A client that keeps its context: the second message refers to the first.
        let mut c = Compress::new_with_window_bits(Compression::default(), false, 15);
        let mut msgs = Vec::new();
        for text in [&json(20)[..], &json(20)[..]] {
            let mut out = Vec::with_capacity(4096);
            c.compress_vec(text, &mut out, FlushCompress::Sync).unwrap();
            assert!(out.ends_with(&TAIL));
            out.truncate(out.len() - 4);
            msgs.push(out);
        }
        assert!(msgs[1].len() < msgs[0].len() / 4, "the second message refers back");
        let mut d = new_inflater();
        let mut out = Vec::new();
        for m in &msgs {
            inflate(&mut d, m, 1 << 20, &mut out).unwrap();
            assert_eq!(out, json(20));
        }
        // Without the context the second one cannot be read.
        let mut fresh = new_inflater();
        assert!(inflate(&mut fresh, &msgs[1], 1 << 20, &mut out).is_err() || out != json(20));
    }
}
