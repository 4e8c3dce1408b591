//! In memory mode a change is stored, then the ticket list (the index) takes it. When the
//! list fails to take it, the change is still answered as done: an error would have the client
//! retry it, and the retry apply it a second time (no idempotency record is kept for an error).

use crate::support::*;
use async_trait::async_trait;
use cqrs_core::ports::StoreError;
use helpdesk::Hooks;
use helpdesk_tickets::{InMemoryTicketIndex, ListFilter, Listed, SortKey, Ticket, TicketIndex};
use reqwest::StatusCode;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The in-memory index, failing every upsert while armed.
struct FailingIndex {
    inner: InMemoryTicketIndex,
    armed: Arc<AtomicBool>,
}

#[async_trait]
impl TicketIndex for FailingIndex {
    async fn upsert(&self, ticket: &Ticket) -> Result<(), StoreError> {
        if self.armed.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable {
                backend: "test index",
                source: "the index is down".into(),
            });
        }
        self.inner.upsert(ticket).await
    }

    async fn list(
        &self,
        filter: &ListFilter,
        after: Option<SortKey>,
        limit: usize,
    ) -> Result<Vec<Listed>, StoreError> {
        self.inner.list(filter, after, limit).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_ticket_list_fails_to_take_is_stored_once() {
    within(async {
        let backend = Backend::from_env().await;
        if backend != Backend::Memory {
            eprintln!("skipped on Postgres: the list row is written in the command's transaction");
            return;
        }
        let armed = Arc::new(AtomicBool::new(false));
        let a = armed.clone();
        let hooks = Hooks {
            provide: vec![Arc::new(move |registrar| {
                let index: Arc<dyn TicketIndex> = Arc::new(FailingIndex {
                    inner: InMemoryTicketIndex::default(),
                    armed: a.clone(),
                });
                registrar.provide(index);
            })],
            ..Hooks::default()
        };
        let s = TestServer::start_with_hooks(backend, hooks, |_| {}).await;
        let (customer, _) = s.customer().await;
        let id = s.ticket(&customer, "flaky list").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        armed.store(true, Ordering::SeqCst);
        let r = s
            .post(
                &format!("/tickets/{id}/comments"),
                &customer,
                json!({ "body": "once" }),
            )
            .await;
        assert!(
            r.status.is_success(),
            "the stored change is answered as done: {r:?}"
        );
        armed.store(false, Ordering::SeqCst);
        let t = s.get(&format!("/tickets/{id}"), &customer).await;
        assert_eq!(t.status, StatusCode::OK);
        assert_eq!(
            t.body["comments"].as_array().map(Vec::len),
            Some(1),
            "{t:?}"
        );
        s.stop().await;
    })
    .await;
}
