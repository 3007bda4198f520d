//! The request path, as explicit phases:
//!
//! 1. hygiene: target length, framing (smuggling), unsafe header names and values;
//! 2. authority: one canonical authority from Host / `:authority` / absolute-form target;
//! 3. route: snapshot lookup (unknown → 503 or 404);
//! 4. proxy auth (401/403 before anything counts: a rejected request never reaches a
//!    replica, never counts as demand, and its body is drained (small) or the connection
//!    closed); then no ready replica → 503 + Retry-After, counted as demand;
//! 5. select a replica ([`sluice_routing::lb::select`]: P2C, or HRW on the session header)
//!    and count it in flight under the server's cap (RAII guard that lives until the
//!    response body ends or is dropped; over the cap → 503 + Retry-After);
//! 6. rewrite headers (hop-by-hop, auth headers and look-alikes, X-Forwarded-*, request
//!    id) and forward, streaming; a sampled fraction is teed to the mirror
//!    ([`crate::mirror`]);
//! 7. upgrades (HTTP/1.1 Upgrade, HTTP/2 extended CONNECT) become opaque streams handed to
//!    the [`OpaqueStreamHandoff`].

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use tokio::sync::watch;
use tokio::time::Instant;

use sluice_routing::{
    AuthDecision, AuthHeaders, InFlightGuard, LbPolicy, Protocol, Replica, RoutingTable, Server,
    authorize,
};

use crate::access_log::{Entry, LoggedBody, Proto, Unanswered};
use crate::body::{LimitedBody, ProxyBody, TrackedBody, empty};
use crate::config::{Cidr, ProxyConfig};
use crate::error::RequestError;
use crate::h1scan::Verdicts;
use crate::headers::{
    RequestIds, check_framing, check_safe, is_h1_upgrade, set_forwarded, strip_hop_by_hop,
};
use crate::io::{ActiveRequest, Activity};
use crate::metrics::Metrics;
use crate::upgrade::{OpaqueStream, OpaqueStreamHandoff};
use crate::upstream::{SendError, Upstreams, WireProtocol};

/// State shared by every connection.
pub(crate) struct ProxyState {
    pub(crate) cfg: ProxyConfig,
    pub(crate) routing: RoutingTable,
    pub(crate) upstreams: Upstreams,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) handoff: Arc<dyn OpaqueStreamHandoff>,
    /// Told about each proxy-auth rejection (see `Proxy::on_auth_rejected`).
    pub(crate) on_auth_rejected: Option<crate::server::AuthRejectedHook>,
    pub(crate) ids: RequestIds,
    pub(crate) request_id_header: HeaderName,
    /// Sources closed at accept (the deny list when the XDP guard is not attached).
    pub(crate) deny: Arc<[Cidr]>,
    /// Clients a PROXY header reports that are closed right after it.
    pub(crate) deny_reported: Arc<[Cidr]>,
    /// Sources banned in userspace (see [`crate::client::BanList`]).
    pub(crate) bans: Arc<crate::client::BanList>,
    pub(crate) draining: AtomicBool,
    /// Idle fast-path HTTP/1.1 connections and the sweep that closes them.
    pub(crate) idle: crate::idle::IdleSweep,
    /// Proxy-auth header names (and the look-alikes to strip).
    pub(crate) auth: AuthHeaders,
    /// Session header for servers that name none.
    pub(crate) session_header: HeaderName,
    /// Load-balancing policy.
    pub(crate) lb: LbPolicy,
    /// Passive ejection policy.
    pub(crate) ejection: sluice_routing::snapshot::EjectionPolicy,
    /// Autoscaler stream: one NDJSON chunk (every server's record) per interval.
    pub(crate) signal: tokio::sync::broadcast::Sender<bytes::Bytes>,
    /// The access log, when it is on.
    pub(crate) access_log: Option<crate::access_log::AccessLog>,
    /// HTTP-01 answers, when the node runs ACME (see `crate::acme`).
    pub(crate) acme: Option<Arc<dyn crate::acme::ChallengeAnswers>>,
}

