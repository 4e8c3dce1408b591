//! Routes or OpenAPI schemas that collide fail the build with an error naming the route (or
//! schema) and who contributed it, instead of a panic: a plugin route on one of the gateway's
//! paths (`/health`, `/ws`, ...), a method and path two contributors both serve, a schema
//! name two contributors define differently. The same schema defined twice alike is fine. So
//! does an API contributed as a type the server does not take (a `Box<HttpApi>`), which would
//! otherwise serve nothing without a word.

use crate::support::*;
use axum::routing::{get, post};
use futures_util::FutureExt;
use helpdesk::{Hooks, build};
use helpdesk_api::{HttpApi, Operation};
use serde_json::{Value, json};
use std::sync::Arc;

/// Builds (in memory) with `api` contributed by the test's hooks; the error's text, if any.
async fn build_with(api: impl Fn() -> HttpApi + Send + Sync + 'static) -> Result<(), String> {
    let hooks = Hooks {
        provide: vec![Arc::new(move |registrar| {
            registrar.contribute::<HttpApi>(api());
        })],
        ..Hooks::default()
    };
    let config = test_config(&Backend::Memory);
    // Caught here, so that the old panic fails the test with a message, not an abort.
    let built = std::panic::AssertUnwindSafe(build(&config, hooks))
        .catch_unwind()
        .await;
    match built {
        Ok(Ok(app)) => {
            app.runtime
                .shutdown(std::time::Duration::from_secs(2))
                .await
                .unwrap();
            Ok(())
        }
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(panic) => panic!(
            "the build panicked instead of returning an error: {:?}",
            panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or(panic.downcast_ref::<&str>().copied())
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_route_on_a_gateway_path_is_an_error_naming_it() {
    within(async {
        for path in ["/health", "/ws", "/ready", "/metrics", "/openapi.json", "/"] {
            let err = build_with(move || {
                HttpApi::new().route(
                    path,
                    get(|| async { "mine" }),
                    [Operation::new("get", "Mine")],
                )
            })
            .await
            .expect_err(path);
            assert!(err.contains(&format!("GET {path}")), "{path}: {err}");
            assert!(err.contains("gateway"), "{path}: {err}");
        }
        // Another method on a gateway path is refused too: the path is the gateway's.
        let err = build_with(|| {
            HttpApi::new().route(
                "/health",
                post(|| async { "mine" }),
                [Operation::new("post", "Mine")],
            )
        })
        .await
        .unwrap_err();
        assert!(err.contains("/health"), "{err}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_contributors_of_one_method_and_path_is_an_error_naming_both() {
    within(async {
        let err = build_with(|| {
            HttpApi::new().route(
                "/tickets",
                post(|| async { "mine" }),
                [Operation::new("post", "Mine")],
            )
        })
        .await
        .unwrap_err();
        assert!(err.contains("POST /tickets"), "{err}");
        assert!(err.contains("tickets"), "{err}");
        // An undocumented method is caught too, when the routes are merged.
        let err = build_with(|| HttpApi::new().route("/tickets", post(|| async { "mine" }), []))
            .await
            .unwrap_err();
        assert!(err.contains("/tickets") && err.contains("`POST`"), "{err}");
        assert!(
            err.contains("`tickets` plugin") && err.contains("Hooks::provide"),
            "{err}"
        );
        // Another method on a plugin's path is no collision.
        build_with(|| {
            HttpApi::new().route(
                "/tickets",
                axum::routing::put(|| async { "mine" }),
                [Operation::new("put", "Mine")],
            )
        })
        .await
        .unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_defined_differently_twice_is_an_error_and_alike_twice_is_not() {
    within(async {
        let err = build_with(|| HttpApi::new().schema("Ticket", json!({ "type": "string" })))
            .await
            .unwrap_err();
        assert!(err.contains("Ticket"), "{err}");
        assert!(err.contains("tickets"), "{err}");
        // The tickets plugin's own definition, contributed again alike.
        let config = test_config(&Backend::Memory);
        let app = build(&config, Hooks::default()).await.unwrap();
        let r = openapi_of(app.router.clone()).await;
        app.runtime
            .shutdown(std::time::Duration::from_secs(2))
            .await
            .unwrap();
        let ticket: Value = r["components"]["schemas"]["Ticket"].clone();
        assert!(ticket.is_object(), "{r}");
        build_with(move || HttpApi::new().schema("Ticket", ticket.clone()))
            .await
            .unwrap();
    })
    .await;
}

/// A route whose operation documents a path parameter its path does not have (renamed in
/// one place, not the other) fails the start, naming the contributor and both names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_documented_path_parameter_the_path_lacks_is_an_error() {
    within(async {
        let err = build_with(|| {
            HttpApi::new().route(
                "/tickets/{ticket_id}/tags",
                axum::routing::get(|| async { "[]" }),
                [Operation::new("get", "The ticket's tags").param(
                    "id",
                    "path",
                    true,
                    serde_json::json!({ "type": "string" }),
                    "the ticket",
                )],
            )
        })
        .await
        .expect_err("a parameter the path lacks");
        assert!(
            err.contains("GET /tickets/{ticket_id}/tags documents a path parameter `id`")
                && err.contains("does not document its path parameter `ticket_id`"),
            "{err}"
        );
    })
    .await;
}

/// `/tickets/{ticket_id}` is `/tickets/{id}` to the router (which refuses two names for one
/// route's parameter): an error naming both, not a panic when the router is built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_differing_only_in_a_parameters_name_is_an_error_naming_both() {
    within(async {
        let err = build_with(|| {
            HttpApi::new().route(
                "/tickets/{ticket_id}",
                axum::routing::delete(|| async { "gone" }),
                [Operation::new("delete", "Delete a ticket").param(
                    "ticket_id",
                    "path",
                    true,
                    serde_json::json!({ "type": "string" }),
                    "the ticket",
                )],
            )
        })
        .await
        .expect_err("a route of the same shape");
        assert!(
            err.contains("/tickets/{id}") && err.contains("/tickets/{ticket_id}"),
            "{err}"
        );
    })
    .await;
}

/// A route path axum refuses (no leading `/`, axum 0.7's `:name` syntax) fails the start with
/// an error naming the contributor, the path and axum's reason: axum panicked when the
/// server built its router, naming neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_path_axum_refuses_is_an_error_naming_it() {
    within(async {
        for (path, reason) in [
            ("notes", "must start with a `/`"),
            ("/notes/:all", "starts with `:`"),
            ("/notes/*rest", "starts with `*`"),
            ("/notes/{all", "valid name"),
        ] {
            let err = build_with(move || {
                HttpApi::new().route(
                    path,
                    get(|| async { "[]" }),
                    [Operation::new("get", "Notes")],
                )
            })
            .await
            .expect_err(path);
            assert!(
                err.contains(&format!("axum refuses the route path `{path}`"))
                    && err.contains(reason)
                    && err.contains("outside any plugin"),
                "{path}: {err}"
            );
        }
    })
    .await;
}

/// Two paths of one contribution that are one route to the router, their parameters named
/// differently, fail the start naming the contributor: the router panicked on them when the
/// server built it (the check between contributions did not look within one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_paths_of_one_contribution_that_are_one_route_are_an_error() {
    within(async {
        let err = build_with(|| {
            HttpApi::new()
                .route(
                    "/notes/{id}",
                    get(|| async { "a note" }),
                    [Operation::new("get", "A note").param(
                        "id",
                        "path",
                        true,
                        json!({ "type": "string" }),
                        "the note",
                    )],
                )
                .route(
                    "/notes/{note_id}",
                    post(|| async { "changed" }),
                    [Operation::new("post", "Change a note").param(
                        "note_id",
                        "path",
                        true,
                        json!({ "type": "string" }),
                        "the note",
                    )],
                )
        })
        .await
        .expect_err("one route, two parameter names");
        assert!(
            err.contains("axum refuses the route path `/notes/{note_id}`")
                && err.contains("/notes/{id}")
                && err.contains("outside any plugin"),
            "{err}"
        );
    })
    .await;
}

/// The router's `/openapi.json`.
async fn openapi_of(router: axum::Router) -> Value {
    use tower::ServiceExt;
    let response = router
        .oneshot(
            axum::http::Request::get("/openapi.json")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_contributed_as_another_type_is_an_error_naming_it() {
    within(async {
        let hooks = Hooks {
            provide: vec![Arc::new(|registrar| {
                registrar.contribute(Box::new(HttpApi::new()));
            })],
            ..Hooks::default()
        };
        let err = match build(&test_config(&Backend::Memory), hooks).await {
            Ok(app) => {
                app.runtime
                    .shutdown(std::time::Duration::from_secs(2))
                    .await
                    .unwrap();
                panic!("the build ignored a contribution nobody takes");
            }
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains("`std::boxed::Box<helpdesk_api::api::HttpApi>` (from the server)"),
            "{err}"
        );
    })
    .await;
}
