//! A plugin's handler that records events with `ctx.record_keyed` has them stored, in memory
//! as on Postgres (where the command layer appends them in the command's transaction): in
//! memory the command bus hands them to the in-memory store the relay ships from. Before, in
//! memory they were dropped without a word, while the same plugin stored them on Postgres.

use crate::support::*;
use cqrs_core::{
    Command, CommandContext, CommandHandler, Event, HandlerError, Message, async_trait,
};
use helpdesk::Hooks;
use helpdesk_api::{Backends, BusHandle};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, OnceLock};

pub struct Remember(pub String);

impl Message for Remember {
    const NAME: &'static str = "test.remember";
}

impl Command for Remember {
    type Output = ();
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Remembered {
    pub what: String,
}

impl Message for Remembered {
    const NAME: &'static str = "test.remembered";
}

impl Event for Remembered {}

// Written by hand: named for the build, or the tickets plugin's readers (under
// `UnknownEventPolicy::AwaitNewerBuild`) would take it for a newer build's and wait on it.
cqrs_core::register_event_type!(Remembered);

pub struct RememberHandler;

/// Dispatches `Remember(what)` on the buses a test's hook kept.
pub async fn remember(buses: &OnceLock<BusHandle>, what: &str) {
    let buses = buses.get().expect("the hook ran").get().unwrap();
    buses
        .commands
        .dispatch(Remember(what.to_owned()))
        .await
        .unwrap();
}

#[async_trait]
impl CommandHandler<Remember> for RememberHandler {
    async fn handle(&self, cmd: Remember, ctx: &mut CommandContext) -> Result<(), HandlerError> {
        ctx.record_keyed(format!("remembered-{}", cmd.0), Remembered { what: cmd.0 });
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_a_plugin_records_reach_the_store_on_either_backend() {
    within(async {
        let backend = Backend::from_env().await;
        let seen: Arc<OnceLock<(Backends, BusHandle)>> = Arc::default();
        let s = seen.clone();
        let hooks = Hooks {
            provide: vec![Arc::new(move |registrar| {
                registrar.commands().add(RememberHandler);
                let backends = registrar.resource::<Backends>().unwrap();
                let buses = registrar.resource::<BusHandle>().unwrap();
                let _ = s.set((backends, buses));
            })],
            ..Hooks::default()
        };
        let server = TestServer::start_with_hooks(backend.clone(), hooks, |_| {}).await;
        let (backends, buses) = seen.get().expect("the hook ran");
        let what = uuid::Uuid::now_v7().to_string();
        buses
            .get()
            .unwrap()
            .commands
            .dispatch(Remember(what.clone()))
            .await
            .unwrap();
        let stored = backends
            .events
            .load(&format!("remembered-{what}"), 0)
            .await
            .unwrap();
        assert_eq!(stored.len(), 1, "{backend:?}");
        assert_eq!(stored[0].event_type, Remembered::NAME);
        assert_eq!(stored[0].payload["what"], what.as_str());
        server.stop().await;
        backend.clean_up().await;
    })
    .await;
}
