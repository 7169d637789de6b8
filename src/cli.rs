//! The mpirun-compatible command line: `cmpirun [flags] IMAGE PROGRAM [ARGS] [: [flags] IMAGE PROGRAM [ARGS]]…`.
//!
//! mpirun's flags are single-dash multi-letter words (`-np`, `-genv`, `-ppn`, `-wdir`) mixed with
//! GNU-style long flags (`--hostfile`, `--tag-output`), which clap cannot parse, so this is a small
//! parser over a table of flags ([`FLAGS`]). Everything after the image is the program and its
//! arguments, verbatim, up to a lone `:` that starts the next MPMD part. Flags that only tune
//! placement or binding are accepted with a warning (see `docs/launch.md`).

use std::path::{Path, PathBuf};

use crate::jobspec::{
    AppSpec, BindSpec, BindTo, DryRunFormat, EnvInherit, EnvSetting, HostSlots, JobSpec,
    LauncherKind, Mapping, MountBackendKind, OutputTag, PmiKind, Rankfile, RankfileLine,
    VerifyPolicy,
};

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CliRequest {
    /// Launch (or, with `--dry-run`, plan) a job.
    Launch(Box<JobSpec>),
    /// `--help`: print [`HELP`].
    Help,
    /// `--version`.
    Version,
}

