//! The `cmpirun` command line.
//!
//! `cmpirun image|exec|shell|profile …` are subcommands parsed with clap; anything else is an
//! mpirun-style launch (`cmpirun [flags] IMAGE PROGRAM [ARGS] [: …]`) parsed by `cmpirun::cli`,
//! because mpirun's single-dash long flags (`-np`, `-genv`) are not clap's.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use cmpirun::cli::{self, CliRequest};
use cmpirun::exit::Fatal;
use cmpirun::jobspec::DryRunFormat;
use cmpirun::{exit, facts, plan, profile};

/// Launch MPI jobs in unprivileged containers, one container per node.
#[derive(Debug, Parser)]
#[command(
    name = "cmpirun",
    version,
    about,
    after_help = "Any other first argument starts an mpirun-style launch:\n  cmpirun [flags] IMAGE PROGRAM [ARGS] [: [flags] IMAGE PROGRAM [ARGS]]...\nRun `cmpirun --help` for its flags."
)]
struct Cli {
    /// More log detail (-v info, -vv debug, -vvv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Inspect or build container images (SIF, squashfs, directories).
    #[command(subcommand)]
    Image(ImageCommand),
    /// Mount an image in a private user namespace and read or verify every file (tests and
    /// benchmarks of the mount backends).
    #[command(name = "__mount-check", hide = true)]
    MountCheck(MountCheckArgs),
    /// One rank of a job started by srun or mpiexec: join or create the node's container and
    /// run the rank in it (started by cmpirun itself; see docs/launch.md).
    #[command(name = "__rank", hide = true)]
    Rank {
        /// Where the launch plan is: a file, or `env:NAME` for an environment variable.
        #[arg(long)]
        plan: String,
    },
    /// Site profiles: which one applies on this host, why, and whether they are valid.
    Profile {
        #[command(subcommand)]
        action: ProfileAction,
    },
    /// Check that this node can run jobs (user namespaces, FUSE, the site profile, libfabric,
    /// caches, limits, a 2-rank smoke job); one PASS/WARN/FAIL line per check with its fix.
    /// Exits 0 (all passed), 3 (warnings) or 1 (a check failed). See docs/doctor.md.
    Doctor {
        /// Check this profile (a name or a path) instead of the one a launch would choose.
        #[arg(long)]
        profile: Option<String>,
        /// Print a JSON document instead of text.
        #[arg(long)]
        json: bool,
        /// Skip the 2-rank smoke job.
        #[arg(long)]
        no_smoke: bool,
    },
    /// Run a program in a container made from IMAGE (as `apptainer exec`).
    Exec {
        #[command(flatten)]
        opts: ContainerOpts,
        /// A SIF file, a plain squashfs file, an unpacked root directory, or an image in a
        /// registry (oras://HOST[:PORT]/REPO:TAG or …@sha256:DIGEST).
        image: std::path::PathBuf,
        /// The program and its arguments (looked up in the container's PATH).
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<OsString>,
    },
    /// Run an interactive shell ($SHELL if the image has it, else /bin/sh) in a container.
    Shell {
        #[command(flatten)]
        opts: ContainerOpts,
        /// A SIF file, a plain squashfs file, an unpacked root directory, or an image in a
        /// registry (oras://HOST[:PORT]/REPO:TAG or …@sha256:DIGEST).
        image: std::path::PathBuf,
    },
}

/// Options shared by `exec` and `shell`.
#[derive(Debug, clap::Args)]
struct ContainerOpts {
    /// Bind a host path into the container: SRC[:DST[:ro|rw]] (DST defaults to SRC).
    #[arg(long = "bind", short = 'B', value_name = "SRC[:DST[:ro]]")]
    binds: Vec<String>,
    /// Set an environment variable in the container (overrides the image's).
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// How to mount the image: fuse (built-in server), squashfuse (squashfuse_ll) or extract
    /// (unpack once into a cache). Default: fuse if /dev/fuse is usable, else extract.
    #[arg(long = "image-mount", value_name = "BACKEND")]
    image_mount: Option<cmpirun::mount::MountBackend>,
    /// /dev/shm in the container: private (a tmpfs shared by the node's container only) or host.
    #[arg(long, value_name = "private|host", default_value = "private", value_parser = parse_shm)]
    shm: cmpirun::container::ShmMode,
    /// Join the node instance of this key (created by the first process that uses it) instead
    /// of a private one; processes using one key share one container.
    #[arg(long, value_name = "KEY", hide = true)]
    instance_key: Option<String>,
    /// Speak plain HTTP (no TLS) to the registry of an oras:// image.
    #[arg(long)]
    insecure: bool,
}

