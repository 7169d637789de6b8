//! Apptainer's environment scripts (`/.singularity.d/env/*.sh`) and runscript, and the
//! `LD_LIBRARY_PATH` the scripts set, as far as it can be read without running them.

use crate::image::rootfs::RootFs;

use super::files::{is_dir, join, list_dir, lossy, read, resolved_file};
use super::types::{EnvScript, FactsError};

/// Where Apptainer keeps the scripts it sources before running anything in the image.
const ENV_DIR: &str = "/.singularity.d/env";
/// The image's default program.
pub(super) const RUNSCRIPT: &str = "/.singularity.d/runscript";

/// `/.singularity.d/env/*.sh`, in the order Apptainer sources them.
pub(super) fn env_scripts(fs: &dyn RootFs) -> Result<Vec<EnvScript>, FactsError> {
    if !is_dir(fs, ENV_DIR)? {
        return Ok(Vec::new());
    }
    let mut scripts = Vec::new();
    for name in list_dir(fs, ENV_DIR)? {
        if !name.ends_with(".sh") {
            continue;
        }
        if let Some(real) = resolved_file(fs, &join(ENV_DIR, &name))? {
            scripts.push(EnvScript {
                name,
                contents: lossy(read(fs, &real)?),
            });
        }
    }
    Ok(scripts)
}

/// `LD_LIBRARY_PATH` as plain assignments in the scripts leave it. Only literal values, the
/// previous value (`$LD_LIBRARY_PATH`, `${LD_LIBRARY_PATH}`) and the Docker-conversion form
/// `${LD_LIBRARY_PATH:-"/x"}` are understood; an assignment using anything else is skipped,
/// since its value cannot be known without running the script.
pub fn ld_library_path_from_scripts(scripts: &[EnvScript]) -> Vec<String> {
    let mut value = String::new();
    for script in scripts {
        for line in script.contents.lines() {
            let line = line.trim();
            let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
            let Some(rhs) = line.strip_prefix("LD_LIBRARY_PATH=") else {
                continue;
            };
            if let Some(v) = expand_ld_library_path(rhs, &value) {
                value = v;
            }
        }
    }
    // Scripts are read line by line without their conditionals, so both branches of an
    // if/else may apply; the loader searches a repeated directory once anyway.
    let mut dirs: Vec<String> = Vec::new();
    for d in value.split(':').filter(|d| d.starts_with('/')) {
        if !dirs.iter().any(|x| x == d) {
            dirs.push(d.to_owned());
        }
    }
    dirs
}

/// The value an assignment `LD_LIBRARY_PATH=rhs` leaves, given the `previous` one; `None` when
/// it cannot be known without running the script.
fn expand_ld_library_path(rhs: &str, previous: &str) -> Option<String> {
    let mut s = unquote(rhs.trim())?;
    // Docker conversion: ${LD_LIBRARY_PATH:-"/a:/b"} keeps an existing value, else the default.
    if let Some(inner) = s
        .strip_prefix("${LD_LIBRARY_PATH:-")
        .and_then(|r| r.strip_suffix('}'))
    {
        return if previous.is_empty() {
            unquote(inner)
        } else {
            Some(previous.to_owned())
        };
    }
    for var in ["${LD_LIBRARY_PATH}", "$LD_LIBRARY_PATH"] {
        s = s.replace(var, previous);
    }
    if s.contains('$') || s.contains('`') {
        return None;
    }
    Some(s)
}

/// A shell word without its quotes; `None` for anything more than one plain or quoted word.
fn unquote(s: &str) -> Option<String> {
    let s = s.trim();
    for q in ['"', '\''] {
        if let Some(inner) = s.strip_prefix(q) {
            return inner.strip_suffix(q).map(str::to_owned);
        }
    }
    if s.contains(char::is_whitespace) || s.contains(';') {
        return None;
    }
    Some(s.to_owned())
}

/// `/.singularity.d/runscript`, if present.
pub(super) fn runscript(fs: &dyn RootFs) -> Result<Option<String>, FactsError> {
    match resolved_file(fs, RUNSCRIPT)? {
        Some(real) => Ok(Some(lossy(read(fs, &real)?))),
        None => Ok(None),
    }
}
