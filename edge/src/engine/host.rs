//! The engine's own thread, for `engine.placement = "beside"`: engine i on a thread pinned to
//! the same CPU as shard i. The default hosts each engine inside its shard's loop instead
//! (`shard::Shard::engine_turn`); this host exists so both can be measured on the same code
//! (ARCHITECTURE.md, "Room engines").

use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;

use super::{Engine, Out};
use crate::bus::{Inbox, Mail, MailError, Mailbox, ShardCmd};

/// Longest the thread waits without mail (the adaptive step and the sweep ride on it).
const TICK: Duration = Duration::from_millis(100);
/// How soon output a full shard mailbox refused is retried.
const STALLED_RETRY: Duration = Duration::from_millis(1);
/// Mails handled before the engine's timers get a turn, so a flood cannot starve them.
const MAX_MAILS_PER_TURN: usize = 4096;

/// What `run_beside` needs to run one engine on its own thread.
pub struct BesideSpec {
    /// The engine it drives.
    pub engine: Engine,
    /// Where shards and the bus send it mail (the publish API's lane is taken first).
    pub mailbox: Inbox,
    /// Every shard's mailbox, by shard id.
    pub shards: Vec<Mailbox>,
    /// CPU to pin the thread to, if any.
    pub cpu: Option<usize>,
}

/// Runs until a `Shutdown` mail or until every sender is gone.
pub fn run_beside(spec: BesideSpec) {
    let BesideSpec { mut engine, mailbox, shards, cpu } = spec;
    if let Some(cpu) = cpu
        && let Err(e) = crate::sys::pin_current_thread(cpu)
    {
        tracing::warn!(engine = engine.id(), cpu, error = %e, "cannot pin engine thread");
    }
    let mut out = Out::new(shards.len());
    let mut stalled = false;
    'run: loop {
        let now = Instant::now();
        let mut wait = TICK;
        if let Some(at) = engine.poll_timeout() {
            wait = wait.min(at.saturating_duration_since(now));
        }
        if stalled {
            wait = wait.min(STALLED_RETRY);
        }
        let first = match mailbox.recv_timeout(wait) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let now = Instant::now();
        let mut next = first;
        let mut n = 0;
        while let Some(mail) = next.take() {
            match mail {
                Mail::Turn { engine: cmds, .. } => {
                    for cmd in cmds {
                        engine.handle(cmd, now, &mut out);
                    }
                }
                Mail::Engine(cmd) => engine.handle(cmd, now, &mut out),
                Mail::Shard(ShardCmd::Shutdown) => break 'run,
                Mail::Shard(_) => {}
            }
            n += 1;
            if n < MAX_MAILS_PER_TURN {
                next = mailbox.try_recv();
            }
        }
        engine.poll(Instant::now(), &mut out);
        stalled = false;
        for (s, mb) in shards.iter().enumerate() {
            if out.shard[s].is_empty() {
                continue;
            }
            let mail = Mail::Turn { engine: Vec::new(), shard: std::mem::take(&mut out.shard[s]) };
            if let Err((MailError::Full, Mail::Turn { shard, .. })) = mb.try_send(mail) {
                out.shard[s] = shard;
                stalled = true;
            }
        }
    }
    engine.shutdown(Instant::now(), &mut out);
    tracing::debug!(engine = engine.id(), "engine stopped");
}
