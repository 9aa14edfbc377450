//! chrono -> protobuf time, for responses and for clients building requests. (The other
//! way, with the checks a server makes, is `grpc::convert`.)

use chrono::{DateTime, TimeDelta, Utc};

/// A Timestamp of `value` (to the nanosecond it has).
pub fn to_timestamp(value: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: value.timestamp(),
        // Always below 2e9: a leap second is at most 1,999,999,999 ns.
        nanos: i32::try_from(value.timestamp_subsec_nanos()).unwrap_or(i32::MAX),
    }
}

/// A Duration of `value`.
pub fn to_duration(value: TimeDelta) -> prost_types::Duration {
    let seconds = value.num_seconds();
    let nanos = value.subsec_nanos();
    prost_types::Duration { seconds, nanos }
}
