//! Per-room positions: what the client has seen, what it resumes from, what it must drop.
//!
//! Pure (no I/O, no clock): the driver feeds it the edge's messages and the application's
//! requests, and forwards the events it returns. This is where the delivery promises are kept:
//! no duplicate reaches the application (a message at or below the room's floor is dropped), a
//! reconnect resumes with `since` and `epoch`, a `reset` voids the position, a `gap` is passed
//! on and moves the position past it.

use std::collections::HashMap;

use roomcast_proto::envelope::{ClientMsg, ServerMsg};

use crate::event::{Event, Kind, Message, Position};

/// One room's position.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RoomState {
    /// The epoch `seq` counts in.
    epoch: Option<String>,
    /// Where to resume from: the highest seq seen or joined at.
    seq: u64,
    /// Messages at or below this seq are duplicates.
    floor: u64,
    /// The `joined` seq of the current membership: messages at or below it were replayed.
    live_from: u64,
    /// The join in flight asked for `since` = `seq`.
    asked_since: bool,
}

/// What a new connection should ask for in its URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JoinParams {
    pub room: String,
    pub since: Option<u64>,
    pub epoch: Option<String>,
}

/// The rooms side of the client.
#[derive(Debug, Default)]
pub(crate) struct Rooms {
    /// The room the application wants to be in.
    want: Option<String>,
    /// Positions of the rooms the client is (or is becoming, or was until a `left`) a member of.
    state: HashMap<String, RoomState>,
    /// The room the connection is a member of: its last `joined`, no `left` since.
    member_of: Option<String>,
    /// Duplicates dropped so far (tests and diagnostics).
    pub duplicates: u64,
}

impl Rooms {
    /// The room the application wants to be in.
    #[cfg(test)]
    pub fn wanted(&self) -> Option<&str> {
        self.want.as_deref()
    }

    /// The position in `room`, if the client has one.
    pub fn position(&self, room: &str) -> Option<Position> {
        self.state.get(room).map(|s| Position { seq: s.seq, epoch: s.epoch.clone() })
    }

    /// The application asks to be in `room`, from `from` if given (else from now). Returns the
    /// signalling message to send if connected, or `None` when there is nothing to do (already
    /// in that room).
    pub fn want_join(&mut self, room: &str, from: Option<Position>) -> Option<ClientMsg> {
        if from.is_none() && self.want.as_deref() == Some(room) {
            return None;
        }
        self.want = Some(room.to_owned());
        match from {
            Some(p) => {
                let st = RoomState { epoch: p.epoch, seq: p.seq, floor: p.seq, live_from: p.seq, asked_since: true };
                self.state.insert(room.to_owned(), st);
            }
            None => {
                self.state.remove(room);
            }
        }
        let (since, epoch) = match self.state.get(room) {
            Some(s) => (Some(s.seq), s.epoch.clone()),
            None => (None, None),
        };
        Some(ClientMsg::Join { room: room.to_owned(), since, epoch })
    }

    /// The application asks to leave. Returns the message to send, if it was in a room.
    pub fn want_leave(&mut self) -> Option<ClientMsg> {
        self.want.take().map(|_| ClientMsg::Leave)
    }

    /// The user is banned from a room (`error` `banned`): a join to it was refused (as in
    /// [`Rooms::join_refused`]), or the edge took the connection out of the room it was in (a
    /// `left` follows). Either way the client stops wanting that room: a reconnect would be
    /// refused while the ban lasts.
    pub fn banned(&mut self) {
        if self.want.is_some() && self.want == self.member_of {
            self.want = None;
        } else {
            self.join_refused();
        }
    }

    /// A join was refused by the edge (`bad_room`, `room_forbidden`, `join_refused`): the client
    /// stops asking for it (the application decides whether to try again). The edge keeps the
    /// connection where it was: after a refused switch that is the previous room, which becomes
    /// the wanted one again (a reconnect resumes it); after a refused first join, none.
    pub fn join_refused(&mut self) {
        if let Some(r) = self.want.take()
            && self.member_of.as_ref() != Some(&r)
        {
            self.state.remove(&r);
        }
        self.want = self.member_of.clone();
    }

