//! The autoscaling signal: per-server records for `GET /autoscaler/stream` (newline-
//! delimited JSON, one record per server per interval) and the same numbers as
//! Prometheus text.
//!
//! The proxy runs **one** [`Sampler`] for its whole life, ticking every interval
//! (default 1 s) and fanning the records out to every stream subscriber, so the
//! per-interval deltas (request rate, `503`s for lack of a replica) are exact no matter
//! when a subscriber connects.
//!
//! A record:
//!
//! ```json
//! {"server":"srv-7f3a","ts":1795881600000,"in_flight":12,
//!  "replicas":[{"id":"r-1","in_flight":7},{"id":"r-2","in_flight":5}],
//!  "request_rate":41.5,"no_replica_503":0,
//!  "scale":{"target_concurrency":50,"min_replicas":1,"max_replicas":20,"buffer_replicas":1,
//!           "scale_up_window_ms":30000,"scale_down_window_ms":300000}}
//! ```
//!
//! `in_flight` is the server's total at the sampling instant (including requests still
//! finishing on draining replicas); `replicas` lists the routable replicas; `request_rate`
//! is requests routed to a replica per second over the interval; `no_replica_503` counts
//! the interval's `503`s for lack of a ready replica (scale-from-zero demand). `scale` is
//! the server's scaling policy, so a consumer needs no access to the store.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use crate::scaling::ScalePolicy;
use crate::snapshot::{Server, ServerStats, Snapshot};

/// One server's autoscaling record for one interval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerRecord {
    /// Server id.
    pub server: String,
    /// Sampling time, unix milliseconds.
    pub ts: u64,
    /// Requests in flight to the server at `ts`.
    pub in_flight: u64,
    /// Routable replicas and their in-flight requests at `ts`.
    pub replicas: Vec<ReplicaRecord>,
    /// Requests per second routed to a replica during the interval.
    pub request_rate: f64,
    /// `503`s answered during the interval because no replica was ready.
    pub no_replica_503: u64,
    /// The server's scaling policy (omitted by samplers configured without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<ScalePolicy>,
}

/// One replica in a [`ServerRecord`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    /// Replica id.
    pub id: String,
    /// Requests in flight to it at the sampling instant.
    pub in_flight: u64,
}

impl ServerRecord {
    /// Append this record as one JSON line (with the trailing newline) to `out`.
    pub fn write_ndjson(&self, out: &mut Vec<u8>) {
        // Serializing plain structs of strings and numbers into a Vec cannot fail; a
        // non-finite rate would serialize as null, which the reader rejects, so it is
        // never produced (see `Sampler::sample`).
        if serde_json::to_writer(&mut *out, self).is_ok() {
            out.push(b'\n');
        }
    }
}

/// Builds [`ServerRecord`]s from a snapshot's live counters, remembering the previous
/// counter values per server to report interval deltas.
#[derive(Debug)]
pub struct Sampler {
    prev: HashMap<Arc<str>, Prev>,
    last_ts: Option<u64>,
    include_policy: bool,
}

#[derive(Debug)]
struct Prev {
    stats: Arc<ServerStats>,
    requests: u64,
    no_replica: u64,
    /// Sampling round this entry was last refreshed in (to forget removed servers).
    round: u64,
}

impl Default for Sampler {
    fn default() -> Self {
        Sampler::new()
    }
}

impl Sampler {
    /// A sampler that includes each server's [`ScalePolicy`] in its records.
    pub fn new() -> Self {
        Sampler { prev: HashMap::new(), last_ts: None, include_policy: true }
    }

    /// Leave the `scale` field out of records (smaller lines for consumers that know
    /// the policies).
    pub fn without_policy(mut self) -> Self {
        self.include_policy = false;
        self
    }

