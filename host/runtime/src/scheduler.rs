//! Invocation slots: how many guests run at once, host-wide, and who runs next.
//!
//! A guest holds a slot while it runs. Waiters are served first come, first served, and a
//! running guest gives its slot up at every epoch tick (1 ms) when someone is waiting, then
//! queues again at the back: round-robin time slices. A store whose events take microseconds
//! is never stuck behind a store that spins for its whole CPU quota.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// The host-wide set of invocation slots.
#[derive(Debug)]
pub struct SlotScheduler {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    free: usize,
    waiters: VecDeque<oneshot::Sender<Slot>>,
}

/// The right to run guest code; given back (to the next waiter) on drop.
#[derive(Debug)]
pub struct Slot {
    scheduler: Arc<SlotScheduler>,
    armed: bool,
}

impl SlotScheduler {
    /// A scheduler with `slots` slots (at least one).
    pub fn new(slots: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                free: slots.max(1),
                waiters: VecDeque::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits for a slot, behind everyone already waiting.
    pub async fn acquire(self: &Arc<Self>) -> Slot {
        let receiver = {
            let mut inner = self.lock();
            if inner.free > 0 && inner.waiters.is_empty() {
                inner.free -= 1;
                return Slot {
                    scheduler: self.clone(),
                    armed: true,
                };
            }
            let (sender, receiver) = oneshot::channel();
            inner.waiters.push_back(sender);
            receiver
        };
        match receiver.await {
            Ok(slot) => slot,
            // The sender is only dropped after a send; a closed channel cannot happen while the
            // scheduler lives (and it lives as long as `self`).
            Err(_) => Box::pin(self.acquire()).await,
        }
    }

    /// Whether anyone waits for a slot (a running guest then yields its slot at the next tick).
    pub fn has_waiters(&self) -> bool {
        !self.lock().waiters.is_empty()
    }

    /// How many wait for a slot.
    pub fn waiting(&self) -> usize {
        self.lock().waiters.len()
    }

    /// Slots free right now.
    pub fn free(&self) -> usize {
        self.lock().free
    }

    fn release(self: &Arc<Self>) {
        let mut inner = self.lock();
        while let Some(waiter) = inner.waiters.pop_front() {
            let slot = Slot {
                scheduler: self.clone(),
                armed: true,
            };
            match waiter.send(slot) {
                Ok(()) => return,
                // That waiter gave up (its call was cancelled): try the next one without
                // releasing the slot a second time.
                Err(mut unclaimed) => unclaimed.armed = false,
            }
        }
        inner.free += 1;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.armed {
            self.armed = false;
            let scheduler = self.scheduler.clone();
            scheduler.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_are_served_in_order_and_cancelled_waiters_are_skipped() {
        let scheduler = SlotScheduler::new(1);
        let held = scheduler.acquire().await;
        assert_eq!(scheduler.free(), 0);

        let mut spawned = Vec::new();
        for queued in 1..=3 {
            let s = scheduler.clone();
            spawned.push(tokio::spawn(async move { s.acquire().await }));
            while scheduler.waiting() < queued {
                tokio::task::yield_now().await;
            }
        }
        let (first, cancelled, last) = {
            let mut it = spawned.into_iter();
            (it.next().unwrap(), it.next().unwrap(), it.next().unwrap())
        };
        cancelled.abort();
        let _ = cancelled.await;

        drop(held);
        let slot = first.await.unwrap();
        assert!(!last.is_finished(), "one slot: the last waiter still waits");
        drop(slot);
        let slot = last.await.unwrap();
        drop(slot);
        assert_eq!(
            scheduler.free(),
            1,
            "the cancelled waiter's turn did not leak a slot"
        );
    }
}
