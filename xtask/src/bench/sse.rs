//! P7: LLM-shaped streaming. 64 server-sent-event streams at 50 events/s each (one
//! event every 20 ms, like tokens) through the proxy while oha pushes a background load
//! through the same proxy; the client records time to first event and every gap between
//! events as they arrive.
//!
//! The background runs at 60 % of the weakest proxy's saturation throughput (P2's
//! HTTP/1.1 median in this run, or a short wrk run per proxy when P2 did not run), so
//! every proxy is busy but none is overloaded: at a fixed rate above a proxy's capacity
//! P7 would measure its overload queue, not streaming under load.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

use super::{
    Ctx, Placement,
    load::{self, At},
    results::{Better, Metric, summary},
    scenarios,
    systems::Kind,
};

const STREAMS: usize = 64;
const INTERVAL_MS: u64 = 20;
const BACKGROUND_CONNECTIONS: u32 = 64;
/// Share of the weakest proxy's saturation throughput the background asks for.
const BACKGROUND_SHARE: f64 = 0.6;
/// Background rate when no saturation figure could be measured at all.
const FALLBACK_RPS: u32 = 10_000;

/// The background rate for placement `p` and how it was chosen.
fn background_rate(ctx: &mut Ctx, p: Placement) -> (u32, String) {
    let proxies: Vec<Kind> =
        ctx.systems.iter().map(|s| s.kind).filter(|k| *k != Kind::Direct).collect();
    // P2 in this invocation: the medians of its wrk runs.
    let from_p2: Vec<(Kind, f64)> = ctx
        .results
        .find("P2", "rps, wrk HTTP/1.1", p.name)
        .map(|s| proxies.iter().filter_map(|k| Some((*k, s.median(*k)?))).collect())
        .unwrap_or_default();
    let (measured, source) = if from_p2.is_empty() {
        // A short saturation run per proxy, as P2 does it.
        let secs = ctx.plan.load_secs;
        let mut v = Vec::new();
        for sys in ctx.systems.iter().filter(|s| s.kind != Kind::Direct) {
            let at = At { cpus: p.load, dir: &ctx.env.dir, host: &ctx.env.host };
            match load::wrk(&at, sys.h1, secs) {
                Ok(o) if o.valid() => v.push((sys.kind, o.rps)),
                Ok(o) => ctx.results.note(
                    "P7",
                    format!(
                        "{}: saturation run invalid: {} of {} bad",
                        sys.kind, o.bad, o.requests
                    ),
                ),
                Err(e) => {
                    ctx.results.note("P7", format!("{}: saturation run failed: {e:#}", sys.kind))
                }
            }
        }
        (v, format!("a {secs} s wrk HTTP/1.1 saturation run per proxy (P2 did not run)"))
    } else {
        (from_p2, "P2's median wrk HTTP/1.1 throughput in this run".to_string())
    };
    let Some((weakest, rps)) = measured.into_iter().min_by(|a, b| a.1.total_cmp(&b.1)) else {
        return (
            FALLBACK_RPS,
            format!(
                "background {FALLBACK_RPS} req/s: the fixed fallback (no proxy's saturation throughput measured)"
            ),
        );
    };
    let rate = ((rps * BACKGROUND_SHARE) as u32).max(1);
    (
        rate,
        format!(
            "background {rate} req/s = {:.0} % of the weakest proxy's saturation throughput \
             ({weakest}: {rps:.0} req/s, from {source})",
            BACKGROUND_SHARE * 100.0
        ),
    )
}

