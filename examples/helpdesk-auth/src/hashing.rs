//! Password hashing, bounded in total and per client address.

use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use cqrs_core::{ErrorKind, HandlerError};
use helpdesk_api::{client_key, composed, site_key};
use serde_json::json;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

/// The most turns one client address holds or waits for at once.
const PER_CLIENT: usize = 2;

/// The most hashes at once by default: two per core up to this many (argon2 takes ~19 MiB a
/// hash, so ~300 MiB), whatever the core count a container reports.
pub(crate) const DEFAULT_MAX_PERMITS: usize = 16;

/// The code of the answer when no turn to hash came free in time.
pub(crate) const BUSY: &str = "busy";

/// Password hashing and checking, on blocking threads (argon2 takes tens of milliseconds and
/// ~19 MiB on purpose), at most `permits` at a time. Login and registration need no token, so
/// without a bound a burst of them would queue hundreds of hashes (gigabytes) on the blocking
/// pool, and a request's timeout does not stop a hash already running. Past the bound, a
/// request waits up to `wait` for a turn, then gets 503 `busy` with `Retry-After`.
///
/// One client address (an IPv4 address or an IPv6 /64) holds or waits for at most two turns,
/// and fewer than all of them (half, when there are fewer than four; with a single turn, that
/// one, so one client can then keep it: give at least two): past that its request is
/// refused at once with 429 `too_many_attempts`, before it waits in the shared queue. So one
/// client sending logins as fast as it can cannot take every turn, nor fill the queue ahead of
/// everyone else with its own requests. The /64s of one IPv6 /48 (one site, which can use
/// thousands of /64s) hold half the turns together, at most, and never all of them; but always
/// more than one /64's share, so one busy /64 does not lock out the others of its /48 (with
/// fewer than three turns there is no such room, and no cap per site).
#[derive(Clone, Debug)]
pub(crate) struct Hashing {
    permits: Arc<Semaphore>,
    wait: Duration,
    per_client: usize,
    /// `None`: too few turns for a share per site larger than a client's.
    per_site: Option<usize>,
    /// Turns held or waited for, by client key and by site key (an IPv6 /48, `…::/48`, which
    /// no client key ends with); a key leaves the map when its count is zero.
    // A `std::sync::Mutex`: no `.await` while it is held.
    clients: Arc<Mutex<HashMap<String, usize>>>,
}

/// A turn to hash: a permit of the shared bound, and one of its client's.
#[derive(Debug)]
pub(crate) struct Turn {
    _permit: OwnedSemaphorePermit,
    _slot: ClientSlot,
}

/// One of a client's turns; gives it back when dropped. Taken before a login's other work
/// (its throttle counts, the user's lookup), so one client's logins are bounded all along;
/// the shared permit ([`ClientSlot::turn`]) only for the hash itself.
#[derive(Debug)]
pub(crate) struct ClientSlot {
    clients: Arc<Mutex<HashMap<String, usize>>>,
    key: String,
    site: Option<String>,
}

