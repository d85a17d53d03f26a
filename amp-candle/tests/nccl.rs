//! Data-parallel training through NCCL (feature `nccl`), on the
//! least-squares problem of `amp_testkit::data_parallel` with candle's
//! autograd on the GPU:
//! - a group of one rank steps exactly as a store without a collective
//!   (bit for bit), agrees on flags, and counts what it reduced;
//! - with two GPUs or more, one thread per GPU: the ranks' weights stay
//!   bit-identical, and match one process on the concatenated batch
//!   (amp-ndarray, f64, on the CPU) to 1e-5 relative (f32 on the GPU).
//!
//! The `device_` tests check errors on any machine. Without the feature,
//! or without a usable GPU, the others print
//! `SKIPPED` and why. With a single GPU the multi-GPU test prints a notice
//! and returns: NCCL refuses two ranks on one GPU, so the shared collective
//! logic is checked on one machine by the in-process and MPI suites.

#[cfg(not(feature = "nccl"))]
#[test]
fn nccl() {
    eprintln!("SKIPPED nccl: amp-candle was built without its `nccl` feature");
}

#[cfg(feature = "nccl")]
mod common;

#[cfg(feature = "nccl")]
mod on_gpus {
    use crate::common::gpu;
    use amp_candle::candle_core::{Device, Tensor, Var};
    use amp_candle::nccl::{NcclCollective, NcclId};
    use amp_candle::CandleStore;
    use amp_core::{Amp, AmpConfig, BoxError, Collective, Reduce, SgdConfig};
    use amp_testkit::data_parallel as dp;

    const STEPS: usize = 6;

    fn config() -> AmpConfig {
        AmpConfig::new(0.2, 0.05)
            .inner_iter(1)
            .weight_decay(1e-3)
            .reduce(Reduce::EveryPass)
    }

    /// How many GPUs can be opened.
    fn gpu_count() -> usize {
        (0..16)
            .take_while(|&i| amp_candle::cuda_device(i).is_ok())
            .count()
    }

    /// The problem's starting weights on `device`, in f32.
    fn store_on(device: &Device) -> CandleStore {
        let var = |v: &[f32]| Var::from_tensor(&Tensor::new(v, device).unwrap()).unwrap();
        CandleStore::from_vars(vec![var(&[0.3, -0.2, 0.1]), var(&[0.05])]).unwrap()
    }

    /// One step on `rows`: ½ mean (x·w + b − y)², gradients from candle's
    /// autograd.
    fn step(amp: &mut Amp<CandleStore>, rows: &[usize]) {
        let device = amp.store().device().clone();
        let (xs, ys): (Vec<[f64; 3]>, Vec<f64>) = rows.iter().map(|&i| dp::row(i)).unzip();
        let xs: Vec<f32> = xs.iter().flatten().map(|&v| v as f32).collect();
        let ys: Vec<f32> = ys.iter().map(|&v| v as f32).collect();
        let x = Tensor::from_vec(xs, (rows.len(), 3), &device).unwrap();
        let y = Tensor::from_vec(ys, rows.len(), &device).unwrap();
        amp.step(|s: &mut CandleStore, _| {
            let w = s.vars()[0].as_tensor().clone();
            let b = s.vars()[1].as_tensor().clone();
            let prediction = x.matmul(&w.unsqueeze(1)?)?.squeeze(1)?.broadcast_add(&b)?;
            let loss = ((prediction - &y)?.sqr()?.mean_all()? * 0.5)?;
            let value = s.backward(&loss)?;
            Ok::<_, BoxError>(((), value))
        })
        .expect("a step of the least-squares problem");
    }

