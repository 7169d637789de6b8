//! `cmpirun image verify` and `image sign` against the SIF reference implementation's signed
//! fixtures and the keys that made them: each verifies with its key; each fails after one flipped
//! byte in a signed object, a descriptor or the header, and with the wrong key; signing an
//! unsigned fixture with the reference's keys gives the reference's signed file byte for byte.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cmpirun::image::sif;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sif")
}

fn key(name: &str) -> PathBuf {
    fixtures().join("keys").join(name)
}

fn cmpirun<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cmpirun"))
        .args(args)
        .output()
        .expect("run cmpirun")
}

/// `image verify IMAGE ARGS --json`: the exit status and the report.
fn verify(image: &Path, args: &[&Path]) -> (i32, Value, String) {
    verify_with(image, args, &[])
}

fn verify_with(image: &Path, keys: &[&Path], flags: &[&str]) -> (i32, Value, String) {
    let mut a: Vec<std::ffi::OsString> = vec!["image".into(), "verify".into(), image.into()];
    for k in keys {
        let flag = if k.extension().is_some_and(|e| e == "pem") {
            "--key"
        } else {
            "--keyring"
        };
        a.push(flag.into());
        a.push(k.into());
    }
    a.extend(flags.iter().map(Into::into));
    a.push("--json".into());
    let out = cmpirun(&a);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}); stderr: {stderr}"));
    (out.status.code().unwrap_or(-1), report, stderr)
}

/// A writable copy of fixture `name` in `dir`.
fn copy(dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    fs::copy(fixtures().join(name), &to).unwrap();
    let mut perm = fs::metadata(&to).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    fs::set_permissions(&to, perm).unwrap();
    to
}

fn flip(path: &Path, offset: u64) {
    let mut b = fs::read(path).unwrap();
    b[offset as usize] ^= 0x01;
    fs::write(path, b).unwrap();
}

fn parsed(path: &Path) -> sif::SifFile {
    sif::read(&mut fs::File::open(path).unwrap()).unwrap()
}

fn signatures(r: &Value) -> &Vec<Value> {
    r["signatures"].as_array().unwrap()
}

const DSSE: &[&str] = &["one-group-signed-dsse.sif", "two-groups-signed-dsse.sif"];
const PGP: &[&str] = &["one-group-signed-pgp.sif", "two-groups-signed-pgp.sif"];
const ED25519_ID: &str = "SHA256:x6l8ZblpSSXGaPMCzySedWg88BwIFcz8jlPb6el0mFs";
const RSA_ID: &str = "SHA256:BhCwr7qZulYcOMSl2Jt2DuYHxHNnN6th4NdMqR/PGa4";
const PGP_FP: &str = "12045C8C0B1004D058DE4BEDA20C27EE7FF7BA84";

/// Each signature of a verified report covers its whole group, made by `by`.
fn assert_verified(image: &str, code: i32, r: &Value, stderr: &str, by: &str) {
    assert_eq!(code, 0, "{image}: {stderr}\n{r:#}");
    assert_eq!(r["verified"], true, "{image}");
    for s in signatures(r) {
        assert_eq!(s["status"], "verified", "{image}: {s:#}");
        assert_eq!(s["covers_header"], true, "{image}");
        assert_eq!(s["verified_by"][0]["fingerprint"], by, "{image}");
    }
    for g in r["groups"].as_array().unwrap() {
        assert!(
            g["uncovered"].as_array().unwrap().is_empty(),
            "{image}: {g:#}"
        );
    }
}

#[test]
fn dsse_fixtures_verify_with_either_key() {
    for image in DSSE {
        for (k, id) in [
            ("ed25519-public.pem", ED25519_ID),
            ("rsa-public.pem", RSA_ID),
        ] {
            let (code, r, err) = verify(&fixtures().join(image), &[&key(k)]);
            assert_verified(image, code, &r, &err, id);
            // The envelope names both keys; only the given one is reported as the signer.
            let s = &signatures(&r)[0];
            assert_eq!(s["format"], "dsse");
            assert_eq!(
                s["claimed_signers"],
                serde_json::json!([ED25519_ID, RSA_ID])
            );
            assert_eq!(s["verified_by"].as_array().unwrap().len(), 1);
        }
    }
    // Objects 1 and 2 are group 1; the two-group image's object 3 is group 2, with its own
    // signature.
    let (_, r, _) = verify(&fixtures().join(DSSE[1]), &[&key("ed25519-public.pem")]);
    let covers: Vec<&Value> = signatures(&r).iter().map(|s| &s["covers"]).collect();
    assert_eq!(
        covers,
        [&serde_json::json!([1, 2]), &serde_json::json!([3])]
    );
}