/// A bad command line. Every variant names the flag, file or part at fault; the binary exits
/// with status 2 (`cmpirun::exit::USAGE`) for all of them.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A flag that is neither cmpirun's nor a known mpirun flag.
    #[error("unknown flag {flag}; run `cmpirun --help` for the flags cmpirun knows")]
    UnknownFlag {
        /// The flag as given.
        flag: String,
    },
    /// A flag whose value(s) are missing at the end of the command line or before `:`.
    #[error("{flag} needs {what}")]
    MissingValue {
        /// The flag.
        flag: String,
        /// What it needs, e.g. "a number of processes".
        what: &'static str,
    },
    /// A flag whose value is not acceptable.
    #[error("{flag} {value:?}: {message}")]
    BadValue {
        /// The flag.
        flag: String,
        /// The value given.
        value: String,
        /// What is wrong and what is expected.
        message: String,
    },
    /// A flag that was given a boolean value (`--force=yes`).
    #[error("{flag} takes no value")]
    UnexpectedValue {
        /// The flag.
        flag: String,
    },
    /// A part of the command line without an image.
    #[error(
        "{part}no image given; the command line is `cmpirun [flags] IMAGE PROGRAM [ARGS] [: …]`"
    )]
    MissingImage {
        /// "part N: " for MPMD command lines, empty otherwise.
        part: String,
    },
    /// A part with an image but no program.
    #[error(
        "{part}no program given after the image {image}; the command line is `cmpirun [flags] IMAGE PROGRAM [ARGS]`"
    )]
    MissingProgram {
        /// "part N: " for MPMD command lines, empty otherwise.
        part: String,
        /// The image given.
        image: String,
    },
    /// Two flags that contradict each other.
    #[error("{first} and {second} cannot be used together")]
    Conflict {
        /// One flag.
        first: &'static str,
        /// The other.
        second: &'static str,
    },
    /// A flag that only makes sense with another one.
    #[error("{flag} needs {needs}")]
    Requires {
        /// The flag given.
        flag: &'static str,
        /// The flag it needs.
        needs: &'static str,
    },
    /// A file named by a flag (hostfile, MPMD file, rankfile) could not be read.
    #[error("{flag} {path}: {source}")]
    HostfileRead {
        /// The flag that named it.
        flag: String,
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// A bad line in a file named by a flag (hostfile, MPMD file, rankfile).
    #[error("{path}:{line}: {message}")]
    HostfileSyntax {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// An error in a line of a file of MPMD lines (`-configfile`, `--app`).
    #[error("{path}:{line}: {error}")]
    InFile {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The error in that line.
        error: Box<CliError>,
    },
    /// An argument that is not valid UTF-8.
    #[error("argument {index} is not valid UTF-8: {lossy}")]
    NotUtf8 {
        /// 1-based position on the command line.
        index: usize,
        /// The argument with bad bytes replaced.
        lossy: String,
    },
}

/// A bad command line is the user's to fix.
impl crate::exit::Blame for CliError {
    fn fault(&self) -> crate::exit::Fault {
        crate::exit::Fault::User
    }
}

/// What a flag does, once its values are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    Np,
    Ppn,
    Host,
    Hostfile,
    ExportX,
    Genv,
    Env,
    Genvall,
    Genvnone,
    Genvlist,
    Envlist,
    Wdir,
    Gwdir,
    TagOutput,
    PrependRank,
    Timeout,
    Verbose,
    Version,
    Help,
    Profile,
    Launcher,
    Pmi,
    Bind,
    ImageMount,
    DryRun,
    Json,
    Force,
    NoInject,
    Insecure,
    ExpectProvider,
    Shm,
    Verify,
    VerifyKey,
    /// Open MPI MCA parameter: the variable prefix it becomes.
    Mca(&'static str),
    MapBy,
    RoundRobin,
    /// A file of MPMD lines (`-configfile`, `--app`), read in place of the parts.
    MpmdFile,
    OutfilePattern,
    ErrfilePattern,
    OutputFilename,
    MergeStderr,
    TimestampOutput,
    PrintAllExitcodes,
    DisplayMap,
    Rankfile,
    Bootstrap,
    BindTo,
    /// An old spelling that names its object (`--bind-to-core`).
    BindToObject(BindTo),
    CpusPerRank,
    ReportBindings,
    /// `--oversubscribe`: more ranks than slots, which the layout places anyway (binding more
    /// ranks than cores still needs `:overload-allowed`, as in Open MPI).
    Oversubscribe,
    /// Accepted, not acted on, with a warning that says why.
    Ignored(&'static str),
}

/// One entry of the flag table.
struct Flag {
    names: &'static [&'static str],
    /// Number of values that follow the flag.
    arity: u8,
    act: Act,
    /// What the values are, for "needs …" messages.
    what: &'static str,
}

const PLACEMENT: &str =
    "cmpirun places processes by its block or cyclic layout only; the flag is ignored";

/// The flags cmpirun understands, with every spelling mpirun users type.
#[rustfmt::skip]
const FLAGS: &[Flag] = &[
    Flag { names: &["-n", "-np", "--np", "--n", "-c"], arity: 1, act: Act::Np, what: "a number of processes" },
    Flag { names: &["-N", "-ppn", "--ppn", "-npernode", "--npernode", "-perhost", "--perhost"], arity: 1, act: Act::Ppn, what: "a number of processes per node" },
    Flag { names: &["-H", "-host", "--host", "-hosts", "--hosts"], arity: 1, act: Act::Host, what: "a host list such as a,b:2" },
    Flag { names: &["-f", "-hostfile", "--hostfile", "-machinefile", "--machinefile"], arity: 1, act: Act::Hostfile, what: "a hostfile" },
    Flag { names: &["-x"], arity: 1, act: Act::ExportX, what: "VAR or VAR=VALUE" },
    Flag { names: &["-genv", "--genv"], arity: 2, act: Act::Genv, what: "VAR VALUE or VAR=VALUE" },
    Flag { names: &["-env", "--env"], arity: 2, act: Act::Env, what: "VAR VALUE or VAR=VALUE" },
    Flag { names: &["-configfile", "--configfile", "--app", "-app"], arity: 1, act: Act::MpmdFile, what: "a file of MPMD lines" },
    Flag { names: &["-genvall", "--genvall", "-envall", "--envall"], arity: 0, act: Act::Genvall, what: "" },
    Flag { names: &["-genvnone", "--genvnone", "-envnone", "--envnone"], arity: 0, act: Act::Genvnone, what: "" },
    Flag { names: &["-genvlist", "--genvlist"], arity: 1, act: Act::Genvlist, what: "a comma-separated list of variables" },
    Flag { names: &["-envlist", "--envlist"], arity: 1, act: Act::Envlist, what: "a comma-separated list of variables" },
    Flag { names: &["-wdir", "--wdir", "-wd", "--wd"], arity: 1, act: Act::Wdir, what: "a directory" },
    Flag { names: &["-gwdir", "--gwdir"], arity: 1, act: Act::Gwdir, what: "a directory" },
    Flag { names: &["--tag-output", "-tag-output"], arity: 0, act: Act::TagOutput, what: "" },
    Flag { names: &["-l", "-prepend-rank", "--prepend-rank"], arity: 0, act: Act::PrependRank, what: "" },
    Flag { names: &["--timeout", "-timeout"], arity: 1, act: Act::Timeout, what: "a number of seconds" },
    Flag { names: &["-v", "--verbose"], arity: 0, act: Act::Verbose, what: "" },
    Flag { names: &["--version", "-version", "-V"], arity: 0, act: Act::Version, what: "" },
    Flag { names: &["--help", "-help", "-h"], arity: 0, act: Act::Help, what: "" },
    Flag { names: &["--profile"], arity: 1, act: Act::Profile, what: "a profile name or path" },
    Flag { names: &["--launcher", "-launcher"], arity: 1, act: Act::Launcher, what: "local, slurm or hydra (or hydra's ssh, rsh, fork)" },
    Flag { names: &["-bootstrap", "--bootstrap"], arity: 1, act: Act::Bootstrap, what: "ssh, rsh, slurm or fork" },
    Flag { names: &["-outfile-pattern", "--outfile-pattern", "-outfile", "--outfile"], arity: 1, act: Act::OutfilePattern, what: "a file name pattern such as out.%r" },
    Flag { names: &["-errfile-pattern", "--errfile-pattern", "-errfile", "--errfile"], arity: 1, act: Act::ErrfilePattern, what: "a file name pattern such as err.%r" },
    Flag { names: &["--output-filename", "-output-filename"], arity: 1, act: Act::OutputFilename, what: "a directory" },
    Flag { names: &["--merge-stderr-to-stdout", "-merge-stderr-to-stdout"], arity: 0, act: Act::MergeStderr, what: "" },
    Flag { names: &["--timestamp-output", "-timestamp-output"], arity: 0, act: Act::TimestampOutput, what: "" },
    Flag { names: &["-print-all-exitcodes", "--print-all-exitcodes"], arity: 0, act: Act::PrintAllExitcodes, what: "" },
    Flag { names: &["--display-map", "-display-map"], arity: 0, act: Act::DisplayMap, what: "" },
    Flag { names: &["--rankfile", "-rankfile", "-rf"], arity: 1, act: Act::Rankfile, what: "a rankfile" },
    Flag { names: &["--pmi"], arity: 1, act: Act::Pmi, what: "pmi1, pmi2 or pmix" },
    Flag { names: &["--bind", "-B"], arity: 1, act: Act::Bind, what: "SRC[:DST[:ro|rw]]" },
    Flag { names: &["--image-mount"], arity: 1, act: Act::ImageMount, what: "auto, fuse, squashfuse or extract" },
    Flag { names: &["--dry-run"], arity: 0, act: Act::DryRun, what: "" },
    Flag { names: &["--json"], arity: 0, act: Act::Json, what: "" },
    Flag { names: &["--force"], arity: 0, act: Act::Force, what: "" },
    Flag { names: &["--no-inject"], arity: 0, act: Act::NoInject, what: "" },
    Flag { names: &["--insecure"], arity: 0, act: Act::Insecure, what: "" },
    Flag { names: &["--expect-provider"], arity: 1, act: Act::ExpectProvider, what: "a libfabric provider name such as cxi" },
    Flag { names: &["--shm"], arity: 1, act: Act::Shm, what: "a size such as 4g or 50%" },
    Flag { names: &["--verify"], arity: 1, act: Act::Verify, what: "require, warn or off" },
    Flag { names: &["--verify-key"], arity: 1, act: Act::VerifyKey, what: "a PEM public key file" },
    Flag { names: &["--mca", "-mca", "--gmca", "-gmca"], arity: 2, act: Act::Mca("OMPI_MCA_"), what: "KEY VALUE" },
    Flag { names: &["--pmixmca", "-pmixmca"], arity: 2, act: Act::Mca("PMIX_MCA_"), what: "KEY VALUE" },
    Flag { names: &["--prtemca", "-prtemca"], arity: 2, act: Act::Mca("PRTE_MCA_"), what: "KEY VALUE" },
    Flag { names: &["--map-by", "-map-by"], arity: 1, act: Act::MapBy, what: "a mapping such as slot or node" },
    Flag { names: &["-rr", "--bynode", "-bynode"], arity: 0, act: Act::RoundRobin, what: "" },
    Flag { names: &["--byslot", "-byslot"], arity: 0, act: Act::Ignored("block mapping is already the default"), what: "" },
    Flag { names: &["--bind-to", "-bind-to"], arity: 1, act: Act::BindTo, what: "core, socket, numa, hwthread, l3cache, machine or none" },
    Flag { names: &["--bind-to-core", "-bind-to-core"], arity: 0, act: Act::BindToObject(BindTo::Core), what: "" },
    Flag { names: &["--bind-to-socket", "-bind-to-socket"], arity: 0, act: Act::BindToObject(BindTo::Socket), what: "" },
    Flag { names: &["--cpus-per-rank", "-cpus-per-rank", "--cpus-per-proc", "-cpus-per-proc"], arity: 1, act: Act::CpusPerRank, what: "a number of cores" },
    Flag { names: &["--report-bindings", "-report-bindings"], arity: 0, act: Act::ReportBindings, what: "" },
    Flag { names: &["-binding", "--binding", "--rank-by", "-rank-by", "--npersocket", "-npersocket", "--ppr", "-ppr"], arity: 1, act: Act::Ignored(PLACEMENT), what: "a value" },
    Flag { names: &["--oversubscribe", "-oversubscribe"], arity: 0, act: Act::Oversubscribe, what: "" },
    Flag { names: &["--nooversubscribe", "-nooversubscribe", "--use-hwthread-cpus", "-use-hwthread-cpus"], arity: 0, act: Act::Ignored(PLACEMENT), what: "" },
    Flag { names: &["--allow-run-as-root", "-allow-run-as-root"], arity: 0, act: Act::Ignored("cmpirun runs ranks as the calling user in any case"), what: "" },
    Flag { names: &["-q", "--quiet", "-quiet"], arity: 0, act: Act::Ignored("cmpirun prints only warnings and errors unless -v is given"), what: "" },
    Flag { names: &["-nameserver", "--nameserver"], arity: 1, act: Act::Ignored("cmpirun serves MPI_Publish_name within the job only, without an external name server"), what: "HOST:PORT" },
    Flag { names: &["--prefix", "-prefix"], arity: 1, act: Act::Ignored("the MPI installation is the one inside the image"), what: "a directory" },
];

/// The text `cmpirun --help` prints.
pub const HELP: &str = "\
cmpirun: run an MPI program from a container image, one unprivileged container per node

Usage:
  cmpirun [flags] IMAGE PROGRAM [ARGS] [: [flags] IMAGE PROGRAM [ARGS]]...
  cmpirun profile show|check [--profile NAME|PATH] [--json]
  cmpirun doctor [--profile NAME|PATH] [--json] [--no-smoke]
                                   check that this node can run jobs (docs/doctor.md)
  cmpirun image|exec|shell ...     (see `cmpirun image --help`, ...)

IMAGE is a SIF file, a squashfs file, a directory, or oras://HOST[:PORT]/REPO:TAG (or
@sha256:DIGEST) in an OCI registry, pulled once into the user's cache (docs/images.md).

