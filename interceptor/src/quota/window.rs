//! Window arithmetic. Rates (per minute, per hour) are token buckets on the monotonic clock: a
//! bucket holds up to the limit and refills continuously, so a wall-clock jump changes nothing.
//! Budgets (per day, per month) are calendar windows in UTC: they reset when the date moves
//! forward; a clock that jumps back never resets them again. Reservations are taken before a
//! request is forwarded and replaced by the real usage when it ends; levels may go below zero
//! (debt) when a request used more than it reserved, which delays the next requests instead of
//! losing the overshoot.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A token bucket: `capacity` per `period`.
#[derive(Clone, Debug)]
pub struct Bucket {
    capacity: f64,
    per_second: f64,
    level: f64,
    updated: Instant,
}

impl Bucket {
    pub fn new(capacity: f64, period: Duration, now: Instant) -> Self {
        Self {
            capacity,
            per_second: capacity / period.as_secs_f64(),
            level: capacity,
            updated: now,
        }
    }

    /// Applies a changed limit (a policy reload), keeping what was used.
    pub fn set_capacity(&mut self, capacity: f64, period: Duration, now: Instant) {
        if (capacity - self.capacity).abs() > f64::EPSILON {
            self.refill(now);
            let used = self.capacity - self.level;
            self.capacity = capacity;
            self.per_second = capacity / period.as_secs_f64();
            self.level = capacity - used;
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * self.per_second).min(self.capacity);
        self.updated = now;
    }

    /// `Ok` when `amount` fits now (a request larger than the whole capacity fits a full bucket),
    /// else how long until it would.
    pub fn check(&mut self, amount: f64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        let needed = amount.min(self.capacity);
        if self.level >= needed {
            Ok(())
        } else {
            Err(Duration::from_secs_f64((needed - self.level) / self.per_second))
        }
    }

    /// Takes `amount` (after a successful check, or unconditionally in observe mode).
    pub fn take(&mut self, amount: f64, now: Instant) {
        self.refill(now);
        self.level -= amount;
    }

    /// Replaces a reservation by the real amount.
    pub fn settle(&mut self, reserved: f64, actual: f64, now: Instant) {
        self.refill(now);
        self.level = (self.level + reserved - actual).min(self.capacity);
    }

    pub fn capacity(&self) -> f64 {
        self.capacity
    }

    pub fn remaining(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.level.max(0.0)
    }

    /// Time until the bucket is full again.
    pub fn reset_after(&mut self, now: Instant) -> Duration {
        self.refill(now);
        Duration::from_secs_f64(((self.capacity - self.level) / self.per_second).max(0.0))
    }
}

/// A calendar window in UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Calendar {
    Day,
    Month,
}

impl Calendar {
    /// The window containing `unix_seconds` (days since the epoch, or months since January 1970),
    /// and the seconds until the next one starts.
    pub fn window(self, unix_seconds: u64) -> (u64, u64) {
        let days = unix_seconds / 86_400;
        match self {
            Calendar::Day => (days, 86_400 - unix_seconds % 86_400),
            Calendar::Month => {
                let (year, month, _) = civil_from_days(days as i64);
                let index = (year as u64 - 1970) * 12 + (month as u64 - 1);
                let (next_year, next_month) = if month == 12 {
                    (year + 1, 1)
                } else {
                    (year, month + 1)
                };
                let next_start = days_from_civil(next_year, next_month, 1) as u64 * 86_400;
                (index, next_start.saturating_sub(unix_seconds))
            }
        }
    }
}

/// Howard Hinnant's `civil_from_days`: (year, month 1-12, day 1-31) of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Howard Hinnant's `days_from_civil`.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let month = i64::from(month);
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Wall-clock seconds since the epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A budget over calendar windows: used + reserved never exceeds the limit at admission.
#[derive(Clone, Debug)]
pub struct Budget {
    calendar: Calendar,
    limit: f64,
    window: u64,
    used: f64,
    reserved: f64,
    /// Use settled here and not yet pushed to the cluster-wide store.
    unsynced: f64,
}

impl Budget {
    pub fn new(calendar: Calendar, limit: f64, unix_seconds: u64) -> Self {
        Self {
            calendar,
            limit,
            window: calendar.window(unix_seconds).0,
            used: 0.0,
            reserved: 0.0,
            unsynced: 0.0,
        }
    }

    pub fn set_limit(&mut self, limit: f64) {
        self.limit = limit;
    }

