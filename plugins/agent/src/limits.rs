//! The sizes the agent keeps what it sends to the model and what it emits within.
//!
//! The host refuses an LLM request over 1 MiB of text and an emitted payload over 1 MiB, and
//! real models have context limits well under that. Rather than fail once a conversation, a
//! reply or a task list has grown (and fail again on every retry), the agent sends the newest
//! part that fits and cuts what is too long, saying so where it cut.

/// The most bytes of conversation history (the current message included) one request carries.
pub const HISTORY_BYTES: usize = 256 * 1024;
/// The most bytes of one message's text a request carries.
pub const MESSAGE_BYTES: usize = 64 * 1024;
/// The most bytes of one tool result the model sees.
pub const TOOL_RESULT_BYTES: usize = 16 * 1024;
/// The most bytes of a reply (a chat answer or an execution's output) stored and emitted.
pub const REPLY_BYTES: usize = 128 * 1024;
/// The most bytes of tool-call arguments the metadata trace keeps in full; past it, a call is
/// traced with the length of its arguments only.
pub const TRACE_ARGUMENTS_BYTES: usize = 64 * 1024;
/// The most tool calls the metadata trace lists one by one; the rest are only counted.
pub const TRACE_CALLS: usize = 200;
/// The most bytes of a short field from the model (a tool or model name) that are kept.
pub const NAME_BYTES: usize = 256;

/// Room kept for the marker at the end of cut text.
const MARKER_RESERVE: usize = 80;

/// `text` cut to at most `max` bytes, with a marker saying how much was left out.
pub fn truncate(text: &str, max: usize) -> String {
    truncate_known(text, text.len(), max)
}

/// Like [`truncate`], for `text` that may already be a prefix of a text of `full_bytes` bytes.
pub fn truncate_known(text: &str, full_bytes: usize, max: usize) -> String {
    if full_bytes <= max && text.len() == full_bytes {
        return text.to_owned();
    }
    let keep = floor_boundary(text, max.saturating_sub(MARKER_RESERVE).min(text.len()));
    format!(
        "{}\n[… cut here: {} more bytes not shown]",
        &text[..keep],
        full_bytes.saturating_sub(keep)
    )
}

/// The largest character boundary of `text` at or before `index`.
fn floor_boundary(text: &str, mut index: usize) -> usize {
    while !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_kept_and_long_text_is_cut_within_the_limit() {
        assert_eq!(truncate("hello", 100), "hello");
        let long = "é".repeat(1_000);
        let cut = truncate(&long, 500);
        assert!(cut.len() <= 500, "{}", cut.len());
        assert!(cut.ends_with("more bytes not shown]"), "{cut}");
        assert!(cut.starts_with("éé"));
    }

    #[test]
    fn a_prefix_of_a_longer_text_says_how_long_the_whole_was() {
        let cut = truncate_known("abc", 10_000, 100);
        assert_eq!(cut, "abc\n[… cut here: 9997 more bytes not shown]");
    }
}
