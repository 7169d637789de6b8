//! The PMIx server of one single-node job, through the host's libpmix loaded at run time.
//!
//! It is meant to run in a process of its own ([`serve`]): `PMIx_server_init` starts the
//! library's threads, and a launcher that forks ranks into namespaces must stay
//! single-threaded. The launcher forks the server process first, reads the ranks' environments
//! from it ([`ServerMessage::Ready`]), starts the ranks, and then reads what the ranks do
//! (connected, finalized, aborted) as JSON lines on the same socket. Closing its end of the
//! socket ends the server: it deregisters the job and finalizes the library, each step with a
//! deadline, and exits.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::ffi::{self, Info, Proc, ServerModule, Status};
use super::info::{InfoList, InfoValue};

/// What a single-node PMIx job is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmixJob {
    /// The namespace (the job's name).
    pub nspace: String,
    /// This node's name, as the ranks see it.
    pub hostname: String,
    /// The MPMD application number of each rank (its length is the job size).
    pub appnums: Vec<u32>,
    /// The working directory of each application.
    pub wdirs: Vec<String>,
    /// The server's private directory (exists, mode 0700): its own files and the job's session
    /// directories (`PMIX_NSDIR`, `PMIX_PROCDIR`) go there. The ranks must see it at this path.
    pub tmpdir: PathBuf,
    /// The user and group the ranks run as, as they will report them (their namespace's ids).
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// CPUs of the node: more ranks than these is an oversubscribed node.
    pub cpus: u32,
    /// How long each call into the library may take before the server gives up on it.
    pub deadline: Duration,
}

impl PmixJob {
    /// The number of ranks.
    pub fn size(&self) -> u32 {
        self.appnums.len() as u32
    }

    fn apps(&self) -> u32 {
        self.appnums.iter().max().map_or(0, |m| m + 1)
    }

    fn nsdir(&self) -> PathBuf {
        self.tmpdir.join(&self.nspace)
    }

    fn procdir(&self, rank: u32) -> PathBuf {
        self.nsdir().join(rank.to_string())
    }

    /// The namespace's registration (`PMIx_server_register_nspace`): job, node, application
    /// and per-rank information, the layout PRRTE registers. `node_map` and `proc_map` are the
    /// library's regular expressions of the node list and the ranks per node.
    pub fn registration(&self, node_map: &str, proc_map: &str) -> Vec<(String, InfoValue)> {
        use InfoValue::*;
        let size = self.size();
        let all: Vec<String> = (0..size).map(|r| r.to_string()).collect();
        let mut infos: Vec<(String, InfoValue)> = vec![
            ("pmix.jobid".into(), Str(self.nspace.clone())),
            ("pmix.offset".into(), Rank(0)),
            ("pmix.job.size".into(), U32(size)),
            ("pmix.univ.size".into(), U32(size)),
            ("pmix.max.size".into(), U32(size)),
            ("pmix.job.napps".into(), U32(self.apps())),
            ("pmix.num.nodes".into(), U32(1)),
            ("pmix.spawned".into(), Bool(false)),
            ("pmix.nmap".into(), Str(node_map.into())),
            ("pmix.pmap".into(), Str(proc_map.into())),
            ("pmix.tmpdir".into(), Str(self.tmpdir.display().to_string())),
            ("pmix.nsdir".into(), Str(self.nsdir().display().to_string())),
        ];
        if size > self.cpus {
            infos.push(("pmix.ndosub".into(), Bool(true)));
        }
        // Without the host name in the node array, the 4.2.2 server crashes.
        infos.push((
            "pmix.node.arr".into(),
            Array(vec![
                ("pmix.hname".into(), Str(self.hostname.clone())),
                ("pmix.nodeid".into(), U32(0)),
                ("pmix.node.size".into(), U32(size)),
                ("pmix.local.size".into(), U32(size)),
                ("pmix.lldr".into(), Rank(0)),
                ("pmix.lpeers".into(), Str(all.join(","))),
            ]),
        ));
        for app in 0..self.apps() {
            let ranks: Vec<u32> = (0..size)
                .filter(|&r| self.appnums[r as usize] == app)
                .collect();
            let wdir = self
                .wdirs
                .get(app as usize)
                .or(self.wdirs.first())
                .cloned()
                .unwrap_or_else(|| "/".into());
            infos.push((
                "pmix.app.arr".into(),
                Array(vec![
                    ("pmix.appnum".into(), U32(app)),
                    ("pmix.app.size".into(), U32(ranks.len() as u32)),
                    (
                        "pmix.aldr".into(),
                        Rank(ranks.first().copied().unwrap_or(0)),
                    ),
                    ("pmix.wdir".into(), Str(wdir)),
                ]),
            ));
        }
        for rank in 0..size {
            let app = self.appnums[rank as usize];
            let app_rank = (0..rank)
                .filter(|&r| self.appnums[r as usize] == app)
                .count() as u32;
            // The rank first: the library reads the array's owner from it.
            infos.push((
                "pmix.pdata".into(),
                Array(vec![
                    ("pmix.rank".into(), Rank(rank)),
                    ("pmix.grank".into(), Rank(rank)),
                    ("pmix.apprank".into(), Rank(app_rank)),
                    ("pmix.appnum".into(), U32(app)),
                    ("pmix.lrank".into(), U16(rank as u16)),
                    ("pmix.nrank".into(), U16(rank as u16)),
                    ("pmix.nodeid".into(), U32(0)),
                    ("pmix.hname".into(), Str(self.hostname.clone())),
                    ("pmix.reinc".into(), U32(0)),
                    (
                        "pmix.pdir".into(),
                        Str(self.procdir(rank).display().to_string()),
                    ),
                ]),
            ));
        }
        infos
    }
}

