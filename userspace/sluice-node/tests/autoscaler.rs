//! The autoscale job (`sluice autoscale`'s library) against real proxies: it follows a
//! proxy's `GET /autoscaler/stream` and turns the demand of a server without replicas
//! into desired replica counts, in a JSON file or in a real etcd
//! (`<prefix>desired/<server>`) that the routing source then ignores.
//!
//! The etcd case needs `/usr/bin/etcd` (Debian's etcd-server, installed by
//! scripts/setup.sh; override with `SLUICE_ETCD_BIN`). Ports are ephemeral, every wait is
//! bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sluice_node::autoscaler::{AutoscalerSettings, DesiredSink, run_autoscaler};
use sluice_proxy::{Proxy, ProxyConfig};
use sluice_routing::{NodeConfig, RoutingDoc, RoutingTable, ServerSpec};
use sluice_store::etcd::{EtcdConfig, EtcdSource, EtcdStore};
use sluice_tests::etcd::Etcd;
use tokio::sync::oneshot;

const T: Duration = Duration::from_secs(10);

fn node() -> NodeConfig {
    NodeConfig { base_domains: vec!["example.test".into()], regions: vec!["r1".into()] }
}

fn cfg() -> ProxyConfig {
    let mut c = ProxyConfig::default();
    c.listeners[0].addr = "127.0.0.1:0".parse().unwrap();
    c.admin.addr = Some("127.0.0.1:0".parse().unwrap());
    c.autoscaler.interval = Duration::from_millis(100);
    c
}

fn server(id: &str) -> ServerSpec {
    let mut s = ServerSpec::new(id, id);
    s.unauthenticated = true;
    s
}

/// A proxy serving `table` until the returned sender is used or dropped:
/// (listener, admin, stop).
async fn start_proxy(table: RoutingTable) -> (SocketAddr, SocketAddr, oneshot::Sender<()>) {
    let proxy = Proxy::bind(cfg(), table).await.unwrap();
    let (addr, admin) = (proxy.local_addrs()[0], proxy.admin_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(proxy.run(async move {
        let _ = stopped.await;
    }));
    (addr, admin, stop)
}

/// One request for `host` on a fresh connection: the status code.
async fn status(addr: SocketAddr, host: &'static str) -> u16 {
    tokio::task::spawn_blocking(move || sluice_tests::process::http_get(addr, host, "/"))
        .await
        .unwrap()
        .expect("an answer")
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_autoscaler_turns_demand_into_desired_replicas() {
    let mut cold = server("cold");
    cold.buffer_replicas = 1;
    let doc = RoutingDoc { servers: vec![cold, server("idle")], replicas: vec![], tokens: vec![] };
    let (addr, admin, _stop) = start_proxy(RoutingTable::from_doc(node(), doc).unwrap()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("desired.json");
    let (stop, stopped) = oneshot::channel::<()>();
    let autoscaler = tokio::spawn(run_autoscaler(
        AutoscalerSettings::new(vec![admin]),
        DesiredSink::File(file.clone()),
        async move {
            let _ = stopped.await;
        },
    ));
    // Create demand until the autoscaler (following the stream) writes its decision.
    let deadline = Instant::now() + T;
    loop {
        assert_eq!(status(addr, "cold.r1.example.test").await, 503);
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(bytes) = tokio::fs::read(&file).await {
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            // Seen idle first, the server is written at 0; the demand (scale from zero: at
            // least one in flight, plus the buffer replica) makes it 2 at once.
            let n = v["cold"]["replicas"].as_u64();
            assert!(matches!(n, None | Some(0) | Some(2)), "{v}");
            if n == Some(2) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no desired count written");
    }
    let _ = stop.send(());
    tokio::time::timeout(T, autoscaler).await.unwrap().unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autoscaler_writes_desired_counts_to_etcd() {
    let etcd = Etcd::start();
    let ecfg = EtcdConfig {
        endpoints: etcd.endpoints(),
        prefix: "/test/".into(),
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(2),
        ..EtcdConfig::default()
    };
    let store = EtcdStore::connect(&ecfg).await.unwrap();
    let mut cold = server("cold");
    cold.target_concurrency = 5;
    store.put_server(&cold).await.unwrap();

    // A proxy whose routing comes from etcd.
    let table = RoutingTable::new(node());
    let (src_stop, src_stopped) = oneshot::channel::<()>();
    let source = EtcdSource::new(ecfg.clone(), table.clone());
    tokio::spawn(source.run(async move {
        let _ = src_stopped.await;
    }));
    assert!(table.wait_for_generation(1, T).await, "etcd source never loaded");
    let (addr, admin, stop) = start_proxy(table.clone()).await;

    let (as_stop, as_stopped) = oneshot::channel::<()>();
    let autoscaler = tokio::spawn(run_autoscaler(
        AutoscalerSettings::new(vec![admin]),
        DesiredSink::Etcd(Box::new(EtcdStore::connect(&ecfg).await.unwrap())),
        async move {
            let _ = as_stopped.await;
        },
    ));
    let deadline = Instant::now() + T;
    let desired = loop {
        assert_eq!(status(addr, "cold.r1.example.test").await, 503);
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Some(d) = store.get_desired("cold").await.unwrap()
            && d.replicas > 0
        {
            break d;
        }
        assert!(Instant::now() < deadline, "no desired count in etcd");
    };
    assert_eq!(desired.replicas, 1);
    assert_eq!(desired.server, "cold");
    let listed = store.list_desired().await.unwrap();
    assert!(listed.malformed.is_empty());
    assert_eq!(listed.items.len(), 1);

    // The routing source skipped the desired key: routing is intact and still live.
    let gen_before = table.generation();
    let mut cold2 = cold.clone();
    cold2.target_concurrency = 6;
    store.put_server(&cold2).await.unwrap();
    let deadline = Instant::now() + T;
    while table.load().server("cold").unwrap().spec.target_concurrency != 6 {
        assert!(Instant::now() < deadline, "routing stopped following etcd");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(table.generation() > gen_before);

    let _ = as_stop.send(());
    tokio::time::timeout(T, autoscaler).await.unwrap().unwrap().unwrap();
    let _ = stop.send(());
    let _ = src_stop.send(());
}
