//! Validated domain types. A value of these types has passed every rule that does not
//! need the database; constructors return the violated rules otherwise.

/// Generates an enum stored as lower-case text, with both directions of the mapping.
macro_rules! stored_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }

            pub fn from_stored(value: &str) -> Option<Self> {
                match value { $($text => Some(Self::$variant),)+ _ => None }
            }
        }
    };
}

mod clock;
mod feed;
mod live;
mod names;
mod session;
mod timeline;
mod user;
mod violation;

pub use clock::*;
pub use feed::*;
pub use live::*;
pub use names::{CountryCode, ExternalId, LanguageTag, TimezoneCode};
pub use session::*;
pub use timeline::*;
pub use user::*;
pub use violation::{FieldViolation, Violations};

/// The C0 control characters and DEL, which no text field takes (the schema's CHECKs
/// refuse them too, where the text is a column of its own).
fn is_control(c: char) -> bool {
    matches!(c, '\u{0}'..='\u{1f}' | '\u{7f}')
}

/// Checks a free-form text field: no control characters (tabs and line breaks included;
/// PostgreSQL text cannot hold NUL at all) and a length in characters within `min..=max`.
pub fn check_text(value: &str, min: usize, max: usize) -> Result<(), String> {
    if let Some((at, c)) = value.chars().enumerate().find(|(_, c)| is_control(*c)) {
        return Err(format!(
            "must not contain control characters (U+0000 to U+001F, U+007F): U+{:04X} at \
             character {}",
            u32::from(c),
            at + 1
        ));
    }
    let length = value.chars().count();
    if length < min {
        return Err(if min == 1 {
            "is required".to_owned()
        } else {
            format!("must be at least {min} characters long")
        });
    }
    if length > max {
        return Err(format!(
            "must be at most {max} characters long, got {length}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_rules() {
        assert!(check_text("ok", 1, 5).is_ok());
        assert_eq!(check_text("", 1, 5), Err("is required".to_owned()));
        assert!(check_text("a\0b", 0, 5).is_err());
        for bad in ["a\tb", "a\nb", "\u{1f}", "x\u{7f}"] {
            assert!(check_text(bad, 0, 5).is_err(), "{bad:?}");
        }
        assert_eq!(
            check_text("ab\rc", 0, 5),
            Err(
                "must not contain control characters (U+0000 to U+001F, U+007F): U+000D at \
                 character 3"
                    .to_owned()
            )
        );
        // Not control characters: other white space, and C1 characters' neighbours.
        assert!(check_text("a b\u{a0}\u{2028}", 0, 5).is_ok());
        assert!(check_text("abcdef", 0, 5).is_err());
        // Lengths count characters, not bytes.
        assert!(check_text("ééééé", 1, 5).is_ok());
    }
}
