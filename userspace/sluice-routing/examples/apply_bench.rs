//! Benchmark: change→routable latency with many servers loaded, and lookup latency on
//! reader threads while changes stream in.
//!
//! ```sh
//! cargo run --release -p sluice-routing --example apply_bench -- \
//!     [--servers 100000] [--rate 1000] [--seconds 5] [--readers 1]
//! ```
//!
//! Prints a human summary and one JSON line (for `cargo xtask bench`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sluice_routing::{Change, NodeConfig, ReplicaSpec, RoutingDoc, RoutingTable, ServerSpec};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("numeric argument"))
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn addr(i: u64) -> SocketAddr {
    SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8080))
}

fn main() {
    let servers = arg("--servers", 100_000);
    let rate = arg("--rate", 1_000).max(1);
    let seconds = arg("--seconds", 5);
    let readers = arg("--readers", 1);

    let node =
        NodeConfig { base_domains: vec!["run.example.com".into()], regions: vec!["r1".into()] };
    let mut doc = RoutingDoc::default();
    for i in 0..servers {
        doc.servers.push(ServerSpec::new(format!("s{i}"), format!("srv{i}")));
        doc.replicas.push(ReplicaSpec::new(format!("s{i}"), "r0", addr(i)));
    }
    let t0 = Instant::now();
    let table = RoutingTable::from_doc(node, doc).unwrap();
    let load_time = t0.elapsed();

    let stop = Arc::new(AtomicBool::new(false));
    let reader_threads: Vec<_> = (0..readers)
        .map(|n| {
            let table = table.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let hosts: Vec<String> = (0..1024u64)
                    .map(|i| format!("srv{}.r1.run.example.com", (i * 7919 + n) % servers.max(1)))
                    .collect();
                let mut lat = Vec::with_capacity(1 << 20);
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let host = &hosts[i % hosts.len()];
                    let start = Instant::now();
                    let found = table.load().lookup(host).is_some();
                    let d = start.elapsed();
                    std::hint::black_box(found);
                    if lat.len() < (1 << 22) {
                        lat.push(d);
                    }
                    i += 1;
                }
                lat
            })
        })
        .collect();

    let interval = Duration::from_secs(1) / rate as u32;
    let total = rate * seconds;
    let mut apply_lat = Vec::with_capacity(total as usize);
    let mut generation = table.generation();
    let start = Instant::now();
    for i in 0..total {
        // Open-loop pacing: change i is due at start + i * interval.
        let due = start + interval * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let target = i % servers.max(1);
        let change = match i % 3 {
            0 => Change::PutReplica(ReplicaSpec::new(format!("s{target}"), "r1", addr(target))),
            1 => Change::DeleteReplica { server: format!("s{target}"), id: "r1".into() },
            _ => Change::PutServer(ServerSpec::new(format!("new{i}"), format!("new{i}"))),
        };
        generation += 1;
        let t = Instant::now();
        table.apply(vec![change], generation).unwrap();
        apply_lat.push(t.elapsed());
    }
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut lookup_lat: Vec<Duration> =
        reader_threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    apply_lat.sort_unstable();
    lookup_lat.sort_unstable();

    let (a50, a99, amax) = (
        percentile(&apply_lat, 0.5),
        percentile(&apply_lat, 0.99),
        apply_lat.last().copied().unwrap_or_default(),
    );
    let (l50, l99, l999) = (
        percentile(&lookup_lat, 0.5),
        percentile(&lookup_lat, 0.99),
        percentile(&lookup_lat, 0.999),
    );
    println!("loaded {servers} servers in {load_time:?}");
    println!(
        "{total} changes in {elapsed:?} (target {rate}/s): change→routable p50 {a50:?} p99 {a99:?} max {amax:?}"
    );
    println!(
        "{} lookups on {readers} reader thread(s): p50 {l50:?} p99 {l99:?} p99.9 {l999:?}",
        lookup_lat.len()
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "routing_apply",
            "servers": servers,
            "rate": rate,
            "changes": total,
            "load_ms": load_time.as_secs_f64() * 1e3,
            "apply_p50_us": a50.as_secs_f64() * 1e6,
            "apply_p99_us": a99.as_secs_f64() * 1e6,
            "apply_max_us": amax.as_secs_f64() * 1e6,
            "lookups": lookup_lat.len(),
            "lookup_p50_ns": l50.as_nanos() as u64,
            "lookup_p99_ns": l99.as_nanos() as u64,
            "lookup_p999_ns": l999.as_nanos() as u64,
        })
    );
}
