//! Admin routes the binary adds to the proxy's admin listener: the generation fence,
//! the routing state and the log filter.

use std::{sync::Arc, time::Duration};

use http::{Method, StatusCode};
use sluice_proxy::Proxy;
use sluice_proxy::admin::{READ_ONLY, endpoint, json, text};
use sluice_routing::RoutingTable;
use sluice_store::etcd::StatusHandle;

type Req = http::Request<hyper::body::Incoming>;

/// Longest a `/generation?wait=` long-poll may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// Query parameters of `/generation`.
#[derive(Debug, Default, PartialEq, Eq)]
struct FenceQuery {
    wait: Option<u64>,
    timeout: Duration,
}

fn parse_fence_query(query: Option<&str>) -> Result<FenceQuery, String> {
    let mut q = FenceQuery { wait: None, timeout: Duration::from_secs(10) };
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "wait" => {
                q.wait = Some(v.parse().map_err(|_| format!("wait: not a generation: {v:?}"))?)
            }
            "timeout" => {
                let ms: u64 = v.parse().map_err(|_| format!("timeout: not milliseconds: {v:?}"))?;
                q.timeout = Duration::from_millis(ms).min(MAX_WAIT);
            }
            other => return Err(format!("unknown parameter {other:?}")),
        }
    }
    Ok(q)
}

/// Adds `/generation`, `/state` and `/store` to the admin listener.
///
/// `GET /generation` answers the applied routing generation (the store revision);
/// `GET /generation?wait=N&timeout=MS` long-polls until generation N is applied *and*
/// every replica it introduced has had its first health check, so a scheduler that
/// waits on it knows the new replica is truly routable (504 at the timeout).
pub fn install(server: &mut Proxy, table: &RoutingTable, store: Option<StatusHandle>) {
    let t = table.clone();
    server.admin_route(
        "/generation",
        endpoint(
            READ_ONLY,
            "applied routing generation; ?wait=N&timeout=MS fences",
            move |req: Req| {
                let t = t.clone();
                let query = parse_fence_query(req.uri().query());
                async move {
                    let q = match query {
                        Ok(q) => q,
                        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                    };
                    if let Some(n) = q.wait
                        && !t.wait_for_generation(n, q.timeout).await
                    {
                        return text(
                            StatusCode::GATEWAY_TIMEOUT,
                            format!(
                                "generation {n} not routable within {:?}; at {}\n",
                                q.timeout,
                                t.fence_generation()
                            ),
                        );
                    }
                    text(StatusCode::OK, format!("{}\n", t.fence_generation()))
                }
            },
        ),
    );
    let t = table.clone();
    server.admin_route(
        "/state",
        endpoint(
            READ_ONLY,
            "routing state, JSON (?server=<id>: that server only)",
            move |req: http::Request<hyper::body::Incoming>| {
                let snap = t.load_full();
                // `?server=<id>` keeps the answer small on a node with many servers.
                let one = req
                    .uri()
                    .query()
                    .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("server=")))
                    .map(String::from);
                async move {
                    let body = match one {
                        None => serde_json::to_string_pretty(&snap.state_view()),
                        Some(id) => match snap.server_view(&id) {
                            Some(view) => serde_json::to_string_pretty(&view),
                            None => {
                                return text(StatusCode::NOT_FOUND, format!("no server {id:?}\n"));
                            }
                        },
                    };
                    match body {
                        Ok(body) => json(StatusCode::OK, body),
                        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("state: {e}\n")),
                    }
                }
            },
        ),
    );
    if let Some(store) = store {
        let st = store.clone();
        server.readyz_detail(Arc::new(move |out: &mut String| {
            out.push_str(&format!("store: {}\n", st.get().summary()));
        }));
        server.metrics_extra(Box::new(StoreCollector(store.clone())));
        server.admin_route(
            "/store",
            endpoint(READ_ONLY, "routing store connection; 503 while stale", move |_req| {
                let status = store.get();
                async move {
                    let code = if status.is_stale() {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::OK
                    };
                    text(code, format!("{}\n", status.summary()))
                }
            }),
        );
    }
}

