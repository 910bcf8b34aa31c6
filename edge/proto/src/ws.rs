//! RFC 6455 framing, server side: a per-connection [`Decoder`] for client frames and encoders
//! for (unmasked) server frames; plus the two client-side helpers the load generator needs.
//!
//! The decoder is fed bytes as they arrive, in any split. Complete frames inside the input are
//! unmasked in place and handed out without copying; only a frame that straddles two inputs,
//! and a fragmented message being assembled, are buffered, both bounded by [`Limits`]. Every
//! length on the wire is untrusted: nothing is allocated from a length before its bytes arrive
//! and pass the limit checks.

/// Frame opcodes (RFC 6455 section 5.2). Reserved opcodes never get this far: they are a
/// protocol error.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum OpCode {
    /// 0x0: a later fragment of a message.
    Continuation,
    /// 0x1: text (UTF-8).
    Text,
    /// 0x2: binary.
    Binary,
    /// 0x8: close.
    Close,
    /// 0x9: ping.
    Ping,
    /// 0xA: pong.
    Pong,
}

impl OpCode {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    fn as_u8(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    /// Close, ping and pong.
    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// Size limits for what a client may send.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload of one frame.
    pub max_frame: usize,
    /// Largest message (all fragments together).
    pub max_message: usize,
}

impl Default for Limits {
    /// 64 KiB: clients send signalling and chat, not media; this bounds memory per connection.
    fn default() -> Self {
        Self { max_frame: 64 * 1024, max_message: 64 * 1024 }
    }
}

/// A close the server must send, with its status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReason {
    /// The close code (RFC 6455 §7.4: 1002 protocol error, 1007 bad UTF-8, 1009 too big...).
    pub code: u16,
    /// The reason text sent in the close frame.
    pub reason: &'static str,
}

impl CloseReason {
    const fn protocol(reason: &'static str) -> Self {
        Self { code: 1002, reason }
    }
}

/// Something the decoder found in the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A complete text message, valid UTF-8.
    Text(&'a [u8]),
    /// A complete binary message.
    Binary(&'a [u8]),
    /// A ping and its payload (to be echoed in a pong).
    Ping(&'a [u8]),
    /// A pong and its payload.
    Pong(&'a [u8]),
    /// The peer's close: its code (checked to be one a peer may send) and reason (UTF-8).
    Close {
        /// The close code (None: the frame had no body).
        code: Option<u16>,
        /// The reason, UTF-8.
        reason: &'a [u8],
    },
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The final fragment of its message.
    pub fin: bool,
    /// RSV1: with permessage-deflate, the first frame of a compressed message (RFC 7692 §6).
    /// Whether it is allowed is the [`Decoder`]'s call (it knows what was negotiated).
    pub rsv1: bool,
    /// The frame's opcode.
    pub opcode: OpCode,
    /// Whether the payload is masked (every client frame must be).
    pub masked: bool,
    /// The masking key (zeros when not masked).
    pub mask: [u8; 4],
    /// Payload length in bytes, as the header says.
    pub payload_len: u64,
    /// Header length in bytes (2 to 14): the payload starts there.
    pub header_len: usize,
}

/// Parses a frame header. `Ok(None)`: more bytes needed. Errors on RSV2, RSV3 (no extension
/// defines them) or reserved opcodes, and on a 64-bit length with its top bit set; RSV1 is
/// returned in [`FrameHeader::rsv1`].
pub fn parse_header(buf: &[u8]) -> Result<Option<FrameHeader>, CloseReason> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x30 != 0 {
        return Err(CloseReason::protocol("reserved bits set without a negotiated extension"));
    }
    let opcode = OpCode::from_u8(b0 & 0x0f).ok_or(CloseReason::protocol("reserved opcode"))?;
    let fin = b0 & 0x80 != 0;
    let masked = b1 & 0x80 != 0;
    let (payload_len, mut n) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 {
                return Err(CloseReason::protocol("64-bit length with the most significant bit set"));
            }
            (len, 10)
        }
        len => (u64::from(len), 2),
    };
    let mut mask = [0u8; 4];
    if masked {
        if buf.len() < n + 4 {
            return Ok(None);
        }
        mask.copy_from_slice(&buf[n..n + 4]);
        n += 4;
    }
    Ok(Some(FrameHeader { fin, rsv1: b0 & 0x40 != 0, opcode, masked, mask, payload_len, header_len: n }))
}

