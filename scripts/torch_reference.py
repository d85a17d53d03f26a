#!/usr/bin/env python3
"""PyTorch reference trainers for amp-bench's bench_report: ERM with
torch.optim and AMP (adversarial model perturbation, Zheng, Zhang & Mao,
CVPR 2021; not automatic mixed precision) written in plain PyTorch as the
Python reference implementations write it, per docs/algorithm.md.

Two ways to run it:

  python scripts/torch_reference.py               # line server (below)
  python scripts/torch_reference.py --self-check  # checks the AMP step

The server reads one JSON command per line on stdin and writes one JSON
reply per line on stdout (flushed after each). Every reply carries "ok":
true, or "ok": false and "error": a message; a malformed or failing command
gets an error reply and the server keeps serving. It exits on EOF or on
{"cmd": "quit"}. Commands:

  {"cmd": "init", "threads": N, "device": "cpu" | "cuda"}
      torch.set_num_threads(N) (omitted or 0: torch's default) and the
      device of every later model. Reply: torch version, threads, device.

  {"cmd": "load", "model": NAME, "dir": PATH, "dims": [64, w, ..., 10],
   "batch": B, "optimizer": OPT, "amp": AMP}
      Builds two copies (ERM and AMP) of the MLP Linear(dims[0], dims[1]),
      ReLU, ..., Linear(dims[-2], dims[-1]) from PATH/params.f32 (every
      layer's weight [out, in] row-major then its bias, layer by layer),
      PATH/x.f32 (B x dims[0] inputs, row-major) and PATH/y.i64 (B labels),
      raw little-endian. OPT: {"name": "sgd", "lr", "momentum",
      "dampening", "nesterov", "weight_decay"} or {"name": "adam" | "adamw", "lr",
      "betas": [b1, b2], "eps", "weight_decay", "amsgrad"}. AMP: {"epsilon",
      "inner_lr", "inner_iter", "interval"}; the ERM copy ignores it.
      Reply: tensors, numel and the loss at the initial weights.

  {"cmd": "run", "model": NAME, "mode": "erm" | "amp", "steps": N}
      N steps of that copy. Reply: "secs" (wall time of the N steps, the
      device synchronised at both ends), "closure_secs" (time inside the
      closure calls), "steps", "loss" (the last step's clean loss),
      "held" (parameter-sized buffers held between steps, optimiser state
      included) and "amp_held" (those AMP holds itself: 0, δ lives for one
      step only).

  {"cmd": "free", "model": NAME}     drops both copies.
  {"cmd": "quit"}                    replies, then exits.
"""

import json
import math
import os
import sys
import time
import warnings

# The wheel may come without numpy; torch then warns once at import. Nothing
# here needs numpy.
warnings.filterwarnings("ignore", message=".*NumPy.*")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


# ---------------------------------------------------------------------------
# Model, data, optimisers


def build_mlp(dims, flat_params, dtype, device):
    """The MLP of `dims` with its weights taken in order from `flat_params`
    (each layer's weight [out, in] row-major, then its bias)."""
    layers = []
    offset = 0
    with torch.no_grad():
        for i in range(len(dims) - 1):
            fan_in, fan_out = dims[i], dims[i + 1]
            linear = torch.nn.Linear(fan_in, fan_out, dtype=dtype, device=device)
            n = fan_in * fan_out
            linear.weight.copy_(flat_params[offset:offset + n].view(fan_out, fan_in))
            offset += n
            linear.bias.copy_(flat_params[offset:offset + fan_out])
            offset += fan_out
            layers.append(linear)
            if i + 2 < len(dims):
                layers.append(torch.nn.ReLU())
    if offset != flat_params.numel():
        raise ValueError(f"params: {flat_params.numel()} values, the dims need {offset}")
    return torch.nn.Sequential(*layers)


def make_optimizer(params, spec):
    """A torch.optim optimiser from its JSON description."""
    name = spec.get("name", "sgd")
    if name == "sgd":
        return torch.optim.SGD(
            params,
            lr=float(spec["lr"]),
            momentum=float(spec.get("momentum", 0.0)),
            dampening=float(spec.get("dampening", 0.0)),
            nesterov=bool(spec.get("nesterov", False)),
            weight_decay=float(spec.get("weight_decay", 0.0)),
        )
    if name in ("adam", "adamw"):
        kind = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return kind(
            params,
            lr=float(spec["lr"]),
            betas=tuple(float(b) for b in spec.get("betas", (0.9, 0.999))),
            eps=float(spec.get("eps", 1e-8)),
            weight_decay=float(spec.get("weight_decay", 0.0 if name == "adam" else 1e-2)),
            amsgrad=bool(spec.get("amsgrad", False)),
        )
    raise ValueError(f"optimizer: expected sgd, adam or adamw, got {name!r}")


