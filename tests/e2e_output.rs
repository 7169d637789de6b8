//! The output and exit-code flags of mpirun under the local launcher, with real ranks in a real
//! image run as the test user: per-rank output files (hydra's patterns and Open MPI's
//! `--output-filename`), `--merge-stderr-to-stdout`, `--timestamp-output`,
//! `-print-all-exitcodes` and `--display-map`.

mod common;

use std::time::Duration;

use common::*;

fn cmpirun() -> TuserCommand {
    TuserCommand::cmpirun()
        .env("CMPIRUN_KILL_GRACE", "2")
        .timeout(Duration::from_secs(120))
}

/// `cmpirun -n 2 FLAGS mpich4 /bin/sh -c SCRIPT`.
fn run_sh(flags: &[&str], script: &str) -> RunOutput {
    cmpirun()
        .args(["-n", "2"])
        .args(flags)
        .arg(staged_image("mpich4"))
        .args(["/bin/sh", "-c", script])
        .run()
}

const OUT_AND_ERR: &str = "echo out $PMI_RANK; echo err $PMI_RANK >&2; echo out2 $PMI_RANK";

#[test]
fn hydra_patterns_write_one_file_per_rank_and_stream() {
    let _serial = exclusive();
    let dir = TuserDir::new();
    let d = dir.path().display();
    let out = run_sh(
        &[
            "-outfile-pattern",
            &format!("{d}/sub/out.%r"),
            "-errfile-pattern",
            &format!("{d}/err.%r.%p%%"),
            "-l",
        ],
        OUT_AND_ERR,
    );
    out.assert_success();
    assert!(
        !out.stdout.contains("out"),
        "nothing on the terminal: {out}"
    );
    assert!(
        !out.stderr.contains("err "),
        "nothing on the terminal: {out}"
    );
    for r in 0..2 {
        let stdout = std::fs::read_to_string(dir.path().join(format!("sub/out.{r}"))).unwrap();
        assert_eq!(stdout, format!("[{r}] out {r}\n[{r}] out2 {r}\n"));
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        let stderr = std::fs::read_to_string(dir.path().join(format!("err.{r}.0%")))
            .unwrap_or_else(|e| panic!("{e}: {files:?}"));
        assert_eq!(stderr, format!("[{r}] err {r}\n"));
    }
    // One pattern for both streams: one file per rank with both.
    let both = format!("{d}/both.%r");
    let out = run_sh(
        &["-outfile-pattern", &both, "-errfile-pattern", &both],
        OUT_AND_ERR,
    );
    out.assert_success();
    let text = std::fs::read_to_string(dir.path().join("both.1")).unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
}

#[test]
fn open_mpi_output_filename_and_merged_stderr() {
    let _serial = exclusive();
    let dir = TuserDir::new();
    let d = dir.path().display().to_string();
    let out = run_sh(&["--output-filename", &d], OUT_AND_ERR);
    out.assert_success();
    for r in 0..2 {
        let rank_dir = dir.path().join(format!("1/rank.{r}"));
        let stdout = std::fs::read_to_string(rank_dir.join("stdout")).unwrap();
        assert_eq!(stdout, format!("out {r}\nout2 {r}\n"));
        let stderr = std::fs::read_to_string(rank_dir.join("stderr")).unwrap();
        assert_eq!(stderr, format!("err {r}\n"));
    }
    // 10 ranks: Open MPI 4.1 pads the rank to the digits of the job's size (rank.00 … rank.09).
    let out = cmpirun()
        .args(["-n", "10", "--output-filename", &format!("{d}/ten:nocopy")])
        .arg(staged_image("mpich4"))
        .args(["/bin/sh", "-c", "echo $PMI_RANK"])
        .run();
    out.assert_success();
    let mut names: Vec<String> = std::fs::read_dir(dir.path().join("ten/1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let want: Vec<String> = (0..10).map(|r| format!("rank.{r:02}")).collect();
    assert_eq!(names, want, "{out}");
    let seven = std::fs::read_to_string(dir.path().join("ten/1/rank.07/stdout")).unwrap();
    assert_eq!(seven, "7\n");
    // Merged: standard error in standard output, in the order the rank wrote them.
    let out = run_sh(&["--merge-stderr-to-stdout", "-l"], OUT_AND_ERR);
    out.assert_success();
    assert!(!out.stderr.contains("err "), "{out}");
    for r in 0..2 {
        let lines: Vec<&str> = out
            .stdout
            .lines()
            .filter(|l| l.starts_with(&format!("[{r}] ")))
            .collect();
        assert_eq!(
            lines,
            [
                format!("[{r}] out {r}"),
                format!("[{r}] err {r}"),
                format!("[{r}] out2 {r}")
            ],
            "{out}"
        );
    }
    // A file that cannot be made is an error naming it, before any rank starts.
    let out = run_sh(&["-outfile-pattern", "/proc/nope/out.%r"], "true");
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("/proc/nope/out.0"), "{out}");
}

#[test]
fn timestamps_exit_codes_and_the_map() {
    let _serial = exclusive();
    let out = run_sh(
        &[
            "--timestamp-output",
            "--tag-output",
            "-print-all-exitcodes",
            "--display-map",
        ],
        "echo hi; exit $((PMI_RANK * 3))",
    );
    assert_eq!(out.code(), Some(3), "{out}");
    // Open MPI's form, C's ctime in local time: Sun Dec  6 17:15:58 2026[1,0]<stdout>:hi
    let line = out
        .stdout
        .lines()
        .find(|l| l.ends_with("[1,0]<stdout>:hi"))
        .unwrap_or_else(|| panic!("{out}"));
    let stamp = &line[..line.len() - "[1,0]<stdout>:hi".len()];
    let words: Vec<&str> = stamp.split_whitespace().collect();
    assert!(
        stamp.len() == 24
            && words.len() == 5
            && words[3].len() == 8
            && words[4].parse::<u32>().is_ok_and(|y| y >= 2024),
        "{line}"
    );
    assert!(
        out.stderr
            .contains("cmpirun: rank 0 exited with status 0\n")
            && out
                .stderr
                .contains("cmpirun: rank 1 exited with status 3\n"),
        "{out}"
    );
    assert!(
        out.stderr
            .contains("layout: 2 rank(s) on 1 node(s), block mapping")
            && out.stderr.contains(": ranks 0-1"),
        "{out}"
    );
}

/// cmpirun's own log lines (tracing's level word first), not the ranks' output.
fn log_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| {
            let w = l.trim_start();
            ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"]
                .iter()
                .any(|lvl| w.starts_with(lvl))
        })
        .collect()
}

