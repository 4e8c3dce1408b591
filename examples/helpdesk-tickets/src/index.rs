//! The ticket list: an index of every ticket, newest first, kept by the command handlers.

use crate::domain::{Priority, Status, Ticket};
use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use cqrs_core::ports::StoreError;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// Which tickets to list.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    /// Only this reporter's (customers see only their own).
    pub reporter_id: Option<Uuid>,
    /// Only this status.
    pub status: Option<Status>,
    /// Only this priority.
    pub priority: Option<Priority>,
    /// Only this assignee's.
    pub assignee_id: Option<Uuid>,
}

impl ListFilter {
    fn matches(&self, t: &Ticket) -> bool {
        self.reporter_id.is_none_or(|r| t.reporter_id == r)
            && self.status.is_none_or(|s| t.status == s)
            && self.priority.is_none_or(|p| t.priority == p)
            && self.assignee_id.is_none_or(|a| t.assignee_id == Some(a))
    }
}

/// The key tickets are ordered by, newest first.
pub type SortKey = (DateTime<Utc>, Uuid);

/// Tickets for listing (without comments).
#[async_trait]
pub trait TicketIndex: Send + Sync + 'static {
    /// Adds or replaces a ticket.
    async fn upsert(&self, ticket: &Ticket) -> Result<(), StoreError>;
    /// Up to `limit` tickets matching `filter`, newest first, strictly after `after`.
    async fn list(
        &self,
        filter: &ListFilter,
        after: Option<SortKey>,
        limit: usize,
    ) -> Result<Vec<Ticket>, StoreError>;
}

/// A ticket's place in the list: its creation time to the microsecond (what a cursor and a
/// Postgres `timestamptz` hold; finer, two tickets of one microsecond would compare apart in
/// the index and equal in a cursor, and a page could skip one), then its id.
pub(crate) fn sort_key(ticket: &Ticket) -> SortKey {
    (ticket.created_at.trunc_subsecs(6), ticket.id)
}

/// The index in process memory.
#[derive(Clone, Debug, Default)]
pub struct InMemoryTicketIndex {
    tickets: Arc<Mutex<BTreeMap<SortKey, Ticket>>>,
}

#[async_trait]
impl TicketIndex for InMemoryTicketIndex {
    async fn upsert(&self, ticket: &Ticket) -> Result<(), StoreError> {
        let mut tickets = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        let key = sort_key(ticket);
        // Two changes of one ticket may reach the index in either order: keep the newer, as
        // the Postgres index does (`WHERE version < EXCLUDED.version`).
        if tickets
            .get(&key)
            .is_some_and(|t| t.version >= ticket.version)
        {
            return Ok(());
        }
        let mut summary = ticket.clone();
        summary.comments.clear();
        tickets.insert(key, summary);
        Ok(())
    }

    async fn list(
        &self,
        filter: &ListFilter,
        after: Option<SortKey>,
        limit: usize,
    ) -> Result<Vec<Ticket>, StoreError> {
        let tickets = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        let range = match after {
            Some(key) => tickets.range(..key),
            None => tickets.range(..),
        };
        Ok(range
            .rev()
            .map(|(_, t)| t)
            .filter(|t| filter.matches(t))
            .take(limit)
            .cloned()
            .collect())
    }
}

/// Opaque, URL-safe list cursors that only this server can issue: the sort key of the last
/// item, authenticated with an HMAC so a made-up cursor is refused.
#[derive(Clone)]
pub struct Cursors {
    key: Arc<[u8]>,
}

impl std::fmt::Debug for Cursors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cursors")
    }
}

const TAG_LEN: usize = 12;

impl Cursors {
    /// Cursors signed with a key derived from `secret` (the server's token secret): one key
    /// per purpose, so a cursor's tag is never computed with the key that signs tokens.
    pub fn new(secret: &[u8]) -> Self {
        // HMAC takes keys of any length, so this cannot fail.
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
        mac.update(b"helpdesk: the key of list cursors");
        Self {
            key: Arc::from(&mac.finalize().into_bytes()[..]),
        }
    }

