//! Leader election over a coordination.k8s.io Lease, with client-go's semantics: the holder
//! renews every retry period; another replica takes the Lease over once it has seen the same
//! record unchanged for the lease duration (measured on its own clock, so replicas' clocks need
//! not agree); every write carries the resourceVersion it read, so two replicas never both win;
//! a holder that cannot renew for the renew deadline stops its once-only work; a graceful stop
//! releases the Lease at once. [`while_leading`] runs a piece of once-only work only while this
//! replica holds the Lease.

use std::future::Future;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::ElectionTiming;

/// Whether this replica leads, and who does as far as it knows; shared with the metrics and
/// the health check. The holder's name sits behind a std mutex held only to copy it.
#[derive(Debug)]
pub struct Leadership {
    leading: watch::Sender<bool>,
    holder: Mutex<Option<String>>,
    metrics: Arc<super::HaMetrics>,
}

impl Leadership {
    /// Not leading until the Lease is won.
    pub fn new(metrics: Arc<super::HaMetrics>) -> Arc<Leadership> {
        Arc::new(Leadership {
            leading: watch::Sender::new(false),
            holder: Mutex::new(None),
            metrics,
        })
    }

    /// Leading from the start (`--leader-elect=false`, or embedded mode).
    pub fn always(replica_id: &str, metrics: Arc<super::HaMetrics>) -> Arc<Leadership> {
        let leadership = Leadership::new(metrics);
        leadership.set(true, Some(replica_id.to_string()));
        leadership
    }

    /// Whether this replica holds the Lease now.
    pub fn is_leader(&self) -> bool {
        *self.leading.borrow()
    }

    /// The replica that held the Lease at the last look, if any.
    pub fn holder(&self) -> Option<String> {
        self.holder
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, leading: bool, holder: Option<String>) {
        *self.holder.lock().unwrap_or_else(|p| p.into_inner()) = holder;
        let changed = self.leading.send_if_modified(|now| {
            let changed = *now != leading;
            *now = leading;
            changed
        });
        if changed && leading {
            self.metrics.leader_transitions.inc();
        }
        self.metrics.leader.set(i64::from(leading));
    }
}

/// The part of a Lease the decision reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub holder: Option<String>,
    pub duration: std::time::Duration,
    /// `renewTime` as written: compared only for change, never as a clock.
    pub renew_time: Option<String>,
    pub transitions: i32,
}

impl Record {
    fn of(lease: &Lease) -> Record {
        let spec = lease.spec.clone().unwrap_or_default();
        Record {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            duration: std::time::Duration::from_secs(
                spec.lease_duration_seconds.unwrap_or(0).max(0) as u64,
            ),
            renew_time: spec.renew_time.and_then(|t| serde_json::to_string(&t).ok()),
            transitions: spec.lease_transitions.unwrap_or(0),
        }
    }
}

/// What to do with the Lease at one try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// There is none: create it, held by us.
    Create,
    /// We hold it: renew.
    Renew,
    /// Nobody holds it, or its holder stopped renewing: take it over.
    TakeOver,
    /// Another replica holds it and renews.
    Wait { holder: String },
}

/// The decision at `now`, given the record and when this replica first saw it as it is.
pub fn decide(record: Option<&Record>, me: &str, seen_since: Instant, now: Instant) -> Step {
    let Some(record) = record else {
        return Step::Create;
    };
    match &record.holder {
        Some(holder) if holder == me => Step::Renew,
        None => Step::TakeOver,
        Some(holder) => {
            if now.duration_since(seen_since) >= record.duration {
                Step::TakeOver
            } else {
                Step::Wait {
                    holder: holder.clone(),
                }
            }
        }
    }
}

