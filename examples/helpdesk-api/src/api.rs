//! Routes and their OpenAPI operations, declared together so the document cannot drift from
//! the router.

use axum::Router;
use axum::routing::MethodRouter;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::fmt;

/// One documented operation.
#[derive(Clone, Debug)]
pub struct Operation {
    method: &'static str,
    doc: Map<String, Value>,
}

impl Operation {
    /// An operation of `method` (lower-case: `get`, `post`, ...) with a summary.
    pub fn new(method: &'static str, summary: &str) -> Self {
        let mut doc = Map::new();
        doc.insert("summary".into(), json!(summary));
        doc.insert("responses".into(), json!({}));
        Self { method, doc }
    }

    /// Groups it under a tag.
    pub fn tag(mut self, tag: &str) -> Self {
        self.doc.insert("tags".into(), json!([tag]));
        self
    }

    /// Requires a bearer token. Adds its answers: 401, 429 (the user's requests past the
    /// server's limit per user) and 503 (the user store, which every authenticated request
    /// asks, could not be asked), each of the last two unless the operation describes it itself
    /// (before or after).
    pub fn bearer(mut self) -> Self {
        self.doc
            .insert("security".into(), json!([{ "bearer": [] }]));
        self.response(401, "missing or invalid token (`unauthorized`)", None)
            .response_header(
                401,
                "WWW-Authenticate",
                "`Bearer`, with `error=\"invalid_token\"` or `error=\"invalid_request\"`",
            )
            .default_response(
                429,
                "this user made more requests than the server allows one user (`rate_limited`, \
                 with `Retry-After` and `details.retry_after`, in seconds)",
            )
            .response_header(429, "Retry-After", RETRY_AFTER)
            .default_response(
                503,
                "the user store could not be asked (`unavailable`, with `Retry-After`), or the \
                 request ran past its time budget or the store did not answer in time \
                 (`timeout`)",
            )
            .response_header(503, "Retry-After", RETRY_AFTER)
    }

    /// The JSON request body's schema. An object schema gets `"additionalProperties": false`:
    /// request bodies refuse fields they do not know (`deny_unknown_fields`), and the spec
    /// says so. The answers of [`ApiJson`](crate::ApiJson), which reads such a body, are added
    /// too (400, 408, 413, 415 and 422), each unless the operation describes it itself (before
    /// or after).
    pub fn body(mut self, mut schema: Value) -> Self {
        if schema["type"] == "object"
            && let Some(object) = schema.as_object_mut()
        {
            object
                .entry("additionalProperties")
                .or_insert(Value::Bool(false));
        }
        self.doc.insert(
            "requestBody".into(),
            json!({ "required": true, "content": { "application/json": { "schema": schema } } }),
        );
        for (status, description) in JSON_BODY_ERRORS {
            self = self.default_response(status, description);
        }
        self
    }

    /// A parameter (`in`: `path`, `query` or `header`).
    pub fn param(
        mut self,
        name: &str,
        location: &str,
        required: bool,
        schema: Value,
        description: &str,
    ) -> Self {
        let params = self.doc.entry("parameters").or_insert_with(|| json!([]));
        if let Some(list) = params.as_array_mut() {
            let mut param = json!({
                "name": name, "in": location, "required": required,
                "schema": schema, "description": description,
            });
            // The gateway takes `?status=` (an empty form field) as the parameter left out.
            if location == "query" && !required {
                param["allowEmptyValue"] = json!(true);
                param["description"] = json!(format!(
                    "{description}; an empty value is the same as leaving it out"
                ));
            }
            list.push(param);
        }
        self
    }

    /// A response with the shared `Error` schema, unless the operation has one for `status`.
    fn default_response(self, status: u16, description: &str) -> Self {
        let described = self.doc["responses"].get(status.to_string()).is_some();
        if described {
            self
        } else {
            self.response(status, description, None)
        }
    }

