//! `sluice autoscale`'s library against a real etcd: a proxy fed by the etcd source
//! answers 503 for a server without replicas, the autoscaler follows the proxy's stream and
//! writes `<prefix>desired/<server>`, and the routing source ignores those keys.
//!
//! Needs `/usr/bin/etcd` (Debian's etcd-server, installed by scripts/setup.sh; override with
//! `SLUICE_ETCD_BIN`). Ports are ephemeral, every wait is bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use sluice_proxy::Proxy;
use sluice_proxy::autoscaler::{AutoscalerSettings, DesiredSink, run_autoscaler};
use sluice_routing::RoutingTable;
use sluice_store::etcd::{EtcdConfig, EtcdSource, EtcdStore};
use tokio::sync::oneshot;

struct Etcd {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn start_etcd() -> (Etcd, EtcdConfig) {
    let bin = std::env::var_os("SLUICE_ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"));
    assert!(bin.exists(), "{} missing (scripts/setup.sh installs etcd-server)", bin.display());
    for _ in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new(&bin)
            .args(["--name", "default", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut etcd = Etcd { child, endpoint: client_url.clone(), _dir: dir };
        let cfg = EtcdConfig {
            endpoints: vec![client_url],
            prefix: "/test/".into(),
            connect_timeout: Duration::from_millis(500),
            request_timeout: Duration::from_secs(2),
            ..EtcdConfig::default()
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if matches!(etcd.child.try_wait(), Ok(Some(_))) {
                break;
            }
            if let Ok(store) = EtcdStore::connect(&cfg).await
                && store.list_desired().await.is_ok()
            {
                return (etcd, cfg);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = etcd.child.kill();
        eprintln!("etcd at {} did not come up; retrying on other ports", etcd.endpoint);
    }
    panic!("etcd did not start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autoscaler_writes_desired_counts_to_etcd() {
    let (_etcd, ecfg) = start_etcd().await;
    let store = EtcdStore::connect(&ecfg).await.unwrap();
    let mut cold = sluice_routing::ServerSpec::new("cold", "cold");
    cold.unauthenticated = true;
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
    let mut c = cfg();
    c.autoscaler.interval = Duration::from_millis(100);
    let server = Proxy::bind(c, table.clone()).await.unwrap();
    let (addr, admin) = (server.local_addrs()[0], server.admin_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));

    let (as_stop, as_stopped) = oneshot::channel::<()>();
    let autoscaler = tokio::spawn(run_autoscaler(
        AutoscalerSettings::new(vec![admin]),
        DesiredSink::Etcd(Box::new(EtcdStore::connect(&ecfg).await.unwrap())),
        async move {
            let _ = as_stopped.await;
        },
    ));
    let host = "cold.r1.example.test";
    let deadline = Instant::now() + T;
    let desired = loop {
        let resp = h1(addr, get("/", host)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
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
