//! One shard's room index: room -> the shard's member connections.
//!
//! Publishing is linear in the room's local members and touches nothing else. Membership
//! changes are O(1): members sit in a Vec and each connection remembers its index, so a leave is
//! a `swap_remove` plus one index fix-up. `wanted` counts members plus joins still waiting for
//! the engine's acknowledgement, per encoding: it is what the engine's interest sets mirror, so a room
//! is unsubscribed only when nobody here has it or is about to.

use std::collections::HashMap;

use roomcast_proto::Subprotocol;

use crate::bus::RoomName;

/// A room's members on one shard, and how many of them want each encoding.
#[derive(Debug, Default)]
pub struct LocalRoom {
    /// The members' connection slots on this shard.
    pub members: Vec<u32>,
    wanted: [u32; Subprotocol::COUNT],
}

/// What a membership change means for the room's engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    /// Still wanted in this encoding here.
    Kept,
    /// Nobody here wants `proto` frames of the room any more: tell the engine.
    Dropped,
}

/// This shard's rooms, by name.
#[derive(Debug, Default)]
pub struct Rooms {
    map: HashMap<RoomName, LocalRoom>,
}

impl Rooms {
    /// Rooms with at least one member here.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no room has a member here.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Shares the room's name, if it is known here, so the shard keeps one `Arc` per room.
    pub fn name(&self, room: &str) -> Option<RoomName> {
        self.map.get_key_value(room).map(|(k, _)| k.clone())
    }

    /// A join was sent to the bus.
    pub fn begin_join(&mut self, room: &RoomName, proto: Subprotocol) {
        self.map.entry(room.clone()).or_default().wanted[proto.index()] += 1;
    }

    /// The engine acknowledged the join: `slot` is a member from now on; returns its index.
    pub fn complete_join(&mut self, room: &RoomName, slot: u32) -> u32 {
        let r = self.map.entry(room.clone()).or_default();
        r.members.push(slot);
        (r.members.len() - 1) as u32
    }

    /// A join that was sent will not complete (the connection went away or switched).
    pub fn cancel_join(&mut self, room: &str, proto: Subprotocol) -> Interest {
        self.drop_want(room, proto)
    }

    /// Removes member `slot` at `index`. If another member moved into `index`, returns it so the
    /// caller can update that connection's index.
    pub fn leave(&mut self, room: &str, slot: u32, index: u32, proto: Subprotocol) -> (Interest, Option<u32>) {
        let mut moved = None;
        if let Some(r) = self.map.get_mut(room) {
            let i = index as usize;
            if r.members.get(i) == Some(&slot) {
                r.members.swap_remove(i);
                moved = r.members.get(i).copied();
            } else {
                debug_assert!(false, "member index out of sync");
                r.members.retain(|&s| s != slot);
            }
        }
        (self.drop_want(room, proto), moved)
    }

    fn drop_want(&mut self, room: &str, proto: Subprotocol) -> Interest {
        let Some(r) = self.map.get_mut(room) else { return Interest::Dropped };
        let w = &mut r.wanted[proto.index()];
        *w = w.saturating_sub(1);
        let dropped = *w == 0;
        if r.wanted.iter().all(|&w| w == 0) && r.members.is_empty() {
            self.map.remove(room);
        }
        if dropped { Interest::Dropped } else { Interest::Kept }
    }

    /// The slots of the room's members on this shard; None if it has none here.
    pub fn members(&self, room: &str) -> Option<&[u32]> {
        self.map.get(room).map(|r| r.members.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_leave_swap_and_interest() {
        let mut rooms = Rooms::default();
        let r: RoomName = "a".into();
        for slot in [10, 11, 12] {
            rooms.begin_join(&r, Subprotocol::Json);
            assert_eq!(rooms.complete_join(&r, slot), slot - 10);
        }
        // Removing the first moves the last into its place.
        let (interest, moved) = rooms.leave("a", 10, 0, Subprotocol::Json);
        assert_eq!((interest, moved), (Interest::Kept, Some(12)));
        assert_eq!(rooms.members("a").unwrap(), &[12, 11]);
        assert_eq!(rooms.leave("a", 11, 1, Subprotocol::Json), (Interest::Kept, None));
        assert_eq!(rooms.leave("a", 12, 0, Subprotocol::Json), (Interest::Dropped, None));
        assert!(rooms.is_empty());
    }

    #[test]
    fn pending_join_keeps_interest() {
        let mut rooms = Rooms::default();
        let r: RoomName = "a".into();
        rooms.begin_join(&r, Subprotocol::Rkyv);
        rooms.complete_join(&r, 1);
        rooms.begin_join(&r, Subprotocol::Rkyv); // slot 2's join is in flight
        assert_eq!(rooms.leave("a", 1, 0, Subprotocol::Rkyv).0, Interest::Kept);
        assert_eq!(rooms.cancel_join("a", Subprotocol::Rkyv), Interest::Dropped);
        assert!(rooms.is_empty());
    }

    #[test]
    fn encodings_are_counted_apart() {
        let mut rooms = Rooms::default();
        let r: RoomName = "a".into();
        rooms.begin_join(&r, Subprotocol::Json);
        rooms.complete_join(&r, 1);
        rooms.begin_join(&r, Subprotocol::Rkyv);
        rooms.complete_join(&r, 2);
        assert_eq!(rooms.leave("a", 2, 1, Subprotocol::Rkyv).0, Interest::Dropped);
        assert_eq!(rooms.members("a").unwrap(), &[1]);
    }
}
