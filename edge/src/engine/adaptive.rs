//! Adaptive merging: a room's window and sampling from its demand (members x offered rate),
//! steered by measured delivery latency against `adaptive.gift_latency_target_ms`, with the
//! shards' send backlog as a safety net.
//!
//! The latency controller (once a second). A gift reaches a member of a hot room after the
//! room's window W (it waits for the flush), then after the frames queued ahead of it on its
//! shard: at least members / capacity, since a flush writes one frame to every member. The
//! shards measure their capacity (frames written per CPU-second), how busy they are, and the
//! p99 of must-deliver delivery latency over the last second, and post them on the
//! [`super::LoadBoard`]. Feedforward: hot rooms may spend a share rho of the measured capacity
//! on frames, shared by every hot member on the edge, so each hot room merges over
//! W = hot members / (rho x capacity): the window follows the machine, not a constant.
//! That window narrows below the configured rule only while gifts are measured and no shard
//! is saturated (more frames on saturated shards only lengthen the flush).
//! Feedback on the measured p99 against `adaptive.gift_latency_target_ms`, by cause:
//! - late and a shard saturated (busy over `BUSY_HIGH`, busy counting the time it waited for a
//!   CPU): the frames are too many for the machine: rho falls 10% (wider windows, down to
//!   `RHO_MIN`) and chat's deliveries budget falls 30% (harder sampling, cheaper frames);
//! - late and no shard saturated: the window itself is the delay: rho rises 0.05 (narrower
//!   windows), up to `RHO_MAX`, which keeps headroom;
//! - early (p99 under half the target), whatever the shards' busy share: chat's budget grows,
//!   by 0.05 a second up to the configured `room_deliveries_per_s`, then by 10% a second up to
//!   `CHAT_MAX` times it (where a room of 10^5 shows the full `visible_rate`). Chat is sampled
//!   only as far as gifts need: the configured budget is where sampling starts, not a ceiling.
//!   Gift latency alone decides, not busy: with the load generator on the same CPUs the shards
//!   are never under half busy, and a room of 3x10^4 whose gifts took 0.56 s at p99 stayed at
//!   the configured budget's 17 chat/s when growth waited for idle CPUs;
//! - between half the target and the target: hold. That band, multiplicative decrease and
//!   slow increase keep it from flapping (the backlog-only rule did).
//!
//! Demand sampling (a hot room whose offered rate x members is over the budget is sampled at
//! once, before queues form) starts at the lower of the configured and the current budget: a
//! grown budget lets sampled rooms show more, it does not stop rooms from being sampled.
//!
//! Must-deliver kinds are never sampled. Until the shards have measured, and whenever they
//! are under a third busy (the estimate is then mostly fixed costs), the configured
//! `room_frames_per_s` stands in for the capacity share.
//!
use std::time::{Duration, Instant};

use super::room::HOT_ROOM_RATE;
use super::{Engine, EngineConfig};
use crate::config::AdaptiveConfig;

/// The adaptive level moves at most this often.
pub const ADAPT_EVERY: Duration = Duration::from_millis(250);
/// Smallest window adaptive merging widens from when the configured window is 0.
pub const MIN_ADAPTIVE_BASE: Duration = Duration::from_millis(10);

/// The share of measured capacity hot rooms' frames start with, its bounds (the top keeps
/// headroom for bursts, joins and signalling), and the busy share over which a shard counts as
/// saturated. The floor: a flush of N members takes N / C, frames at rho x C a second mean a
/// window of N / (rho x C), and a gift waits up to both, p99 about N / C x (1 + 1 / rho):
/// lowering rho widens the window more than it shortens the flush, so it helps only while the
/// capacity is misjudged (the estimate now counts the CPU each shard actually gets), and stops
/// at 0.6. Measured on one CPU at 10^5 members (bench-results/2026-11-30-100k-budgets-README.md):
/// a floor of 0.05, then of 0.3, let the window widen to its 2 s maximum and gift p99 rise from
/// 2.6 s to 3.6 s.
pub const RHO_START: f64 = 0.7;
/// Floor of rho: late on saturated shards, rho falls by 10% down to here (see `RHO_START`).
pub const RHO_MIN: f64 = 0.6;
/// Ceiling of rho: late with CPU to spare, rho rises by 0.05 up to here, keeping headroom.
pub const RHO_MAX: f64 = 0.8;
/// Busy share (waiting for a CPU included) over which a shard counts as saturated: more frames
/// would only lengthen the flush, so windows widen instead of narrowing.
pub const BUSY_HIGH: f64 = 0.85;
/// The floor of chat's deliveries-budget factor.
pub const CHAT_MIN: f64 = 0.05;
/// The ceiling of chat's deliveries-budget factor: with gifts early, a room shows up to this
/// many times the configured `room_deliveries_per_s` / members (a room of 10^5 then shows 50
/// chat/s, the default `visible_rate`, instead of 5).
pub const CHAT_MAX: f64 = 10.0;
/// How often the latency controller moves.
pub const CONTROL_EVERY: Duration = Duration::from_secs(1);

