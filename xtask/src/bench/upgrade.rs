//! P4: upgraded (WebSocket-style) streams through `sluice run`, relayed in userspace,
//! spliced in the kernel, and under the adaptive policy, against a direct connection.
//!
//! One sluice process serves three servers that differ only in their `splice` routing
//! field (`"never"`, `"always"`, `"auto"`), all pointing at one echo replica in the
//! harness. Each measurement opens a fresh upgraded stream (an HTTP/1.1 `Upgrade:
//! websocket` request answered `101`, then raw bytes, so no framing cost muddies the
//! relay's): a 64 B ping-pong (median and p99 round trip over many round trips), and a
//! one-direction stream of 1 KiB or 16 KiB writes for a fixed time (MB/s, counted by the
//! replica). sluice's `/metrics` counter of spliced bytes tells, per run, whether the
//! kernel carried the stream, so a mode that did not do what it says is noted, not
//! silently reported. Last, one spliced stream is timed before and after `sluice upgrade`
//! hands it to a new process, on the same connection.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{
    Ctx, Placement,
    procs::{self, Guard},
    results::{Better, Metric, summary},
    systems::{self, Kind},
};

/// Size of one ping and its echo.
const PING: usize = 64;
/// Write sizes of the stream-throughput runs.
const WRITES: [usize; 2] = [1024, 16 * 1024];
/// Round trips before the timed ones (pools, caches, the auto policy's first look).
const WARM_ROUND_TRIPS: usize = 200;
/// Bound on any single read or write (a stuck stream fails the run, never the bench).
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The byte that ends a sink stream (the payload is all zeros).
const END: u8 = 1;

/// The splice modes measured through sluice, with the routing field's value.
const MODES: [(Kind, &str); 3] =
    [(Kind::SluiceUserspace, "never"), (Kind::SluiceSpliced, "always"), (Kind::SluiceAuto, "auto")];

/// Runs P4.
pub fn p4(ctx: &mut Ctx) -> Result<()> {
    if !ctx.wanted.contains(&Kind::Sluice) {
        ctx.results.note("P4", "skipped: sluice not selected");
        return Ok(());
    }
    if let Err(e) = &ctx.env.sluice {
        ctx.results.note("P4", format!("skipped: no sluice binary: {e}"));
        return Ok(());
    }
    let replica = EchoReplica::start()?;
    let pin_dir = super::systems::bench_pin_dir("p4");
    let started = Sluice::start(ctx, replica.addr, &pin_dir);
    let sluice = match started {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&pin_dir);
            ctx.results.note("P4", format!("skipped: sluice did not start: {e:#}"));
            return Ok(());
        }
    };
    let out = measure(ctx, &replica, &sluice);
    if out.is_ok()
        && let Err(e) = across_upgrade(ctx, &sluice, &pin_dir)
    {
        ctx.results.note("P4", format!("across `sluice upgrade`: failed: {e:#}"));
    }
    drop(sluice);
    let _ = std::fs::remove_dir_all(&pin_dir);
    out
}

