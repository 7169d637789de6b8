//! The image's `/etc/ld.so.conf`, read with `cmpirun_fabric::loader`'s parser through the image's
//! [`RootFs`] (the host side reads the host's files with the same parser).

use cmpirun_fabric::loader::{ConfFiles, ld_so_conf_dirs_in};

use crate::image::rootfs::RootFs;

use super::files::{is_dir, list_dir, lossy, read, resolved_file};
use super::types::FactsError;

/// The image's `ld.so.conf`.
pub(super) const LD_SO_CONF: &str = "/etc/ld.so.conf";

/// Files inside the image, for the `ld.so.conf` parser: symlinks resolved inside the image, and
/// a file that exists but cannot be read stops the facts.
struct ImageFiles<'a>(&'a dyn RootFs);

impl ConfFiles for ImageFiles<'_> {
    type Error = FactsError;

    fn regular_file(&self, path: &str) -> Result<Option<String>, FactsError> {
        resolved_file(self.0, path)
    }

    fn read_text(&self, real: &str) -> Result<Option<String>, FactsError> {
        Ok(Some(lossy(read(self.0, real)?)))
    }

    fn dir_entries(&self, dir: &str) -> Result<Vec<String>, FactsError> {
        if !is_dir(self.0, dir)? {
            return Ok(Vec::new());
        }
        list_dir(self.0, dir)
    }
}

/// The directories of the image's `/etc/ld.so.conf`, following `include` lines.
pub(super) fn ld_so_conf_dirs(fs: &dyn RootFs) -> Result<Vec<String>, FactsError> {
    ld_so_conf_dirs_in(&ImageFiles(fs), LD_SO_CONF)
}
