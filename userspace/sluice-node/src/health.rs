//! Replica lifecycle run by sluice: active TCP health checks.
//!
//! The dialing lives here, beside the other node controllers, so that `sluice-routing`
//! stays free of I/O: the routing table only feeds this checker replica changes
//! ([`RoutingTable::attach_replica_events`]) and takes its verdicts
//! ([`RoutingTable::report_health`]).
//!
//! A replica in state `ready` is checked by connecting to its address every `interval`.
//! With `require_initial_check` (the default), it is routable only after a first connect
//! succeeds; after `failure_threshold` consecutive failures it leaves the rotation (so a
//! dead replica is out within about `interval × failure_threshold`), and it returns on the
//! next success. Starting and draining replicas are not checked (they get no new requests
//! anyway). The checker learns about replica changes from the table itself, with no scan:
//! each change costs O(1) here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio::time::MissedTickBehavior;

use sluice_routing::{Health, ReplicaEvent, ReplicaSpec, ReplicaState, RoutingTable};

/// How replicas are checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Time between checks of one replica.
    pub interval: Duration,
    /// A connect that takes longer than this fails.
    pub timeout: Duration,
    /// Consecutive failures before a replica leaves the rotation (at least 1).
    pub failure_threshold: u32,
    /// Whether a `ready` replica must pass a first check before it is routable. When
    /// false, replicas are routable until proven dead.
    pub require_initial_check: bool,
    /// Bound on checks in flight at once, so a bulk load of many replicas does not turn
    /// into a connection storm.
    pub max_concurrent_checks: usize,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            failure_threshold: 3,
            require_initial_check: true,
            max_concurrent_checks: 256,
        }
    }
}

/// A running health checker. Dropping it stops the checks (as does [`shutdown`]).
///
/// [`shutdown`]: HealthChecker::shutdown
#[derive(Debug)]
pub struct HealthChecker {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    table: RoutingTable,
    /// Identifies this checker's feed in the table (so stopping it never detaches another).
    feed: mpsc::UnboundedSender<ReplicaEvent>,
}

impl HealthChecker {
    /// Start checking the replicas of `table` (must be called inside a tokio runtime).
    ///
    /// Start it before the first document is loaded: with `require_initial_check`, replicas
    /// that were routable on trust become unroutable until their first check (normally a
    /// millisecond later).
    pub fn spawn(table: RoutingTable, policy: HealthPolicy) -> Self {
        let policy = HealthPolicy {
            failure_threshold: policy.failure_threshold.max(1),
            max_concurrent_checks: policy.max_concurrent_checks.max(1),
            ..policy
        };
        table.set_health_gate(policy.require_initial_check);
        let (tx, rx) = mpsc::unbounded_channel();
        let initial = table.attach_replica_events(tx.clone());
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(run(table.clone(), policy, initial, rx, stop_rx));
        HealthChecker { stop: Some(stop_tx), task: Some(task), table, feed: tx }
    }

    /// Stop all checks and wait for the checker to finish. The table stops requiring health
    /// checks (new replicas are trusted again); verdicts already made stay, so a replica
    /// found dead stays out of rotation.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.detach();
    }

    fn detach(&self) {
        if self.table.detach_replica_events(&self.feed) {
            self.table.set_health_gate(false);
        }
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.detach();
    }
}

type Key = (Arc<str>, Arc<str>);

async fn run(
    table: RoutingTable,
    policy: HealthPolicy,
    initial: Vec<Arc<ReplicaSpec>>,
    mut events: mpsc::UnboundedReceiver<ReplicaEvent>,
    mut stop: oneshot::Receiver<()>,
) {
    let limit = Arc::new(Semaphore::new(policy.max_concurrent_checks));
    let mut tasks = JoinSet::new();
    let mut running: HashMap<Key, (SocketAddr, AbortHandle)> = HashMap::new();
    let mut update = |tasks: &mut JoinSet<()>, key: Key, spec: Option<Arc<ReplicaSpec>>| {
        let want = spec.filter(|s| s.state == ReplicaState::Ready);
        match want {
            Some(spec) => {
                if running.get(&key).is_some_and(|(a, _)| *a == spec.address) {
                    return;
                }
                if let Some((_, h)) = running.remove(&key) {
                    h.abort();
                }
                let h = tasks.spawn(check_loop(
                    table.clone(),
                    policy.clone(),
                    limit.clone(),
                    key.clone(),
                    spec.address,
                ));
                running.insert(key, (spec.address, h));
            }
            None => {
                if let Some((_, h)) = running.remove(&key) {
                    h.abort();
                }
            }
        }
    };
    for spec in initial {
        let key: Key = (Arc::from(spec.server.as_str()), Arc::from(spec.id.as_str()));
        update(&mut tasks, key, Some(spec));
    }
    loop {
        tokio::select! {
            _ = &mut stop => break,
            ev = events.recv() => match ev {
                Some(ev) => update(&mut tasks, (ev.server, ev.id), ev.spec),
                None => break,
            },
            // Reap finished (aborted) tasks so the set does not grow.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.shutdown().await;
}

async fn check_loop(
    table: RoutingTable,
    policy: HealthPolicy,
    limit: Arc<Semaphore>,
    (server, id): Key,
    addr: SocketAddr,
) {
    let mut ticker = tokio::time::interval(policy.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failures: u32 = 0;
    let mut reported: Option<Health> = None;
    loop {
        // The first tick completes at once: new replicas are checked immediately.
        ticker.tick().await;
        let ok = {
            let Ok(_permit) = limit.acquire().await else {
                return;
            };
            probe(addr, policy.timeout).await
        };
        let verdict = if ok {
            failures = 0;
            Some(Health::Healthy)
        } else {
            failures = failures.saturating_add(1);
            (failures >= policy.failure_threshold).then_some(Health::Unhealthy)
        };
        match verdict {
            Some(h) if reported != Some(h) => {
                if h == Health::Unhealthy {
                    tracing::warn!(server = &*server, replica = &*id, %addr, failures, "replica failed health checks; out of rotation");
                } else if reported == Some(Health::Unhealthy) {
                    tracing::info!(server = &*server, replica = &*id, %addr, "replica healthy again; back in rotation");
                }
                table.report_health(&server, &id, Some(h), Some(addr));
                reported = Some(h);
            }
            None if reported.is_none() => {
                // A failed first check: not a verdict yet, but the fence may move on.
                table.report_health(&server, &id, None, Some(addr));
                reported = Some(Health::Unknown);
            }
            _ => {}
        }
    }
}

/// One check: does the port accept a TCP connection within `timeout`?
async fn probe(addr: SocketAddr, timeout: Duration) -> bool {
    matches!(tokio::time::timeout(timeout, TcpStream::connect(addr)).await, Ok(Ok(_)))
}