Processes and placement:
  -n, -np N                  number of ranks of this part (default: fill the slots)
  -N, -ppn, --npernode N     ranks per node
  -H, --host a,b:2,...       hosts and their slots
  -f, --hostfile FILE        hostfile (MPICH `host:n` or Open MPI `host slots=n` lines)
  -configfile, --app FILE    MPMD parts from a file, one `[flags] IMAGE PROGRAM [ARGS]` a line
  --map-by node, -rr         place consecutive ranks on different nodes (cyclic)
Environment and directory:
  -x VAR[=VALUE]             pass VAR (or set it) for every rank
  -genv VAR VALUE|VAR=VALUE  set VAR for every rank
  -env VAR VALUE|VAR=VALUE   set VAR for the ranks of this part only
  -genvlist A,B / -envlist   pass these variables (all parts / this part)
  -genvall / -genvnone       inherit the caller's environment (default) / none of it
  --mca KEY VALUE            Open MPI parameter, set as OMPI_MCA_KEY=VALUE
  -wdir DIR / -gwdir DIR     working directory of this part / of all parts
Output and control:
  --tag-output               prefix lines with [1,RANK]<stdout>:
  -l, -prepend-rank          prefix lines with [RANK]
  --timestamp-output         prefix lines with the time they were read (Open MPI's form)
  -outfile-pattern PAT       each rank's stdout to a file (%r rank, %h host, %p node, %%)
  -errfile-pattern PAT       each rank's stderr to a file
  --output-filename DIR      Open MPI's DIR/1/rank.N/stdout and stderr (N zero-padded)
  --merge-stderr-to-stdout   each rank's stderr into its stdout
  -print-all-exitcodes       print how every rank ended
  --display-map              print the rank layout before the ranks start
  --timeout SECONDS          end the job after SECONDS
  -v                         more detail (repeat for more)
cmpirun's own:
  --profile NAME|PATH        site profile (default: $CMPIRUN_PROFILE, then the best match)
  --launcher local|slurm|hydra
  -bootstrap ssh|rsh|slurm|fork  hydra's names: ssh/rsh = hydra, slurm = srun, fork = local
  --pmi pmi1|pmi2|pmix
  --bind SRC[:DST[:ro|rw]]   extra bind into every container
  --image-mount auto|fuse|squashfuse|extract
  --shm SIZE                 size of the node's private /dev/shm (tmpfs size=)
  --dry-run [--json]         print the launch plan instead of launching
  --dry-run=job              print only how the command line was understood (JSON)
  --force                    launch even when a compatibility check fails
  --no-inject                use the image's own libfabric and PMI libraries
  --insecure                 plain HTTP to the registry of an oras:// image (no TLS)
  --expect-provider NAME     fail ranks that did not load the host libfabric provider NAME
  --verify require|warn|off  whether images must carry a valid signature (docs/images.md)
  --verify-key PEM           a public key whose signatures --verify accepts (repeatable)
  --version, --help

CPU binding:
  --bind-to core|socket|numa|hwthread|none   bind each rank (local launcher; srun's and
                             hydra's own binding under those launchers); also hydra's
                             l1cache..l3cache, machine, rr, user:0+2,1
  --bind-to core:overload-allowed            let ranks share cores
  --cpus-per-rank N, --map-by OBJ:PE=N       cores per rank (binds to cores)
  --rankfile FILE            Open MPI's rankfile: each rank's CPUs (local launcher)
  --report-bindings          print the CPUs each rank got

Other placement flags of mpirun (--rank-by, --ppr, ...) are accepted with a warning.
See docs/launch.md.
";

fn lookup(name: &str) -> Option<&'static Flag> {
    FLAGS.iter().find(|f| f.names.contains(&name))
}

/// Where a token of the command line came from, when it was read from a file of MPMD lines.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    path: PathBuf,
    line: usize,
}

/// One word of the command line.
struct Token {
    text: String,
    origin: Option<Origin>,
}

/// Whether the values read so far are all the flag takes: `-genv VAR=VALUE` is hydra's
/// one-word form of `-genv VAR VALUE` (a variable name never contains `=`).
fn single_value(act: Act, values: &[String]) -> bool {
    matches!(act, Act::Genv | Act::Env) && values.first().is_some_and(|v| v.contains('='))
}

