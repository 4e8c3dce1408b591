//! The ticket list: an index of every ticket, newest first, kept by the command handlers.

use crate::domain::{Priority, Status, Ticket};
use async_trait::async_trait;
use cqrs_core::ports::StoreError;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
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

/// A ticket's place in the list, newest first: the order in which tickets entered it. On
/// Postgres it is the position of the ticket's first event, which the event store gives out
/// in commit order; in memory a counter the index advances as each ticket enters it. Either
/// way a ticket that becomes visible after a client read a page is above that page, never
/// between pages the client has yet to read (a creation time, stamped before the command
/// commits, would put a ticket stamped earlier but committed later below a cursor already
/// handed out, and a client walking the pages would miss it).
pub type SortKey = u64;

/// A ticket on a page of the list, with its place (what the next page's cursor holds).
#[derive(Clone, Debug)]
pub struct Listed {
    /// Its place in the list.
    pub key: SortKey,
    /// The ticket, without comments.
    pub ticket: Ticket,
}

/// Tickets for listing (without comments).
#[async_trait]
pub trait TicketIndex: Send + Sync + 'static {
    /// Adds or replaces a ticket. A ticket takes its place in the list when it first enters
    /// it; a change keeps it there.
    async fn upsert(&self, ticket: &Ticket) -> Result<(), StoreError>;
    /// Up to `limit` tickets matching `filter`, newest first, strictly after `after`.
    async fn list(
        &self,
        filter: &ListFilter,
        after: Option<SortKey>,
        limit: usize,
    ) -> Result<Vec<Listed>, StoreError>;
    /// The reporter of ticket `id`, when the index holds it (it never changes): lets a
    /// customer be refused another's ticket without reading its events. `None` (the
    /// default, and for a ticket the index has not taken) makes the caller read the ticket.
    async fn reporter_of(&self, id: Uuid) -> Result<Option<Uuid>, StoreError> {
        let _ = id;
        Ok(None)
    }
}

/// The index in process memory: the tickets in list order, and for each reporter, assignee,
/// status and priority the keys of its tickets, so a filtered page walks the smallest of the
/// lists its filter names instead of every ticket (a customer's page costs their own tickets,
/// not everyone's).
#[derive(Clone, Debug, Default)]
pub struct InMemoryTicketIndex {
    inner: Arc<Mutex<Lists>>,
}

/// A list a ticket is on besides the whole one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Facet {
    Reporter(Uuid),
    Assignee(Uuid),
    Status(Status),
    Priority(Priority),
}

impl Facet {
    /// The lists `ticket` is on.
    fn of(ticket: &Ticket) -> impl Iterator<Item = Facet> {
        [
            Some(Facet::Reporter(ticket.reporter_id)),
            ticket.assignee_id.map(Facet::Assignee),
            Some(Facet::Status(ticket.status)),
            Some(Facet::Priority(ticket.priority)),
        ]
        .into_iter()
        .flatten()
    }

    /// The lists a page under `filter` may walk: every ticket it shows is on each of them.
    fn named_by(filter: &ListFilter) -> impl Iterator<Item = Facet> {
        [
            filter.reporter_id.map(Facet::Reporter),
            filter.assignee_id.map(Facet::Assignee),
            filter.status.map(Facet::Status),
            filter.priority.map(Facet::Priority),
        ]
        .into_iter()
        .flatten()
    }
}

#[derive(Debug, Default)]
struct Lists {
    tickets: BTreeMap<SortKey, Ticket>,
    /// Each ticket's place.
    keys: HashMap<Uuid, SortKey>,
    facets: HashMap<Facet, BTreeSet<SortKey>>,
    /// The place of the ticket that entered last.
    entered: SortKey,
}

