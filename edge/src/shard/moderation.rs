//! Moderation on the shard: a user's connections closed (disconnect), a banned user's
//! connections taken out of a room, and the ban check every join passes.
//!
//! A disconnect or a ban walks the shard's connections once (O(connections); moderation is
//! rare, and a per-user index would cost every connection memory for it). A ban reaches the
//! shards after it is in the table the joins read: a join checked before it is in flight or
//! done when the ban's mail arrives, and the walk finds it (`joining` or `room`).

use roomcast_proto::Subprotocol;
use roomcast_proto::envelope::ServerMsg;
use roomcast_proto::ws::app_close;

use super::Shard;
use super::conn::{Closing, Phase};
use crate::bus::{ModAction, Moderate};

impl Shard {
    pub(super) fn moderate(&mut self, m: Moderate) {
        let n = match &m.action {
            ModAction::Kick { user } => self.kick(user),
            ModAction::Ban { room, user, until_ms } => self.remove_banned(room, user, *until_ms),
        };
        if let Some(reply) = m.reply {
            let _ = reply.send(n);
        }
    }

    /// The open connections of `user` (and, with `room`, only those in or joining it).
    fn connections_of(&self, user: &str, room: Option<&str>) -> Vec<u32> {
        self.conns
            .iter()
            .enumerate()
            .filter_map(|(slot, c)| {
                let c = c.as_ref()?;
                let here = room.is_none_or(|r| c.room.as_deref() == Some(r) || c.joining.as_deref() == Some(r));
                (c.phase == Phase::Open && c.closing == Closing::No && here && c.is_user(user)).then_some(slot as u32)
            })
            .collect()
    }

    /// Closes every connection of `user`: an `error` `kicked` first (an SSE stream's only
    /// word), then close 4002, which clients take as "do not reconnect on your own".
    fn kick(&mut self, user: &str) -> u32 {
        let slots = self.connections_of(user, None);
        for &slot in &slots {
            self.send_error(slot, "kicked", "disconnected by a moderator");
            self.closing_for(slot, crate::metrics::CloseWhy::Moderated);
            self.close_with(slot, app_close::KICKED, "kicked by a moderator");
            self.stats.kicked.inc();
        }
        if !slots.is_empty() {
            tracing::info!(shard = self.id, user, closed = slots.len(), "moderation: user disconnected");
        }
        slots.len() as u32
    }

    /// `user` is banned from `room`: its connections there leave it. A WebSocket gets an
    /// `error` `banned`, then `left` if it had joined, and stays open (it may join another
    /// room); an SSE stream, which follows that one room, gets the `error` and ends (its
    /// browser's reconnect is refused 403 while the ban lasts, which stops `EventSource`).
    fn remove_banned(&mut self, room: &str, user: &str, until_ms: u64) -> u32 {
        let slots = self.connections_of(user, Some(room));
        let message = ban_message(room, until_ms, crate::bus::now_us() / 1000);
        for &slot in &slots {
            let Some(Some(c)) = self.conns.get(slot as usize) else { continue };
            let (member, sse) = (c.room.as_deref() == Some(room), c.proto == Subprotocol::Sse);
            self.leave(slot);
            self.send_error(slot, "banned", &message);
            if sse {
                self.closing_for(slot, crate::metrics::CloseWhy::Moderated);
                self.finish_with(slot, None);
            } else if member {
                self.send_msg(slot, &ServerMsg::Left { room: room.to_owned() });
            }
            self.stats.banned_out.inc();
        }
        slots.len() as u32
    }

    /// Until when `user` is banned from `room` (None: it may join). One atomic load while no
    /// ban is in force.
    pub(super) fn banned(&self, room: &str, user: &str) -> Option<u64> {
        if self.bans.is_empty() {
            return None;
        }
        self.bans.check(room, user, crate::bus::now_us() / 1000)
    }
}

/// What a refused or removed member is told (the `error` message, the 403 reason).
pub(super) fn ban_message(room: &str, until_ms: u64, now_ms: u64) -> String {
    format!("banned from room {room} by a moderator for {} s more", until_ms.saturating_sub(now_ms).div_ceil(1000))
}
