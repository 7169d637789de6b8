//! Which files a running process has mapped, from `/proc/<pid>/maps`: the evidence that a rank
//! loaded the injected host libfabric (the host file's device and inode) and not the image's
//! copy, whatever path the container shows for it; and which files it holds open
//! ([`open_files`]): a fabric device open is the evidence that it uses that provider.
//!
//! ```no_run
//! use cmpirun_fabric::maps::{mapped_files, same_file};
//!
//! let host = std::fs::metadata("/usr/lib/x86_64-linux-gnu/libfabric.so.1")?;
//! let maps = mapped_files(std::process::id() as i32)?;
//! let loaded = maps.iter().find(|m| m.path.ends_with("/libfabric.so.1.20.0"));
//! println!("host libfabric loaded: {}", loaded.is_some_and(|m| same_file(m, &host)));
//! # Ok::<(), std::io::Error>(())
//! ```

use std::fs::Metadata;
use std::io;
use std::os::unix::fs::MetadataExt;

/// One file mapped into a process (each file once, however many regions it has).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MappedFile {
    /// The path as the process sees it (inside its mount namespace).
    pub path: String,
    /// The device's major number.
    pub dev_major: u32,
    /// The device's minor number.
    pub dev_minor: u32,
    /// The inode.
    pub inode: u64,
}

/// The files mapped into process `pid`.
pub fn mapped_files(pid: i32) -> io::Result<Vec<MappedFile>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    Ok(parse_maps(&text))
}

/// Parses the text of a `/proc/<pid>/maps` file; lines that map no file (anonymous memory,
/// `[heap]`, `[stack]`) and lines that do not parse are skipped.
pub fn parse_maps(text: &str) -> Vec<MappedFile> {
    let mut files: Vec<MappedFile> = Vec::new();
    for line in text.lines() {
        let Some(file) = parse_line(line) else {
            continue;
        };
        if !files.contains(&file) {
            files.push(file);
        }
    }
    files
}

fn parse_line(line: &str) -> Option<MappedFile> {
    // address perms offset dev inode path; the path may contain spaces, so split five fields off.
    let mut rest = line;
    let mut fields = [""; 5];
    for field in &mut fields {
        rest = rest.trim_start();
        let end = rest.find(' ')?;
        *field = &rest[..end];
        rest = &rest[end..];
    }
    let path = rest.trim_start();
    let inode: u64 = fields[4].parse().ok()?;
    if inode == 0 || !path.starts_with('/') {
        return None;
    }
    let (major, minor) = fields[3].split_once(':')?;
    Some(MappedFile {
        // A deleted file keeps its mapping; its name then ends in " (deleted)".
        path: path.to_owned(),
        dev_major: u32::from_str_radix(major, 16).ok()?,
        dev_minor: u32::from_str_radix(minor, 16).ok()?,
        inode,
    })
}

/// The files process `pid` holds open (the targets of `/proc/<pid>/fd/*`, as the process sees
/// them: `/dev/cxi0`, `socket:[123]`, `pipe:[456]`). A descriptor closed while the directory is
/// read is skipped.
pub fn open_files(pid: i32) -> io::Result<Vec<String>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(entry) = entry else { continue };
        if let Ok(target) = std::fs::read_link(entry.path()) {
            files.push(target.to_string_lossy().into_owned());
        }
    }
    Ok(files)
}

/// Whether a mapping is of the file whose metadata is `meta` (same device and inode).
pub fn same_file(mapped: &MappedFile, meta: &Metadata) -> bool {
    let dev = meta.dev();
    mapped.inode == meta.ino()
        && mapped.dev_major == libc::major(dev)
        && mapped.dev_minor == libc::minor(dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_format() {
        let text = "\
55d0c0a00000-55d0c0a02000 r--p 00000000 fe:00 10076208                   /usr/lib/x86_64-linux-gnu/libfabric.so.1.20.0
55d0c0a02000-55d0c0a40000 r-xp 00002000 fe:00 10076208                   /usr/lib/x86_64-linux-gnu/libfabric.so.1.20.0
7f0000000000-7f0000021000 rw-p 00000000 00:00 0 
7ffd5e1f0000-7ffd5e211000 rw-p 00000000 00:00 0                          [stack]
7f1000000000-7f1000001000 r--p 00000000 00:27 216                        /opt/my lib/libx.so (deleted)
";
        let files = parse_maps(text);
        assert_eq!(files.len(), 2);
        assert_eq!(
            files[0],
            MappedFile {
                path: "/usr/lib/x86_64-linux-gnu/libfabric.so.1.20.0".into(),
                dev_major: 0xfe,
                dev_minor: 0,
                inode: 10076208,
            }
        );
        assert_eq!(files[1].path, "/opt/my lib/libx.so (deleted)");
        assert_eq!(files[1].dev_minor, 0x27);
        assert!(parse_maps("garbage\n\n1 2 3\n").is_empty());
    }

    #[test]
    fn this_process_maps_its_libc() {
        let files = mapped_files(std::process::id() as i32).unwrap();
        let libc = files
            .iter()
            .find(|m| m.path.contains("/libc.so.6"))
            .expect("libc mapped");
        let meta = std::fs::metadata(&libc.path).unwrap();
        assert!(same_file(libc, &meta));
        let other = std::fs::metadata("/etc/hostname").unwrap();
        assert!(!same_file(libc, &other));
    }
}