/// Runs P7 in the first placement.
pub fn p7(ctx: &mut Ctx) -> Result<()> {
    let oha = match &ctx.oha {
        Ok(b) => b.clone(),
        Err(e) => {
            ctx.results.note("P7", format!("skipped: no oha: {e}"));
            return Ok(());
        }
    };
    let Some(p) = ctx.plan.placements.first().copied() else { return Ok(()) };
    scenarios::place(ctx, "P7", p)?;
    let (background_rps, why) = background_rate(ctx, p);
    ctx.results.note("P7", why);
    let secs = ctx.plan.sse_secs;
    let events = (secs * 1000.0 / INTERVAL_MS as f64) as u32;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let ttfb_m = Metric::new("P7", p.name, "time to first event, median", "ms", Better::Lower);
    let gap_m =
        Metric::new("P7", p.name, "inter-event gap, p99 (sent every 20 ms)", "ms", Better::Lower);
    let add_ttfb_m = Metric::new("P7", p.name, "added time to first event", "µs", Better::Lower);
    let add_gap_m = Metric::new("P7", p.name, "added p99 inter-event gap", "µs", Better::Lower);
    let bg_m = Metric::new("P7", p.name, "background rps achieved", "req/s", Better::Higher);
    for _ in 0..ctx.plan.runs {
        let mut direct: Option<(f64, f64)> = None;
        for i in 0..ctx.systems.len() {
            let (kind, to) = (ctx.systems[i].kind, ctx.systems[i].h1);
            let at = At { cpus: p.load, dir: &ctx.env.dir, host: &ctx.env.host };
            // The background outlasts the streams by a margin on both ends.
            let bg_secs = secs + 0.6;
            let bg =
                load::oha_start(&oha, &at, to, background_rps, BACKGROUND_CONNECTIONS, bg_secs);
            let bg = match bg {
                Ok(g) => g,
                Err(e) => {
                    ctx.results.note("P7", format!("{kind}: background failed: {e:#}"));
                    continue;
                }
            };
            let host = ctx.env.host.clone();
            let streamed = rt.block_on(async {
                tokio::time::sleep(Duration::from_millis(250)).await;
                streams(to, &host, events).await
            });
            let bg_out = load::oha_finish(bg, bg_secs);
            match &bg_out {
                Ok(o) => ctx.results.add(&bg_m, kind, o.rps),
                Err(e) => ctx.results.note("P7", format!("{kind}: background failed: {e:#}")),
            }
            let (ttfbs, gaps) = match streamed {
                Ok(v) => v,
                Err(e) => {
                    ctx.results.note("P7", format!("{kind}: streams failed: {e:#}"));
                    continue;
                }
            };
            let (Some((_, ttfb, _)), Some(gap)) = (summary(&ttfbs), percentile(&gaps, 0.99)) else {
                continue;
            };
            ctx.results.add(&ttfb_m, kind, ttfb / 1000.0);
            ctx.results.add(&gap_m, kind, gap / 1000.0);
            if kind == Kind::Direct {
                direct = Some((ttfb, gap));
            } else if let Some((dt, dg)) = direct {
                ctx.results.add(&add_ttfb_m, kind, ttfb - dt);
                ctx.results.add(&add_gap_m, kind, gap - dg);
            }
        }
    }
    scenarios::note_placement(
        ctx,
        "P7",
        p,
        &format!("oha background ({background_rps} req/s) + {STREAMS} SSE streams in the harness"),
    );
    Ok(())
}

fn percentile(v: &[f64], q: f64) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let idx = ((s.len() as f64 * q).ceil() as usize).clamp(1, s.len()) - 1;
    Some(s[idx])
}

/// Runs the streams concurrently; returns every stream's time to first event and every
/// inter-event gap, in µs.
async fn streams(to: SocketAddr, host: &str, events: u32) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut tasks = Vec::new();
    for _ in 0..STREAMS {
        let host = host.to_string();
        let limit = Duration::from_millis(u64::from(events) * INTERVAL_MS + 10_000);
        tasks.push(tokio::spawn(async move {
            timeout(limit, one(to, &host, events))
                .await
                .map_err(|_| anyhow::anyhow!("stream timed out"))?
        }));
    }
    let (mut ttfbs, mut gaps) = (Vec::new(), Vec::new());
    for t in tasks {
        let (ttfb, g) = t.await??;
        ttfbs.push(ttfb);
        gaps.extend(g);
    }
    Ok((ttfbs, gaps))
}

/// One stream over HTTP/1.1: events end with a blank line (`\n\n`), which chunked framing
/// (`\r\n`) never forms, so counting them in the raw bytes is exact.
async fn one(to: SocketAddr, host: &str, events: u32) -> Result<(f64, Vec<f64>)> {
    let mut tcp = TcpStream::connect(to).await?;
    tcp.set_nodelay(true)?;
    let started = Instant::now();
    tcp.write_all(
        format!("GET /sse?n={events}&ms={INTERVAL_MS} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = [0u8; 16 * 1024];
    let mut head = Vec::new();
    let mut in_body = false;
    let mut prev_newline = false;
    let mut seen = 0u32;
    let mut ttfb = None;
    let mut last: Option<Instant> = None;
    let mut gaps = Vec::with_capacity(events as usize);
    while seen < events {
        let k = tcp.read(&mut buf).await?;
        if k == 0 {
            bail!("closed after {seen} of {events} events");
        }
        let now = Instant::now();
        let mut bytes = &buf[..k];
        if !in_body {
            head.extend_from_slice(bytes);
            let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                if head.len() > 64 * 1024 {
                    bail!("no end of headers");
                }
                continue;
            };
            if !head.starts_with(b"HTTP/1.1 200") {
                bail!("status {:?}", String::from_utf8_lossy(&head[..head.len().min(20)]));
            }
            in_body = true;
            let body_from = (end + 4).saturating_sub(head.len() - k);
            bytes = &buf[body_from..k];
        }
        for &b in bytes {
            if b == b'\n' && prev_newline {
                seen += 1;
                match last {
                    None => ttfb = Some(now.duration_since(started).as_secs_f64() * 1e6),
                    Some(l) => gaps.push(now.duration_since(l).as_secs_f64() * 1e6),
                }
                last = Some(now);
                prev_newline = false;
            } else {
                prev_newline = b == b'\n';
            }
        }
    }
    Ok((ttfb.unwrap_or(f64::NAN), gaps))
}
