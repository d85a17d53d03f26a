//! Validation of an [`AmpState`] against the optimiser it is loaded into,
//! done in full before [`Amp::load_state`](crate::Amp::load_state) changes
//! anything.

use crate::amp::Amp;
use crate::config::check_hyper_in;
use crate::error::{AmpError, Result};
use crate::optimizer::BaseOptimizer;
use crate::state::{AmpState, StateOptions};
use crate::store::{ParamStore, Scalar};

/// Checks everything [`Amp::load_state_with`] documents.
pub(crate) fn check<S: ParamStore, O: BaseOptimizer<S>>(
    amp: &Amp<S, O>,
    state: &AmpState,
    options: &StateOptions,
) -> Result<()> {
    let keep = options.keep_hyperparameters;
    let ours = amp.groups();
    if state.groups.len() != ours.len() {
        return Err(AmpError::state(format!(
            "the state has {} parameter groups, this optimiser {}",
            state.groups.len(),
            ours.len()
        )));
    }
    for (g, (saved, here)) in state.groups.iter().zip(ours).enumerate() {
        if saved.tensors != here.tensors {
            return Err(AmpError::state(format!(
                "group {g} holds tensors {:?} in the state but {:?} here",
                saved.tensors, here.tensors
            )));
        }
        check_hyper_in::<S::Scalar>("lr", saved.lr)
            .map_err(|e| AmpError::state(format!("group {g}: {e}")))?;
        if keep {
            continue;
        }
        for (field, saved, here) in [
            ("epsilon", saved.epsilon, here.epsilon),
            ("inner_lr", saved.inner_lr, here.inner_lr),
            ("weight_decay", saved.weight_decay, here.weight_decay),
        ] {
            same(&format!("`{field}` of group {g}"), saved, here)?;
        }
    }

    let config = amp.config();
    crate::loss_scale::check_state(config.loss_scale.as_ref(), state.loss_scale.as_ref(), keep)?;
    if !keep && state.config.loss_scale != config.loss_scale {
        return Err(AmpError::state(format!(
            "the loss scale is configured as {:?} in the state but {:?} here (load with \
             `keep_hyperparameters` to keep this optimiser's)",
            state.config.loss_scale, config.loss_scale
        )));
    }

    let base = amp.base();
    if state.base.kind != base.kind() {
        return Err(AmpError::state(format!(
            "the state is of a {:?} optimiser, this one is {:?}",
            state.base.kind,
            base.kind()
        )));
    }
    if !keep {
        if state.config.inner_iter != config.inner_iter {
            return Err(mismatch(
                "`inner_iter`",
                state.config.inner_iter,
                config.inner_iter,
            ));
        }
        if (state.config.interval, state.config.start_step) != (config.interval, config.start_step)
        {
            return Err(mismatch(
                "`interval` and `start_step`",
                format!("{} and {}", state.config.interval, state.config.start_step),
                format!("{} and {}", config.interval, config.start_step),
            ));
        }
        if state.config.epsilon_schedule != config.epsilon_schedule {
            return Err(mismatch(
                "`epsilon_schedule`",
                state.config.epsilon_schedule.name(),
                config.epsilon_schedule.name(),
            ));
        }
        if state.config.restore != config.restore {
            return Err(mismatch(
                "`restore`",
                state.config.restore.name(),
                config.restore.name(),
            ));
        }
        let settings = base.settings();
        let names = |list: &mut dyn Iterator<Item = &str>| list.collect::<Vec<_>>().join(", ");
        if state.base.settings.len() != settings.len()
            || state
                .base
                .settings
                .iter()
                .zip(&settings)
                .any(|((a, _), (b, _))| a != b)
        {
            return Err(AmpError::state(format!(
                "the state records base-optimiser settings [{}], this optimiser has [{}]",
                names(&mut state.base.settings.iter().map(|(n, _)| n.as_str())),
                names(&mut settings.iter().map(|(n, _)| *n)),
            )));
        }
        for ((name, saved), (_, here)) in state.base.settings.iter().zip(&settings) {
            same(&format!("base-optimiser setting `{name}`"), *saved, *here)?;
        }
    }

    // Values no step could start from: a NaN momentum would put NaN into
    // the weights of the next step that reports success.
    let n = amp.store().num_tensors();
    for (name, tensors) in &state.base.state.buffers {
        if tensors.len() != n {
            return Err(AmpError::state(format!(
                "buffer {name:?} has {} tensors, the store {n}",
                tensors.len()
            )));
        }
        for (i, tensor) in tensors.iter().enumerate() {
            let Some(tensor) = tensor else { continue };
            if let Some(x) = tensor.data().iter().find(|&&x| !representable::<S>(x)) {
                return Err(AmpError::state(format!(
                    "buffer {name:?} of tensor {i} holds {x}, which is not finite in the \
                     store's scalar type"
                )));
            }
        }
    }
    for (name, values) in &state.base.state.scalars {
        if let Some(x) = values.iter().find(|&&x| !representable::<S>(x)) {
            return Err(AmpError::state(format!(
                "value {name:?} holds {x}, which is not finite in the store's scalar type"
            )));
        }
    }
    Ok(())
}

fn representable<S: ParamStore>(x: f64) -> bool {
    num_traits::Float::is_finite(S::Scalar::from_f64_rounded(x))
}

/// Bit-for-bit equality of a hyper-parameter, else a typed error.
fn same(what: &str, saved: f64, here: f64) -> Result<()> {
    if saved.to_bits() == here.to_bits() {
        Ok(())
    } else {
        Err(mismatch(what, saved, here))
    }
}

fn mismatch(what: &str, saved: impl std::fmt::Display, here: impl std::fmt::Display) -> AmpError {
    AmpError::state(format!(
        "{what} is {saved} in the state but {here} here (load with `keep_hyperparameters` to \
         keep this optimiser's)"
    ))
}
