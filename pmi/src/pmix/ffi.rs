//! Hand-written bindings of the few PMIx types and entry points a single-node server needs,
//! checked against OpenPMIx 4.2.2's `pmix_common.h` and `pmix_server.h` (x86-64; the 5.x
//! headers have the same layout for these types). `pmi/tests/pmix_layout.rs` compiles a C
//! program against the installed headers and compares every size and offset with these.

use std::ffi::{c_char, c_int, c_void};

/// `pmix_status_t`.
pub type Status = c_int;
/// `pmix_rank_t`.
pub type Rank = u32;

/// `PMIX_SUCCESS`.
pub const PMIX_SUCCESS: Status = 0;
/// `PMIX_ERR_NOT_FOUND`.
pub const PMIX_ERR_NOT_FOUND: Status = -46;
/// `PMIX_ERR_NOT_SUPPORTED`.
pub const PMIX_ERR_NOT_SUPPORTED: Status = -47;
/// `PMIX_OPERATION_SUCCEEDED`: an upcall finished at once, no callback follows.
pub const PMIX_OPERATION_SUCCEEDED: Status = -157;

/// `PMIX_MAX_NSLEN + 1`.
pub const NSPACE_LEN: usize = 256;
/// `PMIX_MAX_KEYLEN + 1`.
pub const KEY_LEN: usize = 512;

/// `pmix_data_type_t` values used here.
pub mod types {
    /// `PMIX_BOOL`.
    pub const BOOL: u16 = 1;
    /// `PMIX_STRING`.
    pub const STRING: u16 = 3;
    /// `PMIX_UINT16`.
    pub const UINT16: u16 = 13;
    /// `PMIX_UINT32`.
    pub const UINT32: u16 = 14;
    /// `PMIX_INFO`.
    pub const INFO: u16 = 24;
    /// `PMIX_DATA_ARRAY`.
    pub const DATA_ARRAY: u16 = 39;
    /// `PMIX_PROC_RANK`.
    pub const PROC_RANK: u16 = 40;
}

/// `pmix_proc_t`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Proc {
    /// `pmix_nspace_t`, NUL-terminated.
    pub nspace: [c_char; NSPACE_LEN],
    /// `pmix_rank_t`.
    pub rank: Rank,
}

/// `pmix_data_array_t`.
#[repr(C)]
pub struct DataArray {
    /// The type of the elements.
    pub type_: u16,
    /// How many.
    pub size: usize,
    /// The elements.
    pub array: *mut c_void,
}

/// The union of `pmix_value_t`: only the members written here, padded to its 24 bytes (its
/// largest members, `pmix_envar_t` and `struct timeval` plus padding).
#[repr(C)]
#[derive(Clone, Copy)]
pub union ValueData {
    /// `bool flag`.
    pub flag: bool,
    /// `uint16_t uint16`.
    pub uint16: u16,
    /// `uint32_t uint32` (also `pmix_rank_t rank`).
    pub uint32: u32,
    /// `char *string`.
    pub string: *mut c_char,
    /// `pmix_data_array_t *darray`.
    pub darray: *mut DataArray,
    /// The union's size.
    pub bytes: [u64; 3],
}

/// `pmix_value_t`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Value {
    /// `pmix_data_type_t`.
    pub type_: u16,
    /// The data.
    pub data: ValueData,
}

/// `pmix_info_t`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Info {
    /// `pmix_key_t`, NUL-terminated.
    pub key: [c_char; KEY_LEN],
    /// `pmix_info_directives_t`.
    pub flags: u32,
    /// The value.
    pub value: Value,
}

/// `pmix_op_cbfunc_t`.
pub type OpCallback = unsafe extern "C" fn(status: Status, cbdata: *mut c_void);
/// `pmix_release_cbfunc_t`.
pub type ReleaseCallback = unsafe extern "C" fn(cbdata: *mut c_void);
/// `pmix_modex_cbfunc_t`.
pub type ModexCallback = unsafe extern "C" fn(
    status: Status,
    data: *const c_char,
    ndata: usize,
    cbdata: *mut c_void,
    release: Option<ReleaseCallback>,
    release_data: *mut c_void,
);
/// `pmix_info_cbfunc_t`.
pub type InfoCallback = unsafe extern "C" fn(
    status: Status,
    info: *mut Info,
    ninfo: usize,
    cbdata: *mut c_void,
    release: Option<ReleaseCallback>,
    release_data: *mut c_void,
);