    /// A new connection opens: what it should ask for. Rooms other than the wanted one were left
    /// with the old connection; their positions are dropped and `Left` reported.
    pub fn on_connect(&mut self) -> (Option<JoinParams>, Vec<Event>) {
        let want = self.want.clone();
        let mut events = Vec::new();
        let gone: Vec<String> = self.state.keys().filter(|r| Some(*r) != want.as_ref()).cloned().collect();
        for room in gone {
            self.state.remove(&room);
            events.push(Event::Left { room });
        }
        let params = want.map(|room| match self.state.get_mut(&room) {
            Some(st) => {
                st.asked_since = true;
                JoinParams { room, since: Some(st.seq), epoch: st.epoch.clone() }
            }
            None => JoinParams { room, since: None, epoch: None },
        });
        (params, events)
    }

    /// A message from the edge about rooms. Returns what to tell the application; messages of
    /// other types return nothing.
    pub fn on_server(&mut self, msg: ServerMsg, events: &mut Vec<Event>) {
        match msg {
            ServerMsg::Joined { room, seq, epoch, online } => {
                self.on_joined(room.clone(), seq, epoch, events);
                if let Some(count) = online {
                    events.push(Event::Online { room, count });
                }
            }
            ServerMsg::Batch { room, messages, online } => {
                let Some(st) = self.state.get_mut(&room) else {
                    // A room the client has left: nobody wants these.
                    return;
                };
                if let Some(count) = online {
                    events.push(Event::Online { room: room.clone(), count });
                }
                for m in messages {
                    if m.seq <= st.floor {
                        self.duplicates += 1;
                        continue;
                    }
                    st.floor = m.seq;
                    st.seq = st.seq.max(m.seq);
                    events.push(Event::Message(Message {
                        room: room.clone(),
                        seq: m.seq,
                        ts_us: m.ts_us,
                        kind: Kind::parse(&m.kind),
                        user: m.user,
                        body: m.body,
                        recovered: m.seq <= st.live_from,
                    }));
                }
            }
            ServerMsg::Gap { room, from, to, .. } => {
                if let Some(st) = self.state.get_mut(&room) {
                    st.floor = st.floor.max(to);
                    st.seq = st.seq.max(to);
                }
                events.push(Event::Gap { room, from, to });
            }
            ServerMsg::Reset { room, epoch, seq, reason, .. } => {
                // On a join: sent before `joined`; the join in flight keeps asking for the replay
                // of the new numbering. Under live members: the new numbering follows live.
                let asked_since = self.state.get(&room).is_some_and(|s| s.asked_since);
                let st = RoomState { epoch: Some(epoch.clone()), seq, floor: seq, live_from: seq, asked_since };
                self.state.insert(room.clone(), st);
                events.push(Event::Reset { room, epoch, seq, reason });
            }
            ServerMsg::Left { room, .. } => {
                if self.member_of.as_deref() == Some(room.as_str()) {
                    self.member_of = None;
                }
                // A `left` for a room the application wants again (leave then join at once)
                // belongs to the old membership: keep the new one's position.
                if self.want.as_deref() != Some(room.as_str()) {
                    self.state.remove(&room);
                }
                events.push(Event::Left { room });
            }
            ServerMsg::Published { .. }
            | ServerMsg::Error { .. }
            | ServerMsg::Goaway { .. }
            | ServerMsg::Refreshed { .. }
            | ServerMsg::Pong => {}
        }
    }

    fn on_joined(&mut self, room: String, seq: u64, epoch: String, events: &mut Vec<Event>) {
        self.member_of = Some(room.clone());
        let resumed = match self.state.get_mut(&room) {
            Some(st) if st.asked_since => {
                if st.epoch.as_ref().is_some_and(|e| *e != epoch) {
                    // The edge promises a `reset` first; should one ever be missing, the old
                    // position must not filter the new numbering (its seqs start again at 1).
                    st.seq = 0;
                    st.floor = 0;
                    events.push(Event::Reset {
                        room: room.clone(),
                        epoch: epoch.clone(),
                        seq: 0,
                        reason: "epoch changed".into(),
                    });
                }
                st.epoch = Some(epoch.clone());
                st.live_from = seq;
                st.asked_since = false;
                true
            }
            _ => {
                let st = RoomState { epoch: Some(epoch.clone()), seq, floor: 0, live_from: seq, asked_since: false };
                self.state.insert(room.clone(), st);
                false
            }
        };
        events.push(Event::Joined { room, epoch, seq, resumed });
    }
}

