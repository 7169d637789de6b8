//! `cmpirun image inspect` agrees with the reference tool (`siftool header`, `list`, `info`) on
//! every field of every golden output, for every reference fixture.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cmpirun::image::sif::format_time;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sif")
}

/// Golden name → fixture file.
const FIXTURES: &[(&str, &str)] = &[
    ("Empty", "empty.sif"),
    ("EmptyID", "empty-id.sif"),
    ("EmptyLaunchScript", "empty-launch-script.sif"),
    ("OneGroup", "one-group.sif"),
    ("OneGroupSignedLegacy", "one-group-signed-legacy.sif"),
    ("OneGroupSignedLegacyAll", "one-group-signed-legacy-all.sif"),
    (
        "OneGroupSignedLegacyGroup",
        "one-group-signed-legacy-group.sif",
    ),
    ("OneGroupSignedPGP", "one-group-signed-pgp.sif"),
    ("OneObjectCryptMessage", "one-object-crypt-message.sif"),
    ("OneObjectGenericJSON", "one-object-generic-json.sif"),
    ("OneObjectOCIBlob", "one-object-oci-blob.sif"),
    ("OneObjectOCIRootIndex", "one-object-oci-root-index.sif"),
    ("OneObjectSBOM", "one-object-sbom.sif"),
    ("OneObjectTime", "one-object-time.sif"),
    ("TwoGroups", "two-groups.sif"),
    ("TwoGroupsSignedLegacy", "two-groups-signed-legacy.sif"),
    (
        "TwoGroupsSignedLegacyAll",
        "two-groups-signed-legacy-all.sif",
    ),
    (
        "TwoGroupsSignedLegacyGroup",
        "two-groups-signed-legacy-group.sif",
    ),
    ("TwoGroupsSignedPGP", "two-groups-signed-pgp.sif"),
];

/// `siftool info` golden → (fixture, object ID).
const INFO: &[(&str, &str, u64)] = &[
    ("CryptMessage", "one-object-crypt-message.sif", 1),
    ("DataPartitionEXT3", "two-groups.sif", 3),
    ("DataPartitionRaw", "one-group.sif", 1),
    ("DataPartitionSquashFS", "one-group.sif", 2),
    ("DataSignature", "two-groups-signed-pgp.sif", 4),
    ("GenericJSON", "one-object-generic-json.sif", 1),
    ("OCIBlob", "one-object-oci-blob.sif", 1),
    ("OCIRootIndex", "one-object-oci-root-index.sif", 1),
    ("SBOM", "one-object-sbom.sif", 1),
    ("Time", "one-object-time.sif", 1),
];

fn inspect(file: &str, json: bool) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cmpirun"));
    cmd.args(["image", "inspect"]).arg(fixtures().join(file));
    if json {
        cmd.arg("--json");
    }
    cmd.output().unwrap()
}

