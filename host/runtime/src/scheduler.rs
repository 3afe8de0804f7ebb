//! Invocation slots: how many guests run at once, host-wide, and who runs next.
//!
//! A guest holds a slot while it runs. A running guest gives its slot up at every epoch tick
//! (1 ms) when someone is waiting, then queues again: time slices. Two queues decide who runs
//! next, as in a multi-level feedback queue: calls that are just starting go before guests
//! coming back for another slice, so a store whose events take microseconds never waits
//! behind stores that spin for their whole CPU quota. A guest that has waited longer than
//! [`AGING`] for its next slice goes first, so long calls still progress under any load.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// The host-wide set of invocation slots.
#[derive(Debug)]
pub struct SlotScheduler {
    inner: Mutex<Inner>,
}

/// How long a guest waiting for its next slice may be passed over by starting calls.
pub const AGING: Duration = Duration::from_millis(20);

/// Who asks for a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A store in good standing.
    Normal,
    /// A store whose last invocation breached a quota or trapped: such stores together hold
    /// at most all slots but one, so stores in good standing always have a slot to run in.
    Low,
}

#[derive(Debug)]
struct Waiter {
    since: Instant,
    priority: Priority,
    sender: oneshot::Sender<Slot>,
}

#[derive(Debug)]
struct Inner {
    total: usize,
    free: usize,
    /// Slots held by low-priority guests.
    low_running: usize,
    /// Calls about to start.
    starting: VecDeque<Waiter>,
    /// Guests that gave their slot up mid-call.
    resuming: VecDeque<Waiter>,
}

impl Inner {
    fn is_empty(&self) -> bool {
        self.starting.is_empty() && self.resuming.is_empty()
    }

    fn may_run(&self, priority: Priority) -> bool {
        priority == Priority::Normal || self.total <= 1 || self.low_running < self.total - 1
    }

    /// The next waiter allowed to run: an aged resuming guest, else a starting call, else a
    /// resuming guest.
    fn next(&mut self) -> Option<Waiter> {
        let low_ok = self.may_run(Priority::Low);
        let eligible = |w: &Waiter| low_ok || w.priority == Priority::Normal;
        if let Some(i) = self
            .resuming
            .iter()
            .position(|w| eligible(w) && w.since.elapsed() >= AGING)
        {
            return self.resuming.remove(i);
        }
        if let Some(i) = self.starting.iter().position(eligible) {
            return self.starting.remove(i);
        }
        let i = self.resuming.iter().position(eligible)?;
        self.resuming.remove(i)
    }
}

/// The right to run guest code; given back (to the next waiter) on drop.
#[derive(Debug)]
pub struct Slot {
    scheduler: Arc<SlotScheduler>,
    priority: Priority,
    armed: bool,
}

