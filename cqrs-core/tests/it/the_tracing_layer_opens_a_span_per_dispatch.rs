use crate::a_panicking_layer_fails_only_its_own_dispatch::{FaultyLayer, as_actor};
use crate::fixtures::*;
use cqrs_core::middleware::TracingLayer;
use cqrs_core::{CommandBus, Metadata};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata as TracingMetadata, Subscriber};

pub(crate) type Spans = Arc<Mutex<Vec<(String, BTreeMap<String, String>)>>>;
/// Each event's fields, with the span it was emitted in (its index in `Spans`).
pub(crate) type Events = Arc<Mutex<Vec<(BTreeMap<String, String>, Option<usize>)>>>;

/// A subscriber that remembers each span's name and fields, and each event's fields and the
/// span it happened in.
struct Recorder {
    spans: Spans,
    events: Events,
}

thread_local! {
    /// The spans this thread is in, innermost last.
    static ENTERED: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Every span ever entered, on any thread.
static ENTERED_EVER: Mutex<std::collections::BTreeSet<u64>> =
    Mutex::new(std::collections::BTreeSet::new());

fn was_entered(span: u64) -> bool {
    ENTERED_EVER
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&span)
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl Subscriber for Recorder {
    fn enabled(&self, _: &TracingMetadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        let mut spans = self.spans.lock().unwrap();
        spans.push((attrs.metadata().name().to_owned(), fields));
        Id::from_u64(spans.len() as u64)
    }
    fn record(&self, span: &Id, values: &Record<'_>) {
        let mut spans = self.spans.lock().unwrap();
        let index = span.into_u64() as usize - 1;
        values.record(&mut Fields(&mut spans[index].1));
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        // Not a field: kept under a name no event uses, for tests that check a level.
        fields.insert("@level".to_owned(), event.metadata().level().to_string());
        let span = ENTERED.with(|entered| entered.borrow().last().map(|id| *id as usize - 1));
        self.events.lock().unwrap().push((fields, span));
    }
    fn enter(&self, span: &Id) {
        ENTERED.with(|entered| entered.borrow_mut().push(span.into_u64()));
        ENTERED_EVER
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(span.into_u64());
    }
    fn exit(&self, span: &Id) {
        ENTERED.with(|entered| {
            let mut entered = entered.borrow_mut();
            if let Some(at) = entered.iter().rposition(|id| *id == span.into_u64()) {
                entered.remove(at);
            }
        });
    }
}

/// The test binary's global subscriber, installed once, recording every span of every test.
/// Global, not a thread's default (`tracing::subscriber::with_default`): `tracing` caches
/// whether a callsite is wanted process-wide, so while other tests of this binary dispatch
/// through a `TracingLayer` with no subscriber of their own, a thread-local recorder could see
/// the `dispatch` callsite cached as unwanted and never be given the span. With one global
/// subscriber that wants everything the cache always says "wanted"; each test picks out its
/// own spans by the message id it dispatched with.
fn recorded() -> &'static Spans {
    &recorder().0
}

pub(crate) fn recorder() -> &'static (Spans, Events) {
    static RECORDED: OnceLock<(Spans, Events)> = OnceLock::new();
    RECORDED.get_or_init(|| {
        let (spans, events) = (Spans::default(), Events::default());
        let recorder = Recorder {
            spans: spans.clone(),
            events: events.clone(),
        };
        tracing::subscriber::set_global_default(recorder)
            .expect("no other test of this binary installs a global subscriber");
        (spans, events)
    })
}

#[test]
fn each_dispatch_gets_a_span_with_the_message_name_and_ids() {
    let spans = recorded();
    let bus = CommandBus::builder()
        .layer(TracingLayer::new())
        .handler(AddHandler)
        .build()
        .unwrap();
    let parent = Metadata::new();
    let metadata = parent.caused();
    add_one_and_one(&bus, metadata.clone());
    let spans = spans.lock().unwrap();
    let message_id = metadata.message_id.to_string();
    // Every test's spans: this one's are those carrying the message id it dispatched with.
    let dispatch: Vec<_> = spans
        .iter()
        .filter(|(name, fields)| {
            name == "dispatch" && fields.get("message_id") == Some(&message_id)
        })
        .collect();
    assert_eq!(dispatch.len(), 1, "{spans:?}");
    let fields = &dispatch[0].1;
    assert_eq!(fields["kind"], "command");
    assert_eq!(fields["message_name"], "test.add");
    assert_eq!(fields["correlation_id"], parent.correlation_id.to_string());
    assert_eq!(fields["causation_id"], parent.message_id.to_string());
}