    fn weights(amp: &Amp<CandleStore>) -> Vec<f32> {
        let store = amp.store();
        let values = store
            .vars()
            .iter()
            .map(|v| v.flatten_all()?.to_vec1::<f32>());
        let values: Result<Vec<Vec<f32>>, _> = values.collect();
        values.unwrap().concat()
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    // The `device_` tests run on any machine (the GPU bundle runs them
    // against its stand-ins for the driver and NCCL): bad input and a
    // failing NCCL are errors, never panics.

    #[test]
    fn device_cpu_is_refused() {
        let id = NcclId::from_bytes(&[0; 128]);
        let error = NcclCollective::new(&Device::Cpu, 0, 1, &id).unwrap_err();
        assert!(error.to_string().contains("CUDA device"), "{error}");
    }

    #[test]
    fn device_id_round_trips_through_bytes() {
        let bytes: [u8; 128] = std::array::from_fn(|i| (i * 7 + 3) as u8);
        assert_eq!(NcclId::from_bytes(&bytes).to_bytes(), bytes);
    }

    #[test]
    fn device_failing_nccl_is_an_error() {
        // With NCCL this makes an id; on the stand-in the bundle is built
        // against (every call fails), an error that says NCCL failed.
        if let Err(error) = NcclId::new() {
            assert!(error.to_string().contains("NCCL"), "{error}");
        }
    }

    #[test]
    fn a_group_of_one_steps_as_no_collective() {
        let Some(device) = gpu("a_group_of_one_steps_as_no_collective") else {
            return;
        };
        let id = NcclId::new().expect("NCCL on a GPU machine");
        let mut collective = NcclCollective::new(&device, 0, 1, &id).unwrap();
        let flags = Collective::<CandleStore>::all_and(&mut collective, &[true, false, true]);
        assert_eq!(flags.unwrap(), [true, false, true]);
        let stats = collective.stats();
        let sgd = SgdConfig::nesterov(0.9);
        let mut plain = Amp::sgd(store_on(&device), config(), sgd).unwrap();
        let grouped = Amp::sgd(store_on(&device), config(), sgd).unwrap();
        let mut grouped = grouped.with_collective(Box::new(collective)).unwrap();
        for s in 0..STEPS {
            let rows = dp::share(s, 0, 1);
            step(&mut plain, &rows);
            step(&mut grouped, &rows);
        }
        assert_eq!(bits(&weights(&plain)), bits(&weights(&grouped)));
        // K = 1, every pass: two reductions of 4 f32 per step.
        assert_eq!(stats.reductions(), 2 * STEPS as u64);
        assert_eq!(stats.sent_bytes(), 2 * 16 * STEPS as u64);
    }

    #[test]
    fn ranks_on_several_gpus_stay_identical_and_train_as_one_process() {
        if gpu("ranks_on_several_gpus_stay_identical_and_train_as_one_process").is_none() {
            return;
        }
        let count = gpu_count();
        if count < 2 {
            eprintln!(
                "notice: ranks_on_several_gpus_stay_identical_and_train_as_one_process needs \
                 2 GPUs, {count} visible: not run"
            );
            return;
        }
        let world = count.min(4);
        let bytes = NcclId::new().expect("NCCL on a GPU machine").to_bytes();
        let threads: Vec<_> = (0..world)
            .map(|rank| {
                std::thread::spawn(move || {
                    let id = NcclId::from_bytes(&bytes);
                    let device = amp_candle::cuda_device(rank).unwrap();
                    let collective = NcclCollective::new(&device, rank, world, &id).unwrap();
                    let amp = Amp::sgd(store_on(&device), config(), SgdConfig::nesterov(0.9));
                    let mut amp = amp.unwrap().with_collective(Box::new(collective)).unwrap();
                    for s in 0..STEPS {
                        step(&mut amp, &dp::share(s, rank, world));
                    }
                    weights(&amp)
                })
            })
            .collect();
        let ranks: Vec<Vec<f32>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        for (rank, got) in ranks.iter().enumerate().skip(1) {
            assert_eq!(
                bits(got),
                bits(&ranks[0]),
                "rank {rank} differs from rank 0"
            );
        }
        let single = Amp::sgd(dp::store::<f64>(), config(), SgdConfig::nesterov(0.9));
        let mut single = single.unwrap();
        for s in 0..STEPS {
            let rows: Vec<usize> = (0..world).flat_map(|r| dp::share(s, r, world)).collect();
            dp::step(&mut single, &rows);
        }
        for (got, want) in ranks[0].iter().zip(dp::weights(&single)) {
            let got = f64::from(*got);
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{world} GPUs: {got} against one process's {want}"
            );
        }
    }
}
