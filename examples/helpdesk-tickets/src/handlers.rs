//! The tickets plugin's commands, queries and their handlers.

use crate::domain::{Priority, Status, Ticket, TicketCommand, TicketState, closed};
use crate::index::{Cursors, ListFilter, TicketIndex};
use crate::postgres::PgTicketIndex;
use crate::stats::{Stats, StatsReader};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_core::clock::Clock;
use cqrs_core::ports::{EventStore, ExpectedVersion, StoreError};
use cqrs_core::{
    AggregateError, AggregateRepository, Command, CommandContext, CommandHandler, EventTypes,
    HandlerError, Loaded, Metadata, Query, QueryContext, QueryHandler,
};
use cqrs_postgres::{PgEventStore, PgUnitOfWork};
use helpdesk_api::{Role, User, UserDirectory};
use serde::Serialize;
use serde_json::json;
use std::sync::Arc;
use uuid::Uuid;

/// How often a change without `expected_version` is tried when another writer got in first:
/// each round has one winner, so this many writers racing on one ticket all land (the same
/// number as the Postgres path's commit attempts).
const RETRIES: usize = 20;

/// A change to one ticket.
#[derive(Clone, Debug)]
pub enum Change {
    /// Assign to an agent.
    Assign {
        /// The agent.
        assignee_id: Uuid,
    },
    /// Comment.
    Comment {
        /// The text (1 to 10,000 characters).
        body: String,
    },
    /// Close.
    Close {
        /// Why.
        resolution: Option<String>,
    },
}

/// Opens a ticket.
#[derive(Debug, Command)]
#[cqrs(name = "tickets.open", output = Ticket)]
pub struct OpenTicket {
    /// The reporter.
    pub user: User,
    /// The title, as sent (trimmed here).
    pub title: String,
    /// The description.
    pub description: Option<String>,
    /// The priority.
    pub priority: Option<Priority>,
}

/// Changes a ticket.
#[derive(Debug, Command)]
#[cqrs(name = "tickets.change", output = Ticket)]
pub struct ChangeTicket {
    /// Who.
    pub user: User,
    /// Which ticket.
    pub id: Uuid,
    /// The version the client saw; another is a conflict.
    pub expected_version: Option<u64>,
    /// What.
    pub change: Change,
}

/// Reads one ticket with its comments.
#[derive(Debug, Query)]
#[cqrs(name = "tickets.get", output = Ticket)]
pub struct GetTicket {
    /// Who asks.
    pub user: User,
    /// Which.
    pub id: Uuid,
}

/// Whether a user may see one ticket (follow it on the WebSocket): `false` for a ticket that
/// does not exist or is another customer's. Answered from the ticket list where it can tell,
/// without reading the ticket.
#[derive(Debug, Query)]
#[cqrs(name = "tickets.may_see", output = bool)]
pub struct MaySeeTicket {
    /// Who asks.
    pub user: User,
    /// Which.
    pub id: Uuid,
}

/// The most tickets [`ListTickets`] returns in one page.
pub const MAX_PAGE_SIZE: usize = 100;

/// Lists tickets.
#[derive(Debug, Query)]
#[cqrs(name = "tickets.list", output = Page)]
pub struct ListTickets {
    /// Who asks.
    pub user: User,
    /// Filters (the reporter filter is forced for customers).
    pub filter: ListFilter,
    /// 1 to [`MAX_PAGE_SIZE`]; any other is refused as `invalid`.
    pub limit: usize,
    /// Where the last page ended.
    pub cursor: Option<String>,
}

/// A page of tickets.
#[derive(Debug, Serialize)]
pub struct Page {
    /// The tickets, newest first, without comments.
    pub items: Vec<serde_json::Value>,
    /// The next page's cursor.
    pub next_cursor: Option<String>,
}

/// A ticket's events, oldest first.
#[derive(Debug, Query)]
#[cqrs(name = "tickets.history", output = Vec<HistoryItem>)]
pub struct TicketHistory {
    /// Who asks.
    pub user: User,
    /// Which.
    pub id: Uuid,
}

