//! SQL on the store's own database, inside the host's current transaction.
//!
//! Statements take positional parameters (`?1`, `?2`, ...) built with [`params!`](crate::params)
//! from anything that implements [`ToSql`]; result columns are read with [`Row::get`] into
//! anything that implements [`FromSql`].
//!
//! The host refuses statements that would leave the store's sandbox: `ATTACH`, loading
//! extensions, pragmas, `BEGIN`/`COMMIT`/`ROLLBACK`, and the host's own `_host*` tables.

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::__bindings::storehost::plugin::{sql as wit, types};

pub use crate::__bindings::storehost::plugin::types::Value;

/// Runs one statement that returns no rows; answers the number of rows changed.
pub fn execute(statement: &str, params: &[Value]) -> Result<u64, SqlError> {
    wit::execute(statement, params).map_err(SqlError::from)
}

/// Runs one statement and returns all of its rows.
pub fn query(statement: &str, params: &[Value]) -> Result<Rows, SqlError> {
    let rows = wit::query(statement, params).map_err(SqlError::from)?;
    Ok(Rows {
        columns: rows.columns,
        rows: rows.rows,
    })
}

/// Builds the parameter list of a statement: `params![id, title, archived]`.
///
/// Each argument is anything that implements [`ToSql`]; the result is a `&[Value]`.
#[macro_export]
macro_rules! params {
    () => {
        &[] as &[$crate::sql::Value]
    };
    ($($param:expr),+ $(,)?) => {
        &[$($crate::sql::ToSql::to_sql(&$param)),+] as &[$crate::sql::Value]
    };
}

/// The SQLite result code of a constraint violation (`UNIQUE`, `PRIMARY KEY`, `NOT NULL`, ...).
pub const SQLITE_CONSTRAINT: i32 = 19;
/// The code the host answers when its authorizer refuses a statement.
pub const SQLITE_AUTH: i32 = 23;

/// Why a statement failed, or why a column could not be read.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlError {
    /// The host refused the statement or SQLite failed to run it. The transaction stays usable.
    Sqlite {
        /// SQLite's primary result code, or [`SQLITE_AUTH`] when the host refused the statement.
        code: i32,
        /// SQLite's or the host's explanation.
        message: String,
    },
    /// [`Row::get`] named a column the result does not have.
    NoSuchColumn {
        /// The name asked for.
        name: String,
        /// The columns the result has.
        columns: Vec<String>,
    },
    /// [`Row::get`] asked for a column index past the last column.
    ColumnOutOfRange {
        /// The index asked for.
        index: usize,
        /// How many columns the result has.
        count: usize,
    },
    /// A column's value does not convert to the requested Rust type.
    InvalidType {
        /// The column's name.
        column: String,
        /// Why the value does not fit.
        reason: String,
    },
}

impl SqlError {
    /// SQLite's result code, for errors that came from running a statement.
    pub fn code(&self) -> Option<i32> {
        match self {
            Self::Sqlite { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the statement violated a constraint (e.g. a duplicate primary key).
    pub fn is_constraint_violation(&self) -> bool {
        self.code() == Some(SQLITE_CONSTRAINT)
    }

    /// Whether the host's authorizer refused the statement.
    pub fn is_refused(&self) -> bool {
        self.code() == Some(SQLITE_AUTH)
    }

    /// Whether the statement named a table that does not exist (yet): useful in queries, which
    /// may run before the first event created the plugin's tables.
    pub fn is_missing_table(&self) -> bool {
        matches!(self, Self::Sqlite { message, .. } if message.contains("no such table"))
    }
}

impl fmt::Display for SqlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite { code, message } if *code == SQLITE_AUTH => {
                write!(f, "statement refused by the host: {message}")
            }
            Self::Sqlite { code, message } => write!(f, "SQL error (code {code}): {message}"),
            Self::NoSuchColumn { name, columns } => write!(
                f,
                "no column named `{name}` in the result (its columns: {})",
                columns.join(", ")
            ),
            Self::ColumnOutOfRange { index, count } => write!(
                f,
                "column index {index} is out of range: the result has {count} column(s)"
            ),
            Self::InvalidType { column, reason } => {
                write!(f, "column `{column}` cannot be read as asked: {reason}")
            }
        }
    }
}

impl std::error::Error for SqlError {}

impl From<types::SqlError> for SqlError {
    fn from(err: types::SqlError) -> Self {
        Self::Sqlite {
            code: err.code,
            message: err.message,
        }
    }
}

/// Lets handlers that answer `Result<_, String>` use `?` on SQL calls.
impl From<SqlError> for String {
    fn from(err: SqlError) -> Self {
        err.to_string()
    }
}