/// Highest level: `base << level` stays within `adaptive.max_window_ms`.
pub fn max_level(cfg: &EngineConfig) -> u32 {
    let base = cfg.window.max(MIN_ADAPTIVE_BASE);
    let max = Duration::from_millis(cfg.adaptive.max_window_ms).max(base);
    let mut level = 0;
    while base * (1 << (level + 1)) <= max && level < 16 {
        level += 1;
    }
    level
}

/// Droppable messages per second a sampled room of `members` shows: the configured visible
/// rate, lowered so the room stays within its delivery budget (`room_deliveries_per_s`, as the
/// latency controller scales it), never below the minimum.
pub fn visible_rate(a: &AdaptiveConfig, members: u64) -> f64 {
    let floor = a.min_visible_rate.min(a.visible_rate);
    (a.room_deliveries_per_s / members.max(1) as f64).max(floor).min(a.visible_rate)
}

/// The demand (offered messages/s x members) over which a hot room is sampled at once: the
/// lower of the configured budget (`base`) and the controller's current one (in `a`). The
/// controller grows the budget past the configured one to show sampled rooms more chat while
/// gifts are early; that must not switch sampling off for rooms that need it.
pub fn sampling_threshold(base: f64, a: &AdaptiveConfig) -> f64 {
    base.min(a.room_deliveries_per_s)
}

/// The window of a room publishing at `rate` messages/s, at adaptive `level`.
/// A hot room's window is also at least long enough that its members receive no more than
/// `adaptive.room_frames_per_s` frames a second in all: writes, not bytes, are what a shard
/// pays for (bench-results/2026-11-24-fanout), so a room of 10^5 must merge more than one of 10^3.
pub fn room_window(cfg: &EngineConfig, level: u32, rate: f64, members: u64) -> Duration {
    let w = window_at(cfg, level, rate);
    if !cfg.adaptive.enabled || rate < HOT_ROOM_RATE {
        return w;
    }
    let demand = Duration::from_secs_f64(members as f64 / cfg.adaptive.room_frames_per_s);
    w.max(demand.min(Duration::from_millis(cfg.adaptive.max_window_ms)))
}

/// The window at adaptive `level` alone, without the frame-rate demand: the configured window
/// for quiet rooms or at level 0, else the base doubled per level, capped at `max_window_ms`.
pub fn window_at(cfg: &EngineConfig, level: u32, rate: f64) -> Duration {
    if level == 0 || rate < HOT_ROOM_RATE {
        return cfg.window;
    }
    let base = cfg.window.max(MIN_ADAPTIVE_BASE);
    (base * (1 << level)).min(Duration::from_millis(cfg.adaptive.max_window_ms))
}

impl Engine {
    /// The window a room publishing at `rate` messages/s uses now.
    pub(super) fn window_for(&self, rate: f64) -> Duration {
        window_at(&self.cfg, self.level, rate)
    }

    /// The window of a room of `members` publishing at `rate`: the backlog level's, and for a
    /// hot room at least its share of the frame budget (hot members on the edge / budget), or,
    /// before the capacity is measured, members / `room_frames_per_s`. The budget's share is
    /// capped by that rule too: the capacity estimate runs low as windows widen (a wider window
    /// makes bigger frames, which cost more each, which lowers frames per CPU-second), a loop
    /// that took one CPU at 10^5 members to the 2 s maximum and gift p99 from 2.6 s to 3.5 s;
    /// widening past the rule is left to the backlog safety net, which reacts to real queues.
    pub(super) fn window_of(&self, rate: f64, members: u64) -> Duration {
        let rule = room_window(&self.cfg, self.level, rate, members);
        let Some(budget) = self.budget.filter(|_| self.narrow && self.cfg.adaptive.enabled && rate >= HOT_ROOM_RATE)
        else {
            return rule;
        };
        let hot = self.load.hot_members().max(members) as f64;
        let share =
            Duration::from_secs_f64(hot / budget.max(1.0)).min(Duration::from_millis(self.cfg.adaptive.max_window_ms));
        // The rule's window is at least the backlog level's: capping by it keeps that floor.
        window_at(&self.cfg, self.level, rate).max(share).min(rule)
    }