    /// A later window starts from zero; an earlier one (the clock went back) changes nothing.
    fn roll(&mut self, unix_seconds: u64) -> u64 {
        let (window, until_next) = self.calendar.window(unix_seconds);
        if window > self.window {
            self.window = window;
            self.used = 0.0;
            self.unsynced = 0.0;
        }
        until_next
    }

    /// `Ok` when `amount` fits the rest of the window, else the time until the next window. A budget
    /// with nothing used or reserved admits one request whatever its estimate.
    pub fn check(&mut self, amount: f64, unix_seconds: u64) -> Result<(), Duration> {
        let until_next = self.roll(unix_seconds);
        let committed = self.used + self.reserved;
        if committed + amount <= self.limit || committed <= 0.0 && self.used < self.limit {
            Ok(())
        } else {
            Err(Duration::from_secs(until_next.max(1)))
        }
    }

    pub fn reserve(&mut self, amount: f64, unix_seconds: u64) {
        self.roll(unix_seconds);
        self.reserved += amount;
    }

    /// Replaces a reservation by the real amount (counted in the current window).
    pub fn settle(&mut self, reserved: f64, actual: f64, unix_seconds: u64) {
        self.roll(unix_seconds);
        self.reserved = (self.reserved - reserved).max(0.0);
        self.used += actual;
        self.unsynced += actual;
    }

    /// Takes the use not yet pushed to the cluster-wide store (rolling the window first).
    pub fn take_unsynced(&mut self, unix_seconds: u64) -> f64 {
        self.roll(unix_seconds);
        std::mem::take(&mut self.unsynced)
    }

    /// Gives back use whose push failed.
    pub fn return_unsynced(&mut self, window: u64, amount: f64) {
        if window == self.window {
            self.unsynced += amount;
        }
    }

    /// The cluster-wide use of `window` (every node's, this one's pushes included): what this node
    /// settled since the push is added on top.
    pub fn set_cluster_used(&mut self, window: u64, total: f64) {
        if window == self.window {
            self.used = total + self.unsynced;
        }
    }

    pub fn used(&self) -> f64 {
        self.used
    }

    /// Whether a request that reserved `reserved` and has now consumed `live` takes the budget over
    /// its limit (with every other reservation still counted).
    pub fn crossed_by(&self, reserved: f64, live: f64) -> bool {
        self.used + (self.reserved - reserved).max(0.0) + live > self.limit
    }

    pub fn limit(&self) -> f64 {
        self.limit
    }

    pub fn remaining(&self) -> f64 {
        (self.limit - self.used - self.reserved).max(0.0)
    }

    /// Restores a used amount (from the durable store).
    pub fn restore(&mut self, window: u64, used: f64) {
        if window == self.window {
            self.used = self.used.max(used);
        }
    }

    pub fn window(&self) -> u64 {
        self.window
    }