/// The Lease could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("cannot read the leader-election Lease {namespace}/{name}")]
    Read {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot write the leader-election Lease {namespace}/{name}")]
    Write {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// One replica's view of the Lease between tries.
struct Elector {
    api: Api<Lease>,
    name: String,
    namespace: String,
    me: String,
    timing: ElectionTiming,
    /// The record as last read and since when (this replica's clock) it has been so.
    observed: Option<(Record, Instant)>,
}

/// The outcome of one try.
enum Tried {
    Leading,
    Following { holder: Option<String> },
}

impl Elector {
    async fn try_once(&mut self) -> Result<Tried, LeaseError> {
        let read_err = |source| LeaseError::Read {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        };
        let now = Instant::now();
        let lease = self.api.get_opt(&self.name).await.map_err(read_err)?;
        let record = lease.as_ref().map(Record::of);
        let seen_since = match (&self.observed, &record) {
            (Some((old, since)), Some(new)) if old == new => *since,
            _ => now,
        };
        self.observed = record.clone().map(|r| (r, seen_since));
        let step = decide(record.as_ref(), &self.me, seen_since, now);
        let written = match step {
            Step::Wait { holder } => {
                return Ok(Tried::Following {
                    holder: Some(holder),
                });
            }
            Step::Create => {
                let lease = self.lease_value(None, 0, true);
                self.api.create(&PostParams::default(), &lease).await
            }
            Step::Renew | Step::TakeOver => {
                let Some(current) = lease else {
                    return Ok(Tried::Following { holder: None });
                };
                let record = record.unwrap_or_else(|| Record::of(&current));
                let acquiring = step == Step::TakeOver;
                let transitions = record.transitions + i32::from(acquiring);
                let mut next = self.lease_value(
                    current.metadata.resource_version.clone(),
                    transitions,
                    acquiring,
                );
                if !acquiring {
                    // Renewing keeps the acquire time the holder wrote.
                    if let (Some(spec), Some(old)) = (next.spec.as_mut(), current.spec.as_ref()) {
                        spec.acquire_time = old.acquire_time.clone();
                    }
                }
                self.api
                    .replace(&self.name, &PostParams::default(), &next)
                    .await
            }
        };
        match written {
            Ok(lease) => {
                self.observed = Some((Record::of(&lease), Instant::now()));
                Ok(Tried::Leading)
            }
            // Another replica wrote first (create or resourceVersion conflict): it leads.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Tried::Following {
                holder: self.observed.as_ref().and_then(|(r, _)| r.holder.clone()),
            }),
            Err(source) => Err(LeaseError::Write {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                source,
            }),
        }
    }

    /// The Lease held by us from now, with `resource_version` as the write's precondition.
    fn lease_value(
        &self,
        resource_version: Option<String>,
        transitions: i32,
        acquiring: bool,
    ) -> Lease {
        let now = micro_now();
        let mut spec = json!({
            "holderIdentity": self.me,
            "leaseDurationSeconds": self.timing.lease_duration.as_secs(),
            "renewTime": now,
            "leaseTransitions": transitions,
        });
        if acquiring {
            spec["acquireTime"] = json!(now);
        }
        let mut metadata = json!({"name": self.name, "namespace": self.namespace});
        if let Some(rv) = resource_version {
            metadata["resourceVersion"] = json!(rv);
        }
        serde_json::from_value(json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": spec,
        }))
        .expect("a Lease built from known fields")
    }

    /// Gives the Lease up at a graceful stop, as client-go's ReleaseOnCancel: no holder and a
    /// one-second duration, so the next replica takes it at its next try.
    async fn release(&mut self) {
        let Ok(Some(current)) = self.api.get_opt(&self.name).await else {
            return;
        };
        if Record::of(&current).holder.as_deref() != Some(self.me.as_str()) {
            return;
        }
        let mut next = self.lease_value(
            current.metadata.resource_version.clone(),
            Record::of(&current).transitions,
            false,
        );
        if let Some(spec) = next.spec.as_mut() {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.acquire_time = current.spec.as_ref().and_then(|s| s.acquire_time.clone());
        }
        match self
            .api
            .replace(&self.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.name, "leader-election lease released"),
            Err(e) => {
                tracing::warn!(lease = %self.name, error = %e, "cannot release the leader-election lease")
            }
        }
    }
}

fn micro_now() -> String {
    let now = time::OffsetDateTime::now_utc();
    let micros = now.nanosecond() / 1000;
    let whole = now
        .replace_nanosecond(0)
        .unwrap_or(now)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    format!("{}.{micros:06}Z", whole.trim_end_matches('Z'))
}

