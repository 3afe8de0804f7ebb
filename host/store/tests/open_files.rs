//! The file table grown at start (`storehost_store::open_files`), in a process of its own: the
//! table never shrinks, so no other test may have grown it first.

use storehost_store::open_files::{limit, reserve, wanted};

/// The size of this process's file table (`FDSize` in `/proc/self/status`).
fn table_size() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("FDSize:")).unwrap();
    line["FDSize:".len()..].trim().parse().unwrap()
}

#[test]
fn the_table_grows_to_hold_what_was_reserved_up_to_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let near = std::fs::File::open(dir.path()).unwrap();
    let limit = limit();
    let wanted = wanted(1_000, 16);
    let before = table_size();
    assert!(
        before < wanted.min(limit),
        "the table already holds {before}"
    );

    let reserved = reserve(wanted, &near).unwrap();
    assert_eq!(reserved, wanted.min(limit));
    assert!(
        table_size() >= reserved,
        "the table has {} slots after reserving {reserved} (it had {before})",
        table_size()
    );
    // Nothing stays open: the slot taken to grow the table is free again.
    let open = std::fs::read_dir("/proc/self/fd").unwrap().count();
    assert!(
        open < 64,
        "{open} descriptors open after reserving {reserved}"
    );

    // Past the limit no file opens anyway: the table grows to the limit.
    assert_eq!(reserve(usize::MAX, &near).unwrap(), limit);
    assert!(table_size() >= limit);
}
