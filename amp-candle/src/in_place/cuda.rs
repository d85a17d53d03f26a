//! The CUDA side of the in-place operations: the kernels of
//! `kernels/in_place.cu`, built to PTX by the build script and loaded into
//! candle's device once (as a custom module), one launch per tensor.
//!
//! Each kernel computes, element by element, the same sequence of IEEE
//! operations as the CPU loop of its operation, and the PTX is built
//! without contracting multiplications and additions: on a GPU a kernel
//! gives the CPU loop's bits (`tests/cuda.rs` compares them).

use std::cell::Cell;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CpuStorage, CudaStorage, DType, InplaceOp1, Layout, Tensor};

use super::span;

/// The names of the kernels of `kernels/in_place.cu` (written by the
/// build script).
mod names {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The PTX of `kernels/in_place.cu`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/in_place.ptx"));
/// The name candle keeps the loaded module under.
const MODULE: &str = "amp-candle-in-place";
/// Threads per block.
const THREADS: u32 = 256;
/// At most this many blocks; each thread then steps over the rest.
const MAX_BLOCKS: usize = 1 << 16;

/// Kernels launched so far ([`launches`]).
static LAUNCHES: AtomicU64 = AtomicU64::new(0);

/// The number of kernels the in-place operations have launched in this
/// process, on every device and thread.
pub(crate) fn launches() -> u64 {
    LAUNCHES.load(Ordering::Relaxed)
}

/// An operation's kernel: its names in `kernels/in_place.cu` (for f32 and
/// f64), its scalar operands as the kernel reads them, and the second
/// tensor it writes, if any.
pub(crate) trait OnCuda {
    /// The kernel's names: for f32, then for f64.
    const KERNEL: [&'static str; 2];
    /// The six scalar operands (unused ones 0).
    fn params(&self) -> [f64; 6];
    /// A second tensor the kernel writes (a buffer or a snapshot), which
    /// must share storage with none of the operation's tensors.
    fn second(&self) -> Option<&Tensor> {
        None
    }
}

/// A tensor's storage and layout.
type Operand<'a> = (&'a CudaStorage, &'a Layout);

/// The tensors of one launch: the destination `d`, written in place, a
/// second destination `e`, and the sources `x` and `y`.
struct Operands<'a> {
    d: (&'a mut CudaStorage, &'a Layout),
    e: Option<(&'a mut CudaStorage, &'a Layout)>,
    x: Option<Operand<'a>>,
    y: Option<Operand<'a>>,
}

/// Runs `op`'s kernel on the destination `d` (written in place) and the
/// sources `x` and `y`, plus its second destination when it has one.
pub(crate) fn run<Op: OnCuda>(
    name: &'static str,
    op: &Op,
    d: (&mut CudaStorage, &Layout),
    x: Option<Operand<'_>>,
    y: Option<Operand<'_>>,
) -> candle_core::Result<()> {
    let Some(second) = op.second() else {
        let operands = Operands { d, e: None, x, y };
        return launch(name, Op::KERNEL, op.params(), operands);
    };
    // candle's in-place operations write one tensor each: the second one
    // is reached through a nested operation, which holds its storage while
    // the kernel runs.
    let run = |e: &mut CudaStorage, el: &Layout| {
        let operands = Operands {
            d,
            e: Some((e, el)),
            x,
            y,
        };
        launch(name, Op::KERNEL, op.params(), operands)
    };
    second.inplace_op1(&Second {
        name,
        run: Cell::new(Some(run)),
    })
}

/// The nested operation of [`run`]: hands its tensor's storage to `run`,
/// once.
struct Second<F> {
    name: &'static str,
    run: Cell<Option<F>>,
}

impl<F: FnOnce(&mut CudaStorage, &Layout) -> candle_core::Result<()>> InplaceOp1 for Second<F> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        bail!(
            "{}: a CUDA tensor's second destination is on the CPU",
            self.name
        )
    }

    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        match self.run.take() {
            Some(run) => run(s, l),
            None => bail!("{}: the nested operation ran twice", self.name),
        }
    }
}

