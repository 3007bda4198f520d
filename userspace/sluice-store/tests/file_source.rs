//! The file source: the shipped example validates; hot reload; a broken edit keeps the
//! last good snapshot and reports file:line:column.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use sluice_routing::{NodeConfig, Protocol, RoutingTable};
use sluice_store::file::{FileSource, load_validated};

const DEADLINE: Duration = Duration::from_secs(10);

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/examples/routes.toml")
}

fn node() -> NodeConfig {
    NodeConfig { base_domains: vec!["run.example.com".into()], regions: vec!["us-east1".into()] }
}

#[test]
fn shipped_example_parses_and_validates() {
    let doc = load_validated(example_path(), &node()).unwrap();
    assert_eq!((doc.servers.len(), doc.replicas.len(), doc.tokens.len()), (2, 4, 1));
    let table = RoutingTable::from_doc(node(), doc).unwrap();
    let snap = table.load();
    let hello = snap.lookup("hello.us-east1.run.example.com").unwrap();
    assert_eq!(hello.id(), "srv-7f3a");
    let ids: Vec<_> = hello.replicas.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["r-1", "r-2"], "the draining replica is not routed");
    assert_eq!(hello.replicas[0].protocol, Protocol::H2c);
    assert_eq!(hello.spec.scale_down_window, Duration::from_secs(300));
    assert_eq!(hello.spec.mirror.as_ref().unwrap().fraction, 0.05);
    assert!(snap.lookup("hello.europe-west4.run.example.com").is_none(), "not a node region");
    assert_eq!(snap.lookup("api.example.org").unwrap().id(), "srv-7f3a");
    let docs = snap.lookup("docs.us-east1.run.example.com").unwrap();
    assert!(docs.spec.unauthenticated);
    let token = snap.token("tok-ci").unwrap();
    assert!(token.verify("example-secret-do-not-use"));
    assert!(token.allows_environment("prod") && !token.allows_environment("staging"));
}

const V1: &str = r#"
[[servers]]
id = "s1"
label = "one"

[[replicas]]
server = "s1"
id = "a"
address = "127.0.0.1:9001"
"#;

const V2: &str = r#"
[[servers]]
id = "s1"
label = "one"

[[servers]]
id = "s2"
label = "two"

[[replicas]]
server = "s1"
id = "a"
address = "127.0.0.1:9001"
"#;

// Line 4 has a type error.
const BROKEN_SYNTAX: &str = r#"
[[servers]]
id = "s1"
label = 7
"#;

// Valid TOML, invalid document: the replica names an unknown server on line 7.
const BROKEN_SEMANTICS: &str = r#"
[[servers]]
id = "s1"
label = "one"

[[replicas]]
server = "ghost"
id = "a"
address = "127.0.0.1:9001"
"#;

/// Rewrite a file so the poller sees a change even within one mtime tick (size differs or
/// inode differs: write to a temp file and rename, as editors do).
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn hot_reload_survives_broken_edits() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("routes.toml");
    std::fs::write(&file, V1).unwrap();
    let table = RoutingTable::new(NodeConfig {
        base_domains: vec!["example.com".into()],
        regions: vec!["r1".into()],
    });
    let source = FileSource::new(dir.path()).with_poll_interval(Duration::from_millis(20));
    let mut status = source.status();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = source.spawn(table.clone(), async move {
        let _ = stop_rx.await;
    });

    assert!(table.wait_for_generation(1, DEADLINE).await);
    assert!(table.load().lookup("one.r1.example.com").is_some());
    assert!(table.load().lookup("two.r1.example.com").is_none());

    replace_file(&file, V2);
    assert!(table.wait_for_generation(2, DEADLINE).await);
    assert!(table.load().lookup("two.r1.example.com").is_some());

    // A syntax/type error: last good snapshot kept, error names file:line:column.
    replace_file(&file, BROKEN_SYNTAX);
    let err = tokio::time::timeout(DEADLINE, status.wait_for(|s| s.failures == 1))
        .await
        .unwrap()
        .unwrap()
        .last_error
        .clone()
        .unwrap();
    assert!(err.starts_with(&format!("{}:4:9: ", file.display())), "{err}");
    assert_eq!(table.generation(), 2);
    assert!(table.load().lookup("two.r1.example.com").is_some());

    // A semantic error: the same, with the offending field's line.
    replace_file(&file, BROKEN_SEMANTICS);
    let err = tokio::time::timeout(DEADLINE, status.wait_for(|s| s.failures == 2))
        .await
        .unwrap()
        .unwrap()
        .last_error
        .clone()
        .unwrap();
    assert_eq!(
        err,
        format!("{}:7:1: replica \"ghost/a\": server: unknown server \"ghost\"", file.display())
    );
    assert_eq!(table.generation(), 2);

    // Fixing the file recovers.
    replace_file(&file, V1);
    assert!(table.wait_for_generation(3, DEADLINE).await);
    assert!(table.load().lookup("two.r1.example.com").is_none());
    tokio::time::timeout(DEADLINE, status.wait_for(|s| s.healthy && s.loads == 3))
        .await
        .unwrap()
        .unwrap();

    // A second file in the directory merges in.
    std::fs::write(dir.path().join("more.toml"), "[[servers]]\nid = \"s3\"\nlabel = \"three\"\n")
        .unwrap();
    assert!(table.wait_for_generation(4, DEADLINE).await);
    assert!(table.load().lookup("three.r1.example.com").is_some());
    assert!(table.load().lookup("one.r1.example.com").is_some());

    stop_tx.send(()).unwrap();
    tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
}
