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
    status: HashMap<Uuid, Status>,
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

    fn apply(&mut self, event: &TicketEvent) {
        let (id, to) = match event {
            TicketEvent::Opened(e) => (e.ticket_id, Status::Open),
            TicketEvent::Assigned(e) => (e.ticket_id, Status::Assigned),
            TicketEvent::Closed(e) => (e.ticket_id, Status::Closed),
            TicketEvent::Commented(_) => return,
        };
        if let Some(from) = self.status.insert(id, to) {
            self.count(from, -1);
        }
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
            // Applied when the unit commits, with the inbox entry: exactly once.
            unit.on_commit(move || {
                state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .apply(&event)
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