/// The text of the file a flag names (hostfile, MPMD file, rankfile).
fn read_flag_file(flag: &str, path: &Path) -> Result<String, CliError> {
    std::fs::read_to_string(path).map_err(|source| CliError::HostfileRead {
        flag: flag.to_owned(),
        path: path.to_owned(),
        source,
    })
}

/// Reads a file of MPMD lines (hydra's `-configfile`, Open MPI's `--app`): one part per line,
/// `[flags] IMAGE PROGRAM [ARGS]`, words split as a shell would; blank lines and lines starting
/// with `#` are skipped. The parts are returned as tokens separated by `:`, each knowing its line.
fn mpmd_file(flag: &str, path: &Path) -> Result<Vec<Token>, CliError> {
    let text = read_flag_file(flag, path)?;
    let mut tokens: Vec<Token> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let origin = Origin {
            path: path.to_owned(),
            line: n + 1,
        };
        let words = shlex::split(line).ok_or_else(|| CliError::HostfileSyntax {
            path: path.to_owned(),
            line: n + 1,
            message: "unbalanced quotes".into(),
        })?;
        if !tokens.is_empty() {
            tokens.push(Token {
                text: ":".into(),
                origin: Some(origin.clone()),
            });
        }
        tokens.extend(words.into_iter().map(|text| Token {
            text,
            origin: Some(origin.clone()),
        }));
    }
    if tokens.is_empty() {
        return Err(CliError::HostfileSyntax {
            path: path.to_owned(),
            line: text.lines().count().max(1),
            message: format!(
                "{flag}: the file names no part (`[flags] IMAGE PROGRAM [ARGS]` per line)"
            ),
        });
    }
    Ok(tokens)
}

/// Per-part state while parsing.
#[derive(Default)]
struct PartState {
    /// The file and line of a part read from `-configfile`/`--app`.
    origin: Option<Origin>,
    np: Option<u32>,
    env: Vec<EnvSetting>,
    wdir: Option<PathBuf>,
}

/// Parses the mpirun-style command line (without the program name).
///
/// Reads the hostfile if one is named, so that its errors name the file and line.
pub fn parse_launch<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Result<CliRequest, CliError> {
    let mut argv = Vec::with_capacity(args.len());
    for (i, a) in args.iter().enumerate() {
        match a.as_ref().to_str() {
            Some(s) => argv.push(s.to_owned()),
            None => {
                return Err(CliError::NotUtf8 {
                    index: i + 1,
                    lossy: a.as_ref().to_string_lossy().into_owned(),
                });
            }
        }
    }
    Parser::default().run(&argv)
}

#[derive(Default)]
struct Parser {
    spec: JobSpec,
    json: bool,
    dry_run: bool,
    job_only: bool,
    genvall_seen: bool,
    genvnone_seen: bool,
}

impl Parser {
    fn run(mut self, args: &[String]) -> Result<CliRequest, CliError> {
        let mut argv: Vec<Token> = args
            .iter()
            .map(|a| Token {
                text: a.clone(),
                origin: None,
            })
            .collect();
        let mut i = 0;
        let mut part = PartState::default();
        let mut positional: Vec<String> = Vec::new();
        let mut only_positional = false;
        let mut parts: Vec<(PartState, Vec<String>)> = Vec::new();
        while i < argv.len() {
            let origin = argv[i].origin.clone();
            let tok = argv[i].text.clone();
            i += 1;
            if part.origin.is_none() {
                part.origin.clone_from(&origin);
            }
            if tok == ":" {
                parts.push((std::mem::take(&mut part), std::mem::take(&mut positional)));
                only_positional = false;
                continue;
            }
            // Once the image is named, the rest of this part is the program and its arguments.
            if !positional.is_empty() || only_positional || !tok.starts_with('-') || tok == "-" {
                positional.push(tok);
                continue;
            }
            if tok == "--" {
                only_positional = true;
                continue;
            }
            let in_file = |e: CliError| match &origin {
                Some(o) => CliError::InFile {
                    path: o.path.clone(),
                    line: o.line,
                    error: Box::new(e),
                },
                None => e,
            };
            let (flag, name, inline) = self.resolve(&tok).map_err(in_file)?;
            if flag.act == Act::DryRun && inline.as_deref() == Some("job") {
                self.dry_run = true;
                self.job_only = true;
                continue;
            }
            if flag.arity == 0 {
                if inline.is_some() {
                    return Err(in_file(CliError::UnexpectedValue { flag: name }));
                }
                match self.apply0(flag.act, &name).map_err(in_file)? {
                    Some(req) => return Ok(req),
                    None => continue,
                }
            }
            let mut values = Vec::with_capacity(flag.arity as usize);
            if let Some(v) = inline {
                values.push(v);
            }
            while values.len() < flag.arity as usize && !single_value(flag.act, &values) {
                match argv.get(i) {
                    Some(v) if v.text != ":" => {
                        values.push(v.text.clone());
                        i += 1;
                    }
                    _ => {
                        return Err(in_file(CliError::MissingValue {
                            flag: name,
                            what: flag.what,
                        }));
                    }
                }
            }
            if flag.act == Act::MpmdFile {
                if origin.is_some() {
                    return Err(in_file(bad(
                        &name,
                        &values[0],
                        "a file of MPMD lines cannot name another one",
                    )));
                }
                let more = i < argv.len();
                let mut lines = mpmd_file(&name, Path::new(&values[0]))?;
                if more {
                    lines.push(Token {
                        text: ":".into(),
                        origin: None,
                    });
                }
                argv.splice(i..i, lines);
                continue;
            }
            self.apply(flag.act, &name, &values, &mut part)
                .map_err(in_file)?;
        }
        parts.push((part, positional));

        let mpmd = parts.len() > 1;
        for (n, (state, pos)) in parts.into_iter().enumerate() {
            let label = match (&state.origin, mpmd) {
                (Some(o), _) => format!("{}:{}: ", o.path.display(), o.line),
                (None, true) => format!("part {}: ", n + 1),
                (None, false) => String::new(),
            };
            let mut pos = pos.into_iter();
            let image = pos.next().ok_or_else(|| CliError::MissingImage {
                part: label.clone(),
            })?;
            let program = pos.next().ok_or_else(|| CliError::MissingProgram {
                part: label.clone(),
                image: image.clone(),
            })?;
            self.spec.apps.push(AppSpec {
                image: PathBuf::from(image),
                program,
                args: pos.collect(),
                np: state.np,
                env: state.env,
                wdir: state.wdir,
            });
        }
        if self.json && !self.dry_run {
            return Err(CliError::Requires {
                flag: "--json",
                needs: "--dry-run",
            });
        }
        if self.genvall_seen && self.genvnone_seen {
            return Err(CliError::Conflict {
                first: "-genvall",
                second: "-genvnone",
            });
        }
        if self.dry_run {
            self.spec.dry_run = Some(if self.job_only {
                DryRunFormat::Job
            } else if self.json {
                DryRunFormat::Json
            } else {
                DryRunFormat::Text
            });
        }
        Ok(CliRequest::Launch(Box::new(self.spec)))
    }

