//! `PgCommandLayer`: one transaction per command.

use super::{dispatch_error, store_failure};
use crate::PgDatabase;
use crate::unit_of_work::{HandBack, PgUnitOfWork, StreamFor};
use cqrs_core::{BoxError, Dispatch, DispatchError, EventRecord, HandlerError, MessageKind, Reply};
use futures_util::future::BoxFuture;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::{Layer, Service};
use tracing::Instrument;

/// A tower layer for the [`CommandBus`](cqrs_core::CommandBus) that runs each command in one
/// Postgres transaction.
///
/// For each command it puts a [`PgUnitOfWork`] in the handler's context; the handler reads
/// and writes through it ([`PgUnitOfWork::from_context`]). When the handler succeeds, the
/// layer takes the events it recorded out of the reply
/// ([`Reply::take_events`](cqrs_core::Reply::take_events)), appends them to the event store
/// in the same transaction (the outbox: a [`PgOutboxRelay`](crate::PgOutboxRelay) ships them
/// after commit), and commits. When the handler fails or panics, the transaction rolls back:
/// no rows, no events, nothing published. Queries and events pass through untouched.
///
/// A dispatch that already carries a [`PgUnitOfWork`] (put there with
/// [`CommandBus::execute_with_extensions`](cqrs_core::CommandBus::execute_with_extensions))
/// runs in it instead of a new one, and the layer commits it the same way: a caller can read
/// or write in the transaction before the command runs.
///
/// A second `PgCommandLayer` on the same path (a plugin's beside the server's) joins the
/// first one's unit of work, which commits once. One for another schema, or with other
/// settings ([`stream_for`](Self::stream_for), [`keep_events`](Self::keep_events): only the
/// first one's would apply), fails the command with a [`DispatchError::Middleware`] saying
/// so, before the handler runs. Two layers made with `db.command_layer()` alone have the same
/// settings; so have clones of one layer.
///
/// Recorded events are appended at [`ExpectedVersion::Any`](cqrs_core::ExpectedVersion) to
/// the stream [`stream_for`](Self::stream_for) names: by default their partition key (set by
/// `ctx.record_keyed`), else their event type.
///
/// # Round trips
///
/// On a warm connection (statements already prepared), a command whose handler runs `n`
/// statements of its own costs `n + 3` round trips: `BEGIN`, the handler's `n`, one append of
/// the recorded events, `COMMIT`. A handler that only records events costs 1 (the append is
/// its own transaction); one that records nothing and touches nothing costs 0. Each further
/// stream among the recorded events adds one append, and, to a handler that ran no
/// statement, a `BEGIN` and a `COMMIT` too (two streams and nothing else: 4). The tests
/// measure these numbers.
///
/// ```no_run
/// use cqrs_core::CommandBus;
/// # use cqrs_core::doc::OpenTicketHandler;
///
/// # async fn run(db: cqrs_postgres::PgDatabase) -> Result<(), Box<dyn std::error::Error>> {
/// let bus = CommandBus::builder()
///     .layer(db.command_layer())
///     .handler(OpenTicketHandler)
///     .build()?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PgCommandLayer {
    config: Arc<Config>,
}

struct Config {
    db: PgDatabase,
    /// `None`: [`default_stream`].
    stream_for: Option<Arc<StreamFor>>,
    keep_events: bool,
}

impl Config {
    /// Whether a layer with `other` would stage and hand on recorded events as this one does:
    /// the same `keep_events`, and the default stream rule or the same `stream_for` closure.
    fn same_settings(&self, other: &Config) -> bool {
        let same_streams = match (&self.stream_for, &other.stream_for) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        same_streams && self.keep_events == other.keep_events
    }
}

/// The settings of the layer running a dispatch's unit of work, for a second layer joining it.
#[derive(Clone)]
struct Running(Arc<Config>);

impl std::fmt::Debug for PgCommandLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCommandLayer")
            .field("schema", &self.config.db.schema())
            .field("keep_events", &self.config.keep_events)
            .finish_non_exhaustive()
    }
}

fn default_stream(record: &EventRecord) -> String {
    record
        .partition_key
        .clone()
        .unwrap_or_else(|| record.event_type.clone())
}

impl PgCommandLayer {
    /// A layer writing to `db`.
    pub fn new(db: PgDatabase) -> Self {
        Self {
            config: Arc::new(Config {
                db,
                stream_for: None,
                keep_events: false,
            }),
        }
    }

    fn with(self, change: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config {
            db: self.config.db.clone(),
            stream_for: self.config.stream_for.clone(),
            keep_events: self.config.keep_events,
        };
        change(&mut config);
        Self {
            config: Arc::new(config),
        }
    }

    /// Names the stream each recorded event is appended to. Default: its partition key, else
    /// its event type.
    pub fn stream_for(self, f: impl Fn(&EventRecord) -> String + Send + Sync + 'static) -> Self {
        self.with(|c| c.stream_for = Some(Arc::new(f)))
    }

    /// Leaves the recorded events in the reply after storing them, so the bus hands them to
    /// its event sink after the commit as well (in-process delivery beside the relay).
    /// Default `false`: the relay is their only way out.
    pub fn keep_events(self, keep: bool) -> Self {
        self.with(|c| c.keep_events = keep)
    }
}

impl<S> Layer<S> for PgCommandLayer {
    type Service = PgCommand<S>;

