use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{CountryCode, ExternalId, LanguageTag, TimezoneCode, check_text};

/// A user to create. External ids are unique (enforced by the schema).
#[derive(Debug, Clone, PartialEq)]
pub struct NewUser {
    pub external_id: ExternalId,
    pub country: Option<CountryCode>,
    pub native_language: Option<LanguageTag>,
    pub region: Option<String>,
}

impl NewUser {
    /// Free-form region; empty means unknown.
    pub fn parse_region(value: &str) -> Result<Option<String>, String> {
        if value.is_empty() {
            return Ok(None);
        }
        check_text(value, 1, 200)?;
        Ok(Some(value.to_owned()))
    }
}

/// A stored user.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub id: Uuid,
    pub external_id: ExternalId,
    pub country: Option<CountryCode>,
    pub native_language: Option<LanguageTag>,
    pub region: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A timezone participants report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timezone {
    pub code: TimezoneCode,
    pub utc_offset_seconds: i32,
}

impl Timezone {
    pub const MIN_OFFSET_SECONDS: i64 = -12 * 3600;
    pub const MAX_OFFSET_SECONDS: i64 = 14 * 3600;

    pub fn parse_offset(seconds: i64) -> Result<i32, String> {
        if !(Self::MIN_OFFSET_SECONDS..=Self::MAX_OFFSET_SECONDS).contains(&seconds) {
            return Err("must be between -12h and +14h".to_owned());
        }
        if seconds % 60 != 0 {
            return Err("must be a whole number of minutes".to_owned());
        }
        i32::try_from(seconds).map_err(|_| "must be between -12h and +14h".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timezone_fields() {
        assert_eq!(Timezone::parse_offset(-5 * 3600), Ok(-18000));
        assert_eq!(Timezone::parse_offset(20700), Ok(20700)); // +05:45
        assert!(Timezone::parse_offset(15 * 3600).is_err());
        assert!(Timezone::parse_offset(61).is_err());
    }
}