/// One event of a ticket's history.
#[derive(Debug, Serialize)]
pub struct HistoryItem {
    /// The event's id.
    pub event_id: Uuid,
    /// Its type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The ticket's version after it.
    pub version: u64,
    /// When.
    pub occurred_at: DateTime<Utc>,
    /// Who.
    pub actor_id: Option<String>,
    /// The correlation id of the request that caused it: its `X-Request-Id` when that was a
    /// hyphenated UUID other than the nil one (the gateway gives every request one and
    /// returns it in the response).
    pub correlation_id: Uuid,
    /// The payload.
    pub data: serde_json::Value,
}

/// The counts over all tickets.
#[derive(Debug, Query)]
#[cqrs(name = "tickets.stats", output = Stats)]
pub struct GetStats {
    /// Who asks (agents only).
    pub user: User,
}

use helpdesk_api::{
    Lines, composed, has_visible, invalid_field as invalid, reject_controls, reject_hidden,
    reject_nul,
};

fn not_found() -> HandlerError {
    HandlerError::not_found("no such ticket")
}

fn visible(user: &User, ticket: &Ticket) -> bool {
    user.is_agent() || ticket.reporter_id == user.id
}

/// Refuses, as not found, a ticket the index says another customer reported (`None`: the
/// index does not know it, and the ticket decides).
fn refuse_if_others(user: &User, reporter: Option<Uuid>) -> Result<(), HandlerError> {
    match reporter {
        Some(reporter) if reporter != user.id => Err(not_found()),
        _ => Ok(()),
    }
}

/// The metadata the events of a command are caused by: the command's own (so they inherit its
/// correlation id and take its id as causation id), acted by `user`.
fn metadata(ctx: &CommandContext, user: &User) -> Metadata {
    ctx.metadata().clone().with_actor(user.id.to_string())
}

fn from_aggregate(e: AggregateError<HandlerError>) -> HandlerError {
    e.into()
}

/// Shared by the handlers.
#[derive(Clone)]
pub(crate) struct Tickets {
    pub(crate) repo: Arc<AggregateRepository<TicketState>>,
    pub(crate) events: Arc<dyn EventStore>,
    pub(crate) index: Arc<dyn TicketIndex>,
    /// In Postgres mode: the index written in the command's transaction.
    pub(crate) pg_index: Option<PgTicketIndex>,
    /// In Postgres mode: the store a change reads its ticket from, inside the command's
    /// transaction, so a command holds one pooled connection, not two.
    pub(crate) pg_events: Option<PgEventStore>,
    pub(crate) directory: Arc<dyn UserDirectory>,
    pub(crate) stats: Arc<dyn StatsReader>,
    pub(crate) cursors: Cursors,
    pub(crate) clock: Arc<dyn Clock>,
}

impl Tickets {
    /// Decides `command` on ticket `id` at `expected` and makes it durable. In memory mode the
    /// repository appends and the index follows. In Postgres mode the events are staged on the
    /// command's unit of work and the index row is written in its transaction: state, events
    /// (the outbox) and index commit together when the command layer commits, and a writer
    /// that got in first is a version conflict at that commit.
    async fn persist(
        &self,
        ctx: &mut CommandContext,
        loaded: Loaded<TicketState>,
        expected: u64,
        command: TicketCommand,
        metadata: &Metadata,
    ) -> Result<Ticket, AggregateError<HandlerError>> {
        // Stamped by the server's clock (a test's manual one), like its tokens and keys.
        let decided = AggregateRepository::decide_on_at(
            loaded,
            Some(expected),
            command,
            metadata,
            self.clock.now(),
        )?;
        if decided.records.is_empty() {
            // Nothing changes (an assignment to the agent who has the ticket): nothing to
            // store, and the ticket is answered as it is.
            return Ok(decided.state.ticket);
        }
        let Some(pg) = &self.pg_index else {
            let committed = self.repo.append_decided(decided).await?;
            // The change is stored: failing the command now would have the client retry it,
            // and the retry (no idempotency record is kept for an error) apply it twice. The
            // list shows the ticket as it was until its next change.
            if let Err(error) = self.index.upsert(&committed.state.ticket).await {
                tracing::error!(
                    ticket = %committed.state.ticket.id,
                    %error,
                    "the ticket changed, but the index did not take the change; lists show it as it was until its next change"
                );
            }
            return Ok(committed.state.ticket);
        };
        let uow = PgUnitOfWork::from_context(ctx).map_err(AggregateError::Rejected)?;
        let conn = uow.connection().await.map_err(AggregateError::Store)?;
        pg.upsert_in(conn, &decided.state.ticket)
            .await
            .map_err(AggregateError::Store)?;
        uow.append(
            &decided.stream_id,
            ExpectedVersion::Exactly(decided.version),
            decided.records,
        );
        Ok(decided.state.ticket)
    }

