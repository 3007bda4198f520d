//! The behaviour probe: beyond "the verdict program attaches", does splicing on this
//! kernel actually carry bytes correctly? sockmap has a record of regressions that load
//! and attach fine (stalls, FIONREAD answering 0, a verdict that breaks reads), so at
//! start-up a few loopback pairs are spliced through the *loaded* data plane and the
//! results checked. Whatever misbehaves disables splicing; the failing check is named.
//!
//! Checks (each on its own pair: client → [front | back] → replica, front and back
//! spliced and handed to a [`SpliceWatcher`] exactly as the proxy does):
//! - `echo`: small messages both ways arrive byte-exact, in order, within a bound.
//! - `queued`: bytes already waiting in a leg's receive queue when the pair is spliced
//!   are carried too (the adaptive policy splices mid-stream, so this is its clean
//!   switch point).
//! - `fionread`: FIONREAD on the socket receiving spliced bytes reports them (not 0).
//! - `half_close`: a shutdown(WR) arrives as EOF after the data, and the other
//!   direction still works afterwards.
//! - `v4_mapped`: a client reaching a dual-stack (IPv6) listener over IPv4 has
//!   IPv4-mapped addresses; the kernel and userspace keys must agree on them.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, OwnedFd},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{Dataplane, SpliceWatcher};

/// Longest any one step of a check may take.
const STEP_LIMIT: Duration = Duration::from_secs(2);

/// Every check, in the order they run; the names are what `SLUICE_PROBE_FAIL` takes.
pub const CHECKS: [&str; 5] = ["echo", "queued", "fionread", "half_close", "v4_mapped"];

/// How one check went.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    /// The kernel behaved.
    Passed,
    /// It did not: splicing is disabled.
    Failed,
    /// Could not be run here (e.g. no IPv6 on the host); not a reason to disable.
    Skipped,
}

/// One check's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct CheckOutcome {
    /// The check's name (one of [`CHECKS`]).
    pub check: &'static str,
    /// Passed, failed or skipped.
    pub status: CheckStatus,
    /// What was seen, in words an operator can act on.
    pub detail: String,
}

/// The behaviour probe's findings.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BehaviourReport {
    /// One outcome per check, in [`CHECKS`] order.
    pub checks: Vec<CheckOutcome>,
}

impl BehaviourReport {
    /// True when no check failed: splicing may be used.
    pub fn passed(&self) -> bool {
        self.failed().next().is_none()
    }

    /// The checks that failed.
    pub fn failed(&self) -> impl Iterator<Item = &CheckOutcome> {
        self.checks.iter().filter(|c| c.status == CheckStatus::Failed)
    }

    /// One line: `ok` or the failed checks with what was seen, for logs and `/readyz`.
    pub fn summary(&self) -> String {
        let failed: Vec<String> =
            self.failed().map(|c| format!("{} failed ({})", c.check, c.detail)).collect();
        if failed.is_empty() {
            let ran: Vec<&str> = self
                .checks
                .iter()
                .filter(|c| c.status == CheckStatus::Passed)
                .map(|c| c.check)
                .collect();
            format!("ok ({})", ran.join(", "))
        } else {
            failed.join("; ")
        }
    }
}

type CheckFn = fn(&Probe) -> Result<CheckStatus, String>;

