//! The router's wait queue, per worker: requests that found every eligible endpoint of
//! their model busy (at its in-flight limit, or saturated as the engine reports it) wait
//! here. A request finishing on this worker wakes the waiter that goes next; slots freed
//! on other workers are noticed by each waiter's own short timer, and taken only by the
//! waiter whose turn it is.
//!
//! Whose turn: among the waiters for the same model, the highest priority class first;
//! within a class, the one whose tenant has had the fewest tokens lately (its share, so a
//! flooding tenant cannot starve a quiet one); then first come. Not here: the limits, the
//! classes and shares themselves (the pipeline gives them).
//!
//! Also the worker's drain signal ([`Drain`]): fired once at shutdown, it wakes the
//! connections waiting idle for a next request, so that they close at once.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::pin::pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_util::future::select;

/// Where a waiter stands.
pub struct Rank {
    /// Waiters compete within a group (the model's pool).
    pub group: usize,
    /// Higher goes first.
    pub class: u8,
    /// Lower goes first within a class: read when turns are decided, so it moves as the
    /// tenant's usage does.
    pub share: Box<dyn Fn() -> f64>,
}

struct Place {
    woken: Cell<bool>,
    waker: RefCell<Option<Waker>>,
    rank: Rank,
    seq: u64,
}

impl Place {
    /// Sorts before `other`: higher class, lower share, earlier.
    fn before(&self, share: f64, other: &Place, other_share: f64) -> bool {
        (std::cmp::Reverse(self.rank.class), share, self.seq)
            .partial_cmp(&(std::cmp::Reverse(other.rank.class), other_share, other.seq))
            .is_some_and(std::cmp::Ordering::is_lt)
    }
}

#[derive(Default)]
pub struct WaitQueue {
    /// Every live ticket's place (and some of tickets gone, swept now and then).
    places: RefCell<Vec<Rc<Place>>>,
    waiting: Cell<usize>,
    seq: Cell<u64>,
}

impl WaitQueue {
    /// Requests waiting now.
    pub fn len(&self) -> usize {
        self.waiting.get()
    }

    /// Whether any request waits for `group`.
    pub fn has_group(&self, group: usize) -> bool {
        self.places
            .borrow()
            .iter()
            .any(|p| Rc::strong_count(p) > 1 && p.rank.group == group)
    }

    /// Joins the queue; leaving is dropping the ticket.
    pub fn enter(&self, rank: Rank) -> Ticket<'_> {
        self.waiting.set(self.waiting.get() + 1);
        self.seq.set(self.seq.get() + 1);
        let place = Rc::new(Place {
            woken: Cell::new(false),
            waker: RefCell::new(None),
            rank,
            seq: self.seq.get(),
        });
        let mut places = self.places.borrow_mut();
        if places.len() > 2 * self.waiting.get() + 16 {
            places.retain(|p| Rc::strong_count(p) > 1);
        }
        places.push(place.clone());
        Ticket { queue: self, place }
    }

    /// The live place whose turn it is in `group` (any group when none waits there).
    fn next(&self, group: Option<usize>) -> Option<Rc<Place>> {
        let places = self.places.borrow();
        let live = || places.iter().filter(|p| Rc::strong_count(p) > 1);
        let mut best: Option<(&Rc<Place>, f64)> = None;
        for p in live().filter(|p| group.is_none_or(|g| p.rank.group == g)) {
            let share = (p.rank.share)();
            if best.is_none_or(|(b, bs)| p.before(share, b, bs)) {
                best = Some((p, share));
            }
        }
        best.map(|(p, _)| p.clone())
    }

    /// Wakes the waiter whose turn it is: for `group` (the model a finished request freed
    /// a slot of), else any.
    pub fn wake_one(&self, group: usize) {
        let next = self.next(Some(group)).or_else(|| self.next(None));
        if let Some(p) = next {
            p.woken.set(true);
            if let Some(w) = p.waker.borrow_mut().take() {
                w.wake();
            }
        }
    }
}

pub struct Ticket<'a> {
    queue: &'a WaitQueue,
    place: Rc<Place>,
}

impl Ticket<'_> {
    /// Whether it is this waiter's turn in its group.
    pub fn first(&self) -> bool {
        self.queue
            .next(Some(self.place.rank.group))
            .is_some_and(|p| Rc::ptr_eq(&p, &self.place))
    }

    /// Waits until woken by a finishing request or until `max` passes.
    pub async fn wait(&self, max: Duration) {
        let woken = poll_fn(|cx: &mut Context<'_>| {
            if self.place.woken.replace(false) {
                Poll::Ready(())
            } else {
                *self.place.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        });
        select(pin!(woken), crate::time::sleep(max)).await;
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.queue.waiting.set(self.queue.waiting.get() - 1);
    }
}

/// A worker's drain signal: fired once, at shutdown; idle connections wait on it.
#[derive(Default)]
pub struct Drain {
    fired: Cell<bool>,
    waiters: RefCell<HashMap<u64, Waker>>,
    next: Cell<u64>,
}

impl Drain {
    pub fn fire(&self) {
        if !self.fired.replace(true) {
            for (_, w) in self.waiters.take() {
                w.wake();
            }
        }
    }

    pub fn fired(&self) -> bool {
        self.fired.get()
    }

    /// Completes when the signal fires; dropping it leaves nothing behind.
    pub fn wait(&self) -> DrainWait<'_> {
        let key = self.next.get();
        self.next.set(key.wrapping_add(1));
        DrainWait { drain: self, key }
    }
}

pub struct DrainWait<'a> {
    drain: &'a Drain,
    key: u64,
}

impl Future for DrainWait<'_> {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.drain.fired.get() {
            return Poll::Ready(());
        }
        self.drain.waiters.borrow_mut().insert(self.key, cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for DrainWait<'_> {
    fn drop(&mut self) {
        self.drain.waiters.borrow_mut().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(group: usize, class: u8, share: f64) -> Rank {
        Rank {
            group,
            class,
            share: Box::new(move || share),
        }
    }

    #[test]
    fn turns_go_by_class_then_share_then_arrival_within_a_group() {
        let q = WaitQueue::default();
        let heavy = q.enter(rank(0, 1, 900.0));
        let light = q.enter(rank(0, 1, 10.0));
        let light_later = q.enter(rank(0, 1, 10.0));
        let other_model = q.enter(rank(1, 0, 0.0));
        assert!(light.first() && !heavy.first() && !light_later.first());
        assert!(other_model.first(), "each model has its own turn");
        let urgent = q.enter(rank(0, 2, 5000.0));
        assert!(urgent.first() && !light.first());
        q.wake_one(0);
        assert!(urgent.place.woken.get());
        drop(urgent);
        assert!(light.first());
        drop(light);
        assert!(light_later.first());
        drop(light_later);
        assert!(heavy.first());
        assert_eq!(q.len(), 2);
        // A slot of a model nobody waits for goes to any waiter.
        drop(heavy);
        q.wake_one(7);
        assert!(other_model.place.woken.get());
    }

    #[test]
    fn places_stay_bounded_while_waiters_come_and_go() {
        let q = WaitQueue::default();
        let live = q.enter(rank(0, 1, 0.0));
        for _ in 0..200 {
            drop(q.enter(rank(0, 1, 0.0)));
        }
        assert!(live.first());
        assert!(
            q.places.borrow().len() <= 2 * (q.len() + 1) + 17,
            "{}",
            q.places.borrow().len()
        );
    }
}
