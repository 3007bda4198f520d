//! The etcd source against a real etcd: list + watch, deletes, outages (kill/restart and a
//! cut connection), compaction, malformed values, and the store writer `sluice ctl` uses.
//!
//! Needs `/usr/bin/etcd` (Debian's etcd-server; `scripts/setup.sh` installs it). Every wait
//! is bounded; ports are ephemeral.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, CompactionOptions, Txn, TxnOp};
use sluice_routing::{NodeConfig, ReplicaSpec, RoutingTable, ServerSpec, verify_secret};
use sluice_store::etcd::{EtcdConfig, EtcdError, EtcdSource, EtcdStore, StatusHandle, StoreStatus};
use sluice_tests::etcd::{Etcd, TcpGate, TestPki};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::instrument::WithSubscriber;

/// The latency the design promises: committed → routable. Asserted once, in
/// `list_then_watch_applies_puts_and_deletes_fast`; elsewhere the point is correctness, and
/// a generous bound keeps a loaded CI machine from failing them.
const APPLY_LATENCY: Duration = Duration::from_millis(100);
/// Bound on a change arriving through a healthy watch (correctness tests).
const SETTLE_WITHIN: Duration = Duration::from_secs(5);
/// Bound on anything that involves a reconnect (backoff is capped at 200 ms below).
const RECOVER_WITHIN: Duration = Duration::from_secs(15);

fn node() -> NodeConfig {
    NodeConfig { base_domains: vec!["run.test".into()], regions: vec!["r1".into()] }
}

fn cfg(endpoint: String) -> EtcdConfig {
    EtcdConfig {
        endpoints: vec![endpoint],
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(2),
        keepalive_interval: Duration::from_millis(500),
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..EtcdConfig::default()
    }
}

fn server(id: &str, label: &str) -> ServerSpec {
    ServerSpec::new(id, label)
}

fn replica(server: &str, id: &str, port: u16) -> ReplicaSpec {
    ReplicaSpec::new(server, id, format!("127.0.0.1:{port}").parse().unwrap())
}

fn host(label: &str) -> String {
    format!("{label}.r1.run.test")
}

/// Log lines the source wrote, for asserting that an error names its key.
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl LogBuf {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for LogBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A running source with its table, status and log.
struct Running {
    table: RoutingTable,
    status: StatusHandle,
    logs: LogBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Installs, once per test binary, a process-wide subscriber interested in INFO and above.
///
/// Why: tracing caches each callsite's interest process-wide the first time any thread
/// reaches it. With only one dispatcher registered, that interest is computed against the
/// registering thread's default, so a sibling test (or the test's own thread, which has
/// no scoped subscriber) reaching a log line first caches `never` and a scoped capture
/// goes blind to it. With a global subscriber also registered, interest is the union of
/// all live dispatchers and INFO lines stay live for every capture.
fn keep_info_callsites_live() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let global = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_writer(std::io::sink)
            .finish();
        let _ = tracing::subscriber::set_global_default(global);
    });
}

impl Running {
    fn start(cfg: EtcdConfig) -> Self {
        keep_info_callsites_live();
        let table = RoutingTable::new(node());
        let source = EtcdSource::new(cfg, table.clone());
        let status = source.status();
        let logs = LogBuf::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .finish();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(
            source
                .run(async move {
                    let _ = stopped.await;
                })
                .with_subscriber(subscriber),
        );
        Running { table, status, logs, stop: Some(stop), task: Some(task) }
    }

    async fn wait_status(
        &mut self,
        what: &str,
        pred: impl FnMut(&StoreStatus) -> bool,
    ) -> StoreStatus {
        match self.status.wait_for(RECOVER_WITHIN, pred).await {
            Some(s) => s,
            None => panic!(
                "status never became {what}: {:?}\n--- source log ---\n{}",
                self.status.get(),
                self.logs.text()
            ),
        }
    }

    async fn synced(&mut self) -> StoreStatus {
        self.wait_status("synced and connected", |s| s.synced && s.connected).await
    }

    /// Wait until the table reflects `revision`; returns how long that took.
    async fn routable_by(&self, revision: u64, within: Duration) -> Duration {
        let t0 = Instant::now();
        assert!(
            self.table.wait_for_generation(revision, within).await,
            "revision {revision} not applied within {within:?} (generation {}, status {:?})\n--- source log ---\n{}",
            self.table.generation(),
            self.status.get(),
            self.logs.text()
        );
        t0.elapsed()
    }

