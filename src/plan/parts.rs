//! The parts of a job (MPMD `:` sections): each part's image, program and ranks, and the job's
//! distinct images.

use super::PlanError;
use super::layout::NodeSlots;
use super::types::AppPlan;
use crate::facts::ImageSummary;
use crate::jobspec::{JobSpec, MAX_RANKS};

/// The parts of `spec` with their images (`images` holds one per part, in order) and their
/// ranks, numbered from 0 across parts. A single part without `-n` has `unnamed` ranks when
/// given (an applied rankfile's), else fills the `nodes`' slots; in an MPMD job every part
/// needs its own `-n`.
pub(super) fn parts(
    spec: &JobSpec,
    images: &[ImageSummary],
    nodes: &[NodeSlots],
    unnamed: Option<u32>,
) -> Result<Vec<AppPlan>, PlanError> {
    let capacity = nodes
        .iter()
        .fold(0u32, |a, n| a.saturating_add(n.slots))
        .min(MAX_RANKS);
    let mut apps = Vec::with_capacity(spec.apps.len());
    let mut next = 0u32;
    for (i, app) in spec.apps.iter().enumerate() {
        let ranks = match app.np {
            Some(n) => n,
            None if spec.apps.len() == 1 => unnamed.unwrap_or(capacity).max(1),
            None => return Err(PlanError::MpmdCountMissing { part: i + 1 }),
        };
        let image = images.get(i).cloned().unwrap_or_else(|| ImageSummary {
            path: app.image.clone(),
            ..ImageSummary::default()
        });
        apps.push(AppPlan {
            image,
            program: app.program.clone(),
            args: app.args.clone(),
            first_rank: next,
            ranks,
            wdir: app.wdir.clone().or_else(|| spec.wdir.clone()),
        });
        next = next.saturating_add(ranks);
    }
    if next > MAX_RANKS {
        return Err(PlanError::TooManyRanks { ranks: next });
    }
    Ok(apps)
}

/// The number of ranks of the job whose parts are `apps`.
pub(super) fn job_size(apps: &[AppPlan]) -> u32 {
    apps.iter().fold(0u32, |a, p| a.saturating_add(p.ranks))
}

/// The first part naming each different image, in the order the parts first name them: the
/// job's images (a node instance holds one root per image).
pub fn image_apps(apps: &[AppPlan]) -> Vec<&AppPlan> {
    let mut out: Vec<&AppPlan> = Vec::new();
    for a in apps {
        if !out.iter().any(|o| o.image.path == a.image.path) {
            out.push(a);
        }
    }
    out
}

/// How many different images the parts name.
pub(super) fn distinct_images(apps: &[AppPlan]) -> usize {
    image_apps(apps).len()
}
