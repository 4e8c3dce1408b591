//! The auth plugin's routes.

use crate::commands::{GetUser, LogIn, LogOut, RegisterUser, UserCard, ViewUser};
use crate::users::UserProfile;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use helpdesk_api::{
    ApiError, ApiJson, ApiPath, Authenticated, BusHandle, ClientAddr, HttpApi, Operation,
    RequestMetadata,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

#[derive(Deserialize)]
// Unknown fields are refused: a misspelled one (`expected_versoin`) must not pass silently.
#[serde(deny_unknown_fields)]
struct RegisterBody {
    email: String,
    password: String,
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    agent_code: Option<String>,
}

// Written out, as `RegisterUser`'s is: a derived `Debug` would print the password and the
// agent code wherever the body is logged.
impl std::fmt::Debug for RegisterBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterBody")
            .field("email", &self.email)
            .field("password", &"<redacted>")
            .field("display_name", &self.display_name)
            .field(
                "agent_code",
                &self.agent_code.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    email: String,
    password: String,
}

// Written out, as `LogIn`'s is: a derived `Debug` would print the password.
impl std::fmt::Debug for LoginBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginBody")
            .field("email", &self.email)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Serialize)]
struct Token {
    token: String,
    token_type: &'static str,
    expires_in: u64,
    user_id: Uuid,
    role: &'static str,
}