impl SlotScheduler {
    /// A scheduler with `slots` slots (at least one).
    pub fn new(slots: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                total: slots.max(1),
                free: slots.max(1),
                low_running: 0,
                starting: VecDeque::new(),
                resuming: VecDeque::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits for a slot to start a call.
    pub async fn acquire(self: &Arc<Self>) -> Slot {
        self.wait_for_slot(false, Priority::Normal).await
    }

    /// Waits for a slot to start a call, as `priority`.
    pub async fn acquire_as(self: &Arc<Self>, priority: Priority) -> Slot {
        self.wait_for_slot(false, priority).await
    }

    /// Waits for a slot to go on with a call that gave its slot up (after a time slice, or
    /// after awaiting a host call).
    pub async fn resume(self: &Arc<Self>) -> Slot {
        self.wait_for_slot(true, Priority::Normal).await
    }

    /// [`Self::resume`], as `priority`.
    pub async fn resume_as(self: &Arc<Self>, priority: Priority) -> Slot {
        self.wait_for_slot(true, priority).await
    }

    async fn wait_for_slot(self: &Arc<Self>, resuming: bool, priority: Priority) -> Slot {
        let receiver = {
            let mut inner = self.lock();
            if inner.free > 0 && inner.is_empty() && inner.may_run(priority) {
                inner.free -= 1;
                if priority == Priority::Low {
                    inner.low_running += 1;
                }
                return Slot {
                    scheduler: self.clone(),
                    priority,
                    armed: true,
                };
            }
            let (sender, receiver) = oneshot::channel();
            let waiter = Waiter {
                since: Instant::now(),
                priority,
                sender,
            };
            if resuming {
                inner.resuming.push_back(waiter);
            } else {
                inner.starting.push_back(waiter);
            }
            self.dispatch(&mut inner);
            receiver
        };
        match receiver.await {
            Ok(slot) => slot,
            // The sender is only dropped after a send; a closed channel cannot happen while the
            // scheduler lives (and it lives as long as `self`).
            Err(_) => Box::pin(self.wait_for_slot(resuming, priority)).await,
        }
    }

    /// Whether anyone waits for a slot (a running guest then yields its slot at the next tick).
    pub fn has_waiters(&self) -> bool {
        !self.lock().is_empty()
    }

    /// How many wait for a slot.
    pub fn waiting(&self) -> usize {
        let inner = self.lock();
        inner.starting.len() + inner.resuming.len()
    }

    /// Slots free right now.
    pub fn free(&self) -> usize {
        self.lock().free
    }

    /// Hands free slots to waiters allowed to run.
    fn dispatch(self: &Arc<Self>, inner: &mut Inner) {
        while inner.free > 0 {
            let Some(waiter) = inner.next() else { return };
            inner.free -= 1;
            if waiter.priority == Priority::Low {
                inner.low_running += 1;
            }
            let slot = Slot {
                scheduler: self.clone(),
                priority: waiter.priority,
                armed: true,
            };
            if let Err(mut unclaimed) = waiter.sender.send(slot) {
                // That waiter gave up (its call was cancelled): take the slot back without
                // releasing it through its drop.
                unclaimed.armed = false;
                inner.free += 1;
                if unclaimed.priority == Priority::Low {
                    inner.low_running -= 1;
                }
            }
        }
    }

    fn release(self: &Arc<Self>, priority: Priority) {
        let mut inner = self.lock();
        inner.free += 1;
        if priority == Priority::Low {
            inner.low_running -= 1;
        }
        self.dispatch(&mut inner);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.armed {
            self.armed = false;
            let scheduler = self.scheduler.clone();
            scheduler.release(self.priority);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn starting_calls_go_before_resuming_guests_until_those_have_aged() {
        let scheduler = SlotScheduler::new(1);
        let held = scheduler.acquire().await;
        let s = scheduler.clone();
        let resuming = tokio::spawn(async move { s.resume().await });
        while scheduler.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        let s = scheduler.clone();
        let starting = tokio::spawn(async move { s.acquire().await });
        while scheduler.waiting() < 2 {
            tokio::task::yield_now().await;
        }
        drop(held);
        let slot = starting.await.unwrap();
        assert!(!resuming.is_finished(), "the starting call went first");
        drop(slot);
        drop(resuming.await.unwrap());

        // A guest that has waited past AGING goes before a starting call.
        let held = scheduler.acquire().await;
        let s = scheduler.clone();
        let resuming = tokio::spawn(async move { s.resume().await });
        while scheduler.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(AGING + Duration::from_millis(5)).await;
        let s = scheduler.clone();
        let starting = tokio::spawn(async move { s.acquire().await });
        while scheduler.waiting() < 2 {
            tokio::task::yield_now().await;
        }
        drop(held);
        let slot = resuming.await.unwrap();
        assert!(!starting.is_finished(), "the aged guest went first");
        drop(slot);
        drop(starting.await.unwrap());
        assert_eq!(scheduler.free(), 1);
    }

    #[tokio::test]
    async fn low_priority_guests_never_hold_the_last_slot() {
        let scheduler = SlotScheduler::new(2);
        let low = scheduler.acquire_as(Priority::Low).await;
        let s = scheduler.clone();
        let second_low = tokio::spawn(async move { s.acquire_as(Priority::Low).await });
        while scheduler.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            scheduler.free(),
            1,
            "a slot stays free for stores in good standing"
        );
        let normal = scheduler.acquire().await;
        assert_eq!(scheduler.free(), 0);
        drop(normal);
        assert!(
            !second_low.is_finished(),
            "still only one low-priority guest at a time"
        );
        drop(low);
        drop(second_low.await.unwrap());
        assert_eq!(scheduler.free(), 2);
    }

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