#[async_trait]
impl TicketIndex for InMemoryTicketIndex {
    async fn upsert(&self, ticket: &Ticket) -> Result<(), StoreError> {
        let mut lists = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Lists {
            tickets,
            keys,
            facets,
            entered,
        } = &mut *lists;
        // `keys` and `tickets` change together, under this lock: a key always has its ticket.
        let known = keys
            .get(&ticket.id)
            .and_then(|&key| tickets.get(&key).map(|old| (key, old)));
        let key = match known {
            Some((key, old)) => {
                // Two changes of one ticket may reach the index in either order: keep the
                // newer, as the Postgres index does (`WHERE version < EXCLUDED.version`).
                if old.version >= ticket.version {
                    return Ok(());
                }
                for facet in Facet::of(old) {
                    if let Some(keys) = facets.get_mut(&facet) {
                        keys.remove(&key);
                        if keys.is_empty() {
                            facets.remove(&facet);
                        }
                    }
                }
                key
            }
            None => {
                // Placed as it becomes visible, under the lock every page is read under.
                *entered += 1;
                keys.insert(ticket.id, *entered);
                *entered
            }
        };
        for facet in Facet::of(ticket) {
            facets.entry(facet).or_default().insert(key);
        }
        let mut summary = ticket.clone();
        summary.comments.clear();
        tickets.insert(key, summary);
        Ok(())
    }

    async fn reporter_of(&self, id: Uuid) -> Result<Option<Uuid>, StoreError> {
        let lists = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Ok(lists
            .keys
            .get(&id)
            .and_then(|key| lists.tickets.get(key))
            .map(|ticket| ticket.reporter_id))
    }

    async fn list(
        &self,
        filter: &ListFilter,
        after: Option<SortKey>,
        limit: usize,
    ) -> Result<Vec<Listed>, StoreError> {
        let lists = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let page = |keys: &mut dyn Iterator<Item = &SortKey>| -> Vec<Listed> {
            keys.filter_map(|&key| Some((key, lists.tickets.get(&key)?)))
                .filter(|(_, t)| filter.matches(t))
                .take(limit)
                .map(|(key, t)| Listed {
                    key,
                    ticket: t.clone(),
                })
                .collect()
        };
        let upper = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut shortest: Option<&BTreeSet<SortKey>> = None;
        for facet in Facet::named_by(filter) {
            match lists.facets.get(&facet) {
                // No ticket is on this list, so none matches the filter.
                None => return Ok(Vec::new()),
                Some(keys) if shortest.is_none_or(|s| keys.len() < s.len()) => {
                    shortest = Some(keys)
                }
                Some(_) => {}
            }
        }
        Ok(match shortest {
            Some(keys) => page(&mut keys.range((Bound::Unbounded, upper)).rev()),
            None => page(
                &mut lists
                    .tickets
                    .range((Bound::Unbounded, upper))
                    .rev()
                    .map(|(key, _)| key),
            ),
        })
    }
}

