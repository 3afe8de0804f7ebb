//! The host hands memory its stores freed back to the operating system (see
//! `storehost_store::heap`). In a test binary of its own: it reads the process's resident set.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

use std::time::{Duration, Instant};

use storehost_store::heap;

const MB: usize = 1 << 20;

/// The process's resident set, from `/proc/self/statm`.
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn memory_freed_between_live_allocations_leaves_the_resident_set_after_a_trim() {
    // 64 MB in 32 KB blocks (a closing connection's caches), each followed by a small block
    // that stays (a sleeping store's own state): the freed blocks cannot merge into the top
    // of the heap, so freeing alone returns none of them.
    let mut freed = Vec::new();
    let mut kept = Vec::new();
    for n in 0..2048u16 {
        freed.push(vec![1u8; 32 * 1024]);
        kept.push(Box::new([n; 32]));
    }
    let full = rss();
    drop(freed);
    let before = rss();
    assert!(
        before + 16 * MB > full,
        "the allocator kept the freed blocks resident (the case trimming is for): {} MB of {} MB",
        before / MB,
        full / MB
    );

    let trims = heap::trims();
    heap::freed();
    let deadline = Instant::now() + heap::TRIM_QUIET + Duration::from_secs(10);
    while heap::trims() == trims {
        assert!(
            Instant::now() < deadline,
            "no trim came after memory was freed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = rss();
    assert!(
        after + 32 * MB < before,
        "the trim handed the freed blocks back: resident {} MB before, {} MB after",
        before / MB,
        after / MB
    );
    assert_eq!(
        kept.iter().map(|k| usize::from(k[0])).sum::<usize>(),
        2047 * 2048 / 2
    );
}