class Trainer:
    """One model with its optimiser and closure.

    `inner_iter` 0 is ERM: one closure call and one base-optimiser step per
    step. `inner_iter` K > 0 is AMP as docs/algorithm.md states it, on every
    `interval`-th step (counted from 0), with plain steps between."""

    def __init__(self, model, x, y, optimizer, epsilon=0.0, inner_lr=1.0,
                 inner_iter=0, interval=1, on_pass=None):
        """`optimizer` steps `model`'s parameters; `x`, `y` are the batch."""
        self.model = model
        self.params = [p for p in model.parameters()]
        self.x = x
        self.y = y
        self.opt = optimizer
        self.epsilon = float(epsilon)
        self.inner_lr = float(inner_lr)
        self.inner_iter = int(inner_iter)
        self.interval = max(1, int(interval))
        self.steps = 0
        self.cuda = x.device.type == "cuda"
        # Time inside the closure calls since the last reset.
        self.closure_secs = 0.0
        # Called at the start of every closure call with the pass number
        # (0: clean, k: perturbed pass k); the self-check watches with it.
        self.on_pass = on_pass
        if self.inner_iter < 0 or self.epsilon < 0 or self.inner_lr < 0:
            raise ValueError("inner_iter, epsilon and inner_lr must be >= 0")

    def closure(self, pass_no):
        """Forward and backward at the current weights; the loss as a
        Python float (a host synchronisation, as a training loop's
        logging makes)."""
        if self.on_pass is not None:
            self.on_pass(pass_no)
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        value = loss.item()
        if self.cuda:
            torch.cuda.synchronize()
        self.closure_secs += time.perf_counter() - start
        return value

    def step(self):
        """One step; returns the clean pass's loss."""
        perturb = self.inner_iter > 0 and self.steps % self.interval == 0
        self.steps += 1
        loss = self.closure(0)
        if perturb:
            self.perturb_and_restore()
        self.opt.step()
        return loss

    def perturb_and_restore(self):
        """Steps 2-4 of docs/algorithm.md after the clean pass: K rounds of
        ascent, per-tensor projection onto the ε-ball, move to θ + δ and a
        perturbed pass; then θ restored by subtracting δ. The gradients left
        in the parameters are those taken at θ + δ_K."""
        # Tensors without a gradient after the clean pass are neither
        # perturbed nor stepped.
        live = [p for p in self.params if p.grad is not None]
        deltas = [None] * len(live)
        eps = self.epsilon
        zeta = self.inner_lr
        for k in range(self.inner_iter):
            with torch.no_grad():
                for i, p in enumerate(live):
                    if deltas[i] is None:
                        delta = p.grad.mul(zeta)
                        deltas[i] = delta
                    else:
                        delta = deltas[i]
                        p.sub_(delta)
                        delta.add_(p.grad, alpha=zeta)
                    # Per tensor: δ · min(1, ε / (‖δ‖₂ + 1e-12)). The norm
                    # comes to the host for the test, once per tensor.
                    scale = eps / (float(delta.norm()) + 1e-12)
                    if scale < 1.0:
                        delta.mul_(scale)
                    p.add_(delta)
            self.closure(k + 1)
        with torch.no_grad():
            for p, delta in zip(live, deltas):
                p.sub_(delta)

    def run(self, n):
        """`n` steps; (seconds, closure seconds, last clean loss)."""
        self.closure_secs = 0.0
        loss = float("nan")
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            loss = self.step()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, self.closure_secs, loss

    def held(self):
        """Parameter-sized buffers the optimiser state holds between steps
        (the most any tensor has)."""
        most = 0
        for p in self.params:
            state = self.opt.state.get(p, {})
            count = sum(1 for v in state.values()
                        if torch.is_tensor(v) and v.shape == p.shape)
            most = max(most, count)
        return most


# ---------------------------------------------------------------------------
# Server


