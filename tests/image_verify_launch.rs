//! The launch-time signature policy: under `--verify require` (or a profile's `verify: require`)
//! an unsigned image is refused on the front end, before any node mounts it, with exit 2 and a
//! message naming the image and why; a copy of a test image signed with a test key runs, as the
//! test user; `--dry-run` shows the check.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

fn keys() -> PathBuf {
    repo_root().join("tests/fixtures/sif/keys")
}

/// `dir/NAME`: a copy of `from` the test user can read.
fn give(dir: &Path, from: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    fs::copy(from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    chown_to_tuser(&to);
    to
}

fn cmpirun() -> TuserCommand {
    TuserCommand::cmpirun()
        .env("CMPIRUN_KILL_GRACE", "2")
        .timeout(Duration::from_secs(120))
}

/// `cmpirun --verify POLICY --verify-key KEY FLAGS -n N IMAGE hello`, as the test user.
fn launch(policy: &str, key: &Path, flags: &[&str], n: u32, image: &Path) -> RunOutput {
    cmpirun()
        .args(["--verify", policy, "--verify-key"])
        .arg(key)
        .args(flags)
        .args(["-n", &n.to_string()])
        .arg(image)
        .arg("/usr/local/bin/hello")
        .run()
}

#[test]
fn an_unsigned_image_is_refused_under_require_before_anything_is_mounted() {
    let _serial = exclusive();
    let before = Snapshot::take();
    let work = TuserDir::new();
    let key = give(work.path(), &keys().join("ed25519-public.pem"), "site.pem");
    let image = staged_image("mpich4");
    let out = launch("require", &key, &[], 2, &image);
    out.assert_code(2);
    let expected = format!(
        "image-signature: {}: not verified (--verify require)",
        image.display()
    );
    assert!(out.stderr.contains(&expected), "{out}");
    assert!(out.stderr.contains("no signature covers them"), "{out}");
    assert!(!out.stdout.contains("hello"), "{out}");

    // The same from a profile, and a profile's key list without keys is refused as such.
    let profile = work.path().join("signed-only.yaml");
    fs::write(
        &profile,
        format!(
            "name: signed-only\nverify: require\nverify_keys: [{}]\n",
            key.display()
        ),
    )
    .unwrap();
    chown_to_tuser(&profile);
    let out = cmpirun()
        .arg("--profile")
        .arg(&profile)
        .args(["-n", "1"])
        .arg(&image)
        .arg("/usr/local/bin/hello")
        .run();
    out.assert_code(2);
    assert!(out.stderr.contains(&expected), "{out}");
    let out = cmpirun()
        .args(["--verify", "require", "-n", "1"])
        .arg(&image)
        .arg("/usr/local/bin/hello")
        .run();
    out.assert_code(2);
    assert!(out.stderr.contains("no key to verify with"), "{out}");
    assert_no_leftovers(&before, &[]);
}

#[test]
fn a_signed_copy_runs_under_require_and_dry_run_shows_the_check() {
    let _serial = exclusive();
    let before = Snapshot::take();
    let work = TuserDir::new();
    let key = give(work.path(), &keys().join("ecdsa-public.pem"), "site.pem");
    let image = give(work.path(), &image("mpich4"), "signed.sif");
    let signed = std::process::Command::new(env!("CARGO_BIN_EXE_cmpirun"))
        .args(["image", "sign"])
        .arg(&image)
        .arg("--key")
        .arg(keys().join("ecdsa-private.pem"))
        .output()
        .unwrap();
    assert!(
        signed.status.success(),
        "{}",
        String::from_utf8_lossy(&signed.stderr)
    );

    let out = launch("require", &key, &["--dry-run"], 2, &image);
    out.assert_success();
    assert!(
        out.stdout.contains(&format!(
            "pass    image-signature: {}: signed by SHA256:",
            image.display()
        )),
        "{out}"
    );

    assert!(!out.stdout.contains("by an earlier launch"), "{out}");

    // Once the image has not changed for a second, a verification is kept: the next launch
    // takes it from the cache instead of hashing the image again.
    std::thread::sleep(Duration::from_millis(1100));
    let out = launch("require", &key, &["--dry-run"], 2, &image);
    out.assert_success();
    assert!(!out.stdout.contains("by an earlier launch"), "{out}");
    let out = launch("require", &key, &[], 2, &image);
    out.assert_success();
    assert!(out.stdout.contains("hello"), "{out}");
    let out = launch("require", &key, &["--dry-run"], 2, &image);
    assert!(
        out.stdout.contains(
            "every object verified (by an earlier launch: the image file and the keys are \
             unchanged)"
        ),
        "{out}"
    );
    // A byte of the image changed: hashed again, and refused.
    let original = give(work.path(), &image, "original.sif");
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&image).unwrap();
        let at = fs::metadata(&image).unwrap().len() / 2;
        let mut byte = [0u8; 1];
        fs::File::open(&original)
            .unwrap()
            .read_exact_at(&mut byte, at)
            .unwrap();
        f.write_all_at(&[byte[0] ^ 0xff], at).unwrap();
    }
    let out = launch("require", &key, &[], 1, &image);
    out.assert_code(2);
    assert!(
        out.stderr.contains("not verified (--verify require)"),
        "{out}"
    );
    fs::copy(&original, &image).unwrap();

    // Signed by a key the launch does not accept: refused, or launched with a warning.
    let other = give(work.path(), &keys().join("ed25519-public.pem"), "other.pem");
    let out = launch("require", &other, &[], 1, &image);
    out.assert_code(2);
    assert!(out.stderr.contains("none of the given keys"), "{out}");
    let out = launch("warn", &other, &["--dry-run"], 1, &image);
    out.assert_success();
    assert!(out.stdout.contains("warn    image-signature:"), "{out}");
    assert_no_leftovers(&before, &[]);
}
