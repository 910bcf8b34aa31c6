//! What a lost or refused connection means for the next attempt (docs/PROTOCOL.md, close codes
//! and upgrade refusals). Pure.

use std::time::Duration;

/// How to come back after a connection ended or was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Retry {
    /// The server asked for at least this delay.
    pub floor: Duration,
    /// The server refused what this client sends: back off hard, it will not fix itself soon.
    pub protocol: bool,
    /// The token is refused or expired: fetch a new one first.
    pub new_token: bool,
    /// Do not come back at all: a moderator disconnected this user (4002). The client stops
    /// (`ConnectionState::Closed`); the application decides what to tell the user, and whether
    /// to start a new client.
    pub stop: bool,
}

/// Delay the edge asks for with close 1013 ("try again later": a join's replay over the
/// shard's budget; "reconnect with the same since shortly").
pub(crate) const TRY_LATER_FLOOR: Duration = Duration::from_secs(1);

/// After the edge closed the connection with `code` (`None`: no close frame, the connection
/// just died). Every code leads to a reconnect with `since`; they differ in how soon.
pub(crate) fn after_close(code: Option<u16>) -> Retry {
    match code {
        // Slow consumer (4000), going away (1001: drain, shutdown, idle timeout), server
        // error, service restart: come back with `since`, nothing is lost.
        None | Some(1000 | 1001 | 1006 | 1011 | 1012 | 4000) => Retry::default(),
        // Try again later, with the same `since`.
        Some(1013) => Retry { floor: TRY_LATER_FLOOR, ..Retry::default() },
        // Token expired without a refresh: a new token, then the same `since`.
        Some(4001) => Retry { new_token: true, ..Retry::default() },
        // Disconnected by a moderator: coming back on its own would undo the kick.
        Some(roomcast_proto::ws::app_close::KICKED) => Retry { stop: true, ..Retry::default() },
        // Protocol errors (1002 frames, 1003 data, 1007 UTF-8, 1008 policy: signalling flood,
        // 1009 too big, 1010 extension): the same bytes would be refused again.
        Some(1002 | 1003 | 1007 | 1008 | 1009 | 1010) => Retry { protocol: true, ..Retry::default() },
        Some(_) => Retry::default(),
    }
}

/// After the edge refused the upgrade with HTTP `status` (and perhaps `Retry-After`).
pub(crate) fn after_refusal(status: u16, retry_after: Option<Duration>) -> Retry {
    match status {
        // Missing, invalid or expired token.
        401 => Retry { new_token: true, ..Retry::default() },
        // Room outside the token's rooms, or origin: a new token may allow it; else it is not
        // transient.
        403 => Retry { new_token: true, protocol: true, ..Retry::default() },
        // Over the per-address bounds.
        429 => Retry { floor: retry_after.unwrap_or(Duration::from_secs(1)), ..Retry::default() },
        // Overloaded (ask dispatch again) or unavailable.
        503 => Retry { floor: retry_after.unwrap_or_default(), ..Retry::default() },
        // Malformed request, wrong path or method, version, header bounds, HTTP version.
        400..=499 | 505 => Retry { protocol: true, ..Retry::default() },
        _ => Retry::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_as_the_protocol_says() {
        assert_eq!(after_close(Some(4000)), Retry::default());
        assert_eq!(after_close(Some(1001)), Retry::default());
        assert_eq!(after_close(None), Retry::default());
        assert_eq!(after_close(Some(1013)).floor, Duration::from_secs(1));
        assert!(after_close(Some(4001)).new_token);
        assert!(after_close(Some(4002)).stop, "kicked: no reconnect");
        assert!(!after_close(Some(4000)).stop && !after_close(None).stop);
        for c in [1002, 1007, 1008, 1009] {
            assert!(after_close(Some(c)).protocol, "{c}");
        }
    }

    #[test]
    fn refusals() {
        assert!(after_refusal(401, None).new_token);
        assert!(!after_refusal(401, None).protocol);
        assert_eq!(after_refusal(429, Some(Duration::from_secs(7))).floor, Duration::from_secs(7));
        assert_eq!(after_refusal(429, None).floor, Duration::from_secs(1));
        assert_eq!(after_refusal(503, None), Retry::default());
        for s in [400, 404, 405, 426, 431, 505] {
            assert!(after_refusal(s, None).protocol, "{s}");
        }
    }
}
