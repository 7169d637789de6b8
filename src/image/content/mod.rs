//! What an image holds that a launch needs to know, read through a [`RootFs`] without mounting it:
//! the image's glibc, its MPI library and family, the libfabric its MPI loads and how the loader
//! finds it, the `FABRIC_x.y` and `GLIBC_x.y` versions its MPI stack needs, the PMI libraries it
//! links, and the Apptainer environment scripts and runscript.
//!
//! Library lookups follow the dynamic loader's order inside the image: `DT_RPATH` of the loading
//! object and then of the objects that loaded it (only when the object has no `DT_RUNPATH`),
//! `LD_LIBRARY_PATH` from the image's environment scripts, `DT_RUNPATH`, the image's
//! `ld.so.cache` (approximated by the directories of its `/etc/ld.so.conf`; only when the cache
//! exists, as the loader reads the cache, not the configuration), then the default directories.
//! `$ORIGIN` is the directory the loading object was found in, symlinks are resolved inside the
//! image, and files of another ELF class or machine are passed over. `tests/image_facts_vs_ld_so.rs`
//! checks the result against the images' own `ld.so`.
//!
//! `glibc-hwcaps` subdirectories are searched when the image's glibc is 2.33 or later, for this
//! machine's CPU.
//!
//! Not modelled: legacy hwcap subdirectories (`tls`, `haswell`, …), entries of an `ld.so.cache` that
//! its `ld.so.conf` no longer lists, and `LD_LIBRARY_PATH` set by scripts that must run to know it.
//!
//! One concern per file: `types.rs` (the facts and their errors), `loader.rs` (the loader's
//! search, emulated inside the image), `mpi.rs` (finding the MPI and reading its library stack),
//! `env_scripts.rs` (Apptainer's environment scripts, runscript and the `LD_LIBRARY_PATH` they
//! set), `ld_so_conf.rs` (the image's `/etc/ld.so.conf`, through the parser the host side uses
//! too), `files.rs` (paths and files inside the image), `summary.rs` (what `cmpirun image
//! inspect` prints).

mod env_scripts;
mod files;
mod ld_so_conf;
mod loader;
mod mpi;
mod summary;
#[cfg(test)]
mod tests;
mod types;

use crate::image::rootfs::RootFs;

pub use self::env_scripts::ld_library_path_from_scripts;
pub use self::types::{
    EnvScript, FactsError, FactsOptions, GlibcFacts, ImageFacts, LibfabricLink, MpiFacts,
    MpiFamily, ResolvedLibrary, Unresolved,
};
/// Which step of the loader's search found a library.
pub use cmpirun_fabric::loader::Via;

use self::loader::Loader;

/// Where the image's loader cache would be; the facts only ask whether it exists.
const LD_SO_CACHE: &str = "/etc/ld.so.cache";

/// Reads the facts of the image whose root filesystem is `fs`.
pub fn image_facts(fs: &dyn RootFs) -> Result<ImageFacts, FactsError> {
    image_facts_with(fs, &FactsOptions::default())
}

/// [`image_facts`] with the loader's environment chosen by the caller.
pub fn image_facts_with(fs: &dyn RootFs, options: &FactsOptions) -> Result<ImageFacts, FactsError> {
    let env_scripts = env_scripts::env_scripts(fs)?;
    let ld_library_path = match &options.ld_library_path {
        Some(dirs) => dirs.clone(),
        None => ld_library_path_from_scripts(&env_scripts),
    };
    let ld_so_cache = files::is_file(fs, LD_SO_CACHE)?;
    let ld_so_conf_dirs = ld_so_conf::ld_so_conf_dirs(fs)?;
    let runscript = env_scripts::runscript(fs)?;
    // The loader reads the cache, not the configuration: without a cache, no cache directories.
    let cache_dirs = if ld_so_cache {
        ld_so_conf_dirs.clone()
    } else {
        Vec::new()
    };
    let mut loader = Loader::new(fs, ld_library_path.clone(), cache_dirs);
    let mut notes = Vec::new();
    let glibc = loader.image_glibc(&mut notes)?;
    let (mpi, other_mpi_libraries) =
        mpi::discover(&loader, options.program.as_deref(), &mut notes)?;
    Ok(ImageFacts {
        glibc,
        mpi,
        other_mpi_libraries,
        ld_library_path,
        ld_so_cache,
        ld_so_conf_dirs,
        env_scripts,
        runscript,
        notes,
    })
}
