//! Fuzzes site profiles: any text, fed as a profile file's contents to the parser that
//! `cmpirun` uses for every profile it reads (`cmpirun::profile::parse_text`: YAML → the
//! profile schema, with its validated names, paths, globs and variable names), then everything
//! derived from one parsed file: the merged profile, its match rules evaluated on a host,
//! `cmpirun profile show`'s text and a launch plan built under it. A profile or a
//! `ProfileError`, never a panic.
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;

use cmpirun::cli::{CliRequest, parse_launch};
use cmpirun::facts::HostFacts;
use cmpirun::profile::{self, MatchContext, ProfileChoice, SelectedBy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // `load_file` reads the file with `read_to_string`: text that is not UTF-8 never gets here.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(loaded) = profile::parse_text(Path::new("/site/fuzz.yaml"), text) else {
        return;
    };
    let p = profile::single(&loaded);
    let ctx = MatchContext {
        hostname: "node1".into(),
        env: BTreeMap::from([("SLURM_JOB_ID".to_owned(), "7".to_owned())]),
        existing: Default::default(),
    };
    let outcome = p.match_rules.as_ref().map(|rules| {
        let _ = rules.effective_weight();
        profile::evaluate(rules, &ctx)
    });
    let choice = ProfileChoice {
        profile: p,
        selected_by: SelectedBy::Flag,
        reason: "named with --profile fuzz".into(),
        outcome,
        candidates: vec![],
        searched: vec![],
    };
    let _ = profile::show::render_choice(&choice);
    let Ok(CliRequest::Launch(spec)) = parse_launch(&["-n", "2", "/img.sif", "/bin/true"]) else {
        return;
    };
    let host = HostFacts {
        hostname: "node1".into(),
        cpus: 2,
        ..HostFacts::default()
    };
    if let Ok(plan) = cmpirun::plan::build(&spec, &choice, &[], &host) {
        let _ = cmpirun::plan::dry_run_text(&plan);
    }
});