/// What the request path knows about the client connection.
pub(crate) struct ConnInfo {
    /// The socket peer (the edge, behind a trusted proxy).
    pub(crate) peer: SocketAddr,
    /// The connection's client: the address a trusted peer's PROXY header reported, else
    /// the socket peer (IPv4-mapped IPv6 written as IPv4).
    pub(crate) client: IpAddr,
    /// Whether `client` is trusted: its X-Forwarded-* and request id are kept, and the
    /// request's client is read from its X-Forwarded-For (or `Forwarded`).
    pub(crate) trusted: bool,
    /// The listener's trusted prefixes (`trusted_proxies` and `request_id.trusted_edges`).
    pub(crate) trusted_set: Arc<[Cidr]>,
    /// The client's X-Forwarded-For entry, formatted once per connection.
    pub(crate) forwarded_for: HeaderValue,
    /// The client's `Forwarded` node (`for=...`), formatted once per connection when
    /// its listener sets `Forwarded` (`ListenerConfig::forwarded_header`), else `None`.
    /// Boxed: most listeners never set it, and inline it would grow every connection's
    /// record into the next allocation size.
    pub(crate) forwarded_node: Option<Box<HeaderValue>>,
    pub(crate) tls: bool,
    pub(crate) activity: Arc<Activity>,
    /// Held by opaque relays so graceful shutdown waits for them too.
    pub(crate) drain: watch::Receiver<bool>,
    /// HTTP/1.1 framing verdicts from the connection's read-side scanner.
    pub(crate) verdicts: Arc<Verdicts>,
}

/// Who one request is from.
pub(crate) struct Who {
    /// The connection's client is trusted (see [`ConnInfo::trusted`]).
    trusted: bool,
    /// The request's client (see [`crate::client::from_forwarded_for`]).
    client: IpAddr,
    /// `client` as a header value, for X-Real-IP.
    real_ip: HeaderValue,
}

impl Who {
    fn of(conn: &ConnInfo, headers: &http::HeaderMap) -> Who {
        if !conn.trusted {
            return Who {
                trusted: false,
                client: conn.client,
                real_ip: conn.forwarded_for.clone(),
            };
        }
        let client = crate::client::from_forwarded_for(headers, conn.client, &conn.trusted_set);
        let real_ip = if client == conn.client {
            conn.forwarded_for.clone()
        } else {
            crate::headers::forwarded_for(client)
        };
        Who { trusted: true, client, real_ip }
    }

    /// Whether this request's client may be banned: never a trusted address.
    fn bannable(&self, conn: &ConnInfo) -> bool {
        !crate::client::is_trusted(&conn.trusted_set, self.client)
    }
}

/// How a request asks to leave HTTP.
enum UpgradeKind {
    /// HTTP/1.1 `Connection: upgrade` + `Upgrade: <proto>`.
    H1,
    /// HTTP/2 extended CONNECT (RFC 8441) with `:protocol`.
    H2Connect(String),
}

/// Entry point from hyper: never fails; errors become short responses.
pub(crate) async fn handle(
    state: Arc<ProxyState>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let start = Instant::now();
    let active = conn.activity.request(start);
    let who = Who::of(&conn, req.headers());
    let trusted = who.trusted;
    let rid = if trusted {
        state.ids.keep_or_new(req.headers().get(&state.request_id_header))
    } else {
        state.ids.next_id()
    };
    let h1 = req.version() < Version::HTTP_2;
    // Off, the access log costs this one branch.
    let entry = match &state.access_log {
        Some(l) if l.sample() => {
            let mut e =
                Entry::begin(start, Proto::of(req.version()), conn.tls, who.client, conn.peer);
            e.request_id.clone_from(&rid);
            Some(e)
        }
        _ => None,
    };
    let mut log = Unanswered::new(&state, entry);
    // Every HTTP/1 request takes its verdict, in order, so later ones stay aligned.
    let ambiguous = h1 && conn.verdicts.next();
    let result = if ambiguous {
        Err(RequestError::BadRequest("both content-length and transfer-encoding"))
    } else {
        proxy(&state, &conn, req, &rid, &who, active, &mut log.entry).await
    };
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            if let Some(entry) = &mut log.entry {
                entry.error = Some(e.reason());
            }
            tracing::debug!(
                request_id = %rid,
                client = %who.client,
                peer = %conn.peer,
                status = e.status().as_u16(),
                "rejected: {e}"
            );
            let bad_framing = e.closes_connection();
            let mut r = e.into_response(&state.request_id_header, &rid);
            if h1 && bad_framing {
                // After a rejected request the connection's framing is unknowable.
                r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            r
        }
    };
    if let Some(v) = crate::headers::request_id_value(&rid) {
        resp.headers_mut().insert(state.request_id_header.clone(), v);
    }
    if h1
        && resp.status() != StatusCode::SWITCHING_PROTOCOLS
        && state.draining.load(Ordering::Relaxed)
    {
        // HTTP/1.1's only clean way to retire a keep-alive connection while draining:
        // the client sends its next request on a new connection (to the new process).
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    state.metrics.observe(resp.status().as_u16(), start.elapsed());
    if let Some(mut entry) = log.entry.take() {
        // The rest of the record (bytes out, duration) is known when the body ends.
        entry.head(resp.status().as_u16());
        let (parts, body) = resp.into_parts();
        let body = LoggedBody::new(body, entry, state.clone()).boxed_unsync();
        resp = Response::from_parts(parts, body);
    }
    Ok(resp)
}

