//! P7: LLM-shaped streaming. 64 server-sent-event streams at 50 events/s each (one
//! event every 20 ms, like tokens) through the proxy while oha pushes a 20k requests/s
//! background load through the same proxy; the client records time to first event and
//! every gap between events as they arrive.

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
    Ctx,
    load::{self, At},
    results::{Better, Metric, summary},
    scenarios,
    systems::Kind,
};

const STREAMS: usize = 64;
const INTERVAL_MS: u64 = 20;
const BACKGROUND_RPS: u32 = 20_000;
const BACKGROUND_CONNECTIONS: u32 = 64;

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
                load::oha_start(&oha, &at, to, BACKGROUND_RPS, BACKGROUND_CONNECTIONS, bg_secs);
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
        &format!("oha background ({BACKGROUND_RPS} req/s) + {STREAMS} SSE streams in the harness"),
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