    /// Finds the flag for `tok`, splitting `--flag=value` and `-n4` forms.
    fn resolve(&self, tok: &str) -> Result<(&'static Flag, String, Option<String>), CliError> {
        if let Some(f) = lookup(tok) {
            return Ok((f, tok.to_owned(), None));
        }
        if let Some((name, value)) = tok.split_once('=')
            && let Some(f) = lookup(name)
        {
            return Ok((f, name.to_owned(), Some(value.to_owned())));
        }
        // -vv, -vvv: repeated verbosity.
        if tok.len() > 2 && tok[1..].bytes().all(|b| b == b'v') {
            return Ok((
                lookup("-v").ok_or_else(|| unknown(tok))?,
                tok.to_owned(),
                None,
            ));
        }
        // -n4, -N2, -f/path: a one-letter flag with its value attached. A letter after the
        // first one makes the word a single-dash long flag (`-configfile`, `-nameserver`),
        // which is never split into a short flag and its value.
        if tok.len() > 2 && !tok.starts_with("--") && tok.is_char_boundary(2) {
            let (name, value) = tok.split_at(2);
            if let Some(f) = lookup(name)
                && f.arity == 1
                && !value.starts_with(|c: char| c.is_ascii_alphabetic())
            {
                return Ok((f, name.to_owned(), Some(value.to_owned())));
            }
        }
        Err(unknown(tok))
    }

    /// Applies a flag without values; returns a request that ends parsing (`--help`).
    fn apply0(&mut self, act: Act, name: &str) -> Result<Option<CliRequest>, CliError> {
        match act {
            Act::Genvall => {
                self.genvall_seen = true;
                self.spec.env_all = EnvInherit::All;
            }
            Act::Genvnone => {
                self.genvnone_seen = true;
                self.spec.env_all = EnvInherit::None;
            }
            Act::TagOutput => self.spec.output_tag = OutputTag::TagOutput,
            Act::PrependRank => self.spec.output_tag = OutputTag::PrependRank,
            Act::Verbose => {
                let n = if name.starts_with("--") {
                    1
                } else {
                    u8::try_from(name.len() - 1).unwrap_or(u8::MAX)
                };
                self.spec.verbose = self.spec.verbose.saturating_add(n);
            }
            Act::Version => return Ok(Some(CliRequest::Version)),
            Act::Help => return Ok(Some(CliRequest::Help)),
            Act::DryRun => self.dry_run = true,
            Act::Json => self.json = true,
            Act::Force => self.spec.force = true,
            Act::NoInject => self.spec.no_inject = true,
            Act::Insecure => self.spec.insecure = true,
            Act::RoundRobin => self.spec.mapping = Mapping::Cyclic,
            Act::MergeStderr => self.spec.merge_stderr = true,
            Act::TimestampOutput => self.spec.timestamp_output = true,
            Act::PrintAllExitcodes => self.spec.print_all_exitcodes = true,
            Act::DisplayMap => self.spec.display_map = true,
            Act::BindToObject(to) => self.spec.binding.to = Some(to),
            Act::ReportBindings => self.spec.binding.report = true,
            Act::Oversubscribe => {}
            Act::Ignored(why) => self.spec.warnings.push(format!("{name}: {why}")),
            _ => return Err(unknown(name)),
        }
        Ok(None)
    }