    fn layer(&self, inner: S) -> PgCommand<S> {
        PgCommand {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service made by [`PgCommandLayer`].
#[derive(Clone)]
pub struct PgCommand<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> std::fmt::Debug for PgCommand<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCommand")
            .field("schema", &self.config.db.schema())
            .finish_non_exhaustive()
    }
}

impl<S> Service<Dispatch> for PgCommand<S>
where
    S: Service<Dispatch, Response = Reply>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Reply;
    type Error = DispatchError;
    type Future = BoxFuture<'static, Result<Reply, DispatchError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), DispatchError>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| dispatch_error(e.into()))
    }

    fn call(&mut self, mut dispatch: Dispatch) -> Self::Future {
        if dispatch.kind() != MessageKind::Command {
            return pass_through(&mut self.inner, dispatch);
        }
        // A second layer on the path (the server's and a plugin's, say) joins the unit of work
        // of the first, which commits it: committing here would leave the outer one nothing.
        if let Some(outer) = dispatch
            .extensions()
            .get::<PgUnitOfWork>()
            .filter(|uow| uow.is_layered())
        {
            if !outer.database().is_same_store(&self.config.db) {
                let message = format!(
                    "two PgCommandLayers on one bus, for the {} and the {}: a command runs in \
                     one transaction, so keep one layer",
                    outer.database().place(),
                    self.config.db.place()
                );
                return Box::pin(async move { Err(DispatchError::Middleware(message.into())) });
            }
            let outer_settings = dispatch.extensions().get::<Running>();
            if !outer_settings.is_some_and(|outer| outer.0.same_settings(&self.config)) {
                let message = "two PgCommandLayers on one bus with different settings \
                               (`stream_for`, `keep_events`): the second joins the first one's \
                               transaction, and only the first one's settings would apply to \
                               the events the command records; keep one layer, or give both \
                               the same settings (clones of one layer)";
                return Box::pin(async move { Err(DispatchError::Middleware(message.into())) });
            }
            return pass_through(&mut self.inner, dispatch);
        }
        // A unit of work already in the dispatch was opened by the caller
        // (`CommandBus::execute_with_extensions`): the command runs in it, if it is for this
        // layer's schema (the relay of another would never ship its events).
        let uow = match dispatch.extensions_mut().remove::<PgUnitOfWork>() {
            Some(uow) if !uow.database().is_same_store(&self.config.db) => {
                let message = format!(
                    "the unit of work given with the command is for the {}, but the bus's \
                     PgCommandLayer is for the {}: make the PgCommandExecutor (or the unit of \
                     work) with the same PgDatabase as the layer",
                    uow.database().place(),
                    self.config.db.place()
                );
                return Box::pin(async move { Err(DispatchError::Middleware(message.into())) });
            }
            Some(uow) => uow,
            None => PgUnitOfWork::new(self.config.db.clone()),
        };
        dispatch.extensions_mut().insert(uow.layered());
        dispatch
            .extensions_mut()
            .insert(Running(self.config.clone()));
        let hand_back = dispatch.extensions().get::<HandBack>().cloned();
        // On a handler error or panic the context, and the unit of work with it, is dropped
        // inside the inner future: the transaction rolls back there.
        let future = self.inner.call(dispatch);
        let config = self.config.clone();
        Box::pin(async move {
            let mut reply = future.await.map_err(|e| {
                let error = dispatch_error(e.into());
                // A failover may have left the pool on a server that takes no writes.
                config.db.retire_if_refused_as_read_only(&error);
                error
            })?;
            let mut uow = reply
                .extensions_mut()
                .remove::<PgUnitOfWork>()
                .ok_or_else(|| {
                    DispatchError::Handler(HandlerError::internal(
                        "the handler took the PgUnitOfWork out of its context; borrow it instead",
                    ))
                })?;
            let envelopes = if config.keep_events {
                reply.events().to_vec()
            } else {
                reply.take_events()
            };
            let records = envelopes
                .iter()
                .map(EventRecord::from_envelope)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| DispatchError::Handler(HandlerError::internal(e)))?;
            let stream_for: &StreamFor = match &config.stream_for {
                Some(f) => f.as_ref(),
                None => &default_stream,
            };
            uow.stage_recorded(records, stream_for);
            match hand_back {
                // The executor commits, after it has staged the idempotency response.
                Some(hand_back) => hand_back.put(uow),
                // In a task of its own: the handler succeeded, so the commit finishes even if
                // the caller stops waiting (a timeout, a client gone). Dropped half-way, the
                // outcome would depend on whether COMMIT had reached the server; now a
                // command whose handler succeeded commits, and its events ship.
                None => match tokio::spawn(uow.commit().in_current_span()).await {
                    Ok(committed) => {
                        let extensions = reply.extensions_mut();
                        match committed.map_err(store_failure)? {
                            Some(position) => {
                                extensions.insert(cqrs_core::StoredPosition(position));
                            }
                            // One handed in with the dispatch (an earlier command's
                            // extensions passed on) is not this command's.
                            None => {
                                extensions.remove::<cqrs_core::StoredPosition>();
                            }
                        }
                    }
                    Err(e) if e.is_panic() => {
                        return Err(DispatchError::Handler(HandlerError::internal(e)));
                    }
                    // The runtime shutting down cancelled the commit: it may have reached the
                    // server, so the outcome is unknown, as with a commit cut off mid-way.
                    Err(e) => return Err(store_failure(crate::error::commit_cancelled(&e))),
                },
            }
            Ok(reply)
        })
    }
}

/// Calls the inner service with `dispatch` untouched, only converting its error.
fn pass_through<S>(
    inner: &mut S,
    dispatch: Dispatch,
) -> BoxFuture<'static, Result<Reply, DispatchError>>
where
    S: Service<Dispatch, Response = Reply>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let future = inner.call(dispatch);
    Box::pin(async move { future.await.map_err(|e| dispatch_error(e.into())) })
}
