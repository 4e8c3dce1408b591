//! The auth plugin's messages and handlers.

use crate::agents::AgentList;
use crate::hashing::{ClientSlot, Hashing};
use crate::throttle::{AddressLimit, Count, CountedAttempts};
use crate::tokens::JwtTokens;
use crate::users::{CreateUserError, UserProfile, UserRecord, UserStore};
use async_trait::async_trait;
use cqrs_core::clock::Clock;
use cqrs_core::ports::StoreError;
use cqrs_core::{
    Command, CommandContext, CommandHandler, ErrorKind, HandlerError, Query, QueryContext,
    QueryHandler,
};
use helpdesk_api::{Role, User};
use serde_json::json;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tracing::Instrument;
use uuid::Uuid;

/// Registers a user.
#[derive(Command)]
#[cqrs(name = "auth.register_user", output = UserProfile)]
pub struct RegisterUser {
    /// As sent; trimmed and lower-cased by the handler.
    pub email: String,
    /// 8 to 128 characters.
    pub password: String,
    /// Optional, at most 100 characters after trimming.
    pub display_name: Option<String>,
    /// The agent code (`HELPDESK_AGENT_CODE`): required for an email on the agent list,
    /// refused for any other. Empty counts as none.
    pub agent_code: Option<String>,
    /// The client's address: one address hashes at most two passwords at a time.
    pub client: Option<IpAddr>,
}

// Written out: a derived `Debug` would print the password and the agent code wherever a
// command is logged.
impl std::fmt::Debug for RegisterUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterUser")
            .field("email", &self.email)
            .field("password", &"<redacted>")
            .field("display_name", &self.display_name)
            .field(
                "agent_code",
                &self.agent_code.as_ref().map(|_| "<redacted>"),
            )
            .field("client", &self.client)
            .finish()
    }
}

/// Logs in: checks the password and issues a token.
#[derive(Command)]
#[cqrs(name = "auth.log_in", output = LoggedIn)]
pub struct LogIn {
    /// As sent.
    pub email: String,
    /// As sent.
    pub password: String,
    /// The client's address, for throttling and the hashing cap.
    pub client: Option<IpAddr>,
}

impl std::fmt::Debug for LogIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogIn")
            .field("email", &self.email)
            .field("password", &"<redacted>")
            .field("client", &self.client)
            .finish()
    }
}

/// A successful login.
#[derive(Clone)]
pub struct LoggedIn {
    /// The bearer token.
    pub token: String,
    /// Seconds until it expires.
    pub expires_in: u64,
    /// Who logged in.
    pub user: User,
}

impl std::fmt::Debug for LoggedIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoggedIn")
            .field("token", &"<redacted>")
            .field("expires_in", &self.expires_in)
            .field("user", &self.user)
            .finish()
    }
}

/// Logs a user out everywhere: every token issued to them so far is refused from then on
/// (`AuthError::LoggedOut`), on every instance, and their realtime connections close on every
/// instance. Tokens are not kept anywhere, so one of them cannot be ended alone.
#[derive(Debug, Command)]
#[cqrs(name = "auth.log_out", output = LoggedOut)]
pub struct LogOut {
    /// Who logs out.
    pub user: Uuid,
}

/// A logout, once its tokens are refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoggedOut {
    /// How many of the user's realtime connections this instance closed.
    pub connections_closed_here: usize,
    /// Whether the other instances were told to close theirs. `false` when they could not
    /// be (the pub/sub was unreachable; it is logged): they are told again in the background
    /// for 30 s, past which theirs stay open until their tokens expire (no new one opens
    /// with those tokens).
    pub others_told: bool,
}

/// Reads a user by id, with the role they have now (an agent whose email left the agent
/// list is a customer).
#[derive(Debug, Query)]
#[cqrs(name = "auth.get_user", output = Option<UserProfile>)]
pub struct GetUser(pub Uuid);

/// Another user as `viewer` may see them: their id, display name and role, never their email.
/// An agent sees anyone (a ticket's reporter, a colleague to assign to); a customer sees the
/// agents (who answers their tickets) and themselves, and no other customer: `None`, as for
/// an id of no one, so that ids of customers cannot be probed.
#[derive(Debug, Query)]
#[cqrs(name = "auth.view_user", output = Option<UserCard>)]
pub struct ViewUser {
    /// Who asks.
    pub viewer: helpdesk_api::User,
    /// Whom.
    pub id: Uuid,
}

/// What others see of a user.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UserCard {
    /// The id.
    pub user_id: Uuid,
    /// The display name, if they gave one.
    pub display_name: Option<String>,
    /// `agent` or `customer`, as it is now.
    pub role: &'static str,
}

/// Passwords of 8 characters or more that lead the lists of leaked ones: a guesser tries these
/// first, from as many addresses as it has, and the throttles count per address.
const COMMON_PASSWORDS: &[&str] = &[
    "password",
    "password1",
    "password12",
    "password123",
    "passw0rd",
    "p@ssw0rd",
    "p@ssword",
    "12345678",
    "123456789",
    "1234567890",
    "0123456789",
    "87654321",
    "987654321",
    "11111111",
    "00000000",
    "88888888",
    "12341234",
    "11223344",
    "qwertyui",
    "qwertyuiop",
    "qwerty12",
    "qwerty123",
    "1q2w3e4r",
    "1qaz2wsx",
    "zaq12wsx",
    "asdfghjk",
    "asdfghjkl",
    "zxcvbnm1",
    "abcd1234",
    "abc12345",
    "abcdefgh",
    "iloveyou",
    "sunshine",
    "princess",
    "football",
    "baseball",
    "superman",
    "starwars",
    "trustno1",
    "welcome1",
    "welcome123",
    "letmein1",
    "changeme",
    "admin123",
    "administrator",
    "whatever",
    "computer",
    "michelle",
    "jennifer",
    "1234qwer",
    "q1w2e3r4",
    "monkey12",
    "dragon12",
    "master12",
    "shadow12",
];

/// Why `password` (NFC) is one a guesser tries first, if it is: a common one, one made of
/// three characters or fewer (`aaaaaaaa`, `abababab`), or the account's own email or the
/// part before its `@`.
fn guessable(password: &str, email: &str) -> Option<&'static str> {
    let lowered = password.to_lowercase();
    if COMMON_PASSWORDS.contains(&lowered.as_str()) {
        return Some("the password is one of the most common; choose another");
    }
    let mut distinct: Vec<char> = lowered.chars().collect();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() <= 3 {
        return Some(
            "the password is made of three different characters or fewer (upper and lower case \
             counted as one); use at least four",
        );
    }
    let local = email.split_once('@').map_or(email, |(local, _)| local);
    if lowered == email || lowered == local {
        return Some("the password must not be the email or the part before its @; choose another");
    }
    None
}

/// Trims, lower-cases and NFC-normalizes an email, or says why it is not one.
///
/// Its lengths are mail's own, in bytes of UTF-8 (RFC 5321 and 6531): at most 254 in all and
/// 64 before the `@`, so a name in a script of two or three bytes a character fits fewer
/// characters.
pub fn normalize_email(raw: &str) -> Result<String, &'static str> {
    let email = canonical_email(raw);
    if email.is_empty() {
        return Err("the email is empty");
    }
    if email.len() > 254 {
        return Err("the email is longer than 254 bytes of UTF-8 (mail's limit)");
    }
    let Some((local, domain)) = email.split_once('@') else {
        return Err("the email has no @");
    };
    if local.len() > 64 {
        return Err("the part before the @ is longer than 64 bytes of UTF-8 (mail's limit)");
    }
    // Each part drawn as something: a local part of only combining marks, or of the blank
    // Braille pattern (U+2800, not whitespace to Unicode), looks like no part at all.
    let looks_right = has_visible(local)
        && !domain.contains('@')
        && domain.contains('.')
        && domain.split('.').all(has_visible)
        && !email.chars().any(|c| {
            c.is_whitespace()
                || c.is_control()
                || is_invisible(c)
                || c == '\u{2800}'
                || is_noncharacter(c)
                || matches!(
                    c,
                    '<' | '>' | '(' | ')' | ',' | ';' | ':' | '\\' | '"' | '[' | ']'
                )
        });
    if looks_right {
        Ok(email)
    } else {
        Err("the email does not look like an address")
    }
}

/// An email as accounts and the agent list key it: trimmed, lower-cased, then in Unicode's
/// composed form (NFC), so `zoë` typed with a precomposed `ë` and with `e` plus a combining
/// diaeresis, drawn alike, is one account. Lower-casing first: it can leave a letter in
/// decomposed form, which NFC then composes.
pub fn canonical_email(raw: &str) -> String {
    composed(&raw.trim().to_lowercase())
}

use helpdesk_api::{
    Lines, composed, has_visible, invalid_field as invalid, is_invisible, is_noncharacter,
    reject_controls, reject_hidden, reject_nul,
};

/// The longest password registration takes, in characters.
const MAX_PASSWORD_CHARS: usize = 128;

/// Handles [`RegisterUser`].
pub(crate) struct RegisterHandler {
    pub(crate) users: Arc<dyn UserStore>,
    pub(crate) hashing: Hashing,
    pub(crate) agents: AgentList,
    /// Counts wrong agent codes by client address and IPv6 site (`agentcode|...`), with the
    /// limit and window of failed logins: without it one address could guess codes without end.
    pub(crate) code_limit: AddressLimit,
    /// Counts registrations by client address and IPv6 site (`register|...`), taken or not,
    /// with the limit of failed logins from one address: without it one address could make
    /// accounts without end (each may hold WebSocket connections), or learn which emails have
    /// one (409 `email_taken`) at database speed.
    pub(crate) register_limit: AddressLimit,
    pub(crate) clock: Arc<dyn Clock>,
}