/// The rows a query returned, with their column names.
#[derive(Debug, Clone, PartialEq)]
pub struct Rows {
    columns: Vec<String>,
    rows: Vec<Vec<Value>>,
}

impl Rows {
    /// The result's column names, in order.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// How many rows there are.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The row at `index`, if there is one.
    pub fn get(&self, index: usize) -> Option<Row<'_>> {
        self.rows.get(index).map(|values| Row {
            columns: &self.columns,
            values,
        })
    }

    /// The first row, if there is one.
    pub fn first(&self) -> Option<Row<'_>> {
        self.get(0)
    }

    /// The rows, in order.
    pub fn iter(&self) -> RowIter<'_> {
        RowIter {
            columns: &self.columns,
            rows: self.rows.iter(),
        }
    }

    /// The raw values, row by row.
    pub fn into_values(self) -> Vec<Vec<Value>> {
        self.rows
    }
}

impl<'a> IntoIterator for &'a Rows {
    type Item = Row<'a>;
    type IntoIter = RowIter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Iterator over the rows of [`Rows`].
#[derive(Debug, Clone)]
pub struct RowIter<'a> {
    columns: &'a [String],
    rows: std::slice::Iter<'a, Vec<Value>>,
}

impl<'a> Iterator for RowIter<'a> {
    type Item = Row<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        let columns = self.columns;
        self.rows.next().map(|values| Row { columns, values })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.rows.size_hint()
    }
}

impl ExactSizeIterator for RowIter<'_> {}

/// One row of [`Rows`].
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    columns: &'a [String],
    values: &'a [Value],
}

impl<'a> Row<'a> {
    /// Reads a column, by index (`0`, `1`, ...) or by name (`"title"`), as `T`.
    pub fn get<T: FromSql>(&self, column: impl ColumnIndex) -> Result<T, SqlError> {
        let index = column.index_in(self.columns)?;
        let value = self.values.get(index).ok_or(SqlError::ColumnOutOfRange {
            index,
            count: self.values.len(),
        })?;
        T::from_sql(value).map_err(|err| SqlError::InvalidType {
            column: self
                .columns
                .get(index)
                .cloned()
                .unwrap_or_else(|| index.to_string()),
            reason: err.0,
        })
    }

    /// The raw values of the row, in column order.
    pub fn values(&self) -> &'a [Value] {
        self.values
    }

    /// The result's column names, in order.
    pub fn columns(&self) -> &'a [String] {
        self.columns
    }
}

/// Something that picks a column of a row: its index or its name.
pub trait ColumnIndex {
    /// The position of this column among `columns`.
    fn index_in(&self, columns: &[String]) -> Result<usize, SqlError>;
}

impl ColumnIndex for usize {
    fn index_in(&self, columns: &[String]) -> Result<usize, SqlError> {
        if *self < columns.len() {
            Ok(*self)
        } else {
            Err(SqlError::ColumnOutOfRange {
                index: *self,
                count: columns.len(),
            })
        }
    }
}

impl ColumnIndex for &str {
    fn index_in(&self, columns: &[String]) -> Result<usize, SqlError> {
        columns
            .iter()
            .position(|column| column == self)
            .ok_or_else(|| SqlError::NoSuchColumn {
                name: (*self).to_owned(),
                columns: columns.to_vec(),
            })
    }
}

/// A Rust value that can be a statement parameter.
pub trait ToSql {
    /// The SQLite value for `self`.
    fn to_sql(&self) -> Value;
}

impl<T: ToSql + ?Sized> ToSql for &T {
    fn to_sql(&self) -> Value {
        (**self).to_sql()
    }
}

impl ToSql for Value {
    fn to_sql(&self) -> Value {
        self.clone()
    }
}

macro_rules! integer_to_sql {
    ($($int:ty),*) => {$(
        impl ToSql for $int {
            fn to_sql(&self) -> Value {
                Value::Integer(i64::from(*self))
            }
        }
    )*};
}
integer_to_sql!(i8, i16, i32, i64, u8, u16, u32);

impl ToSql for bool {
    fn to_sql(&self) -> Value {
        Value::Integer(i64::from(*self))
    }
}

impl ToSql for f64 {
    fn to_sql(&self) -> Value {
        Value::Real(*self)
    }
}

impl ToSql for f32 {
    fn to_sql(&self) -> Value {
        Value::Real(f64::from(*self))
    }
}

impl ToSql for str {
    fn to_sql(&self) -> Value {
        Value::Text(self.to_owned())
    }
}

