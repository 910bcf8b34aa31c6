//! roomcast wire formats.
//!
//! Everything in this crate parses from `&[u8]` and encodes into buffers. It opens no socket and
//! reads no clock: callers pass the time in. That keeps every format unit-testable and fuzzable,
//! and lets the edge (io_uring) and the load generator (its own client) share one implementation.
//!
//! - [`ws`]: RFC 6455 frames: the server's per-connection decoder, server frame encoders, and
//!   client-side helpers.
//! - [`handshake`]: the HTTP upgrade.
//! - [`deflate`]: permessage-deflate (RFC 7692): offers, the answer, compressing and inflating.
//! - [`sse`]: the Server-Sent Events framing of the `/sse` fallback transport.
//! - [`envelope`]: what the edge pushes (`roomcast.json.v1` and `roomcast.rkyv.v2`) and the
//!   signalling messages a client sends.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

// rkyv 0.8's derive generates resolver enums (ServerMsgResolver, ClientMsgResolver) whose
// fields carry no docs and take no attributes: the lint is off for this module alone. Its own
// items are documented all the same.
pub mod deflate;
#[allow(missing_docs)]
pub mod envelope;
pub mod handshake;
pub mod sse;
pub mod ws;

pub use envelope::{ClientMsg, PushMessage, ServerMsg, Subprotocol};