#[async_trait]
impl CommandHandler<RegisterUser> for RegisterHandler {
    async fn handle(
        &self,
        cmd: RegisterUser,
        _ctx: &mut CommandContext,
    ) -> Result<UserProfile, HandlerError> {
        let email = normalize_email(&cmd.email).map_err(|p| invalid("email", p))?;
        // Composed (NFC), as logins check it: `café` typed with a precomposed `é` on one
        // keyboard and with `e` and a combining accent on another is one password.
        let password = composed(&cmd.password);
        let chars = password.chars().count();
        if !(8..=MAX_PASSWORD_CHARS).contains(&chars) {
            return Err(invalid(
                "password",
                "the password must be 8 to 128 characters",
            ));
        }
        if let Some(why) = guessable(&password, &email) {
            return Err(invalid("password", why));
        }
        let display_name = cmd
            .display_name
            .map(|n| composed(n.trim()))
            .filter(|n| !n.is_empty());
        if display_name
            .as_ref()
            .is_some_and(|n| n.chars().count() > 100)
        {
            return Err(invalid(
                "display_name",
                "the display name must be at most 100 characters",
            ));
        }
        if let Some(name) = &display_name {
            reject_nul("display_name", name)?;
            reject_controls("display_name", name, Lines::One)?;
            // Shown to others (agents see who reported a ticket): no text that reorders what
            // follows it, and something visible.
            reject_hidden("display_name", name)?;
            if !has_visible(name) {
                return Err(invalid(
                    "display_name",
                    "the display name must have a visible character, not only blank or invisible ones",
                ));
            }
        }
        // The client's own bound first, as for a login: every step below takes a pooled
        // connection (the throttles' transactions wait on a lock per address), so one address
        // with many registrations at once would otherwise hold the pool; a refusal here is
        // no attempt. The shared permit to hash comes only once the checks are done.
        let slot = self.hashing.client_slot(cmd.client)?;
        // Counted before anything is checked against the agent list or the accounts, so
        // every answer that tells something (an email on the agent list, a taken email) is
        // one of the address's few registrations a window, not free. No `@`: never an email
        // key of the login throttle. Taken back only when the server could not finish the
        // registration (below): one that went through counts as much as one refused.
        // Dropped before both keys are counted, the guard takes back what was.
        let mut attempts = CountedAttempts::new();
        if let Some(seconds) = self
            .register_limit
            .attempt("register", cmd.client, &mut attempts)
            .await?
        {
            return Err(too_many_attempts(
                seconds,
                "too many registrations from this address; try again later",
            ));
        }
        // Dropped from here on (a time-out, a client gone), the guard takes the counts back on
        // a task, unless the account was stored or the lookup had found the email free.
        let counted = RegistrationCount {
            counts: attempts.into_counts(),
            users: self.users.clone(),
            email: email.clone(),
            settled: false,
            found_free: AtomicBool::new(false),
            inserting: AtomicBool::new(false),
        };
        let created = async {
            // Before the check of a taken email: without the code, nobody learns whether an
            // agent's email has an account.
            let role = self
                .role(&email, cmd.agent_code.as_deref(), cmd.client)
                .await?;
            self.create(email.clone(), role, display_name, password, slot, &counted)
                .await
        }
        .await;
        // One the server could not finish (its store away) used up no registration of the
        // address: an outage must not lock clients out. Except `busy` (no hashing slot came
        // free), which comes only after the lookup found the email free: taken back, it would
        // tell a client which emails are free at no cost whenever the slots are full, while a
        // taken email's 409 is counted.
        // Not a 429 (the agent-code throttle's): that answer tells something too, and a
        // retry is not the server's to make good.
        if created.as_ref().is_err_and(|e| {
            matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout)
                && e.code() != crate::hashing::BUSY
        }) {
            counted.take_back_unless_created().await;
        } else {
            counted.keep();
        }
        created.map(UserProfile::from)
    }
}

/// A registration's count on the address's throttle. Kept once the registration went through
/// or was refused; taken back when the server could not finish it (its store away, or the
/// registration dropped before the lookup of its email answered: a time-out, a client
/// gone), unless, for one whose insert began, the account was stored all the same (an answer
/// lost after the insert committed): a client must not make uncounted accounts. Before its
/// insert a registration stored nothing, and its count goes back without a lookup, which
/// would find another's account and tell, by the count kept, that the email has one. An insert still running on the
/// server when the check reads may go uncounted, and so may one when the check cannot read
/// (the store away: then the insert most likely failed too); the check narrows the window to
/// its own round trip.
///
/// Dropped once the lookup found the email free, it stays counted, whoever dropped it (the
/// client hanging up, or the server's own time budget running out while the password was
/// hashed, whose 503 `timeout` tells as much): a taken email's 409 comes right after that
/// lookup, and a free one's answer only after the hash, so a client that hung up when no
/// 409 came in time would otherwise learn that the email is free (and not on the agent list)
/// at no cost.
#[must_use = "dropping it before the lookup answered takes the count back on a task; say what happened instead"]
struct RegistrationCount {
    /// The client's count, and its site's for IPv6.
    counts: Vec<Count>,
    users: Arc<dyn UserStore>,
    email: String,
    settled: bool,
    /// The lookup found the email free: from here on, hanging up tells the client something.
    found_free: AtomicBool,
    /// The insert began: only from here on may this registration have stored an account.
    inserting: AtomicBool,
}

impl RegistrationCount {
    /// The registration went through, or was refused: the count stays.
    fn keep(mut self) {
        self.settled = true;
    }

    /// The server could not finish the registration.
    async fn take_back_unless_created(mut self) {
        self.settled = true;
        // Before its insert, it stored nothing: no lookup, whose answer (an account of
        // another's) would keep the count, and so tell whether the email has one.
        let stored_maybe = (*self.inserting.get_mut())
            .then(|| (self.users.clone(), std::mem::take(&mut self.email)));
        // On a task of its own, as a login's take-back: a registration dropped here (its
        // lookup or take-back waiting on a store as slow as the one that failed it, until the
        // request's time budget ran out) kept its count, and an outage locked the address
        // out of registering for the window.
        let undo = undo_registration(std::mem::take(&mut self.counts), stored_maybe);
        if let Err(e) = tokio::spawn(tracing::Instrument::in_current_span(undo)).await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

impl Drop for RegistrationCount {
    fn drop(&mut self) {
        if self.settled || *self.found_free.get_mut() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("a cancelled registration stays counted: no runtime to undo it");
            return;
        };
        // Dropped before the lookup found the email free, so before any insert: it stored
        // nothing, and its count goes back without a lookup. One would tell whether the
        // email has an account (another's): kept, the count would say so.
        runtime.spawn(undo_registration(std::mem::take(&mut self.counts), None));
    }
}

/// Takes a registration's counts back, unless `stored_maybe` (the user store and the email of
/// a registration whose insert began) finds its account.
async fn undo_registration(counts: Vec<Count>, stored_maybe: Option<(Arc<dyn UserStore>, String)>) {
    if let Some((users, email)) = stored_maybe {
        match users.by_email(&email).await {
            // Stored after all: it counts.
            Ok(Some(_)) => return,
            Ok(None) => {}
            // The user store is away, so the insert most likely never went through: an
            // outage must not lock clients out.
            Err(error) => {
                tracing::debug!(%error, "could not tell whether a registration's account was stored; taking its count back");
            }
        }
    }
    for (throttle, key, counted) in counts {
        if let Err(error) = throttle.take_back(&key, counted).await {
            tracing::warn!(%error, "could not take back a registration's count");
        }
    }
}

impl RegisterHandler {
    /// Creates the account, once its registration was counted.
    async fn create(
        &self,
        email: String,
        role: Role,
        display_name: Option<String>,
        password: String,
        slot: ClientSlot,
        counted: &RegistrationCount,
    ) -> Result<UserRecord, HandlerError> {
        // Cheap check first, so a taken email does not cost a hash; the store decides for real.
        if self.users.by_email(&email).await?.is_some() {
            return Err(email_taken());
        }
        counted.found_free.store(true, Ordering::Relaxed);
        let user = UserRecord {
            id: Uuid::now_v7(),
            email,
            role,
            display_name,
            password_hash: self.hashing.hash_password(password, slot).await?,
            created_at: self.clock.now(),
            logouts: 0,
        };
        counted.inserting.store(true, Ordering::Relaxed);
        match self.users.create(user.clone()).await {
            Ok(()) => Ok(user),
            Err(CreateUserError::EmailTaken) => Err(email_taken()),
            Err(CreateUserError::Store(e)) => Err(e.into()),
        }
    }