/// Phase 2: the request's authority as sent (for the replica's Host and X-Forwarded-Host), after
/// checking that Host and the request target agree. A value, not a string: the hyper path's
/// Host is then shared with the request rather than copied, and one copy serves both
/// headers.
fn authority(req: &Request<Incoming>) -> Result<HeaderValue, RequestError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(RequestError::BadRequest("more than one Host header"));
    }
    let host_str = host
        .map(|h| h.to_str().map_err(|_| RequestError::BadRequest("Host is not ASCII")))
        .transpose()?;
    let target = req.uri().authority().map(|a| a.as_str());
    let raw = match (target, host.zip(host_str)) {
        (Some(t), Some((_, h))) => {
            if canonical_host(t)? != canonical_host(h)? {
                return Err(RequestError::BadRequest(if req.version() == Version::HTTP_2 {
                    "Host and :authority disagree"
                } else {
                    "absolute request target names another host than Host"
                }));
            }
            authority_value(t)?
        }
        (Some(t), None) => authority_value(t)?,
        (None, Some((h, _))) => h.clone(),
        (None, None) => return Err(RequestError::BadRequest("no Host or :authority")),
    };
    if req.version() == Version::HTTP_11 && host.is_none() {
        return Err(RequestError::BadRequest("HTTP/1.1 request without Host"));
    }
    Ok(raw)
}

fn authority_value(raw: &str) -> Result<HeaderValue, RequestError> {
    HeaderValue::from_str(raw).map_err(|_| RequestError::BadRequest("invalid authority"))
}

/// The routing key of an authority (lower case, no port or trailing dot), borrowed when
/// the authority is one already.
fn canonical_host(raw: &str) -> Result<std::borrow::Cow<'_, str>, RequestError> {
    sluice_routing::canonical_authority_cow(raw)
        .map_err(|_| RequestError::BadRequest("invalid authority"))
}

fn upgrade_kind(req: &Request<Incoming>) -> Result<Option<UpgradeKind>, RequestError> {
    if req.method() == Method::CONNECT {
        return match req.extensions().get::<hyper::ext::Protocol>() {
            Some(p) if req.version() == Version::HTTP_2 => {
                Ok(Some(UpgradeKind::H2Connect(p.as_str().to_owned())))
            }
            _ => Err(RequestError::BadRequest("CONNECT tunnels are not supported")),
        };
    }
    Ok(is_h1_upgrade(req.version(), req.headers()).then_some(UpgradeKind::H1))
}

fn forwarded_head(
    state: &ProxyState,
    conn: &ConnInfo,
    parts: &mut http::request::Parts,
    raw_authority: &HeaderValue,
    rid: &str,
    who: &Who,
    keep_upgrade: bool,
) -> Result<(), RequestError> {
    // Room for what is added below (Host, X-Forwarded-*, X-Real-IP, the request id) at
    // once: growing the map twice cost a reallocation each.
    parts.headers.reserve(6);
    strip_hop_by_hop(&mut parts.headers, keep_upgrade);
    // sluice answers `100-continue` to the client itself (hyper does, when the body is first
    // read), so the replica must not be asked to.
    parts.headers.remove(header::EXPECT);
    parts.headers.insert(header::HOST, raw_authority.clone());
    crate::headers::strip_forwarding_lookalikes(&mut parts.headers);
    set_forwarded(
        &mut parts.headers,
        &conn.forwarded_for,
        conn.forwarded_node.as_deref(),
        &who.real_ip,
        who.trusted,
        if conn.tls { "https" } else { "http" },
        raw_authority,
    );
    if let Some(v) = crate::headers::request_id_value(rid) {
        parts.headers.insert(state.request_id_header.clone(), v);
    }
    // Credentials never reach a replica, nor do their `_` look-alikes (whatever the server's
    // auth mode). One pass over the names first: removal by name parses and hashes each
    // look-alike, which is wasted work on the many requests that carry none.
    if parts.headers.keys().any(|k| state.auth.is_auth_header(k.as_str().as_bytes())) {
        for name in state.auth.strip_names() {
            parts.headers.remove(name.as_str());
        }
    }
    Ok(())
}