impl ClientSlot {
    /// The turn to hash: this slot and a permit of `hashing`'s shared bound, waited for up to
    /// its bound, `busy` past it.
    pub(crate) async fn turn(self, hashing: &Hashing) -> Result<Turn, HandlerError> {
        let permit = tokio::time::timeout(hashing.wait, hashing.permits.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| {
                HandlerError::new(
                    ErrorKind::Unavailable,
                    BUSY,
                    "the server is checking too many passwords at once; try again in a moment",
                )
            })?;
        Ok(Turn {
            _permit: permit,
            _slot: self,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        for key in std::iter::once(&self.key).chain(&self.site) {
            if let Some(count) = clients.get_mut(key) {
                *count -= 1;
                if *count == 0 {
                    clients.remove(key);
                }
            }
        }
    }
}

impl Hashing {
    pub(crate) fn new(permits: usize, wait: Duration) -> Self {
        // Tokio's semaphore panics past its maximum: more is as good as unlimited anyway.
        let permits = permits.clamp(1, Semaphore::MAX_PERMITS);
        let per_client = (permits / 2).clamp(1, PER_CLIENT);
        Self {
            permits: Arc::new(Semaphore::new(permits)),
            wait,
            per_client,
            per_site: Some(
                (permits / 2)
                    .max(per_client + 1)
                    .min(permits.saturating_sub(1)),
            )
            .filter(|&site| site > per_client),
            clients: Arc::default(),
        }
    }

    /// `permits` hashes at once (by default two per core, at most [`DEFAULT_MAX_PERMITS`]),
    /// waiting up to 2 s for a turn.
    pub(crate) fn for_this_machine(permits: Option<usize>) -> Self {
        Self::new(
            permits.unwrap_or_else(|| default_permits(std::thread::available_parallelism().ok())),
            Duration::from_secs(2),
        )
    }

    /// A turn to hash for `client`: refused at once (`too_many_attempts`) when the client
    /// holds or waits for its share already; otherwise waiting up to the bound, `busy` past
    /// it. (For the tests: registrations and logins take their client's slot
    /// ([`client_slot`](Self::client_slot)) when they begin, before any store round trip, and
    /// the shared permit only for the hash; a login takes its count back when that permit is
    /// `busy`, so a refusal for either reason never counts as a failed login.)
    #[cfg(test)]
    pub(crate) async fn turn(&self, client: Option<IpAddr>) -> Result<Turn, HandlerError> {
        self.client_slot(client)?.turn(self).await
    }

    /// One of `client`'s turns, without the shared permit yet: refused at once
    /// (`too_many_attempts`) when the client holds or waits for its share already.
    pub(crate) fn client_slot(&self, client: Option<IpAddr>) -> Result<ClientSlot, HandlerError> {
        self.slot(client_key(client), site_key(client))
    }

    fn slot(&self, key: String, site: Option<String>) -> Result<ClientSlot, HandlerError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let held = |k: &String| clients.get(k).copied().unwrap_or(0);
        let refused = |message| {
            Err(HandlerError::rate_limited("too_many_attempts", message)
                .with_details(json!({ "retry_after": 1 })))
        };
        if held(&key) >= self.per_client {
            return refused(
                "this client address has too many logins or registrations in progress; wait \
                 for them to finish",
            );
        }
        let site = site.filter(|_| self.per_site.is_some());
        if let (Some(site), Some(limit)) = (&site, self.per_site)
            && held(site) >= limit
        {
            return refused(
                "this client's network (its IPv6 /48) has too many logins or registrations in \
                 progress; wait for them to finish",
            );
        }
        for k in std::iter::once(&key).chain(&site) {
            *clients.entry(k.clone()).or_insert(0) += 1;
        }
        Ok(ClientSlot {
            clients: self.clients.clone(),
            key,
            site,
        })
    }

    /// Runs `work` on a blocking thread in `turn`. The turn goes with the work, so a request
    /// dropped meanwhile (a timeout) keeps counting, for its client too, until its hash is done.
    async fn run<T: Send + 'static>(
        turn: Turn,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HandlerError> {
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            work()
        })
        .await
        .map_err(HandlerError::internal)
    }

    /// Hashes `password` in a turn taken with `slot` (the client's, taken when its request
    /// began).
    pub(crate) async fn hash_password(
        &self,
        password: String,
        slot: ClientSlot,
    ) -> Result<String, HandlerError> {
        let turn = slot.turn(self).await?;
        Self::run(turn, move || argon2_hash(password.as_bytes())).await?
    }

    /// Checks `password` against `hash` in `turn`, in its composed form (NFC), as
    /// registration hashes it. One check, however the password was typed: a second one, of
    /// the form as sent, would let any client double the cost of each guess by sending a
    /// decomposed accent.
    pub(crate) async fn verify_password(
        turn: Turn,
        password: String,
        hash: String,
    ) -> Result<bool, HandlerError> {
        Self::run(turn, move || {
            Argon2::default()
                .verify_password(composed(&password).as_bytes(), hash.as_str())
                .is_ok()
        })
        .await
    }
}

/// Two hashes per core, at most [`DEFAULT_MAX_PERMITS`]; two when the core count is unknown.
fn default_permits(cores: Option<std::num::NonZeroUsize>) -> usize {
    cores
        .map_or(2, |n| n.get().saturating_mul(2))
        .min(DEFAULT_MAX_PERMITS)
}

