//! Load on the machine while a test runs: busy threads on every core, a writer that forces its
//! data to disk, and page-cache eviction of given files (an image, so that the ranks' programs
//! are read again through the image mount when they run).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// Load that runs until dropped.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    scratch: PathBuf,
}

impl Load {
    /// Starts busy threads (two per core), a writer that `fsync`s 4 MiB at a time into a file in
    /// `/var/tmp`, and a thread that drops `evict`'s pages from the page cache every 50 ms.
    pub fn start(evict: &[&Path]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        for _ in 0..2 * cores {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for i in 0..100_000u64 {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
                    }
                    std::hint::black_box(x);
                }
            }));
        }
        let scratch = PathBuf::from(format!("/var/tmp/cmpirun-test-load.{}", std::process::id()));
        {
            let stop = stop.clone();
            let path = scratch.clone();
            threads.push(std::thread::spawn(move || {
                let chunk = vec![0x5au8; 4 << 20];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut f) = std::fs::File::create(&path) else {
                        return;
                    };
                    for _ in 0..8 {
                        if stop.load(Ordering::Relaxed) || f.write_all(&chunk).is_err() {
                            break;
                        }
                        let _ = f.sync_data();
                    }
                }
            }));
        }
        let files: Vec<PathBuf> = evict.iter().map(|p| p.to_path_buf()).collect();
        {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for f in &files {
                        if let Ok(file) = std::fs::File::open(f) {
                            let _ = nix::fcntl::posix_fadvise(
                                &file,
                                0,
                                0,
                                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
                            );
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }));
        }
        Load {
            stop,
            threads,
            scratch,
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.scratch);
    }
}
