//! Scalars of requests: timestamps, durations, ids.

use chrono::{DateTime, TimeDelta, Utc};
use uuid::Uuid;

use crate::error::Error;

/// The protobuf Timestamp range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
pub(super) const MIN_SECONDS: i64 = -62_135_596_800;
pub(super) const MAX_SECONDS: i64 = 253_402_300_799;

/// A required Timestamp, truncated to the microseconds PostgreSQL stores.
pub fn timestamp(value: Option<&prost_types::Timestamp>) -> Result<DateTime<Utc>, String> {
    let ts = value.ok_or_else(|| "is required".to_owned())?;
    if !(MIN_SECONDS..=MAX_SECONDS).contains(&ts.seconds) {
        return Err("must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z".to_owned());
    }
    let nanos = u32::try_from(ts.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or_else(|| format!("has nanos {} outside 0..=999999999", ts.nanos))?;
    DateTime::from_timestamp(ts.seconds, nanos - nanos % 1_000)
        .ok_or_else(|| "is not a valid time".to_owned())
}

/// A required Duration, truncated to microseconds. Negative durations are refused.
pub fn duration(value: Option<&prost_types::Duration>) -> Result<TimeDelta, String> {
    let d = value.ok_or_else(|| "is required".to_owned())?;
    let delta = signed_duration(d)?;
    if delta < TimeDelta::zero() {
        return Err("must not be negative".to_owned());
    }
    Ok(delta)
}

pub(super) fn signed_duration(d: &prost_types::Duration) -> Result<TimeDelta, String> {
    const MAX_DURATION_SECONDS: i64 = 315_576_000_000;
    if d.seconds.abs() > MAX_DURATION_SECONDS || d.nanos.abs() >= 1_000_000_000 {
        return Err("is out of the protobuf Duration range".to_owned());
    }
    if (d.seconds > 0 && d.nanos < 0) || (d.seconds < 0 && d.nanos > 0) {
        return Err("has seconds and nanos of different signs".to_owned());
    }
    let micros = i64::from(d.nanos / 1_000);
    TimeDelta::try_seconds(d.seconds)
        .and_then(|s| s.checked_add(&TimeDelta::microseconds(micros)))
        .ok_or_else(|| "is out of range".to_owned())
}

pub(super) fn signed_duration_required(
    value: Option<&prost_types::Duration>,
) -> Result<TimeDelta, String> {
    signed_duration(value.ok_or_else(|| "is required".to_owned())?)
}

pub fn uuid(value: &str) -> Result<Uuid, String> {
    if value.is_empty() {
        return Err("is required".to_owned());
    }
    Uuid::try_parse(value).map_err(|_| format!("must be a UUID, got {:?}", truncated(value)))
}

fn truncated(value: &str) -> String {
    value.chars().take(64).collect()
}

/// Parses one id field of a request.
pub fn id_field(field: &str, value: &str) -> Result<Uuid, Error> {
    uuid(value).map_err(|why| Error::invalid(field, why))
}

/// An optional request id: empty means none.
pub(super) fn request_id(value: &str) -> Result<Option<Uuid>, String> {
    if value.is_empty() {
        Ok(None)
    } else {
        uuid(value).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{to_duration, to_timestamp};

    #[test]
    fn timestamps_are_range_checked_and_truncated() {
        let ts = |seconds, nanos| prost_types::Timestamp { seconds, nanos };
        assert_eq!(timestamp(None), Err("is required".to_owned()));
        assert!(timestamp(Some(&ts(MAX_SECONDS + 1, 0))).is_err());
        assert!(timestamp(Some(&ts(0, -1))).is_err());
        assert!(timestamp(Some(&ts(0, 1_000_000_000))).is_err());
        let t = timestamp(Some(&ts(1, 123_456_789))).unwrap_or_default();
        assert_eq!(t.timestamp_subsec_nanos(), 123_456_000);
        assert_eq!(to_timestamp(t), ts(1, 123_456_000));
    }

    #[test]
    fn durations_round_trip() {
        let d = prost_types::Duration {
            seconds: 90,
            nanos: 500_000_000,
        };
        let delta = duration(Some(&d)).unwrap_or_default();
        assert_eq!(to_duration(delta), d);
        assert!(
            duration(Some(&prost_types::Duration {
                seconds: -1,
                nanos: 0
            }))
            .is_err()
        );
        assert!(
            duration(Some(&prost_types::Duration {
                seconds: 1,
                nanos: -1
            }))
            .is_err()
        );
        let negative = prost_types::Duration {
            seconds: -18000,
            nanos: 0,
        };
        assert_eq!(
            to_duration(signed_duration(&negative).unwrap_or_default()),
            negative
        );
    }
}
