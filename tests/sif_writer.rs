//! The SIF writer follows the reference layout exactly: rebuilding a reference image from its
//! own objects gives the same bytes.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use cmpirun::image::sif::{self, NewObject, ObjectData, WriteOptions};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sif")
        .join(name)
}

/// Rebuilds `name` from its own objects with the deterministic writer.
fn rebuild(name: &str) -> (Vec<u8>, Vec<u8>) {
    let original = std::fs::read(fixture(name)).unwrap();
    let parsed = sif::read(&mut Cursor::new(&original)).unwrap();
    let objects = parsed
        .descriptors
        .iter()
        .map(|d| NewObject {
            data_type: d.data_type,
            name: d.name(),
            extra: d.extra,
            group: d.group(),
            linked_id: d.linked_id,
            data: ObjectData::Bytes(&original[d.offset as usize..(d.offset + d.size) as usize]),
        })
        .collect();
    // The reference generator writes these fixtures without a launch script.
    let opts = WriteOptions {
        launch_script: parsed.header.launch_script(),
        ..WriteOptions::deterministic()
    };
    let mut out = Cursor::new(Vec::new());
    sif::write(&mut out, &opts, objects).unwrap();
    (original, out.into_inner())
}

#[test]
fn one_group_is_rebuilt_byte_for_byte() {
    let (original, rebuilt) = rebuild("one-group.sif");
    assert_eq!(rebuilt.len(), original.len());
    assert!(rebuilt == original, "rebuilt one-group.sif differs");
}

#[test]
fn two_groups_is_rebuilt_byte_for_byte() {
    let (original, rebuilt) = rebuild("two-groups.sif");
    assert!(rebuilt == original, "rebuilt two-groups.sif differs");
}

#[test]
fn empty_is_rebuilt_byte_for_byte() {
    let (original, rebuilt) = rebuild("empty.sif");
    assert!(rebuilt == original, "rebuilt empty.sif differs");
}

#[test]
fn a_second_primary_partition_is_refused() {
    let extra = sif::partition_extra(
        sif::FsType::Squash,
        sif::PartType::PrimSys,
        sif::Arch::host(),
    );
    let obj = |name: &str| NewObject {
        data_type: sif::DataType::Partition,
        name: name.to_owned(),
        extra,
        group: Some(1),
        linked_id: 0,
        data: ObjectData::Bytes(b"abcd"),
    };
    let err = sif::write(
        &mut Cursor::new(Vec::new()),
        &WriteOptions::deterministic(),
        vec![obj("a"), obj("b")],
    )
    .unwrap_err();
    assert!(err.to_string().contains("one primary"), "{err}");
}