def read_raw(path, dtype, count):
    """`count` little-endian values of `dtype` from the file at `path`."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    size = torch.tensor([], dtype=dtype).element_size()
    if len(data) != size * count:
        raise ValueError(f"{path}: {len(data)} bytes, expected {size * count}")
    t = torch.frombuffer(data, dtype=dtype) if count else torch.empty(0, dtype=dtype)
    if sys.byteorder != "little" and count:
        t = t.view(torch.uint8).view(-1, size).flip(1).contiguous().view(dtype).view(-1)
    return t.clone()


class Server:
    """The line protocol of the module docstring."""

    def __init__(self):
        """No models yet; the CPU until init says otherwise."""
        self.device = torch.device("cpu")
        self.models = {}

    def handle(self, request):
        """The reply to one command (without "ok"); raises on failure."""
        cmd = request.get("cmd")
        if cmd == "init":
            return self.init(request)
        if cmd == "load":
            return self.load(request)
        if cmd == "run":
            return self.run(request)
        if cmd == "free":
            self.models.pop(self.name(request), None)
            return {}
        if cmd == "quit":
            return {}
        raise ValueError(f"unknown cmd {cmd!r}")

    @staticmethod
    def name(request):
        """The command's "model" name."""
        name = request.get("model")
        if not isinstance(name, str):
            raise ValueError("missing \"model\"")
        return name

    def init(self, request):
        """Threads and device."""
        threads = int(request.get("threads", 0))
        if threads > 0:
            torch.set_num_threads(threads)
        device = request.get("device", "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda: torch sees no GPU")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device: expected cpu or cuda, got {device!r}")
        self.device = torch.device(device)
        return {"torch": torch.__version__, "threads": torch.get_num_threads(),
                "device": str(self.device)}

    def load(self, request):
        """Builds the ERM and AMP copies of a model from its files."""
        name = self.name(request)
        dims = [int(d) for d in request["dims"]]
        batch = int(request["batch"])
        if len(dims) < 2 or min(dims) < 1 or batch < 1:
            raise ValueError(f"dims {dims}, batch {batch}")
        folder = request["dir"]
        numel = sum(dims[i] * dims[i + 1] + dims[i + 1] for i in range(len(dims) - 1))
        flat = read_raw(os.path.join(folder, "params.f32"), torch.float32, numel)
        x = read_raw(os.path.join(folder, "x.f32"), torch.float32, batch * dims[0])
        y = read_raw(os.path.join(folder, "y.i64"), torch.int64, batch)
        if batch and (int(y.min()) < 0 or int(y.max()) >= dims[-1]):
            raise ValueError(f"labels outside 0..{dims[-1]}")
        x = x.view(batch, dims[0]).to(self.device)
        y = y.to(self.device)
        amp = request.get("amp", {})
        trainers = {}
        for mode in ("erm", "amp"):
            model = build_mlp(dims, flat, torch.float32, self.device)
            opt = make_optimizer(model.parameters(), request.get("optimizer", {}))
            if mode == "erm":
                trainers[mode] = Trainer(model, x, y, opt)
            else:
                trainers[mode] = Trainer(
                    model, x, y, opt,
                    epsilon=amp.get("epsilon", 0.5),
                    inner_lr=amp.get("inner_lr", 1.0),
                    inner_iter=amp.get("inner_iter", 1),
                    interval=amp.get("interval", 1),
                )
        with torch.no_grad():
            loss = float(F.cross_entropy(trainers["erm"].model(x), y))
        self.models[name] = trainers
        return {"model": name, "tensors": len(trainers["erm"].params),
                "numel": numel, "loss": loss}

    def run(self, request):
        """Runs one copy of a loaded model for some steps."""
        name = self.name(request)
        if name not in self.models:
            raise ValueError(f"no model {name!r} loaded")
        mode = request.get("mode")
        if mode not in ("erm", "amp"):
            raise ValueError(f"mode: expected erm or amp, got {mode!r}")
        steps = int(request.get("steps", 1))
        if steps < 0:
            raise ValueError("steps must be >= 0")
        trainer = self.models[name][mode]
        secs, closure_secs, loss = trainer.run(steps)
        if steps and not math.isfinite(loss):
            raise ValueError(f"non-finite loss {loss} after {trainer.steps} steps")
        return {"secs": secs, "closure_secs": closure_secs, "steps": steps,
                "loss": loss, "held": trainer.held(), "amp_held": 0}