/// One line from the server process to the launcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerMessage {
    /// The server runs: the library loaded, its version, and each rank's environment from
    /// `PMIx_server_setup_fork` (the `PMIX_*` variables), in rank order.
    Ready {
        /// The file loaded.
        library: String,
        /// `PMIx_Get_version()`.
        version: String,
        /// Per rank, the variables to add.
        env: Vec<Vec<(String, String)>>,
    },
    /// The server could not start; the text says which step failed and why.
    Failed {
        /// What went wrong.
        error: String,
    },
    /// A rank connected (`PMIx_Init`).
    Connected {
        /// The rank.
        rank: u32,
    },
    /// A rank called `PMIx_Finalize`.
    Finalized {
        /// The rank.
        rank: u32,
    },
    /// A rank called `PMIx_Abort` (`MPI_Abort`).
    Aborted {
        /// The rank.
        rank: u32,
        /// Its status.
        status: i32,
        /// Its message.
        message: Option<String>,
    },
    /// A rank asked for job control (cleanup registrations are kept by the library itself).
    JobControl {
        /// The rank.
        rank: u32,
    },
}

/// The entry points resolved from the host's libpmix.
struct Library {
    _lib: libloading::Library,
    path: String,
    init: ffi::ServerInitFn,
    finalize: ffi::ServerFinalizeFn,
    regex: ffi::GenerateFn,
    ppn: ffi::GenerateFn,
    register_nspace: ffi::RegisterNspaceFn,
    deregister_nspace: ffi::DeregisterNspaceFn,
    register_client: ffi::RegisterClientFn,
    deregister_client: ffi::DeregisterClientFn,
    setup_fork: ffi::SetupForkFn,
    version: ffi::GetVersionFn,
    error_string: ffi::ErrorStringFn,
}

impl Library {
    /// Opens the first of `candidates` that loads and defines every entry point.
    fn open(candidates: &[String]) -> Result<Library, String> {
        let mut tried = Vec::new();
        for c in candidates {
            match Library::open_one(c) {
                Ok(l) => return Ok(l),
                Err(e) => tried.push(format!("{c}: {e}")),
            }
        }
        Err(format!(
            "no host libpmix could be loaded (tried {}); install the host's PMIx (Debian: libpmix2) or name it in the profile's pmi.host_libraries",
            if tried.is_empty() {
                "nothing".to_owned()
            } else {
                tried.join("; ")
            }
        ))
    }