    /// The role `email` registers with: an agent for a listed email with the agent code; a
    /// listed email without it (or with another) is refused, so nobody can take an agent's
    /// address, as an agent or as a customer; a code for an unlisted email is refused too, as
    /// it means a mistyped email, which would otherwise quietly become a customer.
    ///
    /// A code is counted against its client address before it is compared, in the same step
    /// as the check of the limit, and taken back when it is right: past the limit the address
    /// gets 429 even with the right code, so concurrent guesses cannot slip past the check.
    async fn role(
        &self,
        email: &str,
        code: Option<&str>,
        client: Option<IpAddr>,
    ) -> Result<Role, HandlerError> {
        let code = code.filter(|c| !c.is_empty());
        match (self.agents.lists(email), code) {
            (true, Some(code)) => {
                // No `@`: never an email key of the login throttle.
                let mut counted = CountedAttempts::new();
                if let Some(seconds) = self
                    .code_limit
                    .attempt("agentcode", client, &mut counted)
                    .await?
                {
                    return Err(too_many_attempts(
                        seconds,
                        "too many wrong agent codes from this address; try again later",
                    ));
                }
                if self.agents.code_matches(code) {
                    // The right code goes through, as a right password does, whether or not
                    // its count could be taken back.
                    if let Err(e) = counted.take_back().await {
                        tracing::warn!(error = %e, "a right agent code's attempt stays counted");
                    }
                    Ok(Role::Agent)
                } else {
                    counted.keep();
                    Err(agent_code_required())
                }
            }
            (true, None) => Err(agent_code_required()),
            (false, Some(_)) => Err(invalid(
                "agent_code",
                "this email is not on the agent list: check the email, or leave `agent_code` \
                 out to register as a customer",
            )),
            (false, None) => Ok(Role::Customer),
        }
    }
}

fn agent_code_required() -> HandlerError {
    HandlerError::new(
        ErrorKind::Forbidden,
        "agent_code_required",
        "this email belongs to an agent: register it with `agent_code` set to the agent code \
         the helpdesk's administrator gave you (a missing or wrong code is refused)",
    )
}

fn email_taken() -> HandlerError {
    HandlerError::conflict("email_taken", "an account with this email already exists")
}

/// Failed logins from one client address, across every email, before its logins get 429: this
/// many times the limit for one email and address (`--login-attempts`).
pub(crate) const ADDRESS_BUDGET_FACTOR: u32 = 5;

/// Correct-password logins to one account per login window (`--login-window-seconds`) before
/// its logins get 429. Each checks a password (tens of milliseconds of a core, ~19 MiB), and a
/// right password's failure counts are taken back: without this budget, whoever holds one
/// account's password could keep the password hashing busy for ever, and every other login
/// waiting for it. Far above what a person signing in needs.
pub(crate) const SIGN_INS_PER_WINDOW: u32 = 100;

/// Handles [`LogIn`].
pub(crate) struct LogInHandler {
    pub(crate) users: Arc<dyn UserStore>,
    pub(crate) hashing: Hashing,
    /// Counts failed logins by email and client address, and for IPv6 by email and site (a
    /// /48) with a larger limit: one party spreading guesses at one account over its /64s.
    pub(crate) email_limit: AddressLimit,
    /// Counts failed logins by client address and IPv6 site alone, whatever the email, with a
    /// larger limit: one address trying a few passwords on each of many emails.
    pub(crate) address_limit: AddressLimit,
    /// Counts successful logins by account (`signed-in|{email}`), [`SIGN_INS_PER_WINDOW`] a
    /// window by default.
    pub(crate) sign_ins: Arc<dyn crate::LoginThrottle>,
    pub(crate) tokens: JwtTokens,
    /// Verified against when the email is unknown, so both failures take as long.
    pub(crate) dummy_hash: Arc<String>,
    pub(crate) agents: AgentList,
}

const FAILED_LOGINS: &str = "too many failed logins; try again later";
const TOO_MANY_SIGN_INS: &str =
    "too many logins to this account in a short time; use the token you have, or try again later";

/// Takes back a login's sign-in count: it signed in not.
async fn not_signed_in(signed_in: CountedAttempts) {
    if let Err(e) = signed_in.take_back().await {
        tracing::warn!(error = %e, "a login that did not sign in stays counted as a sign-in");
    }
}

fn too_many_attempts(seconds: u64, message: &'static str) -> HandlerError {
    HandlerError::rate_limited("too_many_attempts", message)
        .with_details(json!({ "retry_after": seconds }))
}

/// What a login's check found, when the server could finish it.
enum Checked {
    /// The pair or the address is blocked for this many seconds: no password was checked.
    Blocked(u64),
    /// The account had its sign-ins for the window: no password was checked.
    SignedInEnough(u64),
    /// The email is unknown or the password wrong.
    Wrong,
    /// The password is right.
    Right(UserRecord),
}

#[async_trait]
impl CommandHandler<LogIn> for LogInHandler {
    async fn handle(
        &self,
        cmd: LogIn,
        _ctx: &mut CommandContext,
    ) -> Result<LoggedIn, HandlerError> {
        let invalid_credentials = || {
            HandlerError::unauthorized("the email or the password is wrong")
                .with_code("invalid_credentials")
        };
        // No account has an email that does not pass the registration's checks; such input
        // (a NUL, say) is not looked up or stored at all.
        let Ok(email) = normalize_email(&cmd.email) else {
            return Err(invalid_credentials());
        };
        // No account has a password over registration's 128 characters: refused before any
        // hashing (argon2 would first digest the whole of it) and without counting an attempt
        // (it reveals nothing of the account, and guesses nothing).
        // Counted composed (NFC), as registration counts it: a few characters grow in NFC.
        if composed(&cmd.password).chars().count() > MAX_PASSWORD_CHARS {
            return Err(invalid_credentials());
        }
        // The client's own bound comes first (a refusal there is no attempt); the shared
        // permit to hash only once the throttles and the lookup are done, so their round
        // trips to a slow store do not hold one of the few permits every client needs.
        let slot = self.hashing.client_slot(cmd.client)?;
        // Counted now, in the same step as the check of the limit, so concurrent guesses
        // cannot all pass it; kept only once the password is checked and found wrong (a
        // login refused as `busy` is taken back, as any the server could not finish).
        let mut counted = CountedAttempts::new();
        // Counted too, and kept only when the password is right: the budget of sign-ins.
        let mut signed_in = CountedAttempts::new();
        let checked = async {
            if let Some(seconds) = self
                .address_limit
                .attempt("address", cmd.client, &mut counted)
                .await?
            {
                return Ok(Checked::Blocked(seconds));
            }
            // Once blocked, not checked: no failure of the address's either. Email keys
            // (`{email}|{client or site}`) hold an `@`, address keys none: the two never meet
            // in one table.
            if let Some(seconds) = self
                .email_limit
                .attempt(&email, cmd.client, &mut counted)
                .await?
            {
                return Ok(Checked::Blocked(seconds));
            }
            if let Some(seconds) = signed_in
                .attempt(&self.sign_ins, &format!("signed-in {email}"))
                .await?
            {
                return Ok(Checked::SignedInEnough(seconds));
            }
            let user = self.users.by_email(&email).await?;
            let hash = user
                .as_ref()
                .map_or_else(|| self.dummy_hash.to_string(), |u| u.password_hash.clone());
            let turn = slot.turn(&self.hashing).await?;
            let ok = Hashing::verify_password(turn, cmd.password, hash).await? && user.is_some();
            Ok::<_, HandlerError>(match user.filter(|_| ok) {
                Some(user) => Checked::Right(user),
                None => Checked::Wrong,
            })
        }
        .await;
        // A sign-in only when the password was right.
        let user = match checked {
            // Checked and wrong: a failure, for the pair and for the address. Kept before any
            // await: a login dropped at the take-back must not take a checked guess back.
            Ok(Checked::Wrong) => {
                counted.keep();
                not_signed_in(signed_in).await;
                return Err(invalid_credentials());
            }
            Ok(Checked::Right(user)) => {
                signed_in.keep();
                // The right password is let in, whether or not its count could be taken back.
                if let Err(e) = counted.take_back().await {
                    tracing::warn!(error = %e, "a successful login's attempt stays counted");
                }
                user
            }
            Ok(Checked::Blocked(seconds)) => {
                not_signed_in(signed_in).await;
                if let Err(e) = counted.take_back().await {
                    tracing::warn!(error = %e, "a blocked login's attempt stays counted");
                }
                return Err(too_many_attempts(seconds, FAILED_LOGINS));
            }
            // Not a failure: the attempts counted before it are taken back.
            Ok(Checked::SignedInEnough(seconds)) => {
                not_signed_in(signed_in).await;
                if let Err(e) = counted.take_back().await {
                    tracing::warn!(error = %e, "a refused login's attempt stays counted");
                }
                return Err(too_many_attempts(seconds, TOO_MANY_SIGN_INS));
            }
            // The server could not tell: no failure of the client's.
            Err(e) => {
                not_signed_in(signed_in).await;
                if let Err(undo) = counted.take_back().await {
                    tracing::warn!(error = %undo, "a failed login's attempt stays counted");
                }
                return Err(e);
            }
        };
        let principal = User {
            id: user.id,
            role: self.agents.role_of(&user.email, user.role),
        };
        let token = self
            .tokens
            .issue(&principal, user.logouts)
            .map_err(|e| HandlerError::internal(e.to_string()))?;
        Ok(LoggedIn {
            token,
            expires_in: self.tokens.ttl_seconds(),
            user: principal,
        })
    }
}

/// How long a logout keeps trying to tell the other instances, in the background, when its
/// first try failed (Redis away).
pub(crate) const TELL_OTHERS_FOR: Duration = Duration::from_secs(30);

/// How long a logout waits for the user store to count it: the task that counts it outlives
/// its request, and must not hold the store for ever when the database hangs.
const COUNT_WITHIN: Duration = Duration::from_secs(10);

/// Handles [`LogOut`].
pub(crate) struct LogOutHandler {
    pub(crate) users: Arc<dyn UserStore>,
    pub(crate) sessions: helpdesk_api::LiveSessions,
    /// [`TELL_OTHERS_FOR`], shorter in tests.
    pub(crate) tell_others_for: Duration,
}

#[async_trait]
impl CommandHandler<LogOut> for LogOutHandler {
    async fn handle(
        &self,
        cmd: LogOut,
        _ctx: &mut CommandContext,
    ) -> Result<LoggedOut, HandlerError> {
        let (users, sessions, user) = (self.users.clone(), self.sessions.clone(), cmd.user);
        let tell_others_for = self.tell_others_for;
        // In a task of its own: a request dropped once the count went up (past its time
        // budget, its client gone) still closes the connections.
        let done = tokio::spawn(
            async move {
                // The tokens first: a connection closed before they were refused could open
                // again with one of them.
                let counted = tokio::time::timeout(COUNT_WITHIN, users.log_out(user))
                    .await
                    .unwrap_or_else(|_| {
                        Err(StoreError::Timeout {
                            backend: "user store",
                            source: "counting a logout took over 10 s".into(),
                        })
                    });
                // Closed also when the store failed, and may have counted it all the same: a
                // retry would then find the token ended (401) and close nothing. A connection
                // closed in vain opens again; one left open would outlive its tokens.
                let closed = match &counted {
                    Ok(None) => None,
                    Ok(Some(_)) | Err(_) => Some(sessions.close_everywhere(user).await),
                };
                if let Some(Err(e)) = closed.as_ref().map(|c| &c.elsewhere) {
                    tracing::warn!(
                        user = %user,
                        error = %e,
                        "a logout could not tell the other instances to close the user's realtime \
                         connections; trying again in the background"
                    );
                    tokio::spawn(
                        tell_the_others_later(sessions, user, tell_others_for).in_current_span(),
                    );
                }
                (counted, closed)
            }
            .in_current_span(),
        );
        let (counted, closed) = match done.await {
            Ok(done) => done,
            // The bus catches it as any handler's panic.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => return Err(HandlerError::internal(e)),
        };
        match counted? {
            None => Err(HandlerError::unauthorized(
                helpdesk_api::AuthError::UnknownUser.to_string(),
            )),
            Some(_) => {
                let closed = closed.expect("closed once counted");
                Ok(LoggedOut {
                    connections_closed_here: closed.here,
                    others_told: closed.elsewhere.is_ok(),
                })
            }
        }
    }
}

/// Tells the other instances to close `user`'s connections (not this one's again: the user
/// may have logged in since), every 100 ms to 5 s, until it works, the hub is gone, or
/// `within` has passed (their connections then stay open until the tokens expire, which it
/// logs).
async fn tell_the_others_later(sessions: helpdesk_api::LiveSessions, user: Uuid, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    let mut delay = Duration::from_millis(100);
    loop {
        tokio::time::sleep(delay).await;
        match sessions.tell_others(user).await {
            None => {
                tracing::debug!(user = %user, "the hub stopped: a logout's other instances are told no more from here");
                return;
            }
            Some(Ok(())) => {
                tracing::info!(user = %user, "told the other instances of a logout, late");
                return;
            }
            Some(Err(e)) if tokio::time::Instant::now() >= deadline => {
                tracing::warn!(
                    user = %user,
                    error = %e,
                    "gave up telling the other instances of a logout: the user's realtime \
                     connections there stay open until their tokens expire (no new one opens)"
                );
                return;
            }
            Some(Err(_)) => delay = (delay * 2).min(Duration::from_secs(5)),
        }
    }
}

/// Handles [`GetUser`].
pub(crate) struct GetUserHandler {
    pub(crate) users: Arc<dyn UserStore>,
    pub(crate) agents: AgentList,
}

#[async_trait]
impl QueryHandler<GetUser> for GetUserHandler {
    async fn handle(
        &self,
        q: GetUser,
        _ctx: &QueryContext,
    ) -> Result<Option<UserProfile>, HandlerError> {
        Ok(self.users.by_id(q.0).await?.map(|mut user| {
            user.role = self.agents.role_of(&user.email, user.role);
            UserProfile::from(user)
        }))
    }
}

/// Handles [`ViewUser`].
pub(crate) struct ViewUserHandler {
    pub(crate) users: Arc<dyn UserStore>,
    pub(crate) agents: AgentList,
}

#[async_trait]
impl QueryHandler<ViewUser> for ViewUserHandler {
    async fn handle(
        &self,
        q: ViewUser,
        _ctx: &QueryContext,
    ) -> Result<Option<UserCard>, HandlerError> {
        let Some(user) = self.users.by_id(q.id).await? else {
            return Ok(None);
        };
        let role = self.agents.role_of(&user.email, user.role);
        let visible = q.viewer.role == Role::Agent || q.viewer.id == user.id || role == Role::Agent;
        Ok(visible.then(|| UserCard {
            user_id: user.id,
            display_name: user.display_name,
            role: role.as_str(),
        }))
    }
}

#[cfg(test)]
mod email_tests {
    use super::normalize_email;

