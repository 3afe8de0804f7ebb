//! Timestamps as the product's events carry them: ISO 8601 text or milliseconds since the epoch.

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use storehost_guest_sdk::sql::{FromSql, FromSqlError, ToSql, Value};

/// A point in time, kept in the form the event gave it so that queries answer it unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Timestamp {
    /// Milliseconds since the Unix epoch.
    Millis(i64),
    /// Text, normally ISO 8601 (`2024-05-01T12:00:00.000Z`).
    Text(String),
}

impl Timestamp {
    /// The ISO 8601 form (UTC, millisecond precision) of `ms` milliseconds since the epoch; used
    /// when an event leaves a time out and the host's acceptance time stands in for it.
    pub fn from_epoch_ms(ms: i64) -> Self {
        Self::Text(iso8601_from_epoch_ms(ms))
    }
}

/// Read by hand rather than as an untagged enum, whose refusal ("data did not match any
/// variant of untagged enum Timestamp") said neither what came nor what is accepted.
impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TimestampVisitor;

        impl Visitor<'_> for TimestampVisitor {
            type Value = Timestamp;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a timestamp: whole milliseconds since the Unix epoch, or ISO 8601 text such as \"2024-05-01T12:00:00.000Z\"",
                )
            }

            fn visit_i64<E: de::Error>(self, ms: i64) -> Result<Timestamp, E> {
                Ok(Timestamp::Millis(ms))
            }

            fn visit_u64<E: de::Error>(self, ms: u64) -> Result<Timestamp, E> {
                i64::try_from(ms)
                    .map(Timestamp::Millis)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(ms), &self))
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Timestamp, E> {
                Ok(Timestamp::Text(text.to_owned()))
            }

            fn visit_string<E: de::Error>(self, text: String) -> Result<Timestamp, E> {
                Ok(Timestamp::Text(text))
            }
        }

        deserializer.deserialize_any(TimestampVisitor)
    }
}

impl ToSql for Timestamp {
    fn to_sql(&self) -> Value {
        match self {
            Self::Millis(ms) => Value::Integer(*ms),
            Self::Text(text) => Value::Text(text.clone()),
        }
    }
}

impl FromSql for Timestamp {
    fn from_sql(value: &Value) -> Result<Self, FromSqlError> {
        match value {
            Value::Integer(ms) => Ok(Self::Millis(*ms)),
            Value::Text(text) => Ok(Self::Text(text.clone())),
            _ => Err(FromSqlError(
                "a timestamp is stored as INTEGER (epoch ms) or TEXT (ISO 8601)".into(),
            )),
        }
    }
}

/// Formats milliseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn iso8601_from_epoch_ms(ms: i64) -> String {
    let seconds = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let (year, month, day) = civil_from_days(seconds.div_euclid(86_400));
    let second_of_day = seconds.rem_euclid(86_400);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timestamp_reads_millis_or_text_and_says_what_it_takes_otherwise() {
        let read = |v: serde_json::Value| serde_json::from_value::<Timestamp>(v);
        assert_eq!(
            read(serde_json::json!(1_714_564_800_000_i64)).unwrap(),
            Timestamp::Millis(1_714_564_800_000)
        );
        assert_eq!(
            read(serde_json::json!("2024-05-01T12:00:00.000Z")).unwrap(),
            Timestamp::Text("2024-05-01T12:00:00.000Z".into())
        );
        let err = read(serde_json::json!(1.5)).unwrap_err().to_string();
        assert!(
            err.contains("floating point `1.5`")
                && err.contains("whole milliseconds since the Unix epoch"),
            "{err}"
        );
    }

    #[test]
    fn formats_epoch_milliseconds_as_iso8601() {
        assert_eq!(iso8601_from_epoch_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            iso8601_from_epoch_ms(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(
            iso8601_from_epoch_ms(951_782_400_000),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(iso8601_from_epoch_ms(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn keeps_the_form_the_event_used() {
        let text: Timestamp = serde_json::from_str(r#""2024-05-01T12:00:00Z""#).unwrap();
        assert_eq!(text, Timestamp::Text("2024-05-01T12:00:00Z".into()));
        let millis: Timestamp = serde_json::from_str("1714564800000").unwrap();
        assert_eq!(millis, Timestamp::Millis(1_714_564_800_000));
        assert_eq!(serde_json::to_string(&millis).unwrap(), "1714564800000");
    }
}