/// Runs every check against `dp` (the loaded data plane splicing will use). `force_fail`
/// names a check to report failed without running it (the `SLUICE_PROBE_FAIL` test
/// and operations knob; `all` fails every check). Blocks for at most a few seconds.
pub fn probe_behaviour(dp: &Arc<Mutex<Dataplane>>, force_fail: Option<&str>) -> BehaviourReport {
    let checks: [(&'static str, CheckFn); 5] = [
        ("echo", check_echo),
        ("queued", check_queued),
        ("fionread", check_fionread),
        ("half_close", check_half_close),
        ("v4_mapped", check_v4_mapped),
    ];
    let watcher = match SpliceWatcher::spawn(dp.clone()) {
        Ok(w) => Some(w),
        Err(e) => {
            let detail = format!("splice watcher did not start: {e}");
            return BehaviourReport {
                checks: checks
                    .iter()
                    .map(|(check, _)| CheckOutcome {
                        check,
                        status: CheckStatus::Failed,
                        detail: detail.clone(),
                    })
                    .collect(),
            };
        }
    };
    let probe = Probe { dp: dp.clone(), watcher };
    let mut out = Vec::with_capacity(checks.len());
    for (check, run) in checks {
        let (status, detail) = if force_fail.is_some_and(|f| f == check || f == "all") {
            (CheckStatus::Failed, "forced by SLUICE_PROBE_FAIL".to_owned())
        } else {
            match run(&probe) {
                Ok(CheckStatus::Skipped) => (CheckStatus::Skipped, "not runnable here".to_owned()),
                Ok(s) => (s, "behaved".to_owned()),
                Err(detail) => (CheckStatus::Failed, detail),
            }
        };
        out.push(CheckOutcome { check, status, detail });
    }
    // Dropping the watcher ends (and unsplices) any pair a failed check left behind.
    drop(probe);
    BehaviourReport { checks: out }
}

struct Probe {
    dp: Arc<Mutex<Dataplane>>,
    watcher: Option<SpliceWatcher>,
}

/// A spliced path: the client's and the replica's sockets (the proxy's two legs are
/// owned by the watcher).
struct Path {
    client: TcpStream,
    replica: TcpStream,
}

fn io_err(what: &str) -> impl Fn(io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl Probe {
    /// Builds client → [front | back] → replica; `before_splice` runs on the connected
    /// sockets (client, replica, front) before the legs are spliced.
    fn path(
        &self,
        front: TcpListener,
        client_to: SocketAddr,
        before_splice: impl FnOnce(&mut TcpStream, &TcpStream) -> Result<(), String>,
    ) -> Result<Path, String> {
        let upstream = TcpListener::bind("127.0.0.1:0").map_err(io_err("binding a replica"))?;
        let up_addr = upstream.local_addr().map_err(io_err("replica address"))?;
        let mut client =
            TcpStream::connect_timeout(&client_to, STEP_LIMIT).map_err(io_err("client connect"))?;
        let (proxy_front, _) = front.accept().map_err(io_err("accepting the client"))?;
        let proxy_back =
            TcpStream::connect_timeout(&up_addr, STEP_LIMIT).map_err(io_err("replica connect"))?;
        let (replica, _) = upstream.accept().map_err(io_err("accepting at the replica"))?;
        for s in [&client, &replica, &proxy_front, &proxy_back] {
            s.set_nodelay(true).map_err(io_err("TCP_NODELAY"))?;
            s.set_read_timeout(Some(STEP_LIMIT)).map_err(io_err("read timeout"))?;
            s.set_write_timeout(Some(STEP_LIMIT)).map_err(io_err("write timeout"))?;
        }
        before_splice(&mut client, &proxy_front)?;
        let pair = self
            .dp
            .lock()
            .map_err(|_| "data plane lock poisoned".to_owned())?
            .splice(&proxy_front, &proxy_back)
            .map_err(|e| format!("splice: {e}"))?;
        let watcher = self.watcher.as_ref().ok_or("no splice watcher")?;
        watcher.watch(
            pair,
            OwnedFd::from(proxy_front),
            OwnedFd::from(proxy_back),
            Box::new(|_| {}),
        );
        Ok(Path { client, replica })
    }

    fn loopback_path(&self) -> Result<Path, String> {
        let front = TcpListener::bind("127.0.0.1:0").map_err(io_err("binding a front"))?;
        let addr = front.local_addr().map_err(io_err("front address"))?;
        self.path(front, addr, |_, _| Ok(()))
    }
}

/// A message whose bytes depend on its index and position, so loss, duplication and
/// reordering all show.
fn pattern(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| ((i * 31 + j * 7) % 251) as u8).collect()
}

fn exchange(
    from: &mut TcpStream,
    to: &mut TcpStream,
    msg: &[u8],
    what: &str,
) -> Result<(), String> {
    from.write_all(msg).map_err(io_err(what))?;
    let mut got = vec![0u8; msg.len()];
    to.read_exact(&mut got).map_err(|e| {
        if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
            format!("{what}: {} bytes not delivered within {STEP_LIMIT:?}", msg.len())
        } else {
            format!("{what}: {e}")
        }
    })?;
    if got != msg {
        let at = got.iter().zip(msg).position(|(a, b)| a != b).unwrap_or(0);
        return Err(format!("{what}: bytes differ at offset {at} of {}", msg.len()));
    }
    Ok(())
}