    /// Mail counts an address's length in bytes of UTF-8, and the refusal says so: 95
    /// characters of three bytes each are too long, 64 two-byte ones before the `@` too,
    /// and each refusal names the limit it broke.
    #[test]
    fn an_emails_length_is_counted_in_bytes_and_the_refusal_says_so() {
        let long = format!("a@{}.jp", "例".repeat(90));
        assert_eq!(long.chars().count(), 95);
        let why = normalize_email(&long).unwrap_err();
        assert!(why.contains("254 bytes"), "{why}");
        let long_local = format!("{}@example.com", "é".repeat(33));
        let why = normalize_email(&long_local).unwrap_err();
        assert!(
            why.contains("before the @") && why.contains("64 bytes"),
            "{why}"
        );
        let fits = format!("{}@{}.jp", "é".repeat(32), "例".repeat(60));
        assert_eq!(normalize_email(&fits).as_deref(), Ok(fits.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hashing::{argon2_hash, dummy_hash};
    use crate::throttle::{Attempt, Counted, InMemoryLoginThrottle, LoginThrottle};
    use crate::users::InMemoryUserStore;
    use cqrs_core::Metadata;
    use cqrs_core::clock::ManualClock;
    use cqrs_core::ports::StoreError;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    const PASSWORD: &str = "correct horse battery";

    /// One throttle for a client's keys and its site's (tests from IPv4 addresses have none).
    pub(super) fn by_address(throttle: Arc<dyn LoginThrottle>) -> AddressLimit {
        AddressLimit {
            client: throttle.clone(),
            site: throttle,
        }
    }

    /// Many concurrent logins from one address, each for another email, leave another address
    /// a turn to hash: its correct login is not refused as `busy`. (Without a cap per address
    /// the flood fills the queue ahead of it, and it waits out the bound.)
    // A current-thread runtime: the flood's logins all queue for their turns before the other
    // address's login starts. Real time: argon2 runs on blocking threads.
    #[tokio::test]
    async fn one_address_flooding_logins_leaves_another_address_a_turn() {
        let users = InMemoryUserStore::default();
        let clock = Arc::new(ManualClock::new());
        let user = UserRecord {
            id: Uuid::now_v7(),
            email: "b@example.com".into(),
            role: Role::Customer,
            display_name: None,
            password_hash: argon2_hash(PASSWORD.as_bytes()).unwrap(),
            created_at: clock.now(),
            logouts: 0,
        };
        users.create(user).await.unwrap();
        let throttle = || {
            Arc::new(InMemoryLoginThrottle::new(
                clock.clone(),
                1_000,
                Duration::from_secs(60),
            ))
        };
        let handler = Arc::new(LogInHandler {
            users: Arc::new(users),
            hashing: Hashing::new(2, Duration::from_millis(200)),
            email_limit: by_address(throttle()),
            address_limit: by_address(throttle()),
            sign_ins: throttle(),
            tokens: JwtTokens::new(&[7; 32], Duration::from_secs(60), clock.clone()).unwrap(),
            dummy_hash: Arc::new(dummy_hash().unwrap()),
            agents: AgentList::new(Arc::default(), None),
        });
        let a: IpAddr = [192, 0, 2, 1].into();
        let flood: Vec<_> = (0..40)
            .map(|i| {
                let handler = handler.clone();
                tokio::spawn(async move {
                    let login = LogIn {
                        email: format!("nobody{i}-{}@example.com", Uuid::new_v4().simple()),
                        password: "a guess".into(),
                        client: Some(a),
                    };
                    handler
                        .handle(login, &mut CommandContext::new(Metadata::new()))
                        .await
                })
            })
            .collect();
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        let login = LogIn {
            email: "b@example.com".into(),
            password: PASSWORD.into(),
            client: Some([198, 51, 100, 7].into()),
        };
        let logged_in = handler
            .handle(login, &mut CommandContext::new(Metadata::new()))
            .await;
        assert!(logged_in.is_ok(), "{logged_in:?}");
        for answer in flood {
            let refused = answer.await.unwrap().unwrap_err();
            assert!(
                ["invalid_credentials", "too_many_attempts"].contains(&refused.code()),
                "{refused:?}"
            );
        }
    }

    /// Users in memory that fail (as an unreachable database would) or hang on demand.
    #[derive(Clone, Default)]
    struct FlakyUsers {
        users: InMemoryUserStore,
        failing: Arc<std::sync::atomic::AtomicBool>,
        hanging: Arc<std::sync::atomic::AtomicBool>,
        /// Calls that began.
        calls: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl FlakyUsers {
        async fn check(&self) -> Result<(), StoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.hanging.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            if self.failing.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable {
                    backend: "postgres",
                    source: "connection refused".into(),
                });
            }
            Ok(())
        }
    }

    #[async_trait]
    impl UserStore for FlakyUsers {
        async fn create(&self, user: UserRecord) -> Result<(), CreateUserError> {
            self.check().await?;
            self.users.create(user).await
        }

        async fn by_email(&self, email: &str) -> Result<Option<UserRecord>, StoreError> {
            self.check().await?;
            self.users.by_email(email).await
        }

        async fn by_id(&self, id: Uuid) -> Result<Option<UserRecord>, StoreError> {
            self.check().await?;
            self.users.by_id(id).await
        }

        async fn log_out(&self, id: Uuid) -> Result<Option<u64>, StoreError> {
            self.check().await?;
            self.users.log_out(id).await
        }
    }

    /// Closes nothing elsewhere for its first `away` calls (its pub/sub is away), then does;
    /// counts the calls.
    #[derive(Default)]
    struct PubSubAway {
        away: usize,
        calls: std::sync::atomic::AtomicUsize,
        /// Calls that closed this instance's connections.
        closed_here: std::sync::atomic::AtomicUsize,
        /// Once set, the hub is gone: nothing is told from here.
        hub_gone: AtomicBool,
    }

    impl PubSubAway {
        /// Whether this call reaches the other instances.
        fn told(&self) -> Result<(), cqrs_core::BoxError> {
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            if call < self.away {
                Err("redis: connection refused".into())
            } else {
                Ok(())
            }
        }
    }

    #[async_trait]
    impl helpdesk_api::CloseSessions for PubSubAway {
        async fn close_everywhere(&self, _user: Uuid) -> helpdesk_api::ClosedSessions {
            self.closed_here.fetch_add(1, Ordering::SeqCst);
            helpdesk_api::ClosedSessions {
                here: 2,
                elsewhere: self.told(),
            }
        }

        async fn tell_others(&self, _user: Uuid) -> Option<Result<(), cqrs_core::BoxError>> {
            if self.hub_gone.load(Ordering::SeqCst) {
                return None;
            }
            Some(self.told())
        }
    }

    /// Waits (on the paused clock) until `sessions` was called `calls` times, then a while
    /// longer to see no more come.
    async fn called(sessions: &PubSubAway, calls: usize) {
        let within = tokio::time::Instant::now() + Duration::from_secs(120);
        while sessions.calls.load(Ordering::SeqCst) < calls {
            assert!(tokio::time::Instant::now() < within, "{calls} calls");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(sessions.calls.load(Ordering::SeqCst), calls);
    }

    /// A logout whose other instances cannot be told still ends the tokens, says the others
    /// were not told, and tells them in the background once it can; past its time it stops
    /// trying. A user who no longer exists is told so, and nothing is closed.
    #[tokio::test(start_paused = true)]
    async fn a_logout_the_other_instances_miss_still_ends_the_tokens() {
        let users = Arc::new(InMemoryUserStore::default());
        let user = UserRecord {
            id: Uuid::now_v7(),
            email: "a@example.com".into(),
            role: Role::Customer,
            display_name: None,
            password_hash: String::new(),
            created_at: chrono::Utc::now(),
            logouts: 0,
        };
        let id = user.id;
        users.create(user).await.unwrap();
        let handler = |away: usize| {
            let closer = Arc::new(PubSubAway {
                away,
                ..PubSubAway::default()
            });
            let sessions = helpdesk_api::LiveSessions::new();
            sessions.set(closer.clone());
            let handler = LogOutHandler {
                users: users.clone(),
                sessions,
                tell_others_for: Duration::from_secs(2),
            };
            (handler, closer)
        };
        let mut ctx = CommandContext::new(Metadata::new());
        let missed = LoggedOut {
            connections_closed_here: 2,
            others_told: false,
        };
        // Told at the fourth try, the third in the background.
        let (told_later, closer) = handler(3);
        let out = told_later.handle(LogOut { user: id }, &mut ctx).await;
        assert_eq!(out.unwrap(), missed);
        assert_eq!(users.by_id(id).await.unwrap().unwrap().logouts, 1);
        called(&closer, 4).await;
        assert_eq!(
            closer.closed_here.load(Ordering::SeqCst),
            1,
            "the retries tell the others only: the user may have logged in here since"
        );
        // Never told: tries again for two seconds (after 100 ms, then 200, 400, 800, 1,600),
        // then stops.
        let (never_told, closer) = handler(usize::MAX);
        let out = never_told.handle(LogOut { user: id }, &mut ctx).await;
        assert_eq!(out.unwrap(), missed);
        called(&closer, 6).await;
        // The hub gone: no more tries.
        let (hub_gone, closer) = handler(usize::MAX);
        let out = hub_gone.handle(LogOut { user: id }, &mut ctx).await;
        assert_eq!(out.unwrap(), missed);
        closer.hub_gone.store(true, Ordering::SeqCst);
        called(&closer, 1).await;

        let (gone, closer) = handler(0);
        let nobody = LogOut {
            user: Uuid::now_v7(),
        };
        let out = gone.handle(nobody, &mut ctx).await;
        assert_eq!(out.unwrap_err().kind(), ErrorKind::Unauthorized);
        assert_eq!(closer.calls.load(Ordering::SeqCst), 0, "nothing to close");
    }

    /// A throttle in memory whose `attempt` (`failing`) or `succeeded` (`failing_back`) fails
    /// on demand.
    struct FlakyThrottle {
        inner: InMemoryLoginThrottle,
        failing: Arc<std::sync::atomic::AtomicBool>,
        failing_back: Arc<std::sync::atomic::AtomicBool>,
    }

    #[async_trait]
    impl LoginThrottle for FlakyThrottle {
        async fn attempt(&self, key: &str) -> Result<Attempt, StoreError> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable {
                    backend: "postgres",
                    source: "connection refused".into(),
                });
            }
            self.inner.attempt(key).await
        }

