//! A framework author's view, batched tier: `ParamStore` implemented for a
//! tensor type that lives outside every crate of the workspace (plain
//! `Vec<Vec<f64>>` here), trained with AMP, and checked with the same
//! conformance suite as the shipped backends. `tests/custom_tensor.rs` shows
//! the per-tensor tier (`TensorOps` and `TensorStore`).

use amp_core::{
    check_len, Amp, AmpConfig, AmpError, BufferId, DType, HostTensor, ParamStore, Pass, Result,
    SgdConfig, Slot,
};
use amp_testkit::{conformance_suite, StoreFactory};

/// Flat vectors with their shapes.
#[derive(Clone, Debug)]
struct VecStore {
    shapes: Vec<Vec<usize>>,
    params: Vec<Vec<f64>>,
    grads: Vec<Option<Vec<f64>>>,
    buffers: Vec<Option<Vec<Vec<f64>>>>,
}

impl VecStore {
    fn new(shapes: Vec<Vec<usize>>, params: Vec<Vec<f64>>) -> Self {
        let n = params.len();
        VecStore {
            shapes,
            params,
            grads: vec![None; n],
            buffers: Vec::new(),
        }
    }

    fn get(&self, slot: Slot) -> Result<Vec<Vec<f64>>> {
        Ok(match slot {
            Slot::Params => self.params.clone(),
            Slot::Grads => self
                .grads
                .iter()
                .zip(&self.params)
                .map(|(g, p)| g.clone().unwrap_or_else(|| vec![0.0; p.len()]))
                .collect(),
            Slot::Buffer(id) => self
                .buffers
                .get(id.index())
                .cloned()
                .flatten()
                .ok_or(AmpError::UnknownBuffer(id.index()))?,
        })
    }

    fn put(&mut self, slot: Slot, value: Vec<Vec<f64>>, mask: &[bool]) -> Result<()> {
        check_len("mask", self.params.len(), mask.len())?;
        for (i, v) in value.into_iter().enumerate() {
            if !mask[i] {
                continue;
            }
            match slot {
                Slot::Params => self.params[i] = v,
                Slot::Grads => self.grads[i] = Some(v),
                Slot::Buffer(id) => {
                    self.buffers[id.index()].as_mut().expect("checked by get")[i] = v
                }
            }
        }
        Ok(())
    }

    /// Applies `f` to every masked-in tensor of `dst`, with the same tensor
    /// of `src` alongside.
    fn zip_map(
        &mut self,
        dst: Slot,
        src: Slot,
        mask: &[bool],
        f: impl Fn(usize, f64, f64) -> f64,
    ) -> Result<()> {
        let mut d = self.get(dst)?;
        let s = self.get(src)?;
        for (i, (d, s)) in d.iter_mut().zip(&s).enumerate() {
            for (x, y) in d.iter_mut().zip(s) {
                *x = f(i, *x, *y);
            }
        }
        self.put(dst, d, mask)
    }
}

impl ParamStore for VecStore {
    type Scalar = f64;
    type Norms = Vec<f64>;

