//! `GET /tickets/stats`: open / assigned / closed counts, kept by a projection that consumes
//! the durable event transport, exactly once.

use crate::domain::{Status, TicketEvent};
use async_trait::async_trait;
use cqrs_core::memory::{InMemoryProjectionStore, InMemoryUnit};
use cqrs_core::projection::Projection;
use cqrs_core::{EventEnvelope, EventSet, HandlerError};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// The counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Open tickets.
    pub open: u64,
    /// Assigned tickets.
    pub assigned: u64,
    /// Closed tickets.
    pub closed: u64,
}

/// Reads the counts.
#[async_trait]
pub trait StatsReader: Send + Sync + 'static {
    /// The counts now.
    async fn stats(&self) -> Result<Stats, HandlerError>;
}

#[derive(Default)]
struct State {
    /// Each ticket's status and the stream version of the event that set it.
    status: HashMap<Uuid, (Status, u64)>,
    stats: Stats,
}

impl State {
    fn count(&mut self, status: Status, delta: i64) {
        let slot = match status {
            Status::Open => &mut self.stats.open,
            Status::Assigned => &mut self.stats.assigned,
            Status::Closed => &mut self.stats.closed,
        };
        *slot = slot.saturating_add_signed(delta);
    }

    /// Applies `event`, the `version`th of its ticket's stream. A version guard on top of the
    /// transport's per-ticket order, as the Postgres projection has: an older event never
    /// overwrites a newer status, so both backends count alike. Every stored event has a
    /// version; one without counts as the newest (`u64::MAX`, as Postgres's `i64::MAX`), and
    /// the ticket's later events are then ignored in both.
    fn apply(&mut self, event: &TicketEvent, version: u64) {
        let (id, to) = match event {
            TicketEvent::Opened(e) => (e.ticket_id, Status::Open),
            TicketEvent::Assigned(e) => (e.ticket_id, Status::Assigned),
            TicketEvent::Closed(e) => (e.ticket_id, Status::Closed),
            TicketEvent::Commented(_) => return,
        };
        match self.status.get(&id) {
            Some(&(_, newer)) if newer >= version => return,
            Some(&(from, _)) => self.count(from, -1),
            None => {}
        }
        self.status.insert(id, (to, version));
        self.count(to, 1);
    }
}

/// The stats projection in process memory.
#[derive(Clone, Default)]
pub struct InMemoryStats {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for InMemoryStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InMemoryStats")
    }
}

#[async_trait]
impl Projection<InMemoryProjectionStore> for InMemoryStats {
    fn name(&self) -> &str {
        "tickets.stats"
    }

    async fn apply(
        &self,
        unit: &mut InMemoryUnit,
        envelope: &EventEnvelope,
    ) -> Result<(), HandlerError> {
        if let Some(event) = TicketEvent::from_envelope(envelope) {
            let state = self.state.clone();
            let version = envelope.stream_version().unwrap_or(u64::MAX);
            // Applied when the unit commits, with the inbox entry: exactly once.
            unit.on_commit(move || {
                state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .apply(&event, version)
            });
        }
        Ok(())
    }

    async fn reset(&self, unit: &mut InMemoryUnit) -> Result<(), HandlerError> {
        let state = self.state.clone();
        unit.on_commit(move || *state.lock().unwrap_or_else(|p| p.into_inner()) = State::default());
        Ok(())
    }
}

#[async_trait]
impl StatsReader for InMemoryStats {
    async fn stats(&self) -> Result<Stats, HandlerError> {
        Ok(self.state.lock().unwrap_or_else(|p| p.into_inner()).stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{TicketAssigned, TicketClosed, TicketOpened};

    /// An event older than the one that set a ticket's status (redelivered late) changes no
    /// count, as in the Postgres projection: the backends counted differently.
    #[test]
    fn an_older_event_does_not_move_a_ticket_back() {
        let (ticket_id, reporter_id) = (Uuid::now_v7(), Uuid::now_v7());
        let opened = TicketEvent::Opened(TicketOpened {
            ticket_id,
            reporter_id,
            title: "t".into(),
            description: "d".into(),
            priority: Default::default(),
        });
        let assigned = TicketEvent::Assigned(TicketAssigned {
            ticket_id,
            reporter_id,
            assignee_id: Uuid::now_v7(),
        });
        let closed = TicketEvent::Closed(TicketClosed {
            ticket_id,
            reporter_id,
            resolution: None,
        });
        let mut state = State::default();
        state.apply(&opened, 1);
        state.apply(&assigned, 2);
        state.apply(&closed, 3);
        let after_close = Stats {
            open: 0,
            assigned: 0,
            closed: 1,
        };
        assert_eq!(state.stats, after_close);
        state.apply(&assigned, 2);
        state.apply(&opened, 1);
        state.apply(&closed, 3);
        assert_eq!(
            state.stats, after_close,
            "late and repeated events change nothing"
        );
    }
}
