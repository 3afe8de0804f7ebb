//! Invocation slots: how many guests run at once, host-wide, and who runs next.
//!
//! A guest holds a slot while it runs. A running guest gives its slot up at every epoch tick
//! (1 ms) when someone of its class is waiting, then queues again: time slices. Two queues
//! decide who runs next, as in a multi-level feedback queue: calls that are just starting go
//! before guests coming back for another slice, so a store whose events take microseconds never
//! waits behind stores that spin for their whole CPU quota. A guest that has waited longer than
//! [`AGING`] for its next slice goes first, so long calls still progress under any load.
//!
//! Stores in good standing ([`Priority::Normal`]) have all the slots to themselves. Demoted
//! stores ([`Priority::Low`]) have slots of their own, one fewer, and run on threads with the
//! least CPU priority (`runtime::GuestExecutor`): the OS hands the cores to stores in good
//! standing whenever they want them, so a demoted guest that is not getting the CPU must not
//! hold a slot anyone in good standing waits for.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// The host-wide set of invocation slots.
#[derive(Debug)]
pub struct SlotScheduler {
    /// The slots of stores in good standing, and those of demoted stores. Apart, so the
    /// threads of demoted stores never take a lock that stores in good standing wait on: those
    /// threads run at the least CPU priority and may be kept off the CPU for long stretches.
    classes: [Mutex<Class>; 2],
}

/// How long a guest waiting for its next slice may be passed over by starting calls.
pub const AGING: Duration = Duration::from_millis(20);

/// Who asks for a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A store in good standing.
    Normal,
    /// A store whose last invocation breached a quota or trapped: such stores share slots of
    /// their own (one fewer than stores in good standing have) on low-priority threads.
    Low,
}

impl Priority {
    fn index(self) -> usize {
        match self {
            Priority::Normal => 0,
            Priority::Low => 1,
        }
    }
}

#[derive(Debug)]
struct Waiter {
    since: Instant,
    sender: oneshot::Sender<Slot>,
}

/// The slots of one priority.
#[derive(Debug)]
struct Class {
    total: usize,
    running: usize,
    /// Calls about to start.
    starting: VecDeque<Waiter>,
    /// Guests that gave their slot up mid-call.
    resuming: VecDeque<Waiter>,
}

impl Class {
    fn new(total: usize) -> Self {
        Self {
            total,
            running: 0,
            starting: VecDeque::new(),
            resuming: VecDeque::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.starting.is_empty() && self.resuming.is_empty()
    }

    /// The next waiter: an aged resuming guest, else a starting call, else a resuming guest.
    fn next(&mut self) -> Option<Waiter> {
        if self
            .resuming
            .front()
            .is_some_and(|w| w.since.elapsed() >= AGING)
        {
            return self.resuming.pop_front();
        }
        self.starting
            .pop_front()
            .or_else(|| self.resuming.pop_front())
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
    /// A scheduler with `slots` slots for stores in good standing (at least one), and one
    /// fewer (at least one) for demoted stores.
    pub fn new(slots: usize) -> Arc<Self> {
        let slots = slots.max(1);
        Arc::new(Self {
            classes: [
                Mutex::new(Class::new(slots)),
                Mutex::new(Class::new(slots.saturating_sub(1).max(1))),
            ],
        })
    }

    fn lock(&self, priority: Priority) -> MutexGuard<'_, Class> {
        crate::lock(&self.classes[priority.index()])
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
            let mut class = self.lock(priority);
            if class.running < class.total && class.is_empty() {
                class.running += 1;
                return Slot {
                    scheduler: self.clone(),
                    priority,
                    armed: true,
                };
            }
            let (sender, receiver) = oneshot::channel();
            let waiter = Waiter {
                since: Instant::now(),
                sender,
            };
            if resuming {
                class.resuming.push_back(waiter);
            } else {
                class.starting.push_back(waiter);
            }
            self.dispatch(priority, &mut class);
            receiver
        };
        match receiver.await {
            Ok(slot) => slot,
            // The sender is only dropped after a send; a closed channel cannot happen while the
            // scheduler lives (and it lives as long as `self`).
            Err(_) => Box::pin(self.wait_for_slot(resuming, priority)).await,
        }
    }

    /// Whether a guest of class `priority` waits for a slot (a running guest of that class
    /// then yields its slot at the next tick).
    pub fn has_waiters_as(&self, priority: Priority) -> bool {
        !self.lock(priority).is_empty()
    }

    /// How many wait for a slot, of either class.
    pub fn waiting(&self) -> usize {
        [Priority::Normal, Priority::Low]
            .into_iter()
            .map(|p| {
                let class = self.lock(p);
                class.starting.len() + class.resuming.len()
            })
            .sum()
    }

    /// Slots free for stores in good standing right now.
    pub fn free(&self) -> usize {
        let class = self.lock(Priority::Normal);
        class.total - class.running
    }

    /// Hands free slots of `priority` to its waiters.
    fn dispatch(self: &Arc<Self>, priority: Priority, class: &mut Class) {
        while class.running < class.total {
            let Some(waiter) = class.next() else { return };
            class.running += 1;
            let slot = Slot {
                scheduler: self.clone(),
                priority,
                armed: true,
            };
            if let Err(mut unclaimed) = waiter.sender.send(slot) {
                // That waiter gave up (its call was cancelled): take the slot back without
                // releasing it through its drop.
                unclaimed.armed = false;
                class.running -= 1;
            }
        }
    }

    fn release(self: &Arc<Self>, priority: Priority) {
        let mut class = self.lock(priority);
        class.running -= 1;
        self.dispatch(priority, &mut class);
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
    async fn demoted_guests_never_take_a_slot_from_stores_in_good_standing() {
        let scheduler = SlotScheduler::new(2);
        let low = scheduler.acquire_as(Priority::Low).await;
        let s = scheduler.clone();
        let second_low = tokio::spawn(async move { s.acquire_as(Priority::Low).await });
        while scheduler.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        assert!(scheduler.has_waiters_as(Priority::Low));
        assert!(!scheduler.has_waiters_as(Priority::Normal));
        assert_eq!(
            scheduler.free(),
            2,
            "demoted guests hold slots of their own"
        );
        let first = scheduler.acquire().await;
        let second = scheduler.acquire().await;
        assert_eq!(
            scheduler.free(),
            0,
            "both slots went to stores in good standing"
        );
        assert!(
            !second_low.is_finished(),
            "demoted stores have one slot fewer: still one at a time"
        );
        drop((first, second));
        assert!(!second_low.is_finished());
        drop(low);
        drop(second_low.await.unwrap());
        assert_eq!(scheduler.free(), 2);
        assert_eq!(scheduler.waiting(), 0);
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