impl ToSql for String {
    fn to_sql(&self) -> Value {
        Value::Text(self.clone())
    }
}

impl ToSql for [u8] {
    fn to_sql(&self) -> Value {
        Value::Blob(self.to_vec())
    }
}

impl ToSql for Vec<u8> {
    fn to_sql(&self) -> Value {
        Value::Blob(self.clone())
    }
}

impl<T: ToSql> ToSql for Option<T> {
    fn to_sql(&self) -> Value {
        match self {
            Some(value) => value.to_sql(),
            None => Value::Null,
        }
    }
}

/// JSON null, booleans, numbers and strings become the matching SQLite value; arrays and
/// objects are stored as JSON text.
impl ToSql for serde_json::Value {
    fn to_sql(&self) -> Value {
        use serde_json::Value as Json;
        match self {
            Json::Null => Value::Null,
            Json::Bool(flag) => flag.to_sql(),
            Json::Number(number) => match number.as_i64() {
                Some(int) => Value::Integer(int),
                None => Value::Real(number.as_f64().unwrap_or(f64::NAN)),
            },
            Json::String(text) => Value::Text(text.clone()),
            Json::Array(_) | Json::Object(_) => Value::Text(self.to_string()),
        }
    }
}

/// A column holding JSON text: stored with `serde_json::to_string`, read with
/// `serde_json::from_str`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Json<T>(pub T);

impl<T: Serialize> ToSql for Json<T> {
    fn to_sql(&self) -> Value {
        match serde_json::to_string(&self.0) {
            Ok(text) => Value::Text(text),
            // Only maps with non-string keys fail to serialize; storing NULL would hide it, so
            // store the reason where the value was meant to be.
            Err(err) => Value::Text(format!("<unserializable JSON: {err}>")),
        }
    }
}

/// Why a value could not be converted by [`FromSql`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FromSqlError(pub String);

impl FromSqlError {
    fn wrong_type(expected: &str, found: &Value) -> Self {
        Self(format!("expected {expected}, found {}", type_name(found)))
    }
}

impl fmt::Display for FromSqlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FromSqlError {}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "NULL",
        Value::Integer(_) => "INTEGER",
        Value::Real(_) => "REAL",
        Value::Text(_) => "TEXT",
        Value::Blob(_) => "BLOB",
    }
}

/// A Rust type a column value can be read as.
pub trait FromSql: Sized {
    /// Converts the SQLite value, or says why it does not fit.
    fn from_sql(value: &Value) -> Result<Self, FromSqlError>;
}

impl FromSql for Value {
    fn from_sql(value: &Value) -> Result<Self, FromSqlError> {
        Ok(value.clone())
    }
}

impl FromSql for i64 {
    fn from_sql(value: &Value) -> Result<Self, FromSqlError> {
        match value {
            Value::Integer(int) => Ok(*int),
            other => Err(FromSqlError::wrong_type("INTEGER", other)),
        }
    }
}

macro_rules! narrow_integer_from_sql {
    ($($int:ty),*) => {$(
        impl FromSql for $int {
            fn from_sql(value: &Value) -> Result<Self, FromSqlError> {
                let wide = i64::from_sql(value)?;
                <$int>::try_from(wide).map_err(|_| {
                    FromSqlError(format!("{wide} does not fit in {}", stringify!($int)))
                })
            }
        }
    )*};
}
narrow_integer_from_sql!(i8, i16, i32, u8, u16, u32, u64, usize);

/// `0` is false, any other integer is true.
impl FromSql for bool {
    fn from_sql(value: &Value) -> Result<Self, FromSqlError> {
        i64::from_sql(value).map(|int| int != 0)
    }
}

/// Reads REAL, and INTEGER converted to floating point.
impl FromSql for f64 {
    fn from_sql(value: &Value) -> Result<Self, FromSqlError> {
        match value {
            Value::Real(real) => Ok(*real),
            Value::Integer(int) => Ok(*int as f64),
            other => Err(FromSqlError::wrong_type("REAL", other)),
        }
    }
}

impl FromSql for String {
    fn from_sql(value: &Value) -> Result<Self, FromSqlError> {
        match value {
            Value::Text(text) => Ok(text.clone()),
            other => Err(FromSqlError::wrong_type("TEXT", other)),
        }
    }
}

/// Reads BLOB, and TEXT as its UTF-8 bytes.
impl FromSql for Vec<u8> {
    fn from_sql(value: &Value) -> Result<Self, FromSqlError> {
        match value {
            Value::Blob(bytes) => Ok(bytes.clone()),
            Value::Text(text) => Ok(text.clone().into_bytes()),
            other => Err(FromSqlError::wrong_type("BLOB", other)),
        }
    }
}

