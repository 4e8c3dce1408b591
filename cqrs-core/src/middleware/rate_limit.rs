//! A limit on how often each actor may dispatch: a token bucket per actor.

use super::check::CheckFuture;
use crate::clock::{Clock, SystemClock};
use crate::{BoxError, Dispatch, DispatchError, HandlerError, MessageKind, Reply};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{Layer, Service};

/// Limits how often each actor may send commands and queries: a token bucket per
/// [`Metadata::actor`](crate::Metadata::actor) (the stable user id a gateway sets), refilled
/// at `per_second` up to `burst`. A dispatch past the limit is refused before the handler
/// runs, as [`ErrorKind::RateLimited`](crate::ErrorKind::RateLimited) (a 429), code
/// `rate_limited`, with `details.retry_after`: the whole seconds until the actor's next
/// dispatch is let through.
///
/// For the work a signed-in user can make a server do at will (read a large aggregate again
/// and again): a limit per address (the gateway's) lets one user with many addresses through,
/// and one per account lets one address with many accounts through, so a server wants both.
///
/// * Only what a caller starts is limited: a dispatch with an actor and no causation id (a
///   gateway's `Metadata::new().with_actor(..)`). Dispatches without an actor (requests before
///   sign-in, system work), dispatches caused by another message (a policy's commands, made
///   with `EventContext::caused`, which keeps the actor: the user's request was counted
///   once, and nothing retries a refused one behind an in-process event sink) and events (an
///   event bus handles what has happened; refusing it would dead-letter it) pass. So a gateway
///   must never take a causation id from its client's input: a client could pass the limit
///   by sending one.
/// * Memory is bounded: at most [`max_actors`](Self::max_actors) buckets (100,000 by default,
///   about 100 bytes each). When they are all taken, the buckets that have refilled (idle
///   actors) are dropped, in one pass over them under the mutex, at most once per refill time
///   (`burst / per_second`) and once a second; when none has, a new actor is let through
///   untracked until a later pass finds one that has (a pass is due at most once per refill
///   time and once a second, and runs when a new actor comes), logged at warn level at most
///   once per pass: an attacker with
///   that many busy accounts is past what a per-actor limit is for.
/// * The limit is per process: with several instances behind a load balancer, an actor gets
///   up to the limit from each.
/// * Time is read from a [`Clock`] ([`clock`](Self::clock); the system's by default), once per
///   dispatch of an actor; the buckets sit behind one mutex, held for a map lookup (and, when
///   they are all taken, for the pass above). A clock set back refills nothing.
/// * Clones of the layer share its buckets: one layer cloned onto a command bus and a query
///   bus gives each actor one budget for both. Set [`clock`](Self::clock) and
///   [`max_actors`](Self::max_actors) before cloning: on a layer already cloned they make a
///   limiter of its own, with no bucket.
///
/// Put it outside the layers that do work (a timeout, a unit of work), so a refused dispatch
/// costs nothing else; and inside the tracing and metrics layers, so refusals are traced and
/// counted.
///
/// ```
/// # use cqrs_core::doc::{OpenTicket, OpenTicketHandler};
/// use cqrs_core::middleware::RateLimitLayer;
/// use cqrs_core::{CommandBus, ErrorKind, Metadata};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let bus = CommandBus::builder()
///     .layer(RateLimitLayer::per_actor(0.01, 2))
///     .handler(OpenTicketHandler)
///     .build()?;
///
/// let alice = || Metadata::new().with_actor("alice");
/// let open = || OpenTicket { title: "Printer on fire".into() };
/// bus.dispatch_with(open(), alice()).await?;
/// bus.dispatch_with(open(), alice()).await?;
/// // A burst of two, refilled at one every 100 s.
/// let refused = bus.dispatch_with(open(), alice()).await.unwrap_err();
/// assert_eq!(refused.kind(), ErrorKind::RateLimited);
/// // Another actor has a bucket of its own; no actor, no limit.
/// bus.dispatch_with(open(), Metadata::new().with_actor("bob")).await?;
/// bus.dispatch_with(open(), Metadata::new()).await?;
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct RateLimitLayer {
    limiter: Arc<Limiter>,
}

