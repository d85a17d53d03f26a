//! [`TchStore`]: the parameters, their gradients and the buffers, and
//! everything about them that is not a batched operation.

use std::ffi::c_int;

use amp_core::{
    check_shape, AmpError, BufferId, Buffers, DType, HostTensor, ParamStore, Result, Slot,
};
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

use crate::ffi::{self, check, raw, take_tensor, TensorView};
use crate::flat::Flat;
use crate::kinds::{device_name, dtype_of, host_to_tensor, kind_of, shape_of, tch_error};
use crate::master::Master;

/// Parameters as libtorch tensors, with their autograd gradients and
/// parameter-shaped buffers.
///
/// All tensors share one device and one floating-point dtype (`f32`, `f64`,
/// `f16` or `bf16`; half-precision ones may be stepped through f32
/// [master weights](TchStore::with_master_weights)), and no two share
/// memory; constructors reject anything
/// else with [`AmpError::DeviceMismatch`], [`AmpError::DTypeMismatch`] or
/// [`AmpError::InvalidConfig`]. The store holds shallow clones: in-place
/// updates of the store's tensors are updates of the model's own variables.
///
/// Gradients live in each tensor's `.grad()`, where `backward()` puts them;
/// [`ParamStore::write`] with [`Slot::Grads`] sets one by hand (tests,
/// host-computed gradients). An absent gradient reads as zeros; a batched
/// operation that writes into [`Slot::Grads`] of a tensor without a gradient
/// first gives it a zero gradient, which then counts in
/// [`grad_mask`](ParamStore::grad_mask) ([`amp_core::Amp`] only writes
/// gradients of tensors that have one). Buffers are zero-filled tensors of
/// the parameters' shapes, views into one allocation per buffer.
#[derive(Debug)]
pub struct TchStore {
    pub(crate) params: Vec<Tensor>,
    pub(crate) device: Device,
    pub(crate) kind: Kind,
    pub(crate) dtype: DType,
    pub(crate) buffers: Buffers<Vec<Tensor>>,
    pub(crate) flat: Option<Flat>,
    /// The model's half-precision variables, when `params` are their f32
    /// master copies ([`TchStore::with_master_weights`]).
    pub(crate) master: Option<Master>,
}

impl TchStore {
    /// A store over `tensors` (normally leaves that require grad; tensors
    /// that never get a gradient are simply never stepped).
    ///
    /// Errors: [`AmpError::DeviceMismatch`] when the tensors are not all on
    /// the first one's device, [`AmpError::DTypeMismatch`] when one is not a
    /// floating-point tensor or its dtype differs from the first one's,
    /// [`AmpError::InvalidConfig`] (field `tensors`) when two of them are the
    /// same tensor or views whose memory overlaps (their shared elements
    /// would be perturbed and stepped twice; disjoint parts of one storage,
    /// such as a [flattened](TchStore::flatten) store's tensors, are
    /// accepted), [`AmpError::Backend`] for an undefined tensor. An empty
    /// list gives an empty store on the CPU (which [`amp_core::Amp`] rejects
    /// with [`AmpError::EmptyStore`]).
    ///
    /// ```
    /// use amp_core::AmpError;
    /// use amp_tch::TchStore;
    /// use amp_tch::tch::Tensor;
    ///
    /// let w = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).set_requires_grad(true);
    /// let twice = TchStore::from_tensors(vec![w.shallow_clone(), w.shallow_clone()]);
    /// assert!(matches!(twice, Err(AmpError::InvalidConfig { field: "tensors", .. })));
    /// ```
    pub fn from_tensors(tensors: Vec<Tensor>) -> Result<Self> {
        let mut device = Device::Cpu;
        let mut kind = Kind::Float;
        for (index, tensor) in tensors.iter().enumerate() {
            if !tensor.defined() {
                return Err(AmpError::backend(format!("tensor {index} is undefined")));
            }
            let this_kind = tensor.f_kind().map_err(tch_error)?;
            if dtype_of(this_kind).is_none() {
                return Err(AmpError::DTypeMismatch {
                    index,
                    expected: "a floating-point dtype".into(),
                    found: format!("{this_kind:?}"),
                });
            }
            if index == 0 {
                device = tensor.device();
                kind = this_kind;
                continue;
            }
            if tensor.device() != device {
                return Err(AmpError::DeviceMismatch {
                    index,
                    expected: device_name(device),
                    found: device_name(tensor.device()),
                });
            }
            if this_kind != kind {
                return Err(AmpError::DTypeMismatch {
                    index,
                    expected: dtype_of(kind).map_or("?", DType::name).into(),
                    found: dtype_of(this_kind).map_or("?", DType::name).into(),
                });
            }
        }
        check_disjoint(&tensors)?;
        let dtype = dtype_of(kind).unwrap_or(DType::F32);
        Ok(TchStore {
            params: tensors,
            device,
            kind,
            dtype,
            buffers: Buffers::new(),
            flat: None,
            master: None,
        })
    }