/// Competes for the Lease `name` in `namespace` until `shutdown`, recording the outcome in
/// `leadership`; releases it at a graceful stop.
pub async fn run(
    client: kube::Client,
    name: String,
    namespace: String,
    me: String,
    timing: ElectionTiming,
    leadership: Arc<Leadership>,
    shutdown: CancellationToken,
) {
    let mut elector = Elector {
        api: Api::namespaced(client, &namespace),
        name,
        namespace,
        me,
        timing,
        observed: None,
    };
    tracing::info!(
        lease = %elector.name,
        namespace = %elector.namespace,
        replica = %elector.me,
        "competing for the leader-election lease"
    );
    let mut last_renewed: Option<Instant> = None;
    loop {
        let tried = tokio::select! {
            _ = shutdown.cancelled() => break,
            tried = elector.try_once() => tried,
        };
        match tried {
            Ok(Tried::Leading) => {
                if !leadership.is_leader() {
                    tracing::info!(replica = %elector.me, "leading: this replica runs the once-only work");
                }
                last_renewed = Some(Instant::now());
                leadership.set(true, Some(elector.me.clone()));
            }
            // Our own renewal lost a write race (a 409 on a record still naming us): like a
            // failed renewal, kept until the renew deadline.
            Ok(Tried::Following { holder })
                if holder.as_deref() == Some(elector.me.as_str())
                    && last_renewed
                        .is_some_and(|t| t.elapsed() < elector.timing.renew_deadline) => {}
            Ok(Tried::Following { holder }) => {
                if leadership.is_leader() {
                    tracing::warn!(holder = ?holder, "another replica took the leader-election lease");
                }
                last_renewed = None;
                leadership.set(false, holder);
            }
            Err(e) => {
                let refused = matches!(
                    &e,
                    LeaseError::Read { source: kube::Error::Api(a), .. }
                        | LeaseError::Write { source: kube::Error::Api(a), .. }
                        if a.code == 403 || a.code == 404
                );
                if refused {
                    tracing::error!(
                        error = %daemon::error_chain(&e),
                        "leader election is refused: the once-only work (autonomy tolerations) does not run; create the namespace and apply deploy/kubernetes/rbac.yaml's cloudcore-shared-state Role there, or run a lone replica with --leader-elect=false"
                    );
                } else {
                    tracing::warn!(error = %daemon::error_chain(&e), "leader election");
                }
                let expired =
                    last_renewed.is_none_or(|t| t.elapsed() >= elector.timing.renew_deadline);
                if leadership.is_leader() && expired {
                    tracing::warn!(
                        "could not renew the leader-election lease within the renew deadline; stopping the once-only work"
                    );
                    leadership.set(false, None);
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(elector.timing.retry_period) => {}
        }
    }
    if leadership.is_leader() {
        leadership.set(false, None);
        elector.release().await;
    }
}

/// Runs `work` whenever this replica leads: started with its own cancellation token when the
/// Lease is won, cancelled (and awaited) when it is lost, started again when won again.
pub async fn while_leading<F, Fut>(
    leadership: Arc<Leadership>,
    what: &'static str,
    shutdown: CancellationToken,
    work: F,
) where
    F: Fn(CancellationToken) -> Fut + Send,
    Fut: Future<Output = ()> + Send,
{
    let mut leading = leadership.leading.subscribe();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            won = leading.wait_for(|l| *l) => if won.map(|_| ()).is_err() { return },
        }
        tracing::info!(work = what, "leading: starting");
        let stop = shutdown.child_token();
        let running = work(stop.clone());
        tokio::pin!(running);
        tokio::select! {
            _ = &mut running => {}
            _ = async { leading.wait_for(|l| !*l).await.map(|_| ()) } => {
                tracing::info!(work = what, "no longer leading: stopping");
                stop.cancel();
                running.await;
            }
        }
        if shutdown.is_cancelled() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn held_by(holder: &str) -> Record {
        Record {
            holder: Some(holder.into()),
            duration: Duration::from_secs(15),
            renew_time: Some("t1".into()),
            transitions: 3,
        }
    }

    #[test]
    fn decisions_follow_client_go() {
        let t0 = Instant::now();
        let later = |s| t0 + Duration::from_secs(s);
        assert_eq!(decide(None, "a", t0, t0), Step::Create);
        assert_eq!(decide(Some(&held_by("a")), "a", t0, later(60)), Step::Renew);
        assert_eq!(
            decide(Some(&held_by("b")), "a", t0, later(14)),
            Step::Wait { holder: "b".into() },
            "a holder renewing within the lease duration keeps it"
        );
        assert_eq!(
            decide(Some(&held_by("b")), "a", t0, later(15)),
            Step::TakeOver,
            "a record unchanged for the lease duration is taken over"
        );
        let released = Record {
            holder: None,
            ..held_by("b")
        };
        assert_eq!(decide(Some(&released), "a", t0, t0), Step::TakeOver);
    }

    #[tokio::test]
    async fn work_runs_only_while_leading() {
        let leadership = Leadership::new(Arc::default());
        let shutdown = CancellationToken::new();
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let running = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = tokio::spawn(while_leading(
            leadership.clone(),
            "test",
            shutdown.clone(),
            {
                let (runs, running) = (runs.clone(), running.clone());
                move |stop: CancellationToken| {
                    let (runs, running) = (runs.clone(), running.clone());
                    async move {
                        runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        running.store(true, std::sync::atomic::Ordering::SeqCst);
                        stop.cancelled().await;
                        running.store(false, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            },
        ));
        let settle = || tokio::time::sleep(Duration::from_millis(10));
        settle().await;
        assert!(!running.load(std::sync::atomic::Ordering::SeqCst));
        leadership.set(true, Some("me".into()));
        settle().await;
        assert!(running.load(std::sync::atomic::Ordering::SeqCst));
        leadership.set(false, Some("other".into()));
        settle().await;
        assert!(!running.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(leadership.holder().as_deref(), Some("other"));
        leadership.set(true, Some("me".into()));
        settle().await;
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(leadership.metrics.leader.get(), 1);
        shutdown.cancel();
        task.await.unwrap();
    }
}