fn measure(ctx: &mut Ctx, replica: &EchoReplica, sluice: &Sluice) -> Result<()> {
    let plan = &ctx.plan;
    let (rtt_secs, stream_secs) = if plan.quick { (0.5, 0.5) } else { (1.0, 1.0) };
    let mut targets: Vec<(Kind, SocketAddr, String)> =
        vec![(Kind::Direct, replica.addr, "replica".into())];
    for (kind, host) in &sluice.servers {
        targets.push((*kind, sluice.proxy, host.clone()));
    }
    let mut auto: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for p in ctx.plan.placements.clone() {
        if let Some(pid) = sluice.guard.as_ref().map(Guard::pid) {
            procs::repin(pid, p.proxy).context("pinning sluice")?;
        }
        eprintln!("bench: P4: placement {}: {}", p.name, p.what);
        let median = Metric::new("P4", p.name, "64 B round trip, median", "µs", Better::Lower);
        let p99 = Metric::new("P4", p.name, "64 B round trip, p99", "µs", Better::Lower);
        for _ in 0..ctx.plan.runs {
            for (kind, to, host) in &targets {
                let before = sluice.spliced_bytes();
                match round_trips(*to, host, rtt_secs) {
                    Ok(rtts) => {
                        if let Some((m, tail)) = percentiles(&rtts)
                            && check(ctx, sluice, *kind, before, "round trip", &mut auto)
                        {
                            ctx.results.add(&median, *kind, m);
                            ctx.results.add(&p99, *kind, tail);
                        }
                    }
                    Err(e) => ctx.results.note("P4", format!("{kind}: round trip failed: {e:#}")),
                }
                for size in WRITES {
                    let what = format!("stream throughput, {} KiB writes", size / 1024);
                    let m = Metric::new("P4", p.name, what.clone(), "MB/s", Better::Higher);
                    let before = sluice.spliced_bytes();
                    match stream(*to, host, size, stream_secs) {
                        Ok(mbps) => {
                            if check(ctx, sluice, *kind, before, &what, &mut auto) {
                                ctx.results.add(&m, *kind, mbps);
                            }
                        }
                        Err(e) => ctx.results.note("P4", format!("{kind}: {what} failed: {e:#}")),
                    }
                }
            }
        }
        note_placement(ctx, p, sluice);
    }
    let kinds: Vec<String> = sluice.servers.iter().map(|(k, _)| k.to_string()).collect();
    ctx.results.note(
        "P4",
        format!(
            "each number is a fresh upgraded stream: {rtt_secs} s of {PING} B ping-pong \
             (after {WARM_ROUND_TRIPS} untimed), or {stream_secs} s of writes one way; measured: \
             direct, {}",
            kinds.join(", ")
        ),
    );
    for (what, (spliced, runs)) in &auto {
        ctx.results.note(
            "P4",
            format!(
                "{}: {what}: the kernel spliced {spliced} of {runs} runs' streams",
                Kind::SluiceAuto
            ),
        );
    }
    for n in &sluice.notes {
        ctx.results.note("P4", n.clone());
    }
    Ok(())
}

/// Whether a run of `kind` went the way its mode says (read from the kernel's splice
/// counter); notes and returns false when not, so the run is not counted. Auto's choices
/// are tallied in `auto` (spliced runs, runs) per metric.
fn check(
    ctx: &mut Ctx,
    sluice: &Sluice,
    kind: Kind,
    before: Option<u64>,
    what: &str,
    auto: &mut BTreeMap<String, (usize, usize)>,
) -> bool {
    let spliced = match (before, sluice.spliced_bytes()) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b)),
        _ => None,
    };
    match (kind, spliced) {
        (Kind::SluiceSpliced, Some(0) | None) => {
            ctx.results.note(
                "P4",
                format!(
                    "{kind}: {what}: run discarded: the kernel carried none of it (splice \
                     unavailable here?)"
                ),
            );
            false
        }
        (Kind::SluiceUserspace, Some(n)) if n > 0 => {
            ctx.results
                .note("P4", format!("{kind}: {what}: run discarded: the kernel spliced {n} bytes"));
            false
        }
        (Kind::SluiceAuto, n) => {
            let tally = auto.entry(what.to_string()).or_default();
            tally.0 += usize::from(n.unwrap_or(0) > 0);
            tally.1 += 1;
            true
        }
        _ => true,
    }
}

fn note_placement(ctx: &mut Ctx, p: Placement, sluice: &Sluice) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let allowed = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map_or("?", str::trim)
        .to_string();
    ctx.results.note(
        "P4",
        format!(
            "placement {}: {}; client and echo replica: threads of the harness (xtask[{}]) \
             allowed CPU {allowed}",
            p.name,
            p.what,
            std::process::id()
        ),
    );
    if let Some(g) = sluice.guard.as_ref() {
        ctx.results
            .note("P4", format!("placement {}: sluice: {}", p.name, procs::placement(g.pid())));
    }
}

/// The P4 sluice: three servers, one per splice mode (or one without the field when
/// this sluice does not know it yet).
struct Sluice {
    guard: Option<Guard>,
    proxy: SocketAddr,
    admin: SocketAddr,
    /// Measured kinds and the `Host` that selects each.
    servers: Vec<(Kind, String)>,
    /// What start-up found worth saying.
    notes: Vec<String>,
}

