//! Frozen maps from a message's `TypeId` to its handlers.

use super::command::ErasedCommandHandler;
use super::event::ErasedEventHandler;
use super::query::ErasedQueryHandler;
use crate::{EventEnvelope, Metadata};
use std::any::TypeId;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

/// `TypeId`s are already well-distributed hashes, so the map hashes them by taking their bits as
/// they are instead of running SipHash on every dispatch.
#[derive(Default)]
pub(crate) struct TypeIdHasher(u64);

impl Hasher for TypeIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not the path `TypeId` takes today; kept correct for any future change (FNV-1a).
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }

    fn write_u128(&mut self, n: u128) {
        self.0 ^= (n as u64) ^ ((n >> 64) as u64);
    }
}

pub(crate) type TypeMap<V> = HashMap<TypeId, V, BuildHasherDefault<TypeIdHasher>>;

/// What a built bus reads on every dispatch. Never mutated after `build()`.
#[derive(Default)]
pub(crate) struct Registries {
    pub(crate) commands: TypeMap<Arc<dyn ErasedCommandHandler>>,
    pub(crate) queries: TypeMap<Arc<dyn ErasedQueryHandler>>,
    pub(crate) events: TypeMap<Vec<Arc<dyn ErasedEventHandler>>>,
    /// How long each event handler may take ([`EventBusBuilder::handler_timeout`]).
    ///
    /// [`EventBusBuilder::handler_timeout`]: crate::EventBusBuilder::handler_timeout
    pub(crate) event_handler_timeout: Option<std::time::Duration>,
    /// What stamps the metadata a bus makes and the events its command handlers record;
    /// `None`: the system clock.
    pub(crate) clock: Option<Arc<dyn crate::clock::Clock>>,
}

impl Registries {
    /// Gives `ctx` the bus's clock, for the events its handler records; only when the bus has
    /// one: a context starts without, at no cost.
    #[inline]
    pub(crate) fn lend_clock(&self, ctx: &mut crate::CommandContext) {
        if let Some(clock) = &self.clock {
            ctx.clock = Some(clock.clone());
        }
    }

    /// Fresh metadata, stamped by the bus's clock.
    pub(crate) fn fresh_metadata(&self) -> Metadata {
        match &self.clock {
            Some(clock) => Metadata::new_at(clock.now()),
            None => Metadata::new(),
        }
    }

    /// The handlers of `envelope`'s event type; none when it has none.
    #[inline]
    pub(crate) fn event_handlers(
        &self,
        envelope: &EventEnvelope,
    ) -> &[Arc<dyn ErasedEventHandler>] {
        self.events
            .get(&envelope.payload_type_id())
            .map_or(&[][..], Vec::as_slice)
    }
}
