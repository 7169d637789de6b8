//! Fuzzes hostfiles and `-H` lists: any text, fed as the contents of `-f FILE` to
//! `cmpirun::cli::parse_hostfile` and as the value of `-H` to `cmpirun::cli::parse_host_list`,
//! then the hosts given to `plan::build` under the hydra launcher (the nodes, their slots and
//! the rank layout). Hosts or a `CliError`, never a panic.
#![no_main]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cmpirun::cli::{CliRequest, parse_host_list, parse_hostfile, parse_launch};
use cmpirun::facts::HostFacts;
use cmpirun::jobspec::HostSlots;
use cmpirun::profile::{ProfileChoice, SelectedBy, SiteProfile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the job size (0: none, as without -n); the rest is the file.
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    // The CLI reads a hostfile with `read_to_string`.
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    if let Ok(hosts) = parse_host_list(text) {
        plan_with(n, hosts);
    }
    if let Ok(hosts) = parse_hostfile(Path::new("/tmp/hosts"), text) {
        plan_with(n, hosts);
    }
});

/// Plans a hydra job of `n % 64` ranks (none: as many as the hosts' slots) on `hosts`.
fn plan_with(n: u8, hosts: Vec<HostSlots>) {
    let np = (n % 64).to_string();
    let mut args = vec!["--launcher", "hydra"];
    if n % 64 != 0 {
        args.extend(["-n", np.as_str()]);
    }
    args.extend(["/img.sif", "/bin/true"]);
    let Ok(CliRequest::Launch(mut spec)) = parse_launch(&args) else {
        return;
    };
    spec.hosts = hosts;
    spec.hostfile = Some(PathBuf::from("/tmp/hosts"));
    let choice = ProfileChoice {
        profile: SiteProfile::default(),
        selected_by: SelectedBy::Flag,
        reason: "fuzz".into(),
        outcome: None,
        candidates: vec![],
        searched: vec![],
    };
    let host = HostFacts {
        hostname: "node1".into(),
        cpus: 2,
        programs: BTreeMap::from([(
            "mpiexec.hydra".to_owned(),
            PathBuf::from("/usr/bin/mpiexec.hydra"),
        )]),
        ..HostFacts::default()
    };
    let _ = cmpirun::plan::build(&spec, &choice, &[], &host);
}
