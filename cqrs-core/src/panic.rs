//! Turning a panicking handler future into an error for that one message.

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};

pin_project_lite::pin_project! {
    /// Polls the inner future inside `catch_unwind`. No task is spawned and nothing is
    /// allocated: a panic while polling becomes `Err(message)` ([`panic_message`]). A panic
    /// while the future is dropped unfinished (a guard in it that panics on drop, when a
    /// timeout or a gone client drops it) is not caught: the buses guard their handlers with
    /// a guard of their own that also covers that; a server guarding its request handlers
    /// with this one covers panics while they run.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let answer = cqrs_core::CatchUnwind::new(async { panic!("a bug") }).await;
    /// assert_eq!(answer, Err::<(), _>("a bug".to_owned()));
    /// # });
    /// ```
    pub struct CatchUnwind<F> {
        #[pin]
        inner: F,
    }
}

impl<F> std::fmt::Debug for CatchUnwind<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatchUnwind").finish_non_exhaustive()
    }
}

impl<F> CatchUnwind<F> {
    /// Guards `inner`. A future that panics when it is created (before it is polled) is not
    /// covered: wrap the call in an `async` block.
    pub fn new(inner: F) -> Self {
        Self { inner }
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        // The future is dropped by the caller after a panic and never polled again, so a
        // broken invariant inside it cannot be observed: asserting unwind safety is sound.
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Err(payload) => Poll::Ready(Err(into_message(payload))),
        }
    }
}

/// The message of a caught panic's payload ([`panic_message`]), the payload dropped inside a
/// guard of its own: a handler may `panic_any` a value whose `Drop` panics too, and that second
/// panic must not unwind through the guard that caught the first. Such a payload is leaked.
pub(crate) fn into_message(payload: Box<dyn Any + Send>) -> String {
    let message = panic_message(payload.as_ref());
    if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
        // Its payload may panic when dropped as well: leaked, not dropped.
        let _ = std::mem::ManuallyDrop::new(again);
    }
    message
}

/// The message of a panic's payload: the `&str` or `String` given to `panic!`, or a fixed
/// text for any other payload.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic payload".to_owned()
    }
}

/// Drops `value` (a future cancelled at its timeout) inside a panic guard: one whose guard
/// checks, on drop, that its work finished would otherwise panic out of whoever cut it off
/// (a consume loop, the health report, a periodic job), instead of failing as the timeout it
/// is. The panic is logged and stops here.
pub(crate) fn drop_cancelled<T>(value: T) {
    drop_caught(
        value,
        "work cancelled at its timeout panicked when it was dropped; the panic stops here",
    );
}

/// Drops a handler's future that finished, keeping a panic in its drop here (logged): the
/// handler's work is done, so the panic is no failure of it.
pub(crate) fn drop_finished<T>(value: T) {
    drop_caught(
        value,
        "a handler's future panicked when it was dropped after it finished; the panic stops \
         here",
    );
}

/// Drops `value` inside a panic guard, logging a panic with `message`.
fn drop_caught<T>(value: T, message: &str) {
    if let Err(payload) = catch_unwind(AssertUnwindSafe(move || drop(value))) {
        tracing::error!(panic = %into_message(payload), "{message}");
    }
}

/// `work`'s output, or `None` when it ran past `timeout` (and was dropped, by
/// [`drop_cancelled`]). No limit with `None`.
pub(crate) async fn within<T>(
    timeout: Option<std::time::Duration>,
    work: impl Future<Output = T>,
) -> Option<T> {
    let Some(limit) = timeout else {
        return Some(work.await);
    };
    let mut work = Box::pin(work);
    match tokio::time::timeout(limit, &mut work).await {
        Ok(done) => Some(done),
        Err(_) => {
            drop_cancelled(work);
            None
        }
    }
}
