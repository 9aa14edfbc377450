use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::check_text;

/// A user to create. External ids are unique (enforced by the schema).
#[derive(Debug, Clone, PartialEq)]
pub struct NewUser {
    pub external_id: String,
    pub country: Option<String>,
    pub native_language: Option<String>,
    pub region: Option<String>,
}

impl NewUser {
    pub fn parse_external_id(value: &str) -> Result<String, String> {
        check_text(value, 1, 200)?;
        if value.trim() != value {
            return Err("must not start or end with white space".to_owned());
        }
        Ok(value.to_owned())
    }

    /// An ISO 3166-1 alpha-2 code; empty means unknown.
    pub fn parse_country(value: &str) -> Result<Option<String>, String> {
        if value.is_empty() {
            return Ok(None);
        }
        if value.len() == 2 && value.bytes().all(|b| b.is_ascii_uppercase()) {
            Ok(Some(value.to_owned()))
        } else {
            Err(format!(
                "must be an ISO 3166-1 alpha-2 code in upper case such as \"US\", got {value:?}"
            ))
        }
    }

    /// A BCP 47 language tag (primary language and optional subtags); empty means unknown.
    pub fn parse_language(value: &str) -> Result<Option<String>, String> {
        if value.is_empty() {
            return Ok(None);
        }
        let mut parts = value.split('-');
        let primary_ok = parts.next().is_some_and(|p| {
            (2..=8).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphabetic())
        });
        let rest_ok = parts
            .all(|p| (1..=8).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric()));
        if primary_ok && rest_ok {
            Ok(Some(value.to_owned()))
        } else {
            Err(format!(
                "must be a BCP 47 language tag such as \"en\" or \"pt-BR\", got {value:?}"
            ))
        }
    }

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
    pub external_id: String,
    pub country: Option<String>,
    pub native_language: Option<String>,
    pub region: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A timezone participants report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timezone {
    pub code: String,
    pub utc_offset_seconds: i32,
}

impl Timezone {
    pub const MIN_OFFSET_SECONDS: i64 = -12 * 3600;
    pub const MAX_OFFSET_SECONDS: i64 = 14 * 3600;

    pub fn parse_code(value: &str) -> Result<String, String> {
        let valid_char = |c: char| c.is_ascii_alphanumeric() || "/_+-".contains(c);
        if value.is_empty() {
            return Err("is required".to_owned());
        }
        if value.len() > 64 || !value.chars().all(valid_char) {
            return Err(format!(
                "must be 1 to 64 letters, digits, '/', '_', '+' or '-' (an IANA name such as \
                 \"America/New_York\" or an abbreviation such as \"EST\"), got {value:?}"
            ));
        }
        Ok(value.to_owned())
    }

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
    fn user_fields() {
        assert_eq!(NewUser::parse_country(""), Ok(None));
        assert_eq!(NewUser::parse_country("AM"), Ok(Some("AM".into())));
        assert!(NewUser::parse_country("am").is_err());
        assert!(NewUser::parse_country("USA").is_err());
        assert_eq!(NewUser::parse_language("pt-BR"), Ok(Some("pt-BR".into())));
        assert!(NewUser::parse_language("e").is_err());
        assert!(NewUser::parse_language("en--US").is_err());
        assert!(NewUser::parse_external_id(" x").is_err());
        assert!(NewUser::parse_external_id("").is_err());
    }

    #[test]
    fn timezone_fields() {
        assert!(Timezone::parse_code("America/New_York").is_ok());
        assert!(Timezone::parse_code("Etc/GMT+5").is_ok());
        assert!(Timezone::parse_code("New York").is_err());
        assert_eq!(Timezone::parse_offset(-5 * 3600), Ok(-18000));
        assert_eq!(Timezone::parse_offset(20700), Ok(20700)); // +05:45
        assert!(Timezone::parse_offset(15 * 3600).is_err());
        assert!(Timezone::parse_offset(61).is_err());
    }
}
