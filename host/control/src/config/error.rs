//! Config errors: each says where it is (file:line:column, or the environment variable) and
//! what was wrong and what to do; [`ConfigErrors`] carries every error found, not only the first.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// What kind of mistake a [`ConfigError`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigErrorKind {
    /// The config file could not be read.
    Io,
    /// The file is not valid TOML.
    Syntax,
    /// A key that storehost does not know.
    UnknownKey,
    /// A key that is required is missing.
    MissingKey,
    /// A value of the wrong type or form, or out of range.
    InvalidValue,
    /// A `[stores.<id>]` key (or `STORE_IDS` entry) that is not a valid store id.
    InvalidStoreId,
    /// A `[plugins.<name>]` key that is not a valid plugin name.
    InvalidPluginName,
    /// A reference to a plugin that is neither built in nor declared.
    UnknownPlugin,
    /// More stores than `max_stores` allows.
    TooManyStores,
    /// An environment variable with a value that cannot be used.
    InvalidEnv,
}

/// Where a [`ConfigError`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A position in a config file; line and column are 1-based, the column counts characters.
    File {
        /// The config file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column, in characters.
        column: usize,
    },
    /// A config file as a whole (for example, it could not be read).
    WholeFile {
        /// The config file.
        path: PathBuf,
    },
    /// An environment variable.
    Env {
        /// The variable's name.
        variable: String,
    },
}

impl Location {
    /// The location of byte `offset` in `text`, the contents of the file at `path`.
    pub fn in_text(path: &Path, text: &str, offset: usize) -> Self {
        let offset = floor_char_boundary(text, offset.min(text.len()));
        let before = &text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Self::File {
            path: path.to_owned(),
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }
}

/// The largest char boundary of `text` at or below `offset`.
fn floor_char_boundary(text: &str, mut offset: usize) -> usize {
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File { path, line, column } => {
                write!(f, "{}:{line}:{column}", path.display())
            }
            Self::WholeFile { path } => write!(f, "{}", path.display()),
            Self::Env { variable } => write!(f, "environment variable {variable}"),
        }
    }
}

/// One mistake in the config file or environment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {message}")]
pub struct ConfigError {
    /// What kind of mistake it is.
    pub kind: ConfigErrorKind,
    /// Where it is.
    pub location: Location,
    /// What was wrong and what to do.
    pub message: String,
}

impl ConfigError {
    /// An error at byte `span.start` of `text`, the contents of `path`.
    pub(crate) fn in_text(
        kind: ConfigErrorKind,
        path: &Path,
        text: &str,
        span: Range<usize>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            location: Location::in_text(path, text, span.start),
            message: message.into(),
        }
    }

    /// An error about environment variable `variable`.
    pub(crate) fn env(variable: &str, kind: ConfigErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            location: Location::Env {
                variable: variable.to_owned(),
            },
            message: message.into(),
        }
    }

    /// The 1-based line, when the error is at a position in a file.
    pub fn line(&self) -> Option<usize> {
        match self.location {
            Location::File { line, .. } => Some(line),
            _ => None,
        }
    }

    /// The 1-based column, when the error is at a position in a file.
    pub fn column(&self) -> Option<usize> {
        match self.location {
            Location::File { column, .. } => Some(column),
            _ => None,
        }
    }
}

/// Every error found in one config file or environment, in document order; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(Vec<ConfigError>);

impl std::error::Error for ConfigErrors {}

impl ConfigErrors {
    /// Wraps `errors`, sorted by location; `None` when there are none.
    pub fn from_vec(mut errors: Vec<ConfigError>) -> Option<Self> {
        errors.sort_by_key(|e| match &e.location {
            Location::File { line, column, .. } => (0, *line, *column),
            Location::WholeFile { .. } => (0, 0, 0),
            Location::Env { .. } => (1, 0, 0),
        });
        (!errors.is_empty()).then_some(Self(errors))
    }

    /// One error.
    pub fn one(error: ConfigError) -> Self {
        Self(vec![error])
    }

    /// The errors, in order.
    pub fn errors(&self) -> &[ConfigError] {
        &self.0
    }

    /// How many errors there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a `ConfigErrors` holds at least one error.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The errors, owned.
    pub fn into_vec(self) -> Vec<ConfigError> {
        self.0
    }
}

impl fmt::Display for ConfigErrors {
    /// One line per error.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_one_based_and_count_characters() {
        let text = "a = 1\nbé = 2\n";
        let at = |offset| Location::in_text(Path::new("f.toml"), text, offset).to_string();
        assert_eq!(at(0), "f.toml:1:1");
        assert_eq!(at(6), "f.toml:2:1");
        assert_eq!(at(text.find('=').unwrap()), "f.toml:1:3");
        assert_eq!(at(text.rfind('=').unwrap()), "f.toml:2:4");
    }

    #[test]
    fn display_puts_one_error_on_each_line() {
        let errors = ConfigErrors::from_vec(vec![
            ConfigError::env("PORT", ConfigErrorKind::InvalidEnv, "bad port"),
            ConfigError::in_text(
                ConfigErrorKind::UnknownKey,
                Path::new("s.toml"),
                "x = 1",
                0..1,
                "unknown key",
            ),
        ])
        .unwrap();
        assert_eq!(
            errors.to_string(),
            "s.toml:1:1: unknown key\nenvironment variable PORT: bad port"
        );
    }
}
