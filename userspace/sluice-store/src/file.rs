//! The embedded default source: a TOML routing document in a file, or every `*.toml` in a
//! directory merged (in file-name order), watched and hot-reloaded.
//!
//! Watching polls each file's size, modification time and inode every 250 ms: robust on
//! every filesystem, including editors that replace files by rename and configmap symlink
//! swaps. An invalid edit keeps the last good snapshot and logs the exact problem with its
//! file, line and column.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::sync::watch;

use crate::SourceStatus;
use sluice_routing::RoutingTable;
use sluice_routing::model::{NodeConfig, RoutingDoc};
use sluice_routing::validate::{self, FieldError, ObjectRef};

/// How often the file source checks for changes.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Why a routing file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Reading the file or directory failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TOML syntax or a field of the wrong type/unknown name.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the parser said.
        message: String,
    },
    /// The document parsed but is not valid; each problem with its location.
    #[error("{}", display_invalid(.0))]
    Invalid(Vec<LocatedError>),
}

/// A validation problem and where in which file the offending object (or field) is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocatedError {
    /// File, 1-based line and column, when the object was found in a file.
    pub location: Option<(PathBuf, usize, usize)>,
    /// The problem.
    pub error: FieldError,
}

impl std::fmt::Display for LocatedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some((path, line, col)) = &self.location {
            write!(f, "{}:{line}:{col}: ", path.display())?;
        }
        self.error.fmt(f)
    }
}

fn display_invalid(errors: &[LocatedError]) -> String {
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    if lines.len() == 1 {
        lines.join("")
    } else {
        format!("{} problems:\n  {}", lines.len(), lines.join("\n  "))
    }
}

/// One parsed file, kept for locating validation errors.
struct Loaded {
    path: PathBuf,
    text: String,
    doc: RoutingDoc,
}

/// The files `path` stands for: itself, or the `*.toml` files in it (sorted by name;
/// hidden files ignored).
fn files_of(path: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let io = |source| SourceError::Io { path: path.to_owned(), source };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io)? {
        let p = entry.map_err(io)?.path();
        let visible = p.file_name().and_then(|n| n.to_str()).is_some_and(|n| !n.starts_with('.'));
        if visible && p.extension().is_some_and(|e| e == "toml") && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

fn parse_file(path: &Path) -> Result<Loaded, SourceError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| SourceError::Io { path: path.to_owned(), source })?;
    let doc = toml::from_str::<RoutingDoc>(&text).map_err(|e| {
        let (line, column) = e.span().map(|s| line_col(&text, s.start)).unwrap_or((1, 1));
        SourceError::Parse { path: path.to_owned(), line, column, message: e.message().to_owned() }
    })?;
    Ok(Loaded { path: path.to_owned(), text, doc })
}

fn load_files(path: &Path) -> Result<Vec<Loaded>, SourceError> {
    files_of(path)?.iter().map(|p| parse_file(p)).collect()
}

fn merge(files: &[Loaded]) -> RoutingDoc {
    let mut doc = RoutingDoc::default();
    for f in files {
        doc.servers.extend(f.doc.servers.iter().cloned());
        doc.replicas.extend(f.doc.replicas.iter().cloned());
        doc.tokens.extend(f.doc.tokens.iter().cloned());
    }
    doc
}

/// Load a routing document from a TOML file, or from every `*.toml` in a directory merged
/// (in file-name order). Parses only; see [`load_validated`] for validation with locations.
pub fn load_doc(path: impl AsRef<Path>) -> Result<RoutingDoc, SourceError> {
    Ok(merge(&load_files(path.as_ref())?))
}

/// Load and validate against `node`; validation problems carry file, line and column.
pub fn load_validated(
    path: impl AsRef<Path>,
    node: &NodeConfig,
) -> Result<RoutingDoc, SourceError> {
    let files = load_files(path.as_ref())?;
    let doc = merge(&files);
    match validate::validate_doc(node, &doc) {
        Ok(()) => Ok(doc),
        Err(e) => Err(SourceError::Invalid(
            e.errors
                .into_iter()
                .map(|error| LocatedError { location: locate(&files, &error), error })
                .collect(),
        )),
    }
}

/// Load `path`, validate it and replace the table's contents at generation + 1. Returns the
/// new generation. On error the table is unchanged.
pub fn load_into(table: &RoutingTable, path: impl AsRef<Path>) -> Result<u64, SourceError> {
    let files = load_files(path.as_ref())?;
    let doc = merge(&files);
    validate::validate_doc(table.load().node(), &doc).map_err(|e| located(&files, e))?;
    let generation = table.generation() + 1;
    // Certificates are parsed and checked here, as the snapshot is built.
    table.replace(doc, generation).map_err(|e| located(&files, e))?;
    Ok(generation)
}

fn located(files: &[Loaded], e: validate::ValidationError) -> SourceError {
    SourceError::Invalid(
        e.errors
            .into_iter()
            .map(|error| LocatedError { location: locate(files, &error), error })
            .collect(),
    )
}