impl fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let settings = &self.limiter.settings;
        f.debug_struct("RateLimitLayer")
            .field("per_second", &settings.per_second)
            .field("burst", &settings.burst)
            .field("max_actors", &settings.max_actors)
            .finish_non_exhaustive()
    }
}

/// A rate limit [`RateLimitLayer::try_per_actor`] refuses, saying why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidRateLimit(String);

impl RateLimitLayer {
    /// Each actor may dispatch `per_second` times a second on average, and `burst` times at
    /// once (a bucket starts full).
    ///
    /// # Panics
    ///
    /// When `per_second` is not a positive, finite number, or `burst` is 0: such a limit would
    /// refuse everything, or never refill. [`try_per_actor`](Self::try_per_actor) says so
    /// instead, for limits read from configuration.
    pub fn per_actor(per_second: f64, burst: u32) -> Self {
        Self::try_per_actor(per_second, burst).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`per_actor`](Self::per_actor), or why the limit is refused.
    ///
    /// ```
    /// use cqrs_core::middleware::RateLimitLayer;
    ///
    /// assert!(RateLimitLayer::try_per_actor(10.0, 20).is_ok());
    /// let refused = RateLimitLayer::try_per_actor(0.0, 20).unwrap_err();
    /// assert!(refused.to_string().contains("per_second"), "{refused}");
    /// ```
    pub fn try_per_actor(per_second: f64, burst: u32) -> Result<Self, InvalidRateLimit> {
        if !(per_second.is_finite() && per_second > 0.0) {
            return Err(InvalidRateLimit(format!(
                "RateLimitLayer::per_actor: per_second must be a positive, finite number of \
                 dispatches, got {per_second}"
            )));
        }
        if burst == 0 {
            return Err(InvalidRateLimit(
                "RateLimitLayer::per_actor: a burst of 0 would refuse every dispatch; use at \
                 least 1"
                    .to_owned(),
            ));
        }
        Ok(Self::new(Settings {
            per_second,
            burst: f64::from(burst),
            max_actors: 100_000,
            clock: Arc::new(SystemClock),
        }))
    }