    /// Loads a ticket for a change: in Postgres mode through the command's unit of work.
    async fn load_for_change(
        &self,
        ctx: &mut CommandContext,
        user: &User,
        id: Uuid,
    ) -> Result<Loaded<TicketState>, HandlerError> {
        let Some(store) = &self.pg_events else {
            return self.load_visible(user, id).await;
        };
        let uow = PgUnitOfWork::from_context(ctx)?;
        if let Some(index) = &self.pg_index
            && !user.is_agent()
        {
            refuse_if_others(user, index.reporter_in(uow.connection().await?, id).await?)?;
        }
        let id = id.to_string();
        let stream = AggregateRepository::<TicketState>::stream_id(&id);
        let records = store.load_in(uow.connection().await?, &stream, 0).await?;
        let loaded = self.repo.rebuild(&id, records).map_err(from_aggregate)?;
        if !loaded.state.exists || !visible(user, &loaded.state.ticket) {
            return Err(not_found());
        }
        Ok(loaded)
    }

    async fn load_visible(
        &self,
        user: &User,
        id: Uuid,
    ) -> Result<Loaded<TicketState>, HandlerError> {
        // Another customer's ticket is refused on the index's word, for one lookup: reading
        // its events first (up to a megabyte of comments) let a customer make the server read
        // them again and again for a few bytes a request. An index without the ticket leaves
        // the decision to the ticket itself; one that fails fails the read (its store is the
        // tickets' own, which a load would wait for as long).
        if !user.is_agent() {
            refuse_if_others(user, self.index.reporter_of(id).await?)?;
        }
        let loaded = self
            .repo
            .load(&id.to_string())
            .await
            .map_err(from_aggregate)?;
        if !loaded.state.exists || !visible(user, &loaded.state.ticket) {
            return Err(not_found());
        }
        Ok(loaded)
    }
}

#[async_trait]
impl CommandHandler<OpenTicket> for Tickets {
    async fn handle(
        &self,
        cmd: OpenTicket,
        ctx: &mut CommandContext,
    ) -> Result<Ticket, HandlerError> {
        // Composed (NFC) before anything is counted or stored: text drawn alike is one text.
        let title = composed(cmd.title.trim());
        let len = title.chars().count();
        if !(1..=200).contains(&len) {
            return Err(invalid(
                "title",
                "the title must be 1 to 200 characters after trimming",
            ));
        }
        reject_nul("title", &title)?;
        reject_controls("title", &title, Lines::One)?;
        reject_hidden("title", &title)?;
        if !has_visible(&title) {
            return Err(invalid(
                "title",
                "the title must have a visible character, not only blank or invisible ones",
            ));
        }
        let description = composed(&cmd.description.unwrap_or_default());
        if description.chars().count() > 10_000 {
            return Err(invalid(
                "description",
                "the description must be at most 10000 characters",
            ));
        }
        reject_nul("description", &description)?;
        reject_controls("description", &description, Lines::Many)?;
        reject_hidden("description", &description)?;
        let id = Uuid::now_v7();
        let metadata = metadata(ctx, &cmd.user);
        // A new ticket: nothing to load.
        let new = Loaded {
            id: id.to_string(),
            state: TicketState::default(),
            version: 0,
        };
        self.persist(
            ctx,
            new,
            0,
            TicketCommand::Open {
                id,
                reporter_id: cmd.user.id,
                title,
                description,
                priority: cmd.priority.unwrap_or_default(),
            },
            &metadata,
        )
        .await
        .map_err(from_aggregate)
    }
}