#[cfg(test)]
mod tests {
    use roomcast_proto::PushMessage;

    use super::*;

    fn batch(room: &str, seqs: &[u64]) -> ServerMsg {
        ServerMsg::Batch {
            room: room.into(),
            messages: seqs
                .iter()
                .map(|&seq| PushMessage {
                    seq,
                    ts_us: 1000 + seq,
                    kind: "gift".into(),
                    user: "u".into(),
                    body: format!("{{\"n\":{seq}}}"),
                })
                .collect(),
            online: None,
        }
    }

    /// From its JSON text: stays valid whatever optional fields `Joined` gains.
    fn joined(room: &str, seq: u64, epoch: &str) -> ServerMsg {
        let text = format!(r#"{{"type":"joined","room":"{room}","seq":{seq},"epoch":"{epoch}"}}"#);
        roomcast_proto::envelope::decode_json(text.as_bytes()).unwrap()
    }

    fn feed(r: &mut Rooms, msgs: Vec<ServerMsg>) -> Vec<Event> {
        let mut ev = Vec::new();
        for m in msgs {
            r.on_server(m, &mut ev);
        }
        ev
    }

    /// Seqs of the delivered messages, with their recovered flag.
    fn delivered(ev: &[Event]) -> Vec<(u64, bool)> {
        ev.iter()
            .filter_map(|e| match e {
                Event::Message(m) => Some((m.seq, m.recovered)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn fresh_join_then_resume_with_since_and_epoch() {
        let mut r = Rooms::default();
        assert_eq!(r.want_join("a", None), Some(ClientMsg::Join { room: "a".into(), since: None, epoch: None }));
        let ev = feed(&mut r, vec![joined("a", 4, "e1"), batch("a", &[5, 6]), batch("a", &[7])]);
        assert_eq!(ev[0], Event::Joined { room: "a".into(), epoch: "e1".into(), seq: 4, resumed: false });
        assert_eq!(delivered(&ev), vec![(5, false), (6, false), (7, false)]);
        // The connection drops; the next one asks for what came after 7, in e1.
        let (p, ev) = r.on_connect();
        assert!(ev.is_empty());
        assert_eq!(p, Some(JoinParams { room: "a".into(), since: Some(7), epoch: Some("e1".into()) }));
        // The edge replays 8..=10 (up to its joined seq), then live.
        let ev = feed(&mut r, vec![joined("a", 10, "e1"), batch("a", &[8, 9, 10]), batch("a", &[11])]);
        assert_eq!(ev[0], Event::Joined { room: "a".into(), epoch: "e1".into(), seq: 10, resumed: true });
        assert_eq!(delivered(&ev), vec![(8, true), (9, true), (10, true), (11, false)]);
    }

    #[test]
    fn no_duplicate_reaches_the_app() {
        let mut r = Rooms::default();
        r.want_join("a", None);
        let mut ev = feed(&mut r, vec![joined("a", 0, "e"), batch("a", &[1, 2, 3])]);
        r.on_connect();
        // A replay that overlaps what was seen (a bus that redelivers, two edges around a
        // drain), a batch repeated whole, and one out of order.
        ev.extend(feed(
            &mut r,
            vec![joined("a", 5, "e"), batch("a", &[2, 3, 4]), batch("a", &[4, 5]), batch("a", &[3]), batch("a", &[6])],
        ));
        assert_eq!(delivered(&ev).iter().map(|d| d.0).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(r.duplicates, 4);
    }

    #[test]
    fn gap_is_reported_and_skipped() {
        let mut r = Rooms::default();
        r.want_join("a", None);
        feed(&mut r, vec![joined("a", 0, "e"), batch("a", &[1, 2])]);
        r.on_connect();
        let ev = feed(
            &mut r,
            vec![
                joined("a", 40, "e"),
                ServerMsg::Gap { room: "a".into(), from: 3, to: 30 },
                batch("a", &[31, 40]),
                batch("a", &[41]),
            ],
        );
        assert_eq!(ev[1], Event::Gap { room: "a".into(), from: 3, to: 30 });
        assert_eq!(delivered(&ev), vec![(31, true), (40, true), (41, false)]);
        assert_eq!(r.position("a"), Some(Position { seq: 41, epoch: Some("e".into()) }));
        // A gap moves the resume point past it even when nothing follows.
        let mut r2 = Rooms::default();
        r2.want_join("b", None);
        feed(&mut r2, vec![joined("b", 0, "e"), ServerMsg::Gap { room: "b".into(), from: 1, to: 9 }]);
        assert_eq!(r2.on_connect().0.unwrap().since, Some(9));
    }

    #[test]
    fn reset_voids_the_position_and_the_new_numbering_is_delivered() {
        let mut r = Rooms::default();
        r.want_join("a", None);
        feed(&mut r, vec![joined("a", 0, "old"), batch("a", &[1, 2, 3, 4, 5])]);
        r.on_connect();
        // The edge restarted without its store: reset, joined in the new epoch, its history.
        let ev = feed(
            &mut r,
            vec![
                ServerMsg::Reset { room: "a".into(), epoch: "new".into(), seq: 0, reason: "epoch changed".into() },
                joined("a", 2, "new"),
                batch("a", &[1, 2]),
                batch("a", &[3]),
            ],
        );
        assert_eq!(
            ev[0],
            Event::Reset { room: "a".into(), epoch: "new".into(), seq: 0, reason: "epoch changed".into() }
        );
        assert_eq!(ev[1], Event::Joined { room: "a".into(), epoch: "new".into(), seq: 2, resumed: true });
        // Seqs 1..3 again, but of the new numbering: not duplicates.
        assert_eq!(delivered(&ev), vec![(1, true), (2, true), (3, false)]);
        assert_eq!(
            r.on_connect().0.unwrap(),
            JoinParams { room: "a".into(), since: Some(3), epoch: Some("new".into()) }
        );
    }

    #[test]
    fn live_reset_under_members() {
        let mut r = Rooms::default();
        r.want_join("a", None);
        feed(&mut r, vec![joined("a", 0, "e1"), batch("a", &[1, 2, 3])]);
        let ev = feed(
            &mut r,
            vec![
                ServerMsg::Reset { room: "a".into(), epoch: "e2".into(), seq: 0, reason: "redis lost the room".into() },
                batch("a", &[1, 2]),
            ],
        );
        assert!(matches!(ev[0], Event::Reset { .. }));
        assert_eq!(delivered(&ev), vec![(1, false), (2, false)]);
    }

    #[test]
    fn an_epoch_change_without_reset_is_still_reported() {
        let mut r = Rooms::default();
        r.want_join("a", Some(Position { seq: 9, epoch: Some("e1".into()) }));
        let ev = feed(&mut r, vec![joined("a", 1, "e2"), batch("a", &[1])]);
        assert!(matches!(&ev[0], Event::Reset { epoch, seq: 0, .. } if epoch == "e2"));
        assert_eq!(delivered(&ev), vec![(1, true)]);
    }

    #[test]
    fn join_at_a_saved_position() {
        let mut r = Rooms::default();
        let msg = r.want_join("a", Some(Position { seq: 7, epoch: Some("e".into()) }));
        assert_eq!(msg, Some(ClientMsg::Join { room: "a".into(), since: Some(7), epoch: Some("e".into()) }));
        let ev = feed(&mut r, vec![joined("a", 9, "e"), batch("a", &[7, 8, 9, 10])]);
        assert_eq!(delivered(&ev), vec![(8, true), (9, true), (10, false)]);
    }

    /// Taken out of a room by a ban (`error` `banned`, then `left`): the room is no longer
    /// wanted, so a reconnect does not ask for it; a banned switch goes back where it was.
    #[test]
    fn a_ban_drops_the_room() {
        let mut r = Rooms::default();
        r.want_join("a", None);
        feed(&mut r, vec![joined("a", 0, "e"), batch("a", &[1])]);
        r.banned();
        let ev = feed(&mut r, vec![ServerMsg::Left { room: "a".into() }]);
        assert_eq!(ev, vec![Event::Left { room: "a".into() }]);
        assert_eq!(r.on_connect().0, None, "not asked for again");
        r.want_join("b", None);
        feed(&mut r, vec![joined("b", 0, "e")]);
        r.want_join("c", None);
        r.banned();
        assert_eq!(r.on_connect().0.map(|p| p.room), Some("b".to_owned()), "refused switch: back to b");
    }

    #[test]
    fn switching_rooms() {
        let mut r = Rooms::default();
        r.want_join("a", None);
        feed(&mut r, vec![joined("a", 0, "e"), batch("a", &[1])]);
        assert_eq!(r.want_join("a", None), None, "already there");
        assert!(r.want_join("b", None).is_some());
        // Batches of a still in flight before its `left` are delivered; after it, dropped.
        let ev = feed(&mut r, vec![batch("a", &[2]), ServerMsg::Left { room: "a".into() }, batch("a", &[3])]);
        assert_eq!(delivered(&ev), vec![(2, false)]);
        assert_eq!(ev[1], Event::Left { room: "a".into() });
        let ev = feed(&mut r, vec![joined("b", 5, "f"), batch("b", &[6])]);
        assert_eq!(delivered(&ev), vec![(6, false)]);
        assert_eq!(r.position("a"), None);
        // Leave, then join the same room again before the `left` arrives: the new membership
        // survives the old `left`.
        assert_eq!(r.want_leave(), Some(ClientMsg::Leave));
        assert!(r.want_join("b", None).is_some());
        let ev = feed(&mut r, vec![ServerMsg::Left { room: "b".into() }, joined("b", 8, "f"), batch("b", &[9])]);
        assert_eq!(delivered(&ev), vec![(9, false)]);
    }

    #[test]
    fn a_connection_lost_mid_switch_reports_the_old_room_left() {
        let mut r = Rooms::default();
        r.want_join("a", None);
        feed(&mut r, vec![joined("a", 0, "e")]);
        r.want_join("b", None);
        let (p, ev) = r.on_connect();
        assert_eq!(p, Some(JoinParams { room: "b".into(), since: None, epoch: None }));
        assert_eq!(ev, vec![Event::Left { room: "a".into() }]);
        // Not in any room: connect without one.
        r.want_leave();
        assert_eq!(r.on_connect().0, None);
    }

    #[test]
    fn online_count_is_passed_on() {
        let mut r = Rooms::default();
        r.want_join("a", None);
        let ev = feed(
            &mut r,
            vec![
                joined("a", 0, "e"),
                ServerMsg::Batch { room: "a".into(), messages: vec![], online: Some(120_000) },
                ServerMsg::Batch { room: "b".into(), messages: vec![], online: Some(5) },
            ],
        );
        assert_eq!(ev[1..], [Event::Online { room: "a".into(), count: 120_000 }]);
    }

    #[test]
    fn a_refused_switch_keeps_the_room_the_connection_is_in() {
        let mut r = Rooms::default();
        r.want_join("a", None);
        let mut ev = Vec::new();
        r.on_server(joined("a", 4, "e"), &mut ev);
        r.want_join("vip", None);
        r.join_refused();
        assert_eq!(r.wanted(), Some("a"));
        let (params, _) = r.on_connect();
        let p = params.expect("resumes a");
        assert_eq!((p.room.as_str(), p.since), ("a", Some(4)));
    }

    #[test]
    fn refused_join_is_not_retried() {
        let mut r = Rooms::default();
        r.want_join("a", None);
        r.join_refused();
        assert_eq!(r.wanted(), None);
        assert_eq!(r.on_connect().0, None);
    }
}
