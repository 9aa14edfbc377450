//! Text values with a rule: a value of these types has passed it. Their field is private,
//! so the only ways to get one are `parse` (a client's input) and, inside the crate,
//! `from_stored` (a value the database holds under the same rule, as a CHECK).

use std::fmt;

use super::check_text;

macro_rules! ruled_text {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }

            /// A value read back from the database, where the same rule is a CHECK.
            pub(crate) fn from_stored(value: String) -> Self {
                Self(value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

ruled_text!(
    /// The calling system's id of a user: 1 to 200 characters, no control characters, no
    /// white space at either end. Unique (the schema enforces it).
    ExternalId
);

impl ExternalId {
    pub fn parse(value: &str) -> Result<Self, String> {
        check_text(value, 1, 200)?;
        if value.trim() != value {
            return Err("must not start or end with white space".to_owned());
        }
        Ok(Self(value.to_owned()))
    }
}

ruled_text!(
    /// An ISO 3166-1 alpha-2 country code in upper case.
    CountryCode
);

impl CountryCode {
    /// Empty means unknown.
    pub fn parse(value: &str) -> Result<Option<Self>, String> {
        if value.is_empty() {
            return Ok(None);
        }
        if value.len() == 2 && value.bytes().all(|b| b.is_ascii_uppercase()) {
            Ok(Some(Self(value.to_owned())))
        } else {
            Err(format!(
                "must be an ISO 3166-1 alpha-2 code in upper case such as \"US\", got {value:?}"
            ))
        }
    }
}

ruled_text!(
    /// A BCP 47 language tag: a primary language and optional subtags.
    LanguageTag
);

impl LanguageTag {
    /// Empty means unknown.
    pub fn parse(value: &str) -> Result<Option<Self>, String> {
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
            Ok(Some(Self(value.to_owned())))
        } else {
            Err(format!(
                "must be a BCP 47 language tag such as \"en\" or \"pt-BR\", got {value:?}"
            ))
        }
    }
}

ruled_text!(
    /// A timezone's code: an IANA name or an abbreviation, 1 to 64 letters, digits, '/',
    /// '_', '+' or '-'.
    TimezoneCode
);

impl TimezoneCode {
    pub fn parse(value: &str) -> Result<Self, String> {
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
        Ok(Self(value.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_fields() {
        assert_eq!(CountryCode::parse(""), Ok(None));
        assert_eq!(
            CountryCode::parse("AM").map(|c| c.map(CountryCode::into_string)),
            Ok(Some("AM".into()))
        );
        assert!(CountryCode::parse("am").is_err());
        assert!(CountryCode::parse("USA").is_err());
        assert!(LanguageTag::parse("pt-BR").is_ok_and(|t| t.is_some()));
        assert!(LanguageTag::parse("e").is_err());
        assert!(LanguageTag::parse("en--US").is_err());
        assert!(ExternalId::parse(" x").is_err());
        assert!(ExternalId::parse("").is_err());
    }

    #[test]
    fn timezone_codes() {
        assert!(TimezoneCode::parse("America/New_York").is_ok());
        assert!(TimezoneCode::parse("Etc/GMT+5").is_ok());
        assert!(TimezoneCode::parse("New York").is_err());
    }
}
