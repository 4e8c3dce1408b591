//! The tickets plugin's routes.

use crate::domain::{Priority, Ticket};
use crate::handlers::{
    Change, ChangeTicket, GetStats, GetTicket, ListTickets, MAX_PAGE_SIZE, OpenTicket,
    TicketHistory, conflict_message, parse_priority, parse_status,
};
use crate::index::ListFilter;
use axum::Json;
use axum::extract::State;
use axum::http::header::{ETAG, IF_MATCH, LOCATION};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cqrs_core::ports::IdempotencyStore;
use cqrs_core::{Command, Metadata};
use cqrs_postgres::{PgCommandExecutor, PgDatabase};
use helpdesk_api::{
    ApiError, ApiJson, ApiPath, ApiQuery, Authenticated, BusHandle, HttpApi, Operation,
    RequestMetadata, User, idempotency,
};
use idempotency::Fingerprint;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

#[derive(Clone)]
pub(crate) struct Http {
    pub(crate) buses: BusHandle,
    pub(crate) idempotency: Arc<dyn IdempotencyStore>,
    pub(crate) ttl: Duration,
    /// In Postgres mode, where idempotency records commit with the command.
    pub(crate) postgres: Option<PgDatabase>,
}

/// How often a change without `expected_version` is tried when other writers keep committing
/// first (found at commit, in Postgres mode). Each round has a winner, so this bounds how many
/// concurrent writers of one ticket all land.
const COMMIT_ATTEMPTS: u32 = 20;