def serve():
    """Answers commands from stdin until EOF or quit."""
    # Replies go to a private copy of stdout; anything else writing to file
    # descriptor 1 (a library's print) lands on stderr instead and cannot
    # corrupt the protocol.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    server = Server()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        quit_now = False
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a command is a JSON object")
            reply = server.handle(request)
            reply["ok"] = True
            quit_now = request.get("cmd") == "quit"
        except Exception as e:  # every failure becomes a reply
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
        if quit_now:
            break
    return 0


# ---------------------------------------------------------------------------
# Self-check


class Checks:
    """Collects named pass/fail results."""

    def __init__(self):
        """None run yet."""
        self.failed = []
        self.count = 0

    def check(self, name, ok, detail=""):
        """Records and prints one result."""
        self.count += 1
        print(f"  {'ok  ' if ok else 'FAIL'} {name}{(': ' + detail) if detail else ''}")
        if not ok:
            self.failed.append(name)


def tiny_problem(seed=0, dtype=torch.float64):
    """A tiny MLP 5 -> 4 -> 3 -> 3 on a batch of 6, as flat weights."""
    gen = torch.Generator().manual_seed(seed)
    dims = [5, 4, 3, 3]
    numel = sum(dims[i] * dims[i + 1] + dims[i + 1] for i in range(len(dims) - 1))
    flat = (torch.rand(numel, generator=gen, dtype=dtype) - 0.5)
    x = torch.rand(6, dims[0], generator=gen, dtype=dtype) * 2 - 1
    y = torch.randint(0, dims[-1], (6,), generator=gen)
    return dims, flat, x, y


def functional_loss(dims, params, x, y):
    """The MLP's loss from a list [w0, b0, w1, b1, ...], written out."""
    h = x
    layers = len(dims) - 1
    for i in range(layers):
        h = h @ params[2 * i].T + params[2 * i + 1]
        if i + 1 < layers:
            h = h.clamp_min(0)
    return F.cross_entropy(h, y)


def hand_grads(dims, params, x, y):
    """Gradients of the loss at `params`, by autograd on fresh leaves."""
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    loss = functional_loss(dims, leaves, x, y)
    return torch.autograd.grad(loss, leaves)


def project(delta, eps):
    """δ · min(1, ε / (‖δ‖₂ + 1e-12)), by the formula."""
    return delta * min(1.0, eps / (delta.norm().item() + 1e-12))


def hand_amp_sgd(dims, theta, x, y, steps, lr, momentum, wd, eps, zeta, K):
    """`steps` AMP steps over Nesterov SGD computed from docs/algorithm.md
    directly; returns the weights and, per step, the δs used."""
    theta = [t.clone() for t in theta]
    bufs = None
    deltas_per_step = []
    for _ in range(steps):
        g = hand_grads(dims, theta, x, y)
        deltas = [torch.zeros_like(t) for t in theta]
        for _ in range(K):
            deltas = [project(d + zeta * gi, eps) for d, gi in zip(deltas, g)]
            g = hand_grads(dims, [t + d for t, d in zip(theta, deltas)], x, y)
        deltas_per_step.append(deltas)
        d = [gi + wd * t for gi, t in zip(g, theta)]
        if bufs is None:
            bufs = [di.clone() for di in d]
        else:
            bufs = [momentum * b + di for b, di in zip(bufs, d)]
        d = [di + momentum * b for di, b in zip(d, bufs)]
        theta = [t - lr * di for t, di in zip(theta, d)]
    return theta, deltas_per_step


def make_trainer(dims, flat, x, y, opt_spec, on_pass=None, **amp):
    """A Trainer over a fresh MLP from `flat`; `amp` holds its AMP settings."""
    model = build_mlp(dims, flat, flat.dtype, x.device)
    opt = make_optimizer(model.parameters(), opt_spec)
    return Trainer(model, x, y, opt, on_pass=on_pass, **amp)


def params_of(trainer):
    """Copies of a trainer's weights."""
    return [p.detach().clone() for p in trainer.params]


def max_diff(a, b):
    """Largest absolute element difference between two lists of tensors."""
    return max(float((u - v).abs().max()) for u, v in zip(a, b))


