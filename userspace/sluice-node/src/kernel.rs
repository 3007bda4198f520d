//! Bringing up the kernel data plane at start-up.
//!
//! The probe runs once; whatever is missing is said once, in one line, and sluice
//! serves the same semantics on its userspace path. `--require-ebpf` makes a missing
//! feature fatal instead. After the load, the behaviour probe splices a few loopback
//! pairs through the loaded programs; a failed check disables splicing and is named
//! in the log, `/readyz`, `/bpf` and `sluice bpf status`.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use sluice_dataplane::{
    BehaviourReport, Dataplane, DataplaneOptions, Feature, ProbeReport, probe, probe_behaviour,
};
use sluice_proxy::Proxy;
use tracing::{info, warn};

use crate::{NodeError, Result};

/// Names a behaviour check to report failed without running it (`all` fails every
/// check): the test and operations knob for the userspace fallback.
pub const PROBE_FAIL_ENV: &str = "SLUICE_PROBE_FAIL";

/// What start-up learned and loaded.
pub struct Kernel {
    /// The probe's findings (served by `/readyz` detail and `sluice bpf status`).
    pub report: ProbeReport,
    /// The loaded data plane, when the object loads here (shared with the splice
    /// hand-off and its close watcher).
    pub dataplane: Option<Arc<Mutex<Dataplane>>>,
    /// The behaviour probe's findings, when splicing could be tried at all.
    pub behaviour: Option<BehaviourReport>,
}

impl Kernel {
    /// True when opaque streams may be spliced: the verdict attaches and the kernel
    /// behaved in every check.
    pub fn splice_usable(&self) -> bool {
        self.dataplane.is_some()
            && self.report.has(Feature::SkSkbVerdict)
            && self.behaviour.as_ref().is_some_and(BehaviourReport::passed)
    }

    /// The `/bpf` admin document: the feature probe plus the behaviour probe.
    pub fn report_json(&self) -> serde_json::Value {
        serde_json::json!({
            "probe": self.report,
            "behaviour": self.behaviour,
            "splice": if self.splice_usable() { "enabled" } else { "disabled" },
        })
    }

    /// One `/readyz` detail line on splicing.
    pub fn splice_line(&self) -> String {
        if self.splice_usable() {
            let summary = self.behaviour.as_ref().map(BehaviourReport::summary);
            return format!("splice: enabled; behaviour probe {}\n", summary.unwrap_or_default());
        }
        match &self.behaviour {
            Some(b) => format!("splice: disabled; behaviour probe: {}\n", b.summary()),
            None => {
                "splice: disabled; data plane or sk_skb verdict unavailable (see /bpf)\n".to_owned()
            }
        }
    }
}

/// Probes the kernel and loads the data plane. Must run inside a multi-threaded Tokio
/// runtime (the kernel log bridge is a task; the behaviour probe blocks briefly).
/// `takeover`: this process replaces a running one on the same pin directory, whose
/// splice maps it then shares (so spliced streams can be handed over).
pub fn start(require_ebpf: bool, pin_dir: Option<PathBuf>, takeover: bool) -> Result<Kernel> {
    let report = probe::probe();
    if let Some(missing) = report.summary_of_missing() {
        if require_ebpf {
            return Err(NodeError::Refused(format!(
                "--require-ebpf: kernel features missing: {missing}"
            )));
        }
        warn!(%missing, "kernel data plane incomplete; serving those paths in userspace");
    }
    let options = DataplaneOptions { pin_dir };
    let loaded =
        if takeover { Dataplane::load_for_takeover(options) } else { Dataplane::load(options) };
    let dataplane = match loaded {
        Ok(mut dp) => {
            if let Err(e) = dp.start_kernel_logs() {
                warn!(error = %e, "kernel logs will not be forwarded");
            }
            info!(pin_dir = ?dp.pin_dir(), "kernel data plane loaded");
            Some(Arc::new(Mutex::new(dp)))
        }
        Err(e) if require_ebpf => {
            return Err(NodeError::Refused(format!(
                "--require-ebpf: loading the data plane failed: {e}"
            )));
        }
        Err(e) => {
            warn!(error = %e, "kernel data plane not loaded; serving on the userspace path");
            None
        }
    };
    let behaviour = match &dataplane {
        Some(dp) if report.has(Feature::SkSkbVerdict) => {
            let force = std::env::var(PROBE_FAIL_ENV).ok();
            let run = || probe_behaviour(dp, force.as_deref());
            // Blocks for milliseconds; tell a multi-threaded runtime so it moves tasks.
            let b = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
                Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(run),
                _ => run(),
            };
            if b.passed() {
                info!(checks = %b.summary(), "splice behaviour probe passed");
            } else {
                let failed: Vec<&str> = b.failed().map(|c| c.check).collect();
                warn!(
                    failed = %failed.join(","),
                    detail = %b.summary(),
                    "splice behaviour probe failed; upgraded streams relay in userspace"
                );
            }
            Some(b)
        }
        _ => None,
    };
    Ok(Kernel { report, dataplane, behaviour })
}