fn round_trips(p: &mut Path) -> Result<(), String> {
    for (i, len) in [1usize, 64, 300, 1500].into_iter().enumerate() {
        exchange(&mut p.client, &mut p.replica, &pattern(i, len), "client to replica")?;
        exchange(&mut p.replica, &mut p.client, &pattern(i + 100, len), "replica to client")?;
    }
    Ok(())
}

fn check_echo(probe: &Probe) -> Result<CheckStatus, String> {
    let mut p = probe.loopback_path()?;
    round_trips(&mut p)?;
    Ok(CheckStatus::Passed)
}

fn fionread(s: &impl AsRawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to a valid pointer on an open socket.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// Polls FIONREAD until it reports at least `want` bytes or the step limit passes.
fn wait_fionread(s: &impl AsRawFd, want: usize) -> Result<usize, String> {
    let deadline = Instant::now() + STEP_LIMIT;
    loop {
        let n = fionread(s).map_err(io_err("FIONREAD"))?;
        if n >= want || Instant::now() >= deadline {
            return Ok(n);
        }
        thread::sleep(Duration::from_millis(1));
    }
}

fn check_queued(probe: &Probe) -> Result<CheckStatus, String> {
    let front = TcpListener::bind("127.0.0.1:0").map_err(io_err("binding a front"))?;
    let addr = front.local_addr().map_err(io_err("front address"))?;
    let early = pattern(7, 200);
    let mut p = probe.path(front, addr, |client, proxy_front| {
        client.write_all(&early).map_err(io_err("client write before the splice"))?;
        // Wait until the bytes sit in the proxy leg's receive queue, unread.
        let n = wait_fionread(proxy_front, early.len())?;
        if n < early.len() {
            return Err(format!("{n} of {} bytes reached the proxy leg", early.len()));
        }
        Ok(())
    })?;
    let mut got = vec![0u8; early.len()];
    p.replica.read_exact(&mut got).map_err(|e| {
        format!("bytes queued before the splice were not carried within {STEP_LIMIT:?}: {e}")
    })?;
    if got != early {
        return Err("bytes queued before the splice arrived altered".into());
    }
    round_trips(&mut p)?;
    Ok(CheckStatus::Passed)
}

fn check_fionread(probe: &Probe) -> Result<CheckStatus, String> {
    let mut p = probe.loopback_path()?;
    fionread_one(&mut p.client, &mut p.replica, "at the replica")?;
    fionread_one(&mut p.replica, &mut p.client, "at the client")?;
    Ok(CheckStatus::Passed)
}

fn fionread_one(from: &mut TcpStream, to: &mut TcpStream, what: &str) -> Result<(), String> {
    let msg = pattern(3, 123);
    from.write_all(&msg).map_err(io_err("write"))?;
    let n = wait_fionread(to, msg.len())?;
    if n != msg.len() {
        // Tell "reports 0 with bytes queued" apart from "bytes never arrived".
        let mut peek = [0u8; 256];
        let queued = to.peek(&mut peek).unwrap_or(0);
        return Err(format!(
            "FIONREAD {what} reports {n} with {queued} of {} spliced bytes queued",
            msg.len()
        ));
    }
    let mut sink = vec![0u8; msg.len()];
    to.read_exact(&mut sink).map_err(io_err("reading the queued bytes"))?;
    if sink != msg {
        return Err(format!("bytes {what} arrived altered"));
    }
    Ok(())
}

fn read_eof(s: &mut TcpStream, what: &str) -> Result<(), String> {
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => Ok(()),
        Ok(n) => Err(format!("{what}: {n} unexpected bytes instead of EOF")),
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            Err(format!("{what}: no EOF within {STEP_LIMIT:?} of the half-close"))
        }
        Err(e) => Err(format!("{what}: {e}")),
    }
}