    fn num_tensors(&self) -> usize {
        self.params.len()
    }
    fn shape(&self, index: usize) -> Result<Vec<usize>> {
        self.shapes
            .get(index)
            .cloned()
            .ok_or(AmpError::IndexOutOfRange {
                index,
                len: self.shapes.len(),
            })
    }
    fn dtype(&self) -> DType {
        DType::F64
    }
    fn zero_grads(&mut self) -> Result<()> {
        self.grads.iter_mut().for_each(|g| *g = None);
        Ok(())
    }
    fn grad_mask(&self) -> Result<Vec<bool>> {
        Ok(self.grads.iter().map(Option::is_some).collect())
    }
    fn alloc_buffer(&mut self) -> Result<BufferId> {
        let zeros = self.params.iter().map(|p| vec![0.0; p.len()]).collect();
        self.buffers.push(Some(zeros));
        Ok(BufferId::new(self.buffers.len() - 1))
    }
    fn free_buffer(&mut self, id: BufferId) -> Result<()> {
        self.buffers
            .get_mut(id.index())
            .and_then(Option::take)
            .map(drop)
            .ok_or(AmpError::UnknownBuffer(id.index()))
    }
    fn copy(&mut self, dst: Slot, src: Slot, mask: &[bool]) -> Result<()> {
        self.zip_map(dst, src, mask, |_, _, y| y)
    }
    fn scale(&mut self, dst: Slot, factor: &[f64], mask: &[bool]) -> Result<()> {
        check_len("factors", self.params.len(), factor.len())?;
        self.zip_map(dst, dst, mask, |i, x, _| x * factor[i])
    }
    fn axpy(&mut self, dst: Slot, alpha: &[f64], src: Slot, mask: &[bool]) -> Result<()> {
        check_len("alphas", self.params.len(), alpha.len())?;
        self.zip_map(dst, src, mask, |i, x, y| x + alpha[i] * y)
    }
    fn norms(&mut self, src: Slot, mask: &[bool]) -> Result<Vec<f64>> {
        check_len("mask", self.params.len(), mask.len())?;
        Ok(self
            .get(src)?
            .iter()
            .zip(mask)
            .map(|(t, &m)| {
                if m {
                    t.iter().map(|x| x * x).sum::<f64>().sqrt()
                } else {
                    0.0
                }
            })
            .collect())
    }
    fn clip_to_norms(
        &mut self,
        dst: Slot,
        norms: &Vec<f64>,
        max_norm: &[f64],
        mask: &[bool],
    ) -> Result<()> {
        check_len("norms", self.params.len(), norms.len())?;
        let coefficients: Vec<f64> = norms
            .iter()
            .zip(max_norm)
            .map(|(n, m)| (m / (n + amp_core::PROJECTION_GUARD)).min(1.0))
            .collect();
        self.scale(dst, &coefficients, mask)
    }
    fn norms_to_host(&self, norms: &Vec<f64>) -> Result<Vec<f64>> {
        Ok(norms.clone())
    }
    fn all_finite(&mut self, src: Slot, mask: &[bool]) -> Result<bool> {
        check_len("mask", self.params.len(), mask.len())?;
        Ok(self
            .get(src)?
            .iter()
            .zip(mask)
            .all(|(t, &m)| !m || t.iter().all(|x| x.is_finite())))
    }
    fn read(&self, slot: Slot, index: usize) -> Result<HostTensor> {
        let shape = self.shape(index)?;
        HostTensor::new(shape, DType::F64, self.get(slot)?.swap_remove(index))
    }
    fn write(&mut self, slot: Slot, index: usize, value: &HostTensor) -> Result<()> {
        let expected = self.shape(index)?;
        if value.shape() != expected {
            return Err(AmpError::ShapeMismatch {
                index,
                expected,
                found: value.shape().to_vec(),
            });
        }
        let mut all = self.get(slot)?;
        all[index] = value.data().to_vec();
        let mut mask = vec![false; self.params.len()];
        mask[index] = true;
        self.put(slot, all, &mask)
    }
}

struct VecFactory;

impl StoreFactory for VecFactory {
    type Store = VecStore;
    fn make(&self, values: &[HostTensor], dtype: DType) -> Result<VecStore> {
        if dtype != DType::F64 {
            return Err(AmpError::backend("VecStore holds f64 only"));
        }
        Ok(VecStore::new(
            values.iter().map(|v| v.shape().to_vec()).collect(),
            values.iter().map(|v| v.data().to_vec()).collect(),
        ))
    }
    fn name(&self) -> String {
        "Vec<Vec<f64>>".into()
    }
}

// The whole conformance suite, as for the shipped backends.
conformance_suite!(vec_store, VecFactory, DType::F64);

#[test]
fn trains_a_least_squares_fit_with_amp() {
    // Fit y = 2x − 1 with weight and bias in separate tensors.
    let xs: Vec<f64> = (0..20).map(|i| i as f64 / 10.0 - 1.0).collect();
    let store = VecStore::new(vec![vec![1], vec![]], vec![vec![0.0], vec![0.0]]);
    let config = AmpConfig::new(0.1, 0.05);
    let mut amp = Amp::sgd(store, config, SgdConfig::nesterov(0.9)).unwrap();
    let mut loss = f64::INFINITY;
    for _ in 0..200 {
        let report = amp
            .step(|s: &mut VecStore, _pass: Pass| {
                let (w, b) = (s.params[0][0], s.params[1][0]);
                let n = xs.len() as f64;
                let (mut gw, mut gb, mut l) = (0.0, 0.0, 0.0);
                for &x in &xs {
                    let r = w * x + b - (2.0 * x - 1.0);
                    l += 0.5 * r * r / n;
                    gw += r * x / n;
                    gb += r / n;
                }
                s.grads[0] = Some(vec![gw]);
                s.grads[1] = Some(vec![gb]);
                Ok::<_, AmpError>(((), l))
            })
            .unwrap();
        loss = report.loss;
    }
    assert!(loss < 1e-6, "loss {loss}");
    let (w, b) = (amp.store().params[0][0], amp.store().params[1][0]);
    assert!(
        (w - 2.0).abs() < 1e-3 && (b + 1.0).abs() < 1e-3,
        "w {w}, b {b}"
    );
}
