//! Timeouts and sleeps whose timer lives on the heap.
//!
//! monoio's timer entry is cache-padded (about 640 bytes, 128-byte aligned). Held inline, it
//! makes every future that waits on a deadline that big, and such futures are copied each
//! time they move, once per request and more. Boxed, the timer costs one small allocation
//! and a [`Timeout`] is its inner future plus a pointer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use monoio::time::{Instant, Sleep};

/// The deadline passed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

pin_project_lite::pin_project! {
    /// `future`, unless the deadline passes first.
    pub struct Timeout<F> {
        #[pin]
        future: F,
        sleep: Pin<Box<Sleep>>,
    }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        this.sleep.as_mut().poll(cx).map(|()| Err(Elapsed))
    }
}

pub fn timeout<F: Future>(duration: Duration, future: F) -> Timeout<F> {
    Timeout {
        future,
        sleep: Box::pin(monoio::time::sleep(duration)),
    }
}

pub fn timeout_at<F: Future>(deadline: Instant, future: F) -> Timeout<F> {
    Timeout {
        future,
        sleep: Box::pin(monoio::time::sleep_until(deadline)),
    }
}

pub fn sleep(duration: Duration) -> Pin<Box<Sleep>> {
    Box::pin(monoio::time::sleep(duration))
}
