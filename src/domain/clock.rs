//! How far from the server's clock an item's time may lie.
//!
//! Items are stored in partitions by their time (docs/SCALING.md). An item dated far in
//! the future (a device with a wrong clock) would land outside every partition made so
//! far; one older than the retention would be dropped at the next maintenance. Both are
//! refused at ingest, naming the item's field.

use chrono::{DateTime, TimeDelta, Utc};

/// The window around the server's clock that item times must fall in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemClock {
    /// How far ahead of the server's clock an item may be (devices' clocks are skewed).
    pub max_future: TimeDelta,
    /// How far behind it an item may be; `None`: any age.
    pub max_age: Option<TimeDelta>,
}

impl ItemClock {
    /// The default: 15 minutes ahead (well above the skew of real devices' clocks, far
    /// below a partition), any age.
    pub const DEFAULT_MAX_FUTURE_SECONDS: u64 = 15 * 60;

    /// Why `at` cannot be an item's time when the server's clock says `now`, if it cannot.
    pub fn refuses(&self, now: DateTime<Utc>, at: DateTime<Utc>) -> Option<String> {
        if at > now + self.max_future {
            return Some(format!(
                "is {} ahead of the server's clock ({now}); items may be at most {} in the \
                 future: check the sender's clock",
                human(at - now),
                human(self.max_future)
            ));
        }
        match self.max_age {
            Some(max_age) if at < now - max_age => Some(format!(
                "is {} old; items may be at most {} old (the server's retention or \
                 --max-item-age-seconds)",
                human(now - at),
                human(max_age)
            )),
            _ => None,
        }
    }
}

impl Default for ItemClock {
    fn default() -> Self {
        Self {
            max_future: TimeDelta::seconds(Self::DEFAULT_MAX_FUTURE_SECONDS as i64),
            max_age: None,
        }
    }
}

/// A duration as a person reads it, in its largest unit to a tenth: "6 days", "2.5 h",
/// "15 min", "42 s".
fn human(delta: TimeDelta) -> String {
    let seconds = delta.num_milliseconds().max(0) as f64 / 1000.0;
    let (value, unit) = [(86_400.0, "days"), (3600.0, "h"), (60.0, "min")]
        .into_iter()
        .find(|(size, _)| seconds >= *size)
        .map_or((seconds, "s"), |(size, unit)| (seconds / size, unit));
    let shown = format!("{value:.1}");
    format!("{} {unit}", shown.strip_suffix(".0").unwrap_or(&shown))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default()
    }

    #[test]
    fn the_future_is_bounded_by_the_skew() {
        let clock = ItemClock::default();
        assert!(
            clock
                .refuses(now(), now() + TimeDelta::minutes(15))
                .is_none()
        );
        let why = clock
            .refuses(now(), now() + TimeDelta::days(6))
            .unwrap_or_default();
        assert!(why.contains("6 days ahead"), "{why}");
        assert!(why.contains("at most 15 min in the future"), "{why}");
        // Any age by default.
        assert!(
            clock
                .refuses(now(), now() - TimeDelta::days(3650))
                .is_none()
        );
    }

    #[test]
    fn the_past_is_bounded_by_the_age_when_set() {
        let clock = ItemClock {
            max_age: Some(TimeDelta::days(30)),
            ..ItemClock::default()
        };
        assert!(clock.refuses(now(), now() - TimeDelta::days(30)).is_none());
        let why = clock
            .refuses(now(), now() - TimeDelta::days(31))
            .unwrap_or_default();
        assert!(why.contains("31 days old"), "{why}");
    }

    #[test]
    fn durations_read_in_their_largest_unit() {
        assert_eq!(human(TimeDelta::seconds(6 * 86_400 - 1)), "6 days");
        assert_eq!(human(TimeDelta::minutes(150)), "2.5 h");
        assert_eq!(human(TimeDelta::minutes(15)), "15 min");
        assert_eq!(human(TimeDelta::milliseconds(42_400)), "42.4 s");
    }
}