/// A hash of a random password, made once at start-up.
pub(crate) fn dummy_hash() -> Result<String, HandlerError> {
    argon2_hash(Uuid::new_v4().to_string().as_bytes())
}

/// The argon2 hash of `password`, with a fresh salt, as a PHC string.
pub(crate) fn argon2_hash(password: &[u8]) -> Result<String, HandlerError> {
    Argon2::default()
        .hash_password(password)
        .map(|h| h.to_string())
        .map_err(|e| HandlerError::internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With every permit taken, a request waits its turn up to the bound, then is told the
    /// server is busy (retryable); once a permit is free, checks run again.
    // Real time: paused time does not advance while a blocking task runs.
    #[tokio::test]
    async fn past_the_bound_a_request_waits_then_hears_the_server_is_busy() {
        let wait = Duration::from_millis(100);
        let hashing = Hashing::new(1, wait);
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let busy = hashing.clone();
        let running = tokio::spawn(async move {
            let turn = busy.turn(Some([192, 0, 2, 1].into())).await?;
            Hashing::run(turn, move || {
                let _ = hold.recv();
            })
            .await
        });
        while hashing.permits.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        let started = std::time::Instant::now();
        let refused = hashing.turn(None).await.unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Unavailable);
        assert_eq!(refused.code(), "busy");
        assert!(refused.kind().is_retryable());
        assert!(started.elapsed() >= wait, "waited its turn first");

        release.send(()).unwrap();
        running.await.unwrap().unwrap();
        let turn = hashing.turn(None).await.unwrap();
        let checked = Hashing::verify_password(turn, "pw".into(), "not a hash".into())
            .await
            .unwrap();
        assert!(!checked, "a free permit lets the check run");
    }

    /// A password is checked composed (NFC), however its accents were typed, and only so: a
    /// hash of the decomposed form does not match (a second check of the form as sent would
    /// double the cost of a guess).
    #[tokio::test]
    async fn a_password_matches_however_its_accents_are_encoded() {
        let hashing = Hashing::new(2, Duration::from_secs(30));
        let (precomposed, decomposed) = ("caf\u{00E9} au lait", "cafe\u{0301} au lait");
        let check = |password: &str, hash: &str| {
            let (hashing, password, hash) = (hashing.clone(), password.to_owned(), hash.to_owned());
            async move {
                let turn = hashing.turn(None).await.unwrap();
                Hashing::verify_password(turn, password, hash)
                    .await
                    .unwrap()
            }
        };
        // What registration stores now: the composed form's hash.
        let stored = argon2_hash(precomposed.as_bytes()).unwrap();
        assert!(check(precomposed, &stored).await);
        assert!(check(decomposed, &stored).await);
        assert!(!check("cafe au lait", &stored).await, "the accent counts");
        let decomposed_hash = argon2_hash(decomposed.as_bytes()).unwrap();
        assert!(
            !check(decomposed, &decomposed_hash).await,
            "checked composed only"
        );
    }

    /// A client holding its share of turns is refused at once (no wait in the queue), while
    /// another client still gets a turn; a client's entry is gone when its turns are.
    #[tokio::test]
    async fn a_client_holds_at_most_its_share_of_the_turns() {
        let hashing = Hashing::new(4, Duration::from_secs(30));
        let a: Option<IpAddr> = Some([192, 0, 2, 1].into());
        // Another address of the same IPv6 /64 is the same client.
        let a6: [Option<IpAddr>; 2] = [
            Some("2001:db8:1:2::1".parse().unwrap()),
            Some("2001:db8:1:2::ffff".parse().unwrap()),
        ];
        let held = [
            hashing.turn(a).await.unwrap(),
            hashing.turn(a).await.unwrap(),
        ];
        let refused = hashing.turn(a).await.unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::RateLimited);
        assert_eq!(refused.code(), "too_many_attempts");
        let held6 = [
            hashing.turn(a6[0]).await.unwrap(),
            hashing.turn(a6[1]).await.unwrap(),
        ];
        assert_eq!(
            hashing.turn(a6[0]).await.unwrap_err().code(),
            "too_many_attempts"
        );
        drop(held6);
        let b = hashing.turn(Some([192, 0, 2, 2].into())).await.unwrap();
        assert_eq!(hashing.clients.lock().unwrap().len(), 2, "a and b");
        drop((held, b));
        assert!(
            hashing.clients.lock().unwrap().is_empty(),
            "no entry is kept"
        );
    }

    /// With fewer than four permits a client gets half of them, so never all; an IPv6 site
    /// half of them, at least a client's share.
    #[test]
    fn a_client_never_gets_every_permit() {
        for (permits, share, site) in [
            (1, 1, None),
            (2, 1, None),
            (3, 1, Some(2)),
            (4, 2, Some(3)),
            (8, 2, Some(4)),
            (16, 2, Some(8)),
        ] {
            let hashing = Hashing::new(permits, Duration::ZERO);
            assert_eq!((hashing.per_client, hashing.per_site), (share, site));
        }
    }

    /// On a small machine (4 turns, a client's share 2) one /64 holding its share leaves
    /// another /64 of its /48 a turn.
    #[tokio::test]
    async fn a_busy_64_does_not_lock_out_its_48_on_a_small_machine() {
        let hashing = Hashing::new(4, Duration::from_secs(30));
        let one: Option<IpAddr> = Some("2001:db8:5:1::1".parse().unwrap());
        let other: Option<IpAddr> = Some("2001:db8:5:2::1".parse().unwrap());
        let held = [
            hashing.turn(one).await.unwrap(),
            hashing.turn(one).await.unwrap(),
        ];
        let theirs = hashing.turn(other).await.unwrap();
        assert_eq!(
            hashing.turn(other).await.unwrap_err().code(),
            "too_many_attempts",
            "the site's three turns are taken; the fourth stays for everyone else"
        );
        assert!(hashing.turn(Some([192, 0, 2, 1].into())).await.is_ok());
        drop((held, theirs));
    }

    /// The default is two hashes per core, but never past the cap (each takes ~19 MiB): a
    /// container that sees 64 cores and has 1 GiB must not be able to run 128.
    #[test]
    fn the_default_hashes_at_once_are_capped() {
        let cores = |n| std::num::NonZeroUsize::new(n);
        assert_eq!(default_permits(cores(2)), 4);
        assert_eq!(default_permits(cores(8)), 16);
        assert_eq!(default_permits(cores(64)), DEFAULT_MAX_PERMITS);
        assert_eq!(default_permits(None), 2);
        assert_eq!(
            Hashing::for_this_machine(Some(3))
                .permits
                .available_permits(),
            3
        );
    }

    /// The /64s of one IPv6 /48 share half the turns: a party with a /48 cannot take every
    /// turn by spreading its logins over its /64s; another site and an IPv4 client still get
    /// theirs, and so does another /64 of a site where one /64 holds its share.
    #[tokio::test]
    async fn the_64s_of_one_48_share_half_the_turns() {
        let hashing = Hashing::new(8, Duration::from_secs(30));
        let in_site = |n: u16| -> Option<IpAddr> {
            Some(std::net::Ipv6Addr::new(0x2001, 0xdb8, 7, n, 0, 0, 0, 1).into())
        };
        let mut held = Vec::new();
        for n in 0..4 {
            held.push(hashing.turn(in_site(n)).await.unwrap());
        }
        let refused = hashing.turn(in_site(9)).await.unwrap_err();
        assert_eq!(
            refused.code(),
            "too_many_attempts",
            "the site holds its half"
        );
        assert!(refused.to_string().contains("/48"), "{refused}");
        let other_site: Option<IpAddr> = Some("2001:db8:8:1::1".parse().unwrap());
        held.push(hashing.turn(other_site).await.unwrap());
        held.push(hashing.turn(Some([192, 0, 2, 1].into())).await.unwrap());
        drop(held);
        assert!(
            hashing.clients.lock().unwrap().is_empty(),
            "no entry is kept"
        );
        assert!(hashing.turn(in_site(9)).await.is_ok(), "turns given back");
    }
}
