//! The incremental builder agrees with a from-scratch build: random change sequences
//! (including conflicts, invalid objects, orphans and no-op deletes) applied one batch at a
//! time give the same state as loading the surviving objects into a fresh table.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;

use sluice_routing::{
    ApplyErrorKind, Change, NodeConfig, ReplicaSpec, ReplicaState, RoutingDoc, RoutingTable,
    ServerSpec, TokenSpec, hash_secret,
};

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len() as u64) as usize]
    }
}

fn node() -> NodeConfig {
    NodeConfig {
        base_domains: vec!["a.test".into(), "b.test".into()],
        regions: vec!["r1".into(), "r2".into()],
    }
}

const SERVERS: &[&str] = &["s1", "s2", "s3", "s4", "s5"];
const LABELS: &[&str] = &["x", "y", "z", "w", "Bad_Label"];
const REGIONS: &[&str] = &["r1", "r2", "r3"];
const CUSTOM: &[&str] = &["c1.example.org", "c2.example.org", "C1.Example.org"];
const REPLICAS: &[&str] = &["a", "b", "c"];
const TOKENS: &[&str] = &["t1", "t2"];

fn random_change(rng: &mut Rng) -> Change {
    match rng.below(10) {
        0..=2 => {
            let mut s = ServerSpec::new(rng.pick(SERVERS), rng.pick(LABELS));
            for _ in 0..rng.below(3) {
                let r = rng.pick(REGIONS).to_string();
                if !s.regions.contains(&r) {
                    s.regions.push(r);
                }
            }
            if rng.below(3) == 0 {
                s.custom_domains.push(rng.pick(CUSTOM).into());
            }
            s.unauthenticated = rng.below(2) == 0;
            Change::PutServer(s)
        }
        3 => Change::DeleteServer(rng.pick(SERVERS).into()),
        4..=6 => {
            let port = if rng.below(15) == 0 { 0 } else { 1000 + rng.below(3) as u16 };
            let mut r = ReplicaSpec::new(
                rng.pick(SERVERS),
                rng.pick(REPLICAS),
                SocketAddr::from(([127, 0, 0, 1], port)),
            );
            r.state = match rng.below(4) {
                0 => ReplicaState::Starting,
                1 => ReplicaState::Draining,
                _ => ReplicaState::Ready,
            };
            Change::PutReplica(r)
        }
        7 => Change::DeleteReplica {
            server: rng.pick(SERVERS).into(),
            id: rng.pick(REPLICAS).into(),
        },
        8 => Change::PutToken(TokenSpec {
            id: rng.pick(TOKENS).into(),
            secret_hash: if rng.below(5) == 0 {
                "nope".into()
            } else {
                hash_secret(rng.pick(TOKENS))
            },
            environments: vec!["default".into()],
        }),
        _ => Change::DeleteToken(rng.pick(TOKENS).into()),
    }
}

/// The objects a store would hold after the accepted changes.
#[derive(Default)]
struct Model {
    servers: BTreeMap<String, ServerSpec>,
    replicas: BTreeMap<(String, String), ReplicaSpec>,
    tokens: BTreeMap<String, TokenSpec>,
}

impl Model {
    fn accept(&mut self, c: Change) {
        match c {
            Change::PutServer(s) => {
                self.servers.insert(s.id.clone(), s);
            }
            Change::DeleteServer(id) => {
                self.servers.remove(&id);
            }
            Change::PutReplica(r) => {
                self.replicas.insert((r.server.clone(), r.id.clone()), r);
            }
            Change::DeleteReplica { server, id } => {
                self.replicas.remove(&(server, id));
            }
            Change::PutToken(t) => {
                self.tokens.insert(t.id.clone(), t);
            }
            Change::DeleteToken(id) => {
                self.tokens.remove(&id);
            }
            Change::SetReplicaHealth { .. } => {}
        }
    }

    fn doc(&self) -> RoutingDoc {
        RoutingDoc {
            servers: self.servers.values().cloned().collect(),
            replicas: self.replicas.values().cloned().collect(),
            tokens: self.tokens.values().cloned().collect(),
        }
    }
}

fn state(table: &RoutingTable) -> serde_json::Value {
    let mut v = serde_json::to_value(table.load().state_view()).unwrap();
    v["generation"] = 0.into();
    v
}

#[test]
fn incremental_equals_from_scratch() {
    let mut conflicts = 0;
    let mut invalid = 0;
    for seed in 1..=12u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let table = RoutingTable::new(node());
        let mut model = Model::default();
        for step in 0..250u64 {
            let batch: Vec<Change> =
                (0..1 + rng.below(4)).map(|_| random_change(&mut rng)).collect();
            let rejected: Vec<usize> = match table.apply(batch.clone(), step + 1) {
                Ok(()) => vec![],
                Err(errs) => {
                    for e in &errs {
                        match e.reason {
                            ApplyErrorKind::DomainConflict { .. } => conflicts += 1,
                            ApplyErrorKind::Invalid(_) => invalid += 1,
                        }
                    }
                    errs.iter().map(|e| e.index).collect()
                }
            };
            for (i, c) in batch.into_iter().enumerate() {
                if !rejected.contains(&i) {
                    model.accept(c);
                }
            }
            let fresh = RoutingTable::new(node());
            fresh.sync(model.doc(), step + 1).unwrap_or_else(|e| {
                panic!("seed {seed} step {step}: the accepted state does not load: {e:?}")
            });
            assert_eq!(state(&table), state(&fresh), "seed {seed} step {step}");
            // Every domain resolves to the server that claims it.
            let snap = table.load();
            for s in snap.servers() {
                for d in snap.domains_of(s.id()).unwrap() {
                    assert_eq!(snap.lookup(d).unwrap().id(), s.id(), "seed {seed} step {step}");
                }
            }
        }
    }
    println!("{conflicts} domain conflicts and {invalid} invalid objects rejected");
    assert!(conflicts > 50 && invalid > 50, "the generator exercises rejections");
}
