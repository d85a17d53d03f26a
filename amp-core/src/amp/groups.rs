//! Parameter groups resolved against the store.

use crate::config::{AmpConfig, ParamGroup};
use crate::error::{AmpError, Result};
use crate::state::GroupState;

pub(super) fn resolve_groups(config: &AmpConfig, n: usize) -> Result<Vec<GroupState>> {
    let inherit = |tensors: Vec<usize>, g: Option<&ParamGroup>| GroupState {
        tensors,
        lr: g.and_then(|g| g.lr).unwrap_or(config.lr),
        epsilon: g.and_then(|g| g.epsilon).unwrap_or(config.epsilon),
        inner_lr: g.and_then(|g| g.inner_lr).unwrap_or(config.inner_lr),
        weight_decay: g
            .and_then(|g| g.weight_decay)
            .unwrap_or(config.weight_decay),
    };
    if config.groups.is_empty() {
        return Ok(vec![inherit((0..n).collect(), None)]);
    }
    let mut owner = vec![None; n];
    let mut rest = None;
    for (g, group) in config.groups.iter().enumerate() {
        if group.rest {
            if let Some(other) = rest.replace(g) {
                return Err(AmpError::config(
                    "groups",
                    format!("groups {other} and {g} are both the rest"),
                ));
            }
        } else if group.tensors.is_empty() {
            return Err(AmpError::config(
                "groups",
                format!("group {g} holds no tensor"),
            ));
        }
        for &i in &group.tensors {
            let slot = owner.get_mut(i).ok_or_else(|| {
                AmpError::config(
                    "groups",
                    format!("group {g} names tensor {i}, but the store holds {n} tensors"),
                )
            })?;
            if let Some(other) = *slot {
                return Err(AmpError::config(
                    "groups",
                    format!("tensor {i} is in group {other} and in group {g}"),
                ));
            }
            *slot = Some(g);
        }
    }
    let unlisted: Vec<usize> = (0..n).filter(|&i| owner[i].is_none()).collect();
    match (rest, unlisted.first()) {
        (None, Some(i)) => {
            return Err(AmpError::config(
                "groups",
                format!("tensor {i} is in no group"),
            ))
        }
        (Some(g), None) if config.groups[g].tensors.is_empty() => {
            return Err(AmpError::config(
                "groups",
                format!("group {g} is the rest, but every tensor is in another group"),
            ))
        }
        _ => {}
    }
    Ok(config
        .groups
        .iter()
        .map(|g| {
            let mut tensors = g.tensors.clone();
            if g.rest {
                tensors.extend(&unlisted);
            }
            inherit(tensors, Some(g))
        })
        .collect())
}
