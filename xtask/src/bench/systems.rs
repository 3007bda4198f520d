//! The systems under test: `direct` (the load generator talks to the upstream), nginx,
//! HAProxy and sluice, each configured equivalently (one worker, keep-alive to the one
//! upstream, access logs off) from files written into the run's temporary directory.

use std::{
    fmt, fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};

use super::procs::{self, Cpus, Guard};

/// Which system.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// No proxy: the reference every ratio divides by.
    Direct,
    /// nginx, one worker process.
    Nginx,
    /// HAProxy, one thread.
    Haproxy,
    /// sluice, pinned to one CPU.
    Sluice,
    /// P4: sluice relaying upgraded streams in userspace (`splice = "never"`).
    SluiceUserspace,
    /// P4: sluice splicing upgraded streams in the kernel (`splice = "always"`).
    SluiceSpliced,
    /// P4: sluice's adaptive policy (`splice = "auto"`).
    SluiceAuto,
    /// P8: accept loop with no kernel programs attached.
    NoPrograms,
    /// P8: the bare accept loop with an XDP program that only passes packets (the cost
    /// of any XDP program on the link).
    XdpPass,
    /// P8: the same accept loop behind the XDP guard and listener steering.
    GuardSteer,
    /// P9: an older sluice binary (`--baseline-bin`), the "before" of a change.
    SluiceBaseline,
}

impl Kind {
    /// Every system `--systems` can name and [`start`] can start, reference first.
    pub const ALL: [Kind; 4] = [Kind::Direct, Kind::Nginx, Kind::Haproxy, Kind::Sluice];

    /// Every kind a series may hold (the systems, then the variants single scenarios
    /// measure: P4's splice modes, P8's with and without kernel programs).
    pub const EVERY: [Kind; 11] = [
        Kind::Direct,
        Kind::Nginx,
        Kind::Haproxy,
        Kind::Sluice,
        Kind::SluiceUserspace,
        Kind::SluiceSpliced,
        Kind::SluiceAuto,
        Kind::NoPrograms,
        Kind::XdpPass,
        Kind::GuardSteer,
        Kind::SluiceBaseline,
    ];

    /// Short lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
            Kind::Sluice => "sluice",
            Kind::SluiceUserspace => "sluice-userspace",
            Kind::SluiceSpliced => "sluice-spliced",
            Kind::SluiceAuto => "sluice-auto",
            Kind::NoPrograms => "no-programs",
            Kind::GuardSteer => "guard+steer",
            Kind::XdpPass => "xdp-pass",
            Kind::SluiceBaseline => "sluice-baseline",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What every system needs to know to start.
#[derive(Clone)]
pub struct Env {
    /// The run's scratch directory (configs, logs, pid files, certs).
    pub dir: PathBuf,
    /// The shared upstream.
    pub upstream: SocketAddr,
    /// `Host` every request carries (sluice routes on it; the others ignore it).
    pub host: String,
    /// Region and base domain that make up `host` (for sluice's node config).
    pub region: String,
    /// Base domain.
    pub base: String,
    /// The TLS certificate chain and key (PEM), and both in one file for HAProxy.
    pub cert: PathBuf,
    /// Key for `cert`.
    pub key: PathBuf,
    /// Chain + key concatenated.
    pub combined: PathBuf,
    /// The release sluice binary, or why there is none.
    pub sluice: Result<PathBuf, String>,
    /// The nginx binary, or why there is none.
    pub nginx: Result<PathBuf, String>,
    /// The haproxy binary, or why there is none.
    pub haproxy: Result<PathBuf, String>,
    /// Open-file limit every process inherits (sizes the connection limits).
    pub nofile: u64,
}

/// The main sluice's local replica: a second instance of the upstream program, started
/// with sluice inside a cgroup of the run's own, so sluice's kernel redirect carries the
/// proxy ↔ replica bytes (as it does for replicas on a node) while nginx and HAProxy keep
/// the shared upstream, untouched by any program.
#[derive(Debug, Clone)]
pub struct LocalReplica {
    /// Its address (loopback, a local replica by sluice's default prefixes).
    pub upstream: SocketAddr,
    /// The cgroup v2 directory holding it and the main sluice.
    pub cgroup: PathBuf,
}

impl Env {
    /// HAProxy's `maxconn`: it reserves two descriptors per connection and refuses to
    /// start if the open-file limit cannot hold them.
    pub fn haproxy_maxconn(&self) -> u64 {
        (self.nofile.saturating_sub(200) / 2).max(1000)
    }