/// A header's value when it occurs exactly once.
fn single<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a [u8]> {
    let mut all = headers.get_all(name).iter();
    let first = all.next()?;
    all.next().is_none().then_some(first.as_bytes())
}

/// After a 401/403: read and discard a small HTTP/1.1 body so the connection stays usable;
/// returns whether the connection must close instead. The body is never forwarded.
async fn drain_rejected(req: &mut Request<Incoming>, cap: u64) -> bool {
    use http_body::Body as _;
    if req.version() >= Version::HTTP_2 {
        // Dropping the body resets just this stream.
        return false;
    }
    if req.body().is_end_stream() {
        return false;
    }
    if req.headers().contains_key(header::EXPECT) {
        // Reading would send `100 Continue` and invite the body we are refusing.
        return true;
    }
    let declared = req.body().size_hint().exact();
    if declared.is_some_and(|n| n > cap) {
        return true;
    }
    let drain = async {
        let mut seen = 0u64;
        while let Some(frame) = req.body_mut().frame().await {
            let Ok(frame) = frame else { return true };
            seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            if seen > cap {
                return true;
            }
        }
        false
    };
    // A client that stalls mid-body costs us at most this.
    tokio::time::timeout(std::time::Duration::from_secs(2), drain).await.unwrap_or(true)
}

/// The request path, one phase after another; each phase may answer the request itself.
async fn proxy(
    state: &Arc<ProxyState>,
    conn: &Arc<ConnInfo>,
    mut req: Request<Incoming>,
    rid: &str,
    who: &Who,
    active: ActiveRequest,
    log: &mut Option<Box<Entry>>,
) -> Result<Response<ProxyBody>, RequestError> {
    refuse_banned(state, conn, who, &mut req).await?;
    let upgrade = check_hygiene(state, &req)?;

    // Phase 2: authority.
    let raw_authority = authority(&req)?;
    let host = canonical_host(raw_authority.to_str().unwrap_or_default())?;
    if let Some(answer) = acme_answer(state, &req, &host).await {
        return Ok(answer);
    }

    let server = route(state, &host, log)?;
    check_proxy_auth(state, conn, who, &mut req, &server).await?;
    let server = admit(state, server, &req).await?;

    // Phase 5: select and count (under the server's in-flight cap).
    let chosen = select_replica(state, &server, &req)?;
    if let Some(e) = log.as_mut() {
        e.replica = Some(chosen.replica.clone());
        e.proto_out = Some(Proto::of(if upgrade.is_some() {
            Version::HTTP_11
        } else {
            wire_of(&chosen.replica).1
        }));
    }
    let ex = Exchange { state, conn, rid, who, raw_authority: &raw_authority, server: &server };
    match upgrade {
        Some(kind) => {
            let hold = Box::new((chosen.in_flight, active));
            forward_upgrade(&ex, req, kind, &chosen.replica, hold).await
        }
        None => forward(&ex, req, chosen, active, log).await,
    }
}

/// What the phases after routing share about one request.
#[derive(Clone, Copy)]
struct Exchange<'a> {
    state: &'a Arc<ProxyState>,
    conn: &'a Arc<ConnInfo>,
    rid: &'a str,
    who: &'a Who,
    /// The authority as sent, for the replica's Host and X-Forwarded-Host.
    raw_authority: &'a HeaderValue,
    server: &'a Arc<Server>,
}

impl Exchange<'_> {
    /// The request body limit: the server's own, else the node's.
    fn body_limit(&self) -> Option<u64> {
        self.server.spec.limits.max_body_bytes.or(self.state.cfg.limits.max_body_bytes)
    }
}

/// The replica a request goes to, counted in flight.
struct Chosen {
    replica: Arc<Replica>,
    in_flight: InFlightGuard,
    /// Kept for a retry's choice; hashed only when a session is named.
    session_hash: Option<u64>,
}

/// Phase 0: a banned client (one behind a trusted edge, or one banned while its
/// connection was open) is refused here, with the XDP guard's effect but later.
async fn refuse_banned(
    state: &ProxyState,
    conn: &ConnInfo,
    who: &Who,
    req: &mut Request<Incoming>,
) -> Result<(), RequestError> {
    if who.bannable(conn) && state.bans.is_banned(who.client) {
        state.metrics.client_requests_banned_total.inc();
        let close = drain_rejected(req, state.cfg.auth.drain_body_bytes).await;
        return Err(RequestError::Forbidden { close });
    }
    Ok(())
}