#[test]
fn pgp_fixtures_verify_with_the_keyring_armored_or_binary() {
    for image in PGP {
        for ring in ["public.gpg", "private.asc"] {
            let (code, r, err) = verify(&fixtures().join(image), &[&key(ring)]);
            assert_verified(image, code, &r, &err, PGP_FP);
            assert_eq!(signatures(&r)[0]["format"], "pgp");
        }
    }
}

#[test]
fn legacy_signatures_are_reported_and_trusted_only_with_legacy() {
    let ring = key("public.gpg");
    for image in [
        "one-group-signed-legacy.sif",
        "one-group-signed-legacy-group.sif",
        "one-group-signed-legacy-all.sif",
        "two-groups-signed-legacy.sif",
        "two-groups-signed-legacy-group.sif",
        "two-groups-signed-legacy-all.sif",
    ] {
        let path = fixtures().join(image);
        let (code, r, err) = verify(&path, &[&ring]);
        assert_eq!(code, 2, "{image}");
        assert!(
            err.contains("not trusted without --legacy"),
            "{image}: {err}"
        );
        for s in signatures(&r) {
            assert_eq!(s["format"], "legacy", "{image}");
            assert_eq!(s["status"], "untrusted", "{image}");
            assert_eq!(s["claimed_signers"], serde_json::json!([PGP_FP]), "{image}");
        }
        let (code, r, err) = verify_with(&path, &[&ring], &["--legacy"]);
        for s in signatures(&r) {
            assert_eq!(s["status"], "verified", "{image}: {s:#}");
            assert_eq!(s["covers_header"], false, "{image}");
            assert_eq!(s["verified_by"][0]["fingerprint"], PGP_FP);
        }
        // The whole image verifies only where the legacy signatures cover every object: the
        // reference's legacy fixtures sign object 2 alone, group 1, or each object of group 1.
        let whole = image.starts_with("one-group") && !image.ends_with("legacy.sif");
        assert_eq!(code == 0, whole, "{image}: {err}\n{r:#}");
        if !whole {
            assert!(
                err.contains("not covered by a verified signature"),
                "{image}: {err}"
            );
        }
    }
}

