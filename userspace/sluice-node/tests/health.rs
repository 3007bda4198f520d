//! Health checks over real sockets: a replica enters rotation once its port accepts
//! connections, leaves it after repeated failures, and returns when healthy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use sluice_node::health::{HealthChecker, HealthPolicy};
use sluice_routing::{
    Change, NodeConfig, ReplicaSpec, ReplicaState, RoutingDoc, RoutingTable, ServerSpec,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const DEADLINE: Duration = Duration::from_secs(10);

fn policy() -> HealthPolicy {
    HealthPolicy {
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(500),
        failure_threshold: 2,
        require_initial_check: true,
        max_concurrent_checks: 16,
    }
}

/// A listener that accepts and drops connections until aborted.
async fn listen(addr: SocketAddr) -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind(addr).await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            if let Ok((s, _)) = l.accept().await {
                drop(s);
            }
        }
    });
    (addr, task)
}

/// A loopback address nothing listens on (bound then released).
async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

fn routable(table: &RoutingTable, server: &str) -> Vec<String> {
    let snap = table.load();
    snap.server(server)
        .map(|s| s.replicas.iter().map(|r| r.id.clone()).collect())
        .unwrap_or_default()
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn table_with(replicas: Vec<ReplicaSpec>) -> RoutingTable {
    let node = NodeConfig { base_domains: vec!["example.com".into()], regions: vec!["r1".into()] };
    let doc = RoutingDoc { servers: vec![ServerSpec::new("s", "s")], replicas, tokens: vec![] };
    RoutingTable::from_doc(node, doc).unwrap()
}

#[tokio::test]
async fn replica_leaves_and_returns() {
    let (addr, accept) = listen("127.0.0.1:0".parse().unwrap()).await;
    let dead = dead_addr().await;
    let table =
        table_with(vec![ReplicaSpec::new("s", "live", addr), ReplicaSpec::new("s", "dead", dead)]);
    assert_eq!(routable(&table, "s"), ["dead", "live"], "trusted before a checker runs");

    let checker = HealthChecker::spawn(table.clone(), policy());
    // The gate is on at once: nothing is routable before its first check.
    assert!(routable(&table, "s").len() < 2);
    eventually("live replica routable", || routable(&table, "s") == ["live"]).await;

    // Close the port: out of rotation after `failure_threshold` failed checks.
    accept.abort();
    let _ = accept.await;
    eventually("closed replica leaves rotation", || routable(&table, "s").is_empty()).await;
    let view = serde_json::to_value(table.load().state_view()).unwrap();
    assert_eq!(view["servers"][0]["replicas"][1]["health"], "unhealthy", "{view}");

    // Reopen the same port: back in rotation.
    let (_, accept) = listen(addr).await;
    eventually("reopened replica returns", || routable(&table, "s") == ["live"]).await;

    // Draining: no new requests, and no longer checked.
    let mut draining = ReplicaSpec::new("s", "live", addr);
    draining.state = ReplicaState::Draining;
    table.apply(vec![Change::PutReplica(draining)], 10).unwrap();
    assert!(routable(&table, "s").is_empty());

    checker.shutdown().await;
    accept.abort();
}

#[tokio::test]
async fn fence_waits_for_first_check() {
    let (addr, accept) = listen("127.0.0.1:0".parse().unwrap()).await;
    let table = table_with(vec![]);
    // An hour-long interval proves the fence waits for the immediate first check, not a
    // periodic one.
    let slow = HealthPolicy { interval: Duration::from_secs(3600), ..policy() };
    let checker = HealthChecker::spawn(table.clone(), slow);
    assert!(table.wait_for_generation(1, DEADLINE).await);

    table.apply(vec![Change::PutReplica(ReplicaSpec::new("s", "new", addr))], 5).unwrap();
    assert_eq!(table.generation(), 5);
    assert!(table.wait_for_generation(5, DEADLINE).await);
    assert_eq!(routable(&table, "s"), ["new"], "routable once the fence passes");

    // A replica whose port never opens does not hold the fence forever.
    let dead = dead_addr().await;
    table.apply(vec![Change::PutReplica(ReplicaSpec::new("s", "dead", dead))], 6).unwrap();
    assert!(table.wait_for_generation(6, DEADLINE).await);
    assert_eq!(routable(&table, "s"), ["new"]);

    // Deleting a replica stops its checks and removes it.
    table.apply(vec![Change::DeleteReplica { server: "s".into(), id: "new".into() }], 7).unwrap();
    assert!(table.wait_for_generation(7, DEADLINE).await);
    assert!(routable(&table, "s").is_empty());

    // Stopping the checker lifts the gate: replicas are trusted again, and the fence no
    // longer waits for checks.
    checker.shutdown().await;
    assert!(!table.load().health_gated());
    let other = dead_addr().await;
    table.apply(vec![Change::PutReplica(ReplicaSpec::new("s", "later", other))], 8).unwrap();
    assert!(table.wait_for_generation(8, Duration::from_millis(1)).await);
    // "dead" failed only its first check (below the threshold of 2), so it has no verdict
    // and is trusted again too.
    assert_eq!(routable(&table, "s"), ["dead", "later"]);
    accept.abort();
}

#[tokio::test]
async fn dropped_checker_releases_the_fence() {
    let table = table_with(vec![]);
    let checker = HealthChecker::spawn(table.clone(), policy());
    drop(checker);
    let dead = dead_addr().await;
    table.apply(vec![Change::PutReplica(ReplicaSpec::new("s", "r", dead))], 2).unwrap();
    assert!(table.wait_for_generation(2, Duration::from_millis(1)).await);
}

#[tokio::test]
async fn without_initial_check_replicas_are_trusted_until_dead() {
    let dead = dead_addr().await;
    let table = table_with(vec![ReplicaSpec::new("s", "dead", dead)]);
    let checker = HealthChecker::spawn(
        table.clone(),
        HealthPolicy { require_initial_check: false, ..policy() },
    );
    assert_eq!(routable(&table, "s"), ["dead"]);
    eventually("dead replica leaves rotation", || routable(&table, "s").is_empty()).await;
    drop(checker);
}