def self_check():
    """Checks the AMP step against docs/algorithm.md on a tiny model, then
    the server protocol end to end. Returns the exit status."""
    torch.manual_seed(0)
    c = Checks()
    dims, flat, x, y = tiny_problem()
    theta0 = [p.detach().clone() for p in build_mlp(dims, flat, flat.dtype, "cpu").parameters()]
    lr, momentum, wd, zeta = 0.1, 0.9, 1e-2, 0.7
    sgd = {"name": "sgd", "lr": lr, "momentum": momentum, "nesterov": True,
           "weight_decay": wd}

    # A radius between the smallest and largest ‖ζ g_i‖, so that the step
    # clips some tensors and leaves others whole.
    norms = [zeta * float(g.norm()) for g in hand_grads(dims, theta0, x, y)]
    eps = math.sqrt(min(norms) * max(norms))
    clipped = sum(n > eps for n in norms)
    c.check("the radius clips some tensors and not others",
            0 < clipped < len(norms), f"{clipped} of {len(norms)} clipped, eps {eps:.4g}")

    for K, steps in ((1, 3), (2, 2), (3, 1)):
        seen = []
        t = make_trainer(dims, flat, x, y, sgd, epsilon=eps, inner_lr=zeta, inner_iter=K)
        # Each pass's number and the weights the model holds when it starts.
        t.on_pass = lambda n, t=t, seen=seen: seen.append(
            (n, [p.detach().clone() for p in t.params]))
        expect, deltas = hand_amp_sgd(dims, theta0, x, y, steps, lr, momentum, wd, eps, zeta, K)
        for _ in range(steps):
            t.step()
        diff = max_diff(params_of(t), expect)
        c.check(f"K={K}: {steps} AMP steps over Nesterov SGD equal the hand computation",
                diff < 1e-12, f"max |diff| {diff:.2e}")
        c.check(f"K={K}: the closure runs K + 1 times per step",
                [n for n, _ in seen] == list(range(K + 1)) * steps)
        # What the model saw: θ on the clean pass, θ + δ_k on pass k; δ_K as
        # the hand computation has it, inside the ε-ball.
        worst_ball, worst_delta, worst_clean = 0.0, 0.0, 0.0
        for s in range(steps):
            passes = seen[s * (K + 1):(s + 1) * (K + 1)]
            clean = passes[0][1]
            if s == 0:
                worst_clean = max_diff(clean, theta0)
            for _, at in passes[1:]:
                for p, q in zip(at, clean):
                    worst_ball = max(worst_ball, float((p - q).norm()) / eps)
            last = [p - q for p, q in zip(passes[-1][1], clean)]
            worst_delta = max(worst_delta, max_diff(last, deltas[s]))
        c.check(f"K={K}: the clean pass sees θ", worst_clean == 0.0)
        c.check(f"K={K}: every perturbed pass lies in the ε-ball per tensor",
                worst_ball <= 1 + 1e-9, f"max ‖δ_i‖/ε {worst_ball:.6f}")
        c.check(f"K={K}: the last pass sees θ + δ_K of the hand computation",
                worst_delta < 1e-12, f"max |diff| {worst_delta:.2e}")

    # ε = 0: exactly plain SGD, and plain Adam / AdamW.
    for spec in (sgd, {"name": "adam", "lr": 1e-2, "weight_decay": wd},
                 {"name": "adamw", "lr": 1e-2, "weight_decay": wd, "amsgrad": True}):
        erm = make_trainer(dims, flat, x, y, spec)
        amp = make_trainer(dims, flat, x, y, spec, epsilon=0.0, inner_lr=zeta, inner_iter=1)
        for _ in range(4):
            erm.step()
            amp.step()
        same = all(torch.equal(p, q) for p, q in zip(params_of(erm), params_of(amp)))
        c.check(f"ε = 0: 4 AMP steps equal 4 {spec['name']} steps bit for bit", same)

    # K = 0 is the torch optimiser alone.
    erm = make_trainer(dims, flat, x, y, sgd)
    model = build_mlp(dims, flat, flat.dtype, "cpu")
    opt = make_optimizer(model.parameters(), sgd)
    for _ in range(3):
        erm.step()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    c.check("K = 0: equals torch.optim.SGD bit for bit",
            all(torch.equal(p, q.detach()) for p, q in zip(params_of(erm), model.parameters())))

    # lr = 0, no weight decay: θ comes back (subtract-restore: to rounding).
    still = make_trainer(dims, flat, x, y, dict(sgd, lr=0.0, weight_decay=0.0),
                         epsilon=eps, inner_lr=zeta, inner_iter=2)
    for _ in range(2):
        still.step()
    diff = max_diff(params_of(still), theta0)
    c.check("lr = 0: θ restored to rounding", diff < 1e-14, f"max |diff| {diff:.2e}")

    # interval 2: perturb on steps 0, 2, plain on 1, 3.
    calls = []
    t = make_trainer(dims, flat, x, y, sgd, on_pass=calls.append,
                     epsilon=eps, inner_lr=zeta, inner_iter=1, interval=2)
    for _ in range(4):
        t.step()
    c.check("interval 2: closure passes 0 1 | 0 | 0 1 | 0", calls == [0, 1, 0, 0, 1, 0],
            str(calls))

    check_server(c)
    print(f"self-check: {c.count - len(c.failed)} of {c.count} passed")
    if c.failed:
        print("failed: " + "; ".join(c.failed))
        return 1
    return 0


