//! A change that meets other writers is 409 `version_conflict` with a message written for what
//! the client sent: the version it missed when it pinned one, and otherwise that the ticket
//! changed under every attempt (the server retries a bounded number of times) and to try
//! again. Never the store's own text, which names the internal stream (`ticket-…`).

use crate::support::*;
use async_trait::async_trait;
use cqrs_core::ports::{EventStore, ExpectedVersion, StoreError};
use cqrs_core::{EventRecord, Position};
use helpdesk::Hooks;
use helpdesk_api::Backends;
use reqwest::StatusCode;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The event store, or, once `armed`, one where another writer always appended to a ticket
/// first.
struct AlwaysBeaten {
    inner: Arc<dyn EventStore>,
    armed: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
}

#[async_trait]
impl EventStore for AlwaysBeaten {
    async fn append(
        &self,
        stream_id: &str,
        expected: ExpectedVersion,
        events: Vec<EventRecord>,
    ) -> Result<Vec<EventRecord>, StoreError> {
        if self.armed.load(Ordering::SeqCst) && stream_id.starts_with("ticket-") {
            self.refused.fetch_add(1, Ordering::SeqCst);
            let actual = self.inner.stream_version(stream_id).await? + 1;
            return Err(StoreError::Conflict {
                stream: stream_id.to_owned(),
                expected,
                actual,
            });
        }
        self.inner.append(stream_id, expected, events).await
    }

    async fn load(&self, stream_id: &str, after: u64) -> Result<Vec<EventRecord>, StoreError> {
        self.inner.load(stream_id, after).await
    }

    async fn read_all(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        self.inner.read_all(after, limit).await
    }

    async fn stream_version(&self, stream_id: &str) -> Result<u64, StoreError> {
        self.inner.stream_version(stream_id).await
    }
}

#[track_caller]
fn assert_says_retry(r: &Response) {
    r.assert_error(StatusCode::CONFLICT, "version_conflict");
    let message = r.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("changing too fast"), "{r:?}");
    assert!(message.contains("try again"), "{r:?}");
    assert!(!message.contains("expected"), "no version was sent: {r:?}");
    assert!(!r.body.to_string().contains("ticket-"), "{r:?}");
}

/// In memory mode the tickets' appends go through the provided store, so every attempt can
/// be made to lose. (In Postgres mode changes append through the command's transaction, and
/// the next test races real writers instead.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_without_a_version_that_always_loses_says_to_try_again() {
    within(async {
        let backend = Backend::from_env().await;
        if backend != Backend::Memory {
            eprintln!(
                "skipped on Postgres: changes append through the command's transaction, which \
                 this test cannot make lose every time (the next test races real writers)"
            );
            return;
        }
        let armed = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let (a, r) = (armed.clone(), refused.clone());
        let hooks = Hooks {
            provide: vec![Arc::new(move |registrar| {
                let mut backends: Backends = registrar.resource().unwrap();
                backends.events = Arc::new(AlwaysBeaten {
                    inner: backends.events.clone(),
                    armed: a.clone(),
                    refused: r.clone(),
                });
                registrar.provide(backends);
            })],
            ..Hooks::default()
        };
        let s = TestServer::start_with_hooks(backend, hooks, |_| {}).await;
        let (customer, _) = s.customer().await;
        let id = s.ticket(&customer, "busy").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        armed.store(true, Ordering::SeqCst);
        let r = s
            .post(
                &format!("/tickets/{id}/comments"),
                &customer,
                json!({ "body": "hello?" }),
            )
            .await;
        assert_says_retry(&r);
        assert_eq!(r.body["error"]["details"]["current_version"], 2);
        assert_eq!(
            refused.load(Ordering::SeqCst),
            20,
            "the retries are bounded"
        );

        // A pinned version names the version the client missed.
        let pinned = s
            .post(
                &format!("/tickets/{id}/comments"),
                &customer,
                json!({ "body": "hello?", "expected_version": 1 }),
            )
            .await;
        pinned.assert_error(StatusCode::CONFLICT, "version_conflict");
        assert_eq!(
            pinned.body["error"]["message"],
            "the ticket is at version 2, not the expected 1: reload it, and send the change \
             again with `expected_version` 2 if it still applies"
        );
        armed.store(false, Ordering::SeqCst);
        let t = s.get(&format!("/tickets/{id}"), &customer).await;
        assert_eq!(t.body["version"], 1, "nothing was stored");
        s.stop().await;
    })
    .await;
}

/// Writers racing at one version: in Postgres mode the losers are found when their
/// transactions commit, and their 409 must not quote the store either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conflicts_of_racing_writers_do_not_quote_the_store() {
    within(async {
        let s = Arc::new(TestServer::start().await);
        let (customer, _) = s.customer().await;
        let id = s.ticket(&customer, "race").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let writers = |pinned: bool| {
            (0..20)
                .map(|i| {
                    let (s, customer, id) = (s.clone(), customer.clone(), id.clone());
                    tokio::spawn(async move {
                        let mut body = json!({ "body": format!("writer {i}") });
                        if pinned {
                            body["expected_version"] = json!(1);
                        }
                        s.post(&format!("/tickets/{id}/comments"), &customer, body)
                            .await
                    })
                })
                .collect::<Vec<_>>()
        };
        let mut conflicts = 0;
        for t in writers(true) {
            let r = t.await.unwrap();
            if r.status == StatusCode::CREATED {
                continue;
            }
            r.assert_error(StatusCode::CONFLICT, "version_conflict");
            conflicts += 1;
            let current = r.body["error"]["details"]["current_version"]
                .as_u64()
                .unwrap();
            assert_eq!(
                r.body["error"]["message"],
                format!(
                    "the ticket is at version {current}, not the expected 1: reload it, and send \
                     the change again with `expected_version` {current} if it still applies"
                ),
                "{r:?}"
            );
        }
        assert_eq!(conflicts, 19);
        // Without a version every writer lands, or is told to try again; each that landed,
        // and only those, made a version.
        let mut landed = 0;
        for t in writers(false) {
            let r = t.await.unwrap();
            if r.status == StatusCode::CREATED {
                landed += 1;
            } else {
                assert_says_retry(&r);
            }
        }
        let t = s.get(&format!("/tickets/{id}"), &customer).await;
        assert_eq!(t.body["version"], 2 + landed, "{t:?}");
        Arc::into_inner(s).unwrap().stop().await;
    })
    .await;
}