/// Phase 1: hygiene (sizes, framing, unsafe headers); says whether the request upgrades.
fn check_hygiene(
    state: &ProxyState,
    req: &Request<Incoming>,
) -> Result<Option<UpgradeKind>, RequestError> {
    let target_len = req.uri().path_and_query().map(|p| p.as_str().len()).unwrap_or(0);
    if target_len > state.cfg.limits.max_uri_bytes {
        return Err(RequestError::UriTooLong);
    }
    // hyper's HTTP/1.1 read buffer limit is not a precise header-block limit; count it here
    // (HTTP/2 header lists are bounded by SETTINGS_MAX_HEADER_LIST_SIZE already).
    let header_bytes: usize =
        req.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    // The count too: HTTP/1.1's is enforced while parsing, HTTP/2's only here, so both
    // protocols stop at the same number.
    if header_bytes > state.cfg.limits.max_header_bytes
        || req.headers().len() > state.cfg.limits.max_headers
    {
        return Err(RequestError::HeadersTooLarge);
    }
    check_framing(req.version(), req.headers())?;
    check_safe(req.headers())?;
    upgrade_kind(req)
}

/// Phase 2b: an ACME HTTP-01 challenge of sluice's own is answered here, before routing,
/// for any host (the domain may not route anywhere yet). A token sluice did not issue is
/// routed like any request: a server may answer its own challenges.
async fn acme_answer(
    state: &ProxyState,
    req: &Request<Incoming>,
    host: &str,
) -> Option<Response<ProxyBody>> {
    let acme = state.acme.as_ref()?;
    let token = req.uri().path().strip_prefix(crate::acme::CHALLENGE_PREFIX)?;
    let key_authorization = acme.answer(host, token).await?;
    let mut r = Response::new(crate::body::full(key_authorization));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    Some(r)
}

/// Phase 3: route. The snapshot guard is dropped before any await.
fn route(
    state: &ProxyState,
    host: &str,
    log: &mut Option<Box<Entry>>,
) -> Result<Arc<Server>, RequestError> {
    let server: Arc<Server> = {
        let snap = state.routing.load();
        match snap.lookup(host) {
            Some(s) => s.clone(),
            None => {
                let status = StatusCode::from_u16(state.cfg.unknown_domain_status)
                    .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                return Err(RequestError::UnknownDomain(status));
            }
        }
    };
    crate::access_log::route(log, state.access_log.as_ref(), &server);
    Ok(server)
}

/// Phase 4: proxy auth, before anything is counted or sent.
async fn check_proxy_auth(
    state: &ProxyState,
    conn: &ConnInfo,
    who: &Who,
    req: &mut Request<Incoming>,
    server: &Arc<Server>,
) -> Result<(), RequestError> {
    if server.spec.unauthenticated {
        return Ok(());
    }
    let decision = {
        let snap = state.routing.load();
        let key = single(req.headers(), state.auth.key());
        let secret = single(req.headers(), state.auth.secret());
        authorize(&snap, server, key, secret)
    };
    if decision == AuthDecision::Allow {
        return Ok(());
    }
    server.stats.auth_rejected.fetch_add(1, Ordering::Relaxed);
    // The request's client, never a trusted edge: banning the edge would cut
    // off every client behind it.
    if let Some(hook) = &state.on_auth_rejected
        && who.bannable(conn)
    {
        hook(who.client);
    }
    let close = drain_rejected(req, state.cfg.auth.drain_body_bytes).await;
    Err(match decision {
        AuthDecision::Forbidden => RequestError::Forbidden { close },
        _ => RequestError::Unauthenticated { close },
    })
}

/// Phase 4b: admission. A server without replicas holds the request for a cold start (or
/// refuses it); over the in-flight cap or a declared body over the limit are refused.
/// Returns the server to use: a cold start's is a later snapshot's.
async fn admit(
    state: &Arc<ProxyState>,
    mut server: Arc<Server>,
    req: &Request<Incoming>,
) -> Result<Arc<Server>, RequestError> {
    if server.replicas.is_empty() {
        // Demand: the scale-from-zero signal in the autoscaler stream (a held request
        // is the same demand: it is what makes the first replica start).
        server.stats.no_replica.fetch_add(1, Ordering::Relaxed);
        let Some(hold) = server.spec.cold_start_hold else {
            return Err(RequestError::NoReplica);
        };
        server =
            crate::coldstart::hold(state, &server, hold).await.ok_or(RequestError::NoReplica)?;
    }
    if server.at_in_flight_cap() {
        server.stats.over_limit.fetch_add(1, Ordering::Relaxed);
        return Err(RequestError::Overloaded);
    }

    let limit = server.spec.limits.max_body_bytes.or(state.cfg.limits.max_body_bytes);
    if let Some(limit) = limit {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(RequestError::BodyTooLarge(limit));
        }
    }
    Ok(server)
}