    fn open_one(path: &str) -> Result<Library, String> {
        use libloading::os::unix::{Library as Unix, RTLD_LOCAL, RTLD_NOW};
        // SAFETY: loading libpmix runs its initialisers, which only set up the library's own
        // state; this process is the server process, made to host it.
        let lib: libloading::Library = unsafe { Unix::open(Some(path), RTLD_NOW | RTLD_LOCAL) }
            .map_err(|e| e.to_string())?
            .into();
        macro_rules! sym {
            ($name:literal, $ty:ty) => {{
                // SAFETY: the symbol is the PMIx entry point of this name, whose C prototype
                // (pmix_server.h / pmix.h) the type transcribes; the library outlives the copy
                // (both live in `Library`).
                let s: libloading::Symbol<$ty> = unsafe { lib.get($name) }
                    .map_err(|e| format!("{}: {e}", String::from_utf8_lossy($name)))?;
                *s
            }};
        }
        Ok(Library {
            init: sym!(b"PMIx_server_init", ffi::ServerInitFn),
            finalize: sym!(b"PMIx_server_finalize", ffi::ServerFinalizeFn),
            regex: sym!(b"PMIx_generate_regex", ffi::GenerateFn),
            ppn: sym!(b"PMIx_generate_ppn", ffi::GenerateFn),
            register_nspace: sym!(b"PMIx_server_register_nspace", ffi::RegisterNspaceFn),
            deregister_nspace: sym!(b"PMIx_server_deregister_nspace", ffi::DeregisterNspaceFn),
            register_client: sym!(b"PMIx_server_register_client", ffi::RegisterClientFn),
            deregister_client: sym!(b"PMIx_server_deregister_client", ffi::DeregisterClientFn),
            setup_fork: sym!(b"PMIx_server_setup_fork", ffi::SetupForkFn),
            version: sym!(b"PMIx_Get_version", ffi::GetVersionFn),
            error_string: sym!(b"PMIx_Error_string", ffi::ErrorStringFn),
            path: path.to_owned(),
            _lib: lib,
        })
    }

    fn version(&self) -> String {
        // SAFETY: PMIx_Get_version returns a static NUL-terminated string (or NULL).
        unsafe { c_text((self.version)()) }.unwrap_or_default()
    }

    fn error(&self, status: Status) -> String {
        // SAFETY: PMIx_Error_string returns a static NUL-terminated string for any status.
        let s = unsafe { c_text((self.error_string)(status)) };
        format!("{} ({status})", s.unwrap_or_else(|| "unknown".into()))
    }
}