    fn apply(
        &mut self,
        act: Act,
        name: &str,
        values: &[String],
        part: &mut PartState,
    ) -> Result<(), CliError> {
        let v = values[0].as_str();
        match act {
            Act::Np => {
                let n = positive(name, v)?;
                if n > crate::jobspec::MAX_RANKS {
                    return Err(bad(
                        name,
                        v,
                        format!("at most {} ranks", crate::jobspec::MAX_RANKS),
                    ));
                }
                part.np = Some(n);
            }
            Act::Ppn => self.spec.ppn = Some(positive(name, v)?),
            Act::Host => {
                let hosts = parse_host_list(v).map_err(|message| bad(name, v, message))?;
                self.spec.hosts.extend(hosts);
            }
            Act::Hostfile => {
                let path = PathBuf::from(v);
                let text = read_flag_file(name, &path)?;
                let hosts = parse_hostfile(&path, &text)?;
                if hosts.is_empty() {
                    return Err(CliError::HostfileSyntax {
                        path,
                        line: text.lines().count().max(1),
                        message: "the hostfile names no host".into(),
                    });
                }
                self.spec.hosts.extend(hosts);
                self.spec.hostfile = Some(path);
            }
            Act::ExportX => {
                let setting = match v.split_once('=') {
                    Some((var, value)) => EnvSetting::Set {
                        name: var_name(name, v, var)?,
                        value: value.to_owned(),
                    },
                    None => EnvSetting::Pass {
                        name: var_name(name, v, v)?,
                    },
                };
                self.spec.env.push(setting);
            }
            Act::Genv | Act::Env => {
                let (var, value) = match values.get(1) {
                    Some(value) => (v, value.as_str()),
                    None => v.split_once('=').unwrap_or((v, "")),
                };
                let setting = EnvSetting::Set {
                    name: var_name(name, v, var)?,
                    value: value.to_owned(),
                };
                if act == Act::Genv {
                    self.spec.env.push(setting);
                } else {
                    part.env.push(setting);
                }
            }
            Act::Genvlist | Act::Envlist => {
                for var in v.split(',').filter(|s| !s.is_empty()) {
                    let setting = EnvSetting::Pass {
                        name: var_name(name, v, var)?,
                    };
                    if act == Act::Genvlist {
                        self.spec.env.push(setting);
                    } else {
                        part.env.push(setting);
                    }
                }
            }
            Act::Wdir => part.wdir = Some(nonempty_path(name, v)?),
            Act::Gwdir => self.spec.wdir = Some(nonempty_path(name, v)?),
            Act::Timeout => {
                self.spec.timeout_secs = Some(u64::from(positive(name, v)?));
            }
            Act::Profile => {
                if v.is_empty() {
                    return Err(bad(name, v, "give a profile name or a path to a YAML file"));
                }
                self.spec.profile = Some(v.to_owned());
            }
            Act::Launcher | Act::Bootstrap => {
                // hydra's bootstrap names (`-bootstrap`, and its `-launcher`) map to the
                // launcher that starts ranks that way: ssh and rsh are hydra's own, slurm is
                // srun, fork is this node only.
                let kind = match v {
                    "local" | "fork" => LauncherKind::Local,
                    "slurm" => LauncherKind::Slurm,
                    "hydra" => LauncherKind::Hydra,
                    "mpirun" => LauncherKind::Mpirun,
                    "ssh" | "rsh" => {
                        self.spec.hydra_bootstrap = Some(v.to_owned());
                        LauncherKind::Hydra
                    }
                    _ if act == Act::Bootstrap => {
                        return Err(bad(name, v, "expected ssh, rsh, slurm or fork"));
                    }
                    _ => {
                        return Err(bad(
                            name,
                            v,
                            "expected local, slurm, hydra or mpirun (or hydra's ssh, rsh, fork)",
                        ));
                    }
                };
                self.spec.launcher = Some(kind);
            }
            Act::BindTo => self.bind_to(name, v)?,
            Act::CpusPerRank => self.spec.binding.cpus_per_rank = Some(positive(name, v)?),
            Act::OutfilePattern => {
                self.spec.output_files.stdout = Some(file_pattern(name, v)?);
            }
            Act::ErrfilePattern => {
                self.spec.output_files.stderr = Some(file_pattern(name, v)?);
            }
            Act::OutputFilename => {
                // Open MPI's layout: DIR/1/rank.N/stdout and stderr, DIR made absolute, N
                // zero-padded to the digits of the job's size. Its `:nocopy` directive is what
                // cmpirun does anyway (the files only).
                let v = v
                    .len()
                    .checked_sub(":nocopy".len())
                    .filter(|&at| v.is_char_boundary(at) && v[at..].eq_ignore_ascii_case(":nocopy"))
                    .map_or(v, |at| &v[..at]);
                let dir = std::path::absolute(nonempty_path(name, v)?)
                    .map_err(|e| bad(name, v, e.to_string()))?;
                let dir = dir.to_string_lossy().replace('%', "%%");
                self.spec.output_files.stdout = Some(format!("{dir}/1/rank.%r/stdout"));
                self.spec.output_files.stderr = Some(format!("{dir}/1/rank.%r/stderr"));
                self.spec.output_files.pad_rank = true;
            }
            Act::Rankfile => {
                // Applied as CPU binding by the local launcher; the plan warns under the others
                // and checks the hosts.
                let path = PathBuf::from(v);
                let text = read_flag_file(name, &path)?;
                let lines = parse_rankfile(&path, &text)?;
                self.spec.binding.rankfile = Some(Rankfile { path, lines });
            }
            Act::Pmi => {
                self.spec.pmi = Some(match v {
                    "pmi1" | "pmi" => PmiKind::Pmi1,
                    "pmi2" => PmiKind::Pmi2,
                    "pmix" => PmiKind::Pmix,
                    _ => return Err(bad(name, v, "expected pmi1, pmi2 or pmix")),
                })
            }
            Act::Bind => self
                .spec
                .binds
                .push(parse_bind(v).map_err(|m| bad(name, v, m))?),
            Act::ImageMount => {
                self.spec.image_mount = Some(match v {
                    "auto" => MountBackendKind::Auto,
                    "fuse" => MountBackendKind::Fuse,
                    "squashfuse" => MountBackendKind::Squashfuse,
                    "extract" => MountBackendKind::Extract,
                    _ => return Err(bad(name, v, "expected auto, fuse, squashfuse or extract")),
                })
            }
            Act::Verify => {
                self.spec.verify = Some(match v {
                    "require" => VerifyPolicy::Require,
                    "warn" => VerifyPolicy::Warn,
                    "off" => VerifyPolicy::Off,
                    _ => return Err(bad(name, v, "expected require, warn or off")),
                })
            }
            Act::VerifyKey => self.spec.verify_keys.push(PathBuf::from(v)),
            Act::ExpectProvider => {
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    return Err(bad(
                        name,
                        v,
                        "expected a libfabric provider name such as cxi, efa, verbs or tcp",
                    ));
                }
                self.spec.expect_provider = Some(v.to_owned());
            }
            Act::Shm => {
                // What tmpfs's size= takes: a whole number with an optional k/m/g/t suffix, or
                // a percentage of the node's memory. Checked here, so a bad value is a usage
                // error before any container is made rather than a failed mount on every node.
                let digits = v.trim_end_matches(['k', 'K', 'm', 'M', 'g', 'G', 't', 'T', '%']);
                if digits.is_empty()
                    || !digits.bytes().all(|b| b.is_ascii_digit())
                    || v.len() - digits.len() > 1
                    || digits.parse::<u64>().is_err()
                {
                    return Err(bad(
                        name,
                        v,
                        "expected a size such as 512m, 4g or 50% (a tmpfs size= value)",
                    ));
                }
                self.spec.shm_size = Some(v.to_owned());
            }
            Act::Mca(prefix) => {
                let key = values[0].as_str();
                let var = format!("{prefix}{key}");
                self.spec.env.push(EnvSetting::Set {
                    name: var_name(name, key, &var)?,
                    value: values[1].clone(),
                });
            }
            Act::MapBy => {
                // The object decides the layout; `PE=n` is the cores of each rank (binding),
                // other modifiers (`:OVERSUBSCRIBE`, `:SPAN`) are not applied.
                let object = v.split([':', ',']).next().unwrap_or(v).to_ascii_lowercase();
                let mut others = Vec::new();
                for modifier in v.split([':', ',']).skip(1) {
                    match modifier.split_once('=') {
                        Some((key, n)) if key.eq_ignore_ascii_case("pe") => {
                            self.spec.binding.cpus_per_rank = Some(positive(name, n)?);
                        }
                        _ => others.push(modifier),
                    }
                }
                let v = &if others.is_empty() {
                    object.clone()
                } else {
                    format!("{object}:{}", others.join(":"))
                };
                match object.as_str() {
                    "node" => {
                        self.spec.mapping = Mapping::Cyclic;
                        if v.contains(':') {
                            self.spec.warnings.push(format!("{name} {v}: ranks are placed cyclically over the nodes; {PLACEMENT}"));
                        }
                    }
                    "slot" | "core" | "hwthread" | "socket" | "package" | "numa" | "l3cache"
                    | "l2cache" | "l1cache" | "board" => {
                        self.spec.mapping = Mapping::Block;
                        if object != "slot" || v.contains(':') {
                            self.spec.warnings.push(format!(
                                "{name} {v}: ranks are placed block-wise over the nodes; \
                                 {PLACEMENT}"
                            ));
                        }
                    }
                    _ => self.spec.warnings.push(format!("{name} {v}: {PLACEMENT}")),
                }
            }
            Act::Ignored(why) => self.spec.warnings.push(format!("{name} {v}: {why}")),
            _ => return Err(unknown(name)),
        }
        Ok(())
    }
}