impl std::fmt::Debug for Token {
    /// Without the bearer token, as the request bodies leave out their secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("token", &"<redacted>")
            .field("expires_in", &self.expires_in)
            .field("user_id", &self.user_id)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// A user as `/auth/register` and `/auth/me` answer it (`schema_user`).
#[derive(Debug, Serialize)]
struct UserView {
    user_id: Uuid,
    email: String,
    role: &'static str,
    display_name: Option<String>,
}

impl From<UserProfile> for UserView {
    fn from(record: UserProfile) -> Self {
        Self {
            user_id: record.id,
            email: record.email,
            role: record.role.as_str(),
            display_name: record.display_name,
        }
    }
}

async fn register(
    State(buses): State<BusHandle>,
    ClientAddr(client): ClientAddr,
    RequestMetadata(metadata): RequestMetadata,
    ApiJson(body): ApiJson<RegisterBody>,
) -> Result<(StatusCode, Json<UserView>), ApiError> {
    let user = buses
        .get()?
        .commands
        .dispatch_with(
            RegisterUser {
                email: body.email,
                password: body.password,
                display_name: body.display_name,
                agent_code: body.agent_code,
                client,
            },
            metadata,
        )
        .await
        .map_err(ApiError::from)?;
    Ok((StatusCode::CREATED, Json(UserView::from(user))))
}

async fn login(
    State(buses): State<BusHandle>,
    ClientAddr(client): ClientAddr,
    RequestMetadata(metadata): RequestMetadata,
    ApiJson(body): ApiJson<LoginBody>,
) -> Result<Json<Token>, ApiError> {
    let result = buses
        .get()?
        .commands
        .dispatch_with(
            LogIn {
                email: body.email,
                password: body.password,
                client,
            },
            metadata,
        )
        .await;
    let logged_in = result.map_err(ApiError::from)?;
    Ok(Json(Token {
        token: logged_in.token,
        token_type: "Bearer",
        expires_in: logged_in.expires_in,
        user_id: logged_in.user.id,
        role: logged_in.user.role.as_str(),
    }))
}

/// Ends every token of the caller's (this one too) and their WebSocket connections: 204.
async fn logout(
    State(buses): State<BusHandle>,
    Authenticated(user): Authenticated,
    request: RequestMetadata,
) -> Result<StatusCode, ApiError> {
    let metadata = request.by(&user);
    buses
        .get()?
        .commands
        .dispatch_with(LogOut { user: user.id }, metadata)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn me(
    State(buses): State<BusHandle>,
    Authenticated(user): Authenticated,
    request: RequestMetadata,
) -> Result<Json<UserView>, ApiError> {
    let metadata = request.by(&user);
    let record = buses
        .get()?
        .queries
        .dispatch_with(GetUser(user.id), metadata)
        .await?
        .ok_or_else(|| {
            ApiError::unauthorized("the token's user no longer exists")
                .with_bearer_error("invalid_token")
        })?;
    Ok(Json(UserView::from(record)))
}

/// Another user, as the caller may see them (see [`ViewUser`]): a 404 for an id of no one and
/// for a customer another customer asks about alike.
async fn user(
    State(buses): State<BusHandle>,
    Authenticated(viewer): Authenticated,
    request: RequestMetadata,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<UserCard>, ApiError> {
    let metadata = request.by(&viewer);
    buses
        .get()?
        .queries
        .dispatch_with(ViewUser { viewer, id }, metadata)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("no such user"))
}

fn schema_user() -> Value {
    json!({
        "type": "object",
        // Every field is always sent (`display_name` as null when there is none).
        "required": ["user_id", "email", "role", "display_name"],
        "properties": {
            "user_id": { "type": "string", "format": "uuid" },
            "email": { "type": "string", "format": "idn-email" },
            "role": { "type": "string", "enum": ["agent", "customer"] },
            "display_name": { "type": ["string", "null"] }
        }
    })
}

/// The 503s of `/auth/register` and `/auth/login`: all three say to try again.
const UNAVAILABLE: &str = "every password-hashing slot stayed taken for 2 s (`busy`), the user store could not be reached (`unavailable`), or the request ran past its time budget (`timeout`), with Retry-After";

/// The routes, with their documentation.
pub(crate) fn api(buses: BusHandle) -> HttpApi {
    HttpApi::new()
        .route(
            "/auth/register",
            post(register).with_state(buses.clone()),
            [Operation::new("post", "Register a user")
                .tag("auth")
                .body(json!({
                    "type": "object",
                    "required": ["email", "password"],
                    "properties": {
                        "email": { "type": "string", "minLength": 1, "maxLength": 254, "description": "an address, internationalized ones included (`ünï@例え.jp`); stored lower-cased and in NFC; at most 254 bytes of UTF-8, 64 before the @ (mail's limits, so fewer characters outside ASCII)" },
                        "password": { "type": "string", "minLength": 8, "maxLength": 128, "description": "8 to 128 characters of its NFC form; not one of the most common passwords, not made of three characters or fewer, and not the email or the part before its @" },
                        "display_name": { "type": ["string", "null"], "maxLength": 100 },
                        "agent_code": {
                            "type": ["string", "null"],
                            "description": "the agent code (HELPDESK_AGENT_CODE): required for an email on the agent list, refused for any other; empty or null counts as absent"
                        }
                    }
                }))
                .response(201, "registered", Some(schema_user()))
                .response(403, "the email is on the agent list and the agent code is missing or wrong (`agent_code_required`)", None)
                .response(409, "the email is taken (`email_taken`); after a registration of it that timed out (503 `timeout`), maybe by that one: log in to check", None)
                .response(422, "an invalid email, password or display name, or an agent code for an email not on the agent list (`validation_failed`); JSON of the wrong shape, or with a field the route does not know (`invalid_body`)", None)
                .response(429, "this client address (or its IPv6 /48) made too many registrations within the login window (every answer counts: accounts made, taken emails, refused agent codes; not those the server could not finish), has two logins or registrations in progress, or sent too many wrong agent codes within the login window (`too_many_attempts`), with Retry-After", None)
                .response(503, UNAVAILABLE, None)
                .response_header(429, "Retry-After", helpdesk_api::RETRY_AFTER)
                .response_header(503, "Retry-After", helpdesk_api::RETRY_AFTER)],
        )
        .route(
            "/auth/login",
            post(login).with_state(buses.clone()),
            [Operation::new("post", "Log in and get a bearer token")
                .tag("auth")
                .body(json!({
                    "type": "object",
                    "required": ["email", "password"],
                    "properties": { "email": { "type": "string" }, "password": { "type": "string" } }
                }))
                .response(200, "a token", Some(json!({
                    "type": "object",
                    "required": ["token", "token_type", "expires_in", "user_id", "role"],
                    "properties": {
                        "token": { "type": "string" },
                        "token_type": { "type": "string", "enum": ["Bearer"] },
                        "expires_in": { "type": "integer" },
                        "user_id": { "type": "string", "format": "uuid" },
                        "role": { "type": "string", "enum": ["agent", "customer"] }
                    }
                })))
                .response(401, "wrong email or password (`invalid_credentials`)", None)
                .response(422, "JSON of the wrong shape, or with a field the route does not know (`invalid_body`)", None)
                .response(429, "too many failed attempts for this email and client address, or from this address across emails, or two logins or registrations of this address in progress, or too many logins to this account within the login window (`too_many_attempts`), with Retry-After", None)
                .response(503, UNAVAILABLE, None)
                .response_header(429, "Retry-After", helpdesk_api::RETRY_AFTER)
                .response_header(503, "Retry-After", helpdesk_api::RETRY_AFTER)],
        )
        .route(
            "/auth/logout",
            post(logout).with_state(buses.clone()),
            [Operation::new("post", "Log out everywhere: every token of the user issued until now stops working, on every instance, and the user's WebSocket connections close (1008)")
                .tag("auth")
                .bearer()
                .response(204, "logged out; log in again for a new token", None)
                .response(503, "the user store could not be asked, or the request ran past its time budget (`unavailable`, `timeout`), with Retry-After: the logout may have happened (the user's WebSockets are closed either way, within 10 s); send it again with the same token, and a 401 (`the token was ended by a logout`) says it did", None)
                .response_header(503, "Retry-After", helpdesk_api::RETRY_AFTER)],
        )
        .route(
            "/users/{id}",
            get(user).with_state(buses.clone()),
            [Operation::new("get", "Another user's display name and role (an agent sees anyone; a customer sees the agents and themselves), never their email")
                .tag("auth")
                .bearer()
                .param("id", "path", true, json!({ "type": "string", "format": "uuid" }), "the user's id (a ticket's `reporter_id`, `assignee_id`, a comment's `author_id`)")
                .response(200, "the user", Some(json!({
                    "type": "object",
                    "required": ["user_id", "display_name", "role"],
                    "properties": {
                        "user_id": { "type": "string", "format": "uuid" },
                        "display_name": { "type": ["string", "null"] },
                        "role": { "type": "string", "enum": ["agent", "customer"] }
                    }
                })))
                .response(400, "a malformed id (`invalid_path`)", None)
                .response(404, "no such user, or one the caller may not see (`not_found`)", None)],
        )
        .route(
            "/auth/me",
            get(me).with_state(buses),
            [Operation::new("get", "The current user")
                .tag("auth")
                .bearer()
                .response(200, "the user", Some(schema_user()))],
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request bodies' `Debug` output leaves the password and the agent code out, as the
    /// commands' does (tested with them in the helpdesk's `debug_output_leaves_secrets_out`).
    #[test]
    fn debug_output_of_the_bodies_leaves_secrets_out() {
        let register: RegisterBody = serde_json::from_value(json!({
            "email": "ada@example.com",
            "password": "correct horse battery",
            "agent_code": "an-agent-code-never-logged",
        }))
        .unwrap();
        let shown = format!("{register:?}");
        assert!(!shown.contains("battery"), "{shown}");
        assert!(!shown.contains("never-logged"), "{shown}");
        assert!(shown.contains("ada@example.com"), "{shown}");
        let login: LoginBody = serde_json::from_value(json!({
            "email": "ada@example.com",
            "password": "correct horse battery",
        }))
        .unwrap();
        let shown = format!("{login:?}");
        assert!(!shown.contains("battery"), "{shown}");
    }
}
