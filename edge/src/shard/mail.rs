//! What crosses threads: the mailbox (peers' signalling for this shard's engine, engines'
//! output for this shard's connections, control), the engine's turn, and the one mail per peer
//! per turn that carries this shard's output.

use std::time::Instant;

use roomcast_proto::envelope::ServerMsg;

use super::Shard;
use crate::bus::{EngineCmd, Mail, MailError, ShardCmd, engine_of};

impl Shard {
    /// Takes what waits in the mailbox: first the publish API's lane, then everything else,
    /// with the publish lane looked at again after each mail, so a publish that arrives during
    /// a long drain (a storm of joins) goes before the rest of it.
    pub(super) fn drain_mailbox(&mut self) {
        let now = Instant::now();
        self.take_upstream(now);
        while let Some(mail) = self.mailbox.try_recv_mail() {
            self.take(mail, now);
            self.take_upstream(now);
        }
    }

    /// What the publish lane holds now, and no more: a flood of publishes cannot starve the
    /// other lane.
    fn take_upstream(&mut self, now: Instant) {
        for _ in 0..self.mailbox.upstream_len() {
            let Some(mail) = self.mailbox.try_recv_upstream() else { break };
            self.take(mail, now);
        }
    }

    fn take(&mut self, mail: Mail, now: Instant) {
        match mail {
            Mail::Turn { engine, shard } => {
                if let Some(e) = self.engine.as_mut() {
                    for cmd in engine {
                        e.handle(cmd, now, &mut self.out);
                    }
                }
                for cmd in shard {
                    self.apply(cmd);
                }
            }
            Mail::Engine(cmd) => {
                if let Some(e) = self.engine.as_mut() {
                    e.handle(cmd, now, &mut self.out);
                }
            }
            Mail::Shard(cmd) => self.apply(cmd),
        }
    }

    /// One engine turn: this shard's own signalling for its engine, what is due, then the
    /// output: applied here for this shard, one mail per peer for the others.
    pub(super) fn engine_turn(&mut self) {
        let now = Instant::now();
        let me = usize::from(self.id);
        let hosted = self.engine.is_some();
        if let Some(e) = self.engine.as_mut() {
            for cmd in std::mem::take(&mut self.sig[me]) {
                e.handle(cmd, now, &mut self.out);
            }
            e.poll(now, &mut self.out);
            for cmd in std::mem::take(&mut self.out.shard[me]) {
                self.apply(cmd);
            }
        }
        self.stalled = false;
        for d in 0..self.engines.len() {
            if (hosted && d == me) || (self.sig[d].is_empty() && self.out.shard[d].is_empty()) {
                continue;
            }
            // Hosted: engine d lives on shard d, so this one mail carries both our signalling for
            // its engine and our engine's output for its connections. Beside: only signalling.
            let mail =
                Mail::Turn { engine: std::mem::take(&mut self.sig[d]), shard: std::mem::take(&mut self.out.shard[d]) };
            match self.engines[d].try_send(mail) {
                Ok(()) => {}
                Err((MailError::Full, Mail::Turn { engine, shard })) => {
                    // The peer is behind: keep the mail (in order) for the next turn.
                    self.sig[d] = engine;
                    self.out.shard[d] = shard;
                    self.stalled = true;
                }
                Err(_) => {}
            }
        }
    }

    /// Sends a connection's signalling to the engine that owns `room` (this turn's mail).
    pub(super) fn signal(&mut self, room: &str, cmd: EngineCmd) {
        let e = engine_of(room, self.engines.len());
        self.sig[e].push(cmd);
    }

    pub(super) fn apply(&mut self, cmd: ShardCmd) {
        match cmd {
            ShardCmd::Deliver(d) => self.deliver(&d),
            ShardCmd::JoinAck(a) => self.join_ack(*a),
            ShardCmd::Published(p) => {
                if self.live(p.slot, p.generation) {
                    let msg = match &p.result {
                        Ok(ack) => ServerMsg::Published { room: p.room.to_string(), seq: ack.seq, ts_us: ack.ts_us },
                        Err(e) => ServerMsg::Error { code: "publish_refused".into(), message: e.to_string() },
                    };
                    self.send_msg(p.slot, &msg);
                }
            }
            ShardCmd::JoinRefused(r) => self.join_refused(&r),
            ShardCmd::Drain { url, period_ms } => self.begin_drain(url, period_ms),
            ShardCmd::DrainHold(hold) => self.hold_drain(hold),
            ShardCmd::Shutdown => self.begin_shutdown(),
            ShardCmd::Moderate(m) => self.moderate(*m),
        }
    }
}