fn golden(kind: &str, name: &str) -> String {
    let path = fixtures().join(format!("siftool-golden/TestApp_{kind}/{name}.golden"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `Label:   value` lines of a golden file.
fn fields(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn human(n: i64) -> String {
    cmpirun::image::sif::human_size(n as u64)
}

#[test]
fn text_output_contains_the_golden_header_and_list_verbatim() {
    for (name, file) in FIXTURES {
        let out = inspect(file, false);
        let stdout = String::from_utf8(out.stdout).unwrap();
        for kind in ["Header", "List"] {
            let g = golden(kind, name);
            assert!(
                stdout.contains(&g),
                "{file}: `siftool {}` block missing.\n--- golden\n{g}--- ours\n{stdout}",
                kind.to_lowercase()
            );
        }
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    }
}

#[test]
fn json_header_agrees_with_every_golden_header_field() {
    for (name, file) in FIXTURES {
        let j = json_of(&inspect(file, true));
        let s = &j["sif"];
        for (label, value) in fields(&golden("Header", name)) {
            let ours = match label.as_str() {
                "Launch Script" => s["launch_script"].as_str().unwrap().to_owned(),
                "Version" => s["version"].as_str().unwrap().to_owned(),
                "Primary Architecture" => s["primary_arch"].as_str().unwrap().to_owned(),
                "ID" => s["id"].as_str().unwrap().to_owned(),
                "Created At" => format_time(s["created_at"].as_i64().unwrap()),
                "Modified At" => format_time(s["modified_at"].as_i64().unwrap()),
                "Descriptors Free" => s["descriptors_free"].to_string(),
                "Descriptors Total" => s["descriptors_total"].to_string(),
                "Descriptors Offset" => s["descriptors_offset"].to_string(),
                "Descriptors Size" => human(s["descriptors_size"].as_i64().unwrap()),
                "Data Offset" => s["data_offset"].to_string(),
                "Data Size" => human(s["data_size"].as_i64().unwrap()),
                other => panic!("{name}: golden field {other:?} not checked"),
            };
            assert_eq!(ours, value, "{file}: {label}");
        }
    }
}

#[test]
fn json_objects_agree_with_every_golden_list_row() {
    for (name, file) in FIXTURES {
        let j = json_of(&inspect(file, true));
        let objects = j["sif"]["objects"].as_array().unwrap();
        let list = golden("List", name);
        let rows: Vec<&str> = list.lines().skip(3).collect();
        assert_eq!(objects.len(), rows.len(), "{file}: object count");
        for (o, row) in objects.iter().zip(rows) {
            let cols: Vec<&str> = row.split('|').map(str::trim).collect();
            assert_eq!(o["id"].to_string(), cols[0], "{file}: id");
            let group = o["group"].as_u64().map_or("NONE".into(), |g| g.to_string());
            assert_eq!(group, cols[1], "{file}: group");
            let link = match (o["linked_object"].as_u64(), o["linked_group"].as_u64()) {
                (Some(id), _) => id.to_string(),
                (_, Some(g)) => format!("{g}   (G)"),
                _ => "NONE".into(),
            };
            assert_eq!(link, cols[2], "{file}: link");
            let (start, size) = (o["offset"].as_i64().unwrap(), o["size"].as_i64().unwrap());
            assert_eq!(
                format!("{start}-{}", start + size),
                cols[3],
                "{file}: position"
            );
            assert_eq!(o["type_label"].as_str().unwrap(), cols[4], "{file}: type");
        }
    }
}

#[test]
fn json_objects_agree_with_every_golden_info_field() {
    for (name, file, id) in INFO {
        let j = json_of(&inspect(file, true));
        let o = j["sif"]["objects"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["id"].as_u64() == Some(*id))
            .unwrap_or_else(|| panic!("{file}: no object {id}"));
        let str_of = |k: &str| o[k].as_str().unwrap_or_default().to_owned();
        for (label, value) in fields(&golden("Info", name)) {
            let ours = match label.as_str() {
                "Data Type" => str_of("data_type"),
                "ID" => o["id"].to_string(),
                "Group ID" => o["group"].as_u64().map_or("NONE".into(), |g| g.to_string()),
                "Linked ID" => match (o["linked_object"].as_u64(), o["linked_group"].as_u64()) {
                    (Some(id), _) => id.to_string(),
                    (_, Some(g)) => format!("{g} (G)"),
                    _ => "NONE".into(),
                },
                "Offset" => o["offset"].to_string(),
                "Size" => o["size"].to_string(),
                "Filesystem Type" => str_of("fs_type"),
                "Partition Type" => str_of("part_type"),
                "Architecture" => str_of("arch"),
                "Hash Type" => str_of("hash_type"),
                "Entity" => str_of("entity"),
                "Format Type" => str_of("format_type"),
                "Message Type" => str_of("message_type"),
                "Format" => str_of("sbom_format"),
                "Digest" => str_of("digest"),
                "Name" => str_of("name"),
                "Created At" => format_time(o["created_at"].as_i64().unwrap()),
                "Modified At" => format_time(o["modified_at"].as_i64().unwrap()),
                other => panic!("{name}: golden field {other:?} not checked"),
            };
            assert_eq!(ours, value, "{file} object {id}: {label}");
        }
    }
}

#[test]
fn every_fixture_parses_without_a_panic() {
    for entry in std::fs::read_dir(fixtures()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "sif") {
            continue;
        }
        let file = path.file_name().unwrap().to_str().unwrap();
        let out = inspect(file, true);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{file}: {stderr}");
        // Every fixture has a readable header and object table, even when it has no runnable
        // root filesystem (then the status is 2 and stderr says why in one line).
        let j = json_of(&out);
        assert_eq!(j["kind"], "sif", "{file}");
        match out.status.code() {
            Some(0) => assert!(j["root_filesystem"].is_object(), "{file}"),
            Some(2) => {
                assert_eq!(stderr.lines().count(), 1, "{file}: {stderr}");
                assert!(stderr.contains(file), "{file}: {stderr}");
            }
            other => panic!("{file}: status {other:?}: {stderr}"),
        }
    }
}

#[test]
fn primary_partition_facts_are_reported() {
    let j = json_of(&inspect("one-group.sif", true));
    let root = &j["root_filesystem"];
    assert_eq!(root["object_id"], 2);
    assert_eq!(root["offset"], 36864);
    assert_eq!(root["size"], 4096);
    assert_eq!(root["arch"], "386");
    assert_eq!(root["squashfs"]["compression"], "gzip");
    assert_eq!(root["squashfs"]["block_size"], 131072);
    assert_eq!(root["squashfs"]["version"], "4.0");
    assert_eq!(root["squashfs"]["inode_count"], 2);
}
