//! The hand-written PMIx bindings (`cmpirun_pmi::pmix::ffi`) against the installed headers:
//! a C program compiled with `libpmix-dev`'s `pmix_server.h` prints every size and offset the
//! bindings rely on, and each must equal Rust's.

use std::mem::{offset_of, size_of};
use std::path::Path;
use std::process::Command;

use cmpirun_pmi::pmix::ffi::{DataArray, Info, Proc, ServerModule, Value};

/// Debian's libpmix-dev puts the headers here (`ci/install-packages.sh` installs it).
const INCLUDE: &str = "/usr/lib/x86_64-linux-gnu/pmix2/include";

const PROGRAM: &str = r#"
#include <stddef.h>
#include <stdio.h>
#include <pmix_server.h>
int main(void) {
    printf("proc %zu %zu\n", sizeof(pmix_proc_t), offsetof(pmix_proc_t, rank));
    printf("darray %zu %zu %zu\n", sizeof(pmix_data_array_t), offsetof(pmix_data_array_t, size), offsetof(pmix_data_array_t, array));
    printf("value %zu %zu\n", sizeof(pmix_value_t), offsetof(pmix_value_t, data));
    printf("info %zu %zu %zu\n", sizeof(pmix_info_t), offsetof(pmix_info_t, flags), offsetof(pmix_info_t, value));
    printf("module %zu %zu %zu %zu %zu %zu %zu %zu\n", sizeof(pmix_server_module_t),
        offsetof(pmix_server_module_t, client_connected), offsetof(pmix_server_module_t, client_finalized),
        offsetof(pmix_server_module_t, abort), offsetof(pmix_server_module_t, fence_nb),
        offsetof(pmix_server_module_t, direct_modex), offsetof(pmix_server_module_t, job_control),
        offsetof(pmix_server_module_t, client_connected2));
    printf("types %d %d %d %d %d %d %d\n", PMIX_BOOL, PMIX_STRING, PMIX_UINT16, PMIX_UINT32, PMIX_INFO, PMIX_DATA_ARRAY, PMIX_PROC_RANK);
    printf("status %d %d %d %d\n", PMIX_SUCCESS, PMIX_ERR_NOT_FOUND, PMIX_ERR_NOT_SUPPORTED, PMIX_OPERATION_SUCCEEDED);
    return 0;
}
"#;

#[test]
fn bindings_match_the_installed_headers() {
    assert!(
        Path::new(INCLUDE).join("pmix_server.h").exists(),
        "{INCLUDE}/pmix_server.h is missing: install libpmix-dev (ci/install-packages.sh)"
    );
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("layout.c");
    let bin = dir.path().join("layout");
    std::fs::write(&src, PROGRAM).unwrap();
    let st = Command::new("cc")
        .arg(format!("-I{INCLUDE}"))
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .status()
        .expect("cc");
    assert!(st.success(), "the layout program does not compile");
    let out = Command::new(&bin).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let line = |name: &str| -> Vec<i64> {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .split(' ')
            .map(|n| n.parse().unwrap())
            .collect()
    };
    let z = |n: usize| n as i64;
    assert_eq!(
        line("proc"),
        [z(size_of::<Proc>()), z(offset_of!(Proc, rank))]
    );
    assert_eq!(
        line("darray"),
        [
            z(size_of::<DataArray>()),
            z(offset_of!(DataArray, size)),
            z(offset_of!(DataArray, array))
        ]
    );
    assert_eq!(
        line("value"),
        [z(size_of::<Value>()), z(offset_of!(Value, data))]
    );
    assert_eq!(
        line("info"),
        [
            z(size_of::<Info>()),
            z(offset_of!(Info, flags)),
            z(offset_of!(Info, value))
        ]
    );
    let ptr = z(size_of::<usize>());
    let module = line("module");
    assert!(module[0] <= z(size_of::<ServerModule>()), "{module:?}");
    assert_eq!(
        module[1..],
        [
            z(ServerModule::AT_CLIENT_CONNECTED) * ptr,
            z(ServerModule::AT_CLIENT_FINALIZED) * ptr,
            z(ServerModule::AT_ABORT) * ptr,
            z(ServerModule::AT_FENCE_NB) * ptr,
            z(ServerModule::AT_DIRECT_MODEX) * ptr,
            z(ServerModule::AT_JOB_CONTROL) * ptr,
            z(ServerModule::AT_CLIENT_CONNECTED2) * ptr,
        ]
    );
    use cmpirun_pmi::pmix::ffi::{self, types};
    assert_eq!(
        line("types"),
        [
            types::BOOL,
            types::STRING,
            types::UINT16,
            types::UINT32,
            types::INFO,
            types::DATA_ARRAY,
            types::PROC_RANK
        ]
        .map(i64::from)
    );
    assert_eq!(
        line("status"),
        [
            ffi::PMIX_SUCCESS,
            ffi::PMIX_ERR_NOT_FOUND,
            ffi::PMIX_ERR_NOT_SUPPORTED,
            ffi::PMIX_OPERATION_SUCCEEDED
        ]
        .map(i64::from)
    );
}
