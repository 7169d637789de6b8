//! The guard that serialises the tests checking host-wide state.

use std::fs;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// Serialises the tests that check host-wide leftovers (`/dev/shm`, `/tmp`, the mount table):
/// within this test binary (a mutex) and across processes (an exclusive `flock` on
/// `/var/tmp/cmpirun-test.lock`). Hold the guard for the whole test.
pub struct Exclusive {
    _lock: nix::fcntl::Flock<fs::File>,
    _guard: MutexGuard<'static, ()>,
}

/// Takes the [`Exclusive`] guard, waiting for other holders.
pub fn exclusive() -> Exclusive {
    static LOCAL: Mutex<()> = Mutex::new(());
    let guard = LOCAL.lock().unwrap_or_else(|e| e.into_inner());
    let path = Path::new("/var/tmp/cmpirun-test.lock");
    let file = fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("cannot lock {}: {e}", path.display()));
    Exclusive {
        _lock: lock,
        _guard: guard,
    }
}
