//! Fuzzes the launch plan that `cmpirun __rank --plan env:NAME|FILE` reads: any text, fed to
//! the parser the rank mode uses (`cmpirun::launch::rank::parse_plan`: JSON → `LaunchPlan`),
//! then what the rank mode derives from a plan without touching the system: the job's images,
//! each rank's place (node, local rank), part and image, each image's binds (with an empty rank environment) and a
//! rank's environment. A plan or a `LaunchError`, never a panic.
#![no_main]

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

use cmpirun::launch::node;
use cmpirun::launch::rank::parse_plan;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The plan arrives in an environment variable or a file read as a `String`.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(plan) = parse_plan("env:CMPIRUN_PLAN", text) else {
        return;
    };
    let _ = plan.may_launch();
    let images = node::job_images(&plan);
    let empty = BTreeMap::new();
    for image in &images {
        let _ = node::image_binds(&plan.binds, image, &empty);
    }
    let last = plan
        .apps
        .iter()
        .map(|a| a.first_rank.saturating_add(a.ranks))
        .max()
        .unwrap_or(0);
    for rank in [0, 1, last.saturating_sub(1), last, u32::MAX] {
        // A task's own place, computed from the layout's rule (checked as the plan was read).
        let _ = node::rank_view(&plan, rank);
        let part = node::part_of(&plan, rank);
        let image = node::image_index(&plan, part);
        assert!(images.is_empty() || image < images.len());
    }
    let host: Vec<(OsString, OsString)> = vec![
        ("PATH".into(), "/usr/bin:/bin".into()),
        ("HOME".into(), "/home/u".into()),
    ];
    let launcher = [("PMI_RANK".to_owned(), "0".to_owned())];
    for part in 0..plan.apps.len().min(4) {
        let _ = node::rank_environment(
            &plan,
            part,
            host.clone(),
            Path::new("/home/u"),
            &[],
            &launcher,
        );
    }
});
