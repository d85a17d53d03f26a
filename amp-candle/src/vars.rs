//! Building a [`CandleStore`] from candle's vars, and what it tells about
//! them.

use amp_core::{AmpError, Buffers, HostTensor, Result};
use candle_core::{DType as CDType, Device, Var};
use candle_nn::VarMap;

use crate::slots::host_to_tensor;
use crate::{
    amp_dtype, backend, candle_dtype, compute_dtype, device_name, storage_address, CandleStore,
};

impl CandleStore {
    /// A store over `vars`, in the given order. They must share one device
    /// and one float dtype (f16, bf16, f32, f64) and be contiguous (every
    /// `Var` that candle creates is).
    pub fn from_vars(vars: Vec<Var>) -> Result<Self> {
        Self::build(vars, None)
    }

    /// A store over every var of `varmap`, sorted by name (a `VarMap` is a
    /// hash map, so its own order changes from run to run; sorting keeps
    /// tensor indices, parameter groups and checkpoints stable). The names
    /// are kept: see [`CandleStore::names`] and [`CandleStore::index_of`].
    pub fn from_varmap(varmap: &VarMap) -> Result<Self> {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| AmpError::backend("the VarMap's lock is poisoned"))?;
        let mut named: Vec<(String, Var)> = data
            .iter()
            .map(|(name, var)| (name.clone(), var.clone()))
            .collect();
        drop(data);
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let (names, vars) = named.into_iter().unzip();
        Self::build(vars, Some(names))
    }

    /// A store of new vars on `device` holding `values` (each in its own
    /// dtype; all must have the same one). This is the factory the
    /// cross-backend suite uses to start every backend from the same weights.
    pub fn from_host(values: &[HostTensor], device: &Device) -> Result<Self> {
        let vars = values
            .iter()
            .enumerate()
            .map(|(index, value)| {
                let dtype = candle_dtype(value.dtype()).ok_or_else(|| AmpError::DTypeMismatch {
                    index,
                    expected: "a dtype candle supports".into(),
                    found: value.dtype().to_string(),
                })?;
                let tensor = host_to_tensor(value, dtype, device)?;
                Var::from_tensor(&tensor).map_err(backend)
            })
            .collect::<Result<Vec<_>>>()?;
        Self::build(vars, None)
    }

    fn build(vars: Vec<Var>, names: Option<Vec<String>>) -> Result<Self> {
        let (device, dtype) = match vars.first() {
            Some(first) => (first.device().clone(), first.dtype()),
            None => (Device::Cpu, CDType::F32),
        };
        if amp_dtype(dtype).is_none() {
            return Err(AmpError::DTypeMismatch {
                index: 0,
                expected: "a float dtype (f16, bf16, f32 or f64)".into(),
                found: format!("{dtype:?}"),
            });
        }
        for (index, var) in vars.iter().enumerate() {
            if var.dtype() != dtype {
                return Err(AmpError::DTypeMismatch {
                    index,
                    expected: format!("{dtype:?} (the dtype of tensor 0)"),
                    found: format!("{:?}", var.dtype()),
                });
            }
            if !var.device().same_device(&device) {
                return Err(AmpError::DeviceMismatch {
                    index,
                    expected: device_name(&device),
                    found: device_name(var.device()),
                });
            }
            if !var.is_contiguous() {
                return Err(AmpError::backend(format!(
                    "tensor {index} is not contiguous; Var::set needs contiguous vars"
                )));
            }
        }
        // The same var twice would be perturbed and stepped twice: ε
        // exceeded, the step doubled.
        let mut seen = std::collections::HashMap::new();
        for (index, var) in vars.iter().enumerate() {
            if let Some(first) = seen.insert(var.id(), index) {
                return Err(AmpError::config(
                    "vars",
                    format!("tensors {first} and {index} are the same var"),
                ));
            }
        }
        let n = vars.len();
        let var_storage = vars.iter().map(|v| storage_address(v)).collect();
        let numel = vars.iter().map(|v| v.elem_count()).collect();
        Ok(CandleStore {
            vars,
            numel,
            var_storage,
            names,
            device,
            dtype,
            compute: compute_dtype(dtype),
            grads: vec![None; n],
            has_grad: vec![false; n],
            grad_owned: vec![false; n],
            spare: vec![None; n],
            in_place: true,
            in_place_cuda: false,
            buffers: Buffers::new(),
            master: None,
        })
    }

    /// The vars, in store order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Var `index`.
    pub fn var(&self, index: usize) -> Result<&Var> {
        self.check_index(index)?;
        Ok(&self.vars[index])
    }

    /// The vars' names, in store order, when the store was built from a
    /// `VarMap`.
    pub fn names(&self) -> Option<&[String]> {
        self.names.as_deref()
    }

    /// The index of the var called `name` (stores built from a `VarMap`).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.as_ref()?.iter().position(|n| n == name)
    }

    /// The device every var lives on (the CPU for an empty store).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype the store steps its parameters in, as candle names it:
    /// the vars' dtype, or `F32` with master weights.
    pub fn candle_dtype(&self) -> CDType {
        self.dtype
    }

    /// The vars' own dtype (the model's): the same as
    /// [`CandleStore::candle_dtype`] unless the store keeps master weights.
    pub fn model_dtype(&self) -> CDType {
        self.vars.first().map_or(self.dtype, |v| v.dtype())
    }

    /// Gives the vars back.
    pub fn into_vars(self) -> Vec<Var> {
        self.vars
    }
}