fn parse_shm(s: &str) -> Result<cmpirun::container::ShmMode, String> {
    match s {
        "private" => Ok(cmpirun::container::ShmMode::Private),
        "host" => Ok(cmpirun::container::ShmMode::Host),
        _ => Err(format!("{s:?}: use private or host")),
    }
}

#[derive(Debug, clap::Args)]
struct MountCheckArgs {
    /// The image (SIF or squashfs).
    image: PathBuf,
    /// fuse, squashfuse, extract, or auto (the choice a launch makes).
    backend: String,
    /// An existing empty directory to mount the image on (inside the private namespace).
    #[arg(long)]
    target: PathBuf,
    /// Byte offset of the squashfs inside IMAGE (default: found from the image).
    #[arg(long)]
    offset: Option<u64>,
    /// Compare every entry with the image as backhand reads it, instead of only reading.
    #[arg(long)]
    verify: bool,
    /// After mounting, print the mount line and wait to be killed.
    #[arg(long)]
    hold: bool,
    /// Read the whole tree this many times (benchmarks: the first pass is cold, the others
    /// warm); one report line per pass.
    #[arg(long, default_value_t = 1)]
    passes: u32,
    /// Hide /dev/fuse (an empty /dev in the private namespace), as on a node without FUSE.
    #[arg(long)]
    hide_dev_fuse: bool,
    /// Also write the mount line to this file once mounted.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Directory of extracted images for the extract backend.
    #[arg(long)]
    extract_cache: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Show an image's SIF header and objects, its root filesystem, and what a launch needs
    /// from it (MPI family, libfabric, glibc, environment).
    Inspect {
        /// A SIF file, a plain squashfs file, an unpacked root directory, or an image in a
        /// registry (oras://HOST[:PORT]/REPO:TAG or …@sha256:DIGEST).
        image: std::path::PathBuf,
        /// Print a JSON document instead of text.
        #[arg(long)]
        json: bool,
        /// Speak plain HTTP (no TLS) to the registry of an oras:// image.
        #[arg(long)]
        insecure: bool,
    },
    /// Pull a SIF image from an OCI registry into the cache of pulled images (by its layer
    /// digest), and copy it to FILE with -o.
    Pull {
        /// oras://HOST[:PORT]/REPO:TAG or oras://HOST[:PORT]/REPO@sha256:DIGEST.
        image: String,
        /// Also copy the image to this file (replaced if it exists).
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Speak plain HTTP (no TLS) to the registry.
        #[arg(long)]
        insecure: bool,
    },
    /// Pack an unpacked root directory into a SIF image (squashfs primary partition).
    Pack {
        /// The root directory to pack (modes, owners, symlinks and times are kept).
        dir: std::path::PathBuf,
        /// The SIF file to write (replaced if it exists).
        #[arg(short, long)]
        output: std::path::PathBuf,
        /// Squashfs compression.
        #[arg(long, value_enum, default_value_t = cmpirun::image::pack::Compression::Zstd)]
        compression: cmpirun::image::pack::Compression,
        /// Compression level (zstd 1-22, default 3; gzip 1-9, default 6; xz 0-9, default 6).
        #[arg(long)]
        level: Option<u32>,
        /// Squashfs block size in bytes (power of two, 4096 to 1048576).
        #[arg(long, default_value_t = 131072)]
        block_size: u32,
        /// Reproducible output: zero image ID and fixed times, so the same tree gives the same
        /// bytes.
        #[arg(long)]
        deterministic: bool,
    },
    /// Check an image's signatures (DSSE envelopes with PEM keys, OpenPGP clear-signed
    /// metadata with a keyring): which objects each covers and which key made it. Exits 0 when
    /// verified signatures cover every object group, 2 when not.
    Verify {
        /// The SIF image.
        image: PathBuf,
        /// A PEM public key (ed25519, ECDSA P-256/P-384, RSA) for DSSE signatures; repeatable.
        #[arg(long = "key", value_name = "PEM")]
        keys: Vec<PathBuf>,
        /// An OpenPGP public keyring (armored or binary) for OpenPGP signatures.
        #[arg(long, value_name = "FILE")]
        keyring: Option<PathBuf>,
        /// Also trust legacy signatures (Singularity 3.5 and older), which cover object bytes
        /// only, not the header or the descriptors.
        #[arg(long)]
        legacy: bool,
        /// Print a JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Sign every object group of a SIF image in place with DSSE signatures (as `apptainer sign
    /// --key` does).
    Sign {
        /// The SIF image (changed in place).
        image: PathBuf,
        /// A PKCS #8 PEM private key (ed25519, ECDSA P-256/P-384, RSA); repeat for several
        /// signatures in one envelope.
        #[arg(long = "key", value_name = "PEM", required = true)]
        keys: Vec<PathBuf>,
    },
    /// List the extract backend's cache of unpacked images and the library cache of unpacked
    /// MPI stacks (least recently used first), or remove the entries no running job uses.
    Cache {
        /// Remove every entry not in use by a running job.
        #[arg(long)]
        clear: bool,
        /// Only this cache directory (default: both, $XDG_CACHE_HOME/cmpirun/extract and the
        /// library cache a launch would use: $CMPIRUN_LIBRARY_CACHE, the profile's
        /// library_cache, else $XDG_CACHE_HOME/cmpirun/libraries).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum ProfileAction {
    /// Print the profile a launch would use here, why it was chosen, and its merged settings.
    Show {
        /// Use this profile (a name or a path) instead of choosing one.
        #[arg(long)]
        profile: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Validate every profile in the search path, then choose one as a launch would and check
    /// its match rules on this host. Exits 2 if anything is wrong.
    Check {
        /// Check this profile (a name or a path) instead of choosing one.
        #[arg(long)]
        profile: Option<String>,
    },
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    if !names_subcommand(&args) {
        return launch_main(&args[1.min(args.len())..]);
    }
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE as u8 } else { 0 });
        }
    };
    init_logging(cli.verbose);
    match cli.command {
        Command::Image(cmd) => image_main(cmd),
        Command::MountCheck(args) => mount_check(args).unwrap_or_else(report),
        Command::Profile { action } => profile_main(action).unwrap_or_else(report),
        Command::Doctor {
            profile,
            json,
            no_smoke,
        } => doctor_main(profile, json, no_smoke, cli.verbose > 0).unwrap_or_else(report),
        Command::Exec {
            opts,
            image,
            command,
        } => container_main(opts, image, command),
        Command::Shell { opts, image } => {
            container_main(opts, image, cmpirun::container::run::shell_argv())
        }
        Command::Rank { plan } => match cmpirun::launch::rank::run(&plan) {
            Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
            Err(e) => report(e.into()),
        },
    }
}

