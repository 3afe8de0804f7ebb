//! Byte sizes in the config: an integer number of bytes, or a string with a unit such as
//! `"64MiB"`, `"512KiB"`, `"1GiB"` (1024-based) or `"10MB"` (1000-based).

use std::fmt;

use serde::de::{self, Deserializer, Unexpected, Visitor};

/// The forms a size accepts, quoted in every size error.
pub const SIZE_FORMS: &str = "an integer number of bytes (65536) or a string with a unit: \
\"512KiB\", \"64MiB\", \"1GiB\", \"1TiB\" (1024-based), \"10KB\", \"10MB\", \"1GB\", \"1TB\" \
(1000-based) or \"4096B\"";

/// A size string that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {given:?}: {reason}; expected {SIZE_FORMS}")]
pub struct InvalidSize {
    /// What was given (cut to 80 characters).
    pub given: String,
    /// Why it was refused.
    pub reason: &'static str,
}

/// Units a size string may end with, and their multipliers. Matched case-insensitively.
const UNITS: &[(&str, u64)] = &[
    ("b", 1),
    ("kb", 1_000),
    ("mb", 1_000_000),
    ("gb", 1_000_000_000),
    ("tb", 1_000_000_000_000),
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
    ("tib", 1 << 40),
];

/// Parses a size string (`"64MiB"`, `"10MB"`, `"4096"`, `"4096B"`) into bytes.
pub fn parse_size(text: &str) -> Result<u64, InvalidSize> {
    let refuse = |reason| InvalidSize {
        given: text.chars().take(80).collect(),
        reason,
    };
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits_end);
    if number.is_empty() {
        return Err(refuse("it does not start with a whole number"));
    }
    let unit = unit.trim_start().to_ascii_lowercase();
    let multiplier = if unit.is_empty() {
        1
    } else {
        UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, multiplier)| *multiplier)
            .ok_or_else(|| refuse("unknown unit (fractions are not accepted either)"))?
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| refuse("it does not fit in 64 bits"))
}

/// Serde visitor for a size given as an integer or a string.
struct SizeVisitor;

impl Visitor<'_> for SizeVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a size: {SIZE_FORMS}")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        parse_size(v)
            .map_err(|err| E::invalid_value(Unexpected::Str(v), &err.reason_for_serde().as_str()))
    }
}

impl InvalidSize {
    /// The `expecting` text serde puts after "expected" for this refusal.
    fn reason_for_serde(&self) -> String {
        format!("a size ({}): {SIZE_FORMS}", self.reason)
    }
}

/// Deserializes a size (integer bytes or a string with a unit) into bytes.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    deserializer.deserialize_any(SizeVisitor)
}

/// Deserializes an optional size; `Some` whenever the key is present.
pub fn deserialize_option<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u64>, D::Error> {
    deserializer.deserialize_any(SizeVisitor).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_units_in_both_bases_and_plain_bytes() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert_eq!(parse_size("10KB"), Ok(10_000));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size(" 64 mib "), Ok(64 << 20));
    }

    #[test]
    fn refuses_what_it_cannot_read_and_says_which_forms_it_accepts() {
        for bad in [
            "",
            "MiB",
            "64XB",
            "1.5GiB",
            "-1MiB",
            "64 MiB extra",
            "99999999999TiB",
        ] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.to_string().contains("\"64MiB\""), "{err}");
        }
    }
}
