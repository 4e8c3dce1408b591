use crate::fixtures::*;
use cqrs_core::{BoxError, CommandBus, Dispatch, ErrorKind, HandlerError, Reply};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tower::{Layer, Service};

/// Records its name on the way in and out.
#[derive(Clone)]
struct Mark<S> {
    inner: S,
    name: &'static str,
    log: Arc<Mutex<Vec<String>>>,
    refuse: bool,
}

#[derive(Clone)]
struct MarkLayer {
    name: &'static str,
    log: Arc<Mutex<Vec<String>>>,
    refuse: bool,
}

impl<S> Layer<S> for MarkLayer {
    type Service = Mark<S>;
    fn layer(&self, inner: S) -> Mark<S> {
        Mark {
            inner,
            name: self.name,
            log: self.log.clone(),
            refuse: self.refuse,
        }
    }
}

impl<S> Service<Dispatch> for Mark<S>
where
    S: Service<Dispatch, Response = Reply>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Reply;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Reply, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dispatch: Dispatch) -> Self::Future {
        self.log
            .lock()
            .unwrap()
            .push(format!("{} in {}", self.name, dispatch.name()));
        if self.refuse {
            return Box::pin(std::future::ready(Err(HandlerError::forbidden(
                "refused by a layer",
            )
            .into())));
        }
        let fut = self.inner.call(dispatch);
        let (log, name) = (self.log.clone(), self.name);
        Box::pin(async move {
            let out = fut.await.map_err(Into::into);
            log.lock().unwrap().push(format!("{name} out"));
            out
        })
    }
}

fn layer(name: &'static str, log: &Arc<Mutex<Vec<String>>>, refuse: bool) -> MarkLayer {
    MarkLayer {
        name,
        log: log.clone(),
        refuse,
    }
}

#[test]
fn the_first_layer_added_is_the_outermost() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let bus = CommandBus::builder()
        .layer(layer("outer", &log, false))
        .layer(layer("inner", &log, false))
        .handler(AddHandler)
        .build()
        .unwrap();
    assert_eq!(
        run(bus.dispatch(Add {
            a: 2,
            b: 3,
            ..Add::default()
        }))
        .unwrap(),
        5
    );
    assert_eq!(
        *log.lock().unwrap(),
        [
            "outer in test.add",
            "inner in test.add",
            "inner out",
            "outer out"
        ]
    );
}

#[test]
fn a_layer_can_refuse_with_a_handler_error_that_keeps_its_kind() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let bus = CommandBus::builder()
        .layer(layer("guard", &log, true))
        .handler(AddHandler)
        .build()
        .unwrap();
    let err = run(bus.dispatch(Add::default())).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Forbidden);
    assert_eq!(err.handler_error().unwrap().message(), "refused by a layer");
}

#[test]
fn a_layered_bus_returns_recorded_events() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let bus = CommandBus::builder()
        .layer(layer("l", &log, false))
        .handler(AddHandler)
        .build()
        .unwrap();
    let executed = run(bus.execute(
        Add {
            record: true,
            ..Add::default()
        },
        cqrs_core::Metadata::new(),
    ))
    .unwrap();
    assert_eq!(executed.events.len(), 2);
}

/// Not ready until opened; registers the waker of every `poll_ready` that finds it closed.
#[derive(Clone)]
struct Gate<S> {
    inner: S,
    state: Arc<Mutex<GateState>>,
}

#[derive(Default)]
struct GateState {
    open: bool,
    waiting: Option<std::task::Waker>,
}

impl<S> Service<Dispatch> for Gate<S>
where
    S: Service<Dispatch, Response = Reply>,
{
    type Response = Reply;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let mut state = self.state.lock().unwrap();
        if !state.open {
            state.waiting = Some(cx.waker().clone());
            return Poll::Pending;
        }
        drop(state);
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dispatch: Dispatch) -> S::Future {
        self.inner.call(dispatch)
    }
}

#[test]
fn a_layer_that_is_not_ready_holds_the_dispatch_until_it_is() {
    run(async {
        let state = Arc::new(Mutex::new(GateState::default()));
        let gate = state.clone();
        let bus = CommandBus::builder()
            .layer(tower::layer::layer_fn(move |inner| Gate {
                inner,
                state: gate.clone(),
            }))
            .handler(AddHandler)
            .build()
            .unwrap();
        let dispatch = tokio::spawn({
            let bus = bus.clone();
            async move { bus.dispatch(Add::default()).await }
        });
        // Wait until the dispatch is parked on the gate with a real waker, then open it.
        cqrs_core::testing::eventually(
            std::time::Duration::from_secs(5),
            "the dispatch waits at the gate",
            || {
                let state = state.clone();
                async move { state.lock().unwrap().waiting.is_some().then_some(()) }
            },
        )
        .await;
        assert!(
            !dispatch.is_finished(),
            "the dispatch waits while the gate is closed"
        );
        let waker = {
            let mut state = state.lock().unwrap();
            state.open = true;
            state.waiting.take()
        };
        waker.expect("a registered waker").wake();
        let result = tokio::time::timeout(std::time::Duration::from_secs(5), dispatch)
            .await
            .expect("the dispatch goes on once the gate opens")
            .unwrap();
        assert!(result.is_ok(), "{result:?}");
    });
}

/// A value a layer lends the handler through the dispatch's extensions.
#[derive(Clone, Debug, PartialEq)]
struct Lent(u32);

/// Puts [`Lent`] in each dispatch and records whether the reply hands it back.
#[derive(Clone)]
struct Lend<S> {
    inner: S,
    back: Arc<Mutex<Vec<bool>>>,
}

