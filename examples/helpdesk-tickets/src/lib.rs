//! The helpdesk's tickets plugin.
//!
//! Tickets are event-sourced: each is a stream `ticket-{id}` of `TicketOpened`,
//! `TicketAssigned`, `TicketCommented` and `TicketClosed` events, and its view is rebuilt from
//! them. A list index is kept by the command handlers; the stats are a projection that consumes
//! the durable event transport exactly once.
//!
//! In Postgres mode (`Backends::postgres`) the handlers stage their events on the command's
//! `PgUnitOfWork` and write the list row ([`PgTicketIndex`]) in its transaction, and the stats
//! ([`PgStats`]) are tables written in the projection's transaction with its inbox.
//!
//! A server links it with `use helpdesk_tickets as _;`; it registers through `inventory`, after
//! the auth plugin it depends on.

mod domain;
mod handlers;
mod http;
mod index;
mod postgres;
mod realtime;
mod stats;

pub use domain::{
    Comment, Priority, Status, Ticket, TicketAssigned, TicketClosed, TicketCommand,
    TicketCommented, TicketEvent, TicketOpened, TicketState,
};
pub use handlers::{
    Change, ChangeTicket, GetStats, GetTicket, HistoryItem, ListTickets, MAX_PAGE_SIZE,
    MaySeeTicket, OpenTicket, Page, TicketHistory, event_types,
};
pub use index::{Cursors, InMemoryTicketIndex, ListFilter, Listed, SortKey, TicketIndex};
pub use postgres::{PgStats, PgTicketIndex};
pub use stats::{InMemoryStats, Stats, StatsReader};

use cqrs_core::memory::InMemoryProjectionStore;
use cqrs_core::ports::{ConsumerOptions, ProjectionStore};
use cqrs_core::projection::{Projection, ProjectionRunner};
use cqrs_core::{
    AggregateRepository, BoxError, EventTypes, Plugin, PluginRegistrar, register_plugin,
};
use helpdesk_api::{
    Backends, BackgroundWorker, BusHandle, HttpApi, RealtimeFeed, Settings, UserDirectory,
};
use std::sync::Arc;

/// The tickets plugin.
#[derive(Debug)]
pub struct TicketsPlugin;

impl Plugin for TicketsPlugin {
    fn name(&self) -> &'static str {
        "tickets"
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn depends_on(&self) -> &'static [&'static str] {
        &["auth"]
    }

    fn register(&self, registrar: &mut PluginRegistrar) -> Result<(), BoxError> {
        let backends: Backends = registrar.resource()?;
        let settings: Settings = registrar.resource()?;
        let buses: BusHandle = registrar.resource()?;
        let directory: Arc<dyn UserDirectory> = registrar.resource()?;

        let types = Arc::new(event_types());
        let options = settings.consumer_options();
        let (index, pg_index, stats): (Arc<dyn TicketIndex>, _, Arc<dyn StatsReader>) =
            match &backends.postgres {
                Some(db) => {
                    for migration in postgres::migrations(db.schema()) {
                        registrar.contribute(migration);
                    }
                    let index = PgTicketIndex::new(db.clone());
                    let stats = PgStats::new(db.clone());
                    // Inbox, checkpoint and counts in one transaction per batch, and the
                    // projection's lock in Postgres: exactly once across instances.
                    let runner = stats_runner(
                        db.projection_store(),
                        stats.clone(),
                        &backends,
                        &settings,
                        options,
                        types.clone(),
                    );
                    let feed = if stats_read_the_store(&backends) {
                        "store"
                    } else {
                        "stream"
                    };
                    registrar.contribute(BackgroundWorker(Box::new(postgres::StatsWorker::new(
                        db.clone(),
                        runner,
                        feed,
                    ))));
                    (Arc::new(index.clone()), Some(index), Arc::new(stats))
                }
                None => {
                    let index: Arc<dyn TicketIndex> = registrar
                        .try_resource::<Arc<dyn TicketIndex>>()
                        .unwrap_or_else(|| Arc::new(InMemoryTicketIndex::default()));
                    let stats = InMemoryStats::default();
                    registrar.contribute(BackgroundWorker(Box::new(stats_runner(
                        // The server's clock dates the inbox entries its purge ages out.
                        InMemoryProjectionStore::with_clock(backends.clock.clone()),
                        stats.clone(),
                        &backends,
                        &settings,
                        options,
                        types.clone(),
                    ))));
                    (index, None, Arc::new(stats))
                }
            };

        let tickets = handlers::Tickets {
            repo: Arc::new(
                AggregateRepository::with_types(backends.events.clone(), types)
                    .with_clock(backends.clock.clone()),
            ),
            events: backends.events.clone(),
            index,
            pg_events: backends.postgres.as_ref().map(|db| db.event_store()),
            pg_index,
            directory: directory.clone(),
            stats,
            cursors: Cursors::new(&settings.jwt_secret),
            clock: backends.clock.clone(),
        };
        registrar.commands().add::<OpenTicket, _>(tickets.clone());
        registrar.commands().add::<ChangeTicket, _>(tickets.clone());
        registrar.queries().add::<GetTicket, _>(tickets.clone());
        registrar.queries().add::<MaySeeTicket, _>(tickets.clone());
        registrar.queries().add::<ListTickets, _>(tickets.clone());
        registrar.queries().add::<TicketHistory, _>(tickets.clone());
        registrar.queries().add::<GetStats, _>(tickets);

        registrar.contribute(RealtimeFeed {
            routing: Arc::new(realtime::TicketRouting),
            authorizer: Arc::new(realtime::TicketRules {
                buses: buses.clone(),
                directory: directory.clone(),
            }),
        });
        registrar.contribute::<HttpApi>(http::api(http::Http {
            buses,
            idempotency: backends.idempotency.clone(),
            postgres: backends.postgres.clone(),
            ttl: settings.idempotency_ttl,
        }));
        Ok(())
    }
}

/// Whether the stats read the event store: on Postgres without Redis the transport discards
/// every event (it is not persistent), so the stats read the store's global order, and the
/// projection's own checkpoint commits with its counts.
fn stats_read_the_store(backends: &Backends) -> bool {
    backends.postgres.is_some() && !backends.transport.capabilities().persistent
}

/// The stats projection's runner: fed by the topic when the transport keeps what it is given
/// (Redis), else by the event store's global order (see [`stats_read_the_store`]); rebuilt
/// from the event store.
fn stats_runner<S: ProjectionStore, P: Projection<S>>(
    store: S,
    stats: P,
    backends: &Backends,
    settings: &Settings,
    options: ConsumerOptions,
    types: Arc<EventTypes>,
) -> ProjectionRunner<S, P> {
    let runner = if stats_read_the_store(backends) {
        ProjectionRunner::from_store(
            Arc::new(store),
            Arc::new(stats),
            backends.events.clone(),
            types,
        )
    } else {
        ProjectionRunner::from_transport(
            Arc::new(store),
            Arc::new(stats),
            backends.transport.clone(),
            &backends.topic,
            "tickets.stats",
            options,
            types,
        )
        .with_event_store(backends.events.clone())
    };
    runner
        .idle_interval(settings.poll_interval)
        // The inbox keeps its default week: far beyond any redelivery.
        .inbox_purge_interval(settings.purge_interval)
}

register_plugin!(TicketsPlugin);