/// Per-field spans of one file's objects, from a second, lenient parse.
#[derive(Deserialize, Default)]
#[serde(default)]
struct SpanDoc {
    servers: Vec<toml::Spanned<toml::Table>>,
    replicas: Vec<toml::Spanned<toml::Table>>,
    tokens: Vec<toml::Spanned<toml::Table>>,
}

/// Find the file and line:column of the object (and field, when written out) an error is
/// about.
fn locate(files: &[Loaded], err: &FieldError) -> Option<(PathBuf, usize, usize)> {
    for f in files {
        let index = match &err.object {
            ObjectRef::Server(id) => f.doc.servers.iter().rposition(|s| s.id == *id),
            ObjectRef::Replica { server, id } => {
                f.doc.replicas.iter().rposition(|r| r.server == *server && r.id == *id)
            }
            ObjectRef::Token(id) => f.doc.tokens.iter().rposition(|t| t.id == *id),
            ObjectRef::Node => None,
        };
        let Some(index) = index else { continue };
        let spans: SpanDoc = toml::from_str(&f.text).unwrap_or_default();
        let list = match &err.object {
            ObjectRef::Server(_) => &spans.servers,
            ObjectRef::Replica { .. } => &spans.replicas,
            _ => &spans.tokens,
        };
        let Some(obj) = list.get(index) else {
            return Some((f.path.clone(), 1, 1));
        };
        // Spans of values inside a table are not kept by `toml::Table`; find the field's
        // key textually within the object's own span instead.
        let field = err.field.split('.').next().unwrap_or_default();
        let span = obj.span();
        // The span leaves out the object's own sub-tables (`[[servers.certificates]]`
        // after it): those run until the next header of another object.
        let kind = match &err.object {
            ObjectRef::Server(_) => "servers",
            ObjectRef::Replica { .. } => "replicas",
            _ => "tokens",
        };
        let end = end_of_object(&f.text, span.end, kind);
        let start = find_key(&f.text[span.start..end], field)
            .map(|off| span.start + off)
            .unwrap_or(span.start);
        let (line, col) = line_col(&f.text, start);
        return Some((f.path.clone(), line, col));
    }
    None
}

/// Where the object of array `kind` whose own span ends at `from` really ends: at the
/// next table header that is not one of its sub-tables (`[[kind.x]]`, `[kind.x]`).
fn end_of_object(text: &str, from: usize, kind: &str) -> usize {
    let from = from.min(text.len());
    let mut offset = from;
    for line in text.get(from..).unwrap_or_default().split_inclusive('\n') {
        let header = line.trim_start();
        if header.starts_with('[') {
            let name = header.trim_start_matches('[').trim_start();
            let sub = name.strip_prefix(kind).is_some_and(|rest| rest.starts_with('.'));
            if !sub {
                return offset;
            }
        }
        offset += line.len();
    }
    text.len()
}

/// Offset of a line that assigns `key` (`key =` after optional indentation) in `text`.
fn find_key(text: &str, key: &str) -> Option<usize> {
    if key.is_empty() {
        return None;
    }
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix(key)
            && rest.trim_start().starts_with('=')
        {
            return Some(offset + (line.len() - trimmed.len()));
        }
        // A nested table or array of tables: `[[servers.certificates]]`.
        let header = trimmed.trim_start_matches('[');
        if header.len() < trimmed.len()
            && header.split(']').next().and_then(|h| h.rsplit('.').next()).map(str::trim)
                == Some(key)
        {
            return Some(offset + (line.len() - trimmed.len()));
        }
        offset += line.len();
    }
    None
}

/// 1-based line and column (in characters) of a byte offset: how every config error
/// names its place (`file:line:col`).
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

/// What identifies the current version of the files: path, size, mtime, inode.
type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>, u64)>;

fn fingerprint(path: &Path) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    let files = match files_of(path) {
        Ok(f) => f,
        Err(_) => return Vec::new(),
    };
    files
        .into_iter()
        .map(|p| match std::fs::metadata(&p) {
            Ok(m) => {
                let mtime = m.modified().ok();
                (p, m.len(), mtime, m.ino())
            }
            Err(_) => (p, u64::MAX, None, 0),
        })
        .collect()
}

/// A watched routing file or directory.
#[derive(Debug)]
pub struct FileSource {
    /// File or directory.
    pub path: PathBuf,
    /// How often to look for changes.
    pub poll_interval: Duration,
    status: watch::Sender<SourceStatus>,
}