/// `cmpirun doctor`: every check's line (or JSON), and the status of the worst.
fn doctor_main(
    profile: Option<String>,
    json: bool,
    no_smoke: bool,
    verbose: bool,
) -> Result<ExitCode, Fatal> {
    let report = cmpirun::doctor::run(&cmpirun::doctor::DoctorOptions {
        profile,
        no_smoke,
        cmpirun: None,
        verbose,
    });
    if json {
        emit_line(&serde_json::to_string_pretty(&report)?);
    } else {
        emit(&report.render_text());
    }
    Ok(ExitCode::from(report.exit_status() as u8))
}

/// `cmpirun exec` and `cmpirun shell`: exits as the program did.
fn container_main(opts: ContainerOpts, image: std::path::PathBuf, argv: Vec<OsString>) -> ExitCode {
    use cmpirun::container::run::{ExecRequest, exec, propagate};
    let image = match local_image(image, opts.insecure) {
        Ok(image) => image,
        Err(e) => return report(e),
    };
    let req = ExecRequest {
        image,
        binds: opts.binds,
        env: opts.env,
        backend: opts.image_mount,
        shm: opts.shm,
        instance_key: opts.instance_key,
        argv,
    };
    match exec(&req) {
        Ok(outcome) => ExitCode::from(propagate(outcome) as u8),
        Err(e) => report(e.into()),
    }
}