    /// A response; `schema` is for a JSON body (errors use the shared `Error` schema). Headers
    /// documented for `status` already ([`response_header`](Self::response_header)) stay.
    pub fn response(mut self, status: u16, description: &str, schema: Option<Value>) -> Self {
        let schema = schema
            .or_else(|| (status >= 400).then(|| json!({ "$ref": "#/components/schemas/Error" })));
        let mut response = json!({ "description": description });
        if let Some(schema) = schema {
            response["content"] = json!({ "application/json": { "schema": schema } });
        }
        if let Some(responses) = self.doc.get_mut("responses").and_then(Value::as_object_mut) {
            if let Some(headers) = responses
                .get(&status.to_string())
                .and_then(|r| r.get("headers"))
            {
                response["headers"] = headers.clone();
            }
            responses.insert(status.to_string(), response);
        }
        self
    }

    /// A header of the answer `status` (a string), so that generated clients expose it:
    /// `Location`, `Retry-After`. Before or after that answer's [`response`](Self::response).
    pub fn response_header(mut self, status: u16, name: &str, description: &str) -> Self {
        if let Some(responses) = self.doc.get_mut("responses").and_then(Value::as_object_mut) {
            let response = responses
                .entry(status.to_string())
                .or_insert_with(|| json!({ "description": "" }));
            response["headers"][name] =
                json!({ "description": description, "schema": { "type": "string" } });
        }
        self
    }
}

/// What axum 0.8 refuses in a route path before its router sees it: a path that does not
/// start with `/`, and a segment in axum 0.7's syntax.
fn refused_before_routing(path: &str) -> Option<&'static str> {
    if !path.starts_with('/') {
        return Some("paths must start with a `/` (`/` for the root)");
    }
    // The router renames parameters `a` to `y` inside, and panics past them.
    if path.matches('{').count() - 2 * path.matches("{{").count() > 25 {
        return Some("more than 25 parameters");
    }
    path.split('/').find_map(|segment| {
        if segment.starts_with(':') {
            Some("a segment starts with `:`, axum 0.7's capture syntax: write `{name}`")
        } else if segment.starts_with('*') {
            Some("a segment starts with `*`, axum 0.7's wildcard syntax: write `{*name}`")
        } else {
            None
        }
    })
}

/// The `Retry-After` header's description in the OpenAPI document.
pub const RETRY_AFTER: &str = "seconds to wait before trying again, where the answer advises it";

/// What [`ApiJson`](crate::ApiJson) answers for a body it cannot take, whatever the route.
const JSON_BODY_ERRORS: [(u16, &str); 5] = [
    (
        400,
        "malformed JSON (`malformed_json`), or a body that could not be read (`unreadable_body`)",
    ),
    (
        408,
        "the body did not all arrive in time (`request_timeout`)",
    ),
    (413, "a body over 384 KiB (`payload_too_large`)"),
    (415, "not JSON (`unsupported_media_type`)"),
    (
        422,
        "JSON of the wrong shape, or with a field the route does not know (`invalid_body`)",
    ),
];

/// Routes a plugin contributes, each with its OpenAPI operation.
///
/// ```
/// use axum::routing::get;
/// use helpdesk_api::{HttpApi, Operation};
///
/// let api = HttpApi::new().route(
///     "/ping",
///     get(|| async { "pong" }),
///     [Operation::new("get", "Answers pong")],
/// );
/// let (_router, paths) = api.into_parts();
/// assert!(paths["/ping"]["get"]["summary"] == "Answers pong");
/// ```
#[derive(Default)]
pub struct HttpApi {
    routes: BTreeMap<String, MethodRouter>,
    paths: BTreeMap<String, Map<String, Value>>,
    schemas: Map<String, Value>,
}

