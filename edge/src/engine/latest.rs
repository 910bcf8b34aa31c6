//! Latest-state kinds (conflation): leaderboards, stream status, pinned notices. A conflated
//! kind keeps only its newest message per room and key: in the pending batch a newer one
//! replaces the older (members get one per window, whatever the publish rate), and the newest
//! is given to a joining member with its `joined`, before live messages. Must-deliver kinds are
//! never conflated (config validation refuses it).

use roomcast_proto::envelope::PushMessage;

use super::Engine;
use super::room::{Latest, MAX_LATEST, Room};
use crate::bus::RoomName;

/// The entry key of a conflated message: the value of `field` at the top of its body (a string
/// as is, a number as written), "" without a field or when the body has none.
pub fn entry_key(field: Option<&str>, body: &str) -> String {
    let Some(field) = field else { return String::new() };
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(body) else {
        return String::new();
    };
    match map.get(field) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v @ serde_json::Value::Number(_)) => v.to_string(),
        _ => String::new(),
    }
}

impl Room {
    /// Records `msg` as the newest of its kind and key (the oldest entry goes past MAX_LATEST).
    pub fn set_latest(&mut self, kind: &str, key: String, msg: PushMessage) {
        if let Some(e) = self.latest.iter_mut().find(|e| e.kind == kind && e.key == key) {
            if msg.seq >= e.msg.seq {
                e.msg = msg;
            }
            return;
        }
        if self.latest.len() >= MAX_LATEST
            && let Some(oldest) = self.latest.iter().enumerate().min_by_key(|(_, e)| e.msg.seq).map(|(i, _)| i)
        {
            self.latest.swap_remove(oldest);
        }
        self.latest.push(Latest { kind: kind.to_owned(), key, msg });
    }

    /// The latest-state messages a joiner at `since` (None: a fresh join) has not seen, up to
    /// `upto` (what live batches carry comes after it), merged into `replay` in seq order.
    pub fn with_latest(&self, mut replay: Vec<PushMessage>, since: Option<u64>, upto: u64) -> Vec<PushMessage> {
        let from = since.unwrap_or(0);
        for e in &self.latest {
            let s = e.msg.seq;
            if s > from && s <= upto && !replay.iter().any(|m| m.seq == s) {
                replay.push(e.msg.clone());
            }
        }
        replay.sort_by_key(|m| m.seq);
        replay
    }
}

impl Engine {
    /// The conflation key of `pm` if its kind is conflated (and records it as the room's newest).
    pub(super) fn conflate(&mut self, room: &RoomName, pm: &PushMessage) -> Option<String> {
        let field = self.cfg.conflate.get(&pm.kind)?;
        let key = entry_key(field.as_deref(), &pm.body);
        if let Some(r) = self.rooms.get_mut(room) {
            r.set_latest(&pm.kind, key.clone(), pm.clone());
        }
        Some(key)
    }
}

#[cfg(test)]
mod tests {
    use super::entry_key;

    #[test]
    fn entry_keys_come_from_a_top_level_field() {
        assert_eq!(entry_key(Some("slot"), r#"{"slot":"top","text":"hi"}"#), "top");
        assert_eq!(entry_key(Some("slot"), r#"{"slot":3}"#), "3");
        assert_eq!(entry_key(Some("slot"), r#"{"other":1}"#), "");
        assert_eq!(entry_key(Some("slot"), r#""just a string""#), "");
        assert_eq!(entry_key(None, r#"{"slot":"top"}"#), "");
        assert_eq!(entry_key(Some("slot"), r#"{"slot":{"nested":1}}"#), "");
    }
}