/// Copies a C string the library owns.
///
/// # Safety
/// `p` is NULL or points at a NUL-terminated string that lives during the call.
unsafe fn c_text(p: *const c_char) -> Option<String> {
    // SAFETY: as the caller promises.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// The socket the upcalls write to (the library calls them on its own threads).
static EVENTS: Mutex<Option<UnixStream>> = Mutex::new(None);

fn send(msg: &ServerMessage) {
    let Ok(mut line) = serde_json::to_vec(msg) else {
        return;
    };
    line.push(b'\n');
    if let Ok(mut guard) = EVENTS.lock()
        && let Some(s) = guard.as_mut()
    {
        let _ = s.write_all(&line);
    }
}

/// The rank of a `pmix_proc_t` the library passes.
///
/// # Safety
/// `p` is NULL or points at a valid `pmix_proc_t`.
unsafe fn rank_of(p: *const Proc) -> Option<u32> {
    // SAFETY: as the caller promises.
    (!p.is_null()).then(|| unsafe { (*p).rank })
}

unsafe extern "C" fn client_connected(
    p: *const Proc,
    _server_object: *mut c_void,
    _cbfunc: Option<ffi::OpCallback>,
    _cbdata: *mut c_void,
) -> Status {
    // SAFETY: the library passes the connecting client's proc.
    if let Some(rank) = unsafe { rank_of(p) } {
        send(&ServerMessage::Connected { rank });
    }
    ffi::PMIX_OPERATION_SUCCEEDED
}

unsafe extern "C" fn client_connected2(
    p: *const Proc,
    server_object: *mut c_void,
    _info: *mut Info,
    _ninfo: usize,
    cbfunc: Option<ffi::OpCallback>,
    cbdata: *mut c_void,
) -> Status {
    // SAFETY: the same arguments, passed on.
    unsafe { client_connected(p, server_object, cbfunc, cbdata) }
}

unsafe extern "C" fn client_finalized(
    p: *const Proc,
    _server_object: *mut c_void,
    _cbfunc: Option<ffi::OpCallback>,
    _cbdata: *mut c_void,
) -> Status {
    // SAFETY: the library passes the finalizing client's proc.
    if let Some(rank) = unsafe { rank_of(p) } {
        send(&ServerMessage::Finalized { rank });
    }
    ffi::PMIX_OPERATION_SUCCEEDED
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn abort(
    p: *const Proc,
    _server_object: *mut c_void,
    status: c_int,
    msg: *const c_char,
    _procs: *mut Proc,
    _nprocs: usize,
    _cbfunc: Option<ffi::OpCallback>,
    _cbdata: *mut c_void,
) -> Status {
    // SAFETY: the library passes the aborting client's proc and its message (or NULL).
    let (rank, message) = unsafe { (rank_of(p), c_text(msg)) };
    send(&ServerMessage::Aborted {
        rank: rank.unwrap_or(0),
        status,
        message,
    });
    // The launcher ends the job; the client is released at once and exits with its status.
    ffi::PMIX_OPERATION_SUCCEEDED
}

unsafe extern "C" fn release_copy(data: *mut c_void) {
    // SAFETY: `data` is the malloc'd copy `fence_nb` handed over with this function.
    unsafe { libc::free(data) };
}

/// Every rank is local, so the library completes fences itself; this is only reached with a
/// partial registration. It returns the local contribution as the whole job's.
#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn fence_nb(
    _procs: *const Proc,
    _nprocs: usize,
    _info: *const Info,
    _ninfo: usize,
    data: *mut c_char,
    ndata: usize,
    cbfunc: Option<ffi::ModexCallback>,
    cbdata: *mut c_void,
) -> Status {
    let Some(cb) = cbfunc else {
        return ffi::PMIX_SUCCESS;
    };
    // SAFETY: malloc of ndata bytes (at least 1), and `data` holds `ndata` readable bytes;
    // the copy is freed by `release_copy` when the library is done with it.
    unsafe {
        let copy = libc::malloc(ndata.max(1)).cast::<c_char>();
        if copy.is_null() {
            return ffi::PMIX_ERR_NOT_SUPPORTED;
        }
        if ndata > 0 && !data.is_null() {
            std::ptr::copy_nonoverlapping(data, copy, ndata);
        }
        cb(
            ffi::PMIX_SUCCESS,
            copy,
            ndata,
            cbdata,
            Some(release_copy),
            copy.cast(),
        );
    }
    ffi::PMIX_SUCCESS
}

unsafe extern "C" fn direct_modex(
    _p: *const Proc,
    _info: *const Info,
    _ninfo: usize,
    _cbfunc: Option<ffi::ModexCallback>,
    _cbdata: *mut c_void,
) -> Status {
    // Every rank is on this node: there is no other server to ask.
    ffi::PMIX_ERR_NOT_FOUND
}

/// Must be present: with it, the library itself keeps the cleanup registrations of Open MPI
/// 5's shared-memory files (and deletes them); without it they leak in `/dev/shm`.
unsafe extern "C" fn job_control(
    requestor: *const Proc,
    _targets: *const Proc,
    _ntargets: usize,
    _directives: *const Info,
    _ndirs: usize,
    _cbfunc: Option<ffi::InfoCallback>,
    _cbdata: *mut c_void,
) -> Status {
    // SAFETY: the library passes the requesting client's proc.
    if let Some(rank) = unsafe { rank_of(requestor) } {
        send(&ServerMessage::JobControl { rank });
    }
    ffi::PMIX_ERR_NOT_SUPPORTED
}

/// The module handed to `PMIx_server_init`; it must outlive the library's use of it.
fn module() -> Box<ServerModule> {
    let mut m = Box::new(ServerModule {
        entries: [None; ServerModule::ENTRIES],
    });
    macro_rules! set {
        ($at:expr, $f:expr, $ty:ty) => {{
            let f: $ty = $f;
            // SAFETY: a function pointer is stored type-erased in the slot whose C type is
            // `$ty`; the library calls it back with that prototype.
            m.entries[$at] = Some(unsafe { std::mem::transmute::<$ty, unsafe extern "C" fn()>(f) });
        }};
    }
    set!(
        ServerModule::AT_CLIENT_CONNECTED,
        client_connected,
        ffi::ClientConnectedFn
    );
    set!(
        ServerModule::AT_CLIENT_FINALIZED,
        client_finalized,
        ffi::ClientConnectedFn
    );
    set!(ServerModule::AT_ABORT, abort, ffi::AbortFn);
    set!(ServerModule::AT_FENCE_NB, fence_nb, ffi::FenceFn);
    set!(
        ServerModule::AT_DIRECT_MODEX,
        direct_modex,
        ffi::DirectModexFn
    );
    set!(ServerModule::AT_JOB_CONTROL, job_control, ffi::JobControlFn);
    set!(
        ServerModule::AT_CLIENT_CONNECTED2,
        client_connected2,
        ffi::ClientConnected2Fn
    );
    m
}

/// One operation's completion, as the library's callback reports it.
#[derive(Default)]
struct Completion {
    status: Mutex<Option<Status>>,
    done: Condvar,
}

unsafe extern "C" fn op_done(status: Status, cbdata: *mut c_void) {
    // SAFETY: `cbdata` is the `Arc<Completion>` that `Completion::callback_data` leaked for
    // this one call; it is taken back here once.
    let c = unsafe { Arc::from_raw(cbdata.cast::<Completion>()) };
    if let Ok(mut s) = c.status.lock() {
        *s = Some(status);
    }
    c.done.notify_all();
}

impl Completion {
    /// A reference for the callback (released by [`op_done`]; leaked if it never comes).
    fn callback_data(self: &Arc<Self>) -> *mut c_void {
        Arc::into_raw(self.clone()).cast_mut().cast()
    }

    /// The callback's status, or `None` after `deadline`.
    fn wait(&self, deadline: Duration) -> Option<Status> {
        let end = Instant::now() + deadline;
        let mut s = self.status.lock().ok()?;
        while s.is_none() {
            let left = end.checked_duration_since(Instant::now())?;
            s = self.done.wait_timeout(s, left).ok()?.0;
        }
        *s
    }
}

/// Runs one library call that completes through an op callback, and waits for it.
fn call_and_wait(
    lib: &Library,
    what: &str,
    deadline: Duration,
    call: impl FnOnce(Option<ffi::OpCallback>, *mut c_void) -> Option<Status>,
) -> Result<(), String> {
    let c = Arc::new(Completion::default());
    let data = c.callback_data();
    if let Some(rc) = call(Some(op_done), data)
        && rc != ffi::PMIX_SUCCESS
    {
        // SAFETY: the library refused the call, so it will not call back: the reference
        // leaked for the callback is taken back here.
        drop(unsafe { Arc::from_raw(data.cast::<Completion>()) });
        if rc == ffi::PMIX_OPERATION_SUCCEEDED {
            return Ok(());
        }
        return Err(format!("{what}: {}", lib.error(rc)));
    }
    match c.wait(deadline) {
        Some(ffi::PMIX_SUCCESS) => Ok(()),
        Some(rc) => Err(format!("{what}: {}", lib.error(rc))),
        None => Err(format!(
            "{what} did not complete within {} s (libpmix {}): a client registration with the wrong user id can wedge the server",
            deadline.as_secs_f32(),
            lib.path
        )),
    }
}

/// `PMIx_generate_regex`/`PMIx_generate_ppn` of `input`.
fn generate(lib: &Library, f: ffi::GenerateFn, what: &str, input: &str) -> Result<String, String> {
    let c = CString::new(input).map_err(|e| format!("{what}: {e}"))?;
    let mut out: *mut c_char = std::ptr::null_mut();
    // SAFETY: `c` is a NUL-terminated string alive during the call; `out` receives a malloc'd
    // string, copied and freed below.
    let rc = unsafe { f(c.as_ptr(), &mut out) };
    if rc != ffi::PMIX_SUCCESS || out.is_null() {
        return Err(format!("{what}: {}", lib.error(rc)));
    }
    // SAFETY: `out` is the NUL-terminated string the library allocated for us.
    let s = unsafe { c_text(out) }.unwrap_or_default();
    // SAFETY: allocated with malloc by the library and not used again.
    unsafe { libc::free(out.cast()) };
    Ok(s)
}

/// `PMIx_server_setup_fork` for `rank`: the variables it adds.
fn setup_fork(lib: &Library, nspace: &str, rank: u32) -> Result<Vec<(String, String)>, String> {
    let p = Proc::new(nspace, rank);
    let mut env: *mut *mut c_char = std::ptr::null_mut();
    // SAFETY: `p` lives during the call; the library appends to the NULL-terminated array
    // `env` (allocating it), which is read and freed below.
    let rc = unsafe { (lib.setup_fork)(&p, &mut env) };
    if rc != ffi::PMIX_SUCCESS {
        return Err(format!(
            "PMIx_server_setup_fork rank {rank}: {}",
            lib.error(rc)
        ));
    }
    let mut vars = Vec::new();
    if !env.is_null() {
        let mut i = 0;
        loop {
            // SAFETY: `env` is a NULL-terminated array of malloc'd strings; each is read, then
            // freed, and the array after them.
            let entry = unsafe { *env.add(i) };
            if entry.is_null() {
                break;
            }
            // SAFETY: as above.
            if let Some(s) = unsafe { c_text(entry) }
                && let Some((k, v)) = s.split_once('=')
            {
                vars.push((k.to_owned(), v.to_owned()));
            }
            // SAFETY: as above.
            unsafe { libc::free(entry.cast()) };
            i += 1;
        }
        // SAFETY: as above.
        unsafe { libc::free(env.cast()) };
    }
    Ok(vars)
}

/// The server's settings for the library, set in this process before `PMIx_server_init`:
/// `native` security (the uid the client reports from its namespace; no munge), and the
/// `hash` store (no shared-memory dstore files the ranks would need at the same path).
pub const SERVER_ENV: [(&str, &str); 2] = [("PMIX_MCA_psec", "native"), ("PMIX_MCA_gds", "hash")];

/// Runs the server of `job` in this process until `conn` closes, talking to the launcher over
/// `conn`. Returns the process's exit status. Meant for a process of its own, started while
/// it is single-threaded: it sets environment variables and starts the library's threads.
pub fn serve(candidates: &[String], job: &PmixJob, conn: UnixStream) -> i32 {
    let writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return 1,
    };
    if let Ok(mut g) = EVENTS.lock() {
        *g = Some(writer);
    }
    let lib = match start(candidates, job) {
        Ok((lib, ready)) => {
            send(&ready);
            lib
        }
        Err(error) => {
            send(&ServerMessage::Failed { error });
            return 1;
        }
    };
    // The launcher's end closes (or it sends anything): the job is over.
    let mut line = String::new();
    let _ = BufReader::new(conn).read_line(&mut line);
    stop(&lib, job);
    if let Ok(mut g) = EVENTS.lock() {
        *g = None;
    }
    0
}

