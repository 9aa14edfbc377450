//! The rules every sentiment or event meets, unary or streamed, that need a
//! participation or the clock.

use chrono::{DateTime, Utc};

use crate::domain::{FeedItem, ItemClock, Participation, SpanEnd};
use crate::error::FieldViolation;

/// Fails unless `item`'s times lie in the window `clock` allows around `now`, naming the
/// item's offending field.
pub(super) fn check_clock<T: FeedItem>(
    clock: &ItemClock,
    now: DateTime<Utc>,
    item: &T,
) -> Result<(), FieldViolation> {
    let (start, end) = item.span();
    if let Some(why) = clock.refuses(now, start) {
        return Err(FieldViolation::new(T::START_FIELD, why));
    }
    match clock.refuses(now, end) {
        Some(why) if end != start => Err(FieldViolation::new(T::END_FIELD, why)),
        _ => Ok(()),
    }
}

/// Both rules of an item whose participation is known (streams, live feeds).
pub(super) fn check_item<T: FeedItem>(
    clock: &ItemClock,
    now: DateTime<Utc>,
    participation: &Participation,
    item: &T,
) -> Result<(), FieldViolation> {
    check_clock(clock, now, item).and_then(|()| check_span(participation, item))
}

/// Fails unless `item` lies inside `participation`, naming the item's offending field.
pub(super) fn check_span<T: FeedItem>(
    participation: &Participation,
    item: &T,
) -> Result<(), FieldViolation> {
    let (start, end) = item.span();
    match participation.refuses_span(start, end) {
        None => Ok(()),
        Some((SpanEnd::Start, why)) => Err(FieldViolation::new(T::START_FIELD, why)),
        Some((SpanEnd::End, why)) => Err(FieldViolation::new(T::END_FIELD, why)),
    }
}
