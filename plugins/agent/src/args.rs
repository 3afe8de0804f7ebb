//! Query arguments given as plain query parameters (`?includeArchived=true&limit=5`) reach the
//! plugin as strings, the host's way; given in `?args=` JSON they keep their types. These read
//! either.

use serde::Deserialize;
use serde::de::{self, Deserializer};

/// One value, as JSON gave it or as the text of a query parameter.
#[derive(Deserialize)]
#[serde(untagged)]
enum Given<T> {
    Typed(T),
    Text(String),
}

/// A flag: `true`/`false`, or the text `"true"`/`"false"`.
pub fn flag<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    match Given::<bool>::deserialize(deserializer)? {
        Given::Typed(value) => Ok(value),
        Given::Text(text) => match text.trim() {
            "true" => Ok(true),
            "false" => Ok(false),
            other => Err(de::Error::custom(format!(
                "expected true or false, got {other:?}"
            ))),
        },
    }
}

/// An optional count: a whole number from 0 to 4294967295, or its text.
pub fn count<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
    match Option::<Given<u32>>::deserialize(deserializer)? {
        None => Ok(None),
        Some(Given::Typed(value)) => Ok(Some(value)),
        Some(Given::Text(text)) => text.trim().parse().map(Some).map_err(|_| {
            de::Error::custom(format!(
                "expected a whole number from 0 to {}, got {text:?}",
                u32::MAX
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[derive(Debug, Default, Deserialize)]
    #[serde(default, rename_all = "camelCase")]
    struct Args {
        #[serde(deserialize_with = "flag")]
        include_archived: bool,
        #[serde(deserialize_with = "count")]
        limit: Option<u32>,
    }

    fn read(args: serde_json::Value) -> Result<Args, String> {
        serde_json::from_value(args).map_err(|err| err.to_string())
    }

    #[test]
    fn typed_values_and_their_text_read_the_same() {
        for args in [
            json!({"includeArchived": true, "limit": 5}),
            json!({"includeArchived": "true", "limit": "5"}),
        ] {
            let read = read(args).unwrap();
            assert!(read.include_archived);
            assert_eq!(read.limit, Some(5));
        }
        let read = read(json!({})).unwrap();
        assert!(!read.include_archived);
        assert_eq!(read.limit, None);
    }

    #[test]
    fn anything_else_is_refused_saying_what_was_expected() {
        let err = read(json!({"includeArchived": "yes"})).unwrap_err();
        assert!(err.contains("expected true or false, got \"yes\""), "{err}");
        let err = read(json!({"limit": "-1"})).unwrap_err();
        assert!(err.contains("expected a whole number"), "{err}");
        let err = read(json!({"limit": 1.5})).unwrap_err();
        assert!(!err.is_empty());
    }
}