fn start(candidates: &[String], job: &PmixJob) -> Result<(Library, ServerMessage), String> {
    for (k, v) in SERVER_ENV {
        // SAFETY: this process is still single-threaded (the library starts its threads in
        // PMIx_server_init, below), so nothing reads the environment concurrently.
        unsafe { std::env::set_var(k, v) };
    }
    let lib = Library::open(candidates)?;
    let version = lib.version();
    std::fs::create_dir_all(job.nsdir())
        .map_err(|e| format!("create {}: {e}", job.nsdir().display()))?;
    for rank in 0..job.size() {
        let d = job.procdir(rank);
        std::fs::create_dir_all(&d).map_err(|e| format!("create {}: {e}", d.display()))?;
    }
    let tmp = job.tmpdir.display().to_string();
    let mut init = InfoList::new(&[
        ("pmix.srvr.tmpdir".into(), InfoValue::Str(tmp.clone())),
        ("pmix.sys.tmpdir".into(), InfoValue::Str(tmp)),
        ("pmix.srvr.tool".into(), InfoValue::Bool(false)),
        ("pmix.srvr.sys".into(), InfoValue::Bool(false)),
    ]);
    // The library keeps the module's address: it lives as long as the process.
    let module = Box::leak(module());
    // SAFETY: `module` is a zero-padded pmix_server_module_t that lives for ever; `init` holds
    // `init.len()` valid entries during the call.
    let rc = unsafe { (lib.init)(module, init.as_mut_ptr(), init.len()) };
    if rc != ffi::PMIX_SUCCESS {
        return Err(format!(
            "PMIx_server_init ({} {version}): {}",
            lib.path,
            lib.error(rc)
        ));
    }
    let ranks: Vec<String> = (0..job.size()).map(|r| r.to_string()).collect();
    let node_map = generate(&lib, lib.regex, "PMIx_generate_regex", &job.hostname)?;
    let proc_map = generate(&lib, lib.ppn, "PMIx_generate_ppn", &ranks.join(","))?;
    let mut reg = InfoList::new(&job.registration(&node_map, &proc_map));
    let ns = CString::new(job.nspace.clone()).map_err(|e| format!("namespace: {e}"))?;
    call_and_wait(
        &lib,
        "PMIx_server_register_nspace",
        job.deadline,
        |cb, data| {
            // SAFETY: `ns` and `reg` live until the callback came or the deadline passed (and on
            // a timeout the process ends without freeing them).
            Some(unsafe {
                (lib.register_nspace)(
                    ns.as_ptr(),
                    job.size() as c_int,
                    reg.as_mut_ptr(),
                    reg.len(),
                    cb,
                    data,
                )
            })
        },
    )?;
    let mut env = Vec::with_capacity(job.size() as usize);
    for rank in 0..job.size() {
        let p = Proc::new(&job.nspace, rank);
        call_and_wait(
            &lib,
            &format!("PMIx_server_register_client rank {rank}"),
            job.deadline,
            |cb, data| {
                // SAFETY: `p` lives during the call (the library copies it).
                Some(unsafe {
                    (lib.register_client)(&p, job.uid, job.gid, std::ptr::null_mut(), cb, data)
                })
            },
        )?;
        env.push(setup_fork(&lib, &job.nspace, rank)?);
    }
    // The registration's memory stays valid for the library's lifetime.
    std::mem::forget(reg);
    let ready = ServerMessage::Ready {
        library: lib.path.clone(),
        version,
        env,
    };
    Ok((lib, ready))
}

