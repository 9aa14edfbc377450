//! What a refused call says: its code, and for `INVALID_ARGUMENT` every wrong field.

use tonic::{Code, Status};
use tonic_types::StatusExt;

/// One wrong field: `field` is its path, e.g. `sentiments[437].ended_at` or, in a live
/// feed, `items[12].started_at` (12 being the item's sequence number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

/// The field violations of `status` (its google.rpc.BadRequest detail); empty when it
/// has none.
pub fn field_violations(status: &Status) -> Vec<FieldViolation> {
    status
        .get_details_bad_request()
        .map(|bad| {
            bad.field_violations
                .into_iter()
                .map(|v| FieldViolation {
                    field: v.field,
                    description: v.description,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the same request may succeed later: the codes of a connection, a replica or
/// the database briefly away, and ABORTED (another stream took a feed over).
pub fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Aborted
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Internal
    )
}
