//! The cache of verified images: a launch that checks signatures (`--verify`, the profile's
//! `verify:`) hashes every signed object of its images, the whole squashfs (34 ms for the 36 MB
//! `mpich4` test image); an image verified by an earlier launch, unchanged since, with the same
//! keys and the same cmpirun, is taken from here instead.
//!
//! An entry is kept only for an image that verified, only when the file's identity was the
//! same before and after it was read, and only when the file had last changed more than a second
//! before (the kernel stamps times from a clock that moves in steps of a few milliseconds, so a
//! write during the reading could otherwise leave the change time as it was). Its key is that
//! identity as the open file has it (device, inode, size, modification and change times: any
//! write changes the change time, which no user can set back; a file put in its place has
//! another inode), the fingerprints of the keys (SHA-256 digests of the keys as loaded), and the
//! cmpirun executable. The entries are in the user's cache folder, which is the
//! user's to write as much as the library cache whose copies the ranks load; a failed or
//! unverified image is never kept, so it is checked again at every launch.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{VerifyOptions, VerifyReport};
use crate::facts::cache::{ExeIdentity, FileIdentity, JsonStore, user_cache_dir};

/// The version of the entries' format: raise it when [`VerifyReport`] or what it means changes.
const FORMAT: u32 = 1;

/// The images earlier launches verified, one small JSON file each.
#[derive(Debug, Clone)]
pub struct VerifiedCache {
    store: JsonStore,
}

/// What an entry of the [`VerifiedCache`] is valid for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifiedKey {
    format: u32,
    cmpirun: ExeIdentity,
    image: FileIdentity,
    /// The SHA-256 fingerprint of each key (`SHA256:…`), in the order given.
    keys: Vec<String>,
}

impl VerifiedKey {
    /// The key of the image open as `file`, verified with the keys of `opts` (by their
    /// fingerprints: digests of the keys as loaded, so of exactly what the verification used);
    /// `None` when the image cannot be examined, or `opts` holds an OpenPGP keyring or trusts
    /// legacy signatures (what a launch never does: nothing is cached then).
    pub fn of(file: &File, opts: &VerifyOptions) -> Option<VerifiedKey> {
        if opts.keyring.is_some() || opts.legacy {
            return None;
        }
        Some(VerifiedKey {
            format: FORMAT,
            cmpirun: ExeIdentity::current()?,
            image: FileIdentity::of(&file.metadata().ok()?),
            keys: opts.keys.iter().map(|k| k.fingerprint.clone()).collect(),
        })
    }
}

impl VerifiedKey {
    /// Whether the image had last changed more than [`SETTLED`] before `started` (when its
    /// reading began): then a write during the reading would have moved its change time.
    pub fn settled_before(&self, started: std::time::SystemTime) -> bool {
        let Ok(since) = started.duration_since(std::time::UNIX_EPOCH) else {
            return false;
        };
        self.image.ctime_ns + SETTLED.as_nanos() as i128 <= since.as_nanos() as i128
    }
}

/// How long before a verification its image must have last changed for the result to be kept.
const SETTLED: std::time::Duration = std::time::Duration::from_secs(1);

impl VerifiedCache {
    /// A cache kept in `dir` (created when the first entry is written).
    pub fn new(dir: &Path) -> VerifiedCache {
        VerifiedCache {
            store: JsonStore::new(dir, "cache of verified images"),
        }
    }

    /// The user's cache: `$XDG_CACHE_HOME/cmpirun/verified`, else
    /// `$HOME/.cache/cmpirun/verified`; `None` when neither variable is set.
    pub fn from_env() -> Option<VerifiedCache> {
        Some(VerifiedCache::new(&user_cache_dir("verified")?))
    }

    /// The file of the entry for `key`.
    pub fn entry_path(&self, key: &VerifiedKey) -> PathBuf {
        self.store.entry_path(key)
    }

    /// The report of an earlier verification of the image `image` (as given now) under `key`,
    /// if one is kept; it is a verified one.
    pub fn load(&self, image: &Path, key: &VerifiedKey) -> Option<VerifyReport> {
        let report: VerifyReport = self.store.load(key)?;
        if !report.verified {
            return None;
        }
        tracing::debug!(
            "signatures of {} verified by an earlier launch ({})",
            image.display(),
            self.entry_path(key).display()
        );
        Some(VerifyReport {
            image: image.to_owned(),
            ..report
        })
    }

    /// Keeps `report` under `key` if it says the image verified.
    pub fn store(&self, key: &VerifiedKey, report: &VerifyReport) {
        if report.verified {
            self.store.store(key, report);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::verify_images_with;
    use super::*;

    #[test]
    fn an_unchanged_verified_image_comes_from_the_cache_and_nothing_else_does() {
        let dir = tempfile::tempdir().unwrap();
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sif");
        let image = dir.path().join("signed.sif");
        std::fs::copy(fixtures.join("one-group-signed-dsse.sif"), &image).unwrap();
        let keys = vec![fixtures.join("keys/ed25519-public.pem")];
        let cache = VerifiedCache::new(&dir.path().join("verified"));
        let run = |keys: &[PathBuf]| {
            let r = verify_images_with(std::slice::from_ref(&image), keys, Some(&cache));
            let verified = r[0].outcome.as_ref().is_ok_and(|rep| rep.verified);
            (r[0].cached, verified)
        };
        // Changed a moment ago: verified, not kept (a write now could keep its times).
        assert_eq!(run(&keys), (false, true));
        assert_eq!(run(&keys), (false, true));
        std::thread::sleep(SETTLED + std::time::Duration::from_millis(100));
        assert_eq!(run(&keys), (false, true));
        assert_eq!(run(&keys), (true, true));
        // Another key: checked (and not verified, so not kept).
        let other = vec![fixtures.join("keys/ecdsa-public.pem")];
        assert_eq!(run(&other), (false, false));
        assert_eq!(run(&other), (false, false));
        // Written again, even with the same bytes: checked again.
        std::fs::write(&image, std::fs::read(&image).unwrap()).unwrap();
        assert_eq!(run(&keys), (false, true));
        // Another file at the path: checked again, and its verdict is its own.
        let unsigned = dir.path().join("unsigned.sif");
        std::fs::copy(fixtures.join("one-group.sif"), &unsigned).unwrap();
        std::fs::rename(&unsigned, &image).unwrap();
        assert_eq!(run(&keys), (false, false));
    }
}
