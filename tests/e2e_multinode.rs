//! End-to-end tests across the three-node test cluster (`ci/start-cluster.sh`), as the
//! unprivileged test user: `salloc -N3 -n6 cmpirun …` through srun, and `cmpirun -f hosts …`
//! through hydra over ssh, from the front end (the root namespace, as a login node).
//!
//! What they check: correct results of real MPI jobs whose traffic crosses the nodes' links, one
//! user namespace per node, the exit status of a rank that fails on another node than the front
//! end's (its report reaches the front end over the nodes' network, not loopback), a node lost
//! mid-job, and nothing of a job left on any node.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;

/// The MPICH 5 image's MPI over libfabric's tcp provider.
const MPICH5_OFI: [&str; 4] = ["-x", "FI_PROVIDER=tcp", "-x", "MPIR_CVAR_CH4_NETMOD=ofi"];

/// `salloc -N3 -n6 cmpirun -n 6` as the test user on the three-node cluster (add cmpirun's
/// arguments), through a shell that prints cmpirun's own status (`cmpirun-status=N` on stderr):
/// salloc exits 0 even when its command failed.
fn salloc3(cluster: &Cluster) -> TuserCommand {
    salloc3_cmpirun(cluster).args(["-n", "6"])
}

/// [`salloc3`] without cmpirun's `-n 6`.
fn salloc3_cmpirun(cluster: &Cluster) -> TuserCommand {
    TuserCommand::new("salloc")
        .cluster(cluster)
        .env("CMPIRUN_KILL_GRACE", "2")
        .timeout(Duration::from_secs(180))
        .args([
            "-N3",
            "-n6",
            "/bin/sh",
            "-c",
            "\"$@\"; echo cmpirun-status=$? >&2",
            "sh",
        ])
        .arg(cmpirun_bin())
}