    /// The log once a line satisfies `pred`, waiting for it up to [`SETTLE_WITHIN`]: a
    /// change's error is logged just after the table publishes its generation, so a
    /// test that has seen the generation may still be ahead of the line.
    async fn log_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + SETTLE_WITHIN;
        loop {
            let logs = self.logs.text();
            if logs.lines().any(&pred) {
                return logs;
            }
            assert!(Instant::now() < deadline, "no log line {what}:\n{logs}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn replicas_of(&self, label: &str) -> Option<usize> {
        self.table.load().lookup(&host(label)).map(|s| s.replicas.len())
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("source did not stop within 5s")
                .unwrap();
        }
    }
}

async fn store(endpoint: String) -> EtcdStore {
    EtcdStore::connect(&cfg(endpoint)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_then_watch_applies_puts_and_deletes_fast() {
    let etcd = Etcd::start();
    let st = store(etcd.endpoint()).await;
    // Present before the source starts: arrives through the listing.
    st.put_server(&server("s0", "listed")).await.unwrap();
    st.put_replica(&replica("s0", "a", 1000)).await.unwrap();

    let mut src = Running::start(cfg(etcd.endpoint()));
    let status = src.synced().await;
    assert_eq!(src.replicas_of("listed"), Some(1));
    assert_eq!(status.relists, 1);
    assert_eq!(src.table.generation(), status.last_revision);

    // Through the watch, routable within 100 ms of the commit being acknowledged (the
    // bound starts when the put returns: etcd's own fsync latency is not ours to assert).
    let t0 = Instant::now();
    let rev = st.put_server(&server("s1", "hello")).await.unwrap();
    let rev2 = st.put_replica(&replica("s1", "a", 1001)).await.unwrap();
    assert!(rev2 > rev);
    let after_ack = src.routable_by(rev2, APPLY_LATENCY).await;
    assert_eq!(src.replicas_of("hello"), Some(1), "routable once the generation says so");
    assert_eq!(src.table.generation(), rev2, "generation is the etcd revision");
    eprintln!("ack → routable {after_ack:?}; first put sent → routable {:?}", t0.elapsed());

    // A second replica, then removals.
    let rev = st.put_replica(&replica("s1", "b", 1002)).await.unwrap();
    src.routable_by(rev, SETTLE_WITHIN).await;
    assert_eq!(src.replicas_of("hello"), Some(2));
    let rev = st.delete_replica("s1", "a").await.unwrap().unwrap();
    src.routable_by(rev, SETTLE_WITHIN).await;
    assert_eq!(src.replicas_of("hello"), Some(1));
    let rev = st.delete_server("s1").await.unwrap().unwrap();
    src.routable_by(rev, SETTLE_WITHIN).await;
    assert!(src.table.load().lookup(&host("hello")).is_none());
    assert!(src.table.load().replica_specs("s1").is_empty(), "replicas cascade-deleted");
    assert_eq!(src.replicas_of("listed"), Some(1), "others untouched");
    assert_eq!(st.delete_server("s1").await.unwrap(), None, "second delete is a no-op");
    src.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_keeps_snapshot_then_catches_up_after_restart() {
    let mut etcd = Etcd::start();
    let st = store(etcd.endpoint()).await;
    st.put_server(&server("s1", "hello")).await.unwrap();
    let rev = st.put_replica(&replica("s1", "a", 1001)).await.unwrap();
    let mut src = Running::start(cfg(etcd.endpoint()));
    src.synced().await;
    src.routable_by(rev, RECOVER_WITHIN).await;
    let generation = src.table.generation();

    etcd.kill();
    let down = src.wait_status("disconnected", |s| !s.connected).await;
    assert!(down.is_stale());
    assert!(down.last_error.is_some());
    assert_eq!(down.last_revision, generation);
    // Keep serving the last good snapshot, however long the outage lasts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = src.status.get();
    assert!(!during.connected);
    assert!(during.since_disconnect.unwrap() >= Duration::from_millis(400), "{during:?}");
    assert!(during.summary().contains("stale"), "{}", during.summary());
    assert_eq!(src.replicas_of("hello"), Some(1));
    assert_eq!(src.table.generation(), generation);

    tokio::task::block_in_place(|| etcd.restart()).unwrap();
    // Written by another client right after the restart, before the source is back.
    let st = store(etcd.endpoint()).await;
    st.put_server(&server("s2", "world")).await.unwrap();
    st.put_replica(&replica("s2", "a", 1002)).await.unwrap();
    let rev = st.delete_replica("s1", "a").await.unwrap().unwrap();
    src.routable_by(rev, RECOVER_WITHIN).await;
    assert_eq!(src.replicas_of("world"), Some(1));
    assert_eq!(src.replicas_of("hello"), Some(0));
    let up = src.wait_status("connected", |s| s.connected).await;
    assert!(up.last_error.is_none());
    assert!(up.connects >= 2);
    assert_eq!(up.relists, 1, "resumed the watch; no re-list needed");
    src.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_while_disconnected_recovers_by_relisting() {
    let etcd = Etcd::start();
    let gate = TcpGate::start(etcd.client_addr()).unwrap();
    let st = store(etcd.endpoint()).await;
    st.put_server(&server("s1", "one")).await.unwrap();
    let rev = st.put_replica(&replica("s1", "a", 1001)).await.unwrap();
    let mut src = Running::start(cfg(gate.endpoint()));
    src.synced().await;
    src.routable_by(rev, RECOVER_WITHIN).await;

    st.put_server(&server("s4", "kept")).await.unwrap();
    let rev = st.put_replica(&replica("s4", "a", 1005)).await.unwrap();
    src.routable_by(rev, RECOVER_WITHIN).await;

    gate.cut();
    src.wait_status("disconnected", |s| !s.connected).await;
    // Several revisions the source never sees as events, then compact them away.
    let mut client = Client::connect(etcd.endpoints(), None).await.unwrap();
    st.put_server(&server("s2", "two")).await.unwrap();
    st.put_replica(&replica("s2", "a", 1002)).await.unwrap();
    st.put_replica(&replica("s2", "b", 1003)).await.unwrap();
    st.delete_server("s1").await.unwrap().unwrap();
    // A broken edit (the last good value must survive the re-list), a server claiming a
    // domain another server already owns, and a replica whose server does not exist yet.
    client.put("/sluice/servers/s4", "{broken", None).await.unwrap();
    st.put_server(&server("s5", "two")).await.unwrap();
    let orphan = serde_json::to_string(&replica("s7", "a", 1007)).unwrap();
    client.put("/sluice/replicas/s7/a", orphan, None).await.unwrap();
    let last = st.put_server(&server("s3", "three")).await.unwrap();
    client.compact(last as i64, Some(CompactionOptions::new().with_physical())).await.unwrap();
    assert_eq!(src.table.generation(), rev, "still the pre-outage snapshot");

    gate.restore();
    src.routable_by(last, RECOVER_WITHIN).await;
    let snap = src.table.load_full();
    assert!(snap.lookup(&host("one")).is_none());
    assert_eq!(snap.lookup(&host("two")).unwrap().replicas.len(), 2);
    assert!(snap.lookup(&host("three")).is_some());
    assert_eq!(snap.lookup(&host("kept")).unwrap().replicas.len(), 1, "last good value kept");
    assert_eq!(snap.lookup(&host("two")).unwrap().id(), "s2", "first claimant keeps the domain");
    assert!(snap.server("s5").is_none());
    let status = src.wait_status("connected", |s| s.connected).await;
    assert_eq!(status.relists, 2, "recovered by listing again");
    let logs = src.logs.text();
    assert!(logs.contains("compacted"), "{logs}");
    assert!(
        logs.lines().any(|l| l.contains("ERROR") && l.contains("/sluice/servers/s4")),
        "{logs}"
    );
    assert!(
        logs.lines().any(|l| l.contains("ERROR") && l.contains("/sluice/servers/s5")),
        "{logs}"
    );

    // And the watch works after the re-list; the orphan replica is routed once its
    // server appears.
    let rev = st.put_replica(&replica("s3", "a", 1004)).await.unwrap();
    src.routable_by(rev, SETTLE_WITHIN).await;
    assert_eq!(src.replicas_of("three"), Some(1));
    let rev = st.put_server(&server("s7", "seven")).await.unwrap();
    src.routable_by(rev, SETTLE_WITHIN).await;
    assert_eq!(src.replicas_of("seven"), Some(1));
    src.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_values_are_ignored_and_named() {
    let etcd = Etcd::start();
    let st = store(etcd.endpoint()).await;
    let mut raw = Client::connect(etcd.endpoints(), None).await.unwrap();
    // Malformed before the listing.
    raw.put("/sluice/servers/listed-bad", "{not json", None).await.unwrap();
    st.put_server(&server("s1", "good")).await.unwrap();
    let mut src = Running::start(cfg(etcd.endpoint()));
    src.synced().await;
    assert!(src.table.load().server("listed-bad").is_none());
    assert!(src.table.load().lookup(&host("good")).is_some());

    // Malformed through the watch: bad JSON, a valid object under the wrong key, an
    // invalid label, and a garbage edit of a good server (its last good value stays).
    raw.put("/sluice/servers/bad", "{\"id\": ", None).await.unwrap();
    let wrong = serde_json::to_string(&server("other", "wrong")).unwrap();
    raw.put("/sluice/servers/mismatch", wrong, None).await.unwrap();
    let invalid = serde_json::to_string(&server("invalid", "Not_A_Label")).unwrap();
    raw.put("/sluice/servers/invalid", invalid, None).await.unwrap();
    raw.put("/sluice/servers/s1", "garbage", None).await.unwrap();
    raw.put("/sluice/replicas/s1/r", "[]", None).await.unwrap();
    // Valid on its own, but its domain belongs to s1.
    st.put_server(&server("dup", "good")).await.unwrap();
    // A valid change after them is the sync point.
    let rev = st.put_server(&server("s2", "fine")).await.unwrap();
    src.routable_by(rev, RECOVER_WITHIN).await;
    let snap = src.table.load_full();
    assert!(snap.lookup(&host("fine")).is_some(), "everything else keeps working");
    assert!(snap.lookup(&host("good")).is_some(), "a broken edit keeps the last good value");
    assert_eq!(snap.lookup(&host("good")).unwrap().id(), "s1");
    for id in ["bad", "mismatch", "other", "invalid", "dup"] {
        assert!(snap.server(id).is_none(), "{id}");
    }
    let logs = src.logs.text();
    for key in [
        "/sluice/servers/listed-bad",
        "/sluice/servers/bad",
        "/sluice/servers/mismatch",
        "/sluice/servers/invalid",
        "/sluice/servers/s1",
        "/sluice/replicas/s1/r",
        "/sluice/servers/dup",
    ] {
        assert!(
            logs.lines().any(|l| l.contains("ERROR") && l.contains(key)),
            "no error naming {key}:\n{logs}"
        );
    }
    assert!(logs.contains("label"), "the validation error is in the log");
    assert!(src.status.get().malformed_values >= 6);

    // The store reader reports them too, without failing the listing.
    let listing = st.list_servers().await.unwrap();
    let ids: Vec<_> = listing.items.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["dup", "s2"]);
    assert_eq!(listing.malformed.len(), 5, "{:?}", listing.malformed);
    src.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_roundtrip_validates_and_hashes_tokens() {
    let etcd = Etcd::start();
    let st = store(etcd.endpoint()).await;
    let mut src = Running::start(cfg(etcd.endpoint()));
    src.synced().await;

    // Servers.
    let mut s = server("s1", "hello");
    s.environment = "prod".into();
    st.put_server(&s).await.unwrap();
    assert_eq!(st.get_server("s1").await.unwrap(), Some(s.clone()));
    assert_eq!(st.get_server("nope").await.unwrap(), None);
    let bad = server("s2", "Bad Label");
    match st.put_server(&bad).await {
        Err(EtcdError::Invalid(e)) => assert!(e.to_string().contains("label"), "{e}"),
        other => panic!("expected a validation error, got {other:?}"),
    }
    assert_eq!(st.get_server("s2").await.unwrap(), None, "nothing written");

    // Replicas.
    let r = replica("s1", "a", 1001);
    st.put_replica(&r).await.unwrap();
    assert!(matches!(
        st.put_replica(&replica("ghost", "a", 1)).await,
        Err(EtcdError::UnknownServer(s)) if s == "ghost"
    ));
    assert_eq!(st.get_replica("s1", "a").await.unwrap(), Some(r.clone()));
    st.put_server(&server("s3", "other")).await.unwrap();
    st.put_replica(&replica("s3", "x", 1003)).await.unwrap();
    assert_eq!(st.list_replicas(None).await.unwrap().items.len(), 2);
    assert_eq!(st.list_replicas(Some("s1")).await.unwrap().items, [r]);
    let servers: Vec<String> =
        st.list_servers().await.unwrap().items.into_iter().map(|s| s.id).collect();
    assert_eq!(servers, ["s1", "s3"]);

    // Tokens: the secret is returned once and only its hash is stored.
    let created = st.create_token("t1", vec!["prod".into()]).await.unwrap();
    assert_eq!(created.secret.len(), 64);
    assert!(!format!("{created:?}").contains(&created.secret));
    let stored = st.get_token("t1").await.unwrap().unwrap();
    assert!(verify_secret(&stored.secret_hash, &created.secret));
    assert!(!stored.secret_hash.contains(&created.secret));
    assert!(matches!(st.create_token("t1", vec!["prod".into()]).await, Err(EtcdError::Exists(_))));
    assert!(matches!(st.create_token("t2", vec![]).await, Err(EtcdError::Invalid(_))));
    let mut raw = Client::connect(etcd.endpoints(), None).await.unwrap();
    let value = raw.get("/sluice/tokens/t1", None).await.unwrap();
    let value = value.kvs()[0].value_str().unwrap().to_owned();
    assert!(!value.contains(&created.secret), "{value}");

    // The source sees all of it: the token authenticates against the live snapshot.
    src.routable_by(created.revision, SETTLE_WITHIN).await;
    let snap = src.table.load_full();
    assert!(snap.token("t1").unwrap().verify(&created.secret));
    assert_eq!(snap.lookup(&host("hello")).unwrap().replicas.len(), 1);
    assert_eq!(st.list_tokens().await.unwrap().items.len(), 1);

    // Deletes.
    let rev = st.delete_token("t1").await.unwrap().unwrap();
    assert_eq!(st.delete_token("t1").await.unwrap(), None);
    assert!(st.delete_replica("s1", "a").await.unwrap().is_some());
    assert_eq!(st.delete_replica("s1", "a").await.unwrap(), None);
    assert!(rev > created.revision);
    let rev = st.delete_server("s3").await.unwrap().unwrap();
    assert!(st.list_replicas(Some("s3")).await.unwrap().items.is_empty());
    src.routable_by(rev, SETTLE_WITHIN).await;
    let snap = src.table.load_full();
    assert!(snap.token("t1").is_none());
    assert!(snap.server("s3").is_none());
    assert_eq!(snap.lookup(&host("hello")).unwrap().replicas.len(), 0);
    src.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_waits_for_etcd_that_is_not_up_yet() {
    let mut etcd = Etcd::start();
    let endpoint = etcd.endpoint();
    etcd.kill();
    let mut src = Running::start(cfg(endpoint.clone()));
    let s = src.wait_status("failing", |s| s.last_error.is_some()).await;
    assert!(!s.synced && !s.connected && s.is_stale());
    assert!(s.summary().contains("not synced"), "{}", s.summary());
    assert_eq!(src.table.generation(), 0);
    tokio::task::block_in_place(|| etcd.restart()).unwrap();
    let st = store(endpoint).await;
    let rev = st.put_server(&server("s1", "late")).await.unwrap();
    src.routable_by(rev, RECOVER_WITHIN).await;
    assert!(src.table.load().lookup(&host("late")).is_some());
    src.stop().await;
}

/// Puts servers `s<i>` (label `l<i>`) for `ids` in one transaction; returns its revision.
async fn put_servers_txn(client: &mut Client, ids: std::ops::Range<usize>) -> u64 {
    let ops: Vec<TxnOp> = ids
        .map(|i| {
            let value = serde_json::to_vec(&server(&format!("s{i}"), &format!("l{i}"))).unwrap();
            TxnOp::put(format!("/sluice/servers/s{i}"), value, None)
        })
        .collect();
    let resp = client.txn(Txn::new().and_then(ops)).await.unwrap();
    resp.header().unwrap().revision() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_through_thousands_of_keys_and_batches_apply_at_once() {
    const N: usize = 2500; // several list pages
    let etcd = Etcd::start();
    let mut raw = Client::connect(etcd.endpoints(), None).await.unwrap();
    for start in (0..N).step_by(100) {
        put_servers_txn(&mut raw, start..start + 100).await;
    }
    let mut src = Running::start(cfg(etcd.endpoint()));
    src.synced().await;
    assert_eq!(src.table.load().server_count(), N);
    assert!(src.table.load().lookup(&host("l0")).is_some());
    assert!(src.table.load().lookup(&host(&format!("l{}", N - 1))).is_some());
    let st = store(etcd.endpoint()).await;
    assert_eq!(st.list_servers().await.unwrap().items.len(), N);

    // One transaction of 100 puts is one watch response, applied as one batch.
    let rev = put_servers_txn(&mut raw, N..N + 100).await;
    src.routable_by(rev, SETTLE_WITHIN).await;
    assert_eq!(src.table.load().server_count(), N + 100);
    src.stop().await;
}

/// etcd serving TLS and requiring client certificates: the store writer and the
/// watching source work with the CA and a client certificate, and a client without
/// either is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::write(dir.path());
    let etcd = Etcd::start_tls(pki.server_tls(true));
    assert!(etcd.endpoint().starts_with("https://"));
    let tls_cfg = |tls| EtcdConfig { tls, ..cfg(etcd.endpoint()) };

    // No CA: etcd's certificate is not trusted. CA but no client certificate: etcd
    // refuses the handshake. Either way the write fails and says so.
    for (what, tls) in [("no CA", None), ("no client certificate", Some(pki.client_tls(false)))] {
        let outcome = match EtcdStore::connect(&tls_cfg(tls)).await {
            Ok(st) => st.put_server(&server("s0", "nope")).await.map(|_| ()),
            Err(e) => Err(e),
        };
        assert!(outcome.is_err(), "{what}: a write succeeded");
    }

    let cfg = tls_cfg(Some(pki.client_tls(true)));
    let st = EtcdStore::connect(&cfg).await.unwrap();
    st.put_server(&server("s1", "secure")).await.unwrap();
    let mut src = Running::start(cfg.clone());
    src.synced().await;
    let rev = st.put_replica(&replica("s1", "a", 1000)).await.unwrap();
    src.routable_by(rev, SETTLE_WITHIN).await;
    assert_eq!(src.replicas_of("secure"), Some(1), "routable through the TLS watch");
    src.stop().await;

    // Half an identity is a configuration error, named before any connection.
    let half = EtcdConfig {
        tls: Some(sluice_store::etcd::EtcdTls { key_file: None, ..pki.client_tls(true) }),
        ..cfg
    };
    let err = EtcdStore::connect(&half).await.unwrap_err();
    assert!(matches!(err, EtcdError::Credentials(_)), "{err}");
}

/// etcd with authentication enabled: the password from `password_file` is used, a
/// wrong one fails to connect, and none at all is refused on the first request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_password_authentication() {
    let etcd = Etcd::start();
    let mut admin = Client::connect(etcd.endpoints(), None).await.unwrap();
    admin.user_add("root", "root-pw", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.user_add("sluice", "s3cret", None).await.unwrap();
    admin.user_grant_role("sluice", "root").await.unwrap();
    admin.auth_enable().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let password = |name: &str, pw: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("{pw}\n")).unwrap();
        path
    };
    let auth_cfg = |file| EtcdConfig {
        auth: Some(sluice_store::etcd::EtcdAuth { user: "sluice".into(), password_file: file }),
        ..cfg(etcd.endpoint())
    };

    let good = auth_cfg(password("good", "s3cret"));
    let st = EtcdStore::connect(&good).await.unwrap();
    st.put_server(&server("s1", "authed")).await.unwrap();
    let mut src = Running::start(good.clone());
    src.synced().await;
    assert_eq!(src.replicas_of("authed"), Some(0));
    src.stop().await;

    let wrong = auth_cfg(password("wrong", "guess"));
    assert!(EtcdStore::connect(&wrong).await.is_err(), "a wrong password connected");

    let anonymous = EtcdStore::connect(&cfg(etcd.endpoint())).await.unwrap();
    assert!(anonymous.put_server(&server("s2", "anon")).await.is_err(), "anonymous write");

    let missing = auth_cfg(dir.path().join("absent"));
    let err = EtcdStore::connect(&missing).await.unwrap_err();
    assert!(err.to_string().contains("absent"), "names the file: {err}");
    assert!(!err.to_string().contains("s3cret"));
}

/// A server's certificate travels in its spec through the change stream: installed with
/// it, replaced with it, and a bad one is refused with an error naming the key while the
/// last good one keeps serving (and no key material reaches the log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_arrive_with_their_server() {
    use sluice_routing::CertificateSpec;
    let pem = |names: &[&str]| {
        let c = rcgen::generate_simple_self_signed(
            names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        (c.cert.pem(), c.key_pair.serialize_pem())
    };
    let with_cert = |cert: &str, key: &str| {
        let mut s = server("shop", "shop");
        s.custom_domains = vec!["shop.example.org".into()];
        s.certificates = vec![CertificateSpec::inline(["shop.example.org"], cert, key)];
        s
    };
    let etcd = Etcd::start();
    let st = store(etcd.endpoint()).await;
    let mut src = Running::start(cfg(etcd.endpoint()));
    src.synced().await;

    let (c1, k1) = pem(&["shop.example.org"]);
    let rev = st.put_server(&with_cert(&c1, &k1)).await.unwrap();
    src.routable_by(rev, SETTLE_WITHIN).await;
    let first = src.table.load().certificate("shop.example.org").unwrap().clone();

    let (c2, k2) = pem(&["shop.example.org"]);
    let rev = st.put_server(&with_cert(&c2, &k2)).await.unwrap();
    src.routable_by(rev, SETTLE_WITHIN).await;
    let second = src.table.load().certificate("shop.example.org").unwrap().clone();
    assert!(!Arc::ptr_eq(&first, &second), "replaced with its server's change");

    // The key of another certificate: refused, named, the last good one serves.
    let rev = st.put_server(&with_cert(&c1, &k2)).await.unwrap();
    src.routable_by(rev, SETTLE_WITHIN).await;
    let now = src.table.load().certificate("shop.example.org").unwrap().clone();
    assert!(Arc::ptr_eq(&now, &second));
    let logs = src
        .log_line("naming the key", |l| {
            l.contains("ERROR")
                && l.contains("/sluice/servers/shop")
                && l.contains("does not match")
        })
        .await;
    assert!(!logs.contains("PRIVATE KEY"), "key material in the log:\n{logs}");

    // Removed with the server.
    let rev = st.delete_server("shop").await.unwrap().unwrap();
    src.routable_by(rev, SETTLE_WITHIN).await;
    assert!(src.table.load().certificate("shop.example.org").is_none());
    src.stop().await;
}

/// Pending ACME challenges are mirrored in memory by the same list-and-watch: one written
/// before the source starts is listed, one written later arrives by the watch, deleted
/// ones disappear, and the routing state never sees any of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_challenges_are_mirrored_by_the_watch() {
    use sluice_store::etcd::AcmeChallenges;
    let etcd = Etcd::start();
    let mut raw = Client::connect(etcd.endpoints(), None).await.unwrap();
    raw.put("/sluice/acme/challenges/listed", "one", None).await.unwrap();
    let table = RoutingTable::new(node());
    let challenges = AcmeChallenges::default();
    let source = EtcdSource::new(cfg(etcd.endpoint()), table.clone())
        .with_acme_challenges(challenges.clone());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(source.run(async move {
        let _ = stopped.await;
    }));
    let eventually = |token: &'static str, want: Option<&'static str>| {
        let c = challenges.clone();
        async move {
            let deadline = Instant::now() + SETTLE_WITHIN;
            while c.get(token).as_deref() != want.map(str::as_bytes) {
                assert!(Instant::now() < deadline, "{token}: {:?}, want {want:?}", c.get(token));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    eventually("listed", Some("one")).await;
    raw.put("/sluice/acme/challenges/watched", "two", None).await.unwrap();
    eventually("watched", Some("two")).await;
    raw.delete("/sluice/acme/challenges/watched", None).await.unwrap();
    eventually("watched", None).await;
    assert_eq!(table.load().servers().count(), 0, "challenges are not routing state");
    let _ = stop.send(());
    task.await.unwrap();
}
