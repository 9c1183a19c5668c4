//! Handshake slots: the tunnel's pacing of new connections, fair between source addresses.
//!
//! Every connection holds a slot from QUIC accept until its first message is answered. Slots are
//! limited in total (`--max-concurrent-handshakes`, so a reconnecting fleet is served a batch at
//! a time) and per source address (`--max-handshakes-per-address`), so one address that opens
//! connections and stays silent holds only its own share and cannot lock other edges out.
//! A few more connections from one address may wait for their turn (many gateways behind one NAT
//! reconnect together); beyond that they are refused at once and retry with their backoff.
//!
//! The queue in all is bounded too: connections holding or waiting for a slot beyond
//! [`QUEUED_PER_SLOT`] per total slot are refused at once, before any TLS, with QUIC's
//! `CONNECTION_REFUSED` (edgecore then waits longer: `edgecore::backoff::after_busy`). A
//! connection that would wait longer than the edge's 3 s dial limit would cost a handshake for
//! an edge that already gave up; in a reconnect storm of 10,000 edges that was most of the CPU.
//!
//! IPv6 sources are grouped by /64, the block one host usually owns; IPv4-mapped IPv6 addresses
//! count as their IPv4 address.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections from one source waiting for a slot, per slot it may hold.
const WAITING_PER_SLOT: usize = 4;

/// Connections holding or waiting for a slot in all, per total slot: with the default 64
/// slots, 256 at once, which cloudcore serves well within an edge's 3 s dial limit.
pub const QUEUED_PER_SLOT: usize = 4;

/// The slots of one tunnel endpoint. Cheap to clone.
#[derive(Clone)]
pub struct HandshakeSlots {
    inner: Arc<Inner>,
}

struct Inner {
    total: Arc<Semaphore>,
    per_source: usize,
    /// Connections holding or waiting for a slot, and the most allowed.
    queued: std::sync::atomic::AtomicUsize,
    max_queued: usize,
    sources: Mutex<HashMap<IpAddr, Source>>,
}

struct Source {
    slots: Arc<Semaphore>,
    /// Connections from this source holding or waiting for a slot.
    users: usize,
}

/// Why a connection got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its source already holds its share and has as many connections waiting as allowed.
    SourceBusy,
    /// The endpoint has as many connections holding or waiting for a slot as it may queue.
    Busy,
    /// The endpoint is shutting down.
    Closed,
}

/// A held slot; dropping it frees the slot for the next connection.
pub struct Slot {
    _total: OwnedSemaphorePermit,
    _source: OwnedSemaphorePermit,
    _user: User,
}

/// Counts a connection against its source while it holds or waits for a slot.
struct User {
    inner: Arc<Inner>,
    source: IpAddr,
}

impl Drop for User {
    fn drop(&mut self) {
        self.inner
            .queued
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let mut sources = self.inner.sources.lock().expect("slots lock");
        if let Some(source) = sources.get_mut(&self.source) {
            source.users -= 1;
            if source.users == 0 {
                sources.remove(&self.source);
            }
        }
    }
}