/// `pmix_server_client_connected_fn_t`.
pub type ClientConnectedFn = unsafe extern "C" fn(
    proc_: *const Proc,
    server_object: *mut c_void,
    cbfunc: Option<OpCallback>,
    cbdata: *mut c_void,
) -> Status;
/// `pmix_server_client_connected2_fn_t`.
pub type ClientConnected2Fn = unsafe extern "C" fn(
    proc_: *const Proc,
    server_object: *mut c_void,
    info: *mut Info,
    ninfo: usize,
    cbfunc: Option<OpCallback>,
    cbdata: *mut c_void,
) -> Status;
/// `pmix_server_abort_fn_t`.
pub type AbortFn = unsafe extern "C" fn(
    proc_: *const Proc,
    server_object: *mut c_void,
    status: c_int,
    msg: *const c_char,
    procs: *mut Proc,
    nprocs: usize,
    cbfunc: Option<OpCallback>,
    cbdata: *mut c_void,
) -> Status;
/// `pmix_server_fencenb_fn_t`.
pub type FenceFn = unsafe extern "C" fn(
    procs: *const Proc,
    nprocs: usize,
    info: *const Info,
    ninfo: usize,
    data: *mut c_char,
    ndata: usize,
    cbfunc: Option<ModexCallback>,
    cbdata: *mut c_void,
) -> Status;
/// `pmix_server_dmodex_req_fn_t`.
pub type DirectModexFn = unsafe extern "C" fn(
    proc_: *const Proc,
    info: *const Info,
    ninfo: usize,
    cbfunc: Option<ModexCallback>,
    cbdata: *mut c_void,
) -> Status;
/// `pmix_server_job_control_fn_t`.
pub type JobControlFn = unsafe extern "C" fn(
    requestor: *const Proc,
    targets: *const Proc,
    ntargets: usize,
    directives: *const Info,
    ndirs: usize,
    cbfunc: Option<InfoCallback>,
    cbdata: *mut c_void,
) -> Status;

/// Number of entries of `pmix_server_module_t` in 4.2.2 (`pmix_server_module_4_0_0_t`).
pub const MODULE_ENTRIES_4: usize = 28;

/// `pmix_server_module_t`, with room to spare: OpenPMIx 5 appends entries, so the library is
/// handed a zero-padded block of [`ServerModule::ENTRIES`] pointers; NULL is "not supported".
#[repr(C)]
pub struct ServerModule {
    /// The function pointers, in the header's order (indexes: the `AT_*` constants).
    pub entries: [Option<unsafe extern "C" fn()>; ServerModule::ENTRIES],
}

impl ServerModule {
    /// Room for 512 entries (4 KiB).
    pub const ENTRIES: usize = 512;
    /// `client_connected`.
    pub const AT_CLIENT_CONNECTED: usize = 0;
    /// `client_finalized`.
    pub const AT_CLIENT_FINALIZED: usize = 1;
    /// `abort`.
    pub const AT_ABORT: usize = 2;
    /// `fence_nb`.
    pub const AT_FENCE_NB: usize = 3;
    /// `direct_modex`.
    pub const AT_DIRECT_MODEX: usize = 4;
    /// `job_control`.
    pub const AT_JOB_CONTROL: usize = 19;
    /// `client_connected2` (4.x).
    pub const AT_CLIENT_CONNECTED2: usize = 27;
}

/// `PMIx_server_init`.
pub type ServerInitFn =
    unsafe extern "C" fn(module: *mut ServerModule, info: *mut Info, ninfo: usize) -> Status;
