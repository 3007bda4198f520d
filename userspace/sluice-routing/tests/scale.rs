//! With 100k servers loaded, single changes apply in microseconds and never block readers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sluice_routing::{Change, NodeConfig, ReplicaSpec, RoutingDoc, RoutingTable, ServerSpec};

const SERVERS: usize = 100_000;
const CHANGES: usize = 1_000;

fn node() -> NodeConfig {
    NodeConfig {
        base_domains: vec!["run.example.com".into()],
        regions: vec!["r1".into(), "r2".into()],
    }
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8080))
}

#[test]
fn hundred_k_servers_thousand_changes() {
    let mut doc = RoutingDoc::default();
    for i in 0..SERVERS {
        doc.servers.push(ServerSpec::new(format!("s{i}"), format!("srv{i}")));
        doc.replicas.push(ReplicaSpec::new(format!("s{i}"), "r0", addr(i)));
    }
    let t0 = Instant::now();
    let table = RoutingTable::from_doc(node(), doc).unwrap();
    println!("loaded {SERVERS} servers in {:?}", t0.elapsed());
    assert_eq!(table.load().domain_count(), SERVERS * 2);

    // Readers hammer lookups on other threads while the writer applies changes.
    let stop = Arc::new(AtomicBool::new(false));
    let max_lookup_ns = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..2)
        .map(|n| {
            let table = table.clone();
            let stop = stop.clone();
            let max_ns = max_lookup_ns.clone();
            std::thread::spawn(move || {
                let mut lookups = 0u64;
                let mut i = n * 7919;
                while !stop.load(Ordering::Relaxed) {
                    // Servers below SERVERS/2 are never touched by the writer.
                    let k = i % (SERVERS / 2);
                    let host = format!("srv{k}.r1.run.example.com");
                    let start = Instant::now();
                    let snap = table.load();
                    let found = snap.lookup(&host).map(|s| s.replicas.len());
                    let ns = start.elapsed().as_nanos() as u64;
                    drop(snap);
                    assert_eq!(found, Some(1), "{host}");
                    max_ns.fetch_max(ns, Ordering::Relaxed);
                    lookups += 1;
                    i += 1;
                }
                lookups
            })
        })
        .collect();

    let t0 = Instant::now();
    let mut generation = table.generation();
    for i in 0..CHANGES {
        generation += 1;
        let target = SERVERS / 2 + i;
        let change = match i % 4 {
            0 => Change::PutServer(ServerSpec::new(format!("new{i}"), format!("new{i}"))),
            1 => Change::PutReplica(ReplicaSpec::new(format!("s{target}"), "r1", addr(target))),
            2 => Change::DeleteReplica { server: format!("s{target}"), id: "r0".into() },
            _ => {
                let mut s = ServerSpec::new(format!("s{target}"), format!("moved{target}"));
                s.regions = vec!["r2".into()];
                Change::PutServer(s)
            }
        };
        table.apply(vec![change], generation).unwrap();
    }
    let apply_time = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let lookups: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    println!(
        "applied {CHANGES} single changes in {apply_time:?} ({:?}/change); \
         {lookups} concurrent lookups, slowest {:?}",
        apply_time / CHANGES as u32,
        Duration::from_nanos(max_lookup_ns.load(Ordering::Relaxed)),
    );
    assert!(apply_time < Duration::from_secs(10), "{apply_time:?}");
    assert!(lookups > 0);

    let snap = table.load();
    assert_eq!(snap.generation(), generation);
    assert!(snap.lookup("new0.r1.run.example.com").is_some());
    let t = SERVERS / 2 + 3;
    assert!(snap.lookup(&format!("moved{t}.r2.run.example.com")).is_some());
    assert!(snap.lookup(&format!("srv{t}.r1.run.example.com")).is_none());
    let t = SERVERS / 2 + 2;
    assert!(snap.server(&format!("s{t}")).unwrap().replicas.is_empty());
    let t = SERVERS / 2 + 1;
    assert_eq!(snap.server(&format!("s{t}")).unwrap().replicas.len(), 2);
    assert_eq!(snap.server_count(), SERVERS + CHANGES / 4);
}