/// Adds the splice state to `/readyz` detail and the splice decision counters to
/// `/metrics`.
pub fn install_splice_admin(
    server: &mut Proxy,
    kernel: &Kernel,
    decisions: Arc<crate::splice_policy::Decisions>,
) {
    let line = kernel.splice_line();
    server.readyz_detail(Arc::new(move |out: &mut String| out.push_str(&line)));
    server.metrics_extra(Box::new(decisions));
}

/// Adds the kernel data plane's probe state and counters to `/metrics`, read from the
/// pinned maps on each scrape (cheap, and the same numbers `bpftool` shows).
pub fn install_metrics(
    server: &mut Proxy,
    report: sluice_dataplane::ProbeReport,
    pin_dir: Option<std::path::PathBuf>,
) {
    server.metrics_extra(Box::new(KernelCollector { report, pin_dir }));
}

/// The kernel data plane's families, read at scrape time.
#[derive(Debug)]
struct KernelCollector {
    report: sluice_dataplane::ProbeReport,
    pin_dir: Option<std::path::PathBuf>,
}

impl prometheus_client::collector::Collector for KernelCollector {
    fn encode(
        &self,
        mut e: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> std::fmt::Result {
        use sluice_proxy::metrics::{counter, counters, gauges};
        gauges(
            &mut e,
            "sluice_bpf_feature_available",
            "1 if the kernel feature probed usable at start-up.",
            self.report
                .features
                .iter()
                .map(|f| ([("feature", f.feature.name())], u64::from(f.status.is_available()))),
        )?;
        let Some(dir) = &self.pin_dir else { return Ok(()) };
        let live = sluice_dataplane::live::read(dir);
        let rows: [(&str, &str, Option<u64>); 7] = [
            (
                "sluice_bpf_redirect_bytes_total",
                "Bytes sk_msg handed straight to a local peer socket.",
                live.redirect.map(|r| r.bytes_redirected),
            ),
            (
                "sluice_bpf_splice_bytes_total",
                "Bytes of upgraded streams spliced in the kernel.",
                live.splice.map(|s| s.bytes),
            ),
            (
                "sluice_bpf_redirect_no_peer_total",
                "Messages whose peer was not tracked (normal stack path).",
                live.redirect.map(|r| r.no_peer),
            ),
            (
                "sluice_bpf_track_failed_total",
                "Sockhash inserts the kernel refused.",
                live.redirect.map(|r| r.track_failed),
            ),
            (
                "sluice_bpf_vip_rewritten_total",
                "Connects to a VIP rewritten to a replica.",
                live.vip.map(|v| v.rewritten),
            ),
            (
                "sluice_bpf_steer_selected_total",
                "New connections the kernel steered to the active listener generation.",
                live.steer.map(|s| s.selected),
            ),
            (
                "sluice_bpf_steer_migrated_total",
                "Connections migrated off a closing listener.",
                live.steer.map(|s| s.migrated),
            ),
        ];
        for (name, help, v) in rows {
            if let Some(v) = v {
                counter(&mut e, name, help, v)?;
            }
        }
        if let Some(g) = live.guard {
            counters(
                &mut e,
                "sluice_bpf_guard_dropped_total",
                "Packets the XDP guard dropped, by reason.",
                [
                    ([("reason", "denied")], g.dropped_denied),
                    ([("reason", "syn_rate")], g.dropped_syn_rate),
                ],
            )?;
        }
        Ok(())
    }
}

/// The behaviour probe for `sluice bpf status`, which runs in its own process: it
/// loads a private, unpinned copy of the data plane (same programs, nothing shared
/// with a running sluice) and splices its loopback pairs through that. `None` when
/// the sk_skb verdict is unavailable anyway.
pub fn behaviour_standalone(report: &ProbeReport) -> Option<BehaviourReport> {
    if !report.has(Feature::SkSkbVerdict) {
        return None;
    }
    let force = std::env::var(PROBE_FAIL_ENV).ok();
    match Dataplane::load(DataplaneOptions { pin_dir: None }) {
        Ok(dp) => Some(probe_behaviour(&Arc::new(Mutex::new(dp)), force.as_deref())),
        Err(e) => {
            warn!(error = %e, "behaviour probe skipped: the data plane did not load");
            None
        }
    }
}