    /// One step of the latency controller, at most every [`CONTROL_EVERY`] (see the module
    /// comment).
    pub(super) fn control(&mut self, now: Instant) {
        if !self.cfg.adaptive.enabled || now.saturating_duration_since(self.last_control) < CONTROL_EVERY {
            return;
        }
        self.last_control = now;
        // The hot rooms (rate, members, sampled), from one pass over the rooms: the hot members
        // on the board, whether chat's budget binds, and the /metrics figures all read it.
        let hot_rooms: Vec<(f64, u64, bool)> = self
            .rooms
            .values()
            .map(|r| (r.current_rate(now), r.members, self.sampling || r.demand_sampling))
            .filter(|&(rate, _, _)| rate >= HOT_ROOM_RATE)
            .collect();
        self.load.set_hot_members(self.id, hot_rooms.iter().map(|&(_, members, _)| members).sum());
        let target = Duration::from_millis(self.cfg.adaptive.gift_latency_target_ms);
        let before = (self.rho, self.chat_factor);
        let saturated = self.load.busy() > BUSY_HIGH;
        let p99 = self.load.gift_p99();
        // Narrowing below the rule adds frames: only with gifts measured (the estimate then
        // counts the frames being written now, not the connect phase's small ones) and CPU to
        // spare. At the onset of the seed's room (10^5 members, 10^4 chat/s offered) an estimate
        // from the connect phase narrowed the window to 790 ms on saturated shards and gift p99
        // rose to 3.0 s for three seconds (bench-results/2026-11-30-100k-budgets-README.md).
        self.narrow = p99.is_some() && !saturated;
        // Whether chat's budget holds some sampled hot room under the visible rate: growing it
        // further helps no room otherwise (and would only leave stale headroom behind).
        let binding = hot_rooms.iter().any(|&(_, members, sampled)| {
            sampled && visible_rate(&self.cfg.adaptive, members) < self.cfg.adaptive.visible_rate
        });
        match p99 {
            Some(p99) if p99 > target && saturated => {
                self.rho = (self.rho * 0.9).max(RHO_MIN);
                self.chat_factor = (self.chat_factor * 0.7).max(CHAT_MIN);
            }
            Some(p99) if p99 > target => self.rho = (self.rho + 0.05).min(RHO_MAX),
            Some(p99) if p99 < target / 2 => {
                // Back to the configured budget slowly (it was cut for a reason), past it by
                // 10% a second while some sampled room is held under the visible rate: +0.05
                // from 1 would take 3 minutes to reach the ceiling.
                if self.chat_factor < 1.0 {
                    self.chat_factor = (self.chat_factor + 0.05).min(1.0);
                } else if binding {
                    self.chat_factor = (self.chat_factor * 1.1).min(CHAT_MAX);
                }
            }
            // No gift measured: nothing says chat may show more than configured. A grown budget
            // decays back (10% a second), so a burst hours later starts from the configuration.
            None if self.chat_factor > 1.0 => self.chat_factor = (self.chat_factor * 0.9).max(1.0),
            _ => {}
        }
        // The capacity estimate (frames per CPU-second) is trustworthy only when frames are
        // most of what the shards do: at low load fixed costs dominate it and it would widen
        // windows for nothing. Apply the budget from half busy, drop it under a third (the
        // configured rule then stands), hold in between.
        let capacity = self.load.capacity();
        let busy = self.load.busy();
        if capacity > 0.0 && (busy >= 0.5 || (self.budget.is_some() && busy >= 0.33)) {
            self.budget = Some(capacity * self.rho);
        } else if busy < 0.33 {
            self.budget = None;
        }
        self.cfg.adaptive.room_deliveries_per_s = self.deliveries_base * self.chat_factor;
        // What hot rooms use now, for /metrics (the same figures as GET /v1/rooms/{room}).
        let mut widest = self.cfg.window;
        let mut sampling = false;
        for &(rate, members, sampled) in &hot_rooms {
            widest = widest.max(self.window_of(rate, members));
            sampling |= sampled;
        }
        let engine = self.id.to_string();
        self.stats.hot_window_seconds.with_label_values(&[engine.as_str()]).set(widest.as_secs_f64());
        self.stats.sampling.with_label_values(&[engine.as_str()]).set(i64::from(sampling));
        if self.id == 0 && before != (self.rho, self.chat_factor) {
            tracing::info!(rho = self.rho, chat = self.chat_factor, budget = ?self.budget, "latency controller");
        }
    }

    /// One step of the backlog rule, at most every [`ADAPT_EVERY`].
    pub(super) fn adapt(&mut self, now: Instant) {
        if !self.cfg.adaptive.enabled || now.saturating_duration_since(self.last_adapt) < ADAPT_EVERY {
            return;
        }
        self.last_adapt = now;
        let backlog = self.load.max();
        let before = (self.level, self.sampling);
        if backlog > self.cfg.adaptive.high_water_bytes {
            if self.level < self.max_level {
                self.level += 1;
            } else {
                self.sampling = true;
            }
        } else if backlog < self.cfg.adaptive.low_water_bytes {
            if self.sampling {
                self.sampling = false;
            } else if self.level > 0 {
                self.level -= 1;
            }
        }
        if before != (self.level, self.sampling) {
            let w = self.window_for(HOT_ROOM_RATE);
            if self.id == 0 {
                // Every engine reads the same board and moves alike: one of them reports.
                tracing::info!(
                    backlog,
                    level = self.level,
                    window_ms = w.as_millis() as u64,
                    sampling = self.sampling,
                    "adaptive merge window"
                );
            }
        }
    }
}
