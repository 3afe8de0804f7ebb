//! Store ids: the one name a tenant's workspace has, and the only tenant-chosen string that
//! ever becomes part of a path (after it has been validated here).

use std::fmt;
use std::str::FromStr;

/// The rule every store id must follow, quoted in error messages.
pub const STORE_ID_RULE: &str = "a store id is 3 to 64 characters: a letter or digit first, then letters, digits, '_' or '-' (^[a-zA-Z0-9][a-zA-Z0-9_-]{2,63}$)";

/// A validated store id (`^[a-zA-Z0-9][a-zA-Z0-9_-]{2,63}$`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreId(String);

/// A string that is not a valid store id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid store id {given:?}: {rule}", rule = STORE_ID_RULE)]
pub struct InvalidStoreId {
    /// What was given (cut to 80 characters so a huge input does not flood logs).
    pub given: String,
}

impl StoreId {
    /// Validates `id` against the store id rule.
    pub fn new(id: &str) -> Result<Self, InvalidStoreId> {
        let bytes = id.as_bytes();
        let valid_len = (3..=64).contains(&bytes.len());
        let valid_first = bytes.first().is_some_and(u8::is_ascii_alphanumeric);
        let valid_rest = bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-');
        if valid_len && valid_first && valid_rest {
            Ok(Self(id.to_owned()))
        } else {
            Err(InvalidStoreId {
                given: id.chars().take(80).collect(),
            })
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for StoreId {
    type Err = InvalidStoreId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for StoreId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StoreId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreId({})", self.0)
    }
}

impl serde::Serialize for StoreId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for StoreId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        StoreId::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ids_that_follow_the_rule() {
        for id in ["abc", "ws-123", "A_b-c", "0ab", &"a".repeat(64)] {
            assert!(StoreId::new(id).is_ok(), "{id} should be valid");
        }
    }

    #[test]
    fn refuses_ids_that_could_become_paths_or_break_the_rule() {
        for id in [
            "",
            "ab",
            "../etc",
            "a/b/c",
            "-abc",
            "_abc",
            "abc.db",
            "a b c",
            "ábc",
            "..",
            &"a".repeat(65),
        ] {
            let err = StoreId::new(id).unwrap_err();
            assert!(err.to_string().contains("3 to 64 characters"), "{err}");
        }
    }
}