    /// A store over the trainable variables of `vs`, in creation order.
    /// Errors as [`TchStore::from_tensors`].
    pub fn from_var_store(vs: &tch::nn::VarStore) -> Result<Self> {
        Self::from_tensors(vs.trainable_variables())
    }

    /// A store of new leaf tensors on `device` that require grad, holding
    /// `values` with their shapes and dtypes (the factory of the
    /// cross-backend test suite).
    pub fn from_host(values: &[HostTensor], device: Device) -> Result<Self> {
        let tensors = values
            .iter()
            .map(|value| {
                let kind = kind_of(value.dtype())?;
                host_to_tensor(value, kind, device)?
                    .f_set_requires_grad(true)
                    .map_err(tch_error)
            })
            .collect::<Result<Vec<_>>>()?;
        Self::from_tensors(tensors)
    }

    /// The parameter tensors, in store order: the model's variables (they
    /// share storage with them), which the closure computes with. With
    /// [master weights](TchStore::with_master_weights) they are the model's
    /// half-precision variables, and the tensors the optimiser steps are
    /// [`TchStore::master_tensors`].
    pub fn tensors(&self) -> &[Tensor] {
        match &self.master {
            Some(master) => &master.model,
            None => &self.params,
        }
    }

    /// Gives the parameter tensors of [`TchStore::tensors`] back.
    pub fn into_tensors(self) -> Vec<Tensor> {
        match self.master {
            Some(master) => master.model,
            None => self.params,
        }
    }

