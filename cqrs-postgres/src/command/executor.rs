//! `PgCommandExecutor`: idempotent commands whose response commits with their effects.

use super::store_failure;
use crate::PgDatabase;
use crate::idempotency::Outcome;
use crate::unit_of_work::{HandBack, PgUnitOfWork};
use cqrs_core::ports::{StoreError, StoredResponse};
use cqrs_core::{
    Command, CommandBus, DispatchError, EventEnvelope, Extensions, HandlerError, Metadata,
};
use std::time::Duration;
use tracing::Instrument;

/// An idempotency key, as a request carries it (an `Idempotency-Key` header, for instance).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct IdempotencyKey {
    /// Where the key is unique: a route, a tenant, a user.
    pub scope: String,
    /// The key.
    pub key: String,
    /// A digest of the request: the same key with another fingerprint is refused.
    pub fingerprint: String,
    /// How long the response is replayed after it is stored.
    pub ttl: Duration,
}

impl IdempotencyKey {
    /// A key in `scope` for a request with this fingerprint, kept for `ttl`.
    pub fn new(
        scope: impl Into<String>,
        key: impl Into<String>,
        fingerprint: impl Into<String>,
        ttl: Duration,
    ) -> Self {
        Self {
            scope: scope.into(),
            key: key.into(),
            fingerprint: fingerprint.into(),
            ttl,
        }
    }
}

/// What an idempotent execution did.
#[derive(Debug)]
#[non_exhaustive]
pub enum Idempotent<O> {
    /// The command ran now; its response is stored with its effects.
    Executed {
        /// The handler's output.
        output: O,
        /// The response stored for the key.
        response: StoredResponse,
        /// The recorded events, when the layer keeps them (see
        /// [`PgCommandLayer::keep_events`](crate::PgCommandLayer::keep_events)); the bus's
        /// event sink, if it has one, was given them after the commit.
        events: Vec<EventEnvelope>,
        /// The global position of the last event it stored (`None` when it stored none): what
        /// a reader of a projection waits for to see this write
        /// ([`ProjectionWatch`](cqrs_core::projection::ProjectionWatch)). A replay
        /// ([`Idempotent::Replayed`]) has none: the stored response does not keep it.
        position: Option<cqrs_core::Position>,
    },
    /// The key was used before by the same request: its stored response, and nothing ran.
    Replayed(StoredResponse),
}

impl<O> Idempotent<O> {
    /// The response to send, either way.
    pub fn response(&self) -> &StoredResponse {
        match self {
            Idempotent::Executed { response, .. } | Idempotent::Replayed(response) => response,
        }
    }
}

/// Runs commands through a bus that has a [`PgCommandLayer`](crate::PgCommandLayer), with the
/// idempotency record in the command's own transaction.
///
/// [`execute_idempotent`](Self::execute_idempotent) claims the key in a new transaction, runs
/// the command in that same transaction (the layer takes it instead of beginning its own),
/// turns the output into the response to store, and commits the handler's writes, its events
/// and the response together. A concurrent request with the same key waits for that
/// transaction and then replays the response, or, still waiting after the claim wait
/// ([`PgDatabase::with_claim_wait`], 5 s), fails as unavailable ("still running: retry"); the
/// work runs once. If the handler fails or
/// panics, everything rolls back, the key included, and a retry runs the work again.
///
/// Round trips on a warm connection: `n + 4` for a handler running `n` statements (`BEGIN`,
/// the claim, the handler's `n`, one statement appending the events and storing the
/// response, `COMMIT`); 3 for a replay or a fingerprint mismatch (`BEGIN`, the claim,
/// `ROLLBACK`), 4 for a mismatch found while another request still holds the key (a read of
/// the stored fingerprint besides).
///
/// ```no_run
/// use cqrs_core::{CommandBus, Metadata};
/// use cqrs_core::ports::StoredResponse;
/// use cqrs_postgres::{IdempotencyKey, PgCommandExecutor};
/// # use cqrs_core::doc::{OpenTicket, OpenTicketHandler};
/// use std::time::Duration;
///
/// # async fn run(db: cqrs_postgres::PgDatabase) -> Result<(), Box<dyn std::error::Error>> {
/// let bus = CommandBus::builder().layer(db.command_layer()).handler(OpenTicketHandler).build()?;
/// let executor = PgCommandExecutor::new(bus, db);
/// let key = IdempotencyKey::new("POST /tickets", "key-from-header", "sha256-of-body", Duration::from_secs(86_400));
/// let done = executor
///     .execute_idempotent(&key, OpenTicket { title: "Printer on fire".into() }, Metadata::new(), |id| {
///         StoredResponse::new(201, serde_json::json!({ "id": id }))
///     })
///     .await?;
/// println!("{} {}", done.response().status, done.response().body);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct PgCommandExecutor {
    bus: CommandBus,
    db: PgDatabase,
}

