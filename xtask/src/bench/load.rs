//! Load generators (wrk, h2load, oha) run pinned, for a fixed duration, against
//! loopback only; their reports parsed into numbers.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, Result, bail};

use super::procs::{Cpus, Guard};

/// Where a load generator runs and what it sends.
pub struct At<'a> {
    /// CPUs it is pinned to.
    pub cpus: Cpus,
    /// Scratch directory for its log.
    pub dir: &'a Path,
    /// `Host` / `:authority` of every request.
    pub host: &'a str,
}

/// One load run's outcome.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// Completed requests per second.
    pub rps: f64,
    /// Completed requests.
    pub requests: f64,
    /// Requests that failed or got a non-2xx answer.
    pub bad: f64,
    /// Latency percentiles in microseconds: p50, p99, p99.9 (oha only).
    pub latency_us: Option<[f64; 3]>,
    /// Negotiated protocol line (h2load over TLS), for checking.
    pub protocol: Option<String>,
    /// Negotiated TLS version (h2load over TLS), for checking.
    pub tls: Option<String>,
    /// What the failures were, where the tool says.
    pub detail: String,
}

impl Outcome {
    /// Whether enough answers were good for the numbers to mean anything (≤ 0.1 % bad).
    pub fn valid(&self) -> bool {
        self.requests > 0.0 && self.bad <= self.requests * 0.001
    }
}

/// Load-generator settings shared by every system so runs are comparable.
pub struct Shape {
    /// wrk connections (one thread).
    pub wrk_connections: u32,
    /// h2load connections and streams per connection (one thread).
    pub h2_connections: u32,
    /// h2load concurrent streams per connection.
    pub h2_streams: u32,
}

/// The shape every run uses.
pub const SHAPE: Shape = Shape { wrk_connections: 64, h2_connections: 8, h2_streams: 32 };

/// `wrk` over HTTP/1.1 keep-alive, one thread.
pub fn wrk(at: &At<'_>, to: SocketAddr, secs: f64) -> Result<Outcome> {
    let args: Vec<String> = vec![
        "-t1".into(),
        format!("-c{}", SHAPE.wrk_connections),
        format!("-d{}s", secs.ceil().max(1.0) as u64),
        "-H".into(),
        format!("Host: {}", at.host),
        format!("http://{to}/"),
    ];
    let guard = Guard::spawn("wrk", at.cpus, "wrk", &args, at.dir.join("wrk.log"))?;
    let text = guard.finish(Duration::from_secs_f64(secs + 20.0))?;
    parse_wrk(&text)
}

fn parse_wrk(text: &str) -> Result<Outcome> {
    let mut o = Outcome::default();
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            o.rps = v.trim().parse().context("wrk Requests/sec")?;
        } else if line.contains(" requests in ") {
            o.requests = first_number(line).context("wrk request count")?;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            o.bad += v.trim().parse::<f64>().unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            o.bad += v
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1)?.parse::<f64>().ok())
                .sum::<f64>();
        }
    }
    if o.rps == 0.0 {
        bail!("wrk printed no throughput:\n{text}");
    }
    Ok(o)
}

/// `h2load`, one thread; `url` is `http://…` (h2c prior knowledge) or `https://…`
/// (TLS with ALPN h2).
pub fn h2load(at: &At<'_>, url: &str, secs: f64) -> Result<Outcome> {
    let args: Vec<String> = vec![
        "-t1".into(),
        format!("-c{}", SHAPE.h2_connections),
        format!("-m{}", SHAPE.h2_streams),
        "-D".into(),
        format!("{}", secs.ceil().max(1.0) as u64),
        "-H".into(),
        format!(":authority: {}", at.host),
        url.to_string(),
    ];
    let guard = Guard::spawn("h2load", at.cpus, "h2load", &args, at.dir.join("h2load.log"))?;
    let text = guard.finish(Duration::from_secs_f64(secs + 20.0))?;
    parse_h2load(&text)
}

/// `h2load` sending exactly `n` requests (not for a duration), one thread, in the shape
/// of [`SHAPE`]: HTTP/1.1 keep-alive (`--h1`, wrk's connection count, no pipelining) or
/// h2c prior knowledge (h2load's connections and streams). `url` is `http://…`.
pub fn h2load_count(at: &At<'_>, url: &str, n: u32, h1: bool) -> Result<Outcome> {
    let mut args: Vec<String> = vec!["-t1".into(), format!("-n{n}")];
    if h1 {
        args.extend(["--h1".into(), format!("-c{}", SHAPE.wrk_connections), "-m1".into()]);
    } else {
        args.extend([format!("-c{}", SHAPE.h2_connections), format!("-m{}", SHAPE.h2_streams)]);
    }
    // h2load turns `:authority` into `Host` for HTTP/1.1.
    args.extend(["-H".into(), format!(":authority: {}", at.host), url.to_string()]);
    let guard = Guard::spawn("h2load", at.cpus, "h2load", &args, at.dir.join("h2load.log"))?;
    let text = guard.finish(Duration::from_secs(180))?;
    parse_h2load(&text)
}