impl HandshakeSlots {
    /// `total` slots in all, at most `per_source` of them held by one source address.
    pub fn new(total: usize, per_source: usize) -> Self {
        let total = total.max(1);
        HandshakeSlots {
            inner: Arc::new(Inner {
                total: Arc::new(Semaphore::new(total)),
                per_source: per_source.clamp(1, total),
                queued: std::sync::atomic::AtomicUsize::new(0),
                max_queued: total.saturating_mul(QUEUED_PER_SLOT),
                sources: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Waits for a slot for a connection from `peer`: first the source's share, then one of
    /// the total, so waiting connections of a busy source never hold a total slot.
    pub async fn acquire(&self, peer: IpAddr) -> Result<Slot, Refusal> {
        let source = source_key(peer);
        let slots = {
            let mut sources = self.inner.sources.lock().expect("slots lock");
            let entry = sources.entry(source).or_insert_with(|| Source {
                slots: Arc::new(Semaphore::new(self.inner.per_source)),
                users: 0,
            });
            if entry.users >= self.inner.per_source * (1 + WAITING_PER_SLOT) {
                return Err(Refusal::SourceBusy);
            }
            // Counted under the sources lock, so the bound is exact.
            let queued = &self.inner.queued;
            if queued.load(std::sync::atomic::Ordering::Relaxed) >= self.inner.max_queued {
                return Err(Refusal::Busy);
            }
            queued.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            entry.users += 1;
            entry.slots.clone()
        };
        let user = User {
            inner: self.inner.clone(),
            source,
        };
        let source_permit = slots.acquire_owned().await.map_err(|_| Refusal::Closed)?;
        let total_permit = self
            .inner
            .total
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Refusal::Closed)?;
        Ok(Slot {
            _total: total_permit,
            _source: source_permit,
            _user: user,
        })
    }

    /// Source addresses currently holding or waiting for a slot.
    pub fn sources(&self) -> usize {
        self.inner.sources.lock().expect("slots lock").len()
    }

    /// Slots of the total not held right now.
    pub fn available(&self) -> usize {
        self.inner.total.available_permits()
    }
}

/// The address a connection is counted against: IPv4 as is, IPv6 by its /64.
fn source_key(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(_) => peer,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address literal")
    }

    #[tokio::test]
    async fn one_source_holds_only_its_share_and_others_still_get_slots() {
        let slots = HandshakeSlots::new(4, 2);
        let a1 = slots.acquire(ip("10.0.0.1")).await.expect("first");
        let _a2 = slots.acquire(ip("10.0.0.1")).await.expect("second");
        // A third from the same source waits, even though total slots are free.
        let waiting =
            tokio::time::timeout(Duration::from_millis(50), slots.acquire(ip("10.0.0.1")));
        assert!(waiting.await.is_err(), "a third slot for one source");
        // Another source is served at once.
        let _b = tokio::time::timeout(Duration::from_millis(50), slots.acquire(ip("10.0.0.2")))
            .await
            .expect("another source is not blocked")
            .expect("slot");
        assert_eq!(slots.available(), 1);
        // Freeing one of the first source's slots lets its next connection in.
        drop(a1);
        let _a3 = tokio::time::timeout(Duration::from_millis(50), slots.acquire(ip("10.0.0.1")))
            .await
            .expect("served after a slot is freed")
            .expect("slot");
    }

    #[tokio::test]
    async fn a_source_with_too_many_waiting_is_refused_and_forgotten_when_done() {
        let slots = HandshakeSlots::new(8, 1);
        let held = slots.acquire(ip("192.0.2.7")).await.expect("slot");
        let mut waiting = Vec::new();
        for _ in 0..WAITING_PER_SLOT {
            let slots = slots.clone();
            waiting.push(tokio::spawn(async move {
                slots.acquire(ip("192.0.2.7")).await.map(drop)
            }));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            slots.acquire(ip("192.0.2.7")).await.err(),
            Some(Refusal::SourceBusy)
        );
        drop(held);
        for w in waiting {
            w.await
                .expect("task")
                .expect("each waiting connection is served in turn");
        }
        assert_eq!(
            slots.sources(),
            0,
            "no state left for a source that is gone"
        );
        assert_eq!(slots.available(), 8);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_and_takes_connections_again_when_it_drains() {
        let slots = HandshakeSlots::new(2, 2);
        let held = [
            slots.acquire(ip("10.0.0.1")).await.expect("slot"),
            slots.acquire(ip("10.0.0.2")).await.expect("slot"),
        ];
        let mut waiting = Vec::new();
        for n in 0..(2 * QUEUED_PER_SLOT - 2) {
            let slots = slots.clone();
            let peer = ip(&format!("10.0.1.{n}"));
            waiting.push(tokio::spawn(
                async move { slots.acquire(peer).await.map(drop) },
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Every other source too: the bound is on the endpoint, not on one address.
        assert_eq!(
            tokio::time::timeout(Duration::from_millis(50), slots.acquire(ip("10.0.2.1")))
                .await
                .expect("refused at once, not queued")
                .err(),
            Some(Refusal::Busy)
        );
        drop(held);
        for w in waiting {
            w.await.expect("task").expect("queued ones are served");
        }
        let _again = slots
            .acquire(ip("10.0.2.1"))
            .await
            .expect("served once the queue drained");
        assert_eq!(slots.sources(), 1);
    }

    #[test]
    fn ipv6_sources_count_by_their_slash_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            source_key(ip("2001:db8:1:2:aaaa::1")),
            source_key(ip("2001:db8:1:2:bbbb::9"))
        );
        assert_ne!(
            source_key(ip("2001:db8:1:2::1")),
            source_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(source_key(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
    }
}