    /// One record per server in `snapshot` (sorted by server id), at `now_ms` (unix
    /// milliseconds). Deltas are since the previous call; a server seen for the first
    /// time counts from zero (its counters start when it appears, so run the sampler
    /// from the proxy's start). Servers gone from the snapshot are forgotten.
    pub fn sample(&mut self, snapshot: &Snapshot, now_ms: u64) -> Vec<ServerRecord> {
        let elapsed_ms = self.last_ts.map(|t| now_ms.saturating_sub(t));
        self.last_ts = Some(now_ms);
        let round = now_ms;
        let mut out: Vec<ServerRecord> =
            snapshot.servers().map(|s| self.sample_server(s, now_ms, elapsed_ms, round)).collect();
        self.prev.retain(|_, p| p.round == round);
        out.sort_by(|a, b| a.server.cmp(&b.server));
        out
    }

    fn sample_server(
        &mut self,
        server: &Server,
        now_ms: u64,
        elapsed_ms: Option<u64>,
        round: u64,
    ) -> ServerRecord {
        let stats = &server.stats;
        let requests = stats.requests.load(Ordering::Relaxed);
        let no_replica = stats.no_replica.load(Ordering::Relaxed);
        let prev = self.prev.entry(Arc::from(server.id())).or_insert_with(|| Prev {
            stats: stats.clone(),
            requests: 0,
            no_replica: 0,
            round,
        });
        if !Arc::ptr_eq(&prev.stats, stats) {
            // The server was deleted and re-created: new counters from zero.
            *prev = Prev { stats: stats.clone(), requests: 0, no_replica: 0, round };
        }
        let d_requests = requests.saturating_sub(prev.requests);
        let d_no_replica = no_replica.saturating_sub(prev.no_replica);
        prev.requests = requests;
        prev.no_replica = no_replica;
        prev.round = round;
        let request_rate = match elapsed_ms {
            Some(ms) if ms > 0 => d_requests as f64 * 1000.0 / ms as f64,
            _ => 0.0,
        };
        ServerRecord {
            server: server.id().to_owned(),
            ts: now_ms,
            in_flight: stats.in_flight.load(Ordering::Relaxed),
            replicas: server
                .replicas
                .iter()
                .map(|r| ReplicaRecord {
                    id: r.id.clone(),
                    in_flight: r.stats.in_flight.load(Ordering::Relaxed),
                })
                .collect(),
            request_rate,
            no_replica_503: d_no_replica,
            scale: self.include_policy.then(|| ScalePolicy::from(&*server.spec)),
        }
    }
}