/// XORs `buf` with `mask`, where `buf` starts `offset` bytes into the payload.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut m = [0u8; 4];
    for (i, b) in m.iter_mut().enumerate() {
        *b = mask[(offset + i) % 4];
    }
    // Eight bytes at a time, then the tail.
    let word = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut b = [0u8; 8];
        b.copy_from_slice(c);
        let v = u64::from_ne_bytes(b) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i % 4];
    }
}

/// Writes the header of an unmasked frame; returns its length (2, 4 or 10).
pub fn encode_header(fin: bool, opcode: OpCode, payload_len: usize, out: &mut [u8; 10]) -> usize {
    out[0] = if fin { 0x80 } else { 0 } | opcode.as_u8();
    if payload_len < 126 {
        out[1] = payload_len as u8;
        2
    } else if payload_len <= 0xffff {
        out[1] = 126;
        out[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
        10
    }
}

/// A complete unmasked (server) frame.
pub fn encode_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut hdr = [0u8; 10];
    let n = encode_header(true, opcode, payload.len(), &mut hdr);
    let mut v = Vec::with_capacity(n + payload.len());
    v.extend_from_slice(&hdr[..n]);
    v.extend_from_slice(payload);
    v
}

/// A complete unmasked (server) frame whose payload is one compressed message
/// (permessage-deflate: RSV1 set, RFC 7692 §6).
pub fn encode_compressed_frame(opcode: OpCode, compressed: &[u8]) -> Vec<u8> {
    let mut v = encode_frame(opcode, compressed);
    v[0] |= 0x40;
    v
}

/// A close frame with `code` and `reason` (truncated at a character boundary to fit 125 bytes).
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode_frame(OpCode::Close, &payload)
}

/// A complete masked (client) frame.
pub fn encode_client_frame(opcode: OpCode, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut hdr = [0u8; 10];
    let n = encode_header(true, opcode, payload.len(), &mut hdr);
    hdr[1] |= 0x80;
    let mut v = Vec::with_capacity(n + 4 + payload.len());
    v.extend_from_slice(&hdr[..n]);
    v.extend_from_slice(&mask);
    let start = v.len();
    v.extend_from_slice(payload);
    apply_mask(&mut v[start..], mask, 0);
    v
}

/// Whether a peer may send this close code (RFC 6455 7.4, IANA registry).
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Per-connection receive state.
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    /// A frame that straddles inputs (header and payload so far).
    partial: Vec<u8>,
    /// The fragmented message being assembled.
    message: Vec<u8>,
    /// Its opcode (Text or Binary) while one is open.
    message_op: Option<OpCode>,
    /// Bytes of `message` known to be valid UTF-8 (text only).
    utf8_valid: usize,
    /// A close was received: everything after it is ignored.
    closed: bool,
    /// permessage-deflate, when negotiated (boxed: most connections never send compressed).
    deflate: Option<Box<Inflate>>,
}

/// The receive side of permessage-deflate on one connection.
struct Inflate {
    /// The client keeps its context between messages: so does this inflater (created at the
    /// first compressed message, kept for the connection's life). None while `takeover` is
    /// false: every message is inflated by the thread's shared inflater, reset after each, so
    /// no inflate state lives per connection.
    ctx: Option<flate2::Decompress>,
    takeover: bool,
    /// The message being assembled is compressed (RSV1 on its first frame).
    compressed: bool,
}

impl std::fmt::Debug for Inflate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflate")
            .field("ctx", &self.ctx.as_ref().map(|_| "flate2::Decompress"))
            .field("takeover", &self.takeover)
            .field("compressed", &self.compressed)
            .finish()
    }
}

