//! Publishing at fixed rates per room and kind, over HTTP (keep-alive, `reqwest` blocking).
//! Each body carries its send time and a per-(room, kind) counter: `{"t":..,"k":..,"kind":..}`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::stats::Pacer;
use crate::worker::Target;

pub struct Publisher {
    client: reqwest::blocking::Client,
    target: Target,
    base: String,
    rooms: u32,
    kinds: Vec<String>,
    pad: String,
    /// Messages accepted, per room and kind (the next `k`).
    pub published: Vec<Vec<u64>>,
    /// Attempts per kind (accepted or not), for pacing.
    sent: Vec<u64>,
    pub refused: u64,
}

fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

impl Publisher {
    pub fn new(target: Target, http: SocketAddr, rooms: u32, kinds: &[&str], pad: usize) -> anyhow::Result<Self> {
        let client =
            reqwest::blocking::Client::builder().timeout(Duration::from_secs(10)).pool_max_idle_per_host(4).build()?;
        Ok(Self {
            client,
            target,
            base: format!("http://{http}"),
            rooms: rooms.max(1),
            kinds: kinds.iter().map(|k| (*k).to_owned()).collect(),
            pad: "x".repeat(pad),
            published: vec![vec![0; kinds.len()]; rooms.max(1) as usize],
            sent: vec![0; kinds.len()],
            refused: 0,
        })
    }

    pub fn total(&self, kind: usize) -> u64 {
        self.published.iter().map(|r| r[kind]).sum()
    }

    /// Sends whatever is due by now; `rates` per room and second, per kind.
    pub fn tick(&mut self, start: Instant, rates: &[f64]) -> anyhow::Result<()> {
        for (ki, &rate) in rates.iter().enumerate() {
            let pacer = Pacer::new(start, rate * f64::from(self.rooms));
            let due = pacer.due_count(Instant::now());
            // At most 64 per call: the caller samples progress between calls, even when the
            // server answers slowly and the publisher falls behind its schedule.
            let due = due.min(self.sent[ki] + 64);
            while self.sent[ki] < due {
                let n = self.sent[ki];
                self.sent[ki] += 1;
                let room = (n % u64::from(self.rooms)) as u32;
                self.send(room, ki)?;
            }
        }
        Ok(())
    }

    fn send(&mut self, room: u32, ki: usize) -> anyhow::Result<()> {
        let kind = &self.kinds[ki];
        let k = self.published[room as usize][ki];
        let body = format!(r#"{{"t":{},"k":{k},"kind":"{kind}","p":"{}"}}"#, now_us(), self.pad);
        let (url, payload) = match self.target {
            Target::Edge => (
                format!("{}/v1/rooms/r{room}/messages", self.base),
                format!(r#"{{"kind":"{kind}","user":"","body":{body}}}"#),
            ),
            Target::Nchan => (format!("{}/pub/r{room}", self.base), body),
        };
        // Must-deliver messages are retried while the server says so; nothing is skipped, so
        // the receivers' `k` sequence has no hole the publisher made.
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let r = self.client.post(&url).header("Content-Type", "application/json").body(payload.clone()).send();
            // Nchan answers 201 (delivered to subscribers) or 202 (queued): both accepted. The
            // edge answers 202 only for a droppable message it sampled out.
            let accepted =
                |s: reqwest::StatusCode| s.is_success() && (self.target == Target::Nchan || s.as_u16() != 202);
            match r {
                Ok(resp) if accepted(resp.status()) => {
                    self.published[room as usize][ki] += 1;
                    return Ok(());
                }
                Ok(resp)
                    if Instant::now() < end && (resp.status().as_u16() == 429 || resp.status().as_u16() == 503) =>
                {
                    self.refused += 1;
                    if ki != 0 {
                        // Droppable: dropped by the server; do not number it.
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(resp) if resp.status().as_u16() == 202 => {
                    self.refused += 1;
                    return Ok(());
                }
                Ok(resp) => anyhow::bail!("publish refused: {}", resp.status()),
                Err(e) if Instant::now() < end => {
                    eprintln!("publish error (retrying): {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}