impl fmt::Debug for HttpApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpApi")
            .field("paths", &self.paths.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl HttpApi {
    /// No routes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `handler` (one or more methods) at `path`, documented by `operations` (one per
    /// method).
    pub fn route(
        mut self,
        path: &str,
        handler: MethodRouter,
        operations: impl IntoIterator<Item = Operation>,
    ) -> Self {
        let merged = match self.routes.remove(path) {
            Some(existing) => existing.merge(handler),
            None => handler,
        };
        self.routes.insert(path.to_owned(), merged);
        let entry = self.paths.entry(path.to_owned()).or_default();
        for op in operations {
            entry.insert(op.method.to_owned(), Value::Object(op.doc));
        }
        self
    }

    /// Adds a named schema to `components.schemas`.
    pub fn schema(mut self, name: &str, schema: Value) -> Self {
        self.schemas.insert(name.to_owned(), schema);
        self
    }

    /// Adds another plugin's or module's routes.
    ///
    /// # Panics
    ///
    /// When [`try_merge`](Self::try_merge) would return an error (both serve one method at
    /// one path, a path differs from one of the other's only in its parameters' names, both
    /// define one named schema differently, or an operation of `other` documents path
    /// parameters other than its path's): use `try_merge` to be told instead.
    pub fn merge(self, other: HttpApi) -> Self {
        self.try_merge(other).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Adds another plugin's or module's routes, or says why it cannot: both serve one method
    /// at one path (documented or not), a path of one is a path of the other with its
    /// parameters named differently (`/tickets/{id}` and `/tickets/{ticket_id}`: one route to
    /// the router, which refuses two names for it), both define one named schema differently
    /// (the same definition twice is fine), or an operation of `other` documents path
    /// parameters other than its path's (`param("id", "path", ..)` on `/tickets/{ticket_id}`):
    /// the OpenAPI document would describe a route that does not exist. On an error both are
    /// dropped.
    pub fn try_merge(mut self, other: HttpApi) -> Result<Self, String> {
        let mut problems = other.route_path_problems();
        problems.extend(other.path_parameter_problems());
        if problems.is_empty() {
            // Both sides' paths in one router, as the server's will be: what it refuses
            // (`/tickets/{id}` beside `/tickets/{ticket_id}`, `/files/{id}` beside
            // `/files/{*path}`) is said here, not panicked on when the server builds it. A path
            // both have is one route (their methods merge).
            let mut router = matchit::Router::new();
            for mine in self.routes.keys() {
                // Took every path of `self` when it was merged in.
                let _ = router.insert(mine.as_str(), ());
            }
            for theirs in other
                .routes
                .keys()
                .filter(|p| !self.routes.contains_key(*p))
            {
                if let Err(e) = router.insert(theirs.as_str(), ()) {
                    problems.push(format!(
                        "the router refuses {theirs} beside these routes: {e}"
                    ));
                }
            }
        }
        for (path, ops) in &other.paths {
            if let Some(mine) = self.paths.get(path) {
                for method in ops.keys().filter(|m| mine.contains_key(*m)) {
                    problems.push(format!("both serve {} {path}", method.to_uppercase()));
                }
            }
        }
        for (name, schema) in &other.schemas {
            if self.schemas.get(name).is_some_and(|mine| mine != schema) {
                problems.push(format!(
                    "both define the OpenAPI schema `{name}`, differently"
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        for (path, handler) in other.routes {
            let merged = match self.routes.remove(&path) {
                // axum panics on an overlap it finds (a method no operation documents): caught,
                // to be reported like the others.
                Some(existing) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    existing.merge(handler)
                }))
                .map_err(|panic| {
                    let why = cqrs_core::panic_message(panic.as_ref());
                    format!("both serve one method at {path} ({why})")
                })?,
                None => handler,
            };
            self.routes.insert(path, merged);
        }
        for (path, ops) in other.paths {
            self.paths.entry(path).or_default().extend(ops);
        }
        self.schemas.extend(other.schemas);
        Ok(self)
    }

    /// How the path parameters its operations document differ from their paths' (a parameter
    /// documented that the path does not have, or one the path has and no `param` names),
    /// each said in a sentence; empty when they match.
    pub fn path_parameter_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (path, ops) in &self.paths {
            for (method, op) in ops {
                documented_path_params(path, method, op, &mut problems);
            }
        }
        problems
    }

    /// The paths axum would refuse (and panic on, when the server builds its router), each
    /// said in a sentence with the reason: one that does not start with `/`, a `:name` or
    /// `*name` segment (axum 0.7's syntax; 0.8 takes `{name}` and `{*name}`), a brace left
    /// open, two paths that are one route with their parameters named differently
    /// (`/notes/{id}` and `/notes/{note_id}`). Empty when axum takes every one. Checked
    /// without axum, whose checks panic (and a panic caught is still logged as one).
    pub fn route_path_problems(&self) -> Vec<String> {
        // axum's own router, which says why instead of panicking.
        let mut router = matchit::Router::new();
        let mut problems = Vec::new();
        for path in self.routes.keys() {
            let refused = refused_before_routing(path).map(str::to_owned).or_else(|| {
                router
                    .insert(path.as_str(), ())
                    .err()
                    .map(|e| e.to_string())
            });
            if let Some(why) = refused {
                problems.push(format!("axum refuses the route path `{path}`: {why}"));
            }
        }
        problems
    }

    /// The paths it has routes at.
    pub fn route_paths(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }

    /// The documented operations, as (method in upper case, path).
    pub fn operations(&self) -> impl Iterator<Item = (String, &str)> {
        self.paths
            .iter()
            .flat_map(|(path, ops)| ops.keys().map(move |m| (m.to_uppercase(), path.as_str())))
    }

    /// The named schemas.
    pub fn schemas(&self) -> &Map<String, Value> {
        &self.schemas
    }

    /// The router and the OpenAPI `paths` object.
    pub fn into_parts(self) -> (Router, Map<String, Value>) {
        let (router, paths, _) = self.into_all();
        (router, paths)
    }

    /// The router, the OpenAPI `paths` object and the named schemas.
    pub fn into_all(self) -> (Router, Map<String, Value>, Map<String, Value>) {
        let mut router = Router::new();
        for (path, handler) in self.routes {
            router = router.route(&path, handler);
        }
        let paths = self
            .paths
            .into_iter()
            .map(|(k, v)| (k, Value::Object(v)))
            .collect();
        (router, paths, self.schemas)
    }
}

/// Notes in `problems` how the path parameters `op` documents differ from `path`'s.
fn documented_path_params(path: &str, method: &str, op: &Value, problems: &mut Vec<String>) {
    let in_path = path_params(path);
    let documented: Vec<&str> = op["parameters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["in"] == "path")
        .filter_map(|p| p["name"].as_str())
        .collect();
    let route = format!("{} {path}", method.to_uppercase());
    for name in documented.iter().filter(|n| !in_path.contains(n)) {
        problems.push(format!(
            "{route} documents a path parameter `{name}` its path does not have"
        ));
    }
    for name in in_path.iter().filter(|n| !documented.contains(n)) {
        problems.push(format!(
            "{route} does not document its path parameter `{name}` (`Operation::param(\"{name}\", \"path\", ..)`)"
        ));
    }
}

/// The names of `path`'s parameters (`{id}`, `{*rest}`, also after a prefix in a segment:
/// `/user_{name}`), skipping escaped braces (`{{`, `}}`), as axum's router reads them.
fn path_params(path: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = path;
    while let Some(at) = rest.find(['{', '}']) {
        let after = &rest[at + 1..];
        if rest[at..].starts_with("{{") || rest[at..].starts_with("}}") {
            rest = &after[1..];
            continue;
        }
        if rest[at..].starts_with('}') {
            rest = after;
            continue;
        }
        let Some(end) = after.find('}') else { break };
        names.push(after[..end].trim_start_matches('*'));
        rest = &after[end + 1..];
    }
    names
}

#[cfg(test)]
mod tests {
    use super::{HttpApi, Operation};
    use axum::routing::get;
    use serde_json::json;

    /// A header is documented on its answer whether it is given before or after the answer
    /// itself, which keeps it when it is described again.
    #[test]
    fn a_response_header_stays_with_its_answer() {
        let op = Operation::new("post", "Open")
            .response_header(201, "Location", "where")
            .response(201, "created", None)
            .response(409, "conflict", None)
            .response_header(409, "Retry-After", "wait")
            .response(409, "conflict, described again", None);
        let responses = &op.doc["responses"];
        assert_eq!(responses["201"]["description"], "created");
        assert_eq!(
            responses["201"]["headers"]["Location"]["description"],
            "where"
        );
        assert_eq!(responses["409"]["description"], "conflict, described again");
        assert_eq!(
            responses["409"]["headers"]["Retry-After"]["schema"]["type"],
            "string"
        );
    }

    /// An API with one undocumented `GET` at `path`.
    fn at(path: &str) -> HttpApi {
        HttpApi::new().route(path, get(|| async { "" }), [])
    }

    /// Paths of two APIs that the router refuses side by side are refused by the merge, which
    /// names them, not found by the router's panic when the server builds it: a parameter
    /// beside a catch-all at one place, one route with its parameter named differently. The
    /// same path on both sides is one route; so are paths the router tells apart.
    #[test]
    fn paths_the_router_refuses_side_by_side_are_refused_by_the_merge() {
        for (mine, theirs) in [
            ("/files/{id}", "/files/{*path}"),
            ("/v{version}/x", "/v{ver}/x"),
            ("/tickets/{id}", "/tickets/{ticket_id}"),
        ] {
            let error = at(mine).try_merge(at(theirs)).unwrap_err();
            assert!(
                error.contains(&format!("the router refuses {theirs}")) && error.contains(mine),
                "{mine} / {theirs}: {error}"
            );
        }
        for (mine, theirs) in [
            ("/tickets/{id}", "/tickets/stats"),
            ("/t/{id}", "/t/{{raw}}"),
        ] {
            assert!(at(mine).try_merge(at(theirs)).is_ok(), "{mine} / {theirs}");
        }
        let posted =
            HttpApi::new().route("/tickets/{id}", axum::routing::post(|| async { "" }), []);
        assert!(
            at("/tickets/{id}").try_merge(posted).is_ok(),
            "one route, two methods"
        );
    }

    /// A path with more parameters than the router can name is refused, not a panic.
    #[test]
    fn a_path_with_more_than_25_parameters_is_refused() {
        let path: String = (0..26).map(|n| format!("/{{p{n}}}")).collect();
        let problems = at(&path).route_path_problems();
        assert!(
            problems.len() == 1 && problems[0].contains("more than 25 parameters"),
            "{problems:?}"
        );
        let path: String = (0..25).map(|n| format!("/{{p{n}}}")).collect();
        assert_eq!(at(&path).route_path_problems(), Vec::<String>::new());
    }

    fn tags_api(documented: &str) -> HttpApi {
        HttpApi::new().route(
            "/tickets/{ticket_id}/tags",
            get(|| async { "[]" }),
            [Operation::new("get", "The ticket's tags").param(
                documented,
                "path",
                true,
                json!({ "type": "string" }),
                "the ticket",
            )],
        )
    }

    /// An operation whose path parameters are not its path's is refused, naming both ways.
    #[test]
    fn documented_path_parameters_must_be_the_paths() {
        let error = HttpApi::new().try_merge(tags_api("id")).unwrap_err();
        assert_eq!(
            error,
            "GET /tickets/{ticket_id}/tags documents a path parameter `id` its path does not \
             have; GET /tickets/{ticket_id}/tags does not document its path parameter \
             `ticket_id` (`Operation::param(\"ticket_id\", \"path\", ..)`)"
        );
        assert!(HttpApi::new().try_merge(tags_api("ticket_id")).is_ok());
    }

    #[test]
    fn path_parameters_are_read_as_the_router_reads_them() {
        use super::path_params;
        assert_eq!(path_params("/tickets/{id}/comments"), ["id"]);
        assert_eq!(path_params("/files/{*rest}"), ["rest"]);
        assert_eq!(path_params("/users/user_{name}/{id}"), ["name", "id"]);
        assert!(path_params("/literal/{{braces}}").is_empty());
        assert!(path_params("/plain").is_empty());
    }
}
