//! The router's wait queue, per worker: requests that found every eligible endpoint at its
//! in-flight limit wait here, in order. A request finishing on this worker wakes the oldest
//! waiter; slots freed on other workers are noticed by each waiter's own short timer.
//!
//! Each waiter holds one place in the queue for its whole wait, and places of waiters that
//! left are dropped as they are met, or swept when they outnumber the live ones: the queue
//! stays bounded by the number of waiters. Not here: the limits (the pipeline applies them).
//!
//! Also the worker's drain signal ([`Drain`]): fired once at shutdown, it wakes the
//! connections waiting idle for a next request, so that they close at once.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::pin::pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_util::future::select;

#[derive(Default)]
struct Place {
    woken: Cell<bool>,
    queued: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

#[derive(Default)]
pub struct WaitQueue {
    places: RefCell<VecDeque<Rc<Place>>>,
    waiting: Cell<usize>,
}

impl WaitQueue {
    /// Requests waiting now.
    pub fn len(&self) -> usize {
        self.waiting.get()
    }

    /// Joins the queue; leaving is dropping the ticket.
    pub fn enter(&self) -> Ticket<'_> {
        self.waiting.set(self.waiting.get() + 1);
        Ticket {
            queue: self,
            place: Rc::new(Place::default()),
        }
    }

    /// Wakes the oldest waiter still waiting, if any.
    pub fn wake_one(&self) {
        let mut places = self.places.borrow_mut();
        while let Some(p) = places.pop_front() {
            p.queued.set(false);
            // The queue holds one reference; a live ticket holds the other.
            if Rc::strong_count(&p) > 1 {
                p.woken.set(true);
                if let Some(w) = p.waker.borrow_mut().take() {
                    w.wake();
                }
                return;
            }
        }
    }
}

pub struct Ticket<'a> {
    queue: &'a WaitQueue,
    place: Rc<Place>,
}

impl Ticket<'_> {
    /// Waits until woken by a finishing request or until `max` passes.
    pub async fn wait(&self, max: Duration) {
        if !self.place.queued.replace(true) {
            let mut places = self.queue.places.borrow_mut();
            places.push_back(self.place.clone());
            if places.len() > 2 * self.queue.waiting.get() + 16 {
                places.retain(|p| Rc::strong_count(p) > 1);
            }
        }
        let woken = poll_fn(|cx| {
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

    #[test]
    fn waking_skips_waiters_that_left() {
        let q = WaitQueue::default();
        let a = q.enter();
        let b = q.enter();
        for t in [&a, &b] {
            t.place.queued.set(true);
            q.places.borrow_mut().push_back(t.place.clone());
        }
        drop(a);
        assert_eq!(q.len(), 1);
        q.wake_one();
        assert!(b.place.woken.get());
        assert!(q.places.borrow().is_empty());
    }

    #[test]
    fn places_stay_bounded_while_nobody_wakes() {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(async {
                let q = WaitQueue::default();
                let live = q.enter();
                for _ in 0..200 {
                    let t = q.enter();
                    t.wait(Duration::from_millis(0)).await;
                    live.wait(Duration::from_millis(0)).await;
                }
                assert!(
                    q.places.borrow().len() <= 2 * q.len() + 17,
                    "{}",
                    q.places.borrow().len()
                );
            });
    }
}