/// Each span says how its dispatch ended: `outcome` `ok`, or the error's kind with the error's
/// message in `error`, for a handler's failure and for a layer's refusal (a `CheckLayer`
/// inside the tracing layer) alike.
#[test]
fn each_span_says_how_its_dispatch_ended() {
    use cqrs_core::middleware::CheckLayer;
    let spans = recorded();
    let bus = CommandBus::builder()
        .layer(TracingLayer::new())
        .layer(CheckLayer::new(
            |dispatch: &cqrs_core::Dispatch| match dispatch.metadata().principal_as::<&str>() {
                Some(&"intruder") => Err(cqrs_core::HandlerError::forbidden("not for intruders")),
                _ => Ok(()),
            },
        ))
        .handler(AddHandler)
        .build()
        .unwrap();
    let (ok, failed, refused) = (Metadata::new(), Metadata::new(), Metadata::new());
    let refused = refused.with_principal(cqrs_core::Principal::new("intruder"));
    let add = |fail| Add {
        a: 1,
        b: 1,
        fail,
        ..Add::default()
    };
    run(async {
        bus.dispatch_with(add(false), ok.clone()).await.unwrap();
        bus.dispatch_with(add(true), failed.clone())
            .await
            .unwrap_err();
        bus.dispatch_with(add(false), refused.clone())
            .await
            .unwrap_err();
    });
    let spans = spans.lock().unwrap();
    let fields_of = |metadata: &Metadata| {
        let id = metadata.message_id.to_string();
        spans
            .iter()
            .find(|(name, fields)| name == "dispatch" && fields.get("message_id") == Some(&id))
            .map(|(_, fields)| fields.clone())
            .expect("a span for the dispatch")
    };
    let ok = fields_of(&ok);
    assert_eq!(ok.get("outcome").map(String::as_str), Some("ok"), "{ok:?}");
    assert_eq!(ok.get("error"), None, "{ok:?}");
    let failed = fields_of(&failed);
    assert_eq!(failed["outcome"], "invalid", "{failed:?}");
    assert!(
        failed["error"].contains("the add handler was told to fail"),
        "{failed:?}"
    );
    let refused = fields_of(&refused);
    assert_eq!(refused["outcome"], "forbidden", "{refused:?}");
    assert!(
        refused["error"].contains("not for intruders"),
        "{refused:?}"
    );
}

/// Dispatches `1 + 1` on `bus` with `metadata`.
fn add_one_and_one(bus: &CommandBus, metadata: Metadata) {
    run(bus.dispatch_with(
        Add {
            a: 1,
            b: 1,
            ..Add::default()
        },
        metadata,
    ))
    .unwrap();
}

/// `on_span` is given each dispatch's span before the span is first entered (an OpenTelemetry
/// parent can only be set then), with the message's metadata and its trace context.
#[test]
fn on_span_gets_each_span_before_it_is_entered_with_the_metadata() {
    let spans = recorded();
    type Seen = Arc<Mutex<Vec<(u64, bool, Option<String>)>>>;
    let seen = Seen::default();
    let hook_seen = seen.clone();
    let bus = CommandBus::builder()
        .layer(TracingLayer::new().on_span(move |span, metadata| {
            let id = span.id().expect("a span the subscriber wants").into_u64();
            let parent = metadata.trace_context.get("traceparent").cloned();
            hook_seen
                .lock()
                .unwrap()
                .push((id, was_entered(id), parent));
        }))
        .handler(AddHandler)
        .build()
        .unwrap();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let metadata = Metadata::new().with_trace_field("traceparent", traceparent);
    add_one_and_one(&bus, metadata.clone());
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "once per dispatch");
    let (id, entered, parent) = &seen[0];
    assert!(!entered, "the hook runs before the span is entered");
    assert!(was_entered(*id), "and the dispatch runs in it after");
    assert_eq!(parent.as_deref(), Some(traceparent));
    let spans = spans.lock().unwrap();
    let (name, fields) = &spans[*id as usize - 1];
    assert_eq!(name, "dispatch");
    assert_eq!(
        fields.get("message_id"),
        Some(&metadata.message_id.to_string()),
        "the span of this dispatch"
    );
}