#[async_trait]
impl CommandHandler<ChangeTicket> for Tickets {
    async fn handle(
        &self,
        mut cmd: ChangeTicket,
        ctx: &mut CommandContext,
    ) -> Result<Ticket, HandlerError> {
        // Composed (NFC) before anything is counted or stored, as a ticket's title.
        match &mut cmd.change {
            Change::Comment { body } => *body = composed(body),
            Change::Close {
                resolution: Some(resolution),
            } => *resolution = composed(resolution),
            Change::Close { resolution: None } | Change::Assign { .. } => {}
        }
        let user = &cmd.user;
        // Checks that need neither the ticket nor another lookup come first.
        match &cmd.change {
            Change::Assign { .. } if !user.is_agent() => {
                return Err(HandlerError::forbidden("only agents assign tickets"));
            }
            // The assignee is checked once the ticket is loaded (below): a missing ticket is
            // 404, whoever the body names.
            Change::Assign { .. } => {}
            Change::Comment { body } => {
                if body.trim().is_empty() || body.chars().count() > 10_000 {
                    return Err(invalid("body", "the comment must be 1 to 10000 characters"));
                }
                reject_nul("body", body)?;
                reject_controls("body", body, Lines::Many)?;
                reject_hidden("body", body)?;
                if !has_visible(body) {
                    return Err(invalid(
                        "body",
                        "the comment must have a visible character, not only blank or invisible ones",
                    ));
                }
            }
            Change::Close { resolution } => {
                if resolution
                    .as_ref()
                    .is_some_and(|r| r.chars().count() > 10_000)
                {
                    return Err(invalid(
                        "resolution",
                        "the resolution must be at most 10000 characters",
                    ));
                }
                if let Some(resolution) = resolution {
                    reject_nul("resolution", resolution)?;
                    reject_controls("resolution", resolution, Lines::Many)?;
                    reject_hidden("resolution", resolution)?;
                }
            }
        }
        let comment_id = Uuid::now_v7();
        let metadata = metadata(ctx, user);
        let mut attempt = 1;
        loop {
            let loaded = self.load_for_change(ctx, user, cmd.id).await?;
            // After the load, so a missing ticket is 404 and not a 422 about the assignee; once
            // per command (the retries in this loop do not ask again; on Postgres a conflict
            // at commit is retried with a new command, which asks again); and before deciding,
            // so an existing ticket answers as before (422 ahead of `ticket_closed` or a stale
            // `expected_version`).
            if let Change::Assign { assignee_id } = &cmd.change
                && attempt == 1
                && self.directory.role_of_in(*assignee_id, ctx).await? != Some(Role::Agent)
            {
                return Err(invalid("assignee_id", "the assignee must be an agent"));
            }
            // Closed refuses every change, whatever version the client saw: checked on the
            // version, a stale `expected_version` got `version_conflict`, and the retry at
            // the new version only then `ticket_closed`.
            if loaded.state.ticket.status == Status::Closed {
                return Err(closed());
            }
            let expected = cmd.expected_version.unwrap_or(loaded.version);
            let command = match &cmd.change {
                Change::Assign { assignee_id } => TicketCommand::Assign {
                    assignee_id: *assignee_id,
                },
                Change::Comment { body } => TicketCommand::Comment {
                    comment_id,
                    author_id: user.id,
                    body: body.clone(),
                },
                Change::Close { resolution } => TicketCommand::Close {
                    resolution: resolution.clone(),
                },
            };
            match self
                .persist(ctx, loaded, expected, command, &metadata)
                .await
            {
                Ok(ticket) => return Ok(ticket),
                // Someone else changed the ticket between our load and our append: decide
                // again on the new state, unless the client pinned a version.
                Err(AggregateError::Store(StoreError::Conflict { .. }))
                    if cmd.expected_version.is_none() && attempt < RETRIES =>
                {
                    attempt += 1;
                }
                Err(AggregateError::Store(StoreError::Conflict { actual, .. })) => {
                    return Err(version_conflict(cmd.expected_version, actual));
                }
                Err(e) => return Err(from_aggregate(e)),
            }
        }
    }
}

/// The 409 of a change that met other writers: for a client that pinned `expected`, the
/// version it missed; for one that did not, that the ticket changed under every one of its
/// attempts. Neither quotes the store's message (it names the internal stream).
fn version_conflict(expected: Option<u64>, actual: u64) -> HandlerError {
    HandlerError::conflict("version_conflict", conflict_message(expected, Some(actual)))
        .with_details(json!({ "current_version": actual }))
}