impl<S> Service<Dispatch> for Lend<S>
where
    S: Service<Dispatch, Response = Reply>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Reply;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Reply, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut dispatch: Dispatch) -> Self::Future {
        dispatch.extensions_mut().insert(Lent(7));
        let fut = self.inner.call(dispatch);
        let back = self.back.clone();
        Box::pin(async move {
            let mut reply = fut.await.map_err(Into::into)?;
            let returned = reply.extensions_mut().remove::<Lent>() == Some(Lent(7));
            back.lock().unwrap().push(returned);
            Ok(reply)
        })
    }
}

/// What a layer lends through the extensions comes back to it in the reply, for queries as
/// for commands (a layer that opened a transaction ends it there).
#[test]
fn a_layer_gets_back_what_it_lent_the_handler() {
    run(async {
        let back = Arc::new(Mutex::new(Vec::new()));
        let lend = {
            let back = back.clone();
            tower::layer::layer_fn(move |inner| Lend {
                inner,
                back: back.clone(),
            })
        };
        let commands = CommandBus::builder()
            .layer(lend.clone())
            .handler(AddHandler)
            .build()
            .unwrap();
        let add = Add {
            a: 1,
            b: 2,
            ..Add::default()
        };
        assert_eq!(commands.dispatch(add).await.unwrap(), 3);
        let queries = cqrs_core::QueryBus::builder()
            .layer(lend)
            .handler(DoubleHandler)
            .build()
            .unwrap();
        assert_eq!(queries.dispatch(Double(2)).await.unwrap(), 4);
        assert_eq!(*back.lock().unwrap(), [true, true], "command, then query");
    });
}

/// A value a caller hands to the handler through the extensions; the handler counts on it.
struct Tally(u32);

struct Count;

impl cqrs_core::Message for Count {
    const NAME: &'static str = "test.count";
}

impl cqrs_core::Command for Count {
    type Output = ();
}

struct CountHandler;

#[cqrs_core::async_trait]
impl cqrs_core::CommandHandler<Count> for CountHandler {
    async fn handle(
        &self,
        _cmd: Count,
        ctx: &mut cqrs_core::CommandContext,
    ) -> Result<(), HandlerError> {
        let tally = ctx
            .extensions_mut()
            .get_mut::<Tally>()
            .ok_or_else(|| HandlerError::invalid("no_tally", "no tally handed in"))?;
        tally.0 += 1;
        Ok(())
    }
}

#[test]
fn execute_hands_the_extensions_back_with_what_the_handler_did_to_them() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let bare = CommandBus::builder().handler(CountHandler).build().unwrap();
    let layered = CommandBus::builder()
        .layer(MarkLayer {
            name: "outer",
            log,
            refuse: false,
        })
        .handler(CountHandler)
        .build()
        .unwrap();
    run(async {
        for (bus, path) in [(&bare, "bare"), (&layered, "layered")] {
            let mut extensions = cqrs_core::Extensions::new();
            extensions.insert(Tally(41));
            let executed = bus
                .execute_with_extensions(Count, cqrs_core::Metadata::new(), extensions)
                .await
                .unwrap();
            let tally = executed.extensions.get::<Tally>().map(|t| t.0);
            assert_eq!(
                tally,
                Some(42),
                "{path}: the caller gets its value back, counted"
            );
        }
    });
}

/// A value a caller hands to a query handler, and to the layers around it.
#[derive(Clone)]
struct Tenant(&'static str);

struct Whose;

impl cqrs_core::Message for Whose {
    const NAME: &'static str = "test.whose";
}

impl cqrs_core::Query for Whose {
    type Output = &'static str;
}

struct WhoseHandler;

#[cqrs_core::async_trait]
impl cqrs_core::QueryHandler<Whose> for WhoseHandler {
    async fn handle(
        &self,
        _query: Whose,
        ctx: &cqrs_core::QueryContext,
    ) -> Result<&'static str, HandlerError> {
        let tenant = ctx
            .extensions()
            .get::<Tenant>()
            .ok_or_else(|| HandlerError::invalid("no_tenant", "no tenant handed in"))?;
        Ok(tenant.0)
    }
}

/// Refuses a dispatch that carries no [`Tenant`]: what a layer reads of the extensions.
#[derive(Clone)]
struct NeedsTenant<S>(S);

impl<S> Service<Dispatch> for NeedsTenant<S>
where
    S: Service<Dispatch, Response = Reply>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Reply;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Reply, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dispatch: Dispatch) -> Self::Future {
        if dispatch.extensions().get::<Tenant>().is_none() {
            return Box::pin(std::future::ready(Err(HandlerError::forbidden(
                "no tenant",
            )
            .into())));
        }
        let answer = self.0.call(dispatch);
        Box::pin(async move { answer.await.map_err(Into::into) })
    }
}

#[test]
fn a_query_dispatched_with_extensions_hands_them_to_layers_and_handler() {
    let bare = cqrs_core::QueryBus::builder()
        .handler(WhoseHandler)
        .build()
        .unwrap();
    let layered = cqrs_core::QueryBus::builder()
        .layer(tower::layer::layer_fn(NeedsTenant))
        .handler(WhoseHandler)
        .build()
        .unwrap();
    run(async {
        // Without a tenant, the layer refuses (forbidden) before the handler (invalid) would.
        for (bus, path, refused) in [
            (&bare, "bare", ErrorKind::Invalid),
            (&layered, "layered", ErrorKind::Forbidden),
        ] {
            let mut extensions = cqrs_core::Extensions::new();
            extensions.insert(Tenant("acme"));
            let answer = bus
                .dispatch_with_extensions(Whose, cqrs_core::Metadata::new(), extensions)
                .await;
            assert_eq!(answer.unwrap(), "acme", "{path}");
            let without = bus.dispatch(Whose).await.unwrap_err();
            assert_eq!(without.kind(), refused, "{path}: {without}");
        }
    });
}
