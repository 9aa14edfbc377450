//! Protobuf <-> domain conversion. Requests are parsed here, once, into domain values;
//! every problem becomes a field violation naming the field.
//!
//! - [`scalars`]: timestamps, durations, ids;
//! - [`enums`]: enums both ways;
//! - [`requests`]: requests -> domain values and named commands;
//! - [`responses`]: domain values -> responses;
//! - [`stream`]: the framing of client streams;
//! - [`live`]: the messages of live feeds.

mod enums;
mod live;
mod requests;
mod responses;
mod scalars;
mod stream;
mod timeline;

pub use live::{feed_message, feed_reply_to_proto};
pub use requests::*;
pub use responses::*;
pub use scalars::id_field;
pub use stream::{StreamFrame, frame};
pub use timeline::{
    CHUNK_BYTES, GetTimeline, get_timeline, timeline_entry_to_proto, timeline_messages,
    timeline_position_to_proto,
};

use crate::error::FieldViolation;

type Violated<T> = Result<T, Vec<FieldViolation>>;

/// The violations of one item of a stream or feed, each named under `prefix`
/// (`sentiments[41]`, `items[43]`).
fn violations_under(prefix: &str, violations: Vec<FieldViolation>) -> crate::error::Error {
    crate::error::Error::InvalidArgument(violations.into_iter().map(|v| v.under(prefix)).collect())
}
