//! `cmpirun exec` runs programs from every test image with every image mount backend, as the test
//! user's own uid, in the working directory, with the image's environment scripts applied, and
//! leaves nothing behind.

mod common;

use common::*;

const BACKENDS: [&str; 3] = ["fuse", "squashfuse", "extract"];

#[test]
fn every_image_with_every_backend() {
    let _serial = exclusive();
    let user = tuser();
    let work = TuserDir::new();
    // The extract backend's cache goes to a folder the test removes, not the user's home.
    let cache = TuserDir::new();
    for name in TEST_IMAGES {
        let image = staged_image(name);
        for backend in BACKENDS {
            let before = Snapshot::take();
            let out = TuserCommand::cmpirun()
                .args(["exec", "--image-mount", backend])
                .arg(&image)
                .args([
                    "/bin/sh",
                    "-c",
                    "ls -l / >/dev/null; id -u; id -g; pwd; echo IMAGE=$CMPIRUN_TEST_IMAGE; hello",
                ])
                .current_dir(work.path())
                .env("XDG_CACHE_HOME", cache.path())
                .run();
            let what = format!("{name} with --image-mount {backend}");
            assert!(out.success(), "{what}: {out:?}");
            // `ls -l` asks for xattrs, which the image server leaves to fuser's default
            // answer; fuser's warning about that must not reach the user.
            assert!(
                !out.stderr.contains("Not Implemented"),
                "{what}: {}",
                out.stderr
            );
            let lines: Vec<&str> = out.stdout.lines().collect();
            assert_eq!(lines.len(), 5, "{what}: {}", out.stdout);
            assert_eq!(lines[0], user.uid.to_string(), "{what}");
            assert_eq!(lines[1], user.gid.to_string(), "{what}");
            assert_eq!(lines[2], work.path().to_str().unwrap(), "{what}");
            assert_eq!(
                lines[3],
                format!("IMAGE={name}"),
                "{what}: environment scripts"
            );
            assert!(
                lines[4].starts_with("hello: rank=0 size=1"),
                "{what}: {}",
                lines[4]
            );
            assert_no_leftovers(&before, &[out.tag.as_str()]);
        }
    }
}

#[test]
fn mpich5_path_comes_from_the_image_scripts() {
    let work = TuserDir::new();
    let out = TuserCommand::cmpirun()
        .arg("exec")
        .arg(staged_image("mpich5"))
        .args([
            "/bin/sh",
            "-c",
            "echo $PATH; command -v mpichversion || true",
        ])
        .current_dir(work.path())
        .run();
    out.assert_success();
    assert!(out.stdout.starts_with("/opt/mpich5/bin:"), "{}", out.stdout);
}