thread_local! {
    /// The inflater of messages compressed without context takeover, shared by every
    /// connection of the thread (reset after each message): about 40 KiB per thread rather than
    /// per connection.
    static SHARED_INFLATER: std::cell::RefCell<Option<flate2::Decompress>> = const { std::cell::RefCell::new(None) };
}

impl Decoder {
    /// A decoder for one connection's stream, bounded by `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            partial: Vec::new(),
            message: Vec::new(),
            message_op: None,
            utf8_valid: 0,
            closed: false,
            deflate: None,
        }
    }

    /// permessage-deflate was negotiated: frames with RSV1 carry compressed messages, inflated
    /// here within `Limits::max_message`. `client_no_context_takeover`: the client compresses
    /// each message on its own (else its context is kept between messages, and so is an
    /// inflater of about 40 KiB for this connection, from its first compressed message on).
    pub fn enable_deflate(&mut self, client_no_context_takeover: bool) {
        self.deflate = Some(Box::new(Inflate { ctx: None, takeover: !client_no_context_takeover, compressed: false }));
    }

    /// Bytes held for partial frames and messages.
    pub fn buffered_bytes(&self) -> usize {
        self.partial.capacity() + self.message.capacity()
    }

    /// Inflates a compressed message, bounded by `max_message`: a deflate bomb is a 1009 as
    /// soon as its output passes the bound, whatever it would grow to.
    fn inflate(&mut self, data: &[u8]) -> Result<Vec<u8>, CloseReason> {
        let max = self.limits.max_message;
        let mut out = Vec::new();
        let Some(inf) = self.deflate.as_mut() else {
            return Err(CloseReason::protocol("compressed message without permessage-deflate"));
        };
        let r = if inf.takeover {
            let d = inf.ctx.get_or_insert_with(crate::deflate::new_inflater);
            crate::deflate::inflate(d, data, max, &mut out)
        } else {
            SHARED_INFLATER.with_borrow_mut(|d| {
                let d = d.get_or_insert_with(crate::deflate::new_inflater);
                let r = crate::deflate::inflate(d, data, max, &mut out);
                d.reset(false);
                r
            })
        };
        match r {
            Ok(()) => Ok(out),
            Err(crate::deflate::InflateError::TooBig) => {
                Err(CloseReason { code: 1009, reason: "message too big once inflated" })
            }
            Err(crate::deflate::InflateError::Corrupt) => {
                Err(CloseReason { code: 1007, reason: "compressed message is not valid DEFLATE data" })
            }
        }
    }

    /// Feeds bytes; calls `on_event` for each complete event, in order. An `Err` is a protocol
    /// violation: send a close frame with its code and stop reading.
    pub fn feed(&mut self, input: &mut [u8], on_event: &mut dyn FnMut(Event<'_>)) -> Result<(), CloseReason> {
        if self.closed {
            return Ok(());
        }
        if self.partial.is_empty() {
            let used = self.process(input, on_event)?;
            if !self.closed && used < input.len() {
                self.partial.extend_from_slice(&input[used..]);
            }
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            buf.extend_from_slice(input);
            let used = self.process(&mut buf, on_event)?;
            if !self.closed {
                buf.drain(..used);
                self.partial = buf;
                if self.partial.is_empty() {
                    self.partial = Vec::new();
                }
            }
        }
        Ok(())
    }

    /// Handles every complete frame in `data`; returns the bytes consumed.
    fn process(&mut self, data: &mut [u8], on_event: &mut dyn FnMut(Event<'_>)) -> Result<usize, CloseReason> {
        let mut off = 0;
        while off < data.len() && !self.closed {
            let Some(h) = parse_header(&data[off..])? else { break };
            self.check_header(&h)?;
            let total = h.header_len + h.payload_len as usize;
            if data.len() - off < total {
                break;
            }
            let payload = &mut data[off + h.header_len..off + total];
            apply_mask(payload, h.mask, 0);
            self.frame(h, payload, on_event)?;
            off += total;
        }
        Ok(off)
    }

    fn check_header(&self, h: &FrameHeader) -> Result<(), CloseReason> {
        if !h.masked {
            return Err(CloseReason::protocol("client frames must be masked"));
        }
        if h.rsv1 {
            if self.deflate.is_none() {
                return Err(CloseReason::protocol("reserved bits set without a negotiated extension"));
            }
            if h.opcode.is_control() {
                return Err(CloseReason::protocol("RSV1 set on a control frame"));
            }
            if h.opcode == OpCode::Continuation {
                return Err(CloseReason::protocol("RSV1 set on a continuation frame"));
            }
        }
        if h.opcode.is_control() {
            if !h.fin {
                return Err(CloseReason::protocol("fragmented control frame"));
            }
            if h.payload_len > 125 {
                return Err(CloseReason::protocol("control frame payload over 125 bytes"));
            }
        } else {
            if h.opcode == OpCode::Continuation && self.message_op.is_none() {
                return Err(CloseReason::protocol("continuation frame without a message to continue"));
            }
            if h.opcode != OpCode::Continuation && self.message_op.is_some() {
                return Err(CloseReason::protocol("new data frame inside a fragmented message"));
            }
            if h.payload_len > self.limits.max_frame as u64 {
                return Err(CloseReason { code: 1009, reason: "frame too big" });
            }
            if self.message.len() as u64 + h.payload_len > self.limits.max_message as u64 {
                return Err(CloseReason { code: 1009, reason: "message too big" });
            }
        }
        Ok(())
    }

    fn frame(
        &mut self,
        h: FrameHeader,
        payload: &[u8],
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<(), CloseReason> {
        match h.opcode {
            OpCode::Ping => on_event(Event::Ping(payload)),
            OpCode::Pong => on_event(Event::Pong(payload)),
            OpCode::Close => {
                let event = match payload.len() {
                    0 => Event::Close { code: None, reason: &[] },
                    1 => return Err(CloseReason::protocol("close payload of one byte")),
                    _ => {
                        let code = u16::from_be_bytes([payload[0], payload[1]]);
                        if !close_code_allowed(code) {
                            return Err(CloseReason::protocol("invalid close code"));
                        }
                        let reason = &payload[2..];
                        if simdutf8::basic::from_utf8(reason).is_err() {
                            return Err(CloseReason { code: 1007, reason: "close reason is not UTF-8" });
                        }
                        Event::Close { code: Some(code), reason }
                    }
                };
                self.closed = true;
                on_event(event);
            }
            OpCode::Text | OpCode::Binary if h.fin && h.rsv1 => {
                let inflated = self.inflate(payload)?;
                Self::emit(h.opcode, &inflated, on_event)?;
            }
            OpCode::Text | OpCode::Binary if h.fin => {
                if h.opcode == OpCode::Text && simdutf8::basic::from_utf8(payload).is_err() {
                    return Err(CloseReason { code: 1007, reason: "text message is not UTF-8" });
                }
                on_event(if h.opcode == OpCode::Text { Event::Text(payload) } else { Event::Binary(payload) });
            }
            OpCode::Text | OpCode::Binary => {
                self.message_op = Some(h.opcode);
                self.message.clear();
                self.utf8_valid = 0;
                if let Some(inf) = self.deflate.as_mut() {
                    inf.compressed = h.rsv1;
                }
                self.append(payload)?;
            }
            OpCode::Continuation => {
                self.append(payload)?;
                if h.fin && self.deflate.as_ref().is_some_and(|d| d.compressed) {
                    let op = self.message_op.take().expect("checked in check_header");
                    let msg = std::mem::take(&mut self.message);
                    let inflated = self.inflate(&msg);
                    if msg.capacity() <= 4096 {
                        self.message = msg;
                        self.message.clear();
                    }
                    Self::emit(op, &inflated?, on_event)?;
                } else if h.fin {
                    let op = self.message_op.take().expect("checked in check_header");
                    if op == OpCode::Text && self.utf8_valid != self.message.len() {
                        return Err(CloseReason { code: 1007, reason: "text message ends inside a UTF-8 sequence" });
                    }
                    let msg = std::mem::take(&mut self.message);
                    on_event(if op == OpCode::Text { Event::Text(&msg) } else { Event::Binary(&msg) });
                    // Keep the allocation for the next fragmented message only if it is small.
                    if msg.capacity() <= 4096 {
                        self.message = msg;
                        self.message.clear();
                    }
                }
            }
        }
        Ok(())
    }

    /// Hands out an inflated message, text checked to be UTF-8.
    fn emit(op: OpCode, msg: &[u8], on_event: &mut dyn FnMut(Event<'_>)) -> Result<(), CloseReason> {
        if op == OpCode::Text {
            if simdutf8::basic::from_utf8(msg).is_err() {
                return Err(CloseReason { code: 1007, reason: "text message is not UTF-8" });
            }
            on_event(Event::Text(msg));
        } else {
            on_event(Event::Binary(msg));
        }
        Ok(())
    }

    /// Adds a fragment, validating text as it arrives so that invalid UTF-8 fails at once
    /// (compressed text is checked once inflated).
    fn append(&mut self, payload: &[u8]) -> Result<(), CloseReason> {
        self.message.extend_from_slice(payload);
        if self.message_op == Some(OpCode::Text) && !self.deflate.as_ref().is_some_and(|d| d.compressed) {
            match simdutf8::compat::from_utf8(&self.message[self.utf8_valid..]) {
                Ok(_) => self.utf8_valid = self.message.len(),
                Err(e) => {
                    if e.error_len().is_some() {
                        return Err(CloseReason { code: 1007, reason: "text message is not UTF-8" });
                    }
                    // An incomplete sequence at the end: the next fragment may complete it.
                    self.utf8_valid += e.valid_up_to();
                }
            }
        }
        Ok(())
    }
}

/// The application close codes (RFC 6455 §7.4.2: 4000-4999 are private use) the edge sends;
/// docs/PROTOCOL.md, "Heartbeats and closing", says what each asks of a client.
pub mod app_close {
    /// Slow consumer: the send queue passed its bound. Reconnect with `since`.
    pub const SLOW_CONSUMER: u16 = 4000;
    /// The token expired without a refresh. Reconnect with a new token.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// Disconnected by a moderator (every connection of the user, on every edge). Do not
    /// reconnect on your own: the application decides (and tells the user).
    pub const KICKED: u16 = 4002;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Ev {
        Text(Vec<u8>),
        Binary(Vec<u8>),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close(Option<u16>, Vec<u8>),
    }

    fn run(d: &mut Decoder, input: &[u8]) -> (Vec<Ev>, Result<(), CloseReason>) {
        let mut evs = Vec::new();
        let mut buf = input.to_vec();
        let r = d.feed(&mut buf, &mut |e| {
            evs.push(match e {
                Event::Text(p) => Ev::Text(p.to_vec()),
                Event::Binary(p) => Ev::Binary(p.to_vec()),
                Event::Ping(p) => Ev::Ping(p.to_vec()),
                Event::Pong(p) => Ev::Pong(p.to_vec()),
                Event::Close { code, reason } => Ev::Close(code, reason.to_vec()),
            });
        });
        (evs, r)
    }

    fn dec() -> Decoder {
        Decoder::new(Limits { max_frame: 1000, max_message: 2000 })
    }

    fn frame(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = encode_client_frame(OpCode::Binary, payload, [0x11, 0x22, 0x33, 0x44]);
        f[0] = if fin { 0x80 } else { 0 } | op;
        f
    }

    fn err(input: &[u8]) -> u16 {
        run(&mut dec(), input).1.unwrap_err().code
    }

    #[test]
    fn header_lengths_round_trip() {
        for len in [0usize, 1, 125, 126, 65535, 65536, 1 << 20] {
            let mut hdr = [0u8; 10];
            let n = encode_header(true, OpCode::Binary, len, &mut hdr);
            assert_eq!(
                n,
                if len < 126 {
                    2
                } else if len <= 65535 {
                    4
                } else {
                    10
                }
            );
            let h = parse_header(&hdr[..n]).unwrap().unwrap();
            assert_eq!((h.payload_len, h.header_len, h.fin, h.masked), (len as u64, n, true, false));
            // Any shorter prefix asks for more.
            for k in 0..n {
                assert_eq!(parse_header(&hdr[..k]).unwrap(), None);
            }
        }
    }

    #[test]
    fn masking_round_trip_at_any_offset() {
        let data: Vec<u8> = (0..100u8).collect();
        for off in 0..8 {
            let mut a = data.clone();
            apply_mask(&mut a, [1, 2, 3, 4], off);
            for (i, b) in a.iter().enumerate() {
                assert_eq!(*b, data[i] ^ [1, 2, 3, 4][(off + i) % 4]);
            }
            apply_mask(&mut a, [1, 2, 3, 4], off);
            assert_eq!(a, data);
        }
    }

    #[test]
    fn every_split_gives_the_same_events() {
        let mut stream = Vec::new();
        stream.extend(frame(false, 0x1, "héllo ".as_bytes()));
        stream.extend(frame(true, 0x9, b"p"));
        stream.extend(frame(false, 0x0, &"wörld".as_bytes()[..2]));
        stream.extend(frame(true, 0x0, &"wörld".as_bytes()[2..]));
        stream.extend(frame(true, 0x2, &[0u8; 300]));
        stream.extend(frame(true, 0xA, b""));
        stream.extend(frame(true, 0x8, &[0x03, 0xe8, b'b', b'y', b'e']));
        let want = vec![
            Ev::Ping(b"p".to_vec()),
            Ev::Text("héllo wörld".as_bytes().to_vec()),
            Ev::Binary(vec![0u8; 300]),
            Ev::Pong(vec![]),
            Ev::Close(Some(1000), b"bye".to_vec()),
        ];
        let (evs, r) = run(&mut dec(), &stream);
        assert_eq!((evs, r), (want.clone(), Ok(())));
        for split in 1..stream.len() {
            let mut d = dec();
            let (mut a, r1) = run(&mut d, &stream[..split]);
            let (b, r2) = run(&mut d, &stream[split..]);
            a.extend(b);
            assert!(r1.is_ok() && r2.is_ok(), "split {split}");
            assert_eq!(a, want.clone(), "split {split}");
        }
        // One byte at a time.
        let mut d = dec();
        let mut all = Vec::new();
        for b in &stream {
            let (e, r) = run(&mut d, std::slice::from_ref(b));
            assert!(r.is_ok());
            all.extend(e);
        }
        assert_eq!(all, want.clone());
        assert!(d.buffered_bytes() < 4096);
    }

    #[test]
    fn protocol_violations_get_their_codes() {
        // Unmasked.
        assert_eq!(err(&[0x81, 0x01, b'a']), 1002);
        // RSV bits.
        assert_eq!(err(&[0xC1, 0x80, 0, 0, 0, 0]), 1002);
        // Reserved opcodes.
        for op in [3u8, 7, 0xB, 0xF] {
            assert_eq!(err(&[0x80 | op, 0x80, 0, 0, 0, 0]), 1002);
        }
        // Fragmented control frame; control frame over 125 bytes.
        assert_eq!(err(&frame(false, 0x9, b"x")), 1002);
        assert_eq!(err(&frame(true, 0x9, &[0u8; 126])), 1002);
        // Continuation without a message; new message inside a fragmented one.
        assert_eq!(err(&frame(true, 0x0, b"x")), 1002);
        let mut two = frame(false, 0x1, b"a");
        two.extend(frame(true, 0x1, b"b"));
        assert_eq!(err(&two), 1002);
        // Invalid UTF-8, whole and across fragments; incomplete at the end of the message.
        assert_eq!(err(&frame(true, 0x1, &[0xff])), 1007);
        let mut frag = frame(false, 0x1, &[0xce]);
        frag.extend(frame(true, 0x0, &[0x28]));
        assert_eq!(err(&frag), 1007);
        let mut cut = frame(false, 0x1, b"ok");
        cut.extend(frame(true, 0x0, &[0xce]));
        assert_eq!(err(&cut), 1007);
        // Too big: one frame, or fragments together.
        assert_eq!(err(&frame(true, 0x2, &[0u8; 1001])), 1009);
        let mut big = frame(false, 0x2, &[0u8; 1000]);
        big.extend(frame(false, 0x0, &[0u8; 1000]));
        big.extend(frame(true, 0x0, &[0u8; 1]));
        assert_eq!(err(&big), 1009);
        // A huge declared length fails before any payload arrives.
        assert_eq!(err(&[0x82, 0xFF, 0, 0, 0, 0, 0x10, 0, 0, 0, 1, 2, 3, 4]), 1009);
        assert_eq!(err(&[0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0]), 1002);
        // Close: one byte; bad codes; bad reason.
        assert_eq!(err(&frame(true, 0x8, &[0x03])), 1002);
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000] {
            assert_eq!(err(&frame(true, 0x8, &code.to_be_bytes())), 1002, "code {code}");
        }
        assert_eq!(err(&frame(true, 0x8, &[0x03, 0xe8, 0xff])), 1007);
    }

    fn deflated(text: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        assert!(crate::deflate::Compressor::default().compress(15, text, &mut out));
        out
    }

    fn with_rsv1(mut f: Vec<u8>) -> Vec<u8> {
        f[0] |= 0x40;
        f
    }

    #[test]
    fn compressed_messages_are_inflated_whole_or_fragmented() {
        let text = "{\"op\":\"publish\",\"kind\":\"chat\",\"body\":\"hello hello hello hello hello hello hello\"}";
        let z = deflated(text.as_bytes());
        for takeover in [false, true] {
            let mut d = dec();
            d.enable_deflate(!takeover);
            let mut stream = with_rsv1(frame(true, 0x1, &z));
            // Fragmented: RSV1 on the first frame only.
            stream.extend(with_rsv1(frame(false, 0x1, &z[..3])));
            stream.extend(frame(true, 0x9, b"p"));
            stream.extend(frame(true, 0x0, &z[3..]));
            // A plain message in between is fine (RSV1 clear: not compressed).
            stream.extend(frame(true, 0x1, b"plain"));
            let (evs, r) = run(&mut d, &stream);
            assert_eq!(r, Ok(()));
            let t = Ev::Text(text.as_bytes().to_vec());
            assert_eq!(evs, vec![t.clone(), Ev::Ping(b"p".to_vec()), t, Ev::Text(b"plain".to_vec())]);
        }
    }

    #[test]
    fn rsv1_rules_and_the_inflated_bound() {
        let z = deflated(&[b'a'; 500]);
        // Not negotiated: 1002 (as every reserved bit).
        assert_eq!(err(&with_rsv1(frame(true, 0x1, &z))), 1002);
        let on = || {
            let mut d = dec();
            d.enable_deflate(true);
            d
        };
        // RSV1 on a control frame, on a continuation frame.
        assert_eq!(run(&mut on(), &with_rsv1(frame(true, 0x9, b"x"))).1.unwrap_err().code, 1002);
        let mut s = frame(false, 0x1, b"a");
        s.extend(with_rsv1(frame(true, 0x0, b"b")));
        assert_eq!(run(&mut on(), &s).1.unwrap_err().code, 1002);
        // A bomb: 4 KiB of zeros is a few bytes; the bound is 2000 inflated bytes.
        let bomb = deflated(&[0u8; 4096]);
        assert!(bomb.len() < 100);
        let mut d = on();
        assert_eq!(run(&mut d, &with_rsv1(frame(true, 0x2, &bomb))).1.unwrap_err().code, 1009);
        assert!(d.buffered_bytes() < 4096);
        // Not DEFLATE: 1007; compressed text that is not UTF-8: 1007.
        assert_eq!(run(&mut on(), &with_rsv1(frame(true, 0x2, &[0xff, 0xff, 0xff]))).1.unwrap_err().code, 1007);
        let bad = deflated(&[0xff; 200]);
        assert_eq!(run(&mut on(), &with_rsv1(frame(true, 0x1, &bad))).1.unwrap_err().code, 1007);
        // The same bytes as binary are fine.
        assert_eq!(run(&mut on(), &with_rsv1(frame(true, 0x2, &bad))).0, vec![Ev::Binary(vec![0xff; 200])]);
    }

    #[test]
    fn compressed_server_frames_set_rsv1() {
        let f = encode_compressed_frame(OpCode::Text, b"zz");
        assert_eq!(f, vec![0xC1, 2, b'z', b'z']);
        let h = parse_header(&f).unwrap().unwrap();
        assert!(h.rsv1 && h.fin);
        // RSV2 and RSV3 stay errors at the header.
        assert!(parse_header(&[0xA1, 0]).is_err() && parse_header(&[0x91, 0]).is_err());
    }

    #[test]
    fn valid_close_codes_and_what_follows_a_close() {
        for code in [1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 3000, 3999, 4000, 4999] {
            let (evs, r) = run(&mut dec(), &frame(true, 0x8, &code.to_be_bytes()));
            assert_eq!((evs, r), (vec![Ev::Close(Some(code), vec![])], Ok(())));
        }
        let mut d = dec();
        let mut s = frame(true, 0x8, &[]);
        s.extend(frame(true, 0x1, b"after"));
        let (evs, r) = run(&mut d, &s);
        assert_eq!((evs, r), (vec![Ev::Close(None, vec![])], Ok(())));
        assert_eq!(run(&mut d, &frame(true, 0x1, b"more")).0, vec![]);
    }

    #[test]
    fn utf8_sequence_split_across_fragments_is_fine() {
        let s = "€uro".as_bytes();
        let mut stream = frame(false, 0x1, &s[..1]);
        stream.extend(frame(false, 0x0, &s[1..2]));
        stream.extend(frame(true, 0x0, &s[2..]));
        assert_eq!(run(&mut dec(), &stream), (vec![Ev::Text(s.to_vec())], Ok(())));
    }

    #[test]
    fn server_frames() {
        assert_eq!(encode_frame(OpCode::Text, b"hi"), vec![0x81, 2, b'h', b'i']);
        let c = close_frame(1001, "bye");
        assert_eq!(c, vec![0x88, 5, 0x03, 0xe9, b'b', b'y', b'e']);
        // Long reasons are cut to fit a control frame, at a character boundary.
        let c = close_frame(1000, &"é".repeat(100));
        assert!(c.len() <= 127);
        assert!(std::str::from_utf8(&c[4..]).is_ok());
    }

    #[test]
    fn garbage_never_panics_and_stays_bounded() {
        let mut x: u64 = 0x1234_5678;
        for round in 0..2000 {
            let mut d = dec();
            let len = (round % 300) + 1;
            let mut buf = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(x as u8);
            }
            // Mostly well-formed headers with random payloads, sometimes pure noise.
            if round % 3 != 0 && buf.len() > 6 {
                buf[0] = 0x80 | [0x1, 0x2, 0x9, 0x0, 0x8][round % 5];
                buf[1] = 0x80 | (buf[1] & 0x7f).min(125);
            }
            for chunk in buf.chunks(7) {
                let mut c = chunk.to_vec();
                if d.feed(&mut c, &mut |_| {}).is_err() {
                    break;
                }
            }
            assert!(d.buffered_bytes() <= 2 * 2000 + 4096);
        }
    }
}
