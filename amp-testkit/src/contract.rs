//! The store's gradient-presence rules ([`ParamStore`]'s "Gradients"
//! section), checked operation by operation.

use amp_core::{DType, HostTensor, ParamStore, Scalar, Slot};

use crate::properties::{fail, Check};
use crate::{host_values, read_slot, Case, StoreFactory};

/// Gradient presence follows the rules of [`ParamStore`]: `zero_grads`
/// makes every gradient absent (reading as zeros); `write_grad` makes one
/// present, leaving the others as they were; an operation on the gradient
/// slot changes values only; `zero_grads` again clears them all.
pub fn gradient_presence<F: StoreFactory>(factory: &F, case: &Case, dtype: DType) -> Check {
    let name = || format!("{} {dtype}", factory.name());
    let mut store = factory.make(&case.init, dtype).map_err(fail("make"))?;
    let n = store.num_tensors();
    let expect_mask = |store: &F::Store, want: &[bool], after: &str| -> Check {
        let mask = store.grad_mask().map_err(fail("grad_mask"))?;
        if mask != want {
            return Err(format!(
                "{}: after {after} the gradient mask is {mask:?}, expected {want:?}",
                name()
            ));
        }
        Ok(())
    };
    let expect_zeros = |store: &F::Store, absent: &[bool], after: &str| -> Check {
        let grads = read_slot(store, Slot::Grads).map_err(fail("read"))?;
        for (i, g) in grads.iter().enumerate() {
            if absent[i] && g.data().iter().any(|&x| x != 0.0) {
                return Err(format!(
                    "{}: after {after} the absent gradient {i} reads {:?}, not zeros",
                    name(),
                    g.data()
                ));
            }
        }
        Ok(())
    };

    store.zero_grads().map_err(fail("zero_grads"))?;
    let mut present = vec![false; n];
    expect_mask(&store, &present, "zero_grads")?;
    expect_zeros(&store, &[true].repeat(n), "zero_grads")?;

    // The objective's gradient at θ, written for every other tensor (the
    // first included), one at a time.
    let theta = read_slot(&store, Slot::Params).map_err(fail("read"))?;
    let (_, grads) = case.objective.evaluate(&host_values(&theta));
    let written: Vec<usize> = (0..n).step_by(2).collect();
    for &i in &written {
        let g = grads[i]
            .clone()
            .unwrap_or_else(|| vec![0.5; theta[i].data().len()]);
        let value = HostTensor::new(theta[i].shape().to_vec(), dtype, g).map_err(fail("host"))?;
        store.write_grad(i, &value).map_err(fail("write_grad"))?;
        present[i] = true;
        expect_mask(&store, &present, &format!("write_grad({i})"))?;
    }
    let absent: Vec<bool> = present.iter().map(|p| !p).collect();
    expect_zeros(&store, &absent, "write_grad")?;

    // An operation on the gradient slot (what clipping does) keeps presence.
    let before = read_slot(&store, Slot::Grads).map_err(fail("read"))?;
    let two = vec![<F::Store as ParamStore>::Scalar::from_f64_rounded(2.0); n];
    store
        .scale(Slot::Grads, &two, &present)
        .map_err(fail("scale"))?;
    expect_mask(&store, &present, "scale(Grads)")?;
    let after = read_slot(&store, Slot::Grads).map_err(fail("read"))?;
    for &i in &written {
        let doubled = before[i].data().iter().map(|x| 2.0 * x);
        if after[i].data().iter().zip(doubled).any(|(a, b)| *a != b) {
            return Err(format!(
                "{}: scale(Grads, 2) made gradient {i} {:?} from {:?}",
                name(),
                after[i].data(),
                before[i].data()
            ));
        }
    }

    store.zero_grads().map_err(fail("zero_grads"))?;
    expect_mask(&store, &vec![false; n], "the second zero_grads")?;
    expect_zeros(&store, &[true].repeat(n), "the second zero_grads")
}
