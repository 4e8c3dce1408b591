//! Failed-login throttling per (email, client address).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_core::clock::Clock;
use cqrs_core::ports::StoreError;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Counts failed logins in a sliding window.
#[async_trait]
pub trait LoginThrottle: Send + Sync + 'static {
    /// If this (email, client) pair is blocked, the seconds until it may try again.
    async fn blocked_for(&self, key: &str) -> Result<Option<u64>, StoreError>;
    /// Records a failed attempt.
    async fn record_failure(&self, key: &str) -> Result<(), StoreError>;
}

/// A throttle in process memory, on an injectable clock.
#[derive(Clone)]
pub struct InMemoryLoginThrottle {
    failures: Arc<Mutex<HashMap<String, VecDeque<DateTime<Utc>>>>>,
    clock: Arc<dyn Clock>,
    limit: u32,
    window: Duration,
}

impl std::fmt::Debug for InMemoryLoginThrottle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryLoginThrottle")
            .field("limit", &self.limit)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl InMemoryLoginThrottle {
    /// Blocks a key after `limit` failures within `window`.
    pub fn new(clock: Arc<dyn Clock>, limit: u32, window: Duration) -> Self {
        Self {
            failures: Arc::default(),
            clock,
            limit,
            window,
        }
    }

    fn window(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.window).unwrap_or(chrono::Duration::MAX)
    }
}

#[async_trait]
impl LoginThrottle for InMemoryLoginThrottle {
    async fn blocked_for(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let now = self.clock.now();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let Some(list) = failures.get_mut(key) else {
            return Ok(None);
        };
        while list.front().is_some_and(|t| *t + self.window() <= now) {
            list.pop_front();
        }
        if list.len() < self.limit as usize {
            return Ok(None);
        }
        // Blocked until the oldest failure in the window leaves it.
        let until = list.front().map_or(now, |t| *t + self.window());
        Ok(Some((until - now).num_seconds().max(1) as u64))
    }

    async fn record_failure(&self, key: &str) -> Result<(), StoreError> {
        let now = self.clock.now();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let list = failures.entry(key.to_owned()).or_default();
        list.push_back(now);
        // Keep memory bounded for a key under attack.
        while list.len() > self.limit as usize * 2 {
            list.pop_front();
        }
        Ok(())
    }
}