        async fn take_back(&self, key: &str, counted: Counted) -> Result<(), StoreError> {
            if self.failing_back.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable {
                    backend: "postgres",
                    source: "connection reset".into(),
                });
            }
            self.inner.take_back(key, counted).await
        }
    }

    /// A handler of logins to `c@example.com` (password [`PASSWORD`]) with the given store,
    /// throttle and hashing bound.
    fn login_handler(
        users: &FlakyUsers,
        throttle: Arc<dyn LoginThrottle>,
        hashing: Hashing,
        clock: &Arc<ManualClock>,
    ) -> LogInHandler {
        LogInHandler {
            users: Arc::new(users.clone()),
            hashing,
            email_limit: by_address(throttle),
            address_limit: by_address(Arc::new(InMemoryLoginThrottle::new(
                clock.clone(),
                100,
                Duration::from_secs(60),
            ))),
            sign_ins: Arc::new(InMemoryLoginThrottle::new(
                clock.clone(),
                SIGN_INS_PER_WINDOW,
                Duration::from_secs(60),
            )),
            tokens: JwtTokens::new(&[7; 32], Duration::from_secs(60), clock.clone()).unwrap(),
            dummy_hash: Arc::new(dummy_hash().unwrap()),
            agents: AgentList::new(Arc::default(), None),
        }
    }

    async fn with_user_c(clock: &ManualClock) -> FlakyUsers {
        let users = FlakyUsers::default();
        users
            .users
            .create(UserRecord {
                id: Uuid::now_v7(),
                email: "c@example.com".into(),
                role: Role::Customer,
                display_name: None,
                password_hash: argon2_hash(PASSWORD.as_bytes()).unwrap(),
                created_at: clock.now(),
                logouts: 0,
            })
            .await
            .unwrap();
        users
    }

    fn log_in(password: &str, client: [u8; 4]) -> LogIn {
        LogIn {
            email: "c@example.com".into(),
            password: password.into(),
            client: Some(client.into()),
        }
    }

    /// A login of `c@example.com` with `password`, from 192.0.2.1.
    async fn try_log_in(handler: &LogInHandler, password: &str) -> Result<LoggedIn, HandlerError> {
        handler
            .handle(
                log_in(password, [192, 0, 2, 1]),
                &mut CommandContext::new(Metadata::new()),
            )
            .await
    }

    /// Whoever holds an account's password cannot keep the password hashing busy for ever:
    /// past the account's sign-ins for the window, its logins get 429 before any lookup or
    /// hashing. A wrong password uses none of them (it is a failure, counted as such), and
    /// the window passing gives them back. Right passwords were never counted.
    #[tokio::test]
    async fn an_account_gets_a_bounded_number_of_sign_ins_a_window() {
        cqrs_core::testing::with_timeout(Duration::from_secs(60), async {
            let clock = Arc::new(ManualClock::new());
            let users = with_user_c(&clock).await;
            let window = Duration::from_secs(60);
            let handler = LogInHandler {
                sign_ins: Arc::new(InMemoryLoginThrottle::new(clock.clone(), 3, window)),
                ..login_handler(
                    &users,
                    Arc::new(InMemoryLoginThrottle::new(clock.clone(), 100, window)),
                    Hashing::new(2, Duration::from_secs(5)),
                    &clock,
                )
            };
            let wrong = try_log_in(&handler, "not the password").await.unwrap_err();
            assert_eq!(wrong.code(), "invalid_credentials");
            for n in 0..3 {
                try_log_in(&handler, PASSWORD)
                    .await
                    .unwrap_or_else(|e| panic!("sign-in {n}: {e}"));
            }
            let looked_up = users.calls.load(Ordering::SeqCst);
            let refused = try_log_in(&handler, PASSWORD).await.unwrap_err();
            assert_eq!(refused.kind(), ErrorKind::RateLimited, "{refused}");
            assert_eq!(refused.code(), "too_many_attempts");
            assert!(refused.message().contains("this account"), "{refused}");
            assert!(
                refused
                    .details()
                    .is_some_and(|d| d["retry_after"].as_u64().is_some())
            );
            assert_eq!(
                users.calls.load(Ordering::SeqCst),
                looked_up,
                "refused before the lookup (and the hashing)"
            );
            clock.advance(window + Duration::from_secs(1));
            try_log_in(&handler, PASSWORD)
                .await
                .expect("the window passed: sign-ins again");
        })
        .await;
    }

    /// A login waiting on a slow store holds no permit to hash: with a single permit, another
    /// client's login goes through meanwhile instead of hearing `busy` (the permit was taken
    /// before the throttles and the lookup, and held through them).
    #[tokio::test]
    async fn a_login_waiting_on_the_store_holds_no_permit_to_hash() {
        cqrs_core::testing::with_timeout(Duration::from_secs(30), async {
            let clock = Arc::new(ManualClock::new());
            let users = with_user_c(&clock).await;
            let throttle = Arc::new(InMemoryLoginThrottle::new(
                clock.clone(),
                100,
                Duration::from_secs(60),
            ));
            let handler = Arc::new(login_handler(
                &users,
                throttle,
                Hashing::new(1, Duration::from_millis(200)),
                &clock,
            ));
            users.hanging.store(true, Ordering::SeqCst);
            let stuck = tokio::spawn({
                let handler = handler.clone();
                async move {
                    handler
                        .handle(
                            log_in(PASSWORD, [192, 0, 2, 1]),
                            &mut CommandContext::new(Metadata::new()),
                        )
                        .await
                }
            });
            while users.calls.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
            users.hanging.store(false, Ordering::SeqCst);
            handler
                .handle(
                    log_in(PASSWORD, [192, 0, 2, 2]),
                    &mut CommandContext::new(Metadata::new()),
                )
                .await
                .expect("the other client's login is not refused as busy");
            stuck.abort();
        })
        .await;
    }

    /// The right password is let in even when its count cannot be taken back (it was refused
    /// with 503, and the count stayed as a failure).
    #[tokio::test]
    async fn a_right_password_is_let_in_when_its_count_cannot_be_taken_back() {
        cqrs_core::testing::with_timeout(Duration::from_secs(30), async {
            let clock = Arc::new(ManualClock::new());
            let users = with_user_c(&clock).await;
            let failing_back = Arc::new(std::sync::atomic::AtomicBool::new(true));
            let handler = login_handler(
                &users,
                Arc::new(FlakyThrottle {
                    inner: InMemoryLoginThrottle::new(clock.clone(), 5, Duration::from_secs(60)),
                    failing: Arc::default(),
                    failing_back,
                }),
                Hashing::new(2, Duration::from_secs(5)),
                &clock,
            );
            let logged_in = handler
                .handle(
                    log_in(PASSWORD, [192, 0, 2, 3]),
                    &mut CommandContext::new(Metadata::new()),
                )
                .await
                .expect("the right password");
            assert!(!logged_in.token.is_empty());
        })
        .await;
    }

    /// Logins the server could not finish (the user store failed, the throttle failed after
    /// the address was counted, the login was dropped part-way) count as no failure, for the
    /// email and address or for the address: with a limit of one, a single one counted would
    /// block the correct password that follows each.
    #[tokio::test]
    async fn logins_the_server_could_not_finish_are_not_failures() {
        cqrs_core::testing::with_timeout(Duration::from_secs(30), async {
            let clock = Arc::new(ManualClock::new());
            let users = with_user_c(&clock).await;
            let throttle_failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let one_failure =
                || InMemoryLoginThrottle::new(clock.clone(), 1, Duration::from_secs(60));
            let handler = LogInHandler {
                address_limit: by_address(Arc::new(one_failure())),
                ..login_handler(
                    &users,
                    Arc::new(FlakyThrottle {
                        inner: one_failure(),
                        failing: throttle_failing.clone(),
                        failing_back: Arc::default(),
                    }),
                    Hashing::new(2, Duration::from_secs(5)),
                    &clock,
                )
            };
            let login = |password: &str| {
                let login = log_in(password, [192, 0, 2, 9]);
                let handler = &handler;
                async move {
                    handler
                        .handle(login, &mut CommandContext::new(Metadata::new()))
                        .await
                }
            };

            users.failing.store(true, Ordering::SeqCst);
            let failed = login(PASSWORD).await.unwrap_err();
            assert_eq!(failed.kind(), ErrorKind::Unavailable, "{failed:?}");
            users.failing.store(false, Ordering::SeqCst);
            login(PASSWORD).await.expect("a store error is no failure");

            throttle_failing.store(true, Ordering::SeqCst);
            let failed = login(PASSWORD).await.unwrap_err();
            assert_eq!(failed.kind(), ErrorKind::Unavailable, "{failed:?}");
            throttle_failing.store(false, Ordering::SeqCst);
            login(PASSWORD)
                .await
                .expect("the address's count is taken back when the pair's fails");

            users.hanging.store(true, Ordering::SeqCst);
            let dropped = tokio::time::timeout(Duration::from_millis(50), login(PASSWORD)).await;
            assert!(dropped.is_err(), "the login hangs until it is dropped");
            users.hanging.store(false, Ordering::SeqCst);
            // The dropped login's counts are taken back on a task of their own.
            loop {
                match login(PASSWORD).await {
                    Ok(_) => break,
                    Err(e) if e.code() == "too_many_attempts" => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => panic!("{e:?}"),
                }
            }

            // A wrong password still counts.
            let wrong = login("a wrong password").await.unwrap_err();
            assert_eq!(wrong.code(), "invalid_credentials");
            let blocked = login(PASSWORD).await.unwrap_err();
            assert_eq!(blocked.code(), "too_many_attempts", "{blocked:?}");
        })
        .await;
    }

    /// Runs `cmd` through `handler` with fresh metadata.
    async fn register_with(
        handler: &RegisterHandler,
        cmd: RegisterUser,
    ) -> Result<UserProfile, HandlerError> {
        handler
            .handle(cmd, &mut CommandContext::new(Metadata::new()))
            .await
    }

    fn register(email: &str, code: &str, client: [u8; 4]) -> RegisterUser {
        RegisterUser {
            email: email.into(),
            password: PASSWORD.into(),
            display_name: None,
            agent_code: Some(code.into()),
            client: Some(client.into()),
        }
    }

    /// Wrong agent codes from one address are counted, before the code is compared: past the
    /// limit that address gets 429 `too_many_attempts` with `retry_after`, even with the right
    /// code; right codes do not count, and another address is not affected.
    #[tokio::test]
    async fn wrong_agent_codes_from_one_address_are_throttled() {
        let clock = Arc::new(ManualClock::new());
        const CODE: &str = "the-right-agent-code";
        let emails = [
            "agent@example.com",
            "agent2@example.com",
            "agent3@example.com",
        ];
        let handler = RegisterHandler {
            users: Arc::new(InMemoryUserStore::default()),
            hashing: Hashing::new(4, Duration::from_secs(30)),
            agents: AgentList::new(
                Arc::new(emails.iter().map(|e| (*e).to_owned()).collect()),
                Some(crate::AgentCode::new(CODE)),
            ),
            code_limit: by_address(Arc::new(InMemoryLoginThrottle::new(
                clock.clone(),
                3,
                Duration::from_secs(60),
            ))),
            register_limit: by_address(Arc::new(InMemoryLoginThrottle::new(
                clock.clone(),
                100,
                Duration::from_secs(60),
            ))),
            clock: clock.clone(),
        };
        let handle = |cmd| register_with(&handler, cmd);
        let (a, b) = ([192, 0, 2, 1], [192, 0, 2, 2]);
        // Right codes, before and between the wrong ones, are not failures.
        let registered = handle(register(emails[0], CODE, a)).await.unwrap();
        assert_eq!(registered.role, Role::Agent);
        for _ in 0..3 {
            let taken = handle(register(emails[0], CODE, a)).await.unwrap_err();
            assert_eq!(taken.code(), "email_taken", "the code was right");
            let refused = handle(register(emails[1], "a-wrong-code", a))
                .await
                .unwrap_err();
            assert_eq!(refused.code(), "agent_code_required");
        }
        let blocked = handle(register(emails[1], CODE, a)).await.unwrap_err();
        assert_eq!(blocked.kind(), ErrorKind::RateLimited, "{blocked:?}");
        assert_eq!(blocked.code(), "too_many_attempts");
        let retry_after = blocked.details().unwrap()["retry_after"].as_u64().unwrap();
        assert!((1..=60).contains(&retry_after), "{retry_after}");
        let other = handle(register(emails[1], CODE, b)).await.unwrap();
        assert_eq!(other.role, Role::Agent, "another address");
        clock.advance(Duration::from_secs(61));
        let later = handle(register(emails[2], CODE, a)).await.unwrap();
        assert_eq!(later.role, Role::Agent, "the window has passed");
    }

    /// A right agent code registers its agent even when the throttle cannot take its count
    /// back (the store away for that one step), as a right password logs in.
    #[tokio::test]
    async fn a_right_agent_code_registers_when_its_count_cannot_be_taken_back() {
        const CODE: &str = "the-right-agent-code";
        let clock = Arc::new(ManualClock::new());
        let failing_back = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let handler = RegisterHandler {
            agents: AgentList::new(
                Arc::new(["agent@example.com".to_owned()].into_iter().collect()),
                Some(crate::AgentCode::new(CODE)),
            ),
            code_limit: by_address(Arc::new(FlakyThrottle {
                inner: InMemoryLoginThrottle::new(clock.clone(), 3, Duration::from_secs(60)),
                failing: Arc::default(),
                failing_back,
            })),
            ..registrations(Arc::new(InMemoryUserStore::default()), &clock, 100)
        };
        let registered = register_with(
            &handler,
            register("agent@example.com", CODE, [192, 0, 2, 1]),
        )
        .await
        .unwrap();
        assert_eq!(registered.role, Role::Agent);
    }

    /// Customer registrations on `users`, at most `limit` from one address a minute.
    fn registrations(
        users: Arc<dyn UserStore>,
        clock: &Arc<ManualClock>,
        limit: u32,
    ) -> RegisterHandler {
        let throttle = |limit| {
            Arc::new(InMemoryLoginThrottle::new(
                clock.clone(),
                limit,
                Duration::from_secs(60),
            ))
        };
        RegisterHandler {
            users,
            hashing: Hashing::new(4, Duration::from_secs(30)),
            agents: AgentList::new(Arc::default(), None),
            code_limit: by_address(throttle(100)),
            register_limit: by_address(throttle(limit)),
            clock: clock.clone(),
        }
    }

    fn v6(ip: &str) -> Option<IpAddr> {
        Some(ip.parse().expect("an IPv6 address"))
    }

    /// A throttle of `limit` a minute on `clock`.
    fn limit_of(clock: &Arc<ManualClock>, limit: u32) -> Arc<InMemoryLoginThrottle> {
        Arc::new(InMemoryLoginThrottle::new(
            clock.clone(),
            limit,
            Duration::from_secs(60),
        ))
    }

    /// One IPv6 site (a /48) spreading failed logins over its /64s is blocked at the site's
    /// budget, though each /64 is under its own; the refused login's count of its /64 is taken
    /// back (a refusal is no attempt); another site is not affected.
    #[tokio::test]
    async fn one_ipv6_site_cannot_spread_failed_logins_over_its_64s() {
        site_spreading_guesses_is_blocked(Grain::Address).await;
    }

    /// Likewise for one account (`{email}|{site}`), though each /64 is under its own budget for
    /// the account and the address budgets are far off; other accounts are not affected. (Only
    /// the /48's address budget, for every email together, stopped it.)
    #[tokio::test]
    async fn one_ipv6_site_cannot_spread_guesses_at_one_account_over_its_64s() {
        site_spreading_guesses_is_blocked(Grain::Email).await;
    }

    /// Which limit a test sets at 2 a /64 and 3 a /48, the other far off.
    #[derive(Clone, Copy, PartialEq)]
    enum Grain {
        /// Every email's failures from an address: `address|...` keys.
        Address,
        /// One email's: `{email}|...` keys.
        Email,
    }

    /// Guesses at `c@example.com` from three /64s of one /48 are refused as wrong, the fourth
    /// as too many, with its /64's count taken back; then a guess the `grain`'s limit does not
    /// count with them (another /48, or another email) is refused as wrong only.
    async fn site_spreading_guesses_is_blocked(grain: Grain) {
        let clock = Arc::new(ManualClock::new());
        let users = with_user_c(&clock).await;
        let client = limit_of(&clock, 2);
        let limit = AddressLimit {
            client: client.clone(),
            site: limit_of(&clock, 3),
        };
        let others = login_handler(
            &users,
            limit_of(&clock, 100),
            Hashing::new(4, Duration::from_secs(30)),
            &clock,
        );
        let handler = match grain {
            Grain::Address => LogInHandler {
                address_limit: limit,
                ..others
            },
            Grain::Email => LogInHandler {
                email_limit: limit,
                ..others
            },
        };
        let guess = |email: &str, ip: &str| LogIn {
            email: email.into(),
            password: "a guess".into(),
            client: v6(ip),
        };
        let handle = |login: LogIn| {
            let handler = &handler;
            async move {
                handler
                    .handle(login, &mut CommandContext::new(Metadata::new()))
                    .await
            }
        };
        for i in 1..=3 {
            let refused = handle(guess("c@example.com", &format!("2001:db8:1:{i}::1")))
                .await
                .unwrap_err();
            assert_eq!(refused.code(), "invalid_credentials", "{refused:?}");
        }
        let refused = handle(guess("c@example.com", "2001:db8:1:4::1"))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), "too_many_attempts", "{refused:?}");
        let key = match grain {
            Grain::Address => "address|2001:db8:1:4::/64",
            Grain::Email => "c@example.com|2001:db8:1:4::/64",
        };
        for _ in 0..2 {
            assert_eq!(
                client.attempt(key).await.unwrap().retry_after(),
                None,
                "the refused login's count of its /64 was taken back"
            );
        }
        let elsewhere = match grain {
            Grain::Address => guess("c@example.com", "2001:db8:2:1::1"),
            Grain::Email => guess("d@example.com", "2001:db8:1:5::1"),
        };
        let elsewhere = handle(elsewhere).await.unwrap_err();
        assert_eq!(elsewhere.code(), "invalid_credentials", "{elsewhere:?}");
    }

    /// Likewise registrations: one IPv6 site spreading them over its /64s gets 429 past the
    /// site's budget, the refused one's /64 count is taken back, and another site registers.
    #[tokio::test]
    async fn one_ipv6_site_cannot_spread_registrations_over_its_64s() {
        let clock = Arc::new(ManualClock::new());
        let client = limit_of(&clock, 1);
        let handler = RegisterHandler {
            register_limit: AddressLimit {
                client: client.clone(),
                site: limit_of(&clock, 2),
            },
            ..registrations(Arc::new(InMemoryUserStore::default()), &clock, 100)
        };
        let from = |n: u32, ip: &str| RegisterUser {
            email: format!("user{n}@example.com"),
            password: PASSWORD.into(),
            display_name: None,
            agent_code: None,
            client: v6(ip),
        };
        register_with(&handler, from(1, "2001:db8:1:1::1"))
            .await
            .unwrap();
        register_with(&handler, from(2, "2001:db8:1:2::1"))
            .await
            .unwrap();
        let refused = register_with(&handler, from(3, "2001:db8:1:3::1"))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), "too_many_attempts", "{refused:?}");
        assert_eq!(
            client
                .attempt("register|2001:db8:1:3::/64")
                .await
                .unwrap()
                .retry_after(),
            None,
            "the refused registration's count of its /64 was taken back"
        );
        register_with(&handler, from(4, "2001:db8:2:1::1"))
            .await
            .unwrap();
    }

    /// A throttle whose attempts never answer (its store waits on a lock held elsewhere),
    /// counting them.
    #[derive(Default)]
    struct StuckThrottle(std::sync::atomic::AtomicUsize);

    #[async_trait]
    impl LoginThrottle for StuckThrottle {
        async fn attempt(&self, _key: &str) -> Result<Attempt, StoreError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            std::future::pending().await
        }

        async fn take_back(&self, _key: &str, _counted: Counted) -> Result<(), StoreError> {
            Ok(())
        }
    }

    /// One address's registrations beyond its share of hashing turns are refused at once,
    /// before they reach the throttle's store: each one there holds a pooled connection (on
    /// Postgres, waiting on the address's lock), so a burst from one address would otherwise
    /// hold the pool that every other client needs.
    #[tokio::test]
    async fn one_address_cannot_queue_more_registrations_than_its_share() {
        let clock = Arc::new(ManualClock::new());
        let stuck = Arc::new(StuckThrottle::default());
        let handler = Arc::new(RegisterHandler {
            register_limit: by_address(stuck.clone()),
            ..registrations(Arc::new(InMemoryUserStore::default()), &clock, 3)
        });
        let register = |i: usize| {
            let handler = handler.clone();
            tokio::spawn(async move {
                let cmd = RegisterUser {
                    email: format!("user{i}@example.com"),
                    password: "a long enough password".into(),
                    display_name: None,
                    agent_code: None,
                    client: Some([192, 0, 2, 9].into()),
                };
                handler
                    .handle(cmd, &mut CommandContext::new(Metadata::new()))
                    .await
            })
        };
        // `Hashing::new(4, ..)` gives each address two turns: both wait in the throttle.
        let waiting: Vec<_> = (0..2).map(register).collect();
        cqrs_core::testing::eventually(Duration::from_secs(10), "two reach the throttle", || {
            let stuck = stuck.clone();
            async move { (stuck.0.load(Ordering::SeqCst) == 2).then_some(()) }
        })
        .await;
        for i in 2..6 {
            let refused = cqrs_core::testing::with_timeout(Duration::from_secs(10), register(i))
                .await
                .unwrap()
                .unwrap_err();
            assert_eq!(refused.code(), "too_many_attempts", "{refused:?}");
        }
        assert_eq!(
            stuck.0.load(Ordering::SeqCst),
            2,
            "a refused registration reached the throttle"
        );
        for w in waiting {
            w.abort();
        }
    }

    /// Customer registrations ([`registrations`], `limit` a minute) with a single turn to hash,
    /// waited for at most `wait`, and that turn, held by another client.
    async fn one_turn_held_elsewhere(
        clock: &Arc<ManualClock>,
        limit: u32,
        wait: Duration,
    ) -> (RegisterHandler, crate::hashing::Turn) {
        let handler = RegisterHandler {
            hashing: Hashing::new(1, wait),
            ..registrations(Arc::new(InMemoryUserStore::default()), clock, limit)
        };
        let held = handler
            .hashing
            .turn(Some([198, 51, 100, 1].into()))
            .await
            .unwrap();
        (handler, held)
    }

    /// While every hashing slot is taken, a registration of a free email hears `busy` and
    /// its count stays, as a taken email's 409 does: a full server must not tell which emails
    /// are free at no cost.
    #[tokio::test]
    async fn a_busy_registration_of_a_free_email_is_counted() {
        let clock = Arc::new(ManualClock::new());
        let (handler, held) = one_turn_held_elsewhere(&clock, 2, Duration::from_millis(10)).await;
        let a = [192, 0, 2, 1];
        for email in ["free1@example.com", "free2@example.com"] {
            let busy = register_with(&handler, register(email, "", a))
                .await
                .unwrap_err();
            assert_eq!(busy.code(), "busy", "{busy:?}");
        }
        let blocked = register_with(&handler, register("free3@example.com", "", a))
            .await
            .unwrap_err();
        assert_eq!(blocked.code(), "too_many_attempts", "{blocked:?}");
        drop(held);
    }

    /// A registration dropped once the lookup found its email free (the client hung up while
    /// the password was being hashed) stays counted: a taken email's 409 comes before that,
    /// so hanging up when no 409 came in time would tell which emails are free at no cost.
    #[tokio::test]
    async fn a_registration_dropped_after_finding_its_email_free_is_counted() {
        let clock = Arc::new(ManualClock::new());
        // The registration waits for the only turn to hash.
        let (handler, held) = one_turn_held_elsewhere(&clock, 1, Duration::from_secs(30)).await;
        let a = [192, 0, 2, 1];
        let hung_up = tokio::time::timeout(
            Duration::from_millis(50),
            register_with(&handler, register("free1@example.com", "", a)),
        )
        .await;
        assert!(hung_up.is_err(), "it waits to hash until it is dropped");
        drop(held);
        // A count taken back would be on a task of its own: wait until no task is left.
        let runtime = tokio::runtime::Handle::current().metrics();
        cqrs_core::testing::eventually(Duration::from_secs(5), "no task left", || async {
            (runtime.num_alive_tasks() == 0).then_some(())
        })
        .await;
        let blocked = register_with(&handler, register("free2@example.com", "", a))
            .await
            .unwrap_err();
        assert_eq!(blocked.code(), "too_many_attempts", "{blocked:?}");
    }

    /// Registrations from one address are counted, taken emails and new accounts alike: past
    /// the limit that address gets 429 `too_many_attempts`, even for a new email, so it can
    /// neither make accounts without end nor learn which emails have one at database speed;
    /// another address is not affected, and the window passes.
    #[tokio::test]
    async fn registrations_from_one_address_are_throttled() {
        let clock = Arc::new(ManualClock::new());
        let handler = registrations(Arc::new(InMemoryUserStore::default()), &clock, 3);
        let handle =
            |email: &str, client: [u8; 4]| register_with(&handler, register(email, "", client));
        let (a, b) = ([192, 0, 2, 1], [192, 0, 2, 2]);
        handle("one@example.com", a).await.unwrap();
        for _ in 0..2 {
            let taken = handle("one@example.com", a).await.unwrap_err();
            assert_eq!(taken.code(), "email_taken");
        }
        let blocked = handle("two@example.com", a).await.unwrap_err();
        assert_eq!(blocked.code(), "too_many_attempts", "{blocked:?}");
        assert_eq!(blocked.kind(), ErrorKind::RateLimited);
        handle("two@example.com", b).await.expect("another address");
        clock.advance(Duration::from_secs(61));
        handle("three@example.com", a)
            .await
            .expect("the window has passed");
    }

    /// What tells whether an email is on the agent list (a code for an email that is not, no
    /// code for one that is) is counted like any registration: past the limit, 429, so the
    /// list cannot be read off one address at database speed.
    #[tokio::test]
    async fn answers_about_the_agent_list_are_counted_registrations() {
        let clock = Arc::new(ManualClock::new());
        let handler = RegisterHandler {
            agents: AgentList::new(
                Arc::new(["agent@example.com".to_owned()].into_iter().collect()),
                Some(crate::AgentCode::new("the-right-agent-code")),
            ),
            ..registrations(Arc::new(InMemoryUserStore::default()), &clock, 3)
        };
        let handle = |email: &str, code: &str| {
            register_with(&handler, register(email, code, [192, 0, 2, 3]))
        };
        let unlisted = handle("someone@example.com", "a-guess").await.unwrap_err();
        assert_eq!(unlisted.code(), "validation_failed", "{unlisted:?}");
        let listed = handle("agent@example.com", "").await.unwrap_err();
        assert_eq!(listed.code(), "agent_code_required", "{listed:?}");
        let listed = handle("agent@example.com", "").await.unwrap_err();
        assert_eq!(listed.code(), "agent_code_required", "{listed:?}");
        for email in ["other@example.com", "agent@example.com"] {
            let blocked = handle(email, "a-guess").await.unwrap_err();
            assert_eq!(blocked.code(), "too_many_attempts", "{email}: {blocked:?}");
        }
    }

    /// Once an address spent its wrong agent codes, a listed email with a code gets 429 from
    /// the code's throttle: that answer tells the email is listed, so it is a counted
    /// registration too, not one taken back as the server's failure.
    #[tokio::test]
    async fn a_refusal_by_the_agent_code_throttle_is_a_counted_registration() {
        let clock = Arc::new(ManualClock::new());
        let throttle = |limit| {
            Arc::new(InMemoryLoginThrottle::new(
                clock.clone(),
                limit,
                Duration::from_secs(60),
            ))
        };
        let handler = RegisterHandler {
            agents: AgentList::new(
                Arc::new(["agent@example.com".to_owned()].into_iter().collect()),
                Some(crate::AgentCode::new("the-right-agent-code")),
            ),
            code_limit: by_address(throttle(1)),
            ..registrations(Arc::new(InMemoryUserStore::default()), &clock, 3)
        };
        let handle = |email: &str, code: &str| {
            register_with(&handler, register(email, code, [192, 0, 2, 5]))
        };
        // The code budget spent: one wrong code.
        let wrong = handle("agent@example.com", "a-guess").await.unwrap_err();
        assert_eq!(wrong.code(), "agent_code_required", "{wrong:?}");
        // Refused by the code's throttle: 429, and counted.
        for _ in 0..2 {
            let refused = handle("agent@example.com", "a-guess").await.unwrap_err();
            assert_eq!(refused.code(), "too_many_attempts", "{refused:?}");
        }
        // Three registrations counted: the address's budget is spent, for any email.
        let blocked = handle("someone@example.com", "").await.unwrap_err();
        assert_eq!(blocked.code(), "too_many_attempts", "{blocked:?}");
        assert!(
            blocked.message().contains("registrations"),
            "the registration throttle's refusal: {blocked:?}"
        );
    }

    /// A display name others may see has something visible and nothing that reorders the
    /// text after it.
    #[tokio::test]
    async fn a_display_name_without_anything_visible_or_with_bidi_controls_is_refused() {
        let clock = Arc::new(ManualClock::new());
        let handler = registrations(Arc::new(InMemoryUserStore::default()), &clock, 100);
        for (i, name) in [
            "Ada\u{202E}lovelace",
            "\u{200B}\u{200B}",
            "\u{2066}x\u{2069}",
        ]
        .into_iter()
        .enumerate()
        {
            let cmd = RegisterUser {
                display_name: Some(name.into()),
                ..register(&format!("user{i}@example.com"), "", [192, 0, 2, 4])
            };
            let refused = register_with(&handler, cmd).await.unwrap_err();
            assert_eq!(refused.code(), "validation_failed", "{name:?}: {refused:?}");
            assert_eq!(
                refused.details().and_then(|d| d["field"].as_str()),
                Some("display_name"),
                "{name:?}: {refused:?}"
            );
        }
        let cmd = RegisterUser {
            display_name: Some("Ada Lovelace".into()),
            ..register("ada@example.com", "", [192, 0, 2, 4])
        };
        let user = register_with(&handler, cmd).await.unwrap();
        assert_eq!(user.display_name.as_deref(), Some("Ada Lovelace"));
    }

    /// A registration the server could not finish (the user store away, or so slow that the
    /// registration was dropped: a time-out, a client gone) uses up none of the address's
    /// registrations: an outage does not lock clients out afterwards.
    #[tokio::test]
    async fn registrations_the_server_could_not_finish_do_not_count() {
        let clock = Arc::new(ManualClock::new());
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let hanging = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let users = Arc::new(FlakyUsers {
            users: InMemoryUserStore::default(),
            failing: failing.clone(),
            hanging: hanging.clone(),
            calls: Arc::default(),
        });
        let handler = registrations(users, &clock, 3);
        let handle = |email: &str| register_with(&handler, register(email, "", [192, 0, 2, 1]));
        for _ in 0..5 {
            let failed = handle("one@example.com").await.unwrap_err();
            assert_eq!(failed.kind(), ErrorKind::Unavailable, "{failed:?}");
        }
        failing.store(false, std::sync::atomic::Ordering::SeqCst);
        hanging.store(true, std::sync::atomic::Ordering::SeqCst);
        // As many as the limit: counted, they would block the next one.
        for _ in 0..3 {
            let dropped =
                tokio::time::timeout(Duration::from_millis(20), handle("one@example.com")).await;
            assert!(
                dropped.is_err(),
                "the registration hangs until it is dropped"
            );
        }
        hanging.store(false, std::sync::atomic::Ordering::SeqCst);
        // The dropped registrations' counts are taken back on tasks of their own.
        cqrs_core::testing::with_timeout(Duration::from_secs(10), async {
            loop {
                match handle("one@example.com").await {
                    Ok(_) => break,
                    Err(e) if e.code() == "too_many_attempts" => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => panic!("the failed registrations were counted: {e:?}"),
                }
            }
        })
        .await;
    }

    /// Users whose `create` fails as unavailable, and whose `by_email` after that waits until
    /// `released`, saying when it began (`waiting`): a store as slow as it is away.
    #[derive(Default)]
    struct FailsThenWaits {
        users: InMemoryUserStore,
        failed: AtomicBool,
        waiting: tokio::sync::Notify,
        released: tokio::sync::Notify,
        /// Registrations go through once set.
        working: AtomicBool,
    }

    #[async_trait]
    impl UserStore for FailsThenWaits {
        async fn create(&self, user: UserRecord) -> Result<(), CreateUserError> {
            if self.working.load(Ordering::SeqCst) {
                return self.users.create(user).await;
            }
            self.failed.store(true, Ordering::SeqCst);
            Err(StoreError::Unavailable {
                backend: "postgres",
                source: "connection refused".into(),
            }
            .into())
        }

        async fn by_email(&self, email: &str) -> Result<Option<UserRecord>, StoreError> {
            if self.failed.swap(false, Ordering::SeqCst) {
                let released = self.released.notified();
                self.waiting.notify_one();
                released.await;
            }
            self.users.by_email(email).await
        }

        async fn by_id(&self, id: Uuid) -> Result<Option<UserRecord>, StoreError> {
            self.users.by_id(id).await
        }

        async fn log_out(&self, id: Uuid) -> Result<Option<u64>, StoreError> {
            self.users.log_out(id).await
        }
    }

    /// A registration whose insert failed (the store away) and which is dropped while it
    /// takes its count back (its lookup as slow as the store that failed it, until the
    /// request's time budget ran out) still takes it back: an outage does not lock the
    /// address out of registering.
    #[tokio::test]
    async fn a_registration_dropped_while_it_takes_its_count_back_still_takes_it_back() {
        let clock = Arc::new(ManualClock::new());
        let users = Arc::new(FailsThenWaits::default());
        let handler = registrations(users.clone(), &clock, 2);
        let a = [192, 0, 2, 1];
        for _ in 0..2 {
            tokio::select! {
                registered = register_with(&handler, register("one@example.com", "", a)) => {
                    panic!("the registration finished: {registered:?}")
                }
                // Dropped here, its take-back's lookup waiting.
                () = users.waiting.notified() => {}
            }
            users.released.notify_one();
        }
        let runtime = tokio::runtime::Handle::current().metrics();
        cqrs_core::testing::eventually(Duration::from_secs(5), "no task left", || async {
            (runtime.num_alive_tasks() == 0).then_some(())
        })
        .await;
        users.working.store(true, Ordering::SeqCst);
        register_with(&handler, register("one@example.com", "", a))
            .await
            .expect("the dropped registrations' counts were taken back");
    }

    /// A registration dropped before its lookup answered stored nothing, and its count goes
    /// back whether the email has an account or not: a lookup then, keeping the count for a
    /// taken email, would tell a client that hangs up which emails have one.
    #[tokio::test]
    async fn a_registration_dropped_before_its_lookup_is_taken_back_for_a_taken_email_too() {
        let clock = Arc::new(ManualClock::new());
        let hanging = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let users = Arc::new(FlakyUsers {
            users: InMemoryUserStore::default(),
            failing: Arc::default(),
            hanging: hanging.clone(),
            calls: calls.clone(),
        });
        let handler = registrations(users, &clock, 2);
        // Registered from another address, so this one's counts start at none.
        register_with(&handler, register("taken@example.com", "", [192, 0, 2, 9]))
            .await
            .unwrap();
        let a = [192, 0, 2, 1];
        hanging.store(true, Ordering::SeqCst);
        for _ in 0..2 {
            let began = calls.load(Ordering::SeqCst);
            let dropped = tokio::time::timeout(
                Duration::from_millis(20),
                register_with(&handler, register("taken@example.com", "", a)),
            )
            .await;
            assert!(dropped.is_err(), "the registration hangs in its lookup");
            assert!(
                calls.load(Ordering::SeqCst) > began,
                "it reached its lookup"
            );
        }
        hanging.store(false, Ordering::SeqCst);
        // The counts go back on tasks of their own: wait until none is left.
        let runtime = tokio::runtime::Handle::current().metrics();
        cqrs_core::testing::eventually(Duration::from_secs(5), "no task left", || async {
            (runtime.num_alive_tasks() == 0).then_some(())
        })
        .await;
        let taken = register_with(&handler, register("taken@example.com", "", a))
            .await
            .unwrap_err();
        assert_eq!(
            taken.code(),
            "email_taken",
            "the dropped registrations of a taken email stayed counted: {taken:?}"
        );
    }
}