/// Launches `kernel`'s function for the destination's dtype over its
/// elements.
fn launch(
    name: &'static str,
    kernel: [&'static str; 2],
    params: [f64; 6],
    operands: Operands<'_>,
) -> candle_core::Result<()> {
    let dtype = operands.d.0.dtype();
    let mixed = |o: &Option<Operand<'_>>| o.is_some_and(|(s, _)| s.dtype() != dtype);
    let e_mixed = operands.e.as_ref().is_some_and(|(s, _)| s.dtype() != dtype);
    if mixed(&operands.x) || mixed(&operands.y) || e_mixed {
        bail!("{name}: operands of different dtypes");
    }
    match dtype {
        DType::F32 => typed::<f32>(name, kernel[0], params, operands),
        DType::F64 => typed::<f64>(name, kernel[1], params, operands),
        other => bail!("{name}: f32 and f64 only, not {other:?}"),
    }
}

/// [`launch`] for elements of type `T`: every operand's span is checked to
/// hold as many elements as the destination's before the kernel runs.
fn typed<T: CudaDType + DeviceRepr>(
    name: &'static str,
    function: &str,
    params: [f64; 6],
    operands: Operands<'_>,
) -> candle_core::Result<()> {
    let Operands { d, e, x, y } = operands;
    let dr = span(name, d.1)?;
    let n = dr.len();
    let same = |range: Range<usize>| match range.len() == n {
        true => Ok(range),
        false => Err(candle_core::Error::Msg(format!(
            "{name}: operands of different lengths"
        ))),
    };
    let er = e
        .as_ref()
        .map(|(_, l)| span(name, l).and_then(same))
        .transpose()?;
    let xr = x.map(|(_, l)| span(name, l).and_then(same)).transpose()?;
    let yr = y.map(|(_, l)| span(name, l).and_then(same)).transpose()?;
    if n == 0 {
        return Ok(());
    }
    let func = d.0.device.get_or_load_custom_func(function, MODULE, PTX)?;
    let xv = match (x, xr) {
        (Some((s, _)), Some(r)) => Some(s.as_cuda_slice::<T>()?.slice(r)),
        _ => None,
    };
    let yv = match (y, yr) {
        (Some((s, _)), Some(r)) => Some(s.as_cuda_slice::<T>()?.slice(r)),
        _ => None,
    };
    let mut ev = match (e, er) {
        (Some((s, _)), Some(r)) => Some(s.as_cuda_slice_mut::<T>()?.slice_mut(r)),
        _ => None,
    };
    let mut dv = d.0.as_cuda_slice_mut::<T>()?.slice_mut(dr);
    // An absent operand is a null pointer.
    let null = 0u64;
    let mut args = func.builder();
    args.arg(&n);
    args.arg(&mut dv);
    match &mut ev {
        Some(ev) => args.arg(ev),
        None => args.arg(&null),
    };
    match &xv {
        Some(xv) => args.arg(xv),
        None => args.arg(&null),
    };
    match &yv {
        Some(yv) => args.arg(yv),
        None => args.arg(&null),
    };
    for p in &params {
        args.arg(p);
    }
    let blocks = n.div_ceil(THREADS as usize).min(MAX_BLOCKS) as u32;
    let config = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: every kernel of the module takes (size_t n, T *d, T *e,
    // const T *x, const T *y, double ×6), pushed above in that order with T
    // the element type of `function`'s suffix; d, e, x and y hold n
    // elements each (checked above), and a kernel reads e, x or y only for
    // the operations that pass them.
    unsafe { args.launch(config) }.w()?;
    LAUNCHES.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

use super::{
    AdamFirst, AdamMax, AdamSecond, AdamTheta, AddcdivSqrt, Addcmul, Ascend, AscendSaving, Axpy,
    AxpyFrom, CopyFrom, Multiply, Scale, SgdDecayed, SgdDecayedSelf, SgdMomentumStep,
};

/// `OnCuda` for `$op`: kernel `$kernel` with the scalar operands
/// `|$this| [..]` (padded with zeros to six).
macro_rules! on_cuda {
    ($op:ty, $kernel:expr, |$this:ident| [$($p:expr),*]) => {
        impl OnCuda for $op {
            const KERNEL: [&'static str; 2] = $kernel;
            #[allow(unused_variables)]
            fn params(&self) -> [f64; 6] {
                let $this = self;
                let given = [$($p),*];
                let mut params = [0.0; 6];
                params[..given.len()].copy_from_slice(&given);
                params
            }
        }
    };
}

on_cuda!(Scale, names::SCALE, |op| [op.0]);
on_cuda!(Multiply, names::MULTIPLY, |op| [op.0]);
on_cuda!(CopyFrom, names::COPY, |op| []);
on_cuda!(Axpy, names::AXPY, |op| [op.0]);
on_cuda!(AxpyFrom, names::AXPY_FROM, |op| [op.0]);
on_cuda!(Ascend, names::ASCEND, |op| [op.inner_lr, op.c]);
on_cuda!(Addcmul, names::ADDCMUL, |op| [op.0]);
on_cuda!(AddcdivSqrt, names::ADDCDIV_SQRT, |op| [
    op.alpha, op.divisor, op.eps
]);
on_cuda!(SgdDecayed, names::SGD_DECAYED, |op| [
    op.0.weight_decay,
    0.0,
    0.0,
    op.0.step
]);
on_cuda!(SgdDecayedSelf, names::SGD_DECAYED_SELF, |op| [
    op.0.weight_decay,
    0.0,
    0.0,
    op.0.step
]);
on_cuda!(AdamFirst, names::ADAM_FIRST, |op| [
    op.0.shrink,
    op.0.l2,
    op.0.beta1.0,
    op.0.beta1.1
]);
on_cuda!(AdamSecond, names::ADAM_SECOND, |op| [
    op.0.shrink,
    op.0.l2,
    op.0.beta2.0,
    op.0.beta2.1
]);
on_cuda!(AdamMax, names::ADAM_MAX, |op| []);
on_cuda!(AdamTheta, names::ADAM_THETA, |op| [
    op.0.shrink,
    op.0.step,
    op.0.divisor,
    op.0.eps
]);

impl OnCuda for AscendSaving<'_> {
    const KERNEL: [&'static str; 2] = names::ASCEND_SAVING;
    fn params(&self) -> [f64; 6] {
        [self.ascend.inner_lr, self.ascend.c, 0.0, 0.0, 0.0, 0.0]
    }
    fn second(&self) -> Option<&Tensor> {
        Some(self.snapshot)
    }
}

impl OnCuda for SgdMomentumStep<'_> {
    const KERNEL: [&'static str; 2] = names::SGD_MOMENTUM;
    fn params(&self) -> [f64; 6] {
        let s = &self.step;
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        [
            s.weight_decay,
            s.momentum,
            s.keep,
            s.step,
            flag(s.first),
            flag(self.nesterov),
        ]
    }
    fn second(&self) -> Option<&Tensor> {
        Some(self.buffer)
    }
}