fn check_half_close(probe: &Probe) -> Result<CheckStatus, String> {
    let mut p = probe.loopback_path()?;
    // Data immediately followed by FIN: the FIN must not overtake the data.
    let last = pattern(5, 1000);
    p.client.write_all(&last).map_err(io_err("client write"))?;
    p.client.shutdown(Shutdown::Write).map_err(io_err("client shutdown"))?;
    let mut got = vec![0u8; last.len()];
    p.replica
        .read_exact(&mut got)
        .map_err(|e| format!("data before the half-close did not arrive whole: {e}"))?;
    if got != last {
        return Err("data before the half-close arrived altered".into());
    }
    read_eof(&mut p.replica, "replica after the client's shutdown(WR)")?;
    // The other direction still carries bytes after the half-close.
    exchange(
        &mut p.replica,
        &mut p.client,
        &pattern(6, 300),
        "replica to client after half-close",
    )?;
    p.replica.shutdown(Shutdown::Write).map_err(io_err("replica shutdown"))?;
    read_eof(&mut p.client, "client after the replica's shutdown(WR)")?;
    Ok(CheckStatus::Passed)
}

fn check_v4_mapped(probe: &Probe) -> Result<CheckStatus, String> {
    use socket2::{Domain, Socket, Type};
    // A dual-stack listener: an IPv4 client shows up with ::ffff:a.b.c.d addresses.
    // Bound to the mapped loopback address, never to every interface.
    let listener = (|| -> io::Result<TcpListener> {
        let s = Socket::new(Domain::IPV6, Type::STREAM, None)?;
        s.set_only_v6(false)?;
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:0".parse().map_err(io::Error::other)?;
        s.bind(&mapped.into())?;
        s.listen(8)?;
        Ok(s.into())
    })();
    let Ok(front) = listener else { return Ok(CheckStatus::Skipped) };
    let port = front.local_addr().map_err(io_err("front address"))?.port();
    let mut p =
        probe.path(front, ([127, 0, 0, 1], port).into(), |_, proxy_front| {
            match proxy_front.peer_addr() {
                Ok(SocketAddr::V6(a)) if a.ip().to_ipv4_mapped().is_some() => Ok(()),
                Ok(other) => Err(format!("expected an IPv4-mapped peer, got {other}")),
                Err(e) => Err(format!("peer address: {e}")),
            }
        })?;
    round_trips(&mut p)?;
    Ok(CheckStatus::Passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(check: &'static str, status: CheckStatus) -> CheckOutcome {
        CheckOutcome { check, status, detail: "x".into() }
    }

    #[test]
    fn summary_names_failed_checks_and_skips_do_not_fail() {
        let ok = BehaviourReport {
            checks: vec![
                outcome("echo", CheckStatus::Passed),
                outcome("v4_mapped", CheckStatus::Skipped),
            ],
        };
        assert!(ok.passed());
        assert_eq!(ok.summary(), "ok (echo)");
        let bad = BehaviourReport {
            checks: vec![
                outcome("echo", CheckStatus::Passed),
                outcome("fionread", CheckStatus::Failed),
            ],
        };
        assert!(!bad.passed());
        assert_eq!(bad.summary(), "fionread failed (x)");
    }
}
