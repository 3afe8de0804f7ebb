//! Why an invocation failed: one classified reason, never a guess from a string.

use std::fmt;

/// The classified reason an invocation failed (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailureReason {
    /// The call used up its fuel.
    OutOfFuel,
    /// The call ran longer than its CPU time (or the store's per-minute budget).
    CpuTime,
    /// The call took longer than its wall-clock limit, host calls included.
    WallTime,
    /// The guest needed more linear memory than its quota.
    Memory,
    /// The store reached its disk quota: its database, a statement's temporary files or its
    /// files directory.
    DiskFull,
    /// A rate limit refused the work.
    RateLimited,
    /// The guest panicked.
    Panic,
    /// The guest trapped (unreachable, stack overflow, bad memory access, ...).
    Trap,
    /// The host failed while serving the guest (I/O error, internal bug).
    HostError,
    /// The plugin returned an error on purpose.
    PluginError,
}

impl FailureReason {
    /// Every reason, for metrics and docs.
    pub const ALL: [FailureReason; 10] = [
        Self::OutOfFuel,
        Self::CpuTime,
        Self::WallTime,
        Self::Memory,
        Self::DiskFull,
        Self::RateLimited,
        Self::Panic,
        Self::Trap,
        Self::HostError,
        Self::PluginError,
    ];

    /// The stable snake_case name used in the API, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OutOfFuel => "out_of_fuel",
            Self::CpuTime => "cpu_time",
            Self::WallTime => "wall_time",
            Self::Memory => "memory",
            Self::DiskFull => "disk_full",
            Self::RateLimited => "rate_limited",
            Self::Panic => "panic",
            Self::Trap => "trap",
            Self::HostError => "host_error",
            Self::PluginError => "plugin_error",
        }
    }

    /// Parses a name produced by [`FailureSelf::as_str`].
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed invocation: its reason and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct InvocationError {
    /// The classified reason.
    pub reason: FailureReason,
    /// What happened, in words (the guest's panic message, the trap, the limit hit).
    pub message: String,
}

/// The most bytes of a failure's message kept (the rest is cut, and the cut said): a guest
/// chooses its error strings, and each failure's message is logged, kept as the store's last
/// failure and stored with a dead letter. A plugin failing with an 8 MB message left its event
/// at the head of the queue for ever (too big for the dead letter's row) and wrote the whole
/// message to the host log on every attempt.
pub const MAX_MESSAGE_BYTES: usize = 4096;

impl InvocationError {
    /// An error with `reason` and `message` (cut to [`MAX_MESSAGE_BYTES`], on one line: see
    /// [`one_line`]).
    pub fn new(reason: FailureReason, message: impl Into<String>) -> Self {
        let (mut message, cut) = one_line_within(&message.into(), MAX_MESSAGE_BYTES);
        if cut > 0 {
            message.push_str(&format!("… ({cut} more bytes cut)"));
        }
        Self { reason, message }
    }
}

/// `text` with its control characters escaped (a line feed as `\n`): a plugin's text (its log
/// lines, its errors) reaches the host's log, where a line feed would start a line of the
/// plugin's making that reads as the host's own (`… ERROR … store removed store_id=victim`).
pub fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    if text.chars().any(char::is_control) {
        std::borrow::Cow::Owned(one_line_within(text, usize::MAX).0)
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// [`one_line`] of at most `max` bytes of `text`, and how many bytes of `text` were left out.
/// Escaping can make text several times longer, so the escaped text is what is cut (at a
/// character boundary); the work is bounded by `max`, not by `text`: a plugin logs 5 MiB
/// lines, and scanning or copying each whole took the host longer than the call's CPU charge
/// for it.
pub fn one_line_within(text: &str, max: usize) -> (String, usize) {
    let mut kept = String::with_capacity(text.len().min(max));
    for (at, c) in text.char_indices() {
        let before = kept.len();
        if c.is_control() {
            kept.extend(c.escape_default());
        } else {
            kept.push(c);
        }
        if kept.len() > max {
            kept.truncate(before);
            return (kept, text.len() - at);
        }
    }
    (kept, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plugins_text_stays_on_one_line() {
        assert_eq!(one_line("plain é"), "plain é");
        assert_eq!(
            one_line("oops\n2026-12-07 ERROR store removed\r\x1b[0m"),
            "oops\\n2026-12-07 ERROR store removed\\r\\u{1b}[0m"
        );
        let err = InvocationError::new(FailureReason::PluginError, "a\nb");
        assert_eq!(err.message, "a\\nb");
        let nuls = InvocationError::new(FailureReason::PluginError, "\0".repeat(MAX_MESSAGE_BYTES));
        assert!(
            nuls.message.len() < MAX_MESSAGE_BYTES + 100,
            "cut after escaping: {} bytes",
            nuls.message.len()
        );
    }

    #[test]
    fn text_is_cut_after_escaping_and_the_cut_is_counted_in_the_input() {
        assert_eq!(one_line_within("abc", 3), ("abc".to_owned(), 0));
        assert_eq!(one_line_within("a\nb", 3), ("a\\n".to_owned(), 1));
        assert_eq!(one_line_within("éé", 3), ("é".to_owned(), 2));
        let (kept, cut) = one_line_within(&"x".repeat(5 << 20), 100);
        assert_eq!((kept.len(), cut), (100, (5 << 20) - 100));
    }

    #[test]
    fn a_long_message_is_cut_at_a_character_boundary_and_says_so() {
        let short = InvocationError::new(FailureReason::PluginError, "short");
        assert_eq!(short.message, "short");
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let cut = InvocationError::new(FailureReason::PluginError, long.clone());
        assert!(
            cut.message.len() < MAX_MESSAGE_BYTES + 40,
            "{}",
            cut.message.len()
        );
        assert!(long.starts_with(cut.message.split('…').next().unwrap()));
        assert!(
            cut.message
                .ends_with(&format!("({} more bytes cut)", MAX_MESSAGE_BYTES)),
            "{}",
            &cut.message[cut.message.len() - 40..]
        );
    }
}
