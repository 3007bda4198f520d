//! The consumer side of the autoscaler stream (what `sluice autoscale` runs): follow one or
//! more nodes' `GET /autoscaler/stream`, add up each server's in-flight requests over the
//! nodes, run the scaling rule ([`sluice_routing::Recommender`]), and write every changed
//! desired replica count to a [`DesiredSink`] (etcd `<prefix>desired/<server>`, or a JSON
//! file) for an orchestrator to act on.
//!
//! - Each record is combined with the latest record of the same server from every other
//!   node (records older than `stale_after` are ignored), and fed to the recommender
//!   stamped with the autoscaler's own clock, so node clock skew cannot reorder history.
//! - The policy comes from the record's `scale` field (the proxy includes it); records
//!   without one are skipped.
//! - Streams reconnect with capped exponential backoff; a failed sink write is retried on
//!   the server's next record.
//! - On start the sink's stored counts seed the recommender, so a restart does not reset
//!   anything.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sluice_routing::backoff::Backoff;
use sluice_routing::{DesiredReplicas, Recommender, ServerRecord};
use sluice_store::etcd::{EtcdError, EtcdStore};
use tokio::sync::mpsc;

use sluice_proxy::follow_autoscaler_stream;

/// Where desired replica counts go.
#[derive(Debug)]
pub enum DesiredSink {
    /// etcd: one key per server, `<prefix>desired/<server>` (JSON [`DesiredReplicas`]).
    /// Boxed: the client is large.
    Etcd(Box<EtcdStore>),
    /// A JSON file `{"<server>": {"server":..,"replicas":..,"ts":..}, ...}`, rewritten
    /// atomically (temporary file + rename) on every change.
    File(PathBuf),
}