/// The status cmpirun exited with inside [`salloc3`].
fn cmpirun_status(out: &RunOutput) -> i32 {
    out.stderr
        .lines()
        .find_map(|l| l.strip_prefix("cmpirun-status=")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no cmpirun status:\n{out}"))
}

/// [`salloc3`] with cmpirun's arguments `args`: what it did, and cmpirun's status.
fn salloc3_status(cluster: &Cluster, args: &[&str]) -> (RunOutput, i32) {
    let out = salloc3(cluster).args(args).run();
    let status = cmpirun_status(&out);
    (out, status)
}

/// Checks an mpitest job of 6 ranks over the three nodes: correct results, two ranks per node,
/// ranks of a node in one user namespace, nodes in different ones.
fn check_spread(out: &RunOutput) {
    let hellos = assert_mpitest_ok(out, 6);
    assert_one_container_per_host(&hellos, tuser().uid);
    let mut per_node: BTreeMap<&str, BTreeSet<Option<u64>>> = BTreeMap::new();
    for h in &hellos {
        per_node.entry(&h.host).or_default().insert(h.userns);
    }
    assert_eq!(
        per_node.keys().copied().collect::<Vec<_>>(),
        NODES,
        "ranks not on every node:\n{out}"
    );
    let all: BTreeSet<Option<u64>> = per_node.values().flatten().copied().collect();
    assert_eq!(
        all.len(),
        3,
        "the nodes must have different user namespaces:\n{out}"
    );
}

/// The MPICH 5 image's MPI over its own UCX (UCX picks its transports: tcp over the nodes'
/// veths, shared memory within a node).
const MPICH5_UCX: [&str; 2] = ["-x", "MPIR_CVAR_CH4_NETMOD=ucx"];

/// MPICH 5 over the network module `netmod` selects (cmpirun's arguments) through `salloc -N3
/// -n6 cmpirun -n 6 --pmi pmi2`: `bigmsg`'s 16 MiB ring crosses every node's link, MPICH's
/// summary (`MPIR_CVAR_DEBUG_SUMMARY`) shows `used`, the netmod it ran over, and `mpitest` is
/// right and spread over the nodes.
fn mpich5_across_three_nodes(netmod: &[&str], used: &str) {
    let _serial = exclusive();
    let cluster = require_cluster();
    let before = cluster.state();
    let bytes: Vec<u64> = NODES.iter().map(|n| cluster.link_bytes(n)).collect();
    let image = staged_image("mpich5");
    let image = image.to_str().unwrap();
    let run = |extra: &[&str], program: &str| {
        salloc3_status(
            &cluster,
            &[&["--pmi", "pmi2"], netmod, extra, &[image, program]].concat(),
        )
    };
    let (out, status) = run(
        &["-x", "MPIR_CVAR_DEBUG_SUMMARY=1"],
        "/usr/local/bin/bigmsg",
    );
    assert_eq!(status, 0, "{out}");
    assert!(out.stdout.contains("bigmsg: OK size=6"), "{out}");
    assert!(out.stdout.contains(used), "not over {used}:\n{out}");
    // 16 MiB went round the ring: every node's link carried a good part of it.
    for (n, b) in NODES.iter().zip(bytes) {
        let grew = cluster.link_bytes(n) - b;
        assert!(
            grew > 8 << 20,
            "node {n}'s link carried only {grew} bytes:\n{out}"
        );
    }
    let (out, status) = run(&[], "/usr/local/bin/mpitest");
    assert_eq!(status, 0, "{out}");
    check_spread(&out);
    cluster.assert_nothing_left(&before);
}

#[test]
fn mpich5_over_ofi_tcp_across_three_nodes_through_srun() {
    mpich5_across_three_nodes(&MPICH5_OFI, "provider: tcp");
}

#[test]
fn mpich5_over_its_own_ucx_across_three_nodes_through_srun() {
    mpich5_across_three_nodes(&MPICH5_UCX, "==== UCX netmod Capability ====");
}

/// A rank program: rank `rank` (by `var`, the launcher's rank variable) runs `fail`, the others
/// `mpitest` (which waits in `MPI_Init` for it forever: only a teardown ends the job).
fn one_rank_fails(var: &str, rank: u32, fail: &str) -> [String; 3] {
    [
        "/bin/sh".into(),
        "-c".into(),
        format!("if [ \"${var}\" = {rank} ]; then {fail}; fi; exec /usr/local/bin/mpitest"),
    ]
}

/// The failures of a 6-rank job of the MPICH 5 image over ofi tcp and what cmpirun must end it
/// with: (cmpirun's arguments after `first`, status, message), with the rank variable `var` of
/// the launcher.
fn failures(var: &str, first: &[&str]) -> Vec<(Vec<String>, i32, String)> {
    let image = staged_image("mpich5").display().to_string();
    let args = |flags: Vec<String>, program: Vec<String>| -> Vec<String> {
        let mut a: Vec<String> = first.iter().map(|s| s.to_string()).collect();
        a.extend(MPICH5_OFI.map(String::from));
        a.extend(flags);
        a.push(image.clone());
        a.extend(program);
        a
    };
    let abort = ["/usr/local/bin/abort", "abort", "7"]
        .map(String::from)
        .to_vec();
    let sleep = ["/bin/sleep", "600"].map(String::from).to_vec();
    vec![
        (
            args(vec![], one_rank_fails(var, 5, "exit 3").to_vec()),
            3,
            "cmpirun: rank 5 of 6 exited with status 3; the job was ended".into(),
        ),
        (
            args(vec![], one_rank_fails(var, 4, "kill -9 $$").to_vec()),
            137,
            "cmpirun: rank 4 of 6 was killed by signal 9 (SIGKILL)".into(),
        ),
        (
            args(vec![], abort),
            7,
            "cmpirun: rank 1 of 6 called MPI_Abort with code 7".into(),
        ),
        (
            args(vec!["--timeout".into(), "3".into()], sleep),
            124,
            "the job did not end within --timeout 3 s".into(),
        ),
    ]
}

#[test]
fn exit_statuses_across_nodes_through_srun() {
    let _serial = exclusive();
    let cluster = require_cluster();
    let before = cluster.state();
    let image = staged_image("mpich5");
    for (args, code, message) in failures("SLURM_PROCID", &["--pmi", "pmi2"]) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (out, status) = salloc3_status(&cluster, &args);
        assert_eq!(status, code, "{out}");
        assert!(out.stderr.contains(&message), "{out}");
        assert!(!out.stderr.contains("could not report"), "{out}");
        // A step Slurm ended with SIGKILL (MPI_Abort, a failed rank) kills the node instances
        // too: their rendezvous files stay until the next instance on the node removes them.
        cluster.assert_nothing_left_but(&before, is_rendezvous_file);
    }
    let (ok, status) = salloc3_status(
        &cluster,
        &[
            &["-vv"][..],
            &MPICH5_OFI[..],
            &[image.to_str().unwrap(), "/usr/local/bin/hello"],
        ]
        .concat(),
    );
    assert_eq!(status, 0, "{ok}");
    assert_clean_ends_once_per_node(&ok);
    cluster.assert_nothing_left(&before);
}