/// The servers that get per-server and per-replica metric series, sorted by id, and how
/// many were left out (`sluice_metrics_servers_omitted`).
///
/// At most `max_servers` servers are listed: those with the most requests routed (ties
/// by id, so the choice is stable between scrapes). A node may route 100k servers, and a
/// series per family for each would be over a million per scrape.
pub fn busiest_servers(snapshot: &Snapshot, max_servers: usize) -> (Vec<&Arc<Server>>, usize) {
    let mut servers: Vec<&Arc<Server>> = snapshot.servers().collect();
    let omitted = servers.len().saturating_sub(max_servers);
    if omitted > 0 {
        let busiest = |a: &&Arc<Server>, b: &&Arc<Server>| {
            let load = |s: &Server| s.stats.requests.load(Ordering::Relaxed);
            load(b).cmp(&load(a)).then_with(|| a.id().cmp(b.id()))
        };
        if max_servers > 0 {
            servers.select_nth_unstable_by(max_servers - 1, busiest);
        }
        servers.truncate(max_servers);
    }
    servers.sort_by(|a, b| a.id().cmp(b.id()));
    (servers, omitted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{NodeConfig, ReplicaSpec, RoutingDoc, ServerSpec};
    use crate::{Change, RoutingTable};

    fn table() -> RoutingTable {
        let mut a = ServerSpec::new("a", "a");
        a.target_concurrency = 5;
        let doc = RoutingDoc {
            servers: vec![a, ServerSpec::new("b", "b")],
            replicas: vec![
                ReplicaSpec::new("a", "r1", "127.0.0.1:1".parse().unwrap()),
                ReplicaSpec::new("a", "r2", "127.0.0.1:2".parse().unwrap()),
            ],
            tokens: vec![],
        };
        RoutingTable::from_doc(NodeConfig::default(), doc).unwrap()
    }

    #[test]
    fn records_report_in_flight_rates_and_demand() {
        let t = table();
        let mut sampler = Sampler::new();
        let snap = t.load_full();
        let first = sampler.sample(&snap, 1_000);
        assert_eq!(first.len(), 2);
        assert_eq!(first[0].server, "a");
        assert_eq!(first[0].request_rate, 0.0);
        assert_eq!(first[0].scale.as_ref().unwrap().target_concurrency, 5);
        assert!(first[1].replicas.is_empty());

        let a = snap.server("a").unwrap();
        let r1 = a.replicas[0].clone();
        let guards: Vec<_> = (0..10).map(|_| a.begin_request(&r1)).collect();
        snap.server("b").unwrap().stats.no_replica.fetch_add(3, Ordering::Relaxed);
        let recs = sampler.sample(&snap, 3_000);
        assert_eq!(recs[0].in_flight, 10);
        assert_eq!(
            recs[0].replicas,
            vec![
                ReplicaRecord { id: "r1".into(), in_flight: 10 },
                ReplicaRecord { id: "r2".into(), in_flight: 0 }
            ]
        );
        // 10 requests over 2 s.
        assert_eq!(recs[0].request_rate, 5.0);
        assert_eq!(recs[1].no_replica_503, 3);
        drop(guards);
        // Deltas reset each interval.
        let recs = sampler.sample(&snap, 4_000);
        assert_eq!(recs[0].in_flight, 0);
        assert_eq!(recs[0].request_rate, 0.0);
        assert_eq!(recs[1].no_replica_503, 0);

        // A deleted server is forgotten; re-created, it counts from zero.
        t.apply(vec![Change::DeleteServer("b".into())], 2).unwrap();
        assert_eq!(sampler.sample(&t.load_full(), 5_000).len(), 1);
        t.apply(vec![Change::PutServer(ServerSpec::new("b", "b"))], 3).unwrap();
        let snap = t.load_full();
        snap.server("b").unwrap().stats.no_replica.fetch_add(1, Ordering::Relaxed);
        let recs = sampler.sample(&snap, 6_000);
        assert_eq!(recs[1].no_replica_503, 1);
    }

    #[test]
    fn ndjson_round_trip() {
        let t = table();
        let mut sampler = Sampler::new();
        let recs = sampler.sample(&t.load_full(), 42);
        let mut buf = Vec::new();
        for r in &recs {
            r.write_ndjson(&mut buf);
        }
        let text = String::from_utf8(buf).unwrap();
        assert_eq!(text.lines().count(), 2);
        let back: Vec<ServerRecord> =
            text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(back, recs);
        assert!(text.starts_with(
            r#"{"server":"a","ts":42,"in_flight":0,"replicas":[{"id":"r1","in_flight":0}"#
        ));
        let mut lean = Sampler::new().without_policy();
        let rec = &lean.sample(&t.load_full(), 1)[0];
        let mut buf = Vec::new();
        rec.write_ndjson(&mut buf);
        assert!(!String::from_utf8(buf).unwrap().contains("scale"));
    }

    #[test]
    fn metric_series_are_bounded_to_the_busiest_servers() {
        let t = table();
        let snap = t.load_full();
        let ids = |v: Vec<&Arc<Server>>| v.iter().map(|s| s.id().to_owned()).collect::<Vec<_>>();
        let (all, omitted) = busiest_servers(&snap, usize::MAX);
        assert_eq!((ids(all), omitted), (vec!["a".to_owned(), "b".to_owned()], 0));
        // `b` has routed a request, `a` none: with room for one server, `b` is listed.
        let b = snap.server("b").unwrap();
        b.stats.requests.fetch_add(1, Ordering::Relaxed);
        let (one, omitted) = busiest_servers(&snap, 1);
        assert_eq!((ids(one), omitted), (vec!["b".to_owned()], 1));
        let (none, omitted) = busiest_servers(&snap, 0);
        assert_eq!((none.len(), omitted), (0, 2));
    }
}