def raw_bytes(t):
    """A CPU tensor's values as raw bytes, native byte order."""
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist())


def check_server(c):
    """Runs this file as a server in a child process over a tiny f32
    problem written as bench_report writes it."""
    import subprocess
    import tempfile

    dims, flat, x, y = tiny_problem(seed=1, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "params.f32"), "wb") as f:
            f.write(raw_bytes(flat))
        with open(os.path.join(folder, "x.f32"), "wb") as f:
            f.write(raw_bytes(x))
        with open(os.path.join(folder, "y.i64"), "wb") as f:
            f.write(raw_bytes(y.to(torch.int64)))
        opt = {"name": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": True,
               "weight_decay": 0.0}
        amp = {"epsilon": 0.5, "inner_lr": 1.0, "inner_iter": 1, "interval": 1}
        requests = [
            {"cmd": "init", "threads": 1, "device": "cpu"},
            {"cmd": "load", "model": "tiny", "dir": folder, "dims": dims, "batch": 6,
             "optimizer": opt, "amp": amp},
            {"cmd": "run", "model": "tiny", "mode": "erm", "steps": 3},
            {"cmd": "run", "model": "tiny", "mode": "amp", "steps": 3},
            {"cmd": "run", "model": "nothing", "mode": "amp", "steps": 1},
            "this is not json",
            {"cmd": "load", "model": "bad", "dir": folder, "dims": [5, 7, 3], "batch": 6},
            {"cmd": "run", "model": "tiny", "mode": "sam", "steps": 1},
            {"cmd": "free", "model": "tiny"},
            {"cmd": "run", "model": "tiny", "mode": "erm", "steps": 1},
            {"cmd": "quit"},
        ]
        text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in requests)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__)], input=text,
                              capture_output=True, text=True, timeout=120)
    lines = proc.stdout.splitlines()
    try:
        replies = [json.loads(line) for line in lines]
    except ValueError:
        replies = []
    c.check("server: one JSON reply per command, exit status 0",
            len(replies) == len(requests) and proc.returncode == 0,
            f"{len(lines)} lines for {len(requests)} commands, status {proc.returncode}")
    if len(replies) != len(requests):
        print(proc.stderr)
        return
    oks = [r.get("ok") for r in replies]
    c.check("server: errors reply ok=false and the server goes on",
            oks == [True, True, True, True, False, False, False, False, True, False, True],
            str(oks))
    with torch.no_grad():
        expected = float(F.cross_entropy(build_mlp(dims, flat, torch.float32, "cpu")(x), y))
    got = replies[1].get("loss", float("nan"))
    c.check("server: the loaded model's loss matches the in-process one",
            abs(got - expected) <= 1e-6 * max(1.0, abs(expected)), f"{got} vs {expected}")
    run = replies[3]
    c.check("server: run replies timings",
            run.get("steps") == 3 and 0 <= run.get("closure_secs", -1) <= run.get("secs", -1),
            json.dumps(run))


def main(argv):
    """Runs the server, or the self-check with --self-check."""
    if argv[1:] == ["--self-check"]:
        return self_check()
    if len(argv) > 1:
        print(__doc__, file=sys.stderr)
        return 2
    return serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
