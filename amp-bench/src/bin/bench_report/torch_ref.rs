//! The PyTorch column: the benchmark MLPs trained by PyTorch itself
//! (`scripts/torch_reference.py`), timed in the same run, interleaved with
//! amp's libtorch trainers.
//!
//! What is measured, per MLP of [`SPECS`]:
//!
//! * **torch AMP/ERM**: the script's AMP step (the per-tensor Python loop of
//!   the reference implementations: clean pass, per tensor δ = ζ·g projected
//!   onto the ε-ball, θ + δ, perturbed pass, θ restored by subtracting δ,
//!   then the base step with the perturbed gradient) against its ERM step
//!   (`torch.optim.SGD` with Nesterov momentum, or Adam/AdamW with
//!   `--optimizer`), interleaved, median of per-pair ratios. This is the
//!   `torch` column of the AMP/ERM rows.
//! * **amp/torch**, for each selected libtorch store (`tch`, `tch-flat`):
//!   amp's ERM trainer against torch's ERM, and amp's AMP trainer against
//!   torch's AMP, each pair interleaved the same way. Below 1, amp's step
//!   is the faster.
//!
//! What makes it like for like:
//!
//! * the same network, initial weights and batch ([`Problem`], written to
//!   raw little-endian files the script reads), the same hyper-parameters
//!   ([`amp_config`], the SGD of the fixtures' base optimiser), the same
//!   libtorch (tch links the virtualenv's torch), the same number of
//!   intra-op threads (libtorch's in this process, passed to
//!   `torch.set_num_threads`) and the same device;
//! * both closures run forward, cross-entropy and backward and bring the
//!   loss to the host as a double on every pass;
//! * each side times only its own steps, in its own process (the script
//!   with `time.perf_counter`, the device synchronised at both ends): the
//!   pipe round trip and the JSON are outside both figures;
//! * the two processes never compute at once: the script blocks on its pipe
//!   while amp runs and amp waits for the reply while the script runs, and
//!   blocks of at least four times the plan's block length amortise the
//!   switch;
//! * the loaded model's loss at the initial weights must match the one
//!   computed here with libtorch, or the column reports an error.
//!
//! What differs, on purpose: torch's side is what a PyTorch user runs, with
//! the interpreter's cost per tensor and per operation, `torch.optim`'s
//! default implementation (a per-tensor loop on the CPU) and the reference's
//! host synchronisation per tensor for the clip test; its AMP restores θ by
//! subtracting δ (within rounding), while amp's default copy-restore is
//! bit-exact and moves one more parameter-sized buffer per step. The two
//! trajectories drift apart by rounding over many steps; dense MLP steps
//! cost the same whatever the values.
//!
//! The column reports `n/a (reason)` when the script cannot be started
//! (no Python in `$VIRTUAL_ENV/bin` or `.venv/bin`, torch missing) or for
//! bf16 runs, and the rest of the report goes on.

use std::cell::RefCell;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use amp::{BoxError, SgdConfig};
use serde_json::{json, Value};
use tch::{Kind, Tensor};

use crate::fixtures::{amp_config, current_settings, Steps, Timing};
use crate::measure::{interleave, PairResult, Plan};
use crate::mlp::{MlpSpec, Problem, EPSILON, INPUTS, LR, SPECS};
use crate::MlpResult;

/// One store's comparison with PyTorch on one MLP: `erm` has torch's ERM
/// as A and amp's as B, `amp` the same for AMP, so each pair's ratios are
/// amp / torch.
pub struct VsTorch {
    /// amp ERM against torch ERM.
    pub erm: PairResult,
    /// amp AMP against torch AMP.
    pub amp: PairResult,
}