/// Offsets to flip in a signed fixture: a byte of the primary partition, a byte of its
/// descriptor's name, a byte of the header's image ID.
fn tamper_offsets(path: &Path) -> [(&'static str, u64); 3] {
    let s = parsed(path);
    let primary = s.primary_partitions()[0].clone();
    let descriptor =
        s.header.descriptors_offset as u64 + u64::from(primary.slot) * sif::DESCRIPTOR_LEN + 73;
    [
        ("object", primary.offset as u64 + primary.size as u64 / 2),
        ("descriptor", descriptor),
        ("header", 48),
    ]
}

#[test]
fn one_flipped_byte_anywhere_signed_fails_dsse_and_pgp() {
    let dir = tempfile::tempdir().unwrap();
    for (images, k) in [(DSSE, key("ed25519-public.pem")), (PGP, key("public.gpg"))] {
        for image in images {
            for (what, at) in tamper_offsets(&fixtures().join(image)) {
                let path = copy(dir.path(), image);
                flip(&path, at);
                let (code, r, err) = verify(&path, &[&k]);
                assert_eq!(code, 2, "{image} with a flipped {what} byte verified");
                assert_eq!(r["verified"], false);
                let s = &signatures(&r)[0];
                assert_eq!(s["status"], "failed", "{image} {what}: {s:#}");
                let reason = s["reason"].as_str().unwrap();
                let expect = match what {
                    "object" => "object 2 (FS) changed",
                    "descriptor" => "the descriptor of object 2 (FS) changed",
                    _ => "the header changed",
                };
                assert!(reason.contains(expect), "{image} {what}: {reason}");
                assert!(err.contains(expect), "{image} {what}: {err}");
            }
        }
    }
}

#[test]
fn one_flipped_object_byte_fails_legacy_which_does_not_cover_descriptors_or_header() {
    let dir = tempfile::tempdir().unwrap();
    let image = "one-group-signed-legacy-group.sif";
    for (what, at) in tamper_offsets(&fixtures().join(image)) {
        let path = copy(dir.path(), image);
        flip(&path, at);
        let (code, r, _) = verify_with(&path, &[&key("public.gpg")], &["--legacy"]);
        let s = &signatures(&r)[0];
        if what == "object" {
            assert_eq!(code, 2);
            assert_eq!(s["status"], "failed");
            assert!(
                s["reason"]
                    .as_str()
                    .unwrap()
                    .contains("the bytes of object(s) 1, 2 changed")
            );
        } else {
            // What docs/images.md says: a legacy signature does not protect these.
            assert_eq!(
                (code, &s["status"]),
                (0, &Value::from("verified")),
                "{what}"
            );
        }
    }
    // A descriptor field that moves the object changes the bytes the digest reads.
    let path = copy(dir.path(), image);
    let s = parsed(&path);
    let d = s.primary_partitions()[0];
    let offset_field =
        s.header.descriptors_offset as u64 + u64::from(d.slot) * sif::DESCRIPTOR_LEN + 17;
    flip(&path, offset_field + 1);
    let (code, r, _) = verify_with(&path, &[&key("public.gpg")], &["--legacy"]);
    assert_eq!(code, 2, "{r:#}");
}

#[test]
fn the_wrong_key_verifies_nothing() {
    let cases: [(&str, PathBuf, &[&str]); 3] = [
        (DSSE[0], key("ecdsa-public.pem"), &[]),
        (PGP[0], key("other-public.asc"), &[]),
        (
            "one-group-signed-legacy-group.sif",
            key("other-public.asc"),
            &["--legacy"],
        ),
    ];
    for (image, k, flags) in cases {
        let (code, r, err) = verify_with(&fixtures().join(image), &[&k], flags);
        assert_eq!(code, 2, "{image}");
        let s = &signatures(&r)[0];
        assert_eq!(s["status"], "unverified", "{image}: {s:#}");
        assert!(s["verified_by"].as_array().unwrap().is_empty());
        assert!(err.contains("made it"), "{image}: {err}");
    }
    // Keys of the other format are no key at all for a signature.
    let (code, r, err) = verify(&fixtures().join(DSSE[0]), &[&key("public.gpg")]);
    assert_eq!(
        (code, &signatures(&r)[0]["status"]),
        (2, &Value::from("no-key")),
        "{err}"
    );
    assert!(err.contains("--key PEM"), "{err}");
}

#[test]
fn unsigned_images_and_bad_keys_are_refused_with_the_reason() {
    let (code, r, err) = verify(
        &fixtures().join("one-group.sif"),
        &[&key("ed25519-public.pem")],
    );
    assert_eq!(code, 2);
    assert!(signatures(&r).is_empty());
    assert!(err.contains("object group 1 (objects 1, 2) is not covered by a verified signature (no signature covers them)"), "{err}");

    let out = cmpirun(&[
        "image".as_ref(),
        "verify".as_ref(),
        fixtures().join(DSSE[0]).as_os_str(),
        "--key".as_ref(),
        key("ed25519-private.pem").as_os_str(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains("ed25519-private.pem: not a PEM public key"),
        "{err}"
    );

    let out = cmpirun(&[
        "image".as_ref(),
        "verify".as_ref(),
        key("rsa-public.pem").as_os_str(),
        "--key".as_ref(),
        key("rsa-public.pem").as_os_str(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains("rsa-public.pem: truncated") || err.contains("not a SIF file"),
        "{err}"
    );
}

#[test]
fn signing_the_unsigned_fixtures_gives_the_reference_signed_files() {
    let dir = tempfile::tempdir().unwrap();
    for (unsigned, signed) in [("one-group.sif", DSSE[0]), ("two-groups.sif", DSSE[1])] {
        let path = copy(dir.path(), unsigned);
        let out = cmpirun(&[
            "image".as_ref(),
            "sign".as_ref(),
            path.as_os_str(),
            "--key".as_ref(),
            key("ed25519-private.pem").as_os_str(),
            "--key".as_ref(),
            key("rsa-private.pem").as_os_str(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            fs::read(&path).unwrap() == fs::read(fixtures().join(signed)).unwrap(),
            "{unsigned} signed differs from the reference's {signed}"
        );
    }
}

#[test]
fn sign_then_verify_round_trips_with_each_key_kind_and_inspect_reads_the_result() {
    let dir = tempfile::tempdir().unwrap();
    for (private, public, wrong) in [
        (
            "ecdsa-private.pem",
            "ecdsa-public.pem",
            "ed25519-public.pem",
        ),
        (
            "ed25519-private.pem",
            "ed25519-public.pem",
            "rsa-public.pem",
        ),
        ("rsa-private.pem", "rsa-public.pem", "ecdsa-public.pem"),
        ("p384-private.pem", "p384-public.pem", "ecdsa-public.pem"),
    ] {
        let path = copy(dir.path(), "two-groups.sif");
        let out = cmpirun(&[
            "image".as_ref(),
            "sign".as_ref(),
            path.as_os_str(),
            "--key".as_ref(),
            key(private).as_os_str(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (code, r, err) = verify(&path, &[&key(public)]);
        assert_eq!(code, 0, "{private}: {err}");
        assert_eq!(r["verified"], true);
        let (code, _, _) = verify(&path, &[&key(wrong)]);
        assert_eq!(code, 2, "{private} verified with {wrong}");

        // The layout is the reference's: signature objects 4 and 5, in no group, linked to
        // groups 1 and 2, appended without alignment; the same table the reference tool lists
        // for its signed two-group fixture, but for the positions.
        let out = cmpirun(&["image".as_ref(), "inspect".as_ref(), path.as_os_str()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let golden = fs::read_to_string(
            fixtures().join("siftool-golden/TestApp_List/TwoGroupsSignedPGP.golden"),
        )
        .unwrap();
        let shape = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
                .map(|l| {
                    let cols: Vec<&str> = l.split('|').map(str::trim).collect();
                    format!("{}|{}|{}|{}", cols[0], cols[1], cols[2], cols[4])
                })
                .collect()
        };
        let ours = shape(&text);
        assert_eq!(ours[..5], shape(&golden)[..], "{text}");
        let s = parsed(&path);
        let sigs: Vec<&sif::Descriptor> = s.descriptors.iter().filter(|d| d.id >= 4).collect();
        assert_eq!(sigs[0].offset, 303_104);
        assert_eq!(sigs[1].offset, sigs[0].offset + sigs[0].size);
        assert_eq!(
            s.header.data_size,
            sigs[1].offset + sigs[1].size - s.header.data_offset
        );
        assert_eq!(s.header.descriptors_free, 43);
    }
}

#[test]
fn a_packed_image_can_be_signed_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir_all(tree.join("bin")).unwrap();
    fs::write(tree.join("bin/hello"), b"#!/bin/sh\necho hello\n").unwrap();
    let image = dir.path().join("packed.sif");
    let out = cmpirun(&[
        "image".as_ref(),
        "pack".as_ref(),
        tree.as_os_str(),
        "-o".as_ref(),
        image.as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cmpirun(&[
        "image".as_ref(),
        "sign".as_ref(),
        image.as_os_str(),
        "--key".as_ref(),
        key("ecdsa-private.pem").as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, r, err) = verify(&image, &[&key("ecdsa-public.pem")]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(signatures(&r)[0]["verified_by"][0]["kind"], "ecdsa-p256");
    // The signed image still launches' way in: its root filesystem is found as before.
    let loc = cmpirun::image::locate(&image).unwrap();
    assert_eq!(loc.kind, cmpirun::image::ImageKind::Sif);
}
