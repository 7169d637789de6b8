//! Fuzzes the squashfs reader the FUSE server and the extract backend use: any bytes, written to
//! a file and opened as an image's squashfs (`cmpirun::mount::read_through`: backhand's
//! tables, the tree built from them, then every entry looked up and every file read in
//! FUSE-sized requests through the block cache and decompressors). A read or a `MountError`,
//! never a panic that escapes the reader, never memory beyond the image's block size per read.
#![no_main]

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use cmpirun::mount::{SquashfsSource, read_through};
use libfuzzer_sys::fuzz_target;

/// At most this much of each file is read (files can claim any size).
const MAX_FILE: u64 = 1 << 20;

fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        // The reader catches panics of backhand's parser and turns them into errors; libFuzzer's
        // hook would abort on them first. Uncaught panics still abort (libfuzzer-sys checks).
        std::panic::set_hook(Box::new(|_| {}));
        std::env::temp_dir().join(format!("squashfs_read.{}.img", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    let Ok(mut f) = std::fs::File::create(path) else {
        return;
    };
    if f.write_all(data).is_err() {
        return;
    }
    drop(f);
    let src = SquashfsSource {
        path: path.clone(),
        offset: 0,
        size: data.len() as u64,
    };
    let _ = read_through(&src, MAX_FILE);
});