impl Parser {
    /// `--bind-to OBJECT[:MODIFIERS]`, in Open MPI's and hydra's words. hydra's count (`core:2`)
    /// is the cores of each rank, as `--cpus-per-rank`; Open MPI's `overload-allowed` lets ranks
    /// share cores and `if-supported` is what cmpirun does anyway. Objects cmpirun does not bind
    /// to (the neighbourhood of a device) are accepted with one warning and leave the ranks
    /// unbound.
    fn bind_to(&mut self, name: &str, v: &str) -> Result<(), CliError> {
        let (object, modifier) = v.split_once(':').unwrap_or((v, ""));
        let object = object.to_ascii_lowercase();
        let cache = object
            .strip_prefix('l')
            .and_then(|rest| rest.strip_suffix("cache"))
            .and_then(|rest| rest.trim_end_matches(['d', 'i', 'u']).parse::<u8>().ok());
        let to = match (object.as_str(), cache) {
            ("none", _) => BindTo::None,
            ("hwthread" | "hwthreads" | "pu", _) => BindTo::Hwthread,
            ("core" | "cores", _) => BindTo::Core,
            ("socket" | "sockets" | "package", _) => BindTo::Socket,
            ("numa" | "numanode", _) => BindTo::Numa,
            ("machine" | "board", _) => BindTo::Machine,
            ("rr", _) => BindTo::Rr,
            ("user", _) => {
                // hydra's user:0+2,1+4,3: one CPU set per rank, taken in turn.
                let mut sets = Vec::new();
                for set in modifier.split(',') {
                    let cpus = set
                        .split('+')
                        .map(|c| c.trim().parse::<usize>())
                        .collect::<Result<Vec<usize>, _>>()
                        .map_err(|_| {
                            bad(name, v, "expected user:CPU+CPU,CPU,... (hydra's form, such as user:0+2,1+4,3)")
                        })?;
                    sets.push(cpus);
                }
                self.spec.binding.user = sets;
                self.spec.binding.to = Some(BindTo::User);
                return Ok(());
            }
            (_, Some(1)) => BindTo::L1cache,
            (_, Some(2)) => BindTo::L2cache,
            (_, Some(3..=5)) => BindTo::L3cache,
            (o, _) if is_device_object(o) => {
                self.spec.warnings.push(format!(
                    "{name} {v}: not applied: cmpirun does not bind to the neighbourhood of a \
                     device; the ranks are not bound"
                ));
                return Ok(());
            }
            _ => {
                return Err(bad(
                    name,
                    v,
                    "expected core, socket, numa, hwthread, l1cache, l2cache, l3cache, machine, \
                     rr, user:CPUS or none",
                ));
            }
        };
        self.spec.binding.to = Some(to);
        let mut ignored = Vec::new();
        for m in modifier.split(',').filter(|m| !m.is_empty()) {
            if m.bytes().next().is_some_and(|b| b.is_ascii_digit()) {
                self.spec.binding.cpus_per_rank = Some(positive(name, m)?);
            } else if m.eq_ignore_ascii_case("overload-allowed") {
                self.spec.binding.overload = true;
            } else if !m.eq_ignore_ascii_case("if-supported") {
                ignored.push(m);
            }
        }
        if !ignored.is_empty() {
            self.spec.warnings.push(format!(
                "{name} {v}: the modifier {:?} is ignored; ranks are bound to {}",
                ignored.join(","),
                to.as_str()
            ));
        }
        Ok(())
    }
}

/// hydra's device objects: `pci:ID`, `gpu`, `gpu0`, `ib`, `ib0`, `en`, `eth1`, `hfi`.
fn is_device_object(object: &str) -> bool {
    object == "pci"
        || ["gpu", "ib", "en", "eth", "hfi"].iter().any(|d| {
            object
                .strip_prefix(d)
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
}

/// Checks a hydra file name pattern: `%r`, `%h`, `%p`, `%g` and `%%` are its only `%` words.
fn file_pattern(flag: &str, v: &str) -> Result<String, CliError> {
    if v.is_empty() {
        return Err(bad(flag, v, "expected a file name pattern such as out.%r"));
    }
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c == '%' && !matches!(chars.next(), Some('r' | 'h' | 'p' | 'g' | '%')) {
            return Err(bad(
                flag,
                v,
                "% words are %r (rank), %h (host), %p (node index), %g (0) and %%",
            ));
        }
    }
    Ok(v.to_owned())
}

/// Parses an Open MPI rankfile (`rank N=HOST slot=SPEC` lines, `#` comments); errors name the
/// file and line: a malformed line, a slot list that is not one, a rank named twice.
pub fn parse_rankfile(path: &Path, text: &str) -> Result<Vec<RankfileLine>, CliError> {
    let mut lines: Vec<RankfileLine> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let err = |message: &str| CliError::HostfileSyntax {
            path: path.to_owned(),
            line: n + 1,
            message: format!("{message}; expected `rank N=HOST slot=SPEC`"),
        };
        let mut words = line.split_whitespace();
        if words.next() != Some("rank") {
            return Err(err("the line does not start with `rank`"));
        }
        let (rank, host) = words
            .next()
            .and_then(|w| w.split_once('='))
            .ok_or_else(|| err("no `N=HOST`"))?;
        let rank: u32 = rank.parse().map_err(|_| err("the rank is not a number"))?;
        let slot = words
            .next()
            .and_then(|w| w.strip_prefix("slot="))
            .ok_or_else(|| err("no `slot=`"))?;
        if host.is_empty() || slot.is_empty() || words.next().is_some() {
            return Err(err("unexpected words"));
        }
        if let Some(first) = lines.iter().find(|l| l.rank == rank) {
            return Err(err(&format!(
                "rank {rank} is named on line {} already",
                first.line
            )));
        }
        let entry = RankfileLine {
            line: n + 1,
            rank,
            host: host.to_owned(),
            slot: slot.to_owned(),
        };
        entry.slots().map_err(|m| {
            err(&format!(
                "slot={slot}: {m} (slots are SOCKET:CORES or CORES, `;` between them)"
            ))
        })?;
        lines.push(entry);
    }
    Ok(lines)
}

fn unknown(flag: &str) -> CliError {
    CliError::UnknownFlag {
        flag: flag.to_owned(),
    }
}

fn bad(flag: &str, value: &str, message: impl Into<String>) -> CliError {
    CliError::BadValue {
        flag: flag.to_owned(),
        value: value.to_owned(),
        message: message.into(),
    }
}

fn positive(flag: &str, v: &str) -> Result<u32, CliError> {
    match v.parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(bad(flag, v, "expected a whole number of at least 1")),
    }
}

