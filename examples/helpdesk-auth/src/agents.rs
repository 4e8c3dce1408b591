//! Who is an agent: an email on the agent list, registered with the agent code.

use helpdesk_api::Role;
use std::collections::HashSet;
use std::sync::Arc;

/// The secret an agent sends (`agent_code`) to register an email of the agent list: the list
/// alone proves nothing, as anyone may register any address. The gateway provides it as a
/// resource (`HELPDESK_AGENT_CODE`); the auth plugin refuses to install with agent emails but
/// no code. Its `Debug` never shows it.
///
/// ```
/// let code = helpdesk_auth::AgentCode::new("sixteen-bytes-or-more");
/// assert!(code.matches("sixteen-bytes-or-more"));
/// assert!(!code.matches("sixteen-bytes-or-less"));
/// assert!(!format!("{code:?}").contains("sixteen"));
/// ```
#[derive(Clone)]
pub struct AgentCode(Arc<[u8]>);

impl std::fmt::Debug for AgentCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentCode(<redacted>)")
    }
}

impl AgentCode {
    /// The code, as the agents will send it.
    pub fn new(code: impl AsRef<str>) -> Self {
        Self(Arc::from(code.as_ref().as_bytes()))
    }

    /// Whether `given` is the code. Every byte of the code is compared whatever `given` holds
    /// and however long it is, so the time taken tells nothing about how much of it was right.
    pub fn matches(&self, given: &str) -> bool {
        helpdesk_api::same_secret(&self.0, given.as_bytes())
    }
}

/// The agent list (`--agent-emails`, keyed as accounts are) and the code that proves a registration of
/// one of its emails. An email decides the role twice: at registration (only a listed email,
/// with the code, becomes an agent), and whenever a stored user is read to authenticate or
/// authorize (a stored agent whose email left the list is a customer from the next request on).
#[derive(Clone, Debug)]
pub struct AgentList {
    emails: Arc<HashSet<String>>,
    code: Option<AgentCode>,
}

impl AgentList {
    /// The listed `emails`, registering with `code`. Each is keyed as accounts are (trimmed,
    /// lower-cased, NFC: [`canonical_email`](crate::canonical_email)), however it was written.
    /// Without a code no email can register as an agent.
    pub fn new(emails: Arc<HashSet<String>>, code: Option<AgentCode>) -> Self {
        let emails = Arc::new(emails.iter().map(|e| crate::canonical_email(e)).collect());
        Self { emails, code }
    }

    /// Whether `email` (normalized) is on the list.
    pub fn lists(&self, email: &str) -> bool {
        self.emails.contains(email)
    }

    /// Whether `given` is the agent code (never, without one).
    pub fn code_matches(&self, given: &str) -> bool {
        self.code.as_ref().is_some_and(|code| code.matches(given))
    }

    /// The role a stored user has now: an agent only while their email is on the list.
    pub fn role_of(&self, email: &str, stored: Role) -> Role {
        match stored {
            Role::Agent if !self.lists(email) => Role::Customer,
            role => role,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_of_other_lengths_or_bytes_do_not_match() {
        let code = AgentCode::new("0123456789abcdef");
        assert!(code.matches("0123456789abcdef"));
        for other in [
            "",
            "0123456789abcde",
            "0123456789abcdef0",
            "0123456789abcdeF",
            "\u{0}123456789abcdef",
        ] {
            assert!(!code.matches(other), "{other:?}");
        }
        // A code with a trailing NUL is not the code either (padding is not equality).
        assert!(!AgentCode::new("ab").matches("ab\0"));
    }

    #[test]
    fn listed_emails_are_keyed_as_accounts_however_they_were_written() {
        let list = AgentList::new(
            Arc::new(HashSet::from([" Rene\u{301}@Example.com ".to_owned()])),
            None,
        );
        assert!(list.lists(&crate::canonical_email("ren\u{e9}@example.com")));
        assert!(list.lists("ren\u{e9}@example.com"));
        assert!(!list.lists("rene@example.com"));
    }
}