    /// nginx's `worker_connections` (client and upstream connections count alike).
    pub fn nginx_connections(&self) -> u64 {
        self.nofile.saturating_sub(100).max(1000)
    }
}

/// A started system.
pub struct Running {
    /// Which one.
    pub kind: Kind,
    /// The proxy process (none for direct).
    pub guard: Option<Guard>,
    /// HTTP/1.1 address.
    pub h1: SocketAddr,
    /// h2c (prior knowledge) address.
    pub h2c: SocketAddr,
    /// TLS (1.3, ALPN h2 + http/1.1) address, if the system terminates TLS.
    pub tls: Option<SocketAddr>,
}

impl Running {
    /// The proxy's pid, if there is a proxy.
    pub fn pid(&self) -> Option<u32> {
        self.guard.as_ref().map(Guard::pid)
    }

    /// Where the proxy's processes are allowed to run and last ran.
    pub fn placement(&self) -> String {
        match self.pid() {
            Some(pid) => procs::placement(pid),
            None => "(no proxy)".into(),
        }
    }
}

/// Starts `kind` pinned to `cpus`; `tag` distinguishes restarts' files.
pub fn start(kind: Kind, env: &Env, cpus: Cpus, tag: &str) -> Result<Running> {
    start_under(kind, env, cpus, tag, &[])
}

/// Starts `kind` like [`start`], but as the last arguments of the command `wrap` (e.g.
/// `valgrind --tool=callgrind`); with an empty `wrap` this is [`start`].
pub fn start_under(
    kind: Kind,
    env: &Env,
    cpus: Cpus,
    tag: &str,
    wrap: &[String],
) -> Result<Running> {
    match kind {
        Kind::Direct => {
            Ok(Running { kind, guard: None, h1: env.upstream, h2c: env.upstream, tls: None })
        }
        Kind::Nginx => start_nginx(env, cpus, tag, wrap),
        Kind::Haproxy => start_haproxy(env, cpus, tag, wrap),
        Kind::Sluice => start_sluice(env, cpus, tag, wrap),
        other => anyhow::bail!("{other} is a scenario's variant, not a system to start"),
    }
}

/// Spawns `bin args…`, or `wrap… bin args…`, and waits for `ports` (longer when wrapped:
/// valgrind reads the binary's debug info first).
fn spawn_wrapped(
    name: &str,
    cpus: Cpus,
    bin: &str,
    args: Vec<String>,
    log: PathBuf,
    wrap: &[String],
    ports: &[u16],
) -> Result<Guard> {
    let mut guard = match wrap.split_first() {
        None => Guard::spawn(name, cpus, bin, &args, log)?,
        Some((program, pre)) => {
            let mut all = pre.to_vec();
            all.push(bin.to_string());
            all.extend(args);
            Guard::spawn(name, cpus, program, &all, log)?
        }
    };
    let limit = Duration::from_secs(if wrap.is_empty() { 10 } else { 120 });
    for p in ports {
        guard.wait_port_within(addr(*p), limit)?;
    }
    Ok(guard)
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn binary(b: &Result<PathBuf, String>, what: &str) -> Result<String> {
    match b {
        Ok(p) => Ok(p.display().to_string()),
        Err(e) => anyhow::bail!("{what}: {e}"),
    }
}

const NGINX_CONF: &str = include_str!("../../../scripts/bench/nginx.conf.in");
const NGINX_LOCATIONS: &str = include_str!("../../../scripts/bench/nginx-locations.conf.in");
const HAPROXY_CFG: &str = include_str!("../../../scripts/bench/haproxy.cfg.in");
const SLUICE_TOML: &str = include_str!("../../../scripts/bench/sluice.toml.in");
const ROUTES_TOML: &str = include_str!("../../../scripts/bench/routes.toml.in");

/// Replaces every `{{NAME}}` in `template`; fails on a placeholder left unfilled.
fn fill(template: &str, values: &[(&str, String)]) -> Result<String> {
    let mut out = template.to_string();
    for (name, value) in values {
        out = out.replace(&format!("{{{{{name}}}}}"), value);
    }
    if let Some(at) = out.find("{{") {
        let rest = &out[at..];
        anyhow::bail!(
            "unfilled placeholder {}",
            &rest[..rest.find("}}").map_or(rest.len(), |e| e + 2)]
        );
    }
    Ok(out)
}

/// Values every template may use.
fn common(env: &Env, dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("DIR", dir.display().to_string()),
        ("UPSTREAM", env.upstream.to_string()),
        ("CERT", env.cert.display().to_string()),
        ("KEY", env.key.display().to_string()),
        ("COMBINED", env.combined.display().to_string()),
        ("NOFILE", env.nofile.to_string()),
        ("BASE", env.base.clone()),
        ("REGION", env.region.clone()),
    ]
}

fn start_nginx(env: &Env, cpus: Cpus, tag: &str, wrap: &[String]) -> Result<Running> {
    let bin = binary(&env.nginx, "nginx")?;
    let dir = env.dir.join(format!("nginx-{tag}"));
    fs::create_dir_all(dir.join("tmp"))?;
    let (h1, h2c, tls) = (procs::free_port()?, procs::free_port()?, procs::free_port()?);
    let mut values = common(env, &dir);
    values.extend([
        ("CONNECTIONS", env.nginx_connections().to_string()),
        ("H1_PORT", h1.to_string()),
        ("H2C_PORT", h2c.to_string()),
        ("TLS_PORT", tls.to_string()),
    ]);
    fs::write(dir.join("locations.conf"), fill(NGINX_LOCATIONS, &values)?)?;
    let path = dir.join("nginx.conf");
    fs::write(&path, fill(NGINX_CONF, &values)?)?;
    let args: Vec<String> = vec![
        "-p".into(),
        dir.display().to_string(),
        "-e".into(),
        dir.join("error.log").display().to_string(),
        "-c".into(),
        path.display().to_string(),
    ];
    let guard =
        spawn_wrapped("nginx", cpus, &bin, args, dir.join("stdout.log"), wrap, &[h1, h2c, tls])?;
    Ok(Running {
        kind: Kind::Nginx,
        guard: Some(guard),
        h1: addr(h1),
        h2c: addr(h2c),
        tls: Some(addr(tls)),
    })
}

fn start_haproxy(env: &Env, cpus: Cpus, tag: &str, wrap: &[String]) -> Result<Running> {
    let bin = binary(&env.haproxy, "haproxy")?;
    let dir = env.dir.join(format!("haproxy-{tag}"));
    fs::create_dir_all(&dir)?;
    let (h1, h2c, tls) = (procs::free_port()?, procs::free_port()?, procs::free_port()?);
    let mut values = common(env, &dir);
    values.extend([
        ("MAXCONN", env.haproxy_maxconn().to_string()),
        ("H1_PORT", h1.to_string()),
        ("H2C_PORT", h2c.to_string()),
        ("TLS_PORT", tls.to_string()),
    ]);
    let path = dir.join("haproxy.cfg");
    fs::write(&path, fill(HAPROXY_CFG, &values)?)?;
    let args: Vec<String> = vec!["-db".into(), "-f".into(), path.display().to_string()];
    let guard =
        spawn_wrapped("haproxy", cpus, &bin, args, dir.join("haproxy.log"), wrap, &[h1, h2c, tls])?;
    Ok(Running {
        kind: Kind::Haproxy,
        guard: Some(guard),
        h1: addr(h1),
        h2c: addr(h2c),
        tls: Some(addr(tls)),
    })
}

fn start_sluice(env: &Env, cpus: Cpus, tag: &str, wrap: &[String]) -> Result<Running> {
    start_sluice_wrapped(env, cpus, tag, None, None, wrap, None).map(|(r, _)| r)
}

/// Starts the main sluice serving its own replica `local` with the local-replica
/// redirect attached to `local.cgroup`. The caller spawns it inside that cgroup.
pub fn start_sluice_local(
    env: &Env,
    cpus: Cpus,
    tag: &str,
    local: &LocalReplica,
) -> Result<Running> {
    start_sluice_wrapped(env, cpus, tag, None, None, &[], Some(local)).map(|(r, _)| r)
}

/// This run's pin directory for the sluice started as `tag`: each bench sluice has its
/// own, because sluice refuses to start beside a live one that owns its pin directory
/// (P6 starts a fresh sluice while the main one runs). [`super::Scratch`] removes them.
pub fn bench_pin_dir(tag: &str) -> PathBuf {
    // bpffs refuses names with a '.'.
    let tag: String =
        tag.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    PathBuf::from(format!("{}-{tag}", bench_pin_prefix()))
}

/// What every pin directory of this run starts with.
pub fn bench_pin_prefix() -> String {
    format!("/sys/fs/bpf/sluice-bench-{}", std::process::id())
}

/// Starts sluice like [`start`] does, but serving `routes` (a routing document; the
/// bench's own when `None`) and pinning its maps under `pin_dir` ([`bench_pin_dir`] of
/// `tag` when `None`). Returns the admin address too, for `/metrics`.
pub fn start_sluice_routes(
    env: &Env,
    cpus: Cpus,
    tag: &str,
    routes: Option<&str>,
    pin_dir: Option<&Path>,
) -> Result<(Running, SocketAddr)> {
    start_sluice_wrapped(env, cpus, tag, routes, pin_dir, &[], None)
}

fn start_sluice_wrapped(
    env: &Env,
    cpus: Cpus,
    tag: &str,
    routes: Option<&str>,
    pin_dir: Option<&Path>,
    wrap: &[String],
    local: Option<&LocalReplica>,
) -> Result<(Running, SocketAddr)> {
    let bin = binary(&env.sluice, "sluice")?;
    let dir = env.dir.join(format!("sluice-{tag}"));
    fs::create_dir_all(&dir)?;
    let (plain, tls, admin) = (procs::free_port()?, procs::free_port()?, procs::free_port()?);
    let mut values = common(env, &dir);
    values.extend([
        ("MAXCONN", env.nofile.saturating_sub(200).to_string()),
        ("H1_PORT", plain.to_string()),
        ("TLS_PORT", tls.to_string()),
        ("ADMIN_PORT", admin.to_string()),
    ]);
    if let Some(l) = local {
        for (name, value) in values.iter_mut() {
            if *name == "UPSTREAM" {
                *value = l.upstream.to_string();
            }
        }
    }
    let routes = match routes {
        Some(r) => r.to_string(),
        None => fill(ROUTES_TOML, &values)?,
    };
    fs::write(dir.join("routes.toml"), routes)?;
    let path = dir.join("sluice.toml");
    let mut config = fill(SLUICE_TOML, &values)?;
    if let Some(l) = local {
        config.push_str(&format!(
            "\n[local_replicas]\ncgroup = \"{}\"\nprefixes = [\"127.0.0.0/8\"]\n",
            l.cgroup.display()
        ));
    }
    fs::write(&path, config)?;
    let pin_dir = pin_dir.map(Path::to_path_buf).unwrap_or_else(|| bench_pin_dir(tag));
    let args: Vec<String> = vec![
        "run".into(),
        "--config".into(),
        path.display().to_string(),
        "--pin-dir".into(),
        pin_dir.display().to_string(),
    ];
    let guard =
        spawn_wrapped("sluice", cpus, &bin, args, dir.join("sluice.log"), wrap, &[plain, tls])
            .context("cannot start sluice")?;
    let running = Running {
        kind: Kind::Sluice,
        guard: Some(guard),
        h1: addr(plain),
        h2c: addr(plain),
        tls: Some(addr(tls)),
    };
    Ok((running, addr(admin)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_completely() {
        let env = Env {
            dir: "/tmp/x".into(),
            upstream: addr(1),
            host: "bench.r1.sluice.test".into(),
            region: "r1".into(),
            base: "sluice.test".into(),
            cert: "/c".into(),
            key: "/k".into(),
            combined: "/ck".into(),
            sluice: Err(String::new()),
            nginx: Err(String::new()),
            haproxy: Err(String::new()),
            nofile: 20_000,
        };
        let mut values = common(&env, Path::new("/tmp/x"));
        for (k, v) in ["CONNECTIONS", "MAXCONN", "H1_PORT", "H2C_PORT", "TLS_PORT", "ADMIN_PORT"]
            .iter()
            .zip(["1", "2", "3", "4", "5", "6"])
        {
            values.push((k, v.to_string()));
        }
        for t in [NGINX_CONF, NGINX_LOCATIONS, HAPROXY_CFG, SLUICE_TOML, ROUTES_TOML] {
            let out = fill(t, &values).unwrap();
            assert!(!out.contains("{{"), "{out}");
        }
        assert!(fill("a {{NOPE}} b", &values).is_err());
        assert_eq!(env.haproxy_maxconn(), 9_900);
    }
}
