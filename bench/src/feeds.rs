//! What a simulated feed of either kind (a client stream, a LiveFeed) reports to the
//! live scenario ([`crate::live`]): the feeds open, and how each ended.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

/// What the feeds saw, counted as they go.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) open: AtomicUsize,
    pub(crate) peak_open: AtomicUsize,
}

impl Counters {
    pub(crate) fn opened(&self) {
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_open.fetch_max(open, Ordering::Relaxed);
    }
}

/// How one feed ended: with its items and the latencies measured (the commit after a
/// stream's trailer; the ack of each live-feed batch), or a failure.
pub(crate) enum Ended {
    Committed {
        items: u64,
        latencies: Vec<Duration>,
    },
    Failed(String),
}