impl Sluice {
    fn start(ctx: &Ctx, replica: SocketAddr, pin_dir: &std::path::Path) -> Result<Sluice> {
        let env = &ctx.env;
        let host = |label: &str| format!("{label}.{}.{}", env.region, env.base);
        let server = |label: &str, splice: Option<&str>| {
            let field = splice.map(|s| format!("splice = \"{s}\"\n")).unwrap_or_default();
            format!(
                "[[servers]]\nid = \"{label}\"\nlabel = \"{label}\"\nregions = [\"{r}\"]\n\
                 environment = \"bench\"\nunauthenticated = true\n{field}\n\
                 [[replicas]]\nserver = \"{label}\"\nid = \"{label}-0\"\naddress = \"{replica}\"\n\
                 protocol = \"http1\"\nstate = \"ready\"\n\n",
                r = env.region
            )
        };
        let routes: String =
            MODES.iter().map(|(_, mode)| server(&format!("p4{mode}"), Some(mode))).collect();
        let mut notes = Vec::new();
        let (running, admin, servers) = match systems::start_sluice_routes(
            env,
            super::A.proxy,
            "p4",
            Some(&routes),
            Some(pin_dir),
        ) {
            Ok((r, admin)) => {
                let servers =
                    MODES.iter().map(|(k, mode)| (*k, host(&format!("p4{mode}")))).collect();
                (r, admin, servers)
            }
            Err(e)
                if format!("{e:#}").contains("unknown field `splice`")
                    || std::fs::read_to_string(env.dir.join("sluice-p4/sluice.log"))
                        .is_ok_and(|log| log.contains("unknown field `splice`")) =>
            {
                // This sluice predates the per-server splice policy: it splices every
                // plaintext upgraded stream when the kernel allows it. Measure that, and
                // say which path it took.
                notes.push(
                    "this sluice does not know the `splice` routing field yet (rejected as an \
                     unknown field): userspace and auto cannot be chosen per server, so its \
                     default path is measured, filed under the path the kernel counter shows"
                        .into(),
                );
                let routes = server("p4default", None);
                let (r, admin) = systems::start_sluice_routes(
                    env,
                    super::A.proxy,
                    "p4-default",
                    Some(&routes),
                    Some(pin_dir),
                )?;
                (r, admin, vec![(Kind::SluiceSpliced, host("p4default"))])
            }
            Err(e) => return Err(e),
        };
        let mut s = Sluice { proxy: running.h1, guard: running.guard, admin, servers, notes };
        for l in s.guard.as_ref().map(|g| g.log_lines("kernel")).unwrap_or_default() {
            let l = l.split_once(" sluice").map_or(l.as_str(), |(_, l)| l).trim_end().to_string();
            s.notes.push(format!("sluice start-up: sluice{l}"));
        }
        s.wait_routable()?;
        if s.servers.len() == 1 {
            s.classify_default()?;
        } else if s.spliced_bytes().is_none() {
            // No splice counter: the kernel data plane did not load (no root, no BPF).
            // Auto still runs (it must then match userspace); "always" cannot.
            s.servers.retain(|(k, _)| *k != Kind::SluiceSpliced);
            s.notes.push(format!(
                "{}: skipped: this sluice exports no splice counter, so its kernel data plane \
                 is not loaded here (root and BPF needed; see the start-up lines)",
                Kind::SluiceSpliced
            ));
        }
        Ok(s)
    }