impl FileSource {
    /// Watch `path` with the default poll interval.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let (status, _) = watch::channel(SourceStatus::default());
        FileSource { path: path.into(), poll_interval: DEFAULT_POLL_INTERVAL, status }
    }

    /// The same with another poll interval.
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Follow the source's status (last error, loads, failures) for `/readyz` and metrics.
    pub fn status(&self) -> watch::Receiver<SourceStatus> {
        self.status.subscribe()
    }

    /// Load now (logging the outcome), then reload on every change until `shutdown`
    /// resolves. Each successful load is published at the table's generation + 1; a failed
    /// one keeps the last good snapshot and logs the error with file, line and column.
    pub async fn run(self, table: RoutingTable, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut last: Option<Fingerprint> = None;
        let mut ticker = tokio::time::interval(self.poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = ticker.tick() => {}
            }
            let path = self.path.clone();
            let t = table.clone();
            let prev = last.clone();
            // File I/O and parsing a large document are blocking work.
            let done = tokio::task::spawn_blocking(move || {
                let fp = fingerprint(&path);
                if prev.as_ref() == Some(&fp) {
                    return None;
                }
                let result = load_into(&t, &path);
                Some((fp, result))
            })
            .await;
            match done {
                Ok(Some((fp, result))) => {
                    last = Some(fp);
                    match result {
                        Ok(generation) => {
                            self.status.send_modify(|s| {
                                s.healthy = true;
                                s.last_error = None;
                                s.last_success = Some(SystemTime::now());
                                s.generation = generation;
                                s.loads += 1;
                            });
                            let snap = table.load();
                            tracing::info!(
                                path = %self.path.display(),
                                generation,
                                servers = snap.server_count(),
                                domains = snap.domain_count(),
                                tokens = snap.token_count(),
                                "routing: loaded file"
                            );
                        }
                        Err(e) => {
                            tracing::error!(
                                path = %self.path.display(),
                                generation = table.generation(),
                                "routing: keeping the last good snapshot; {e}"
                            );
                            self.status.send_modify(|s| {
                                s.healthy = false;
                                s.last_error = Some(e.to_string());
                                s.failures += 1;
                            });
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "routing: file source load task failed"),
            }
        }
    }

    /// Spawn [`run`](Self::run) on the current tokio runtime.
    pub fn spawn(
        self,
        table: RoutingTable,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.run(table, shutdown))
    }
}

/// Watch `path` and keep `table` in sync with it until `shutdown` resolves (see
/// [`FileSource::run`]).
pub async fn run_file_source(
    table: RoutingTable,
    path: PathBuf,
    shutdown: impl Future<Output = ()>,
) {
    FileSource::new(path).run(table, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts() {
        let t = "ab\ncdé\nf";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 3), (2, 1));
        assert_eq!(line_col(t, t.find('f').unwrap()), (3, 1));
        assert_eq!(line_col(t, 999), (3, 2));
    }

    #[test]
    fn parse_error_has_location() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.toml");
        std::fs::write(&p, "[[servers]]\nid = \"a\"\nlabel = 5\n").unwrap();
        let e = load_doc(&p).unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with(&format!("{}:3:9: ", p.display())), "{s}");
    }

    #[test]
    fn validation_error_has_location() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.toml"), "[[servers]]\nid = \"a\"\nlabel = \"a\"\n")
            .unwrap();
        std::fs::write(
            dir.path().join("b.toml"),
            "# b\n[[servers]]\nid = \"b\"\n  label = \"Bad_Label\"\n\n[[replicas]]\nserver = \"zz\"\nid = \"r\"\naddress = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        // Hidden and non-toml files are ignored.
        std::fs::write(dir.path().join(".c.toml"), "garbage").unwrap();
        std::fs::write(dir.path().join("c.txt"), "garbage").unwrap();
        let node = NodeConfig::default();
        let e = load_validated(dir.path(), &node).unwrap_err();
        let b = dir.path().join("b.toml");
        assert_eq!(
            e.to_string(),
            format!(
                "2 problems:\n  {b}:4:3: server \"b\": label: must be a DNS label (a-z0-9-, 1..63 chars)\n  {b}:7:1: replica \"zz/r\": server: unknown server \"zz\"",
                b = b.display()
            )
        );
        assert_eq!(load_doc(dir.path()).unwrap().servers.len(), 2);
    }

    #[test]
    fn refused_certificate_is_located_and_keeps_the_last_good_state() {
        let c = rcgen::generate_simple_self_signed(vec!["api.example.org".to_owned()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["api.example.org".to_owned()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.toml");
        let text = |key: String| {
            format!(
                "[[servers]]\nid = \"a\"\nlabel = \"a\"\ncustom_domains = [\"api.example.org\"]\n\n\
                 [[servers.certificates]]\ndomains = [\"api.example.org\"]\ncert_pem = {:?}\nkey_pem = {key:?}\n",
                c.cert.pem()
            )
        };
        std::fs::write(&p, text(c.key_pair.serialize_pem())).unwrap();
        let table = RoutingTable::new(NodeConfig::default());
        assert_eq!(load_into(&table, &p).unwrap(), 1);
        assert!(table.load().certificate("api.example.org").is_some());
        std::fs::write(&p, text(other.key_pair.serialize_pem())).unwrap();
        let e = load_into(&table, &p).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}:6:1: server \"a\": certificates: ", p.display())),
            "{e}"
        );
        assert!(e.contains("does not match"), "{e}");
        assert_eq!(table.generation(), 1, "the last good snapshot stays");
    }
}