/// Phase 5: pick a replica (session affinity when the request names one) and count the
/// request against it, under the server's in-flight cap.
fn select_replica(
    state: &ProxyState,
    server: &Arc<Server>,
    req: &Request<Incoming>,
) -> Result<Chosen, RequestError> {
    let session_header = server.spec.session_header.as_deref();
    let session = match session_header {
        Some(name) => req.headers().get(name),
        None => req.headers().get(&state.session_header),
    };
    let replica: Arc<Replica> =
        sluice_routing::lb::select(server, session.map(|v| v.as_bytes()), &state.lb)
            .cloned()
            .ok_or(RequestError::NoReplica)?;
    let session_hash = session.map(|v| sluice_routing::lb::session_hash(v.as_bytes()));
    let in_flight = server.try_begin_request(&replica).map_err(|_| RequestError::Overloaded)?;
    Ok(Chosen { replica, in_flight, session_hash })
}

/// Phase 6: rewrite the head and forward, with the one retry of a request that provably
/// never reached its replica; the response streams back with the exchange's idle clock.
async fn forward(
    ex: &Exchange<'_>,
    req: Request<Incoming>,
    chosen: Chosen,
    active: ActiveRequest,
    log: &mut Option<Box<Entry>>,
) -> Result<Response<ProxyBody>, RequestError> {
    let Exchange { state, conn, rid, who, raw_authority, server } = *ex;
    let Chosen { mut replica, mut in_flight, session_hash } = chosen;
    let limit = ex.body_limit();
    let idle = server.spec.timeouts.idle.or(state.cfg.timeouts.upstream_idle);
    let before_head = head_wait(state, server);
    let h1_client = req.version() < Version::HTTP_2;
    let (mut parts, body) = req.into_parts();
    forwarded_head(state, conn, &mut parts, raw_authority, rid, who, false)?;
    let (wire, version) = wire_of(&replica);
    parts.version = version;
    let drain_cap = if h1_client { crate::h1proxy::EARLY_DRAIN_BYTES } else { 0 };
    let body = crate::body::DrainOnDrop::new(body, drain_cap, crate::h1proxy::EARLY_DRAIN_TIME);
    let early_rest = body.early_rest();
    // The exchange's idle clock: touched by every request-body chunk taken for the
    // replica and every response chunk, read by one timer.
    let progress = crate::io::Progress::new();
    let mut body = LimitedBody::new(body, limit).with_progress(progress.clone());
    if let Some(e) = log.as_mut() {
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        body = body.with_count(count.clone());
        e.bytes_in_counter = Some(count);
    }
    let body = body.boxed_unsync();
    let body = crate::mirror::maybe_tee(state, server, &parts, body);
    let connect = server.spec.timeouts.connect;
    let send = async {
        let req = Request::from_parts(parts, body);
        match state.upstreams.send(replica.addr, wire, connect, req).await {
            Ok(up) => Ok(up),
            Err(SendError { error, unsent: Some((reason, mut req)) }) => {
                // The one retry: the request provably never reached `replica`. It counts
                // against `replica`, then goes once to another ready replica (never the
                // same one); whatever that attempt returns is the answer.
                replica.stats.failures.fetch_add(1, Ordering::Relaxed);
                record_failure(state, server, &replica);
                let Some(other) =
                    sluice_routing::lb::select_other(server, &replica, session_hash).cloned()
                else {
                    return Err(error);
                };
                let Ok(guard) = server.try_begin_retry(&other) else { return Err(error) };
                state.metrics.upstream_retries[reason as usize].inc();
                tracing::debug!(request_id = %rid, from = %replica.addr, to = %other.addr,
                    reason = reason.as_str(), "never sent; retrying on another replica");
                in_flight = guard;
                replica = other;
                let (wire, version) = wire_of(&replica);
                *req.version_mut() = version;
                state.upstreams.send(replica.addr, wire, connect, req).await.map_err(|e| e.error)
            }
            Err(e) => Err(e.error),
        }
    };
    // Not a deadline: the wait ends only once nothing moved for `before_head`.
    let sent = tokio::select! {
        r = send => r,
        () = progress.quiet_for(before_head) => Err(RequestError::UpstreamTimeout),
    };
    if let Some(e) = log.as_mut() {
        // A retry may have moved the request to another replica.
        e.replica = Some(replica.clone());
        e.proto_out = Some(Proto::of(wire_of(&replica).1));
    }
    let up = match sent {
        Ok(up) => {
            replica.stats.ejection.record_success();
            up
        }
        Err(e) => {
            if progress.body_exceeded()
                && let Some(limit) = limit
            {
                return Err(RequestError::BodyTooLarge(limit));
            }
            // A malformed request body is the client's fault, not the replica's.
            if matches!(e, RequestError::Upstream(_) | RequestError::UpstreamTimeout) {
                replica.stats.failures.fetch_add(1, Ordering::Relaxed);
                record_failure(state, server, &replica);
            }
            return Err(e);
        }
    };
    let (mut rparts, rbody) = up.response.into_parts();
    strip_hop_by_hop(&mut rparts.headers, false);
    rparts.version = Version::HTTP_11;
    // An answer before the replica read the whole body: a rest of unknown length (chunked)
    // is drained here, within the same bound as the fast path, before the head goes out.
    let (cap, time) = (crate::h1proxy::EARLY_DRAIN_BYTES, crate::h1proxy::EARLY_DRAIN_TIME);
    // Asked before `settle`, which claims the rest whatever its state.
    let still_streaming = h1_client && early_rest.still_streaming_unknown();
    let rest_too_big = h1_client && early_rest.settle(cap, time).await;
    if still_streaming || rest_too_big || (h1_client && early_rest.left() > cap) {
        // More of the body is due than sluice drains: hyper will close the connection
        // after the answer, so the answer must say so.
        rparts.headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let hold = (in_flight, up.hold, active);
    let body =
        TrackedBody::new(rbody, idle.map(|d| (d, progress)), hold, up.on_complete).boxed_unsync();
    Ok(Response::from_parts(rparts, body))
}

/// The wire protocol to speak to `replica`, and the request version that goes with it.
fn wire_of(replica: &Replica) -> (WireProtocol, Version) {
    match replica.protocol {
        Protocol::H2c => (WireProtocol::H2c, Version::HTTP_2),
        _ => (WireProtocol::Http1, Version::HTTP_11),
    }
}

/// How long an exchange may stay quiet before its response head: the idle timeout, and
/// at most the first-byte timeout (both counted from the last byte that moved, so a long
/// upload does not eat the replica's time to answer).
pub(crate) fn head_wait(state: &ProxyState, server: &Server) -> std::time::Duration {
    let t = &server.spec.timeouts;
    let first = t.first_byte.unwrap_or(state.cfg.timeouts.upstream_first_byte);
    match t.idle.or(state.cfg.timeouts.upstream_idle) {
        Some(idle) => idle.min(first),
        None => first,
    }
}

/// Counts an upstream failure towards passive ejection; the last replica of `server` not
/// ejected is never ejected.
pub(crate) fn record_failure(state: &ProxyState, server: &Server, replica: &Arc<Replica>) {
    let others_ready = || {
        server.replicas.iter().any(|r| !Arc::ptr_eq(r, replica) && !r.stats.ejection.is_ejected())
    };
    if replica.stats.ejection.record_failure(&state.ejection, others_ready()) {
        tracing::info!(replica = %replica.addr, "replica ejected after consecutive upstream failures");
    }
}

static SEC_WEBSOCKET_KEY: HeaderName = HeaderName::from_static("sec-websocket-key");
static SEC_WEBSOCKET_ACCEPT: HeaderName = HeaderName::from_static("sec-websocket-accept");

/// A fresh `Sec-WebSocket-Key` (RFC 6455 section 4.1): 16 random bytes in base64. Its
/// only job is to be unpredictable per handshake; the replica echoes a hash of it.
fn generate_key() -> Result<String, getrandom::Error> {
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce)?;
    Ok(data_encoding::BASE64.encode(&nonce))
}