    fn tag(&self, payload: &[u8]) -> [u8; TAG_LEN] {
        // HMAC takes keys of any length, so this cannot fail.
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!());
        mac.update(b"helpdesk-cursor-v1");
        mac.update(payload);
        let full = mac.finalize().into_bytes();
        let mut tag = [0; TAG_LEN];
        tag.copy_from_slice(&full[..TAG_LEN]);
        tag
    }

    /// The cursor after `key`.
    pub fn encode(&self, key: SortKey) -> String {
        let mut bytes = Vec::with_capacity(24 + TAG_LEN);
        bytes.extend_from_slice(&key.0.timestamp_micros().to_be_bytes());
        bytes.extend_from_slice(key.1.as_bytes());
        let tag = self.tag(&bytes);
        bytes.extend_from_slice(&tag);
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The sort key of a cursor this server issued, or `None`.
    pub fn decode(&self, cursor: &str) -> Option<SortKey> {
        if cursor.len() != 2 * (24 + TAG_LEN) || !cursor.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let bytes: Vec<u8> = (0..cursor.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&cursor[i..i + 2], 16))
            .collect::<Result<_, _>>()
            .ok()?;
        let (payload, tag) = bytes.split_at(24);
        // Compare in constant time, as a MAC check should.
        let expected = self.tag(payload);
        if expected
            .iter()
            .zip(tag)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            != 0
        {
            return None;
        }
        let micros = i64::from_be_bytes(payload[..8].try_into().ok()?);
        let at = DateTime::<Utc>::from_timestamp_micros(micros)?;
        let id = Uuid::from_slice(&payload[8..]).ok()?;
        Some((at, id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An older version arriving after a newer one does not replace it.
    #[tokio::test]
    async fn the_in_memory_index_keeps_the_newest_version() {
        let index = InMemoryTicketIndex::default();
        let assigned = Ticket {
            id: Uuid::now_v7(),
            version: 2,
            title: "assigned".into(),
            ..Ticket::default()
        };
        let closed = Ticket {
            version: 3,
            title: "closed".into(),
            ..assigned.clone()
        };
        index.upsert(&closed).await.unwrap();
        index.upsert(&assigned).await.unwrap();
        let listed = index.list(&ListFilter::default(), None, 10).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].version, listed[0].title.as_str()), (3, "closed"));
    }

    /// Two tickets created within one microsecond are both on the pages: the cursor (to the
    /// microsecond) and the index agree on their order.
    #[tokio::test]
    async fn paging_skips_no_ticket_of_the_same_microsecond() {
        let index = InMemoryTicketIndex::default();
        let cursors = Cursors::new(b"test key");
        let at = DateTime::<Utc>::from_timestamp(1_800_000_000, 1_000).unwrap();
        for nanos in [100, 500] {
            index
                .upsert(&Ticket {
                    id: Uuid::now_v7(),
                    created_at: at + chrono::Duration::nanoseconds(nanos),
                    ..Ticket::default()
                })
                .await
                .unwrap();
        }
        let (filter, mut after, mut seen) = (ListFilter::default(), None, Vec::new());
        // Two tickets, a page each, then an empty page: a cursor that does not move would
        // page forever, so more pages than that fail the test instead.
        for pages in 1.. {
            assert!(pages <= 3, "still paging after 3 pages of one: {seen:?}");
            let page = index.list(&filter, after, 1).await.unwrap();
            let Some(last) = page.last() else { break };
            seen.push(last.id);
            after = cursors.decode(&cursors.encode(sort_key(last)));
            assert!(after.is_some(), "a cursor this server issued decodes");
        }
        assert_eq!(seen.len(), 2, "both tickets listed: {seen:?}");
    }
}
