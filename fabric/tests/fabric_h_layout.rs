//! The `struct fi_info`/`struct fi_fabric_attr` prefix the crate reads matches rdma/fabric.h,
//! checked by compiling a C program against the installed header (libfabric-dev).

use std::process::Command;

#[test]
fn offsets_match_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("offsets.c");
    std::fs::write(
        &src,
        r#"#include <stddef.h>
#include <stdio.h>
#include <rdma/fabric.h>
int main(void) {
    printf("%zu %zu %zu %zu %zu\n", offsetof(struct fi_info, next),
           offsetof(struct fi_info, fabric_attr), offsetof(struct fi_fabric_attr, name),
           offsetof(struct fi_fabric_attr, prov_name), offsetof(struct fi_fabric_attr, prov_version));
    return 0;
}
"#,
    )
    .unwrap();
    let exe = dir.path().join("offsets");
    let status = Command::new("cc")
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .status()
        .unwrap();
    assert!(status.success());
    let out = Command::new(&exe).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    // The same numbers as `cmpirun_fabric::libfabric`'s repr(C) structs (checked there with
    // offset_of!).
    assert_eq!(text.trim(), "0 104 8 16 24");
}
