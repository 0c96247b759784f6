//! What the simulated providers sent: the usage of every response, by the id the provider gave it
//! (`x-request-id`, `request-id` or the body's `responseId`), in the interceptor's normalised meaning
//! (input counts cache reads and writes, output counts reasoning) so tests compare token for token.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The usage one response carried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    pub id: String,
    pub model: String,
    pub input: u64,
    pub cached: u64,
    pub cache_write: u64,
    pub output: u64,
    pub reasoning: u64,
}

/// Shared record of sent usage, and a counter that makes every response's numbers different.
#[derive(Clone, Default)]
pub struct Ledger {
    sent: Arc<Mutex<Vec<Sent>>>,
    counter: Arc<AtomicU64>,
}

impl Ledger {
    /// A new sequence number (varies ids and token counts per response).
    pub fn next(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn record(&self, sent: Sent) {
        if let Ok(mut all) = self.sent.lock() {
            all.push(sent);
        }
    }

    pub fn all(&self) -> Vec<Sent> {
        self.sent.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn find(&self, id: &str) -> Option<Sent> {
        self.all().into_iter().find(|s| s.id == id)
    }
}