    /// Waits until every server answers an upgrade (replicas become routable after
    /// their first health check).
    fn wait_routable(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        for (_, host) in &self.servers {
            loop {
                if let Some(g) = self.guard.as_mut() {
                    g.check_alive()?;
                }
                match upgrade(self.proxy, host, "/echo") {
                    Ok(_) => break,
                    Err(e) if Instant::now() > deadline => {
                        bail!("{host} not routable through sluice after 20 s: {e:#}")
                    }
                    Err(_) => thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        Ok(())
    }

    /// Without the field, files the one server under the path its streams take.
    fn classify_default(&mut self) -> Result<()> {
        let before = self.spliced_bytes();
        round_trips(self.proxy, &self.servers[0].1, 0.05)?;
        let spliced = match (before, self.spliced_bytes()) {
            (Some(b), Some(a)) => a.saturating_sub(b),
            _ => 0,
        };
        if spliced == 0 {
            self.servers[0].0 = Kind::SluiceUserspace;
            self.notes.push("sluice's default path here is userspace (nothing spliced)".into());
        } else {
            self.notes.push(format!("sluice's default path here is the kernel splice ({spliced} bytes spliced by a probe stream)"));
        }
        Ok(())
    }

    /// `sluice_bpf_splice_bytes_total` from `/metrics`, if exported.
    fn spliced_bytes(&self) -> Option<u64> {
        let text = http_get(self.admin, "/metrics").ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("sluice_bpf_splice_bytes_total")?.trim().parse().ok())
    }
}

/// One GET over a fresh connection; the body.
fn http_get(to: SocketAddr, path: &str) -> Result<String> {
    let mut tcp = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    tcp.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(tcp, "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    tcp.read_to_string(&mut text)?;
    Ok(text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// Opens an upgraded stream to `path` (`/echo` or `/sink`) at `to` with `Host: host`.
fn upgrade(to: SocketAddr, host: &str, path: &str) -> Result<TcpStream> {
    let mut tcp = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(IO_TIMEOUT))?;
    tcp.set_write_timeout(Some(IO_TIMEOUT))?;
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )?;
    let head = read_head(&mut tcp)?;
    if !head.starts_with(b"HTTP/1.1 101") {
        bail!("answered {:?}", String::from_utf8_lossy(&head[..head.len().min(40)]));
    }
    Ok(tcp)
}

/// Reads up to the blank line that ends an HTTP head, a byte at a time so nothing past
/// it is consumed (nothing follows here until the other side is asked, but a read past
/// the head would eat payload if it did).
fn read_head(tcp: &mut TcpStream) -> Result<Vec<u8>> {
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut byte)? == 0 {
            bail!("closed before the end of the head");
        }
        head.push(byte[0]);
        if head.len() > 16 * 1024 {
            bail!("head too long");
        }
    }
    Ok(head)
}

/// One spliced stream's round trips before and after `sluice upgrade` hands it to a new
/// process: the stream lives in the pinned sockhash, so the kernel goes on moving its
/// bytes whichever process holds its descriptors, and its round trip should not move.
/// Measured once, in the first placement, on a stream of the `always` server.
fn across_upgrade(ctx: &mut Ctx, sluice: &Sluice, pin_dir: &std::path::Path) -> Result<()> {
    let Some((_, host)) = sluice.servers.iter().find(|(k, _)| *k == Kind::SluiceSpliced) else {
        ctx.results.note("P4", "across `sluice upgrade`: skipped: no spliced server here");
        return Ok(());
    };
    let Ok(bin) = ctx.env.sluice.clone() else { return Ok(()) };
    let Some(p) = ctx.plan.placements.first().copied() else { return Ok(()) };
    if let Some(pid) = sluice.guard.as_ref().map(Guard::pid) {
        procs::repin(pid, p.proxy).context("pinning sluice")?;
    }
    let secs = if ctx.plan.quick { 0.5 } else { 2.0 };
    let mut tcp = upgrade(sluice.proxy, host, "/echo")?;
    let before = ping_pong(&mut tcp, secs)?;
    let up = std::process::Command::new(&bin)
        .args(["upgrade", "--timeout", "30", "--pin-dir"])
        .arg(pin_dir)
        .output()
        .context("running sluice upgrade")?;
    // The new process is the old one's, not the harness's: stopped when this returns.
    let owner = std::fs::read_link(pin_dir.join("owner")).ok();
    let new_pid = owner
        .as_ref()
        .and_then(|t| t.to_string_lossy().split_once('@').and_then(|(p, _)| p.parse().ok()));
    let _adopted = new_pid.map(procs::Adopted::new);
    if !up.status.success() {
        ctx.results.note(
            "P4",
            format!(
                "across `sluice upgrade`: the upgrade failed: {}",
                String::from_utf8_lossy(&up.stderr).trim()
            ),
        );
        return Ok(());
    }
    let old_pid = sluice.guard.as_ref().map(Guard::pid);
    let after = ping_pong(&mut tcp, secs);
    let _ = tcp.shutdown(Shutdown::Both);
    let after = after.context("the spliced stream after `sluice upgrade`")?;
    let what = |when: &str, stat: &str| {
        Metric::new(
            "P4",
            p.name,
            format!("64 B round trip on one spliced stream, {when} `sluice upgrade`, {stat}"),
            "µs",
            Better::Lower,
        )
    };
    for (when, rtts) in [("before", &before), ("after", &after)] {
        if let Some((m, tail)) = percentiles(rtts) {
            ctx.results.add(&what(when, "median"), Kind::SluiceSpliced, m);
            ctx.results.add(&what(when, "p99"), Kind::SluiceSpliced, tail);
        }
    }
    ctx.results.note(
        "P4",
        format!(
            "across `sluice upgrade` (placement {}): one stream of the `always` server, {secs} s \
             of {PING} B ping-pong before and {secs} s after the upgrade handed it from pid {} \
             to pid {}; every echo arrived intact",
            p.name,
            old_pid.map_or("?".into(), |p| p.to_string()),
            new_pid.map_or("?".into(), |p: u32| p.to_string()),
        ),
    );
    Ok(())
}

/// `secs` of 64 B ping-pong over a fresh stream; every round trip in µs.
fn round_trips(to: SocketAddr, host: &str, secs: f64) -> Result<Vec<f64>> {
    let mut tcp = upgrade(to, host, "/echo")?;
    let rtts = ping_pong(&mut tcp, secs)?;
    let _ = tcp.shutdown(Shutdown::Both);
    Ok(rtts)
}

/// [`WARM_ROUND_TRIPS`] untimed, then `secs` of 64 B ping-pong over `tcp`; every round
/// trip in µs. An echo that differs fails it.
fn ping_pong(tcp: &mut TcpStream, secs: f64) -> Result<Vec<f64>> {
    let ping = [0x5au8; PING];
    let mut pong = [0u8; PING];
    let mut one = |tcp: &mut TcpStream| -> Result<()> {
        tcp.write_all(&ping)?;
        tcp.read_exact(&mut pong)?;
        if pong != ping {
            bail!("echo corrupted");
        }
        Ok(())
    };
    for _ in 0..WARM_ROUND_TRIPS {
        one(tcp)?;
    }
    let mut rtts = Vec::with_capacity(100_000);
    let started = Instant::now();
    let limit = Duration::from_secs_f64(secs);
    while started.elapsed() < limit {
        let t = Instant::now();
        one(tcp)?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(rtts)
}

/// Median and p99 of `v`.
fn percentiles(v: &[f64]) -> Option<(f64, f64)> {
    let (_, median, _) = summary(v)?;
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    let idx = ((s.len() as f64 * 0.99).ceil() as usize).clamp(1, s.len()) - 1;
    Some((median, s[idx]))
}

/// `secs` of `size`-byte writes one way over a fresh stream; MB/s as the replica
/// counted them (the clock stops when its count comes back).
fn stream(to: SocketAddr, host: &str, size: usize, secs: f64) -> Result<f64> {
    let mut tcp = upgrade(to, host, "/sink")?;
    let chunk = vec![0u8; size];
    let limit = Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < limit {
        tcp.write_all(&chunk)?;
        sent += size as u64;
    }
    tcp.write_all(&[END])?;
    let mut count = [0u8; 8];
    tcp.read_exact(&mut count)?;
    let elapsed = started.elapsed().as_secs_f64();
    let got = u64::from_le_bytes(count);
    if got != sent + 1 {
        bail!("replica counted {got} bytes, {} were sent", sent + 1);
    }
    let _ = tcp.shutdown(Shutdown::Both);
    Ok(sent as f64 / elapsed / 1e6)
}

/// The replica: answers an upgrade on `/echo` (echoes every byte) or `/sink` (counts
/// bytes up to the end marker, answers the count), a thread per connection, on the
/// harness's CPU.
struct EchoReplica {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl EchoReplica {
    fn start() -> Result<EchoReplica> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::Acquire) {
                    break;
                }
                let Ok(tcp) = conn else { continue };
                // A failed connection (a health check, a cut stream) only ends itself.
                thread::spawn(move || {
                    let _ = serve(tcp);
                });
            }
        });
        Ok(EchoReplica { addr, stop, thread: Some(thread) })
    }
}

impl Drop for EchoReplica {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut tcp: TcpStream) -> Result<()> {
    tcp.set_nodelay(true)?;
    let head = read_head(&mut tcp)?;
    let line = String::from_utf8_lossy(&head);
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    tcp.write_all(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
    )?;
    let mut buf = vec![0u8; 64 * 1024];
    if path.starts_with("/sink") {
        let mut total = 0u64;
        loop {
            let n = tcp.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            total += n as u64;
            // The end marker is the last byte the client sends, so it ends a read.
            if buf[n - 1] == END {
                tcp.write_all(&total.to_le_bytes())?;
                total = 0;
            }
        }
    }
    loop {
        let n = tcp.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        tcp.write_all(&buf[..n])?;
    }
}
