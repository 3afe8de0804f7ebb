//! Deterministic ids for what the agent creates.
//!
//! A handler may run more than once for the same event or task execution (a failed attempt is
//! rolled back and retried), so ids never come from randomness: they are derived from the id of
//! what caused them (the user's message, the task execution) and a counter.

/// A short id `{prefix}-{12 hex digits}` derived from `origin` and `n` (FNV-1a, 48 bits).
///
/// Short enough to type in a chat ("mark task t-3f2a91c0d4e5 as done"), and without
/// whitespace, so it survives being quoted by a model or a regular expression.
pub fn derive(prefix: &str, origin: &str, n: u32) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in prefix
        .bytes()
        .chain([0])
        .chain(origin.bytes())
        .chain([0])
        .chain(n.to_le_bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{prefix}-{:012x}", hash & 0xffff_ffff_ffff)
}

/// The id of the assistant's reply to message `message_id`.
pub fn reply_to(message_id: &str) -> String {
    format!("{message_id}-response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_differ_by_origin_and_counter() {
        let a = derive("t", "msg-1", 0);
        assert_eq!(a, derive("t", "msg-1", 0));
        assert_eq!(a.len(), "t-".len() + 12);
        assert_ne!(a, derive("t", "msg-1", 1));
        assert_ne!(a, derive("t", "msg-2", 0));
        assert_ne!(derive("rt", "msg-1", 0)[3..], a[2..]);
        assert_eq!(reply_to("m1"), "m1-response");
    }
}