/// The message of a `version_conflict` for a client that sent `expected` (or none), the ticket
/// being at `actual` when that is known.
pub(crate) fn conflict_message(expected: Option<u64>, actual: Option<u64>) -> String {
    match (expected, actual) {
        (Some(expected), Some(actual)) => {
            format!(
                "the ticket is at version {actual}, not the expected {expected}: reload it, and \
                 send the change again with `expected_version` {actual} if it still applies"
            )
        }
        (Some(expected), None) => {
            format!(
                "the ticket is no longer at the expected version {expected}: reload it, and \
                 send the change again with its version if it still applies"
            )
        }
        (None, _) => "the ticket is changing too fast to apply this change: try again".to_owned(),
    }
}

#[async_trait]
impl QueryHandler<GetTicket> for Tickets {
    async fn handle(&self, q: GetTicket, _ctx: &QueryContext) -> Result<Ticket, HandlerError> {
        Ok(self.load_visible(&q.user, q.id).await?.state.ticket)
    }
}

#[async_trait]
impl QueryHandler<MaySeeTicket> for Tickets {
    async fn handle(&self, q: MaySeeTicket, _ctx: &QueryContext) -> Result<bool, HandlerError> {
        // A row in the list is a ticket that exists, with its reporter for good: a subscribe
        // to a ticket, however large, costs one lookup, not a replay of its comments.
        if let Some(reporter) = self.index.reporter_of(q.id).await? {
            return Ok(q.user.is_agent() || reporter == q.user.id);
        }
        match self.load_visible(&q.user, q.id).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == cqrs_core::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// A ticket without comments, as lists show it.
pub(crate) fn summary_json(ticket: &Ticket) -> serde_json::Value {
    let mut value = serde_json::to_value(ticket).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.remove("comments");
    }
    value
}

#[async_trait]
impl QueryHandler<ListTickets> for Tickets {
    async fn handle(&self, q: ListTickets, _ctx: &QueryContext) -> Result<Page, HandlerError> {
        // The route checks it too, but a plugin may dispatch the query itself: zero would be
        // an empty page with no cursor (as if there were no tickets), `usize::MAX` overflow.
        if !(1..=MAX_PAGE_SIZE).contains(&q.limit) {
            return Err(invalid(
                "limit",
                &format!(
                    "the page size must be 1 to {MAX_PAGE_SIZE}, not {}",
                    q.limit
                ),
            ));
        }
        let after = match &q.cursor {
            Some(c) => Some(self.cursors.decode(c).ok_or_else(|| {
                HandlerError::invalid(
                    "invalid_cursor",
                    "the cursor is not one this server issued (or one an older version of it \
                     issued): list again from the first page",
                )
            })?),
            None => None,
        };
        let mut filter = q.filter;
        // Fails closed: whoever is not an agent sees only their own tickets.
        if !q.user.is_agent() {
            filter.reporter_id = Some(q.user.id);
        }
        // One more than asked, to know whether there is a next page.
        let mut items = self.index.list(&filter, after, q.limit + 1).await?;
        let next_cursor = if items.len() > q.limit {
            items.truncate(q.limit);
            items.last().map(|l| self.cursors.encode(l.key))
        } else {
            None
        };
        Ok(Page {
            items: items.iter().map(|l| summary_json(&l.ticket)).collect(),
            next_cursor,
        })
    }
}

#[async_trait]
impl QueryHandler<TicketHistory> for Tickets {
    async fn handle(
        &self,
        q: TicketHistory,
        _ctx: &QueryContext,
    ) -> Result<Vec<HistoryItem>, HandlerError> {
        self.load_visible(&q.user, q.id).await?;
        let stream = AggregateRepository::<TicketState>::stream_id(&q.id.to_string());
        let records = self.events.load(&stream, 0).await?;
        Ok(records
            .into_iter()
            .map(|r| HistoryItem {
                event_id: r.event_id,
                version: r.stream_version.unwrap_or_default(),
                occurred_at: r.metadata.occurred_at,
                actor_id: r.metadata.actor.clone(),
                correlation_id: r.metadata.correlation_id,
                data: r.payload,
                event_type: r.event_type,
            })
            .collect())
    }
}

#[async_trait]
impl QueryHandler<GetStats> for Tickets {
    async fn handle(&self, q: GetStats, _ctx: &QueryContext) -> Result<Stats, HandlerError> {
        if !q.user.is_agent() {
            return Err(HandlerError::forbidden("only agents see the stats"));
        }
        self.stats.stats().await
    }
}

/// The event types the plugin's consumers decode. The helpdesk ships every plugin's events to
/// one topic, so the others' events (types this build knows) are passed over without a word;
/// an event of a type no part of this build knows, which a newer build wrote during a rolling
/// upgrade, waits for an instance of that build instead of being skipped for every instance
/// (`AwaitNewerBuild`). A plugin's event type written by hand (`impl Event`), or a retired one
/// whose events stay stored, is listed for the build with `cqrs_core::register_event_type!`.
pub fn event_types() -> EventTypes {
    let mut types = EventTypes::new();
    <crate::domain::TicketEvent as cqrs_core::EventSet>::register(&mut types);
    types.unknown_events(cqrs_core::UnknownEventPolicy::AwaitNewerBuild);
    types
}

/// Status values, for validating query strings.
pub(crate) fn parse_status(s: &str) -> Option<Status> {
    serde_json::from_value(json!(s)).ok()
}

/// Priority values, for validating query strings.
pub(crate) fn parse_priority(s: &str) -> Option<Priority> {
    serde_json::from_value(json!(s)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::InMemoryStats;
    use cqrs_core::clock::SystemClock;
    use cqrs_core::memory::InMemoryEventStore;
    use cqrs_core::{Metadata, QueryContext};

    /// A directory that knows nobody: listing never asks it.
    struct NoUsers;

    #[async_trait]
    impl UserDirectory for NoUsers {
        async fn role_of(&self, _id: Uuid) -> Result<Option<Role>, StoreError> {
            Ok(None)
        }
    }

    /// The tickets' handlers in memory.
    fn tickets() -> Tickets {
        let events: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
        Tickets {
            repo: Arc::new(AggregateRepository::new(events.clone())),
            events,
            index: Arc::new(crate::InMemoryTicketIndex::default()),
            pg_index: None,
            pg_events: None,
            directory: Arc::new(NoUsers),
            stats: Arc::new(InMemoryStats::default()),
            cursors: Cursors::new(b"a test secret"),
            clock: Arc::new(SystemClock),
        }
    }

    /// An event store that counts the streams loaded from it.
    #[derive(Default)]
    struct CountedLoads {
        store: InMemoryEventStore,
        loads: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl EventStore for CountedLoads {
        async fn append(
            &self,
            stream_id: &str,
            expected: cqrs_core::ExpectedVersion,
            events: Vec<cqrs_core::EventRecord>,
        ) -> Result<Vec<cqrs_core::EventRecord>, StoreError> {
            self.store.append(stream_id, expected, events).await
        }

        async fn load(
            &self,
            stream_id: &str,
            after_version: u64,
        ) -> Result<Vec<cqrs_core::EventRecord>, StoreError> {
            self.loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.store.load(stream_id, after_version).await
        }

        async fn read_all(
            &self,
            after: cqrs_core::Position,
            limit: usize,
        ) -> Result<Vec<cqrs_core::EventRecord>, StoreError> {
            self.store.read_all(after, limit).await
        }

        async fn stream_version(&self, stream_id: &str) -> Result<u64, StoreError> {
            self.store.stream_version(stream_id).await
        }
    }

    /// Another customer's ticket is refused on the index's word, without its events read (a
    /// ticket holds up to a megabyte of comments, which a refusal read each time); its own
    /// reporter and an agent still read it, and a ticket the index has not taken is decided by
    /// the ticket itself.
    #[tokio::test]
    async fn another_customers_ticket_is_refused_without_reading_it() {
        let counted = Arc::new(CountedLoads::default());
        let events: Arc<dyn EventStore> = counted.clone();
        let tickets = Tickets {
            repo: Arc::new(AggregateRepository::new(events.clone())),
            events,
            ..self::tickets()
        };
        let customer = |role| User {
            id: Uuid::now_v7(),
            role,
        };
        let (reporter, other, agent) = (
            customer(Role::Customer),
            customer(Role::Customer),
            customer(Role::Agent),
        );
        let open = OpenTicket {
            user: reporter.clone(),
            title: "Printer on fire".into(),
            description: None,
            priority: None,
        };
        let mut ctx = CommandContext::new(Metadata::new());
        let ticket = CommandHandler::<OpenTicket>::handle(&tickets, open, &mut ctx)
            .await
            .unwrap();
        let loads = || counted.loads.load(std::sync::atomic::Ordering::SeqCst);
        let get = |user: &User| GetTicket {
            user: user.clone(),
            id: ticket.id,
        };
        let may_see = |user: &User| MaySeeTicket {
            user: user.clone(),
            id: ticket.id,
        };
        let ctx = QueryContext::new(Metadata::new());

        #[track_caller]
        fn not_found<T: std::fmt::Debug>(answer: Result<T, HandlerError>) {
            let refused = answer.unwrap_err();
            assert_eq!(
                refused.kind(),
                cqrs_core::ErrorKind::NotFound,
                "{refused:?}"
            );
        }

        let before = loads();
        not_found(QueryHandler::<GetTicket>::handle(&tickets, get(&other), &ctx).await);
        let comment = ChangeTicket {
            user: other.clone(),
            id: ticket.id,
            expected_version: None,
            change: Change::Comment {
                body: "mine now".into(),
            },
        };
        let mut change_ctx = CommandContext::new(Metadata::new());
        not_found(CommandHandler::<ChangeTicket>::handle(&tickets, comment, &mut change_ctx).await);
        let history = TicketHistory {
            user: other.clone(),
            id: ticket.id,
        };
        not_found(QueryHandler::<TicketHistory>::handle(&tickets, history, &ctx).await);
        assert_eq!(
            loads(),
            before,
            "a refusal (read, change, history) read the ticket's events"
        );

        // Following it on the WebSocket: decided on the list's word for everyone, reporter
        // and agent included.
        for (user, expected) in [(&other, false), (&reporter, true), (&agent, true)] {
            let answer = QueryHandler::<MaySeeTicket>::handle(&tickets, may_see(user), &ctx)
                .await
                .unwrap();
            assert_eq!(answer, expected, "{:?} may see it", user.role);
        }
        assert_eq!(
            loads(),
            before,
            "a subscription's check read the ticket's events"
        );

        for user in [&reporter, &agent] {
            let got = QueryHandler::<GetTicket>::handle(&tickets, get(user), &ctx)
                .await
                .unwrap();
            assert_eq!(got.id, ticket.id);
        }
        assert_eq!(
            loads(),
            before + 2,
            "the reporter and the agent read the ticket"
        );

        // A ticket the index has not taken: the ticket itself refuses, after reading it.
        let unindexed = Tickets {
            index: Arc::new(crate::InMemoryTicketIndex::default()),
            repo: tickets.repo.clone(),
            events: tickets.events.clone(),
            ..self::tickets()
        };
        not_found(QueryHandler::<GetTicket>::handle(&unindexed, get(&other), &ctx).await);
        assert_eq!(loads(), before + 3);
        let answer = QueryHandler::<MaySeeTicket>::handle(&unindexed, may_see(&other), &ctx)
            .await
            .unwrap();
        assert!(!answer, "unindexed, the ticket itself refuses");
        assert_eq!(loads(), before + 4);
    }

    /// A page size the route would refuse is refused on the bus too, named, instead of an
    /// empty page with no cursor (zero) or an overflow (`usize::MAX`); the bounds pass.
    #[tokio::test]
    async fn a_page_size_out_of_bounds_is_refused_on_the_bus_too() {
        let tickets = tickets();
        let list = |limit| ListTickets {
            user: User {
                id: Uuid::now_v7(),
                role: Role::Agent,
            },
            filter: ListFilter::default(),
            limit,
            cursor: None,
        };
        let ctx = QueryContext::new(Metadata::new());
        for limit in [0, MAX_PAGE_SIZE + 1, usize::MAX] {
            let refused = QueryHandler::<ListTickets>::handle(&tickets, list(limit), &ctx)
                .await
                .unwrap_err();
            assert_eq!(refused.kind(), cqrs_core::ErrorKind::Invalid, "{refused:?}");
            assert!(refused.to_string().contains("page size"), "{refused}");
        }
        for limit in [1, MAX_PAGE_SIZE] {
            let page = QueryHandler::<ListTickets>::handle(&tickets, list(limit), &ctx)
                .await
                .unwrap();
            assert!(page.items.is_empty() && page.next_cursor.is_none());
        }
    }
}
