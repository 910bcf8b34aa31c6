//! Adaptive merging: a room's window and sampling from its demand (members x offered rate) and,
//! as a safety net, from the shards' send backlog.
//!
//! Shards publish their send backlog on the [`super::LoadBoard`] every tick. While the largest
//! backlog is above the high-water mark, the window of hot rooms doubles, up to
//! `adaptive.max_window_ms`; at the widest it samples droppable kinds too; below the low-water
//! mark it steps back.

use std::time::{Duration, Instant};

use super::room::HOT_ROOM_RATE;
use super::{Engine, EngineConfig};
use crate::config::AdaptiveConfig;

/// The adaptive level moves at most this often.
pub const ADAPT_EVERY: Duration = Duration::from_millis(250);
/// Smallest window adaptive merging widens from when the configured window is 0.
pub const MIN_ADAPTIVE_BASE: Duration = Duration::from_millis(10);

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
/// rate, lowered so the room stays within its delivery budget, never below the minimum.
pub fn visible_rate(a: &AdaptiveConfig, members: u64) -> f64 {
    let floor = a.min_visible_rate.min(a.visible_rate);
    (a.room_deliveries_per_s / members.max(1) as f64).max(floor).min(a.visible_rate)
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
                self.stats.hot_window_ms.set(w.as_millis() as i64);
                self.stats.sampling.set(i64::from(self.sampling));
            }
        }
    }
}
