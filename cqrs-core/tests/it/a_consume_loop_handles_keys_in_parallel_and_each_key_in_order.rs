//! `consume_until_shutdown` against a consumer that hands out scripted batches: the loop's own
//! rules (chains, concurrency, what it acknowledges and hands back), apart from any transport.

use crate::fixtures::{PanicsWhenDropped, run};
use async_trait::async_trait;
use cqrs_core::ports::{Consumer, Delivery, DeliveryId, TransportError};
use cqrs_core::projection::{ConsumeLoop, Handled, consume_until_shutdown};
use cqrs_core::runtime::{HealthReporter, Shutdown, ShutdownTrigger, WorkerContext};
use cqrs_core::testing::event_store::record;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Hands out its batches one per fetch, then requests shutdown. Records acks, nacks and
/// defers.
struct Scripted {
    batches: VecDeque<Vec<Delivery>>,
    stop: ShutdownTrigger,
    acked: Arc<Mutex<Vec<String>>>,
    nacked: Arc<Mutex<Vec<(String, String)>>>,
    deferred: Arc<Mutex<Vec<String>>>,
    /// `keep_alive_interval`, and the ids of each `keep_alive` call.
    keep_every: Option<Duration>,
    kept: Arc<Mutex<Vec<Vec<String>>>>,
    /// When set, the first `keep_alive` waits for it (a backend slow to answer).
    keep_waits_for: Option<Arc<tokio::sync::Notify>>,
    /// Fail every ack, as a consumer whose connection is gone.
    ack_fails: bool,
    /// How many times `close` was called.
    closed: Arc<AtomicUsize>,
    /// The deliveries given up (`dead_letter`), with why.
    dead: Arc<Mutex<Vec<(String, String)>>>,
    /// How many `dead_letter` calls fail before they work (the store of dead letters away).
    dead_letters_failing: usize,
}

#[async_trait]
impl Consumer for Scripted {
    async fn fetch(&mut self, _max: usize) -> Result<Vec<Delivery>, TransportError> {
        match self.batches.pop_front() {
            Some(batch) => Ok(batch),
            None => {
                self.stop.trigger();
                Ok(Vec::new())
            }
        }
    }

    async fn ack(&mut self, ids: &[DeliveryId]) -> Result<(), TransportError> {
        if self.ack_fails {
            return Err(TransportError::Unavailable {
                backend: "scripted",
                source: "the connection is gone".into(),
            });
        }
        let mut acked = self.acked.lock().unwrap();
        acked.extend(ids.iter().map(|id| id.0.clone()));
        Ok(())
    }

    async fn nack(&mut self, id: &DeliveryId) -> Result<(), TransportError> {
        self.nack_with_reason(id, "").await
    }

    async fn nack_with_reason(
        &mut self,
        id: &DeliveryId,
        reason: &str,
    ) -> Result<(), TransportError> {
        let mut nacked = self.nacked.lock().unwrap();
        nacked.push((id.0.clone(), reason.to_owned()));
        Ok(())
    }

    async fn dead_letter(&mut self, id: &DeliveryId, reason: &str) -> Result<(), TransportError> {
        if self.dead_letters_failing > 0 {
            self.dead_letters_failing -= 1;
            return Err(TransportError::Unavailable {
                backend: "scripted",
                source: "the dead letters are away".into(),
            });
        }
        let mut dead = self.dead.lock().unwrap();
        dead.push((id.0.clone(), reason.to_owned()));
        Ok(())
    }

    async fn defer(&mut self, ids: &[DeliveryId]) -> Result<(), TransportError> {
        let mut deferred = self.deferred.lock().unwrap();
        deferred.extend(ids.iter().map(|id| id.0.clone()));
        Ok(())
    }

    async fn keep_alive(&mut self, ids: &[DeliveryId]) -> Result<(), TransportError> {
        self.kept
            .lock()
            .unwrap()
            .push(ids.iter().map(|id| id.0.clone()).collect());
        if let Some(answer) = self.keep_waits_for.take() {
            answer.notified().await;
        }
        Ok(())
    }

    fn keep_alive_interval(&self) -> Option<Duration> {
        self.keep_every
    }

