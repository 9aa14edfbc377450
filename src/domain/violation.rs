//! Violated rules about fields of a request: what the domain's parsers report, and what
//! a client receives in a `google.rpc.BadRequest` (`crate::error` turns them into one).

use std::fmt;

/// A violated rule about one field of a request, reported in a `google.rpc.BadRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the field, e.g. `sentiment.ended_at` or `sentiments[41].score`.
    pub field: String,
    /// What is wrong, in words a client author understands.
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }

    /// The same violation, for a field nested under `prefix`.
    pub fn under(self, prefix: &str) -> Self {
        Self {
            field: format!("{prefix}.{}", self.field),
            description: self.description,
        }
    }
}

impl fmt::Display for FieldViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.description)
    }
}

/// Collects field violations so that a client learns about all of them at once.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    /// Keeps the value of `result`, or records its violations under `prefix`.
    pub fn take<T>(&mut self, prefix: &str, result: Result<T, Vec<FieldViolation>>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(violations) => {
                self.0
                    .extend(violations.into_iter().map(|v| v.under(prefix)));
                None
            }
        }
    }

    /// Records the error of `result` as a violation of `field`.
    pub fn check<T>(&mut self, field: &str, result: Result<T, String>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(description) => {
                self.add(field, description);
                None
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_vec(self) -> Vec<FieldViolation> {
        self.0
    }

    /// `Ok(value)` when nothing was violated (the value is then always present).
    pub fn finish<T>(self, value: Option<T>) -> Result<T, Vec<FieldViolation>> {
        match value {
            Some(value) if self.0.is_empty() => Ok(value),
            _ if self.0.is_empty() => Err(vec![FieldViolation::new(
                "",
                "the request could not be read",
            )]),
            _ => Err(self.0),
        }
    }
}