/// `cmpirun image …`.
fn image_main(cmd: ImageCommand) -> ExitCode {
    match cmd {
        ImageCommand::Inspect {
            image,
            json,
            insecure,
        } => local_image(image, insecure)
            .and_then(|image| image_inspect(&image, json))
            .unwrap_or_else(report),
        ImageCommand::Pull {
            image,
            output,
            insecure,
        } => image_pull(&image, output.as_deref(), insecure).unwrap_or_else(report),
        ImageCommand::Pack {
            dir,
            output,
            compression,
            level,
            block_size,
            deterministic,
        } => {
            let opts = cmpirun::image::pack::PackOptions {
                compression,
                level,
                block_size,
                deterministic,
                ..Default::default()
            };
            match cmpirun::image::pack::pack(&dir, &output, &opts) {
                Ok(r) => {
                    say(&format!(
                        "cmpirun: wrote {} ({} entries, {} of file data, squashfs {} at offset {})",
                        r.output.display(),
                        r.entries,
                        cmpirun::image::sif::human_size(r.file_bytes),
                        cmpirun::image::sif::human_size(r.squashfs_size),
                        r.squashfs_offset
                    ));
                    ExitCode::SUCCESS
                }
                Err(e) => report(e.into()),
            }
        }
        ImageCommand::Cache { clear, dir } => image_cache(clear, dir).unwrap_or_else(report),
        ImageCommand::Verify {
            image,
            keys,
            keyring,
            legacy,
            json,
        } => image_verify(&image, &keys, keyring.as_deref(), legacy, json).unwrap_or_else(report),
        ImageCommand::Sign { image, keys } => image_sign(&image, &keys).unwrap_or_else(report),
    }
}

/// `cmpirun image verify`: the report on stdout; 2 and one line on stderr when not verified.
fn image_verify(
    image: &std::path::Path,
    keys: &[PathBuf],
    keyring: Option<&std::path::Path>,
    legacy: bool,
    json: bool,
) -> Result<ExitCode, Fatal> {
    use cmpirun::image::integrity;
    let opts = integrity::VerifyOptions {
        keys: keys
            .iter()
            .map(|k| integrity::dsse::load_public_key(k))
            .collect::<Result<_, _>>()
            .map_err(integrity::IntegrityError::from)?,
        keyring: keyring
            .map(integrity::openpgp::load_keyring)
            .transpose()
            .map_err(integrity::IntegrityError::from)?,
        legacy,
    };
    let r = integrity::verify(image, &opts)?;
    if json {
        emit_line(&serde_json::to_string_pretty(&r)?);
    } else {
        emit(&integrity::render_text(&r));
    }
    if r.verified {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(exit::UsageError(format!(
            "{}: not verified: {}",
            image.display(),
            r.failure_summary()
        ))
        .into())
    }
}