    /// Use in the window holding `unix_seconds` (0 when the budget's window has ended).
    pub fn used_at(&self, unix_seconds: u64) -> f64 {
        if self.calendar.window(unix_seconds).0 > self.window {
            0.0
        } else {
            self.used
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refills_continuously_and_says_when() {
        let start = Instant::now();
        let mut bucket = Bucket::new(6.0, Duration::from_secs(60), start);
        for _ in 0..6 {
            bucket.check(1.0, start).expect("fits");
            bucket.take(1.0, start);
        }
        let wait = bucket.check(1.0, start).expect_err("empty");
        assert_eq!(wait, Duration::from_secs(10), "one request refills in 60/6 s");
        assert!(bucket.check(1.0, start + Duration::from_secs(10)).is_ok());
        assert!(
            bucket.remaining(start + Duration::from_secs(600)) <= 6.0,
            "never above capacity"
        );
    }

    #[test]
    fn a_request_larger_than_the_bucket_fits_only_a_full_one_and_leaves_debt() {
        let start = Instant::now();
        let mut bucket = Bucket::new(100.0, Duration::from_secs(60), start);
        assert!(bucket.check(250.0, start).is_ok());
        bucket.take(250.0, start);
        assert_eq!(bucket.remaining(start), 0.0);
        // 150 of debt plus 100 to be full again: 150 s at 100/60 per second.
        assert_eq!(bucket.reset_after(start), Duration::from_secs(150));
        let wait = bucket.check(1.0, start).expect_err("in debt");
        assert!(
            wait > Duration::from_secs(89) && wait < Duration::from_secs(91),
            "{wait:?}"
        );
    }

    #[test]
    fn settling_replaces_the_reservation() {
        let start = Instant::now();
        let mut bucket = Bucket::new(1000.0, Duration::from_secs(60), start);
        bucket.take(600.0, start);
        bucket.settle(600.0, 100.0, start);
        assert_eq!(bucket.remaining(start), 900.0);
        bucket.take(900.0, start);
        bucket.settle(900.0, 1500.0, start);
        assert_eq!(bucket.remaining(start), 0.0, "overshoot is debt");
        assert!(bucket.check(1.0, start).is_err());
    }

    #[test]
    fn a_changed_limit_keeps_what_was_used() {
        let start = Instant::now();
        let mut bucket = Bucket::new(10.0, Duration::from_secs(60), start);
        bucket.take(10.0, start);
        assert!(bucket.check(1.0, start).is_err());
        bucket.set_capacity(20.0, Duration::from_secs(60), start);
        assert_eq!(bucket.remaining(start), 10.0);
        assert!(bucket.check(1.0, start).is_ok());
    }

    #[test]
    fn calendar_windows_and_their_ends() {
        // 2026-11-24T23:59:59Z
        let t = 1_795_564_799;
        let (day, left) = Calendar::Day.window(t);
        assert_eq!((day, left), (t / 86_400, 1));
        let (month, left) = Calendar::Month.window(t);
        assert_eq!(month, (2026 - 1970) * 12 + 10, "November 2026");
        assert_eq!(left, 6 * 86_400 + 1, "until 2026-12-01T00:00:00Z");
        // December rolls into January of the next year.
        let december = 1_796_083_200; // 2026-12-01T00:00:00Z
        let (index, left) = Calendar::Month.window(december);
        assert_eq!(index, (2026 - 1970) * 12 + 11);
        assert_eq!(left, 31 * 86_400);
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
    }

    #[test]
    fn budgets_reset_forward_never_backward() {
        let day = 1_795_478_400; // 2026-11-24T00:00:00Z
        let mut budget = Budget::new(Calendar::Day, 100.0, day + 10);
        budget.reserve(60.0, day + 10);
        budget.settle(60.0, 80.0, day + 20);
        assert_eq!(
            budget.check(30.0, day + 30),
            Err(Duration::from_secs(86_400 - 30))
        );
        assert!(budget.check(20.0, day + 30).is_ok());
        // The clock jumps back a day: no reset.
        assert!(budget.check(30.0, day - 86_400).is_err());
        assert_eq!(budget.used(), 80.0);
        // The next day: a fresh window.
        assert!(budget.check(30.0, day + 86_400).is_ok());
        assert_eq!(budget.used(), 0.0);
    }

    #[test]
    fn concurrent_reservations_never_overspend_beyond_one_estimate_error() {
        // 50 requests estimated at 10 race for a budget of 100: exactly 10 are admitted; even if each
        // then uses twice its estimate, the overshoot is bounded by the admitted requests' error.
        let day = 1_795_478_400;
        let mut budget = Budget::new(Calendar::Day, 100.0, day);
        let mut admitted = 0;
        for _ in 0..50 {
            if budget.check(10.0, day).is_ok() {
                budget.reserve(10.0, day);
                admitted += 1;
            }
        }
        assert_eq!(admitted, 10);
        for _ in 0..admitted {
            budget.settle(10.0, 10.0, day);
        }
        assert_eq!(budget.used(), 100.0);
        assert!(budget.check(1.0, day).is_err());
    }

    #[test]
    fn cluster_totals_replace_local_use_and_keep_what_is_unsynced() {
        let day = 1_795_478_400;
        let mut budget = Budget::new(Calendar::Day, 100.0, day);
        budget.settle(0.0, 10.0, day);
        let pushed = budget.take_unsynced(day);
        assert_eq!(pushed, 10.0);
        budget.settle(0.0, 5.0, day); // settled while the push was in flight
        budget.set_cluster_used(budget.window(), 70.0); // 10 of ours + 60 of other nodes
        assert_eq!(budget.used(), 75.0);
        assert!(budget.check(30.0, day).is_err());
        budget.return_unsynced(budget.window(), 0.0);
        assert_eq!(budget.take_unsynced(day), 5.0);
    }

    #[test]
    fn an_empty_budget_admits_one_request_larger_than_itself() {
        let day = 1_795_478_400;
        let mut budget = Budget::new(Calendar::Day, 5.0, day);
        assert!(budget.check(50.0, day).is_ok());
        budget.reserve(50.0, day);
        assert!(budget.check(1.0, day).is_err(), "not a second one");
    }
}