/// An upgrade (HTTP/1.1 `Upgrade`, or HTTP/2 extended CONNECT made one): forwarded as an
/// HTTP/1.1 upgrade; on 101 both sides become an opaque stream handed to the handoff.
async fn forward_upgrade(
    ex: &Exchange<'_>,
    mut req: Request<Incoming>,
    kind: UpgradeKind,
    replica: &Arc<Replica>,
    hold: Box<dyn Send>,
) -> Result<Response<ProxyBody>, RequestError> {
    let Exchange { state, conn, rid, who, raw_authority, server } = *ex;
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    forwarded_head(state, conn, &mut parts, raw_authority, rid, who, true)?;
    parts.version = Version::HTTP_11;
    // An HTTP/1.1 upgrade request may carry a body (its framing is the request's own): it
    // goes to the replica, which would otherwise wait for it forever. An HTTP/2 CONNECT
    // stream's data is the tunnel itself, relayed after the upgrade, never a request body.
    let body = match kind {
        UpgradeKind::H1 => {
            // A declared length over the limit was refused already; this bounds chunked.
            LimitedBody::new(body, ex.body_limit()).boxed_unsync()
        }
        UpgradeKind::H2Connect(_) => {
            parts.headers.remove(header::CONTENT_LENGTH);
            empty()
        }
    };
    if let UpgradeKind::H2Connect(protocol) = &kind {
        // RFC 8441 → RFC 6455: GET + Upgrade, with the key HTTP/2 does not carry.
        parts.method = Method::GET;
        parts.extensions.remove::<hyper::ext::Protocol>();
        let proto = HeaderValue::from_str(protocol)
            .map_err(|_| RequestError::BadRequest("invalid :protocol"))?;
        parts.headers.insert(header::UPGRADE, proto);
        if protocol.eq_ignore_ascii_case("websocket")
            && !parts.headers.contains_key(&SEC_WEBSOCKET_KEY)
            && let Ok(key) = generate_key()
            && let Ok(v) = HeaderValue::from_str(&key)
        {
            parts.headers.insert(&SEC_WEBSOCKET_KEY, v);
        }
    }
    parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    let req = Request::from_parts(parts, body);
    let (up, registration) =
        match state.upstreams.send_upgrade(replica.addr, server.spec.timeouts.connect, req).await {
            Ok(up) => up,
            Err(e) => {
                replica.stats.failures.fetch_add(1, Ordering::Relaxed);
                record_failure(state, server, replica);
                return Err(e);
            }
        };
    let mut response = up.response;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The replica declined: an ordinary response.
        let (mut rparts, rbody) = response.into_parts();
        strip_hop_by_hop(&mut rparts.headers, false);
        let hold = (hold, up.hold, registration);
        let body = TrackedBody::new(rbody, None, hold, None).boxed_unsync();
        return Ok(Response::from_parts(rparts, body));
    }
    let upstream_upgrade = hyper::upgrade::on(&mut response);
    let (mut rparts, _) = response.into_parts();
    let h2 = matches!(kind, UpgradeKind::H2Connect(_));
    if h2 {
        strip_hop_by_hop(&mut rparts.headers, false);
        rparts.headers.remove(&SEC_WEBSOCKET_ACCEPT);
        rparts.status = StatusCode::OK;
    } else {
        strip_hop_by_hop(&mut rparts.headers, true);
        rparts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    rparts.version = Version::HTTP_11;

    let handoff = state.handoff.clone();
    let metrics = state.metrics.clone();
    let drain = conn.drain.clone();
    let (server_id, replica_id, replica_addr) =
        (server.id().to_owned(), replica.id.clone(), replica.addr);
    let splice_mode = server.spec.splice;
    let upstream_hold = up.hold;
    tokio::spawn(async move {
        // Counted in flight (autoscaling) for the whole life of the opaque stream, and its
        // replica socket registered, so a drain deadline ends it (the relay then sees the
        // replica leg shut down and returns).
        let _hold = (hold, drain, registration);
        let (client, upstream) = match tokio::join!(client_upgrade, upstream_upgrade) {
            (Ok(c), Ok(u)) => (c, u),
            (c, u) => {
                tracing::debug!(
                    client_ok = c.is_ok(),
                    upstream_ok = u.is_ok(),
                    "upgrade did not complete"
                );
                return;
            }
        };
        drop(upstream_hold);
        metrics.opaque_streams_open.inc();
        metrics.opaque_streams_total.inc();
        let res = handoff
            .relay(OpaqueStream {
                client,
                upstream,
                server: server_id,
                replica: replica_id,
                replica_addr,
                splice: splice_mode,
            })
            .await;
        metrics.opaque_streams_open.dec();
        match res {
            Ok((up, down)) => tracing::debug!(up, down, "opaque stream closed"),
            Err(e) => tracing::debug!("opaque stream ended: {e}"),
        }
    });
    Ok(Response::from_parts(rparts, empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key an HTTP/2 extended CONNECT gains at an HTTP/1.1 replica: 16 random bytes
    /// in base64, as RFC 6455 asks.
    #[test]
    fn websocket_key_is_16_bytes_in_base64() {
        let key = generate_key().unwrap();
        assert_eq!(key.len(), 24);
        assert!(key.ends_with("=="), "{key}");
        assert_ne!(key, generate_key().unwrap());
    }
}
