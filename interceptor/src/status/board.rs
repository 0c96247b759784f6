//! Recent usage by identity (sliding minute, hour and day) and the last rejections, for
//! `interceptor status` and `interceptor top`. Bounded: at most [`MAX_IDENTITIES`] identities (the
//! least recently active one is forgotten first) and [`MAX_REJECTIONS`] rejections.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Identities tracked at once.
pub const MAX_IDENTITIES: usize = 4096;
/// Rejections kept.
pub const MAX_REJECTIONS: usize = 50;

/// Use counted in one time slot.
#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    /// Which slot of time (seconds since the epoch / slot length); 0 = empty.
    index: u64,
    requests: u64,
    tokens: u64,
    cost_usd: f64,
}

/// Slots of one window: `N` slots of `seconds` each, summed over the last `span` slots.
#[derive(Clone, Debug)]
struct Ring<const N: usize> {
    slots: [Slot; N],
}

impl<const N: usize> Ring<N> {
    fn new() -> Self {
        Self {
            slots: [Slot::default(); N],
        }
    }

    fn add(&mut self, index: u64, tokens: u64, cost_usd: f64) {
        let slot = &mut self.slots[(index % N as u64) as usize];
        if slot.index != index {
            *slot = Slot {
                index,
                ..Slot::default()
            };
        }
        slot.requests += 1;
        slot.tokens += tokens;
        slot.cost_usd += cost_usd;
    }

    /// Sum of the slots in `(now - span, now]`.
    fn sum(&self, now: u64, span: u64) -> Totals {
        let mut totals = Totals::default();
        for slot in &self.slots {
            if slot.index != 0 && slot.index <= now && slot.index + span > now {
                totals.requests += slot.requests;
                totals.tokens += slot.tokens;
                totals.cost_usd += slot.cost_usd;
            }
        }
        totals
    }
}

/// Requests, tokens and cost over a window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub requests: u64,
    pub tokens: u64,
    pub cost_usd: f64,
}

/// One identity's use: 10-second slots for the minute, minute slots for the hour, hour slots for the day.
#[derive(Clone, Debug)]
struct Windows {
    seconds: Ring<7>,
    minutes: Ring<61>,
    hours: Ring<25>,
    last_seen: u64,
}

impl Windows {
    fn new() -> Self {
        Self {
            seconds: Ring::new(),
            minutes: Ring::new(),
            hours: Ring::new(),
            last_seen: 0,
        }
    }
}

/// A recent rejection.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecentRejection {
    /// Unix seconds.
    pub at: u64,
    pub identity: String,
    pub provider: String,
    pub model: Option<String>,
    pub rule: Option<String>,
    pub limit: Option<String>,
    pub status: u16,
}

/// One row of a top list.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TopRow {
    pub identity: String,
    #[serde(flatten)]
    pub totals: Totals,
}

/// Top identities by cost (then tokens) over each window.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TopLists {
    pub minute: Vec<TopRow>,
    pub hour: Vec<TopRow>,
    pub day: Vec<TopRow>,
}

/// Recent use and rejections.
#[derive(Default)]
pub struct StatusBoard {
    usage: Mutex<HashMap<String, Windows>>,
    rejections: Mutex<VecDeque<RecentRejection>>,
}

impl StatusBoard {
    /// Counts one finished request of `identity` at `now` (Unix seconds).
    pub fn record(&self, identity: &str, tokens: u64, cost_usd: f64, now: u64) {
        let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        if !usage.contains_key(identity)
            && usage.len() >= MAX_IDENTITIES
            && let Some(oldest) = usage
                .iter()
                .min_by_key(|(_, w)| w.last_seen)
                .map(|(k, _)| k.clone())
        {
            usage.remove(&oldest);
        }
        // A known identity costs no key copy (`entry` takes an owned key).
        let windows = match usage.get_mut(identity) {
            Some(windows) => windows,
            None => usage.entry(identity.to_owned()).or_insert_with(Windows::new),
        };
        windows.seconds.add(now / 10, tokens, cost_usd);
        windows.minutes.add(now / 60, tokens, cost_usd);
        windows.hours.add(now / 3600, tokens, cost_usd);
        windows.last_seen = now;
    }