/// NULL is `None`; anything else is read as `T`.
impl<T: FromSql> FromSql for Option<T> {
    fn from_sql(value: &Value) -> Result<Self, FromSqlError> {
        match value {
            Value::Null => Ok(None),
            other => T::from_sql(other).map(Some),
        }
    }
}

/// The inverse of the [`ToSql`] conversion: NULL, numbers and text map to JSON null, numbers
/// and strings, except that text holding a JSON array or object is parsed back into it. A BLOB
/// is parsed as JSON.
impl FromSql for serde_json::Value {
    fn from_sql(value: &Value) -> Result<Self, FromSqlError> {
        use serde_json::Value as Json;
        match value {
            Value::Null => Ok(Json::Null),
            Value::Integer(int) => Ok(Json::from(*int)),
            Value::Real(real) => Ok(serde_json::Number::from_f64(*real)
                .map(Json::Number)
                .unwrap_or(Json::Null)),
            Value::Text(text) => {
                let trimmed = text.trim_start();
                if (trimmed.starts_with('{') || trimmed.starts_with('['))
                    && let Ok(parsed) = serde_json::from_str(text)
                {
                    return Ok(parsed);
                }
                Ok(Json::String(text.clone()))
            }
            Value::Blob(bytes) => serde_json::from_slice(bytes)
                .map_err(|err| FromSqlError(format!("BLOB is not JSON: {err}"))),
        }
    }
}

impl<T: DeserializeOwned> FromSql for Json<T> {
    fn from_sql(value: &Value) -> Result<Self, FromSqlError> {
        let parsed = match value {
            Value::Text(text) => serde_json::from_str(text),
            Value::Blob(bytes) => serde_json::from_slice(bytes),
            other => return Err(FromSqlError::wrong_type("JSON text", other)),
        };
        parsed
            .map(Json)
            .map_err(|err| FromSqlError(format!("invalid JSON: {err}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row<'a>(columns: &'a [String], values: &'a [Value]) -> Row<'a> {
        Row { columns, values }
    }

    #[test]
    fn params_convert_rust_values_to_sqlite_values() {
        let name = String::from("ada");
        let params = crate::params![1i64, 2u32, true, 1.5, "x", name, vec![1u8], None::<i64>];
        assert_eq!(
            params,
            &[
                Value::Integer(1),
                Value::Integer(2),
                Value::Integer(1),
                Value::Real(1.5),
                Value::Text("x".into()),
                Value::Text("ada".into()),
                Value::Blob(vec![1]),
                Value::Null,
            ]
        );
        assert!(crate::params![].is_empty());
        assert_eq!(
            serde_json::json!({"a": [1]}).to_sql(),
            Value::Text(r#"{"a":[1]}"#.into())
        );
    }

    #[test]
    fn row_get_reads_by_index_and_name_with_clear_errors() {
        let columns = vec!["id".to_owned(), "done".to_owned(), "note".to_owned()];
        let values = vec![Value::Integer(7), Value::Integer(0), Value::Null];
        let row = row(&columns, &values);
        assert_eq!(row.get::<i64>(0), Ok(7));
        assert_eq!(row.get::<bool>("done"), Ok(false));
        assert_eq!(row.get::<Option<String>>("note"), Ok(None));

        let missing = row.get::<i64>("nope").unwrap_err();
        assert_eq!(
            missing.to_string(),
            "no column named `nope` in the result (its columns: id, done, note)"
        );
        let wrong = row.get::<String>("id").unwrap_err();
        assert_eq!(
            wrong.to_string(),
            "column `id` cannot be read as asked: expected TEXT, found INTEGER"
        );
        assert!(matches!(
            row.get::<i64>(3),
            Err(SqlError::ColumnOutOfRange { index: 3, count: 3 })
        ));
    }

    #[test]
    fn json_round_trips_through_text() {
        let stored = serde_json::json!({"k": [1, 2]}).to_sql();
        assert_eq!(
            serde_json::Value::from_sql(&stored),
            Ok(serde_json::json!({"k": [1, 2]}))
        );
        let plain = Value::Text("2024-01-01T00:00:00Z".into());
        assert_eq!(
            serde_json::Value::from_sql(&plain),
            Ok(serde_json::json!("2024-01-01T00:00:00Z"))
        );
        let typed: Json<Vec<u8>> = Json::from_sql(&Json(vec![1u8, 2]).to_sql()).unwrap();
        assert_eq!(typed.0, vec![1, 2]);
    }
}
