//! The test user's processes as `/proc` shows them, for the leftover checks and for killing a
//! run's processes by tag.

use std::fs;
use std::os::unix::fs::MetadataExt;

use super::{TAG_VAR, tuser};

/// One process of the test user, as seen in `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    /// Process id.
    pub pid: i32,
    /// Parent process id.
    pub ppid: i32,
    /// Start time in clock ticks since boot (with the pid, identifies the process).
    pub start: u64,
    /// Command name.
    pub comm: String,
    /// Command line, arguments joined by spaces.
    pub cmdline: String,
    /// The value of [`TAG_VAR`] in its environment, if any.
    pub tag: Option<String>,
    /// `/proc/PID/ns/user` link text, e.g. `user:[4026532000]`.
    pub userns: String,
    /// `/proc/PID/ns/mnt` link text.
    pub mntns: String,
}

/// Every process of `uid` in `/proc` (zombies left out).
pub(super) fn list_processes(uid: u32) -> Vec<ProcInfo> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let Ok(meta) = fs::metadata(&dir) else {
            continue;
        };
        if meta.uid() != uid {
            continue;
        }
        let Ok(stat) = fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        // comm is in parentheses and may contain spaces; the fields after the last ')' are fixed.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // rest[0] is the state; ppid is field 4 and starttime field 22 of stat(5).
        if rest.first() == Some(&"Z") {
            // A zombie waiting for its parent is that parent's business, not a leftover yet.
            continue;
        }
        let ppid = rest.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let start = rest.get(19).and_then(|s| s.parse().ok()).unwrap_or(0);
        let cmdline = fs::read(dir.join("cmdline"))
            .map(|b| {
                b.split(|&c| c == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        let tag = fs::read(dir.join("environ")).ok().and_then(|env| {
            let prefix = format!("{TAG_VAR}=");
            env.split(|&c| c == 0).find_map(|kv| {
                kv.strip_prefix(prefix.as_bytes())
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
        });
        let link = |ns: &str| {
            fs::read_link(dir.join("ns").join(ns))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        out.push(ProcInfo {
            pid,
            ppid,
            start,
            comm,
            cmdline,
            tag,
            userns: link("user"),
            mntns: link("mnt"),
        });
    }
    out
}

/// The processes of the test user whose environment carries `tag` in [`TAG_VAR`]: those of one
/// run (zombies left out).
pub fn tagged_processes(tag: &str) -> Vec<ProcInfo> {
    list_processes(tuser().uid)
        .into_iter()
        .filter(|p| p.tag.as_deref() == Some(tag))
        .collect()
}