#[test]
fn verbosity_levels_and_warned_checks_at_launch() {
    let _serial = exclusive();
    // -v: the decisions in a few lines.
    let out = run_sh(&["-v"], "true");
    out.assert_success();
    let lines = log_lines(&out.stderr);
    for what in [
        "profile generic: ",
        "launcher local (",
        "mount ",
        "injected: ",
        "checks: ",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(&format!("INFO {what}"))),
            "{what}: {out}"
        );
    }
    assert!(lines.len() <= 8, "a few lines: {out}");
    // -vv: cmpirun's own steps, no FUSE request and no image reader chatter.
    let out = run_sh(&["-vv"], "true");
    out.assert_success();
    let lines = log_lines(&out.stderr);
    assert!(lines.iter().any(|l| l.contains("rank 1 started")), "{out}");
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("FUSE(") || l.contains("Reading Inodes")),
        "{out}"
    );
    // -vvv: everything, the FUSE server's requests too.
    let out = run_sh(&["-vvv"], "true");
    out.assert_success();
    assert!(out.stderr.contains("FUSE("), "{out}");

    // A check that only warns is shown when launching, not only by --dry-run.
    let dir = TuserDir::new();
    let profile = dir.path().join("warny.yaml");
    std::fs::write(
        &profile,
        "name: warny\nextends: generic\nfabric:\n  devices: [/dev/cmpirun-no-such-device]\n",
    )
    .unwrap();
    let out = run_sh(&["--profile", profile.to_str().unwrap()], "true");
    out.assert_success();
    let warned: Vec<&str> = log_lines(&out.stderr)
        .into_iter()
        .filter(|l| l.contains("fabric-device"))
        .collect();
    assert_eq!(warned.len(), 1, "{out}");
    assert!(warned[0].contains("WARN") && warned[0].contains("/dev/cmpirun-no-such-device"));
}

#[test]
fn under_hydra_the_files_and_exit_codes_are_hydra_s() {
    let _serial = exclusive();
    runtime_dir();
    let dir = TuserDir::new();
    let hosts = hostfile(dir.path(), 2);
    let pattern = format!("{}/out.%r", dir.path().display());
    let out = hydra_cmpirun(&hosts, 2)
        .timeout(Duration::from_secs(120))
        .args(["-outfile-pattern", &pattern, "-print-all-exitcodes"])
        .arg(staged_image("mpich4"))
        .args(["/bin/sh", "-c", "echo hi $PMI_RANK"])
        .run();
    out.assert_success();
    for r in 0..2 {
        let text = std::fs::read_to_string(dir.path().join(format!("out.{r}"))).unwrap();
        assert_eq!(text, format!("hi {r}\n"), "{out}");
    }
    assert!(
        out.stdout.contains("Exit codes:") || out.stderr.contains("Exit codes:"),
        "{out}"
    );
}