/// The front end heard of the clean ends of a 6-rank job on the three nodes in one report per
/// node (its `-vv` lines), each of a node's two ranks, and of no rank alone.
fn assert_clean_ends_once_per_node(out: &RunOutput) {
    let mut lists: Vec<&str> = out
        .stderr
        .lines()
        .filter_map(|l| {
            l.split_once("ranks ")?
                .1
                .strip_suffix(" reported a clean end")
        })
        .collect();
    lists.sort();
    assert_eq!(lists, ["0-1", "2-3", "4-5"], "{out}");
    assert!(!out.stderr.contains("reported Exited(0)"), "{out}");
}

/// `sbatch --wait -N3 -n6 SCRIPT ARGS` as the test user on the cluster with `env`, the script
/// (`script`, written into `dir`) and the job's output in `dir`: the job as a run, with its
/// output file as stdout, sbatch's status (the job's exit code) as the status, and sbatch's
/// stderr and the job's record (`scontrol show job`: the cluster keeps no accounting for
/// `sacct`) as stderr.
fn sbatch3(
    cluster: &Cluster,
    dir: &std::path::Path,
    script: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> RunOutput {
    let path = dir.join("job.sbatch");
    std::fs::write(&path, script).unwrap();
    let mut cmd = TuserCommand::new("sbatch")
        .cluster(cluster)
        .env("CMPIRUN_KILL_GRACE", "2")
        .current_dir(dir)
        .timeout(Duration::from_secs(180))
        .args(["--parsable", "--wait", "-N3", "-n6", "-o"])
        .arg(dir.join("job-%j.out"))
        .arg(&path)
        .args(args);
    for (k, v) in env {
        cmd = cmd.env(k, v);
    }
    let out = cmd.run();
    let id = out.stdout.trim().to_owned();
    let record = std::process::Command::new("scontrol")
        .env("SLURM_CONF", cluster.slurm_conf())
        .args(["show", "job", &id])
        .output()
        .expect("scontrol");
    let job = std::fs::read_to_string(dir.join(format!("job-{id}.out"))).unwrap_or_default();
    RunOutput {
        stdout: job,
        stderr: format!(
            "{}--- scontrol show job {id} ---\n{}",
            out.stderr,
            String::from_utf8_lossy(&record.stdout)
        ),
        ..out
    }
}

#[test]
fn batch_jobs_run_cmpirun_across_three_nodes() {
    let _serial = exclusive();
    let cluster = require_cluster();
    let before = cluster.state();
    let dir = TuserDir::new();
    let bin = cmpirun_bin().display().to_string();
    let mpich5 = staged_image("mpich5").display().to_string();
    // The example batch script users copy (`cmpirun -n $SLURM_NTASKS IMAGE PROGRAM`, on the
    // job's first node); MPICH 5's network module comes from the environment sbatch passes on.
    let example = std::fs::read_to_string(repo_root().join("examples/slurm/mpitest.sbatch"))
        .expect("examples/slurm/mpitest.sbatch");
    let job = sbatch3(
        &cluster,
        dir.path(),
        &example,
        &[&mpich5],
        &[
            ("CMPIRUN", &bin),
            ("FI_PROVIDER", "tcp"),
            ("MPIR_CVAR_CH4_NETMOD", "ofi"),
        ],
    );
    check_spread(&job);
    assert!(
        job.stderr.contains("JobState=COMPLETED") && job.stderr.contains("ExitCode=0:0"),
        "{job}"
    );
    // Two steps in one script: Open MPI 5 (its own PMIx 5 client) over Slurm's PMIx, then
    // MPICH 5 over PMI-2 with rank 5 (on n3) exiting 3: the job fails with cmpirun's 3.
    let openmpi5 = staged_image("openmpi5").display().to_string();
    let script = format!(
        "#!/bin/sh\n\
         {bin} -n 6 --pmi pmix {openmpi5} /usr/local/bin/mpitest || exit\n\
         echo '--- step 2'\n\
         {bin} -n 6 --pmi pmi2 {ofi} {mpich5} /bin/sh -c \
         'if [ \"$SLURM_PROCID\" = 5 ]; then exit 3; fi; exec /usr/local/bin/mpitest'\n",
        ofi = MPICH5_OFI.join(" "),
    );
    let job = sbatch3(&cluster, dir.path(), &script, &[], &[]);
    assert_eq!(job.code(), Some(3), "{job}");
    assert!(
        job.stderr.contains("JobState=FAILED") && job.stderr.contains("ExitCode=3:0"),
        "{job}"
    );
    let (first, second) = job
        .stdout
        .split_once("--- step 2")
        .unwrap_or_else(|| panic!("the first step failed:\n{job}"));
    check_spread(&RunOutput {
        stdout: first.to_owned(),
        status: std::os::unix::process::ExitStatusExt::from_raw(0),
        ..job
    });
    assert!(
        second.contains("cmpirun: rank 5 of 6 exited with status 3; the job was ended"),
        "{second}"
    );
    cluster.assert_nothing_left_but(&before, is_rendezvous_file);
}

/// A rank program for one part of an MPMD job: prints `part: rank=R image=I marker=M` (the
/// rank from the launcher's variable `var`, the image's `CMPIRUN_TEST_IMAGE`, the marker file
/// only the second image has) and runs `mpitest`.
fn mpmd_part(var: &str) -> [String; 3] {
    [
        "/bin/sh".into(),
        "-c".into(),
        format!(
            "echo \"part: rank=${var} image=$CMPIRUN_TEST_IMAGE \
             marker=$(cat /etc/mpmd-marker 2>/dev/null || echo none)\"; \
             exec /usr/local/bin/mpitest"
        ),
    ]
}

/// cmpirun's arguments for a 3+3 MPMD job of the MPICH 5 image and its [`second_image`] over
/// ofi tcp, after `first`, each part running [`mpmd_part`] with the launcher's rank variable.
fn mpmd_args(first: &[&str], var: &str) -> Vec<String> {
    let mut a: Vec<String> = first.iter().map(|s| s.to_string()).collect();
    a.extend(MPICH5_OFI.map(String::from));
    for (i, img) in [staged_image("mpich5"), second_image("mpich5")]
        .iter()
        .enumerate()
    {
        if i > 0 {
            a.push(":".into());
        }
        a.extend(["-n".into(), "3".into(), img.display().to_string()]);
        a.extend(mpmd_part(var));
    }
    a
}

/// Checks a 3+3 MPMD job placed in blocks over the three nodes (ranks 0-1 on n1, 2-3 on n2,
/// 4-5 on n3): correct results; ranks 0-2 in the first image, 3-5 in the second; one user
/// namespace per node, different on each; n2's instance holds both images, one mount
/// namespace each.
fn check_mpmd(out: &RunOutput) {
    let hellos = assert_mpitest_ok(out, 6);
    let parts = find_fields_all(&out.stdout, "part: ");
    for r in 0..6u32 {
        let part = parts
            .iter()
            .find(|p| p.get("rank").map(String::as_str) == Some(&r.to_string()))
            .unwrap_or_else(|| panic!("no part line of rank {r}:\n{out}"));
        let (image, marker) = if r < 3 {
            ("mpich5", "none")
        } else {
            ("mpich5-mpmd", MPMD_MARKER)
        };
        assert_eq!(part["image"], image, "rank {r}:\n{out}");
        assert_eq!(part["marker"], marker, "rank {r}:\n{out}");
    }
    let hello = |r: u32| hellos.iter().find(|h| h.rank == r).unwrap();
    let hosts: Vec<&str> = (0..6).map(|r| hello(r).host.as_str()).collect();
    assert_eq!(hosts, ["n1", "n1", "n2", "n2", "n3", "n3"], "{out}");
    let users: BTreeSet<Option<u64>> = hellos.iter().map(|h| h.userns).collect();
    assert_eq!(users.len(), 3, "one user namespace per node:\n{out}");
    for pair in [(0, 1), (2, 3), (4, 5)] {
        assert_eq!(hello(pair.0).userns, hello(pair.1).userns, "{out}");
    }
    assert_ne!(
        hello(2).mntns,
        hello(3).mntns,
        "one mount namespace per image on n2:\n{out}"
    );
}

#[test]
fn mpmd_with_two_images_across_three_nodes() {
    let _serial = exclusive();
    let cluster = require_cluster();
    let before = cluster.state();
    let args = mpmd_args(&["--pmi", "pmi2"], "SLURM_PROCID");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = salloc3_cmpirun(&cluster).args(&args).run();
    assert_eq!(cmpirun_status(&out), 0, "{out}");
    check_mpmd(&out);
    let args = mpmd_args(&[], "PMI_RANK");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = over_ssh(&cluster, &["-H", "n1:2,n2:2,n3:2"], &args);
    check_mpmd(&out);
    cluster.assert_nothing_left(&before);
}

/// A fresh cache folder (`XDG_CACHE_HOME`) in the test user's home, the home every node of the
/// cluster shares; removed when dropped.
struct HomeCache(std::path::PathBuf);

impl HomeCache {
    fn new(name: &str) -> HomeCache {
        let dir = tuser()
            .home
            .join(format!(".cmpirun-test-cache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        chown_to_tuser(&dir);
        HomeCache(dir)
    }

    /// Checks the cache after jobs filled it from several nodes at once: one entry in each of
    /// `kinds` (`libraries` and `extract`: a folder, `facts`: a JSON file), and no temporary
    /// file or folder of a fill left anywhere (`<key>.tmp-<owner>`, a facts `.tmpXXXXXX`).
    fn check(&self, kinds: &[&str], what: &str) {
        for kind in kinds {
            let dir = self.0.join("cmpirun").join(kind);
            let names: Vec<String> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}\n{what}", dir.display()))
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            let temporary: Vec<&String> = names.iter().filter(|n| n.contains(".tmp")).collect();
            assert!(temporary.is_empty(), "{kind}: {temporary:?} left\n{what}");
            let entries = names
                .iter()
                .filter(|n| match *kind {
                    "facts" => n.ends_with(".json"),
                    _ => !n.contains('.'),
                })
                .count();
            assert_eq!(entries, 1, "{kind}: one entry, not {names:?}\n{what}");
        }
    }
}

impl Drop for HomeCache {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The line of the task that fills a library-cache entry (at log level info).
const LIBRARIES_FILLED: &str = "unpacking its MPI stack";

#[test]
fn caches_in_the_shared_home_are_filled_once_from_three_nodes_at_once() {
    let _serial = exclusive();
    let cluster = require_cluster();
    let before = cluster.state();
    let image = staged_image("mpich5");
    // Under srun: the three node instances (each created by one of its node's two tasks) fill
    // one library-cache entry at once, then, with the extract backend, one extracted tree.
    let cache = HomeCache::new("srun");
    for (flags, filled) in [
        (&[][..], LIBRARIES_FILLED),
        (&["--image-mount", "extract"][..], "extracting it into"),
    ] {
        let out = salloc3(&cluster)
            .env("XDG_CACHE_HOME", &cache.0)
            .env("CMPIRUN_LOG", "info")
            .args(["--pmi", "pmi2"])
            .args(MPICH5_OFI)
            .args(flags)
            .arg(&image)
            .arg("/usr/local/bin/mpitest")
            .run();
        assert_eq!(cmpirun_status(&out), 0, "{out}");
        check_spread(&out);
        assert_eq!(out.stderr.matches(filled).count(), 1, "filled once:\n{out}");
    }
    cache.check(&["libraries", "extract", "facts"], "");
    // Three front ends at once, one on each node (the local launcher, two ranks each), with an
    // empty cache: the image facts and the library cache are filled from all three.
    let cache = HomeCache::new("local");
    let jobs: Vec<TuserChild> = NODES
        .iter()
        .map(|node| {
            TuserCommand::cmpirun()
                .on_node(node)
                .env("XDG_CACHE_HOME", &cache.0)
                .env("CMPIRUN_LOG", "info")
                .env("CMPIRUN_KILL_GRACE", "2")
                .timeout(Duration::from_secs(120))
                .args(["-n", "2"])
                .arg(&image)
                .arg("/usr/local/bin/mpitest")
                .spawn()
        })
        .collect();
    let outs: Vec<RunOutput> = jobs.into_iter().map(TuserChild::wait).collect();
    let all = outs
        .iter()
        .map(|o| o.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    for (node, out) in NODES.iter().zip(&outs) {
        let hellos = assert_mpitest_ok(out, 2);
        assert!(hellos.iter().all(|h| h.host == *node), "{out}");
    }
    let fills: usize = outs
        .iter()
        .map(|o| o.stderr.matches(LIBRARIES_FILLED).count())
        .sum();
    assert_eq!(fills, 1, "filled once:\n{all}");
    cache.check(&["libraries", "facts"], &all);
    cluster.assert_nothing_left(&before);
}

/// A node instance's socket or lock in the runtime folder.
fn is_rendezvous_file(entry: &str) -> bool {
    entry.contains("/tmp/cmpirun-") && (entry.ends_with(".sock") || entry.ends_with(".lock"))
}

#[test]
fn openmpi4_over_pmix_across_three_nodes_through_srun() {
    let _serial = exclusive();
    let cluster = require_cluster();
    let before = cluster.state();
    let image = staged_image("openmpi4");
    let (out, status) = salloc3_status(
        &cluster,
        &[
            "--pmi",
            "pmix",
            image.to_str().unwrap(),
            "/usr/local/bin/mpitest",
        ],
    );
    assert_eq!(status, 0, "{out}");
    check_spread(&out);
    assert!(!out.stderr.contains("PMIX ERROR"), "{out}");
    cluster.assert_nothing_left(&before);
}

/// `cmpirun HOSTS ARGS` as the test user through hydra (or, with `--launcher mpirun`, Open
/// MPI's mpirun) over ssh (the cluster's ssh, the launcher a site uses), from the front end.
/// The node names resolve only in ssh's configuration, so the front end's address on the
/// nodes' network is set (cmpirun passes it to hydra as `-localhost` too).
fn over_ssh(cluster: &Cluster, hosts: &[&str], args: &[&str]) -> RunOutput {
    TuserCommand::cmpirun()
        .cluster(cluster)
        .env("CMPIRUN_REPORT_ADDR", FRONT_END_ADDR)
        .env("CMPIRUN_KILL_GRACE", "2")
        .timeout(Duration::from_secs(120))
        .args(hosts)
        .args(args)
        .run()
}

#[test]
fn mpich5_across_three_nodes_through_hydra_over_ssh() {
    let _serial = exclusive();
    let cluster = require_cluster();
    let before = cluster.state();
    let dir = TuserDir::new();
    let mpich_form = dir.path().join("hosts-mpich");
    std::fs::write(&mpich_form, "n1:2\nn2:2\nn3:2\n").unwrap();
    let ompi_form = dir.path().join("hosts-ompi");
    std::fs::write(
        &ompi_form,
        "# Open MPI's form\nn1 slots=2\nn2 slots=2 max_slots=4\nn3 slots=2\n",
    )
    .unwrap();
    let image = staged_image("mpich5");
    let mut args: Vec<&str> = MPICH5_OFI.to_vec();
    args.extend([image.to_str().unwrap(), "/usr/local/bin/mpitest"]);
    let runs: [(Vec<&str>, Vec<&str>); 4] = [
        (vec!["-f", mpich_form.to_str().unwrap(), "-n", "6"], vec![]),
        (vec!["-f", ompi_form.to_str().unwrap(), "-n", "6"], vec![]),
        (vec!["-H", "n1:2,n2:2,n3:2", "-n", "6"], vec![]),
        // -ppn 2 over hosts of one slot each, then round-robin placement.
        (vec!["-H", "n1,n2,n3", "-n", "6", "-ppn", "2"], vec![]),
    ];
    for (hosts, _) in &runs {
        let out = over_ssh(&cluster, hosts, &args);
        check_spread(&out);
        let hellos = hello_lines(&out.stdout);
        let host_of = |r: u32| hellos.iter().find(|h| h.rank == r).map(|h| h.host.clone());
        assert_eq!(host_of(1), Some("n1".into()), "block placement:\n{out}");
    }
    let out = over_ssh(
        &cluster,
        &["-H", "n1:2,n2:2,n3:2", "-n", "6", "--map-by", "node"],
        &args,
    );
    check_spread(&out);
    let hellos = hello_lines(&out.stdout);
    let host_of = |r: u32| hellos.iter().find(|h| h.rank == r).map(|h| h.host.clone());
    assert_eq!(
        (0..6).map(host_of).collect::<Vec<_>>(),
        ["n1", "n2", "n3", "n1", "n2", "n3"].map(|h| Some(h.to_owned())),
        "--map-by node:\n{out}"
    );
    cluster.assert_nothing_left(&before);
}

#[test]
fn exit_statuses_across_nodes_through_hydra() {
    let _serial = exclusive();
    let cluster = require_cluster();
    let before = cluster.state();
    for (args, code, message) in failures("PMI_RANK", &[]) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = over_ssh(&cluster, &["-H", "n1:2,n2:2,n3:2", "-n", "6"], &args);
        assert_eq!(out.code(), Some(code), "{out}");
        assert!(out.stderr.contains(&message), "{out}");
        // The other ranks wait in MPI_Init (or a barrier) for ever: the job ended because the
        // first failure reported ended hydra's job, not by itself.
        assert!(out.elapsed < Duration::from_secs(20), "{out}");
        cluster.assert_nothing_left_but(&before, is_rendezvous_file);
    }
    let image = staged_image("mpich5");
    let mut args: Vec<&str> = MPICH5_OFI.to_vec();
    args.extend([image.to_str().unwrap(), "/usr/local/bin/hello"]);
    let ok = over_ssh(&cluster, &["-vv", "-H", "n1:2,n2:2,n3:2", "-n", "6"], &args);
    assert_eq!(ok.code(), Some(0), "{ok}");
    assert_clean_ends_once_per_node(&ok);
}

#[test]
fn openmpi4_across_three_nodes_through_mpirun_over_ssh() {
    // Open MPI's mpirun starts its daemons on the nodes over the cluster's ssh
    // (`OMPI_MCA_plm_rsh_agent`); each starts its node's `cmpirun __rank` tasks and serves them
    // PMIx.
    let _serial = exclusive();
    let cluster = require_cluster();
    let before = cluster.state();
    let image = staged_image("openmpi4").display().to_string();
    let hosts = ["--launcher", "mpirun", "-H", "n1:2,n2:2,n3:2", "-n", "6"];
    let out = over_ssh(&cluster, &hosts, &[&image, "/usr/local/bin/mpitest"]);
    check_spread(&out);
    for (fail, code, message) in [
        (
            "exit 3",
            3,
            "cmpirun: rank 5 of 6 exited with status 3; the job was ended",
        ),
        (
            "kill -9 $$",
            137,
            "cmpirun: rank 5 of 6 was killed by signal 9 (SIGKILL)",
        ),
    ] {
        let program = one_rank_fails("OMPI_COMM_WORLD_RANK", 5, fail);
        let program: Vec<&str> = program.iter().map(String::as_str).collect();
        let out = over_ssh(
            &cluster,
            &hosts,
            &[&[image.as_str()][..], &program].concat(),
        );
        assert_eq!(out.code(), Some(code), "{out}");
        assert!(out.stderr.contains(message), "{out}");
        assert!(!out.stderr.contains("could not report"), "{out}");
        // The other ranks wait in MPI_Init for rank 5: mpirun ended the job.
        assert!(out.elapsed < Duration::from_secs(20), "{out}");
    }
    cluster.assert_nothing_left_but(&before, is_rendezvous_file);
}

/// Kills node `node`'s slurmd and every process of its jobs (all but the node's anchor and its
/// sshd), as a node that crashes.
fn crash_node(cluster: &Cluster, node: &str) {
    let keep: Vec<String> = [
        cluster.anchor(node).to_string(),
        std::fs::read_to_string(cluster.dir.join(format!("sshd-{node}.pid")))
            .unwrap_or_default()
            .trim()
            .to_owned(),
    ]
    .to_vec();
    let ns = format!("cmpn{}", node.trim_start_matches('n'));
    let pids = std::process::Command::new("ip")
        .args(["netns", "pids", &ns])
        .output()
        .expect("ip netns pids");
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        if !keep.iter().any(|k| k == pid)
            && let Ok(p) = pid.parse::<i32>()
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Starts node `node`'s slurmd again and waits until the cluster has all its nodes idle.
fn revive_node(cluster: &Cluster, node: &str) {
    let status = std::process::Command::new("nsenter")
        .args([
            "-t",
            &cluster.anchor(node).to_string(),
            "-n",
            "-u",
            "-i",
            "-m",
            "slurmd",
            "-f",
        ])
        .arg(cluster.slurm_conf())
        .args(["-N", node])
        .status()
        .expect("slurmd");
    assert!(status.success());
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < until {
        let out = std::process::Command::new("sinfo")
            .env("SLURM_CONF", cluster.slurm_conf())
            .args(["-h", "-t", "idle", "-o", "%D"])
            .output()
            .expect("sinfo");
        if String::from_utf8_lossy(&out.stdout).trim() == "3" {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("node {node} did not come back");
}

#[test]
fn a_node_lost_mid_job_fails_the_job_naming_it() {
    let _serial = exclusive();
    let cluster = require_cluster();
    let before = cluster.state();
    let image = staged_image("mpich5");
    // The ranks of n1 and n2 end well after 6 s; those of n3 are lost at about 2 s.
    let child = salloc3(&cluster)
        .timeout(Duration::from_secs(120))
        .args(["--pmi", "pmi2"])
        .arg(&image)
        .args(["/bin/sleep", "6"])
        .spawn();
    wait_for_tagged(child.tag(), Duration::from_secs(60), "six ranks", |p| {
        p.iter().filter(|p| p.comm == "sleep").count() >= 6
    });
    std::thread::sleep(Duration::from_millis(500));
    let lost_at = std::time::Instant::now();
    crash_node(&cluster, "n3");
    let out = child.wait();
    let took = lost_at.elapsed();
    revive_node(&cluster, "n3");
    let status = cmpirun_status(&out);
    eprintln!(
        "the job ended {took:?} after the loss of n3, with status {status}: {}",
        out.stderr
            .lines()
            .filter(|l| l.contains("cmpirun:") || l.contains("srun:"))
            .collect::<Vec<_>>()
            .join(" / ")
    );
    assert_ne!(status, 0, "a lost node passed for a success:\n{out}");
    assert!(
        out.stderr.contains("n3"),
        "the message must name the lost node:\n{out}"
    );
    // Bounded by the cluster's SlurmdTimeout (20 s) and the kill grace.
    assert!(took < Duration::from_secs(45), "took {took:?}:\n{out}");
    // Nothing is left on the nodes that survived (n3's own state went with its processes,
    // but its rendezvous files, which the next instance there removes).
    cluster.assert_nothing_left_but(&before, |e| e.starts_with("n3:") && is_rendezvous_file(e));
}

#[test]
fn a_front_end_on_a_node_of_the_job() {
    // As in a batch script: cmpirun runs on n1, the first node of its allocation, whose own
    // ranks are local to it and whose other ranks are not; the node names do not resolve there.
    let _serial = exclusive();
    let cluster = require_cluster();
    let before = cluster.state();
    let image = staged_image("mpich5");
    let run = |program: &[&str]| {
        let out = salloc3(&cluster)
            .on_node("n1")
            .args(["--pmi", "pmi2"])
            .args(MPICH5_OFI)
            .arg(&image)
            .args(program)
            .run();
        let status = cmpirun_status(&out);
        (out, status)
    };
    let (out, status) = run(&["/usr/local/bin/mpitest"]);
    assert_eq!(status, 0, "{out}");
    check_spread(&out);
    let fail = one_rank_fails("SLURM_PROCID", 5, "exit 3");
    let fail: Vec<&str> = fail.iter().map(String::as_str).collect();
    let (out, status) = run(&fail);
    assert_eq!(status, 3, "{out}");
    assert!(
        out.stderr
            .contains("cmpirun: rank 5 of 6 exited with status 3"),
        "{out}"
    );
    cluster.assert_nothing_left_but(&before, is_rendezvous_file);
}

#[test]
fn a_plan_too_large_for_the_environment_is_refused_with_the_numbers() {
    // The plan the tasks get grows with the nodes only (their names), not with the ranks: 1000
    // nodes of 128 ranks fit in a few KiB (tests/plan_dry_run.rs). 40,000 nodes whose names
    // have nothing in common do not: nothing is started, and the numbers are given.
    let dir = TuserDir::new();
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let hosts: String = (0..40_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            format!("h{state:016x}:1\n")
        })
        .collect();
    let hostfile = dir.path().join("hosts");
    std::fs::write(&hostfile, hosts).unwrap();
    let out = TuserCommand::cmpirun()
        .args(["--launcher", "hydra", "-f"])
        .arg(&hostfile)
        .args(["-n", "40000"])
        .arg(staged_image("mpich5"))
        .arg("/usr/local/bin/hello")
        .run();
    out.assert_code(2);
    assert!(
        out.stderr.contains("(40000 ranks on 40000 nodes)")
            && out.stderr.contains("more than the 131072 bytes")
            && out.stderr.contains("MAX_ARG_STRLEN"),
        "{out}"
    );
    assert!(!out.stderr.contains("mpiexec"), "{out}");
}
