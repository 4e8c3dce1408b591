//! A global allocator that counts the allocations of the current thread, and helpers that count
//! those of one dispatch.

use cqrs_benches::fixtures::Increment;
use cqrs_core::{CommandBus, Metadata};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use tokio::runtime::Runtime;

thread_local! {
    // Per thread, so tests running in parallel do not count each other's allocations. A `const`
    // initialiser and a type without `Drop`: reading it never allocates and never fails, not
    // even while the thread is being torn down, which an allocator needs.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

/// Forwards every call to [`System`] and counts `alloc`, `alloc_zeroed` and `realloc` (a
/// growing collection is an allocation too).
struct Counting;

fn count() {
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

// The one place unsafe code is allowed in this crate (it is denied, not forbidden, for this):
// a global allocator can only be written as `unsafe impl GlobalAlloc`. Each method forwards its
// arguments unchanged to `System`, so `System` upholds the contract the caller relies on.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's guarantees for `alloc` are passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: `ptr` was allocated by `System` through this allocator with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` through this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made on this thread so far.
fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// The runtime the benchmarks use: one thread, with the timer the timeout layer needs.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime")
}

/// Polls `dispatch` once inside `rt` and returns its output with the allocations that poll
/// made. The handlers counted with it finish without waiting, so one poll must complete the
/// dispatch: that keeps the runtime's own scheduling out of the count. For a handler that
/// waits, see [`allocations_until_done`].
pub fn allocations_of<F: Future>(rt: &Runtime, dispatch: F) -> (F::Output, u64) {
    rt.block_on(async {
        let mut dispatch = pin!(dispatch);
        let polled = std::future::poll_fn(|cx| {
            let before = allocations();
            let poll = dispatch.as_mut().poll(cx);
            Poll::Ready((poll, allocations() - before))
        })
        .await;
        match polled {
            (Poll::Ready(output), allocations) => (output, allocations),
            (Poll::Pending, _) => panic!("the dispatch did not finish on its first poll"),
        }
    })
}

/// Drives `dispatch` to completion inside `rt`, polling it wherever the runtime wakes it, and
/// returns its output, the allocations made during all of its polls together, and how many
/// polls it took. What the runtime does between the polls is not counted; what the dispatch
/// asks of it during a poll (registering a timer, deferring a wake-up) is.
pub fn allocations_until_done<F: Future>(rt: &Runtime, dispatch: F) -> (F::Output, u64, u32) {
    rt.block_on(async {
        let mut dispatch = pin!(dispatch);
        let (mut counted, mut polls) = (0, 0);
        let output = std::future::poll_fn(|cx| {
            let before = allocations();
            let poll = dispatch.as_mut().poll(cx);
            counted += allocations() - before;
            polls += 1;
            poll
        })
        .await;
        (output, counted, polls)
    })
}

/// The allocations of each of [`RUNS`] dispatches of [`Increment`] on `bus` (each checked to
/// answer), after [`WARM_UP`] uncounted ones, on a runtime of its own.
pub fn command_allocations(bus: &CommandBus) -> Vec<u64> {
    let rt = runtime();
    let metadata = Metadata::new();
    let mut counted = Vec::new();
    for value in 0..WARM_UP + RUNS {
        let (output, allocations) = allocations_of(
            &rt,
            bus.dispatch_with(Increment { value }, metadata.clone()),
        );
        assert_eq!(output.expect("the dispatch succeeds"), value + 1);
        if value >= WARM_UP {
            counted.push(allocations);
        }
    }
    counted
}

/// How many dispatches each check makes before it counts: the first ones initialise lazy
/// state (tracing's callsite registry, the runtime's timer) that later ones reuse.
pub const WARM_UP: u64 = 3;

/// How many dispatches each check counts.
pub const RUNS: u64 = 20;
