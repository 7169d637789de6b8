//! Members of one node instance share its user and mount namespaces, so one can read the other's
//! memory with `process_vm_readv` (the CMA path MPI uses); members of two instances cannot.

mod common;
#[path = "container/support.rs"]
mod support;

use std::time::Duration;

use common::*;

#[test]
fn members_of_one_instance_share_namespaces_and_cma() {
    let _serial = exclusive();
    let dir = TuserDir::new();
    let image = support::directory_image(dir.path());
    support::cma_helper(dir.path());
    let before = Snapshot::take();
    let key = format!("cma-test-{}", std::process::id());
    let exec = |key: Option<&str>, args: &[&str]| {
        let mut c = TuserCommand::cmpirun().arg("exec");
        if let Some(k) = key {
            c = c.args(["--instance-key", k]);
        }
        c.arg(&image).args(args).current_dir(dir.path())
    };

    let out_file = dir.path().join("served");
    let server = exec(Some(&key), &["./cma", "serve", "served"]).spawn();
    wait_for_file(&out_file, Duration::from_secs(30));
    let served = std::fs::read_to_string(&out_file).unwrap();
    let fields: Vec<&str> = served.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "{served}");
    let mut read_args = vec!["./cma", "read"];
    read_args.extend(&fields);

    // Same key: the same instance.
    let joined = exec(Some(&key), &read_args).run();
    joined.assert_success();
    assert_eq!(joined.stdout.trim(), "read: cma-secret-0123456789");
    let ns = exec(
        Some(&key),
        &[
            "/bin/sh",
            "-c",
            &format!(
                "readlink /proc/{}/ns/user /proc/{0}/ns/mnt /proc/self/ns/user /proc/self/ns/mnt",
                fields[0]
            ),
        ],
    )
    .run();
    ns.assert_success();
    let l: Vec<&str> = ns.stdout.lines().collect();
    assert_eq!((l[0], l[1]), (l[2], l[3]), "same user and mount namespace");

    // Another instance (another key, or none): sibling user namespaces, CMA refused.
    for key in [Some("cma-other"), None] {
        let other = exec(key, &read_args).run();
        assert_eq!(other.code(), Some(3), "{other:?}");
        assert_eq!(other.stdout.trim(), "error: EPERM");
    }

    std::fs::write(dir.path().join("served.stop"), "").unwrap();
    let served = server.wait();
    served.assert_success();
    assert_no_leftovers(
        &before,
        &[served.tag.as_str(), joined.tag.as_str(), ns.tag.as_str()],
    );
}

#[test]
fn a_bad_instance_key_is_a_usage_error() {
    let dir = TuserDir::new();
    let image = support::directory_image(dir.path());
    let out = TuserCommand::cmpirun()
        .args(["exec", "--instance-key", "../x"])
        .arg(&image)
        .arg("/bin/true")
        .run();
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("instance key"), "{}", out.stderr);
}