/// Runs the command made by `make` at most once per `Idempotency-Key`. In Postgres mode the
/// idempotency record commits in the command's transaction; a version conflict found at that
/// commit is retried (the command decides again on the new state) when `retry` says the
/// client did not pin a version, and is 409 `version_conflict` otherwise (or once the
/// attempts are spent), its message written for what the client sent (`expected_version`),
/// never the store's (which names the internal stream).
#[allow(clippy::too_many_arguments)]
async fn run<C, F>(
    http: &Http,
    headers: &HeaderMap,
    user: &User,
    fingerprint: Fingerprint,
    status: StatusCode,
    retry: bool,
    expected_version: Option<u64>,
    make: F,
    respond: fn(&Ticket) -> Value,
) -> Result<Response, ApiError>
where
    C: Command<Output = Ticket>,
    F: Fn() -> C,
{
    let buses = http.buses.get()?;
    let Some(db) = &http.postgres else {
        let (commands, command, metadata) = (buses.commands.clone(), make(), actor(headers, user));
        return idempotency::once(
            http.idempotency.as_ref(),
            headers,
            user,
            &fingerprint,
            http.ttl,
            move || async move {
                let ticket = commands.dispatch_with(command, metadata).await?;
                Ok((status, respond(&ticket)))
            },
        )
        .await;
    };
    let executor = PgCommandExecutor::new(buses.commands.clone(), db.clone());
    let mut attempt = 1;
    loop {
        let result = idempotency::once_in_command(
            &executor,
            headers,
            user,
            &fingerprint,
            http.ttl,
            status,
            make(),
            actor(headers, user),
            respond,
        )
        .await;
        match result {
            Err(e) if retry && e.code == "version_conflict" && attempt < COMMIT_ATTEMPTS => {
                // A short, jittered pause, so the losers of one round do not all collide again.
                let jitter = u64::from(Uuid::new_v4().as_bytes()[0] % 8);
                tokio::time::sleep(Duration::from_millis(jitter + u64::from(attempt))).await;
                attempt += 1;
            }
            Err(mut e) if e.code == "version_conflict" => {
                let actual = e
                    .details
                    .as_ref()
                    .and_then(|d| d["current_version"].as_u64());
                e.message = conflict_message(expected_version, actual);
                return Err(e);
            }
            other => return other,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
// Unknown fields are refused: a misspelled one (`expected_versoin`) must not pass silently.
#[serde(deny_unknown_fields)]
struct OpenBody {
    title: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    priority: Option<Priority>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct AssignBody {
    assignee_id: Uuid,
    #[serde(default)]
    expected_version: Option<u64>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct CommentBody {
    body: String,
    #[serde(default)]
    expected_version: Option<u64>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct CloseBody {
    #[serde(default)]
    resolution: Option<String>,
    #[serde(default)]
    expected_version: Option<u64>,
}

/// The metadata of a request's command: its correlation id and trace context come from the
/// request's headers, so the events it records can be traced back to the request.
fn actor(headers: &HeaderMap, user: &User) -> Metadata {
    RequestMetadata::from_headers(headers).with_actor(user.id.to_string())
}

async fn open(
    State(http): State<Http>,
    Authenticated(user): Authenticated,
    headers: HeaderMap,
    _: idempotency::CheckedKey,
    ApiJson(body): ApiJson<OpenBody>,
) -> Result<Response, ApiError> {
    let print = Fingerprint::of("POST /tickets", &body);
    let created = run(
        &http,
        &headers,
        &user,
        print,
        StatusCode::CREATED,
        false,
        None,
        || OpenTicket {
            user: user.clone(),
            title: body.title.clone(),
            description: body.description.clone(),
            priority: body.priority,
        },
        |ticket| json!(ticket),
    )
    .await?;
    Ok(with_headers_of_body(created).await)
}

/// A success names the ticket's version in `ETag` (`"3"`: what `If-Match` takes), and a
/// `201 Created` of a ticket (a body with its `id`; a comment's has none) names it in
/// `Location`; also when the answer is
/// replayed for an `Idempotency-Key`, whose record keeps the status and the body only, so
/// both are read from the body (a few hundred bytes: a ticket, or a comment with the
/// ticket's version).
async fn with_headers_of_body(response: Response) -> Response {
    if !response.status().is_success() {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        // The body is in memory: reading it cannot fail.
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    // Only the two fields: serde skips the rest (a ticket's comments, up to a megabyte)
    // without building it.
    #[derive(Deserialize, Default)]
    struct Named {
        id: Option<Uuid>,
        version: Option<u64>,
    }
    let answer = serde_json::from_slice::<Named>(&bytes).unwrap_or_default();
    if let Some(version) = answer.version {
        parts.headers.insert(ETAG, etag(version));
    }
    let id = answer.id;
    if parts.status == StatusCode::CREATED
        && let Some(id) = id
        && let Ok(location) = HeaderValue::from_str(&format!("/tickets/{id}"))
    {
        parts.headers.insert(LOCATION, location);
    }
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// The entity tag of a ticket's `version`: strong, quoted.
fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

/// The version an `If-Match` header pins, when there is one: `"3"` (the `ETag` of version 3).
/// `*` pins none (any version of a ticket that exists). A list, a weak tag (`W/"3"`, which
/// `If-Match` never matches) or anything else is 400 `invalid_if_match`, as are two headers.
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let mut values = headers.get_all(IF_MATCH).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let invalid = |why: &str| {
        ApiError::bad_request(
            "invalid_if_match",
            format!(
                "If-Match {why}: send one entity tag as the ticket's ETag gave it (`\"3\"`), or \
                 `*`"
            ),
        )
    };
    if values.next().is_some() {
        return Err(invalid("came twice"));
    }
    let text = value.to_str().map_err(|_| invalid("is not ASCII"))?.trim();
    if text == "*" {
        return Ok(None);
    }
    text.strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse().ok())
        .map(Some)
        .ok_or_else(|| invalid("is not one of this server's entity tags"))
}

/// The body of a route that changes one ticket: which action it is, the status a success
/// answers, and the change it asks for.
trait ChangeBody: Serialize + serde::de::DeserializeOwned + Send + 'static {
    /// The path segment after `/tickets/{id}/`.
    const ACTION: &'static str;
    /// The status of a success.
    const STATUS: StatusCode;
    /// The client's expected version and the change.
    fn into_change(self) -> (Option<u64>, Change);
    /// The answer, from the ticket as the change left it: the whole ticket.
    fn respond(ticket: &Ticket) -> Value {
        json!(ticket)
    }
}

impl ChangeBody for AssignBody {
    const ACTION: &'static str = "assign";
    const STATUS: StatusCode = StatusCode::OK;
    fn into_change(self) -> (Option<u64>, Change) {
        (
            self.expected_version,
            Change::Assign {
                assignee_id: self.assignee_id,
            },
        )
    }
}

impl ChangeBody for CommentBody {
    const ACTION: &'static str = "comments";
    const STATUS: StatusCode = StatusCode::CREATED;
    fn into_change(self) -> (Option<u64>, Change) {
        (self.expected_version, Change::Comment { body: self.body })
    }
    /// The new comment and the ticket's version, not the whole ticket: an answer that grew
    /// with every comment would be stored whole for each `Idempotency-Key`, which a client
    /// commenting many times could make grow with the square of what it sends.
    fn respond(ticket: &Ticket) -> Value {
        json!({
            "ticket_id": ticket.id,
            "version": ticket.version,
            "comment": ticket.comments.last(),
        })
    }
}

impl ChangeBody for CloseBody {
    const ACTION: &'static str = "close";
    const STATUS: StatusCode = StatusCode::OK;
    fn into_change(self) -> (Option<u64>, Change) {
        (
            self.expected_version,
            Change::Close {
                resolution: self.resolution,
            },
        )
    }
}

/// `POST /tickets/{id}/assign`, `/comments` and `/close`.
async fn change<B: ChangeBody>(
    State(http): State<Http>,
    Authenticated(user): Authenticated,
    headers: HeaderMap,
    ApiPath(id): ApiPath<Uuid>,
    _: idempotency::CheckedKey,
    ApiJson(body): ApiJson<B>,
) -> Result<Response, ApiError> {
    let pinned = if_match(&headers)?;
    // The header is part of the request an Idempotency-Key stands for.
    let route = match pinned {
        Some(version) => format!("POST /tickets/{id}/{} if-match {version}", B::ACTION),
        None => format!("POST /tickets/{id}/{}", B::ACTION),
    };
    let print = Fingerprint::of(&route, &body);
    let (in_body, change) = body.into_change();
    let expected_version = match (pinned, in_body) {
        (Some(header), Some(body)) if header != body => {
            return Err(ApiError::bad_request(
                "invalid_if_match",
                format!(
                    "If-Match pins version {header} and `expected_version` {body}: send one of \
                     them, or both alike"
                ),
            ));
        }
        (pinned, in_body) => pinned.or(in_body),
    };
    let changed = run(
        &http,
        &headers,
        &user,
        print,
        B::STATUS,
        expected_version.is_none(),
        expected_version,
        || ChangeTicket {
            user: user.clone(),
            id,
            expected_version,
            change: change.clone(),
        },
        B::respond,
    )
    .await;
    match changed {
        Ok(response) => Ok(with_headers_of_body(response).await),
        // Pinned by `If-Match`: HTTP's answer to a stale one is 412, in its words.
        Err(mut e) if pinned.is_some() && e.code == "version_conflict" => {
            let current = e
                .details
                .as_ref()
                .and_then(|d| d["current_version"].as_u64());
            e.status = StatusCode::PRECONDITION_FAILED;
            e.code = "precondition_failed".to_owned();
            e.message = match current {
                Some(current) => format!(
                    "the ticket is at version {current}, not the one If-Match names: reload it, \
                     and send the change again with If-Match \"{current}\" if it still applies"
                ),
                None => "the ticket is no longer at the version If-Match names: reload it, and \
                         send the change again with its ETag if it still applies"
                    .to_owned(),
            };
            Err(e)
        }
        Err(e) => Err(e),
    }
}

async fn get_one(
    State(http): State<Http>,
    Authenticated(user): Authenticated,
    request: RequestMetadata,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Response, ApiError> {
    let metadata = request.by(&user);
    let ticket = http
        .buses
        .get()?
        .queries
        .dispatch_with(GetTicket { user, id }, metadata)
        .await?;
    Ok(([(ETAG, etag(ticket.version))], Json(ticket)).into_response())
}

async fn history(
    State(http): State<Http>,
    Authenticated(user): Authenticated,
    request: RequestMetadata,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Value>, ApiError> {
    let metadata = request.by(&user);
    let items = http
        .buses
        .get()?
        .queries
        .dispatch_with(TicketHistory { user, id }, metadata)
        .await?;
    Ok(Json(json!({ "items": items })))
}

async fn stats(
    State(http): State<Http>,
    Authenticated(user): Authenticated,
    request: RequestMetadata,
) -> Result<Json<Value>, ApiError> {
    let metadata = request.by(&user);
    let stats = http
        .buses
        .get()?
        .queries
        .dispatch_with(GetStats { user }, metadata)
        .await?;
    Ok(Json(json!(stats)))
}

fn bad_query(name: &str, problem: &str) -> ApiError {
    // A client's name, echoed: cut short so a huge one does not come back in full.
    let name: String = name.chars().take(64).collect();
    ApiError::bad_request("invalid_query", format!("{name}: {problem}"))
        .with_details(json!({ "parameter": name }))
}

async fn list(
    State(http): State<Http>,
    Authenticated(user): Authenticated,
    request: RequestMetadata,
    ApiQuery(pairs): ApiQuery<Vec<(String, String)>>,
) -> Result<Json<Value>, ApiError> {
    // A parameter the route does not know is refused, not ignored: a misspelled filter
    // (`?stauts=closed`) would otherwise return every ticket. A repeated one too: which of
    // `?status=open&status=closed` was meant?
    const KNOWN: [&str; 5] = ["limit", "status", "priority", "assignee_id", "cursor"];
    let mut params: HashMap<String, String> = HashMap::with_capacity(pairs.len());
    for (name, value) in pairs {
        // An empty value is the same as leaving the parameter out (an empty form field), and
        // so is a lone `=` (`?&=&`).
        if value.is_empty() && (name.is_empty() || KNOWN.contains(&name.as_str())) {
            continue;
        }
        if name.is_empty() {
            return Err(ApiError::bad_request(
                "invalid_query",
                "a parameter has no name (`=value`): name it (limit, status, priority, assignee_id, cursor) or leave it out",
            )
            .with_details(json!({ "parameter": "" })));
        }
        if !KNOWN.contains(&name.as_str()) {
            return Err(bad_query(
                &name,
                "is not a parameter of this route (limit, status, priority, assignee_id, cursor)",
            ));
        }
        if params.contains_key(&name) {
            return Err(bad_query(&name, "is given more than once"));
        }
        params.insert(name, value);
    }
    let param = |name: &str| {
        params
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    };
    let limit = match param("limit") {
        None => 20,
        // Digits only: `parse` would also take a leading `+`.
        Some(raw) => match raw.parse::<usize>() {
            Ok(n)
                if (1..=MAX_PAGE_SIZE).contains(&n) && raw.bytes().all(|b| b.is_ascii_digit()) =>
            {
                n
            }
            _ => return Err(bad_query("limit", "must be a whole number from 1 to 100")),
        },
    };
    let filter = ListFilter {
        reporter_id: None,
        status: match param("status") {
            None => None,
            Some(s) => Some(
                parse_status(s)
                    .ok_or_else(|| bad_query("status", "must be open, assigned or closed"))?,
            ),
        },
        priority: match param("priority") {
            None => None,
            Some(p) => Some(
                parse_priority(p)
                    .ok_or_else(|| bad_query("priority", "must be low, normal, high or urgent"))?,
            ),
        },
        assignee_id: match param("assignee_id") {
            None => None,
            Some(a) => Some(
                a.parse::<Uuid>()
                    .map_err(|_| bad_query("assignee_id", "must be a UUID"))?,
            ),
        },
    };
    let cursor = param("cursor").map(str::to_owned);
    let metadata = request.by(&user);
    let page = http
        .buses
        .get()?
        .queries
        .dispatch_with(
            ListTickets {
                user,
                filter,
                limit,
                cursor,
            },
            metadata,
        )
        .await
        .map_err(|e| match e.handler_error() {
            Some(h) if h.code() == "invalid_cursor" => bad_query(
                "cursor",
                "is not a cursor this server issued (nor is one from an older version of \
                     it): list again from the first page",
            ),
            _ => ApiError::from(e),
        })?;
    Ok(Json(json!(page)))
}

fn ticket_schema() -> Value {
    json!({ "$ref": "#/components/schemas/Ticket" })
}

fn id_param(op: Operation) -> Operation {
    op.param(
        "id",
        "path",
        true,
        json!({ "type": "string", "format": "uuid" }),
        "the ticket's id",
    )
    .response(400, "a malformed id (`invalid_path`)", None)
    .response(
        404,
        "no such ticket, or not visible to the caller (`not_found`)",
        None,
    )
}

/// A POST under `/tickets`: a JSON body (whose schema is given here, so the answers of a body
/// that cannot be read are documented, see [`Operation::body`]) and an `Idempotency-Key`.
/// `invalid` says what its 422 `validation_failed` refuses.
fn posted(op: Operation, path_id: bool, body: Value, invalid: &str) -> Operation {
    idempotent(op)
        .response(
            503,
            "the user store could not be asked (`unavailable`, with `Retry-After`), or the request ran past its time budget or the store did not answer in time (`timeout`)",
            None,
        )
        .response(409, IN_USE, None)
        .response_header(409, "Retry-After", helpdesk_api::RETRY_AFTER)
        .response(400, &bad_request(path_id, false), None)
        .response(
            422,
            &format!("{invalid} (`validation_failed`); JSON of the wrong shape, or with a field the route does not know (`invalid_body`); or an Idempotency-Key already used with another body (`idempotency_key_reused`)"),
            None,
        )
        .body(body)
}

/// What a POST under `/tickets` answers 400 for: with `path_id` a malformed id too, with
/// `if_match` a malformed `If-Match` too.
fn bad_request(path_id: bool, if_match: bool) -> String {
    let id = if path_id {
        "a malformed id (`invalid_path`), "
    } else {
        ""
    };
    let if_match = if if_match {
        ", or a malformed If-Match, two of them, or one that disagrees with `expected_version` (`invalid_if_match`)"
    } else {
        ""
    };
    format!(
        "{id}malformed JSON (`malformed_json`), a body that could not be read (`unreadable_body`), or a malformed Idempotency-Key or two of them (`invalid_idempotency_key`){if_match}"
    )
}

/// `op`'s answer `status`, which a request with an Idempotency-Key may get again as a replay,
/// and which names the ticket's version after the change in `ETag`.
fn replayable(op: Operation, status: u16) -> Operation {
    op.response_header(status, "ETag", ETAG_DOC).response_header(
        status,
        "Idempotency-Replayed",
        "`true` when this is the stored answer of an earlier request with the same Idempotency-Key",
    )
}

/// The `ETag` header's description.
const ETAG_DOC: &str = "the ticket's version, `\"3\"`: what `If-Match` takes";

/// The 409 of a duplicate whose first request still runs.
const IN_USE: &str = "a request with the same Idempotency-Key and body still ran after 5 s (`idempotency_key_in_use`, with `Retry-After`: retry with the key to get its answer)";

fn idempotent(op: Operation) -> Operation {
    op.param(
        "Idempotency-Key",
        "header",
        false,
        json!({ "type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]{1,255}$" }),
        "1 to 255 visible ASCII characters (else 400 `invalid_idempotency_key`); replays return the first response; the same key with another body is 422 `idempotency_key_reused`; a duplicate sent while the first still runs waits for it (at most 5 s, then 409 `idempotency_key_in_use`: retry with the key)",
    )
}

fn expected_version() -> Value {
    json!({ "type": ["integer", "null"], "minimum": 0, "description": "the version the client saw, written as an integer (`3`, not `3.0`); another is 409 `version_conflict`; null or left out: no check" })
}

pub(crate) fn api(http: Http) -> HttpApi {
    let ticket_without_comments = json!({
        "type": "object",
        "required": ["id", "title", "description", "priority", "status", "reporter_id", "assignee_id", "version", "created_at", "updated_at"],
        "properties": {
            "id": { "type": "string", "format": "uuid" },
            "title": { "type": "string" },
            "description": { "type": "string" },
            "priority": { "type": "string", "enum": ["low", "normal", "high", "urgent"] },
            "status": { "type": "string", "enum": ["open", "assigned", "closed"] },
            "reporter_id": { "type": "string", "format": "uuid" },
            "assignee_id": { "type": ["string", "null"], "format": "uuid" },
            "version": { "type": "integer" },
            "created_at": { "type": "string", "format": "date-time" },
            "updated_at": { "type": "string", "format": "date-time" }
        }
    });
    let comment = json!({
        "type": "object",
        "required": ["id", "author_id", "body", "created_at"],
        "properties": {
            "id": { "type": "string", "format": "uuid" },
            "author_id": { "type": "string", "format": "uuid" },
            "body": { "type": "string" },
            "created_at": { "type": "string", "format": "date-time" }
        }
    });
    let mut ticket = ticket_without_comments.clone();
    ticket["properties"]["comments"] = json!({ "type": "array", "items": comment.clone() });
    // Always sent with a whole ticket: required, so generated clients need not guess.
    if let Some(required) = ticket["required"].as_array_mut() {
        required.push(json!("comments"));
    }
    let comment_added = json!({
        "type": "object",
        "required": ["ticket_id", "version", "comment"],
        "properties": {
            "ticket_id": { "type": "string", "format": "uuid" },
            "version": { "type": "integer" },
            "comment": comment
        }
    });
    let conflict = |op: Operation| {
        op.param(
            "If-Match",
            "header",
            false,
            json!({ "type": "string" }),
            "the ticket's `ETag` as a client last saw it (`\"3\"`), instead of `expected_version` (or alike with it); `*`: no check. A stale one is 412 `precondition_failed` with `details.current_version`; a list, a weak tag, two headers or one that disagrees with `expected_version` is 400 `invalid_if_match`",
        )
        // Each of these changes a ticket at its path's id.
        .response(400, &bad_request(true, true), None)
        .response(
            412,
            "the ticket is no longer at the version `If-Match` names (`precondition_failed`, with `details.current_version`)",
            None,
        )
        .response(
            409,
            &format!("`ticket_closed`, `ticket_full` (a comment past 500 comments or 1 MiB of them, an assignment past 100), or `version_conflict` (a stale expected_version, or, without one, a ticket that changed under each of 20 attempts: try again); or {IN_USE}"),
            None,
        )
    };
    HttpApi::new()
        .schema("Ticket", ticket)
        .schema("TicketSummary", ticket_without_comments)
        .schema("CommentAdded", comment_added)
        .route(
            "/tickets",
            post(open).get(list).with_state(http.clone()),
            [
                posted(
                    Operation::new("post", "Open a ticket").tag("tickets").bearer(),
                    false,
                    json!({
                        "type": "object",
                        "required": ["title"],
                        "properties": {
                            "title": { "type": "string", "minLength": 1, "maxLength": 200, "description": "counted in characters of its NFC form, trimmed: a character NFC decomposes counts as two" },
                            "description": { "type": ["string", "null"], "maxLength": 10000, "description": "counted in characters of its NFC form: a character NFC decomposes counts as two; stored in NFC" },
                            "priority": { "type": ["string", "null"], "enum": ["low", "normal", "high", "urgent", null], "description": "null or left out: normal" }
                        }
                    }),
                    "an invalid title or description (a title is one line with a visible character and no control character; a description takes line ends and tabs but no other control; NUL and bidirectional controls are refused in both)",
                )
                    .response(201, "the new ticket; `Location` names it (`/tickets/{id}`)", Some(ticket_schema()))
                    .response_header(201, "Location", "the new ticket's path, `/tickets/{id}`")
                    .response_header(201, "ETag", ETAG_DOC)
                    .response_header(201, "Idempotency-Replayed", "`true` when this is the stored answer of an earlier request with the same Idempotency-Key"),
                Operation::new("get", "List tickets, newest first").tag("tickets").bearer()
                    .param("status", "query", false, json!({ "type": "string", "enum": ["open", "assigned", "closed"] }), "filter")
                    .param("priority", "query", false, json!({ "type": "string", "enum": ["low", "normal", "high", "urgent"] }), "filter")
                    .param("assignee_id", "query", false, json!({ "type": "string", "format": "uuid" }), "filter")
                    .param("limit", "query", false, json!({ "type": "integer", "minimum": 1, "maximum": 100, "default": 20 }), "page size")
                    .param("cursor", "query", false, json!({ "type": "string" }), "next_cursor of the previous page")
                    .response(200, "a page", Some(json!({
                        "type": "object",
                        "required": ["items", "next_cursor"],
                        "properties": {
                            "items": { "type": "array", "items": { "$ref": "#/components/schemas/TicketSummary" } },
                            "next_cursor": { "type": ["string", "null"] }
                        }
                    })))
                    .response(400, "an invalid query parameter or cursor (`invalid_query`)", None),
            ],
        )
        .route(
            "/tickets/stats",
            get(stats).with_state(http.clone()),
            [Operation::new("get", "Counts of open, assigned and closed tickets (eventually consistent)").tag("tickets").bearer()
                .response(200, "the counts", Some(json!({
                    "type": "object",
                    "required": ["open", "assigned", "closed"],
                    "properties": { "open": { "type": "integer" }, "assigned": { "type": "integer" }, "closed": { "type": "integer" } }
                })))
                .response(403, "not an agent (`forbidden`)", None)],
        )
        .route(
            "/tickets/{id}",
            get(get_one).with_state(http.clone()),
            [id_param(Operation::new("get", "A ticket with its comments").tag("tickets").bearer())
                .response(200, "the ticket", Some(ticket_schema()))
                .response_header(200, "ETag", ETAG_DOC)],
        )
        .route(
            "/tickets/{id}/history",
            get(history).with_state(http.clone()),
            [id_param(Operation::new("get", "A ticket's events, oldest first").tag("tickets").bearer())
                .response(200, "the events", Some(json!({
                    "type": "object",
                    "required": ["items"],
                    "properties": { "items": { "type": "array", "items": {
                        "type": "object",
                        "required": ["event_id", "type", "version", "occurred_at", "actor_id", "correlation_id", "data"],
                        "properties": {
                            "event_id": { "type": "string", "format": "uuid" },
                            "type": { "type": "string", "enum": ["TicketOpened", "TicketAssigned", "TicketCommented", "TicketClosed"] },
                            "version": { "type": "integer" },
                            "occurred_at": { "type": "string", "format": "date-time" },
                            "actor_id": { "type": ["string", "null"], "format": "uuid" },
                            "correlation_id": { "type": "string", "format": "uuid" },
                            "data": { "type": "object" }
                        }
                    } } }
                })))],
        )
        .route(
            "/tickets/{id}/assign",
            post(change::<AssignBody>).with_state(http.clone()),
            [replayable(conflict(posted(
                id_param(Operation::new("post", "Assign a ticket to an agent (agents only)").tag("tickets").bearer()),
                true,
                json!({
                    "type": "object",
                    "required": ["assignee_id"],
                    "properties": { "assignee_id": { "type": "string", "format": "uuid" }, "expected_version": expected_version() }
                }),
                "the assignee is not an agent (checked for a ticket there is: a missing one is 404)",
            ))
                .response(200, "the ticket (as it was, with no new version, when it is already the assignee's)", Some(ticket_schema()))
                .response(403, "not an agent (`forbidden`)", None), 200)],
        )
        .route(
            "/tickets/{id}/comments",
            post(change::<CommentBody>).with_state(http.clone()),
            [replayable(conflict(posted(
                id_param(Operation::new("post", "Comment on a ticket").tag("tickets").bearer()),
                true,
                json!({
                    "type": "object",
                    "required": ["body"],
                    "properties": { "body": { "type": "string", "minLength": 1, "maxLength": 10000, "description": "counted in characters of its NFC form: a character NFC decomposes counts as two; stored in NFC" }, "expected_version": expected_version() }
                }),
                "an empty, invisible or too long body, or one with NUL, bidirectional controls or a control character other than line ends and tabs",
            ))
                .response(201, "the new comment, and the ticket's version after it", Some(json!({ "$ref": "#/components/schemas/CommentAdded" }))), 201)],
        )
        .route(
            "/tickets/{id}/close",
            post(change::<CloseBody>).with_state(http),
            [replayable(conflict(posted(
                id_param(Operation::new("post", "Close a ticket").tag("tickets").bearer()),
                true,
                json!({
                    "type": "object",
                    "properties": { "resolution": { "type": ["string", "null"], "maxLength": 10000, "description": "counted in characters of its NFC form: a character NFC decomposes counts as two; stored in NFC" }, "expected_version": expected_version() }
                }),
                "a resolution over 10000 characters, or one with NUL, bidirectional controls or a control character other than line ends and tabs",
            ))
                .response(200, "the ticket", Some(ticket_schema())), 200)],
        )
}