/// Adds `/logging`: `GET` shows the tracing filter in force, `PUT ?level=<filter>`
/// (`RUST_LOG` syntax, percent-encoded) replaces it until the next restart.
pub fn install_logging(server: &mut Proxy) {
    const METHODS: &[Method] = &[Method::GET, Method::HEAD, Method::PUT];
    server.admin_route(
        "/logging",
        endpoint(METHODS, "log filter; PUT ?level=<RUST_LOG filter> changes it", |req: Req| {
            let answer = logging_request(req.method(), req.uri().query());
            async move {
                match answer {
                    Ok(filter) => text(StatusCode::OK, format!("{filter}\n")),
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                }
            }
        }),
    );
}

fn logging_request(method: &Method, query: Option<&str>) -> Result<String, String> {
    if method != Method::PUT {
        return crate::logging::current().ok_or_else(|| "logging is not initialised".into());
    }
    let mut level = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("level", v)) => level = Some(percent_decode(v)?),
            _ => return Err(format!("unknown parameter {pair:?}; expected level=<filter>")),
        }
    }
    let level = level.ok_or("PUT /logging needs ?level=<filter>")?;
    let now = crate::logging::set(&level)?;
    tracing::info!(filter = %now, "log filter changed through the admin listener");
    Ok(now)
}

/// `%XX` and `+` decoding of a query value (filters carry `=`, `,` and `[`).
fn percent_decode(v: &str) -> Result<String, String> {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = v.get(i + 1..i + 3).ok_or_else(|| format!("bad escape in {v:?}"))?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad escape in {v:?}"))?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("{v:?}: not UTF-8"))
}

/// The `sluice_store_*` families, read from the store's status on each scrape.
#[derive(Debug)]
struct StoreCollector(StatusHandle);

impl prometheus_client::collector::Collector for StoreCollector {
    fn encode(
        &self,
        mut e: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> std::fmt::Result {
        store_metrics(&self.0.get(), &mut e)
    }
}

fn store_metrics(
    s: &sluice_store::etcd::StoreStatus,
    e: &mut prometheus_client::encoding::DescriptorEncoder<'_>,
) -> std::fmt::Result {
    // A `_timestamp_seconds` gauge rather than an age with a sentinel: `time() - it` is
    // the age, and 0 (never) reads as infinitely stale in the same alert.
    let last_contact = s
        .last_contact
        .and_then(|t| std::time::SystemTime::now().checked_sub(t.elapsed()))
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    use sluice_proxy::metrics::{counter, gauge};
    gauge(
        e,
        "sluice_store_connected",
        "1 while the routing store's watch is connected.",
        u64::from(s.connected),
    )?;
    gauge(
        e,
        "sluice_store_stale",
        "1 while routing may be behind the store (never synced, or disconnected).",
        u64::from(s.is_stale()),
    )?;
    gauge(
        e,
        "sluice_store_revision",
        "Store revision the routing snapshot reflects.",
        s.last_revision,
    )?;
    gauge(
        e,
        "sluice_store_last_contact_timestamp_seconds",
        "When the store last answered (Unix time; 0: never).",
        last_contact,
    )?;
    counter(
        e,
        "sluice_store_relists_total",
        "Full re-lists (after compaction or first sync).",
        s.relists,
    )?;
    counter(
        e,
        "sluice_store_malformed_values_total",
        "Store values ignored as malformed.",
        s.malformed_values,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_queries_parse_and_bound_the_wait() {
        assert_eq!(parse_fence_query(None).unwrap().wait, None);
        let q = parse_fence_query(Some("wait=42&timeout=250")).unwrap();
        assert_eq!((q.wait, q.timeout), (Some(42), Duration::from_millis(250)));
        assert_eq!(parse_fence_query(Some("wait=1&timeout=999999999")).unwrap().timeout, MAX_WAIT);
        assert!(parse_fence_query(Some("wait=x")).is_err());
        assert!(parse_fence_query(Some("nope=1")).is_err());
    }

    #[test]
    fn logging_levels_decode_from_the_query() {
        assert_eq!(
            percent_decode("info%2Csluice_proxy%3Ddebug").unwrap(),
            "info,sluice_proxy=debug"
        );
        assert_eq!(percent_decode("a+b").unwrap(), "a b");
        assert!(percent_decode("%zz").is_err());
        assert!(percent_decode("%2").is_err());
        assert!(logging_request(&Method::PUT, Some("nope=1")).is_err());
        assert!(logging_request(&Method::PUT, None).is_err());
    }
}