/// `inject` writes the dispatch span's context into the message's metadata before the
/// handler runs, after `on_span` read the incoming one: the events the handler records carry
/// it, so their handlers continue this span (also for a request that came with none), not
/// the client's.
#[test]
fn inject_hands_the_span_on_to_the_events_the_handler_records() {
    let _spans = recorded();
    let parents = Arc::new(Mutex::new(Vec::new()));
    let seen = parents.clone();
    let bus = CommandBus::builder()
        .layer(
            TracingLayer::new()
                .inject(|span, metadata| {
                    let id = span.id().expect("a span the subscriber wants").into_u64();
                    metadata
                        .trace_context
                        .insert("traceparent".into(), format!("span-{id}"));
                })
                .on_span(move |_, metadata| {
                    let parent = metadata.trace_context.get("traceparent").cloned();
                    seen.lock().unwrap().push(parent);
                }),
        )
        .handler(AddHandler)
        .build()
        .unwrap();
    for incoming in [
        None,
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ] {
        let mut metadata = Metadata::new();
        if let Some(traceparent) = incoming {
            metadata = metadata.with_trace_field("traceparent", traceparent);
        }
        let add = Add {
            a: 1,
            b: 1,
            record: true,
            ..Add::default()
        };
        let executed = run(bus.execute(add, metadata)).unwrap();
        assert_eq!(executed.events.len(), 2);
        let carried: Vec<_> = executed
            .events
            .iter()
            .map(|e| e.metadata.trace_context.get("traceparent").cloned())
            .collect();
        let first = carried[0].clone().expect("a trace context");
        assert!(first.starts_with("span-"), "{first}");
        assert!(carried.iter().all(|c| c.as_deref() == Some(first.as_str())));
        assert_eq!(
            parents.lock().unwrap().pop().flatten().as_deref(),
            incoming,
            "on_span read the incoming context, set before `inject`"
        );
    }
}

/// Logs from its `call` (the synchronous part of a layer's work, as a layer that begins a
/// transaction there does).
#[derive(Clone)]
struct Chatty<S>(S);

impl<S> tower::Service<cqrs_core::Dispatch> for Chatty<S>
where
    S: tower::Service<cqrs_core::Dispatch, Response = cqrs_core::Reply>,
{
    type Response = cqrs_core::Reply;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, dispatch: cqrs_core::Dispatch) -> S::Future {
        tracing::info!(marker = %dispatch.metadata().message_id, "an inner layer's call");
        self.0.call(dispatch)
    }
}

#[test]
fn what_inner_layers_do_in_call_happens_inside_the_span() {
    let (spans, events) = recorder();
    let bus = CommandBus::builder()
        .layer(TracingLayer::new())
        .layer(tower::layer::layer_fn(Chatty))
        .handler(AddHandler)
        .build()
        .unwrap();
    let metadata = Metadata::new();
    run(bus.dispatch_with(Add::default(), metadata.clone())).unwrap();
    let message_id = metadata.message_id.to_string();
    let span = spans
        .lock()
        .unwrap()
        .iter()
        .position(|(name, fields)| {
            name == "dispatch" && fields.get("message_id") == Some(&message_id)
        })
        .expect("the dispatch has its span");
    let events = events.lock().unwrap();
    let logged: Vec<_> = events
        .iter()
        .filter(|(fields, _)| fields.get("marker") == Some(&message_id))
        .collect();
    assert_eq!(logged.len(), 1, "{events:?}");
    assert_eq!(
        logged[0].1,
        Some(span),
        "the inner layer's log is outside the dispatch span"
    );
}

/// The bus's own error logs name the message in a field of its own: a field called `message`
/// would collide with the log's text (which `tracing` records as `message`), and a JSON log
/// would keep only one of the two.
#[test]
fn a_panic_in_a_dropped_layer_future_is_logged_with_its_text_and_the_message_name() {
    let (_, events) = recorder();
    let bus = CommandBus::builder()
        .layer(FaultyLayer::default())
        .handler(AddHandler)
        .build()
        .unwrap();
    run(async {
        let mut pending = Box::pin(bus.dispatch_with(Add::default(), as_actor("panic on drop")));
        let polled = std::future::poll_fn(|cx| std::task::Poll::Ready(pending.as_mut().poll(cx)));
        assert!(polled.await.is_pending());
        drop(pending);
    });
    let events = events.lock().unwrap();
    let logged = events
        .iter()
        .find(|(fields, _)| {
            fields
                .get("message")
                .is_some_and(|m| m.contains("a layer's future panicked when it was dropped"))
        })
        .unwrap_or_else(|| panic!("no log of the panic: {events:?}"));
    assert_eq!(
        logged.0.get("message_name").map(String::as_str),
        Some("test.add"),
        "{logged:?}"
    );
}
