//! The plan as the front end passes it to every task of srun, hydra or mpirun (`CMPIRUN_PLAN`):
//! [`PLAN_FORMAT`], then the plan's JSON, deflated, in base64 (no padding).
//!
//! One environment string holds at most [`MAX_ARG_STRLEN`] bytes on Linux, and the launchers
//! copy it to every task. So the encoded plan must not grow with the job's ranks: its layout is
//! a rule ([`super::RankLayout`]: nodes, slots, mapping) from which each task computes its own
//! rank's place, and what only the front end uses stays out (the launcher's command lines, which
//! srun or hydra runs, and the host list of `-H`/the hostfile, whose nodes the layout names).
//! What remains grows with the nodes, slowly: host names compress well. `docs/scale.md` has the
//! sizes.

use std::io::{Read as _, Write as _};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;

use super::LaunchPlan;

/// The environment variable that carries the plan to the rank mode when the plan source is
/// `env:` (srun and hydra pass the caller's environment to every task).
pub const PLAN_VAR: &str = "CMPIRUN_PLAN";

/// The head of an encoded plan: the format and its version. A task refuses a version it does
/// not know (a front end and nodes that run different cmpirun releases) rather than misread it.
pub const PLAN_FORMAT: &str = "cmpirun-plan-1:";

/// What every version of the encoded form starts with.
const PLAN_FORMAT_NAME: &str = "cmpirun-plan-";

/// The longest single argument or environment string Linux's execve takes (32 pages of 4 KiB,
/// the terminating NUL included).
pub const MAX_ARG_STRLEN: usize = 32 * 4096;

/// The most JSON a task inflates from an encoded plan (a bound against a damaged value; the
/// plan of a job on 10,000 nodes is about 1 MiB).
const PLAN_JSON_MAX: u64 = 64 << 20;

/// `plan` as the tasks get it.
pub fn encode(plan: &LaunchPlan) -> Result<String, serde_json::Error> {
    let mut task_plan = plan.clone();
    task_plan.launcher.commands.clear();
    task_plan.job.hosts.clear();
    let json = serde_json::to_vec(&task_plan)?;
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    let packed = z
        .write_all(&json)
        .and_then(|()| z.finish())
        .map_err(serde_json::Error::io)?;
    Ok(format!("{PLAN_FORMAT}{}", STANDARD_NO_PAD.encode(packed)))
}

/// The size of the environment string `NAME=encoded` with its terminating NUL, as execve counts
/// it against [`MAX_ARG_STRLEN`].
pub fn env_bytes(name: &str, encoded: &str) -> usize {
    name.len() + 1 + encoded.len() + 1
}

/// The plan's JSON in `text`: the encoded form ([`encode`]) inflated, or `text` itself when it is
/// not encoded (plain JSON, what `--dry-run --json` prints). An error says what is wrong.
pub fn decode(text: &str) -> Result<std::borrow::Cow<'_, str>, String> {
    let Some(body) = text.strip_prefix(PLAN_FORMAT) else {
        if let Some(rest) = text.strip_prefix(PLAN_FORMAT_NAME) {
            let version = rest.split(':').next().unwrap_or_default();
            return Err(format!(
                "plan format {version:.16} is not the one this cmpirun reads ({PLAN_FORMAT}); \
                 run the same cmpirun release on the front end and on the nodes"
            ));
        }
        return Ok(text.into());
    };
    let packed = STANDARD_NO_PAD
        .decode(body.trim_end())
        .map_err(|e| format!("not base64: {e}"))?;
    let mut json = String::new();
    flate2::read::DeflateDecoder::new(packed.as_slice())
        .take(PLAN_JSON_MAX + 1)
        .read_to_string(&mut json)
        .map_err(|e| format!("not a deflated plan: {e}"))?;
    if json.len() as u64 > PLAN_JSON_MAX {
        return Err(format!("more than {PLAN_JSON_MAX} bytes once inflated"));
    }
    Ok(json.into())
}