/// `cmpirun image sign`.
fn image_sign(image: &std::path::Path, keys: &[PathBuf]) -> Result<ExitCode, Fatal> {
    use cmpirun::image::integrity;
    let keys = keys
        .iter()
        .map(|k| integrity::dsse::load_private_key(k))
        .collect::<Result<Vec<_>, _>>()
        .map_err(integrity::IntegrityError::from)?;
    let r = integrity::sign(image, &keys)?;
    for (group, id) in &r.signatures {
        say(&format!(
            "cmpirun: signed object group {group} of {} (signature object {id}, key {})",
            image.display(),
            r.keys.join(", ")
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// The file of the image argument `image`: itself, or for an `oras://` reference the pulled
/// file in the cache (pulled first if it is not there).
fn local_image(image: PathBuf, insecure: bool) -> Result<PathBuf, Fatal> {
    use cmpirun::image::oras;
    if !oras::is_oras(&image) {
        return Ok(image);
    }
    let opts = pull_options(insecure, None);
    let pulled = oras::pull_images(std::slice::from_ref(&image), &opts)?;
    Ok(pulled
        .into_iter()
        .flatten()
        .next()
        .map_or(image, |p| p.path))
}

/// How to pull an `oras://` image: plain HTTP with `insecure` (`--insecure`) or to the registries
/// the profile (`profile`, else the one a launch from here would choose) lists in
/// `insecure_registries`; a progress bar on a terminal.
fn pull_options(
    insecure: bool,
    profile: Option<&profile::SiteProfile>,
) -> cmpirun::image::oras::PullOptions {
    let chosen;
    let profile = match profile {
        Some(p) => Some(p),
        None => {
            chosen = choose_profile(None, &profile::ProfileSearch::from_env()).ok();
            chosen.as_ref().map(|c| &c.profile)
        }
    };
    cmpirun::image::oras::PullOptions {
        insecure,
        insecure_hosts: profile
            .map(|p| {
                p.insecure_registries
                    .iter()
                    .map(|h| h.as_str().to_owned())
                    .collect()
            })
            .unwrap_or_default(),
        progress: true,
        cache: None,
    }
}

/// `cmpirun image pull oras://… [-o FILE]`: the image's digests and its file in the cache.
fn image_pull(image: &str, output: Option<&Path>, insecure: bool) -> Result<ExitCode, Fatal> {
    use cmpirun::image::oras;
    let pulled = oras::pull(image, &pull_options(insecure, None))?;
    let r = &pulled.image;
    let mut text = format!(
        "{}
  pinned: {}
  layer:  {} ({} bytes)
  file:   {}
",
        r.given,
        r.reference,
        r.layer,
        r.size,
        pulled.path.display()
    );
    if let Some(out) = output {
        oras::copy_out(&pulled.path, out)?;
        text.push_str(&format!("  copied: {}\n", out.display()));
    }
    emit(&text);
    Ok(ExitCode::SUCCESS)
}

/// `cmpirun image cache [--clear]`: the entries of the extract cache and of the library cache
/// (or of the cache `--dir`), with their sizes.
fn image_cache(clear: bool, dir: Option<PathBuf>) -> Result<ExitCode, Fatal> {
    use cmpirun::mount;
    // Each cache with what its entries are called, and whether it is a library cache.
    let caches: Vec<(PathBuf, &str, bool)> = match dir {
        Some(dir) => vec![(dir, "entries", false)],
        None => {
            let Some(extract) = mount::default_extract_cache() else {
                return Err(exit::UsageError(
                    "cannot find the extract cache: neither XDG_CACHE_HOME nor HOME is set; use \
                     --dir DIR"
                        .into(),
                )
                .into());
            };
            std::iter::once((extract, "extracted images", false))
                .chain(library_cache_here().map(|d| (d, "library-cache entries", true)))
                .chain(cmpirun::image::oras::default_cache().map(|d| (d, "pulled images", false)))
                .collect()
        }
    };
    // A bad limit fails before anything is removed.
    let limit = mount::cache_limit()?;
    let mut text = String::new();
    for (dir, what, libraries) in caches {
        text.push_str(&cache_report(&dir, what, libraries, clear, limit)?);
    }
    emit(&text);
    Ok(ExitCode::SUCCESS)
}

/// The library cache a launch from here would use: `$CMPIRUN_LIBRARY_CACHE`, else the chosen
/// profile's `library_cache`, else the user's cache folder (also when no profile can be chosen).
fn library_cache_here() -> Option<PathBuf> {
    let vars: std::collections::BTreeMap<String, String> = std::env::vars().collect();
    match choose_profile(None, &profile::ProfileSearch::from_env()) {
        Ok(choice) => plan::library_cache_dir(&choice.profile, &vars, &mut Vec::new()).0,
        Err(_) => cmpirun::mount::library_cache_in(|k| vars.get(k).cloned()),
    }
}

/// The profile a launch from here uses: `named` (`--profile`), else `$CMPIRUN_PROFILE`, else
/// the profile in `search` whose match rules fit this host best.
fn choose_profile(
    named: Option<&str>,
    search: &profile::ProfileSearch,
) -> Result<profile::ProfileChoice, profile::ProfileError> {
    let env_profile = std::env::var("CMPIRUN_PROFILE").ok();
    let mut ctx = profile::MatchContext::from_host();
    profile::choose(named, env_profile.as_deref(), search, &mut ctx)
}

/// What `cmpirun image cache` says of one cache (`what` names its entries; `libraries`: the
/// library cache, whose entries say what they hold); with `clear`, after removing the entries
/// no running job uses.
fn cache_report(
    dir: &Path,
    what: &str,
    libraries: bool,
    clear: bool,
    limit: u64,
) -> Result<String, cmpirun::mount::MountError> {
    use cmpirun::image::sif::human_size;
    use cmpirun::mount;
    if clear {
        let removed = mount::clear_cache(dir)?;
        let bytes: u64 = removed.iter().map(|e| e.bytes).sum();
        let kept = mount::cache_entries(dir)?.len();
        return Ok(format!(
            "removed {} {what} ({}) from {}; {kept} in use kept\n",
            removed.len(),
            human_size(bytes),
            dir.display()
        ));
    }
    let entries = mount::cache_entries(dir)?;
    let total: u64 = entries.iter().map(|e| e.bytes).sum();
    let mut text = format!(
        "{}: {} {what}, {} (limit {}, {})\n",
        dir.display(),
        entries.len(),
        human_size(total),
        human_size(limit),
        mount::CACHE_LIMIT_ENV
    );
    for e in &entries {
        let age = e.last_used.elapsed().map(|d| d.as_secs()).unwrap_or(0);
        text.push_str(&format!(
            "{:>10}  last used {:>6} ago  {}{}{}\n",
            human_size(e.bytes),
            ago(age),
            e.path.display(),
            if libraries { entry_kind(&e.path) } else { "" },
            if e.in_use { "  (in use)" } else { "" }
        ));
    }
    Ok(text)
}

/// What a library-cache entry holds, by its name: `<image>` the image's C library and MPI
/// stack, `<image>-loads-<list>` the other ELF files its ranks loaded.
fn entry_kind(path: &Path) -> &'static str {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    if name.contains("-loads-") {
        "  (files the ranks loaded)"
    } else {
        "  (C library and MPI stack)"
    }
}

/// A short age: `42s`, `17m`, `5h`, `3d`.
fn ago(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Prints everything that can be read about `image`; when it cannot be launched, prints the
/// reason as a one-line error too and exits with the usage status.
fn image_inspect(image: &std::path::Path, json: bool) -> Result<ExitCode, Fatal> {
    let inspection = cmpirun::image::inspect::inspect(image)?;
    if json {
        emit_line(&serde_json::to_string_pretty(&inspection.report)?);
    } else {
        emit(&cmpirun::image::inspect::render_text(&inspection.report));
    }
    match inspection.problem {
        Some(problem) => Ok(report(problem.into())),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// `cmpirun profile show|check`.
fn profile_main(action: ProfileAction) -> Result<ExitCode, Fatal> {
    let search = profile::ProfileSearch::from_env();
    match action {
        ProfileAction::Show {
            profile: named,
            json,
        } => {
            let choice = choose_profile(named.as_deref(), &search)?;
            if json {
                emit_line(&serde_json::to_string_pretty(&choice)?);
            } else {
                emit(&profile::show::render_choice(&choice));
            }
            Ok(ExitCode::SUCCESS)
        }
        ProfileAction::Check { profile: named } => {
            let (lines, errors) = profile::show::validate_all(&search);
            for l in &lines {
                emit_line(l);
            }
            if let Some(e) = errors.into_iter().next() {
                return Err(e.into());
            }
            let choice = choose_profile(named.as_deref(), &search)?;
            emit(&profile::show::render_choice(&choice));
            if let Some(o) = choice.outcome.as_ref().filter(|o| !o.matched) {
                return Err(exit::UsageError(format!(
                    "{}:{}: profile {} does not match this host: {}",
                    choice.profile.file.display(),
                    choice.profile.match_line.unwrap_or(1),
                    choice.profile.name,
                    o.reasons.join("; ")
                ))
                .into());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Whether the first argument is one of the clap subcommands (`image`, `exec`, …) rather than
/// the start of an mpirun-style command line. An image file that happens to be called like a
/// subcommand can be written `./image`.
fn names_subcommand(args: &[OsString]) -> bool {
    let Some(first) = args.get(1).and_then(|a| a.to_str()) else {
        return false;
    };
    first == "help"
        || Cli::command()
            .get_subcommands()
            .any(|c| c.get_name() == first || c.get_all_aliases().any(|a| a == first))
}

/// The mpirun-style launch: argv → JobSpec, then [`run_launch`].
fn launch_main(args: &[OsString]) -> ExitCode {
    let request = match cli::parse_launch(args) {
        Ok(r) => r,
        Err(e) => return report(e.into()),
    };
    let spec = match request {
        CliRequest::Help => {
            emit(cli::HELP);
            return ExitCode::SUCCESS;
        }
        CliRequest::Version => {
            emit_line(&format!("cmpirun {}", env!("CARGO_PKG_VERSION")));
            return ExitCode::SUCCESS;
        }
        CliRequest::Launch(spec) => spec,
    };
    init_logging(spec.verbose);
    for w in &spec.warnings {
        tracing::warn!("{w}");
    }
    run_launch(&spec).unwrap_or_else(report)
}

/// One launch, as ARCHITECTURE.md draws it: JobSpec → profile → host facts → image facts →
/// plan → checks → launch (or print the plan). Files are read and the host libfabric is probed
/// here, before the plan; nothing is mounted or started before `launch`.
fn run_launch(spec: &cmpirun::jobspec::JobSpec) -> Result<ExitCode, Fatal> {
    if spec.dry_run == Some(DryRunFormat::Job) {
        emit_line(&serde_json::to_string_pretty(spec)?);
        return Ok(ExitCode::SUCCESS);
    }
    let choice = choose_profile(spec.profile.as_deref(), &profile::ProfileSearch::from_env())?;
    // Host facts first: the libfabric probe forks, which needs a single-threaded process. Images
    // are read in a child process, so that whatever reading them starts (threads) does not stay
    // in this one, which the local launcher forks the node instance and the ranks from.
    // An oras:// image is resolved to its digest once, here, and its file is read from the
    // cache; the plan carries the digest to every node (a tag moved meanwhile cannot split the
    // job). The client starts no thread.
    let given: Vec<PathBuf> = spec.apps.iter().map(|a| a.image.clone()).collect();
    let pull = pull_options(spec.insecure, Some(&choice.profile));
    let pulled = cmpirun::image::oras::pull_images(&given, &pull)?;
    let host = facts::HostFacts::gather(spec, &choice.profile);
    let image_paths: Vec<PathBuf> = given
        .iter()
        .zip(&pulled)
        .map(|(g, p)| p.as_ref().map_or_else(|| g.clone(), |p| p.path.clone()))
        .collect();
    let mut images = facts::gather_images(&image_paths);
    for (info, p) in images.iter_mut().zip(pulled) {
        info.registry = p.map(|p| p.image);
    }
    let mut plan = plan::build(spec, &choice, &images, &host)?;
    // Signatures are checked here, on the front end, before any node mounts an image.
    let signature_policy = plan::signatures::policy(spec, &choice.profile);
    if signature_policy.policy != cmpirun::jobspec::VerifyPolicy::Off {
        let results =
            cmpirun::image::integrity::verify_images(&image_paths, &signature_policy.keys);
        plan.checks
            .extend(plan::signatures::checks(&signature_policy, &results));
    }
    if let Some(format) = spec.dry_run {
        print_plan(&plan, format)?;
        return Ok(ExitCode::SUCCESS);
    }
    check_plan(spec, &plan)?;
    for line in plan::summary(&plan) {
        tracing::info!("{line}");
    }
    if spec.display_map {
        say(plan::layout_text(&plan).trim_end());
    }
    // Single-threaded up to here: the node instance and the ranks are forked next.
    let code = cmpirun::launch::launch(&plan)?;
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

/// `--dry-run`: the plan as text, or as JSON.
fn print_plan(plan: &plan::LaunchPlan, format: DryRunFormat) -> Result<(), serde_json::Error> {
    match format {
        DryRunFormat::Json => emit_line(&serde_json::to_string_pretty(plan)?),
        _ => emit(&plan::dry_run_text(plan)),
    }
    Ok(())
}

/// The plan's warnings and checks before a launch: a failed check stops it (a usage error that
/// names every failed check) unless `--force`, which only warns.
fn check_plan(
    spec: &cmpirun::jobspec::JobSpec,
    plan: &plan::LaunchPlan,
) -> Result<(), exit::UsageError> {
    for w in &plan.warnings {
        if !spec.warnings.contains(w) {
            tracing::warn!("{w}");
        }
    }
    if !plan.may_launch() {
        let failed: Vec<String> = plan
            .failed_checks()
            .map(|c| format!("{}: {}", c.name, c.message))
            .collect();
        // --force is offered only when it would launch.
        let hint = if plan.failed_checks().all(|c| c.force_helps()) {
            "run with --dry-run to see the whole plan, or --force to launch anyway"
        } else {
            "run with --dry-run to see the whole plan"
        };
        return Err(exit::UsageError(format!(
            "not launching: {} ({hint})",
            failed.join("; ")
        )));
    }
    // Checks that only warn are for the user to see at launch too, not only in --dry-run.
    for c in plan
        .checks
        .iter()
        .filter(|c| c.verdict == plan::Verdict::Warn)
    {
        tracing::warn!("{}: {}", c.name, c.message);
    }
    // Failed checks left at this point were overridden with --force: say which.
    for c in plan.failed_checks() {
        tracing::warn!(
            "--force: launching although the {} check failed: {}",
            c.name,
            c.message
        );
    }
    Ok(())
}

/// `cmpirun __mount-check`: enter a private user+mount namespace, mount IMAGE with BACKEND,
/// then walk it, printing one JSON line when mounted and one with the report.
fn mount_check(args: MountCheckArgs) -> Result<ExitCode, Fatal> {
    use cmpirun::mount::{self, MountOptions, SquashfsSource};
    use std::io::Write;
    let requested: Option<mount::MountBackend> = match args.backend.as_str() {
        "auto" => None,
        name => Some(name.parse()?),
    };
    let len = std::fs::metadata(&args.image)
        .map_err(|e| exit::UsageError(format!("{}: {e}", args.image.display())))?
        .len();
    let (offset, size) = match args.offset {
        Some(off) => (off, len.saturating_sub(off)),
        None => match cmpirun::image::locate(&args.image) {
            Ok(loc) => (loc.squashfs_offset, loc.squashfs_size),
            Err(_) => (0, len),
        },
    };
    let src = SquashfsSource {
        path: std::path::absolute(&args.image)?,
        offset,
        size,
    };

    let opts = MountOptions {
        extract_cache: args.extract_cache,
        ..MountOptions::default()
    };
    mount::enter_private_namespaces()?;
    if args.hide_dev_fuse {
        // A node without FUSE, for real: an empty /dev in this mount namespace only.
        nix::mount::mount(
            Some("tmpfs"),
            "/dev",
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )?;
    }
    let backend = mount::choose_backend(requested)?;
    let started = std::time::Instant::now();
    let mounted = mount::mount_squashfs(&src, &args.target, backend, &opts)?;
    let mount_seconds = started.elapsed().as_secs_f64();
    let line = serde_json::json!({
        "mounted": args.target,
        "backend": backend,
        "server_pid": mounted.server_pid(),
        "pid": std::process::id(),
        "mount_seconds": mount_seconds,
        // The node instance must stay single-threaded after mounting (setns, fork without exec).
        "threads": lasting_threads(),
    });
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    if let Some(file) = &args.ready_file {
        std::fs::write(file, format!("{line}\n"))?;
    }
    if args.hold {
        loop {
            std::thread::park();
        }
    }
    let mut clean = true;
    for _ in 0..args.passes.max(1) {
        let report = mount::check_mounted_tree(&src, &args.target, args.verify)?;
        clean &= report.problems.is_empty();
        writeln!(out, "{}", serde_json::to_string(&report)?)?;
    }
    mounted.unmount()?;
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(exit::FAILURE as u8)
    })
}

/// This process's threads, not counting those that are still leaving: a joined thread (the
/// extract backend unpacks on several) can stay listed in `/proc/self/task` for a moment after
/// its join returned. Waits up to a second for the count to reach one.
fn lasting_threads() -> usize {
    let count = || {
        std::fs::read_dir("/proc/self/task")
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    let mut n = count();
    while n > 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
        n = count();
    }
    n
}

/// Writes `text` to stdout. When the reader has gone away (`cmpirun image inspect IMAGE | head`),
/// the command ends quietly with status 0, as other Unix tools' output ends there, rather than
/// with a panic; only commands that hold nothing to clean up print through here.
fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            say(&format!("cmpirun: cannot write to standard output: {e}"));
            std::process::exit(exit::FAILURE);
        }
        std::process::exit(0);
    }
}

/// Writes `line` and a line end to stderr; a closed stderr drops it (`eprintln!` would panic).
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// [`emit`] with a line end.
fn emit_line(text: &str) {
    emit(&format!("{text}\n"));
}

/// Prints the error that ends cmpirun on one line and ends with the status it carries: 2 for
/// anything the user can fix by changing the command line or an input file, 1 otherwise (the
/// error's [`exit::Blame`], asked when it became a [`Fatal`]).
fn report(err: Fatal) -> ExitCode {
    say(&format!("cmpirun: {err}"));
    ExitCode::from(err.status() as u8)
}

/// cmpirun's log output: standard error, where a failed write (a reader that went away, as
/// with `cmpirun -v … 2>&1 | head`) drops the line. The log never stops or fails the job, and
/// the logger never reports its own failure (which would panic writing to the same closed
/// stream).
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().lock().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logging(verbose: u8) {
    // backhand logs every corrupt-image detail at error level; cmpirun reports those itself in
    // one line, so backhand's own messages appear only when asked for with -vvv. fuser warns
    // about every operation the image server leaves to its default answer (ENOSYS for xattrs,
    // which `ls -l` asks for): noise to a user, shown with -vvv.
    // -v and -vv are cmpirun's own decisions and steps; the dependencies' chatter (backhand's
    // reading of every image, fuser's line per FUSE request) only comes with -vvv.
    let level = match verbose {
        0 => "warn,backhand=off,fuser=error",
        1 => "warn,cmpirun=info,cmpirun_pmi=info,cmpirun_fabric=info,backhand=off,fuser=error",
        2 => "warn,cmpirun=debug,cmpirun_pmi=debug,cmpirun_fabric=debug,backhand=off,fuser=error",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CMPIRUN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .init();
}