/// Everything the PyTorch comparison measured.
pub struct Report {
    /// One line on the reference: torch version, threads and device, or why
    /// it is not available.
    pub about: String,
    /// torch's AMP/ERM per MLP, in the order of `SPECS`: the `torch` column.
    pub own: Vec<Result<MlpResult, String>>,
    /// Per compared store (by backend name): its comparisons per MLP.
    pub vs: Vec<(&'static str, Vec<Result<VsTorch, String>>)>,
}

/// The libtorch stores compared with PyTorch, by backend name.
const STORES: [&str; 2] = ["tch", "tch-flat"];

/// Runs the comparisons for those of `selected` backends that are libtorch
/// stores, and torch's own AMP/ERM, over every MLP. Never fails: what could
/// not be measured is an error entry.
pub fn measure(selected: &[&'static str], plan: &Plan) -> Report {
    let stores: Vec<&'static str> = selected
        .iter()
        .copied()
        .filter(|s| STORES.contains(s))
        .collect();
    let unavailable = |why: String| Report {
        about: why.clone(),
        own: SPECS.iter().map(|_| Err(why.clone())).collect(),
        vs: stores
            .iter()
            .map(|&s| (s, SPECS.iter().map(|_| Err(why.clone())).collect()))
            .collect(),
    };
    if current_settings().bf16 {
        return unavailable("n/a (bf16 runs: the reference is f32)".into());
    }
    let (server, about) = match Server::spawn() {
        Ok(started) => started,
        Err(e) => return unavailable(format!("n/a ({e})")),
    };
    let server = Rc::new(RefCell::new(server));
    let mut report = Report {
        about,
        own: Vec::new(),
        vs: stores.iter().map(|&s| (s, Vec::new())).collect(),
    };
    for spec in SPECS {
        eprintln!("  torch mlp {}", spec.name);
        match load(&server, spec) {
            Ok((problem, mut erm, mut amp)) => {
                report.own.push(
                    interleave(&mut erm, &mut amp, &crate::mlp_plan(plan), false)
                        .map(|pair| MlpResult {
                            pair,
                            amp_held: amp.amp_buffers_held(),
                            held: amp.buffers_held(),
                        })
                        .map_err(|e| e.to_string()),
                );
                for (store, results) in report.vs.iter_mut() {
                    eprintln!("  {store} vs torch mlp {}", spec.name);
                    results.push(
                        compare(store, &problem, &mut erm, &mut amp, plan)
                            .map_err(|e| e.to_string()),
                    );
                }
                let _ = server
                    .borrow_mut()
                    .call(json!({"cmd": "free", "model": spec.name}));
            }
            Err(e) => {
                let e = e.to_string();
                report.own.push(Err(e.clone()));
                for (_, results) in report.vs.iter_mut() {
                    results.push(Err(e.clone()));
                }
            }
        }
    }
    report
}

/// amp's ERM and AMP trainers of `store` against torch's, on `problem`.
fn compare(
    store: &str,
    problem: &Problem,
    torch_erm: &mut TorchTrainer,
    torch_amp: &mut TorchTrainer,
    plan: &Plan,
) -> Result<VsTorch, BoxError> {
    let (mut erm, mut amp) = match store {
        "tch" => crate::mlp_tch::trainers(problem)?,
        "tch-flat" => crate::mlp_tch::flat_trainers(problem)?,
        other => return Err(format!("no libtorch store named {other}").into()),
    };
    let plan = crate::mlp_plan(plan);
    Ok(VsTorch {
        erm: interleave(torch_erm, &mut erm, &plan, false)?,
        amp: interleave(torch_amp, &mut amp, &plan, false)?,
    })
}

/// Loads `spec`'s problem into the script; the problem, and the script's
/// ERM and AMP trainers of it.
fn load(
    server: &Rc<RefCell<Server>>,
    spec: MlpSpec,
) -> Result<(Problem, TorchTrainer, TorchTrainer), BoxError> {
    let problem = spec.problem(crate::MLP_SEED);
    let dir = tempfile::tempdir()?;
    write_problem(&problem, dir.path())?;
    let config = amp_config(1, LR, EPSILON);
    let optimizer = match current_settings().adam {
        None => {
            // The fixtures' base optimiser.
            let sgd = SgdConfig::nesterov(0.9);
            json!({
                "name": "sgd",
                "lr": config.lr,
                "momentum": sgd.momentum,
                "dampening": sgd.dampening,
                "nesterov": sgd.nesterov,
                "weight_decay": config.weight_decay,
            })
        }
        Some(adam) => json!({
            "name": if adam.decoupled_weight_decay { "adamw" } else { "adam" },
            "lr": config.lr,
            "betas": [adam.beta1, adam.beta2],
            "eps": adam.eps,
            "weight_decay": config.weight_decay,
            "amsgrad": adam.amsgrad,
        }),
    };
    let reply = server.borrow_mut().call(json!({
        "cmd": "load",
        "model": spec.name,
        "dir": dir.path(),
        "dims": spec.dims(),
        "batch": spec.batch,
        "optimizer": optimizer,
        "amp": {
            "epsilon": config.epsilon,
            "inner_lr": config.inner_lr,
            "inner_iter": config.inner_iter,
            "interval": config.interval,
        },
    }))?;
    let (tensors, numel) = (field(&reply, "tensors")?, field(&reply, "numel")?);
    if (tensors as usize, numel as usize) != (spec.tensors(), spec.numel()) {
        return Err(format!(
            "torch built {tensors} tensors / {numel} parameters, expected {} / {}",
            spec.tensors(),
            spec.numel()
        )
        .into());
    }
    let theirs = field(&reply, "loss")?;
    let ours = initial_loss(&problem)?;
    if (theirs - ours).abs() > 1e-4 * ours.abs().max(1.0) {
        return Err(format!("initial loss: torch {theirs}, libtorch here {ours}").into());
    }
    let trainer = |mode| TorchTrainer {
        server: Rc::clone(server),
        model: spec.name,
        mode,
        tensors: spec.tensors(),
        numel: spec.numel(),
        held: 0,
        amp_held: 0,
    };
    Ok((problem, trainer("erm"), trainer("amp")))
}

/// `problem` as the script reads it: `params.f32` (each layer's weight
/// `[outputs, inputs]` row-major, then its bias, input layer first),
/// `x.f32` and `y.i64`, raw little-endian.
fn write_problem(problem: &Problem, dir: &Path) -> Result<(), BoxError> {
    let mut params = Vec::with_capacity(4 * problem.spec.numel());
    for layer in &problem.layers {
        for v in layer.weight.iter().chain(&layer.bias) {
            params.extend_from_slice(&v.to_le_bytes());
        }
    }
    let x: Vec<u8> = problem.x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let y: Vec<u8> = problem
        .y
        .iter()
        .flat_map(|&c| (c as i64).to_le_bytes())
        .collect();
    std::fs::write(dir.join("params.f32"), params)?;
    std::fs::write(dir.join("x.f32"), x)?;
    std::fs::write(dir.join("y.i64"), y)?;
    Ok(())
}

/// The MLP's mean cross-entropy at `problem`'s initial weights, by
/// libtorch on the CPU.
fn initial_loss(problem: &Problem) -> Result<f64, BoxError> {
    tch::no_grad(|| {
        let mut h =
            Tensor::from_slice(&problem.x).f_view([problem.spec.batch as i64, INPUTS as i64])?;
        let count = problem.layers.len();
        for (l, layer) in problem.layers.iter().enumerate() {
            let w = Tensor::from_slice(&layer.weight)
                .f_view([layer.outputs as i64, layer.inputs as i64])?;
            let b = Tensor::from_slice(&layer.bias);
            h = h.f_matmul(&w.f_tr()?)?.f_add(&b)?;
            if l + 1 < count {
                h = h.f_relu()?;
            }
        }
        let labels: Vec<i64> = problem.y.iter().map(|&c| c as i64).collect();
        let loss = h.f_cross_entropy_loss::<Tensor>(
            &Tensor::from_slice(&labels),
            None,
            tch::Reduction::Mean,
            -100,
            0.0,
        )?;
        Ok(loss.f_to_kind(Kind::Double)?.f_double_value(&[])?)
    })
}

/// A number field of a reply.
fn field(reply: &Value, name: &str) -> Result<f64, BoxError> {
    reply
        .get(name)
        .and_then(Value::as_f64)
        .ok_or_else(|| format!("torch reference: no number {name:?} in {reply}").into())
}

/// The script, running as a line server (protocol in its docstring).
struct Server {
    child: Child,
    /// `None` once closed.
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Server {
    /// Starts the script with the virtualenv's Python and initialises it
    /// with libtorch's thread count and device; the server and a line about
    /// it.
    fn spawn() -> Result<(Server, String), BoxError> {
        // The workspace root: amp-bench's parent.
        let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = crate_dir.parent().unwrap_or(crate_dir);
        let script = root.join("scripts/torch_reference.py");
        if !script.is_file() {
            return Err(format!("no {}", script.display()).into());
        }
        let python = python(root)?;
        let mut child = Command::new(&python)
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
        let (stdin, stdout) = (child.stdin.take(), child.stdout.take());
        let mut server = Server {
            child,
            stdin,
            stdout: BufReader::new(stdout.ok_or("no pipe from the torch reference")?),
        };
        let device = match crate::fixtures::tc::device() {
            tch::Device::Cuda(_) => "cuda",
            _ => "cpu",
        };
        let threads = tch::get_num_threads();
        let reply = server.call(json!({"cmd": "init", "threads": threads, "device": device}))?;
        let about = format!(
            "PyTorch {} ({}), {} threads, {}",
            reply.get("torch").and_then(Value::as_str).unwrap_or("?"),
            python.display(),
            reply.get("threads").and_then(Value::as_u64).unwrap_or(0),
            reply.get("device").and_then(Value::as_str).unwrap_or("?"),
        );
        Ok((server, about))
    }

    /// Sends one command and reads its reply; an `"ok": false` reply, a
    /// closed pipe or a line that is not JSON is an error.
    fn call(&mut self, request: Value) -> Result<Value, BoxError> {
        let stdin = self.stdin.as_mut().ok_or("torch reference closed")?;
        writeln!(stdin, "{request}")
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("torch reference: cannot send ({e}); see its stderr"))?;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            return Err("torch reference exited (see its stderr above)".into());
        }
        let reply: Value = serde_json::from_str(&line)
            .map_err(|e| format!("torch reference: not JSON ({e}): {}", line.trim()))?;
        if reply.get("ok") != Some(&Value::Bool(true)) {
            let error = reply.get("error").and_then(Value::as_str).unwrap_or("?");
            return Err(format!("torch reference: {error}").into());
        }
        Ok(reply)
    }
}

impl Drop for Server {
    /// Closes the script's stdin (it exits at EOF) and reaps it, killing it
    /// after a few seconds.
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `$VIRTUAL_ENV/bin/python`, else `.venv/bin/python` under `root`.
fn python(root: &Path) -> Result<PathBuf, String> {
    std::env::var_os("VIRTUAL_ENV")
        .map(|v| PathBuf::from(v).join("bin/python"))
        .into_iter()
        .chain(std::iter::once(root.join(".venv/bin/python")))
        .find(|p| p.is_file())
        .ok_or_else(|| "no python in $VIRTUAL_ENV/bin or .venv/bin".into())
}

/// One of the script's trainers (ERM or AMP copy of a loaded MLP), behind
/// the [`Steps`] interface that [`interleave`] drives.
struct TorchTrainer {
    server: Rc<RefCell<Server>>,
    model: &'static str,
    /// `"erm"` or `"amp"`.
    mode: &'static str,
    tensors: usize,
    numel: usize,
    /// Parameter-sized buffers held between steps, as the last run said.
    held: usize,
    /// Of those, AMP's own.
    amp_held: usize,
}

impl Steps for TorchTrainer {
    fn run(&mut self, n: usize) -> Result<Timing, BoxError> {
        let reply = self.server.borrow_mut().call(json!({
            "cmd": "run",
            "model": self.model,
            "mode": self.mode,
            "steps": n,
        }))?;
        let secs = |name| -> Result<Duration, BoxError> {
            Ok(Duration::try_from_secs_f64(field(&reply, name)?)?)
        };
        let (total, closure) = (secs("secs")?, secs("closure_secs")?);
        self.held = field(&reply, "held")? as usize;
        self.amp_held = field(&reply, "amp_held")? as usize;
        Ok(Timing {
            total,
            closure,
            steps: n,
        })
    }
    fn amp_buffers_held(&self) -> usize {
        self.amp_held
    }
    fn buffers_held(&self) -> usize {
        self.held
    }
    fn numel(&self) -> usize {
        self.numel
    }
    fn tensors(&self) -> usize {
        self.tensors
    }
}