    fn new(settings: Settings) -> Self {
        Self {
            limiter: Arc::new(Limiter {
                settings,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Reads time from `clock` (tests pass a [`ManualClock`](crate::clock::ManualClock)).
    pub fn clock(self, clock: Arc<dyn Clock>) -> Self {
        self.with(|limiter| limiter.clock = clock)
    }

    /// The most actors tracked at once (at least 1; 100,000 by default); see the type's docs.
    pub fn max_actors(self, max: usize) -> Self {
        self.with(|limiter| limiter.max_actors = max.max(1))
    }

    /// A layer of its own with the settings changed, and no bucket (the only difference from
    /// this one before it was used or cloned).
    fn with(self, change: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = self.limiter.settings.clone();
        change(&mut settings);
        Self::new(settings)
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

/// The service made by [`RateLimitLayer`].
#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Arc<Limiter>,
}

impl<S: fmt::Debug> fmt::Debug for RateLimit<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> Service<Dispatch> for RateLimit<S>
where
    S: Service<Dispatch, Response = Reply>,
    S::Error: Into<BoxError>,
{
    type Response = Reply;
    type Error = DispatchError;
    type Future = CheckFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| DispatchError::from_layer(e.into()))
    }

    fn call(&mut self, dispatch: Dispatch) -> Self::Future {
        let metadata = dispatch.metadata();
        let actor = match dispatch.kind() {
            MessageKind::Command | MessageKind::Query if metadata.causation_id.is_none() => {
                metadata.actor.as_deref()
            }
            _ => None,
        };
        match actor.map(|actor| self.limiter.take(actor)) {
            Some(Err(wait)) => CheckFuture::refused(self.limiter.refusal(wait)),
            Some(Ok(())) | None => CheckFuture::passed(self.inner.call(dispatch)),
        }
    }
}

/// The buckets, and what they are filled with.
struct Limiter {
    settings: Settings,
    state: Mutex<State>,
}

#[derive(Clone)]
struct Settings {
    per_second: f64,
    burst: f64,
    max_actors: usize,
    clock: Arc<dyn Clock>,
}

#[derive(Default)]
struct State {
    buckets: HashMap<String, Bucket>,
    /// When the buckets were last swept for refilled ones, with all of them taken: not again
    /// before a refill time has passed.
    swept: Option<DateTime<Utc>>,
}

/// An actor's tokens as of `at`.
struct Bucket {
    tokens: f64,
    at: DateTime<Utc>,
}

impl Bucket {
    /// Its tokens at `now`, refilled at `per_second` up to `burst`. A clock that went back
    /// refills nothing.
    fn refilled(&self, now: DateTime<Utc>, per_second: f64, burst: f64) -> f64 {
        let elapsed = (now - self.at).to_std().unwrap_or_default();
        (self.tokens + elapsed.as_secs_f64() * per_second).min(burst)
    }
}

impl Limiter {
    /// Takes a token of `actor`'s, or says how long until one is there.
    fn take(&self, actor: &str) -> Result<(), Duration> {
        let Settings {
            per_second,
            burst,
            max_actors,
            ref clock,
        } = self.settings;
        let now = clock.now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bucket) = state.buckets.get_mut(actor) {
            bucket.tokens = bucket.refilled(now, per_second, burst);
            bucket.at = now;
            if bucket.tokens >= 1.0 {
                bucket.tokens -= 1.0;
                return Ok(());
            }
            // A rate so low that the wait overflows a `Duration`: as good as never.
            return Err(
                Duration::try_from_secs_f64((1.0 - bucket.tokens) / per_second)
                    .unwrap_or(Duration::MAX),
            );
        }
        if state.buckets.len() >= max_actors && !self.sweep(&mut state, now) {
            return Ok(());
        }
        state.buckets.insert(
            actor.to_owned(),
            Bucket {
                tokens: burst - 1.0,
                at: now,
            },
        );
        Ok(())
    }

    /// Drops the buckets that have refilled (their actors idle for a refill time), at most
    /// once per refill time and once a second (a pass is over every bucket); whether there is
    /// room for a new one after it.
    fn sweep(&self, state: &mut State, now: DateTime<Utc>) -> bool {
        let Settings {
            per_second,
            burst,
            max_actors,
            ..
        } = self.settings;
        let every = Duration::try_from_secs_f64(burst / per_second)
            .unwrap_or(Duration::MAX)
            .max(Duration::from_secs(1));
        // A clock set back since the last pass makes one due, rather than none until the clock
        // catches up (meanwhile every new actor would pass untracked).
        let due = state
            .swept
            .is_none_or(|at| (now - at).to_std().map_or(true, |since| since >= every));
        if due {
            state.swept = Some(now);
            state
                .buckets
                .retain(|_, bucket| bucket.refilled(now, per_second, burst) < burst);
            if state.buckets.len() < max_actors {
                return true;
            }
            tracing::warn!(
                max_actors,
                "every rate-limit bucket is in use and none has refilled: new actors are let \
                 through untracked until a later pass (due at most once per refill time and once \
                 a second, run as a new actor comes) finds one that has (raise `max_actors`, or lower the limit's refill time)"
            );
        }
        false
    }

    /// The refusal of a dispatch that must wait `wait`.
    fn refusal(&self, wait: Duration) -> HandlerError {
        let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
        HandlerError::rate_limited(
            "rate_limited",
            format!(
                "too many requests: at most {} at once and {} a second; try again in {seconds} s",
                self.settings.burst, self.settings.per_second
            ),
        )
        .with_details(serde_json::json!({ "retry_after": seconds }))
    }
}