/// `PMIx_server_finalize`.
pub type ServerFinalizeFn = unsafe extern "C" fn() -> Status;
/// `PMIx_generate_regex` and `PMIx_generate_ppn`.
pub type GenerateFn = unsafe extern "C" fn(input: *const c_char, out: *mut *mut c_char) -> Status;
/// `PMIx_server_register_nspace`.
pub type RegisterNspaceFn = unsafe extern "C" fn(
    nspace: *const c_char,
    nlocalprocs: c_int,
    info: *mut Info,
    ninfo: usize,
    cbfunc: Option<OpCallback>,
    cbdata: *mut c_void,
) -> Status;
/// `PMIx_server_deregister_nspace`.
pub type DeregisterNspaceFn =
    unsafe extern "C" fn(nspace: *const c_char, cbfunc: Option<OpCallback>, cbdata: *mut c_void);
/// `PMIx_server_register_client`.
pub type RegisterClientFn = unsafe extern "C" fn(
    proc_: *const Proc,
    uid: libc::uid_t,
    gid: libc::gid_t,
    server_object: *mut c_void,
    cbfunc: Option<OpCallback>,
    cbdata: *mut c_void,
) -> Status;
/// `PMIx_server_deregister_client`.
pub type DeregisterClientFn =
    unsafe extern "C" fn(proc_: *const Proc, cbfunc: Option<OpCallback>, cbdata: *mut c_void);
/// `PMIx_server_setup_fork`.
pub type SetupForkFn =
    unsafe extern "C" fn(proc_: *const Proc, env: *mut *mut *mut c_char) -> Status;
/// `PMIx_Get_version`.
pub type GetVersionFn = unsafe extern "C" fn() -> *const c_char;
/// `PMIx_Error_string`.
pub type ErrorStringFn = unsafe extern "C" fn(status: Status) -> *const c_char;

/// Copies `s` into a fixed C string field, cut to leave room for the NUL.
pub fn fill(field: &mut [c_char], s: &str) {
    field.fill(0);
    let room = field.len().saturating_sub(1);
    for (d, b) in field.iter_mut().zip(s.bytes().take(room)) {
        *d = b as c_char;
    }
}

/// The text of a fixed C string field, up to its NUL.
pub fn text(field: &[c_char]) -> String {
    let bytes: Vec<u8> = field
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

impl Proc {
    /// The process `rank` of namespace `nspace`.
    pub fn new(nspace: &str, rank: Rank) -> Proc {
        let mut p = Proc {
            nspace: [0; NSPACE_LEN],
            rank,
        };
        fill(&mut p.nspace, nspace);
        p
    }
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;

    /// The sizes and offsets of OpenPMIx 4.2.2's headers on x86-64 (the C side of the same
    /// comparison is `pmi/tests/pmix_layout.rs`).
    #[test]
    fn layout_matches_the_headers() {
        assert_eq!(size_of::<Proc>(), 260);
        assert_eq!(offset_of!(Proc, rank), 256);
        assert_eq!(size_of::<DataArray>(), 24);
        assert_eq!(offset_of!(DataArray, size), 8);
        assert_eq!(offset_of!(DataArray, array), 16);
        assert_eq!(size_of::<ValueData>(), 24);
        assert_eq!(size_of::<Value>(), 32);
        assert_eq!(offset_of!(Value, data), 8);
        assert_eq!(size_of::<Info>(), 552);
        assert_eq!(offset_of!(Info, flags), 512);
        assert_eq!(offset_of!(Info, value), 520);
        assert!(size_of::<ServerModule>() >= MODULE_ENTRIES_4 * 8);
        assert_eq!(ServerModule::AT_JOB_CONTROL * 8, 152);
        assert_eq!(ServerModule::AT_CLIENT_CONNECTED2 * 8, 216);
    }

    #[test]
    fn fixed_strings() {
        let p = Proc::new(&"x".repeat(300), 3);
        assert_eq!(text(&p.nspace).len(), 255);
        assert_eq!(text(&Proc::new("job-1", 0).nspace), "job-1");
    }
}