    /// The device of every tensor.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The libtorch kind of every tensor the optimiser steps, and of their
    /// gradients and buffers (`Float` with master weights; the model's is
    /// [`TchStore::model_kind`]).
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Sets the gradient of tensor `index` to a copy of `grad` (which must
    /// have the parameter's shape, [`TchStore::kind`] and device; with
    /// master weights, an f32 gradient of the master copy), without
    /// autograd: for
    /// gradients computed outside libtorch's `backward()`, or handed over
    /// from elsewhere. The store keeps its own copy, since the optimiser
    /// writes into gradients in place; an existing gradient is overwritten in
    /// place, a missing one allocated. Nothing changes on error.
    ///
    /// ```
    /// use amp_tch::TchStore;
    /// use amp_tch::tch::{Device, Kind, Tensor};
    ///
    /// let w = Tensor::zeros([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    /// let mut store = TchStore::from_tensors(vec![w])?;
    /// store.set_grad(0, &Tensor::from_slice(&[1.0f32, 2.0, 3.0]))?;
    /// let g = store.grad(0)?.expect("a gradient");
    /// assert_eq!(Vec::<f32>::try_from(&g).unwrap(), vec![1.0, 2.0, 3.0]);
    /// // The wrong shape is a typed error.
    /// assert!(store.set_grad(0, &Tensor::from_slice(&[1.0f32])).is_err());
    /// # Ok::<(), amp_core::AmpError>(())
    /// ```
    pub fn set_grad(&mut self, index: usize, grad: &Tensor) -> Result<()> {
        check_shape(index, &self.shape(index)?, &shape_of(grad)?)?;
        if grad.kind() != self.kind {
            return Err(AmpError::DTypeMismatch {
                index,
                expected: format!("{:?}", self.kind),
                found: format!("{:?}", grad.kind()),
            });
        }
        if grad.device() != self.device {
            return Err(AmpError::DeviceMismatch {
                index,
                expected: device_name(self.device),
                found: device_name(grad.device()),
            });
        }
        match self.attached_grad(index)? {
            Some(existing) => tch::no_grad(|| existing.shallow_clone().f_copy_(grad))
                .map(drop)
                .map_err(tch_error),
            None => {
                let dims: Vec<i64> = grad.size();
                let fresh = tch::no_grad(|| {
                    let mut fresh = Tensor::f_empty(dims.as_slice(), (self.kind, self.device))?;
                    fresh.f_copy_(grad)?;
                    Ok::<_, tch::TchError>(fresh)
                })
                .map_err(tch_error)?;
                self.attach_grad(index, &fresh)
            }
        }
    }

    /// The gradient of tensor `index` (sharing storage), or `None` when it
    /// has none.
    pub fn grad(&self, index: usize) -> Result<Option<Tensor>> {
        let grad = self.attached_grad(index)?;
        if grad.is_some() && self.flat.is_some() && !self.grad_mask()?[index] {
            // Flat layout: a zero gradient that nothing wrote is no gradient.
            return Ok(None);
        }
        Ok(grad)
    }

    /// The tensor in `.grad()` of parameter `index`, whether or not it
    /// received a gradient since the last reset.
    pub(crate) fn attached_grad(&self, index: usize) -> Result<Option<Tensor>> {
        self.check_index(index)?;
        let mut out: *mut C_tensor = std::ptr::null_mut();
        // SAFETY: the parameter outlives the call; `out` receives a new
        // `at::Tensor` that we own.
        check(unsafe { ffi::amp_tch_get_grad(raw(&self.params[index]), &mut out) })?;
        // SAFETY: freshly allocated by the shim.
        let grad = unsafe { take_tensor(out)? };
        Ok(grad.defined().then_some(grad))
    }

    /// Makes `grad` (a detached tensor of the parameter's shape, kind and
    /// device) the `.grad()` of parameter `index`.
    pub(crate) fn attach_grad(&self, index: usize, grad: &Tensor) -> Result<()> {
        self.check_index(index)?;
        // SAFETY: both tensors outlive the call.
        check(unsafe { ffi::amp_tch_set_grad(raw(&self.params[index]), raw(grad)) })
    }

    pub(crate) fn check_index(&self, index: usize) -> Result<()> {
        amp_core::check_index(index, self.params.len())
    }

    pub(crate) fn buffer(&self, id: BufferId) -> Result<&[Tensor]> {
        self.buffers.get(id).map(Vec::as_slice)
    }

    /// The shim's pointers of the masked-in tensors of `slot` and the view
    /// that reaches them; `write` says whether the shim writes into them.
    pub(crate) fn pointers(
        &self,
        slot: Slot,
        mask: &[bool],
        write: bool,
    ) -> Result<(Vec<*mut C_tensor>, TensorView)> {
        let (tensors, view) = match slot {
            Slot::Params => (&self.params[..], TensorView::Plain),
            Slot::Grads => (&self.params[..], TensorView::grads(write)),
            Slot::Buffer(id) => (self.buffer(id)?, TensorView::Plain),
        };
        let pointers = tensors
            .iter()
            .zip(mask)
            .filter(|(_, &m)| m)
            .map(|(t, _)| raw(t))
            .collect();
        Ok((pointers, view))
    }

    /// The shim's pointers of every parameter.
    pub(crate) fn all_params(&self) -> Vec<*mut C_tensor> {
        self.params.iter().map(raw).collect()
    }

    pub(crate) fn slot_tensor(&self, slot: Slot, index: usize) -> Result<Option<Tensor>> {
        self.check_index(index)?;
        match slot {
            Slot::Params => Ok(Some(self.params[index].shallow_clone())),
            Slot::Grads => self.grad(index),
            Slot::Buffer(id) => Ok(Some(self.buffer(id)?[index].shallow_clone())),
        }
    }
}

/// Refuses two tensors that are the same tensor or overlap in memory.
fn check_disjoint(tensors: &[Tensor]) -> Result<()> {
    let pointers: Vec<*mut C_tensor> = tensors.iter().map(raw).collect();
    let (mut first, mut second, mut found) = (0usize, 0usize, 0 as c_int);
    // SAFETY: the tensors outlive the call; the shim writes the three
    // outputs only.
    check(unsafe {
        ffi::amp_tch_find_overlap(
            pointers.as_ptr(),
            pointers.len(),
            &mut first,
            &mut second,
            &mut found,
        )
    })?;
    if found == 0 {
        return Ok(());
    }
    Err(AmpError::InvalidConfig {
        field: "tensors",
        reason: format!(
            "tensors {first} and {second} share memory (the same tensor twice, or \
             overlapping views of one storage): their shared elements would be \
             perturbed and stepped twice"
        ),
    })
}
