//! The generated CLI artefacts: shell completions and the man page come from the clap
//! definitions, so they must name every subcommand.

use std::process::Command;

fn sluice(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).args(args).output().expect("run sluice");
    assert!(out.status.success(), "sluice {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 output")
}

const SUBCOMMANDS: &[&str] =
    &["run", "upgrade", "demo", "ctl", "autoscale", "supervise", "bpf", "completions", "man"];

#[test]
fn bash_completions_name_the_subcommands() {
    let script = sluice(&["completions", "bash"]);
    assert!(script.contains("sluice"), "{script}");
    for sub in SUBCOMMANDS {
        assert!(script.contains(sub), "no {sub} in the bash completions");
    }
}

#[test]
fn man_page_is_roff_with_the_subcommands() {
    let page = sluice(&["man"]);
    assert!(page.starts_with(".TH "), "{}", &page[..page.len().min(200)]);
    for sub in SUBCOMMANDS {
        assert!(page.contains(sub), "no {sub} in the man page");
    }
}

#[test]
fn ctl_reads_its_etcd_settings_from_the_environment() {
    // clap names the variables in --help when they come through `env = ...`.
    let help = sluice(&["ctl", "--help"]);
    assert!(help.contains("SLUICE_ETCD_ENDPOINTS"), "{help}");
    assert!(help.contains("SLUICE_ETCD_PREFIX"), "{help}");
}