#[cfg(test)]
mod registration_count_tests {
    use super::tests::by_address;
    use super::*;
    use crate::users::InMemoryUserStore;
    use cqrs_core::Metadata;
    use cqrs_core::clock::ManualClock;
    use cqrs_core::ports::StoreError;
    use std::time::Duration;

    /// Stores the user, then fails as if its answer was lost (the connection reset after the
    /// insert committed).
    #[derive(Default)]
    struct StoresThenFails {
        users: InMemoryUserStore,
    }

    #[async_trait]
    impl UserStore for StoresThenFails {
        async fn create(&self, user: UserRecord) -> Result<(), CreateUserError> {
            self.users.create(user).await?;
            Err(CreateUserError::Store(StoreError::Unavailable {
                backend: "postgres",
                source: "the connection reset before the answer".into(),
            }))
        }

        async fn by_email(&self, email: &str) -> Result<Option<UserRecord>, StoreError> {
            self.users.by_email(email).await
        }

        async fn by_id(&self, id: Uuid) -> Result<Option<UserRecord>, StoreError> {
            self.users.by_id(id).await
        }

        async fn log_out(&self, id: Uuid) -> Result<Option<u64>, StoreError> {
            self.users.log_out(id).await
        }
    }

    /// A registration that fails as the server's (its store away) after its account was
    /// stored all the same stays counted: the count is taken back only when no account was
    /// made, so a lost answer makes no uncounted accounts.
    #[tokio::test]
    async fn a_registration_whose_answer_was_lost_after_its_account_was_stored_stays_counted() {
        let clock = Arc::new(ManualClock::new());
        let users = Arc::new(StoresThenFails::default());
        let throttle = |limit| {
            Arc::new(crate::throttle::InMemoryLoginThrottle::new(
                clock.clone(),
                limit,
                Duration::from_secs(60),
            ))
        };
        let handler = RegisterHandler {
            users: users.clone(),
            hashing: Hashing::new(4, Duration::from_secs(30)),
            agents: AgentList::new(Arc::default(), None),
            code_limit: by_address(throttle(100)),
            register_limit: by_address(throttle(1)),
            clock: clock.clone(),
        };
        let register = |email: &str| RegisterUser {
            email: email.into(),
            password: "a long enough password".into(),
            display_name: None,
            agent_code: None,
            client: Some([192, 0, 2, 7].into()),
        };
        let mut ctx = CommandContext::new(Metadata::new());
        let failed = handler
            .handle(register("one@example.com"), &mut ctx)
            .await
            .unwrap_err();
        assert_eq!(failed.kind(), ErrorKind::Unavailable, "{failed:?}");
        assert!(
            users
                .users
                .by_email("one@example.com")
                .await
                .unwrap()
                .is_some(),
            "the account was stored"
        );
        // Counted, it blocks the next one; taken back, the next one would be stored too.
        let mut ctx = CommandContext::new(Metadata::new());
        let next = handler
            .handle(register("two@example.com"), &mut ctx)
            .await
            .unwrap_err();
        assert_eq!(next.code(), "too_many_attempts", "{next:?}");
    }
}
