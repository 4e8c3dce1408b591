use crate::support::*;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// With `--metrics-token`, `/metrics` answers only a request bearing that token: without one,
/// or with another, 401 `unauthorized` with `WWW-Authenticate: Bearer`, the series not shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_with_a_token_set_answer_only_its_bearer() {
    within(async {
        let token = "0123456789abcdef0123";
        let s = TestServer::start_with(|c| c.metrics_token = Some(token.to_owned())).await;
        for given in [
            None,
            Some("Bearer wrong-token-0123456"),
            Some("Bearer 0123456789abcdef012"),
            Some("Basic 0123456789abcdef0123"),
        ] {
            let mut request = s.http.get(s.url("/metrics"));
            if let Some(value) = given {
                request = request.header("authorization", value);
            }
            let answer = request.send().await.unwrap();
            assert_eq!(answer.status(), StatusCode::UNAUTHORIZED, "{given:?}");
            let challenge = match given {
                Some(value) if value.starts_with("Bearer") => "Bearer error=\"invalid_token\"",
                _ => "Bearer",
            };
            assert_eq!(answer.headers()["www-authenticate"], challenge, "{given:?}");
            let body: Value = answer.json().await.unwrap();
            assert_eq!(body["error"]["code"], "unauthorized", "{given:?}");
        }
        for scheme in ["Bearer", "bearer"] {
            let answer = s
                .http
                .get(s.url("/metrics"))
                .header("authorization", format!("{scheme} {token}"))
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), StatusCode::OK, "{scheme}");
            assert!(answer.text().await.unwrap().contains("http_requests_total"));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_metrics_openapi_and_the_home_page_answer() {
    within(async {
        let s = TestServer::start().await;
        let health = s.send(Method::GET, "/health", None, None).await;
        assert_eq!(
            (health.status, health.body["status"].as_str()),
            (StatusCode::OK, Some("ok"))
        );
        let ready = s.send(Method::GET, "/ready", None, None).await;
        assert_eq!(ready.status, StatusCode::OK, "{ready:?}");
        assert_eq!(ready.body["status"], "ready");
        assert_eq!(
            ready.body["components"][s.backend.critical_component()]["status"],
            "healthy"
        );

        let (token, _) = s.customer().await;
        let id = s.ticket(&token, "metrics").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        s.get(&format!("/tickets/{id}"), &token).await;
        // Refused by the body limit before any handler: counted all the same.
        let oversize = s
            .http
            .post(s.url("/auth/register"))
            .header("content-type", "application/json")
            // The server answers before reading the body, then drops the connection: keep it
            // out of the client's pool, or the next request may go out on it and fail.
            .header("connection", "close")
            .body(vec![b' '; helpdesk::BODY_LIMIT + 1024])
            .send()
            .await
            .unwrap();
        assert_eq!(oversize.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let metrics = s.metrics().await;
        assert!(metrics.contains("http_requests_total"), "{metrics}");
        assert!(
            metrics.contains("route=\"/tickets/{id}\""),
            "route templates, not raw paths"
        );
        assert!(!metrics.contains(&id), "no ids in labels");
        assert!(
            metrics.lines().any(|l| l.starts_with("http_requests_total")
                && l.contains("route=\"/auth/register\"")
                && l.contains("status=\"413\"")),
            "answers of the outer layers are counted: {metrics}"
        );
        assert!(
            metrics.contains("cqrs_dispatch_total"),
            "command and query dispatches are counted"
        );
        assert!(metrics.contains("message=\"tickets.open\""));
        assert!(metrics.contains("cqrs_dispatch_duration_seconds"));
        // Health as series, as of `/ready`'s run above: one per component and status, 1 for
        // the component's status.
        let critical = s.backend.critical_component();
        for (status, value) in [("healthy", "1"), ("unhealthy", "0")] {
            assert!(
                metrics
                    .lines()
                    .any(|l| l.starts_with("cqrs_component_status{")
                        && l.contains(&format!("component=\"{critical}\""))
                        && l.contains(&format!("status=\"{status}\""))
                        && l.contains("critical=\"true\"")
                        && l.ends_with(&format!(" {value}"))),
                "{critical} {status} {value}: {metrics}"
            );
        }
        // Histograms with buckets, which add up across instances (not summaries).
        for name in [
            "http_request_duration_seconds",
            "cqrs_dispatch_duration_seconds",
        ] {
            assert!(
                metrics.contains(&format!("# TYPE {name} histogram"))
                    && metrics.contains(&format!("{name}_bucket{{")),
                "{name}: {metrics}"
            );
        }
        // Every family says what it measures: a `# HELP` line beside each `# TYPE`.
        let types: Vec<&str> = metrics
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        assert!(types.len() > 5, "{metrics}");
        for name in types {
            let help = metrics
                .lines()
                .find_map(|l| l.strip_prefix(&format!("# HELP {name} ")));
            assert!(
                help.is_some_and(|h| h.len() > 10),
                "{name} has no # HELP: {metrics}"
            );
        }
        // Events published (by the relay) and handled (by the stats projection), by type, and
        // how far behind the projection is.
        cqrs_core::testing::eventually(
            std::time::Duration::from_secs(30),
            "event metrics",
            || async {
                let text = s
                    .http
                    .get(s.url("/metrics"))
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                (text.contains("cqrs_events_published_total")
                    && text.contains("event_type=\"TicketOpened\"")
                    && text.contains("cqrs_events_handled_total")
                    && text.contains("cqrs_projection_lag_seconds{projection=\"tickets.stats\"}"))
                .then_some(())
            },
        )
        .await;

        let api = s.send(Method::GET, "/openapi.json", None, None).await;
        assert_eq!(api.status, StatusCode::OK);
        assert!(api.body["openapi"].as_str().unwrap().starts_with("3."));
        for (path, method) in [
            ("/auth/register", "post"),
            ("/auth/login", "post"),
            ("/auth/me", "get"),
            ("/users/{id}", "get"),
            ("/tickets", "post"),
            ("/tickets", "get"),
            ("/tickets/{id}", "get"),
            ("/tickets/{id}/assign", "post"),
            ("/tickets/{id}/comments", "post"),
            ("/tickets/{id}/close", "post"),
            ("/tickets/{id}/history", "get"),
            ("/tickets/stats", "get"),
            ("/health", "get"),
            ("/ready", "get"),
            ("/metrics", "get"),
            ("/ws", "get"),
        ] {
            let operation = &api.body["paths"][path][method];
            assert!(operation.is_object(), "{method} {path} is documented");
            // Bodies refuse unknown fields, and the spec says so.
            let body = &operation["requestBody"]["content"]["application/json"]["schema"];
            if body.is_object() {
                assert_eq!(body["additionalProperties"], false, "{method} {path}");
            }
            // A route that asks the user store says it may be out of reach.
            if operation["security"].is_array() {
                assert!(
                    operation["responses"]["503"].is_object(),
                    "{method} {path} documents its 503"
                );
            }
            // The headers a client needs are declared (generated clients expose only those):
            // `Retry-After` wherever the answer advises a wait.
            for status in ["429", "503"] {
                let response = &operation["responses"][status];
                if response.is_object() && path != "/ws" && path != "/ready" {
                    assert_eq!(
                        response["headers"]["Retry-After"]["schema"]["type"], "string",
                        "{method} {path} {status}: {response}"
                    );
                }
            }
        }
        let responses = |path: &str| &api.body["paths"][path]["post"]["responses"];
        for header in ["Location", "Idempotency-Replayed"] {
            assert!(
                responses("/tickets")["201"]["headers"][header].is_object(),
                "{header}: {}",
                responses("/tickets")
            );
        }
        for (path, status) in [
            ("/tickets/{id}/assign", "200"),
            ("/tickets/{id}/comments", "201"),
            ("/tickets/{id}/close", "200"),
        ] {
            assert!(
                responses(path)[status]["headers"]["Idempotency-Replayed"].is_object(),
                "{path}: {}",
                responses(path)
            );
            assert!(
                responses(path)["409"]["headers"]["Retry-After"].is_object(),
                "{path}: {}",
                responses(path)
            );
        }
        assert!(
            api.body["paths"]["/auth/me"]["get"]["responses"]["401"]["headers"]["WWW-Authenticate"]
                .is_object()
        );
        // The handshake's refusals, each a status of its own, and its token.
        let ws = &api.body["paths"]["/ws"]["get"];
        for status in ["101", "400", "401", "426", "429", "503"] {
            assert!(
                ws["responses"][status].is_object(),
                "/ws documents {status}"
            );
        }
        assert_eq!(ws["security"], json!([{ "bearer": [] }]));
        assert_eq!(ws["parameters"][0]["name"], "token");
        assert_eq!(ws["parameters"][0]["in"], "query");
        for status in ["400", "401", "426", "429", "503"] {
            assert_eq!(
                ws["responses"][status]["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/Error",
                "/ws {status}"
            );
        }
        assert!(ws["responses"]["401"]["headers"]["WWW-Authenticate"].is_object());
        assert!(ws["responses"]["503"]["headers"]["Retry-After"].is_object());
        let home = s.http.get(s.url("/")).send().await.unwrap();
        assert!(
            home.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
        assert!(home.text().await.unwrap().contains("Helpdesk"));

        let id_header = s
            .http
            .get(s.url("/health"))
            .header("x-request-id", "abc-123")
            .send()
            .await
            .unwrap();
        assert_eq!(
            id_header.headers()["x-request-id"],
            "abc-123",
            "request ids propagate"
        );
        let generated = s.http.get(s.url("/health")).send().await.unwrap();
        assert!(
            generated.headers().get("x-request-id").is_some(),
            "and are made when missing"
        );
        // Too long, or not of the safe characters: replaced by one the server makes (a UUID).
        for unusable in [
            "a".repeat(129),
            "two words".to_owned(),
            "x}:_ERROR".to_owned(),
            "say\"so\"".to_owned(),
        ] {
            let replaced = s
                .http
                .get(s.url("/health"))
                .header("x-request-id", unusable.as_str())
                .send()
                .await
                .unwrap();
            let id = replaced.headers()["x-request-id"].to_str().unwrap();
            assert!(
                uuid::Uuid::parse_str(id).is_ok(),
                "{unusable:?} answered with {id:?}"
            );
        }
        // Every safe character, and the longest id taken: kept as sent.
        for usable in ["01HZX3/trace+id=.:_-".to_owned(), "b".repeat(128)] {
            let kept = s
                .http
                .get(s.url("/health"))
                .header("x-request-id", usable.as_str())
                .send()
                .await
                .unwrap();
            assert_eq!(kept.headers()["x-request-id"], usable.as_str());
        }
        s.stop().await;
    })
    .await;
}

/// Every documented operation lists what it answers to a request it cannot take: the API
/// document is read, and each operation is sent such requests (no token, a malformed id, a body
/// that is not JSON, broken JSON, JSON of the wrong shape, a body over the limit, a malformed
/// Idempotency-Key); each answer must be the expected status and one the operation documents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_documents_what_it_answers_to_a_request_it_cannot_take() {
    within(async {
        let s = TestServer::start().await;
        let (customer, _) = s.customer().await;
        let (agent, agent_id) = s.agent().await;
        let id = s.ticket(&customer, "documented").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let api = s.send(Method::GET, "/openapi.json", None, None).await;
        assert_eq!(api.status, StatusCode::OK, "{api:?}");
        let paths = api.body["paths"].as_object().unwrap();
        let mut probed = Vec::new();
        for (path, operations) in paths {
            for (method, op) in operations.as_object().unwrap() {
                let secured = op.get("security").is_some();
                let takes_body = op.get("requestBody").is_some();
                let takes_key = op["parameters"]
                    .as_array()
                    .is_some_and(|params| params.iter().any(|p| p["name"] == "Idempotency-Key"));
                let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
                let mut cases: Vec<Probe<'_>> = Vec::new();
                let at = |id: &str| path.replace("{id}", id);
                let json = "application/json";
                let valid_looking = b"{}".to_vec();
                if secured {
                    cases.push((
                        "no token",
                        at(&id),
                        None,
                        json,
                        valid_looking.clone(),
                        StatusCode::UNAUTHORIZED,
                    ));
                }
                if path.contains("{id}") {
                    cases.push((
                        "a malformed id",
                        at("not-a-uuid"),
                        None,
                        json,
                        valid_looking.clone(),
                        StatusCode::BAD_REQUEST,
                    ));
                }
                if takes_body {
                    cases.push((
                        "not JSON",
                        at(&id),
                        None,
                        "text/plain",
                        valid_looking.clone(),
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    ));
                    cases.push((
                        "broken JSON",
                        at(&id),
                        None,
                        json,
                        b"{".to_vec(),
                        StatusCode::BAD_REQUEST,
                    ));
                    cases.push((
                        "JSON of the wrong shape",
                        at(&id),
                        None,
                        json,
                        br#"{"no_such_field": 1}"#.to_vec(),
                        StatusCode::UNPROCESSABLE_ENTITY,
                    ));
                    // Declared, not sent: the server answers before reading it.
                    let token = secured.then_some(agent.as_str());
                    let (status, code) = oversize(&s, &method, &at(&id), token).await;
                    assert_eq!(status, 413, "{method} {path} with a body over the limit");
                    documented(op, &method, path, "a body over the limit", status, &code);
                    probed.push(format!("{method} {path} {status}"));
                }
                if takes_key {
                    // A body the route takes, so the key is what it refuses.
                    let valid = match path.as_str() {
                        "/tickets" => json!({ "title": "never opened" }),
                        "/tickets/{id}/assign" => json!({ "assignee_id": agent_id }),
                        "/tickets/{id}/comments" => json!({ "body": "never sent" }),
                        "/tickets/{id}/close" => json!({}),
                        other => panic!("give {other} a valid body here"),
                    };
                    cases.push((
                        "a malformed Idempotency-Key",
                        at(&id),
                        Some("a b"),
                        json,
                        valid.to_string().into_bytes(),
                        StatusCode::BAD_REQUEST,
                    ));
                }
                for (what, url, key, content_type, body, expected) in cases {
                    let mut request = s.http.request(method.clone(), s.url(&url));
                    if secured && what != "no token" {
                        request = request.bearer_auth(&agent);
                    }
                    if let Some(key) = key {
                        request = request.header("idempotency-key", key);
                    }
                    if method != Method::GET {
                        request = request.header("content-type", content_type).body(body);
                    }
                    let r = Response::from(request.send().await.unwrap()).await;
                    assert_eq!(r.status, expected, "{method} {url} with {what}: {r:?}");
                    let status = r.status.as_u16();
                    let code = r.body["error"]["code"].as_str().unwrap_or_default();
                    documented(op, &method, path, what, status, code);
                    probed.push(format!("{method} {path} {status}"));
                }
            }
        }
        // The probes reached the routes with bodies, not only the gateway's own.
        for probe in [
            "POST /tickets 413",
            "POST /tickets 415",
            "POST /tickets 400",
            "POST /tickets/{id}/assign 415",
            "POST /tickets/{id}/comments 413",
            "POST /tickets/{id}/close 422",
            "POST /auth/login 415",
            "GET /tickets/{id} 400",
        ] {
            assert!(
                probed.iter().any(|p| p == probe),
                "{probe} not probed: {probed:?}"
            );
        }
        // Nothing the probes sent changed the ticket.
        let t = s.get(&format!("/tickets/{id}"), &customer).await;
        assert_eq!(t.body["version"], 1, "{t:?}");
        s.stop().await;
    })
    .await;
}

/// A request that cannot be taken: what it is, its path, its Idempotency-Key, its content type,
/// its body and the status it must get.
type Probe<'a> = (
    &'a str,
    String,
    Option<&'a str>,
    &'a str,
    Vec<u8>,
    StatusCode,
);

/// Asserts that `op` documents the `status` it answered to `what`.
fn documented(op: &Value, method: &Method, path: &str, what: &str, status: u16, code: &str) {
    let response = &op["responses"][status.to_string()];
    assert!(
        response.is_object(),
        "{method} {path} answers {status} ({code}) to {what}, undocumented: {}",
        op["responses"]
    );
    let description = response["description"].as_str().unwrap_or_default();
    assert!(
        description.contains(&format!("`{code}`")),
        "{method} {path} answers {status} `{code}` to {what}; its description does not name it: {description}"
    );
}

/// [`TestServer::oversize`]'s status and error code.
async fn oversize(
    s: &TestServer,
    method: &Method,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let (status, body) = s.oversize(method, path, token).await;
    let body: Value = serde_json::from_str(&body).unwrap_or_default();
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (status, code)
}

/// What the API document allows is taken: an optional body field it types as nullable may be
/// `null` (the field left out), and a query parameter it marks `allowEmptyValue` may be empty
/// (the parameter left out). Read from the document, so a field or parameter added later is
/// checked too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_api_document_allows_as_null_or_empty_is_taken() {
    within(async {
        let s = TestServer::start().await;
        let (customer, _) = s.customer().await;
        let (agent, agent_id) = s.agent().await;
        let api = s.send(Method::GET, "/openapi.json", None, None).await;
        assert_eq!(api.status, StatusCode::OK, "{api:?}");
        let mut checked = Vec::new();
        for (path, operations) in api.body["paths"].as_object().unwrap() {
            for (method, op) in operations.as_object().unwrap() {
                let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
                let schema = &op["requestBody"]["content"]["application/json"]["schema"];
                let required = schema["required"].as_array().cloned().unwrap_or_default();
                let nullable = schema["properties"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(_, p)| {
                        p["type"]
                            .as_array()
                            .is_some_and(|t| t.contains(&json!("null")))
                    });
                for (field, _) in nullable {
                    assert!(
                        !required.contains(&json!(field)),
                        "{method} {path}: `{field}` is required, yet typed as nullable"
                    );
                    // A ticket of its own each time: a close takes one only once.
                    let id = s.ticket(&customer, "nullable").await["id"]
                        .as_str()
                        .unwrap()
                        .to_owned();
                    let (mut body, token) = match path.as_str() {
                        "/auth/register" => (
                            json!({ "email": email("nullable"), "password": PASSWORD }),
                            None,
                        ),
                        "/tickets" => (json!({ "title": "nullable" }), Some(&customer)),
                        "/tickets/{id}/assign" => {
                            (json!({ "assignee_id": agent_id }), Some(&agent))
                        }
                        "/tickets/{id}/comments" => (json!({ "body": "nullable" }), Some(&agent)),
                        "/tickets/{id}/close" => (json!({}), Some(&agent)),
                        other => panic!("give {other} a valid body here"),
                    };
                    body[field] = Value::Null;
                    let at = path.replace("{id}", &id);
                    let answer = s
                        .send(method.clone(), &at, token.map(String::as_str), Some(body))
                        .await;
                    assert!(
                        answer.status.is_success(),
                        "{method} {path} with `{field}: null`: {answer:?}"
                    );
                    checked.push(format!("{method} {path} {field}"));
                }
                let params = op["parameters"].as_array().cloned().unwrap_or_default();
                for param in params.iter().filter(|p| p["allowEmptyValue"] == true) {
                    let name = param["name"].as_str().unwrap();
                    assert_eq!(
                        method,
                        Method::GET,
                        "{path}: give a {method} a request here"
                    );
                    let id = s.ticket(&customer, "empty").await["id"]
                        .as_str()
                        .unwrap()
                        .to_owned();
                    let at = format!("{}?{name}=", path.replace("{id}", &id));
                    let answer = s.send(Method::GET, &at, Some(&agent), None).await;
                    assert!(answer.status.is_success(), "GET {at}: {answer:?}");
                    checked.push(format!("GET {path} {name}="));
                }
            }
        }
        // Those of today; more is fine.
        assert!(checked.len() >= 10, "only {checked:?}");
        s.stop().await;
    })
    .await;
}

/// The objects the server sends have exactly the fields their schemas in the API document
/// list as required: a client generated from the document can rely on each (none is left
/// optional that is always there), and none is sent undocumented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_document_requires_every_field_the_answers_carry() {
    within(async {
        let s = TestServer::start().await;
        let (customer, _) = s.customer().await;
        let api = s.send(Method::GET, "/openapi.json", None, None).await;
        assert_eq!(api.status, StatusCode::OK, "{api:?}");
        let schemas = &api.body["components"]["schemas"];
        let id = s.ticket(&customer, "schema").await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let comment = s
            .post(
                &format!("/tickets/{id}/comments"),
                &customer,
                json!({ "body": "hello" }),
            )
            .await;
        assert_eq!(comment.status, StatusCode::CREATED, "{comment:?}");
        let ticket = s.get(&format!("/tickets/{id}"), &customer).await;
        assert_eq!(ticket.status, StatusCode::OK, "{ticket:?}");
        let list = s.get("/tickets", &customer).await;
        assert_eq!(list.status, StatusCode::OK, "{list:?}");
        let me = s.get("/auth/me", &customer).await;
        assert_eq!(me.status, StatusCode::OK, "{me:?}");
        for (name, schema, answer) in [
            (
                "GET /auth/me's user",
                &api.body["paths"]["/auth/me"]["get"]["responses"]["200"]["content"]
                    ["application/json"]["schema"],
                &me.body,
            ),
            ("Ticket", &schemas["Ticket"], &ticket.body),
            (
                "a ticket's comment",
                &schemas["Ticket"]["properties"]["comments"]["items"],
                &ticket.body["comments"][0],
            ),
            ("CommentAdded", &schemas["CommentAdded"], &comment.body),
            (
                "TicketSummary",
                &schemas["TicketSummary"],
                &list.body["items"][0],
            ),
        ] {
            let keys = |v: &Value| -> Vec<String> {
                let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
                keys.sort();
                keys
            };
            let sent = keys(answer);
            let mut required: Vec<String> = schema["required"]
                .as_array()
                .unwrap_or_else(|| panic!("{name} has no required list: {schema}"))
                .iter()
                .map(|f| f.as_str().unwrap().to_owned())
                .collect();
            required.sort();
            assert_eq!(sent, required, "{name}: sent vs required");
            assert_eq!(
                sent,
                keys(&schema["properties"]),
                "{name}: sent vs properties"
            );
        }
        s.stop().await;
    })
    .await;
}