fn nonempty_path(flag: &str, v: &str) -> Result<PathBuf, CliError> {
    if v.is_empty() {
        return Err(bad(flag, v, "expected a directory"));
    }
    Ok(PathBuf::from(v))
}

/// Checks that `var` is a valid environment variable name.
fn var_name(flag: &str, value: &str, var: &str) -> Result<String, CliError> {
    let mut bytes = var.bytes();
    let ok = matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(var.to_owned())
    } else {
        Err(bad(
            flag,
            value,
            format!(
                "{var:?} is not a variable name (letters, digits and _, not starting with a digit)"
            ),
        ))
    }
}

/// Parses `-H a,b:2,c` (Open MPI and MPICH both write `host:slots`).
pub fn parse_host_list(list: &str) -> Result<Vec<HostSlots>, String> {
    let mut hosts = Vec::new();
    for item in list.split(',') {
        if item.is_empty() {
            return Err("empty host name in the list".into());
        }
        hosts.push(host_slots(item)?);
    }
    Ok(hosts)
}

fn host_slots(item: &str) -> Result<HostSlots, String> {
    let (name, slots) = match item.rsplit_once(':') {
        Some((name, n)) => match n.parse::<u32>() {
            Ok(n) if n > 0 => (name, Some(n)),
            _ => {
                return Err(format!(
                    "{item:?}: the slot count after ':' must be a whole number of at least 1"
                ));
            }
        },
        None => (item, None),
    };
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(format!("{item:?} is not a host name"));
    }
    Ok(HostSlots {
        name: name.to_owned(),
        slots,
    })
}

/// Parses a hostfile in MPICH (`host`, `host:n`) or Open MPI (`host slots=n [max_slots=m]`)
/// form; `#` starts a comment. Errors name the file and line.
pub fn parse_hostfile(path: &Path, text: &str) -> Result<Vec<HostSlots>, CliError> {
    let mut hosts = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let err = |message: String| CliError::HostfileSyntax {
            path: path.to_owned(),
            line: n + 1,
            message,
        };
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or(line);
        let mut host = host_slots(first).map_err(err)?;
        for word in words {
            let Some((key, value)) = word.split_once('=') else {
                return Err(err(format!(
                    "{word:?}: expected `host:n` (MPICH) or `host slots=n` (Open MPI)"
                )));
            };
            let count = || match value.parse::<u32>() {
                Ok(c) if c > 0 => Ok(c),
                _ => Err(err(format!(
                    "{key}={value}: expected a whole number of at least 1"
                ))),
            };
            match key {
                "slots" | "count" | "cpu" | "cpus" => {
                    if host.slots.is_some() {
                        return Err(err(format!(
                            "{word:?}: the slot count of {} is given twice",
                            host.name
                        )));
                    }
                    host.slots = Some(count()?);
                }
                // Upper limits and hydra's per-host options do not change the layout.
                "max_slots" | "max-slots" => {
                    count()?;
                }
                "ifhn" | "user" | "binding" | "port" => {}
                _ => {
                    return Err(err(format!(
                        "unknown key {key:?}; expected slots=, max_slots= (Open MPI) or host:n (MPICH)"
                    )));
                }
            }
        }
        hosts.push(host);
    }
    Ok(hosts)
}

/// Parses `--bind SRC[:DST[:ro|rw]]`.
pub fn parse_bind(v: &str) -> Result<BindSpec, String> {
    let mut it = v.split(':');
    let source = it.next().unwrap_or("");
    let destination = it.next().filter(|s| !s.is_empty()).unwrap_or(source);
    let read_only = match it.next() {
        None | Some("rw") => false,
        Some("ro") => true,
        Some(other) => return Err(format!("unknown bind option {other:?}; expected ro or rw")),
    };
    if it.next().is_some() {
        return Err("expected SRC[:DST[:ro|rw]]".into());
    }
    if !source.starts_with('/') || !destination.starts_with('/') {
        return Err("both paths must be absolute".into());
    }
    Ok(BindSpec {
        source: PathBuf::from(source),
        destination: PathBuf::from(destination),
        read_only,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(args: &[&str]) -> JobSpec {
        match parse_launch(args).unwrap() {
            CliRequest::Launch(spec) => *spec,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn flag_names_are_unique() {
        let mut all: Vec<&str> = FLAGS.iter().flat_map(|f| f.names.iter().copied()).collect();
        all.sort_unstable();
        let before = all.len();
        all.dedup();
        assert_eq!(before, all.len());
    }

    #[test]
    fn attached_values() {
        let s = launch(&["-n4", "--host=a,b:2", "-vv", "img", "prog"]);
        assert_eq!(s.apps[0].np, Some(4));
        assert_eq!(s.hosts.len(), 2);
        assert_eq!(s.verbose, 2);
    }

    #[test]
    fn program_args_are_verbatim() {
        let s = launch(&["-n", "2", "img", "prog", "-n", "--x", "="]);
        assert_eq!(s.apps[0].args, ["-n", "--x", "="]);
    }

    /// Random command lines from a pool of flags, values and separators never panic.
    #[test]
    fn random_command_lines_never_panic() {
        let pool = [
            "-n",
            "-np",
            "4",
            "0",
            "-1",
            "x",
            "-N",
            "-H",
            "a:2,b",
            "a,,b",
            ":",
            "--",
            "-x",
            "A=1",
            "1A",
            "-genv",
            "-env",
            "-genvall",
            "-genvnone",
            "--mca",
            "--map-by",
            "node",
            "ppr:2:node",
            "--bind",
            "/a:/b:ro",
            "--dry-run",
            "--json",
            "--dry-run=job",
            "--force=1",
            "-v",
            "-vvv",
            "--timeout",
            "--shm",
            "4g",
            "img",
            "prog",
            "-é",
            "é",
            "--launcher=slurm",
            "--pmi",
            "pmix",
            "-",
            "=",
            "-n4",
            "--np=",
            "-wdir",
            "",
        ];
        let mut state: u64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..20_000 {
            let len = (state % 12) as usize;
            let mut argv = Vec::with_capacity(len);
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                argv.push(pool[(state % pool.len() as u64) as usize]);
            }
            let _ = parse_launch(&argv);
        }
    }

    #[test]
    fn hostfile_formats() {
        let p = Path::new("hf");
        let h = parse_hostfile(p, "a:2\n# c\nb slots=3 max_slots=4\n\nc\n").unwrap();
        assert_eq!(h[0].slots, Some(2));
        assert_eq!(h[1].slots, Some(3));
        assert_eq!(h[2].slots, None);
        let e = parse_hostfile(p, "a\nb slot=2\n").unwrap_err().to_string();
        assert!(e.starts_with("hf:2:"), "{e}");
    }
}