impl PgCommandExecutor {
    /// An executor over `bus`, which must have `db.command_layer()` among its layers.
    pub fn new(bus: CommandBus, db: PgDatabase) -> Self {
        Self { bus, db }
    }

    /// The bus, for commands without a key.
    pub fn bus(&self) -> &CommandBus {
        &self.bus
    }

    /// Runs `command` once per key: see the type's documentation. `respond` turns the output
    /// into the response stored for the key, before the commit.
    ///
    /// Fails with the handler's error, with a [`StoreError::FingerprintMismatch`] as a handler
    /// error of kind `Invalid` when the key was used for another request, and with an
    /// unavailable error when Postgres is down, or when a duplicate still running held the key
    /// for the whole claim wait ([`PgDatabase::with_claim_wait`], 5 s by default; the error's
    /// source is then a [`ClaimWaitElapsed`](crate::ClaimWaitElapsed)). A commit whose answer was lost is a `Timeout`
    /// (it may have committed: retry with the key). When the bus's event sink refuses the
    /// events a `keep_events(true)` layer kept, this fails with the sink's error although the
    /// command and its response are stored: a retry with the key replays the response, and
    /// the sink does not get those events again (the relay still ships them).
    ///
    /// The key is held by the command's own transaction, so it is released when that ends.
    /// A handler that keeps the transaction idle longer than the server's
    /// `idle_in_transaction_timeout` (60 s from [`PgOptions`](crate::PgOptions)), waiting on a
    /// slow call to another service, loses it: its writes roll back, and a duplicate waiting
    /// on the key runs the handler again, so that other service sees the call twice. Make
    /// such calls before or after the command, or raise the timeout.
    pub async fn execute_idempotent<C, F>(
        &self,
        key: &IdempotencyKey,
        command: C,
        metadata: Metadata,
        respond: F,
    ) -> Result<Idempotent<C::Output>, DispatchError>
    where
        C: Command,
        F: FnOnce(&C::Output) -> StoredResponse,
    {
        let mut uow = PgUnitOfWork::new(self.db.clone());
        match uow
            .claim(&key.scope, &key.key, &key.fingerprint, key.ttl)
            .await
            .map_err(store_failure)?
        {
            Outcome::New => {}
            Outcome::Replay(response) => {
                uow.rollback().await;
                return Ok(Idempotent::Replayed(response));
            }
            Outcome::Mismatch => {
                uow.rollback().await;
                return Err(store_failure(StoreError::FingerprintMismatch {
                    scope: key.scope.clone(),
                    key: key.key.clone(),
                }));
            }
        }
        // The unit of work rides in the dispatch; the layer runs the command in it and hands
        // it back instead of committing. On a handler error or panic it is dropped with the
        // handler's context, and the transaction, claim included, rolls back.
        let hand_back = HandBack::default();
        let mut extensions = Extensions::new();
        extensions.insert(uow);
        extensions.insert(hand_back.clone());
        let executed = self
            .bus
            .execute_with_extensions(command, metadata, extensions)
            .await?;
        let Some(mut uow) = hand_back.take() else {
            return Err(DispatchError::Handler(HandlerError::internal(
                "the command bus has no PgCommandLayer: build it with `.layer(db.command_layer())`",
            )));
        };
        let response = respond(&executed.output);
        // Made by the server from the handler's output: a body Postgres cannot store is this
        // server's fault, not the client's (the store would refuse it as `Rejected`, a 4xx).
        if let Some(why) = response.unstorable() {
            return Err(DispatchError::Handler(HandlerError::internal(format!(
                "the response made of the command's output cannot be stored for its \
                 idempotency key ({why}); nothing was committed"
            ))));
        }
        uow.set_response(response.clone());
        // In a task of its own, as the layer commits: the handler succeeded, so the commit
        // finishes, and the events the layer kept reach the bus's sink (as `dispatch` hands
        // them on), even if the caller stops waiting (a timeout, a client gone). They are
        // also returned.
        let (bus, events) = (self.bus.clone(), executed.events.clone());
        let committed = tokio::spawn(
            async move {
                let position = uow.commit().await.map_err(store_failure)?;
                bus.sink_events(events).await?;
                Ok::<_, DispatchError>(position)
            }
            .in_current_span(),
        )
        .await;
        let position = match committed {
            Ok(committed) => committed?,
            Err(e) if e.is_panic() => {
                return Err(DispatchError::Handler(HandlerError::internal(e)));
            }
            // The runtime shutting down cancelled the commit: it may have reached the server,
            // so the outcome is unknown (a retry with the same key replays it if it committed).
            Err(e) => return Err(store_failure(crate::error::commit_cancelled(&e))),
        };
        Ok(Idempotent::Executed {
            output: executed.output,
            response,
            events: executed.events,
            position,
        })
    }
}