    /// Keeps a rejection (the oldest goes beyond [`MAX_REJECTIONS`]).
    pub fn rejected(&self, rejection: RecentRejection) {
        let mut rejections = self.rejections.lock().unwrap_or_else(|p| p.into_inner());
        if rejections.len() >= MAX_REJECTIONS {
            rejections.pop_front();
        }
        rejections.push_back(rejection);
    }

    /// The `limit` identities with the highest cost (then tokens) over the last minute, hour and day.
    pub fn top(&self, now: u64, limit: usize) -> TopLists {
        let usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        let list = |totals: &dyn Fn(&Windows) -> Totals| {
            let mut rows: Vec<TopRow> = usage
                .iter()
                .map(|(identity, windows)| TopRow {
                    identity: identity.clone(),
                    totals: totals(windows),
                })
                .filter(|row| row.totals.requests > 0)
                .collect();
            rows.sort_by(|a, b| {
                b.totals
                    .cost_usd
                    .total_cmp(&a.totals.cost_usd)
                    .then(b.totals.tokens.cmp(&a.totals.tokens))
                    .then(a.identity.cmp(&b.identity))
            });
            rows.truncate(limit);
            rows
        };
        TopLists {
            minute: list(&|w| w.seconds.sum(now / 10, 6)),
            hour: list(&|w| w.minutes.sum(now / 60, 60)),
            day: list(&|w| w.hours.sum(now / 3600, 24)),
        }
    }

    /// The kept rejections, newest first.
    pub fn rejections(&self) -> Vec<RecentRejection> {
        let rejections = self.rejections.lock().unwrap_or_else(|p| p.into_inner());
        rejections.iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_slide_and_rank_by_cost() {
        let board = StatusBoard::default();
        let t0 = 1_800_000_000;
        board.record("team-a/Deployment/chat", 100, 0.5, t0);
        board.record("team-b/CronJob/nightly", 1000, 0.1, t0 + 1);
        board.record("team-a/Deployment/chat", 50, 0.25, t0 + 30);
        let top = board.top(t0 + 31, 10);
        assert_eq!(top.minute.len(), 2);
        assert_eq!(top.minute[0].identity, "team-a/Deployment/chat");
        assert_eq!(
            top.minute[0].totals,
            Totals {
                requests: 2,
                tokens: 150,
                cost_usd: 0.75
            }
        );
        // Two minutes later the minute window is empty, the hour and day still count.
        let later = board.top(t0 + 150, 10);
        assert!(later.minute.is_empty());
        assert_eq!(later.hour.len(), 2);
        // Two hours later only the day counts; a day later nothing.
        let hours = board.top(t0 + 2 * 3600, 10);
        assert!(hours.hour.is_empty());
        assert_eq!(hours.day[1].totals.tokens, 1000);
        assert!(board.top(t0 + 25 * 3600, 10).day.is_empty());
    }

    #[test]
    fn identities_and_rejections_are_bounded() {
        let board = StatusBoard::default();
        for i in 0..MAX_IDENTITIES + 10 {
            board.record(&format!("id-{i}"), 1, 0.0, 1_800_000_000 + i as u64);
        }
        assert_eq!(board.usage.lock().map(|u| u.len()).unwrap_or(0), MAX_IDENTITIES);
        assert!(
            board
                .usage
                .lock()
                .map(|u| !u.contains_key("id-0"))
                .unwrap_or(false),
            "oldest forgotten"
        );
        for i in 0..MAX_REJECTIONS + 5 {
            board.rejected(RecentRejection {
                at: i as u64,
                identity: "x".into(),
                provider: "openai".into(),
                model: None,
                rule: Some("r".into()),
                limit: None,
                status: 429,
            });
        }
        let kept = board.rejections();
        assert_eq!(kept.len(), MAX_REJECTIONS);
        assert_eq!(kept[0].at, (MAX_REJECTIONS + 4) as u64, "newest first");
    }
}