/// Opaque, URL-safe list cursors that only this server can issue: the sort key of the last
/// item, authenticated with an HMAC so a made-up cursor is refused, and hidden (the key is
/// XORed with a mask derived from the tag), since on Postgres it is a position in the event
/// store's global order, which would tell any client how many events the whole system
/// stores, and how fast they come.
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
const KEY_LEN: usize = std::mem::size_of::<SortKey>();

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

    fn mac(&self, purpose: &[u8], data: &[u8]) -> [u8; 32] {
        // HMAC takes keys of any length, so this cannot fail.
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!());
        mac.update(purpose);
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    fn tag(&self, key: SortKey) -> [u8; TAG_LEN] {
        // v2: the place in the list (v1 cursors held a creation time and an id).
        let full = self.mac(b"helpdesk-cursor-v2", &key.to_be_bytes());
        let mut tag = [0; TAG_LEN];
        tag.copy_from_slice(&full[..TAG_LEN]);
        tag
    }

    /// What hides the key of the cursor with `tag` (a deterministic cipher: the tag is the
    /// synthetic IV, and the key's own HMAC, so no two keys share a mask but by a collision).
    fn mask(&self, tag: &[u8]) -> [u8; KEY_LEN] {
        let full = self.mac(b"helpdesk-cursor-v2-mask", tag);
        let mut mask = [0; KEY_LEN];
        mask.copy_from_slice(&full[..KEY_LEN]);
        mask
    }

    /// The cursor after `key`.
    pub fn encode(&self, key: SortKey) -> String {
        let tag = self.tag(key);
        let mut bytes = Vec::with_capacity(KEY_LEN + TAG_LEN);
        bytes.extend(
            key.to_be_bytes()
                .iter()
                .zip(self.mask(&tag))
                .map(|(b, m)| b ^ m),
        );
        bytes.extend_from_slice(&tag);
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The sort key of a cursor this server issued, or `None`.
    pub fn decode(&self, cursor: &str) -> Option<SortKey> {
        if cursor.len() != 2 * (KEY_LEN + TAG_LEN) || !cursor.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return None;
        }
        let bytes: Vec<u8> = (0..cursor.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&cursor[i..i + 2], 16))
            .collect::<Result<_, _>>()
            .ok()?;
        let (hidden, tag) = bytes.split_at(KEY_LEN);
        let mut plain = [0; KEY_LEN];
        for ((p, h), m) in plain.iter_mut().zip(hidden).zip(self.mask(tag)) {
            *p = h ^ m;
        }
        let key = SortKey::from_be_bytes(plain);
        // Compare in constant time, as a MAC check should.
        let expected = self.tag(key);
        if expected
            .iter()
            .zip(tag)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            != 0
        {
            return None;
        }
        Some(key)
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
        let listed = &listed[0].ticket;
        assert_eq!((listed.version, listed.title.as_str()), (3, "closed"));
    }

    /// Every page under every filter is what a scan of all tickets gives, while tickets move
    /// between statuses, assignees and priorities (arriving in any order, older versions
    /// late): the lists a page walks follow each change, and a ticket leaves the lists it left.
    #[tokio::test]
    async fn filtered_pages_match_a_scan_of_every_ticket() {
        let index = InMemoryTicketIndex::default();
        let people: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
        let statuses = [Status::Open, Status::Assigned, Status::Closed];
        let priorities = [
            Priority::Low,
            Priority::Normal,
            Priority::High,
            Priority::Urgent,
        ];
        // A fixed sequence of pseudo-random choices: the test is the same on every run.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let mut latest: HashMap<Uuid, Ticket> = HashMap::new();
        let mut ids = Vec::new();
        for step in 0..400 {
            let ticket = if ids.is_empty() || next(3) == 0 {
                let id = Uuid::now_v7();
                ids.push(id);
                Ticket {
                    id,
                    reporter_id: people[next(people.len())],
                    version: 1,
                    ..Ticket::default()
                }
            } else {
                let old = &latest[&ids[next(ids.len())]];
                Ticket {
                    status: statuses[next(statuses.len())],
                    priority: priorities[next(priorities.len())],
                    assignee_id: [None, Some(people[next(people.len())])][next(2)],
                    // Sometimes a version older than the one held: it must change nothing.
                    version: if next(5) == 0 {
                        old.version
                    } else {
                        old.version + 1
                    },
                    ..old.clone()
                }
            };
            index.upsert(&ticket).await.unwrap();
            let held = latest.entry(ticket.id).or_insert_with(|| ticket.clone());
            if held.version < ticket.version {
                *held = ticket;
            }
            if step % 40 != 39 {
                continue;
            }
            {
                // Each ticket is on exactly the lists of its current version, and no list is
                // kept empty: a ticket that moved left its old lists.
                let lists = index.inner.lock().unwrap();
                for (facet, keys) in &lists.facets {
                    assert!(!keys.is_empty(), "{facet:?} is kept empty");
                    for key in keys {
                        assert!(
                            Facet::of(&lists.tickets[key]).any(|f| f == *facet),
                            "{key:?} is still on {facet:?}"
                        );
                    }
                }
                for (key, ticket) in &lists.tickets {
                    for facet in Facet::of(ticket) {
                        assert!(
                            lists.facets[&facet].contains(key),
                            "{key:?} not on {facet:?}"
                        );
                    }
                }
            }
            // Newest first: in the order they entered the index, the last first.
            let scan: Vec<&Ticket> = ids.iter().rev().map(|id| &latest[id]).collect();
            let mut filters = vec![ListFilter::default()];
            for &person in &people {
                filters.push(ListFilter {
                    reporter_id: Some(person),
                    ..Default::default()
                });
                filters.push(ListFilter {
                    assignee_id: Some(person),
                    ..Default::default()
                });
                for status in statuses {
                    filters.push(ListFilter {
                        reporter_id: Some(person),
                        status: Some(status),
                        ..Default::default()
                    });
                }
            }
            for status in statuses {
                filters.push(ListFilter {
                    status: Some(status),
                    ..Default::default()
                });
            }
            for priority in priorities {
                filters.push(ListFilter {
                    priority: Some(priority),
                    assignee_id: Some(people[0]),
                    ..Default::default()
                });
            }
            // Someone with no ticket at all.
            filters.push(ListFilter {
                reporter_id: Some(Uuid::now_v7()),
                ..Default::default()
            });
            for filter in &filters {
                let expected: Vec<(Uuid, u64)> = scan
                    .iter()
                    .filter(|t| filter.matches(t))
                    .map(|t| (t.id, t.version))
                    .collect();
                let (mut listed, mut after) = (Vec::new(), None);
                loop {
                    let page = index.list(filter, after, 3).await.unwrap();
                    listed.extend(page.iter().map(|t| (t.ticket.id, t.ticket.version)));
                    match page.last() {
                        Some(last) if page.len() == 3 => after = Some(last.key),
                        _ => break,
                    }
                    assert!(
                        listed.len() <= expected.len(),
                        "{filter:?}: paging past the end"
                    );
                }
                assert_eq!(listed, expected, "{filter:?} at step {step}");
            }
        }
    }

    /// A ticket that enters the list after a client read its first page (stamped before the
    /// tickets on it, committed after) is above that page, not between the pages the client
    /// walks next; and cursors this server issued decode to the place they hold.
    #[tokio::test]
    async fn a_ticket_entering_after_a_page_was_read_is_above_it() {
        let index = InMemoryTicketIndex::default();
        let cursors = Cursors::new(b"test key");
        let at = chrono::DateTime::<chrono::Utc>::from_timestamp(1_800_000_000, 0).unwrap();
        let ticket = |title: &str, seconds: i64| Ticket {
            id: Uuid::now_v7(),
            title: title.into(),
            created_at: at + chrono::Duration::seconds(seconds),
            ..Ticket::default()
        };
        let (oldest, later, stamped_between) = (ticket("x", 0), ticket("b", 20), ticket("a", 10));
        index.upsert(&oldest).await.unwrap();
        index.upsert(&later).await.unwrap();
        let filter = ListFilter::default();
        let first = index.list(&filter, None, 2).await.unwrap();
        let titles = |page: &[Listed]| -> Vec<String> {
            page.iter().map(|l| l.ticket.title.clone()).collect()
        };
        assert_eq!(titles(&first), ["b", "x"]);
        index.upsert(&stamped_between).await.unwrap();
        let cursor = cursors.encode(first[1].key);
        let after = cursors.decode(&cursor);
        assert_eq!(
            after,
            Some(first[1].key),
            "a cursor this server issued decodes"
        );
        assert!(
            index.list(&filter, after, 2).await.unwrap().is_empty(),
            "nothing is below the page already read"
        );
        let again = index.list(&filter, None, 3).await.unwrap();
        assert_eq!(titles(&again), ["a", "b", "x"], "the late ticket is on top");
        assert_eq!(Cursors::new(b"another key").decode(&cursor), None);
        // The place is not readable in the cursor: two neighbours' cursors share no prefix a
        // client could count with.
        let (one, two) = (cursors.encode(1), cursors.encode(2));
        assert!(!one.starts_with("0000000000000001") && !two.starts_with("0000000000000002"));
        assert_ne!(one[..16], two[..16]);
        assert_eq!(cursors.decode(&two), Some(2));
    }
}
