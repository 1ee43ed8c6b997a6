//! The router's wait queue, per worker: requests that found every eligible endpoint of
//! their model busy (at its in-flight limit, or saturated as the engine reports it) wait
//! here. A request finishing on this worker wakes the waiter that goes next; slots freed
//! on other workers are noticed by each waiter's own short timer, and taken only by the
//! waiter whose turn it is.
//!
//! Whose turn: among the waiters for the same model, the highest priority class first;
//! within a class, the lowest tag of start-time fair queuing, then first come. A tenant's
//! request is tagged where its tenant's previous one ends (in tokens), or at the queue's
//! clock (the tag last served) if that is later: so one tenant's requests keep their order,
//! and a quiet tenant's go before a flooding one's backlog. The order is kept sorted (a
//! `BTreeMap`): whose turn it is costs a lookup, however many wait. Not here: the limits,
//! the classes and the tenants' tags (the pipeline gives them).
//!
//! Also the worker's drain signal ([`Drain`]): fired once at shutdown, it wakes the
//! connections waiting idle for a next request, so that they close at once.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::future::poll_fn;
use std::pin::pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_util::future::select;

/// Where a waiter stands.
#[derive(Clone, Copy, Debug)]
pub struct Rank {
    /// Waiters compete within a group (the model's pool).
    pub group: usize,
    /// Higher goes first.
    pub class: u8,
    /// Lower goes first within a class: the fair-queuing tag ([`WaitQueue::clock`] for a
    /// request of no tenant).
    pub tag: u64,
}

/// A place's position in the order: group, then class (higher first), tag, arrival.
type Order = (usize, u8, u64, u64);

struct Place {
    woken: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

#[derive(Default)]
pub struct WaitQueue {
    order: RefCell<BTreeMap<Order, Rc<Place>>>,
    seq: Cell<u64>,
    /// The virtual clock: the tag last served.
    clock: Cell<u64>,
}

impl WaitQueue {
    /// The tag last served (where a tenant with nothing waiting starts).
    pub fn clock(&self) -> u64 {
        self.clock.get()
    }

    /// Requests waiting now.
    pub fn len(&self) -> usize {
        self.order.borrow().len()
    }

    /// Whether any request waits for `group`.
    pub fn has_group(&self, group: usize) -> bool {
        self.first_of(group).is_some()
    }

    fn first_of(&self, group: usize) -> Option<(Order, Rc<Place>)> {
        self.order
            .borrow()
            .range((group, 0, 0, 0)..=(group, u8::MAX, u64::MAX, u64::MAX))
            .next()
            .map(|(k, p)| (*k, p.clone()))
    }

    /// Joins the queue; leaving is dropping the ticket.
    pub fn enter(&self, rank: Rank) -> Ticket<'_> {
        self.seq.set(self.seq.get() + 1);
        let key = (rank.group, u8::MAX - rank.class, rank.tag, self.seq.get());
        let place = Rc::new(Place {
            woken: Cell::new(false),
            waker: RefCell::new(None),
        });
        self.order.borrow_mut().insert(key, place.clone());
        Ticket {
            queue: self,
            key,
            place,
        }
    }

    /// Wakes the waiter whose turn it is: for `group` (the model a finished request freed
    /// a slot of), else the first of any group.
    pub fn wake_one(&self, group: usize) {
        let next = self
            .first_of(group)
            .or_else(|| self.order.borrow().iter().next().map(|(k, p)| (*k, p.clone())));
        if let Some((_, p)) = next {
            p.woken.set(true);
            if let Some(w) = p.waker.borrow_mut().take() {
                w.wake();
            }
        }
    }
}

pub struct Ticket<'a> {
    queue: &'a WaitQueue,
    key: Order,
    place: Rc<Place>,
}

impl Ticket<'_> {
    /// This waiter got its slot: the clock moves to its tag.
    pub fn served(&self) {
        if self.key.2 != u64::MAX {
            self.queue.clock.set(self.queue.clock.get().max(self.key.2));
        }
    }

    /// Whether it is this waiter's turn in its group.
    pub fn first(&self) -> bool {
        self.queue.first_of(self.key.0).is_some_and(|(k, _)| k == self.key)
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
        self.queue.order.borrow_mut().remove(&self.key);
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

    fn rank(group: usize, class: u8, tag: u64) -> Rank {
        Rank { group, class, tag }
    }

    #[test]
    fn turns_go_by_class_then_share_then_arrival_within_a_group() {
        let q = WaitQueue::default();
        let heavy = q.enter(rank(0, 1, 900));
        let light = q.enter(rank(0, 1, 10));
        let light_later = q.enter(rank(0, 1, 10));
        let other_model = q.enter(rank(1, 0, 0));
        assert!(light.first() && !heavy.first() && !light_later.first());
        assert!(other_model.first(), "each model has its own turn");
        let urgent = q.enter(rank(0, 2, 5000));
        assert!(urgent.first() && !light.first());
        q.wake_one(0);
        assert!(urgent.place.woken.get());
        urgent.served();
        assert_eq!(q.clock(), 5000);
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
        drop(other_model);
        assert_eq!(q.len(), 0);
        assert!(!q.has_group(0));
    }
}