    async fn close(&mut self) -> Result<(), TransportError> {
        self.closed.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A delivery named `name` (its id), in chain `key`.
fn delivery(name: &str, key: Option<&str>) -> Delivery {
    Delivery::new(DeliveryId(name.to_owned()), record(0), 1).with_order_key(key.map(str::to_owned))
}

type Log = (
    Arc<Mutex<Vec<String>>>,
    Arc<Mutex<Vec<(String, String)>>>,
    Arc<Mutex<Vec<String>>>,
);

fn scripted(batches: Vec<Vec<Delivery>>) -> (Scripted, WorkerContext, Log) {
    let (stop, shutdown) = Shutdown::new();
    let log: Log = Default::default();
    let consumer = Scripted {
        batches: batches.into(),
        stop,
        acked: log.0.clone(),
        nacked: log.1.clone(),
        deferred: log.2.clone(),
        keep_every: None,
        kept: Arc::default(),
        keep_waits_for: None,
        ack_fails: false,
        closed: Arc::default(),
        dead: Arc::default(),
        dead_letters_failing: 0,
    };
    let ctx = WorkerContext::new(shutdown, HealthReporter::detached("scripted"));
    (consumer, ctx, log)
}

#[test]
fn a_failure_hands_back_the_rest_of_its_chain_unhandled_and_other_chains_go_on() {
    run(async {
        let batch = vec![
            delivery("a1", Some("a")),
            delivery("b1", Some("b")),
            delivery("a2", Some("a")),
            delivery("a3", Some("a")),
            delivery("n1", None),
            delivery("b2", Some("b")),
        ];
        let (mut consumer, ctx, (acked, nacked, deferred)) = scripted(vec![batch]);
        let handled = Mutex::new(Vec::new());
        consume_until_shutdown(
            &mut consumer,
            &ctx,
            ConsumeLoop::default().concurrency(4),
            |d| {
                let handled = &handled;
                async move {
                    // Let the other chains run in between.
                    tokio::task::yield_now().await;
                    handled.lock().unwrap().push(d.id.0.clone());
                    if d.id.0 == "a2" {
                        Handled::Retry("a2 broke".into())
                    } else {
                        Handled::Done
                    }
                }
            },
        )
        .await
        .unwrap();

        let handled = handled.into_inner().unwrap();
        // Every delivery but a3 (after the failed a2 in its chain) was handled, once each.
        let mut all = handled.clone();
        all.sort();
        assert_eq!(all, ["a1", "a2", "b1", "b2", "n1"], "handled: {handled:?}");
        let position = |name: &str| {
            handled
                .iter()
                .position(|h| h == name)
                .unwrap_or_else(|| panic!("{name} was handled: {handled:?}"))
        };
        assert!(position("a1") < position("a2"), "a1 before a2: {handled:?}");
        assert!(position("b1") < position("b2"), "b1 before b2: {handled:?}");

        let mut acked = acked.lock().unwrap().clone();
        acked.sort();
        assert_eq!(acked, ["a1", "b1", "b2", "n1"]);
        let nacked = nacked.lock().unwrap().clone();
        assert_eq!(nacked, [("a2".to_owned(), "a2 broke".to_owned())]);
        assert_eq!(
            *deferred.lock().unwrap(),
            ["a3"],
            "handed back unhandled, not as a failure"
        );
        assert!(
            ctx.health.get().reason().is_some(),
            "a failure degrades the worker"
        );
    });
}

/// A delivery given up is dead-lettered after the batch's acks, the rest of its chain handed
/// back, and the worker degraded; when the acks failed, it is handed back with its reason
/// instead (out of the pending list before its chain's earlier delivery, it would let the
/// later ones pass that one).
#[test]
fn a_delivery_given_up_is_dead_lettered_after_the_acks_and_holds_its_chain_back() {
    for ack_fails in [false, true] {
        run(async {
            let batch = vec![
                delivery("a1", Some("a")),
                delivery("a2", Some("a")),
                delivery("a3", Some("a")),
            ];
            let (mut consumer, ctx, (acked, nacked, deferred)) = scripted(vec![batch]);
            consumer.ack_fails = ack_fails;
            let dead = consumer.dead.clone();
            let result = consume_until_shutdown(&mut consumer, &ctx, ConsumeLoop::default(), |d| {
                let name = d.id.0.clone();
                async move {
                    if name == "a2" {
                        Handled::DeadLetter("a2 is poison".into())
                    } else {
                        Handled::Done
                    }
                }
            })
            .await;
            let given_up = [("a2".to_owned(), "a2 is poison".to_owned())];
            assert_eq!(*deferred.lock().unwrap(), ["a3"], "held back behind a2");
            if ack_fails {
                assert!(result.is_err());
                assert!(dead.lock().unwrap().is_empty(), "a1 is still pending");
                assert_eq!(*nacked.lock().unwrap(), given_up);
            } else {
                result.unwrap();
                assert_eq!(*acked.lock().unwrap(), ["a1"]);
                assert_eq!(*dead.lock().unwrap(), given_up);
                assert!(nacked.lock().unwrap().is_empty());
                assert!(
                    ctx.health
                        .get()
                        .reason()
                        .is_some_and(|r| r.contains("a2 is poison")),
                    "a dead letter degrades the worker"
                );
            }
        });
    }
}

/// A dead letter that fails leaves only its own delivery pending: another key's given-up
/// delivery in the batch is still dead-lettered, not handed back as an attempt (the acks
/// went through); the batch reports the failure.
#[test]
fn a_failed_dead_letter_does_not_turn_the_next_into_a_nack() {
    run(async {
        let batch = vec![delivery("a1", Some("a")), delivery("b1", Some("b"))];
        let (mut consumer, ctx, (_, nacked, _)) = scripted(vec![batch]);
        consumer.dead_letters_failing = 1;
        let dead = consumer.dead.clone();
        let result = consume_until_shutdown(&mut consumer, &ctx, ConsumeLoop::default(), |d| {
            let name = d.id.0.clone();
            async move { Handled::DeadLetter(format!("{name} is poison")) }
        })
        .await;
        assert!(result.is_err(), "the failed dead letter is reported");
        let dead = dead.lock().unwrap().clone();
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert!(
            nacked.lock().unwrap().is_empty(),
            "{:?}",
            nacked.lock().unwrap()
        );
    });
}

#[test]
fn at_most_concurrency_chains_run_at_once() {
    for concurrency in [1, 3] {
        run(async {
            let batch: Vec<_> = (0..8)
                .map(|n| delivery(&format!("d{n}"), Some(&format!("k{n}"))))
                .collect();
            let (mut consumer, ctx, (acked, _, _)) = scripted(vec![batch]);
            let (running, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
            consume_until_shutdown(
                &mut consumer,
                &ctx,
                ConsumeLoop::default().concurrency(concurrency),
                |_| {
                    let (running, most) = (&running, &most);
                    async move {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        for _ in 0..3 {
                            tokio::task::yield_now().await;
                        }
                        running.fetch_sub(1, Ordering::SeqCst);
                        Handled::Done
                    }
                },
            )
            .await
            .unwrap();
            assert_eq!(
                most.load(Ordering::SeqCst),
                concurrency,
                "chains in flight at once with concurrency {concurrency}"
            );
            assert_eq!(acked.lock().unwrap().len(), 8);
            assert_eq!(ctx.health.get().reason(), None);
        });
    }
}

/// While a batch runs longer than the consumer's keep-alive interval, the loop keeps every
/// delivery of the batch alive, so the transport does not hand them out again.
#[test]
fn a_long_batch_is_kept_alive_until_it_is_acknowledged() {
    run(async {
        let batch = vec![delivery("a1", Some("a")), delivery("b1", Some("b"))];
        let (mut consumer, ctx, (acked, _, _)) = scripted(vec![batch]);
        consumer.keep_every = Some(Duration::from_millis(5));
        let kept = consumer.kept.clone();
        consume_until_shutdown(&mut consumer, &ctx, ConsumeLoop::default(), |d| {
            let kept = kept.clone();
            async move {
                // Done only once the loop kept the batch alive twice.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                while kept.lock().unwrap().len() < 2 {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{} was never kept alive",
                        d.id.0
                    );
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Handled::Done
            }
        })
        .await
        .unwrap();
        let kept = consumer.kept.lock().unwrap().clone();
        assert!(kept.len() >= 2);
        assert!(kept.iter().all(|ids| ids == &["a1", "b1"]), "{kept:?}");
        let mut acked = acked.lock().unwrap().clone();
        acked.sort();
        assert_eq!(acked, ["a1", "b1"]);
    });
}

/// A keep-alive slow to answer does not pause the handlers: here the handler itself is what
/// lets it answer, so a loop that waited for the keep-alive before polling the handlers again
/// would never finish.
#[test]
fn a_slow_keep_alive_does_not_pause_the_handlers() {
    run(async {
        let (mut consumer, ctx, (acked, _, _)) = scripted(vec![vec![delivery("a1", None)]]);
        consumer.keep_every = Some(Duration::from_millis(5));
        let answer = Arc::new(tokio::sync::Notify::new());
        consumer.keep_waits_for = Some(answer.clone());
        let kept = consumer.kept.clone();
        consume_until_shutdown(&mut consumer, &ctx, ConsumeLoop::default(), |_| {
            let (kept, answer) = (kept.clone(), answer.clone());
            async move {
                // Once the keep-alive is under way, the handler goes on, and lets it answer.
                while kept.lock().unwrap().is_empty() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                answer.notify_one();
                Handled::Done
            }
        })
        .await
        .unwrap();
        assert_eq!(*acked.lock().unwrap(), ["a1"]);
    });
}

/// A handler that panics fails its own delivery, as an error would: it is nacked with the
/// panic's message and the rest of its chain handed back, while other chains are acknowledged
/// (a panic unwinding out of the loop handed nothing back and acknowledged nothing).
#[test]
fn a_panicking_handler_fails_only_its_own_delivery() {
    run(async {
        let batch = vec![
            delivery("a1", Some("a")),
            delivery("a2", Some("a")),
            delivery("b1", Some("b")),
        ];
        let (mut consumer, ctx, (acked, nacked, deferred)) = scripted(vec![batch]);
        consume_until_shutdown(
            &mut consumer,
            &ctx,
            ConsumeLoop::default(),
            |d| async move {
                assert_ne!(d.id.0, "a1", "the handler panics on a1");
                Handled::Done
            },
        )
        .await
        .unwrap();
        assert_eq!(*acked.lock().unwrap(), ["b1"]);
        let nacked = nacked.lock().unwrap().clone();
        assert_eq!(nacked.len(), 1, "{nacked:?}");
        assert_eq!(nacked[0].0, "a1");
        assert!(nacked[0].1.contains("panicked"), "{nacked:?}");
        assert_eq!(*deferred.lock().unwrap(), ["a2"]);
    });
}

/// A handler closure that panics before its `async` block is guarded as well.
#[test]
fn a_handler_that_panics_before_its_future_fails_only_its_own_delivery() {
    run(async {
        let batch = vec![delivery("a1", Some("a")), delivery("b1", Some("b"))];
        let (mut consumer, ctx, (acked, nacked, _)) = scripted(vec![batch]);
        consume_until_shutdown(&mut consumer, &ctx, ConsumeLoop::default(), |d| {
            assert_ne!(d.id.0, "a1", "the closure panics on a1");
            async { Handled::Done }
        })
        .await
        .unwrap();
        assert_eq!(*acked.lock().unwrap(), ["b1"]);
        assert_eq!(nacked.lock().unwrap().len(), 1);
    });
}

/// A handler cancelled at its timeout whose future panics when dropped: the panic stays with
/// its delivery (nacked), the loop goes on, and the batch's other chain is acknowledged.
#[test]
fn a_handler_that_panics_when_cancelled_at_its_timeout_fails_only_its_delivery() {
    run(async {
        let batch = vec![delivery("a1", Some("a")), delivery("b1", Some("b"))];
        let (mut consumer, ctx, (acked, nacked, _)) = scripted(vec![batch]);
        consume_until_shutdown(
            &mut consumer,
            &ctx,
            ConsumeLoop::default().handler_timeout(Duration::from_millis(20)),
            |d| async move {
                if d.id.0 == "a1" {
                    let _armed = PanicsWhenDropped;
                    std::future::pending::<()>().await;
                }
                Handled::Done
            },
        )
        .await
        .unwrap();
        assert_eq!(*acked.lock().unwrap(), ["b1"]);
        let nacked = nacked.lock().unwrap();
        assert_eq!(nacked.len(), 1, "{nacked:?}");
        assert_eq!(nacked[0].0, "a1");
    });
}

/// A loop that ends on an error (its ack failed: the connection is gone) closes its consumer
/// first, as a loop that ends at shutdown does: what the consumer holds is released at once,
/// instead of waiting out the redelivery delay under a consumer nobody reads for.
#[test]
fn a_loop_that_fails_closes_its_consumer() {
    run(async {
        let (mut consumer, ctx, _) = scripted(vec![vec![delivery("a1", Some("a"))]]);
        consumer.ack_fails = true;
        let closed = consumer.closed.clone();
        let result =
            consume_until_shutdown(&mut consumer, &ctx, ConsumeLoop::default(), |_| async {
                Handled::Done
            })
            .await;
        assert!(
            matches!(result, Err(TransportError::Unavailable { .. })),
            "{result:?}"
        );
        assert_eq!(closed.load(Ordering::SeqCst), 1);
    });
}

/// An ack that fails does not keep the batch's other answers from going out: the failed
/// delivery is nacked and the rest of its chain deferred (no attempt counted), and the loop
/// then ends with the ack's error. They were skipped, so the deferred deliveries came back
/// by timeout, each counted as an attempt.
#[test]
fn a_failed_ack_still_sends_the_nacks_and_defers() {
    run(async {
        let batch = vec![
            delivery("a1", Some("a")),
            delivery("b1", Some("b")),
            delivery("b2", Some("b")),
        ];
        let (mut consumer, ctx, (_, nacked, deferred)) = scripted(vec![batch]);
        consumer.ack_fails = true;
        let result = consume_until_shutdown(&mut consumer, &ctx, ConsumeLoop::default(), |d| {
            let name = d.id.0.clone();
            async move {
                if name == "b1" {
                    Handled::Retry("b1 broke".into())
                } else {
                    Handled::Done
                }
            }
        })
        .await;
        assert!(
            matches!(result, Err(TransportError::Unavailable { .. })),
            "{result:?}"
        );
        let nacked: Vec<String> = nacked.lock().unwrap().iter().map(|n| n.0.clone()).collect();
        assert_eq!(nacked, ["b1"]);
        assert_eq!(*deferred.lock().unwrap(), ["b2"]);
    });
}