fn parse_h2load(text: &str) -> Result<Outcome> {
    let mut o = Outcome::default();
    let mut seen = false;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // "2.00s, 51234.50 req/s, 1.50MB/s"
            o.rps = rest
                .split(',')
                .nth(1)
                .and_then(|s| s.trim().strip_suffix("req/s"))
                .and_then(|s| s.trim().parse().ok())
                .context("h2load req/s")?;
            seen = true;
        } else if let Some(rest) = line.strip_prefix("requests:") {
            // "N total, N started, N done, N succeeded, N failed, N errored, N timeout"
            for part in rest.split(',') {
                let mut it = part.split_whitespace();
                let (Some(n), Some(what)) = (it.next(), it.next()) else { continue };
                let n: f64 = n.parse().unwrap_or(0.0);
                match what {
                    "succeeded" => o.requests = n,
                    "failed" | "errored" | "timeout" => o.bad += n,
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("status codes:") {
            // "N 2xx, N 3xx, N 4xx, N 5xx"
            for part in rest.split(',') {
                let mut it = part.split_whitespace();
                if let (Some(n), Some(class)) = (it.next(), it.next())
                    && class != "2xx"
                {
                    o.bad += n.parse::<f64>().unwrap_or(0.0);
                }
            }
        } else if let Some(rest) = line.strip_prefix("Application protocol:") {
            o.protocol = Some(rest.trim().to_string());
        } else if let Some(rest) = line.strip_prefix("TLS Protocol:") {
            o.tls = Some(rest.trim().to_string());
        }
    }
    if !seen {
        bail!("h2load printed no summary:\n{text}");
    }
    Ok(o)
}

/// `oha` open loop at `rate` requests/s over HTTP/1.1 with latency correction (latency
/// counted from when a request was due, so a stall cannot hide queued requests).
pub fn oha(
    bin: &Path,
    at: &At<'_>,
    to: SocketAddr,
    rate: u32,
    connections: u32,
    secs: f64,
) -> Result<Outcome> {
    let guard = oha_start(bin, at, to, rate, connections, secs)?;
    oha_finish(guard, secs)
}

/// Starts `oha` in the background (see [`oha`]).
pub fn oha_start(
    bin: &Path,
    at: &At<'_>,
    to: SocketAddr,
    rate: u32,
    connections: u32,
    secs: f64,
) -> Result<Guard> {
    let args: Vec<String> = vec![
        "--no-tui".into(),
        "--output-format".into(),
        "json".into(),
        "-z".into(),
        format!("{}ms", (secs * 1000.0) as u64),
        "-q".into(),
        rate.to_string(),
        "--latency-correction".into(),
        "-c".into(),
        connections.to_string(),
        "-H".into(),
        format!("Host: {}", at.host),
        format!("http://{to}/"),
    ];
    Guard::spawn("oha", at.cpus, &bin.display().to_string(), &args, at.dir.join("oha.log"))
}

/// Waits for a background `oha` of `secs` seconds and parses its report.
pub fn oha_finish(guard: Guard, secs: f64) -> Result<Outcome> {
    let text = guard.finish(Duration::from_secs_f64(secs + 30.0))?;
    parse_oha(&text)
}

fn parse_oha(text: &str) -> Result<Outcome> {
    // The JSON document is the whole stdout (stderr is empty unless something broke).
    let start = text.find('{').context("oha printed no JSON")?;
    let v: serde_json::Value =
        serde_json::from_str(&text[start..]).with_context(|| format!("oha JSON:\n{text}"))?;
    let summary = &v["summary"];
    let mut o =
        Outcome { rps: summary["requestsPerSec"].as_f64().unwrap_or(0.0), ..Outcome::default() };
    let mut ok = 0.0;
    if let Some(codes) = v["statusCodeDistribution"].as_object() {
        for (code, n) in codes {
            let n = n.as_f64().unwrap_or(0.0);
            o.requests += n;
            if code.starts_with('2') {
                ok += n;
            }
        }
    }
    o.bad = o.requests - ok;
    if let Some(errors) = v["errorDistribution"].as_object() {
        for (what, n) in errors {
            // Requests still in flight when the fixed duration ends are cut off by oha
            // itself; they are not the system's failures.
            if what.contains("deadline") {
                continue;
            }
            o.bad += n.as_f64().unwrap_or(0.0);
            o.detail.push_str(&format!("{what}: {n}; "));
        }
    }
    let p = &v["latencyPercentiles"];
    let us = |k: &str| p[k].as_f64().map(|s| s * 1e6);
    if let (Some(a), Some(b), Some(c)) = (us("p50"), us("p99"), us("p99.9")) {
        o.latency_us = Some([a, b, c]);
    }
    Ok(o)
}

fn first_number(line: &str) -> Option<f64> {
    line.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk() {
        let text = "Running 2s test @ http://127.0.0.1:1/\n  1 threads and 64 connections\n  \
                    123456 requests in 2.00s, 12.34MB read\n  Non-2xx or 3xx responses: 5\n\
                    Requests/sec:  61728.00\nTransfer/sec:      6.17MB\n";
        let o = parse_wrk(text).unwrap();
        assert_eq!(o.rps, 61728.0);
        assert_eq!(o.requests, 123456.0);
        assert_eq!(o.bad, 5.0);
    }

    #[test]
    fn parses_h2load() {
        let text = "finished in 2.00s, 50000.50 req/s, 1.23MB/s\n\
                    requests: 100001 total, 100001 started, 100001 done, 100000 succeeded, 1 failed, 0 errored, 0 timeout\n\
                    status codes: 100000 2xx, 0 3xx, 2 4xx, 0 5xx\nTLS Protocol: TLSv1.3\n\
                    Application protocol: h2\n";
        let o = parse_h2load(text).unwrap();
        assert_eq!(o.rps, 50000.5);
        assert_eq!(o.requests, 100000.0);
        assert_eq!(o.bad, 3.0);
        assert_eq!(o.protocol.as_deref(), Some("h2"));
        assert_eq!(o.tls.as_deref(), Some("TLSv1.3"));
    }
}