/// A sink read or write failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// etcd failed.
    #[error("etcd: {0}")]
    Etcd(#[from] EtcdError),
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file holds something else than desired counts.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl DesiredSink {
    /// The counts stored now (to seed the recommender).
    pub async fn load(&self) -> Result<Vec<DesiredReplicas>, SinkError> {
        match self {
            DesiredSink::Etcd(store) => {
                let listing = store.list_desired().await?;
                for m in &listing.malformed {
                    tracing::warn!(key = %m.key, "ignoring a malformed desired count: {}", m.reason);
                }
                Ok(listing.items)
            }
            DesiredSink::File(path) => match tokio::fs::read(path).await {
                Ok(bytes) => {
                    let map: BTreeMap<String, DesiredReplicas> = serde_json::from_slice(&bytes)
                        .map_err(|e| SinkError::Format {
                            path: path.clone(),
                            reason: e.to_string(),
                        })?;
                    Ok(map.into_values().collect())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
                Err(source) => Err(SinkError::Io { path: path.clone(), source }),
            },
        }
    }

    /// Store one changed count; `all` is every count decided so far (the file sink
    /// rewrites them all).
    pub async fn write(
        &self,
        changed: &DesiredReplicas,
        all: &BTreeMap<String, DesiredReplicas>,
    ) -> Result<(), SinkError> {
        match self {
            DesiredSink::Etcd(store) => {
                store.put_desired(changed).await?;
                Ok(())
            }
            DesiredSink::File(path) => {
                let io = |source| SinkError::Io { path: path.clone(), source };
                let json = serde_json::to_vec_pretty(all)
                    .map_err(|e| SinkError::Format { path: path.clone(), reason: e.to_string() })?;
                let mut tmp = path.clone().into_os_string();
                tmp.push(".tmp");
                let tmp = PathBuf::from(tmp);
                tokio::fs::write(&tmp, json).await.map_err(io)?;
                tokio::fs::rename(&tmp, path).await.map_err(io)
            }
        }
    }
}

/// Settings of [`run_autoscaler`].
#[derive(Debug, Clone)]
pub struct AutoscalerSettings {
    /// Admin listeners of the nodes to follow.
    pub nodes: Vec<SocketAddr>,
    /// A node's numbers for a server are ignored once this old.
    pub stale_after: Duration,
    /// Longest wait between reconnection attempts.
    pub reconnect_max: Duration,
}

impl AutoscalerSettings {
    /// Follow `nodes` with the defaults (stale after 5 s, reconnect backoff up to 5 s).
    pub fn new(nodes: Vec<SocketAddr>) -> Self {
        AutoscalerSettings {
            nodes,
            stale_after: Duration::from_secs(5),
            reconnect_max: Duration::from_secs(5),
        }
    }
}

/// Run until `shutdown` resolves. Fails only if the sink cannot be read at start.
pub async fn run_autoscaler(
    settings: AutoscalerSettings,
    sink: DesiredSink,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SinkError> {
    let mut recommender = Recommender::new();
    let mut written: BTreeMap<String, DesiredReplicas> = BTreeMap::new();
    for d in sink.load().await? {
        recommender.seed(&d.server, d.replicas);
        written.insert(d.server.clone(), d);
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, ServerRecord)>();
    let followers: Vec<_> = settings
        .nodes
        .iter()
        .enumerate()
        .map(|(i, &addr)| tokio::spawn(follow(i, addr, settings.reconnect_max, tx.clone())))
        .collect();
    drop(tx);
    let mut agg = Aggregate::default();
    tokio::pin!(shutdown);
    loop {
        let (node, rec) = tokio::select! {
            _ = &mut shutdown => break,
            r = rx.recv() => match r {
                Some(r) => r,
                None => break,
            },
        };
        let Some(policy) = rec.scale.clone() else {
            tracing::debug!(server = %rec.server, "record without a scaling policy: skipped");
            continue;
        };
        let combined = agg.combine(node, rec, Instant::now(), settings.stale_after, unix_ms());
        let decision = recommender.observe(&policy, &combined);
        if written.get(&combined.server).is_some_and(|w| w.replicas == decision.desired) {
            continue;
        }
        let d = DesiredReplicas {
            server: combined.server.clone(),
            replicas: decision.desired,
            ts: combined.ts,
        };
        let mut all = written.clone();
        all.insert(d.server.clone(), d.clone());
        match sink.write(&d, &all).await {
            Ok(()) => {
                tracing::info!(
                    server = %d.server,
                    desired = d.replicas,
                    in_flight = combined.in_flight,
                    "desired replicas changed"
                );
                written = all;
            }
            // Retried on the server's next record: `written` still differs.
            Err(e) => tracing::warn!(server = %d.server, "writing the desired count: {e}"),
        }
    }
    for f in followers {
        f.abort();
    }
    Ok(())
}

async fn follow(
    node: usize,
    addr: SocketAddr,
    reconnect_max: Duration,
    tx: mpsc::UnboundedSender<(usize, ServerRecord)>,
) {
    // Jittered, so the proxies of a region are not all reconnected to at once.
    let mut backoff = Backoff::new(Duration::from_millis(100), reconnect_max);
    loop {
        let mut got = false;
        let res = follow_autoscaler_stream(addr, |rec| {
            got = true;
            let _ = tx.send((node, rec));
        })
        .await;
        if tx.is_closed() {
            return;
        }
        match res {
            Ok(()) => tracing::warn!(%addr, "autoscaler stream ended; reconnecting"),
            Err(e) => tracing::warn!(%addr, "autoscaler stream: {e}; reconnecting"),
        }
        if got {
            backoff.reset();
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The latest in-flight count of every server on every node.
#[derive(Debug, Default)]
struct Aggregate {
    latest: HashMap<String, HashMap<usize, (u64, Instant)>>,
}

impl Aggregate {
    /// `rec` with its in-flight replaced by the sum over nodes (fresh ones only) and its
    /// timestamp by `now_ms`.
    fn combine(
        &mut self,
        node: usize,
        mut rec: ServerRecord,
        now: Instant,
        stale_after: Duration,
        now_ms: u64,
    ) -> ServerRecord {
        let nodes = self.latest.entry(rec.server.clone()).or_default();
        nodes.insert(node, (rec.in_flight, now));
        nodes.retain(|_, (_, at)| now.duration_since(*at) <= stale_after);
        rec.in_flight = nodes.values().map(|(n, _)| n).sum();
        rec.ts = now_ms;
        rec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(server: &str, in_flight: u64) -> ServerRecord {
        ServerRecord {
            server: server.into(),
            ts: 1,
            in_flight,
            replicas: vec![],
            request_rate: 0.0,
            no_replica_503: 0,
            scale: None,
        }
    }

    #[test]
    fn sums_fresh_nodes_only() {
        let mut a = Aggregate::default();
        let t0 = Instant::now();
        let stale = Duration::from_secs(5);
        assert_eq!(a.combine(0, rec("s", 3), t0, stale, 10).in_flight, 3);
        let c = a.combine(1, rec("s", 4), t0, stale, 11);
        assert_eq!((c.in_flight, c.ts), (7, 11));
        assert_eq!(a.combine(0, rec("s", 1), t0, stale, 12).in_flight, 5);
        assert_eq!(a.combine(0, rec("other", 9), t0, stale, 12).in_flight, 9);
        // Node 1 goes quiet: its 4 stops counting.
        let later = t0 + Duration::from_secs(6);
        assert_eq!(a.combine(0, rec("s", 2), later, stale, 13).in_flight, 2);
    }
}