/// Deregisters the job and finalizes the library, each with a deadline: a wedged library
/// (after a bad client credential) never calls back and can hang in its finalize.
fn stop(lib: &Library, job: &PmixJob) {
    let short = job.deadline.min(Duration::from_secs(3));
    for rank in 0..job.size() {
        let p = Proc::new(&job.nspace, rank);
        let r = call_and_wait(lib, "PMIx_server_deregister_client", short, |cb, data| {
            // SAFETY: `p` lives during the call.
            unsafe { (lib.deregister_client)(&p, cb, data) };
            None
        });
        if let Err(e) = r {
            tracing::warn!("{e}");
            return;
        }
    }
    let Ok(ns) = CString::new(job.nspace.clone()) else {
        return;
    };
    let r = call_and_wait(lib, "PMIx_server_deregister_nspace", short, |cb, data| {
        // SAFETY: `ns` lives during the call.
        unsafe { (lib.deregister_nspace)(ns.as_ptr(), cb, data) };
        None
    });
    if let Err(e) = r {
        tracing::warn!("{e}");
        return;
    }
    let finalize = lib.finalize;
    let (tx, rx) = std::sync::mpsc::channel();
    // SAFETY (of the call in the thread): PMIx_server_finalize takes no arguments; it runs
    // on a thread of its own so that a wedged library cannot hold this process.
    let _ = std::thread::Builder::new()
        .name("pmix-finalize".into())
        .spawn(move || {
            // SAFETY: see above; the library stays loaded (the process ends after this).
            let rc = unsafe { finalize() };
            let _ = tx.send(rc);
        });
    if rx.recv_timeout(short).is_err() {
        tracing::warn!(
            "PMIx_server_finalize did not return within {} s; the server process exits without it",
            short.as_secs_f32()
        );
    }
}
