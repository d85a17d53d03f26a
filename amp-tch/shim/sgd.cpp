// The fused SGD step (`ParamStore::sgd_update`) on the CPU loop path.
//
// `sgd_loop` repeats, for speed, the element formula of
// `amp_core::elementwise::sgd`, itself the sequence of store operations
// `amp_core::composed::sgd_update` runs (axpy of the weight decay, copy or
// scale and axpy of the momentum buffer, Nesterov's axpy, axpy_from), one
// rounding per operation, no fused multiply-add (-ffp-contract=off). What
// ties the two is the conformance property `fused_ops_match_composed`
// (amp-testkit, run on plain and flattened tch stores by tests/tch.rs) and
// amp-tch's tests/fast_path.rs, bit for bit: a change on either side that
// is not made on the other fails them.

#include "loops.h"

using namespace amp_tch;

namespace {

// One tensor's coefficients, laid out as amp-tch's `SgdTensor` (ffi.rs):
// doubles only, so `coalesce_with` compares them by their bytes.
struct SgdTensor {
  double weight_decay; // 0: d is g itself
  double step;         // -lr
  double first;        // 1: the momentum buffer is set to d
};

// θ ← w + step · u over one piece, with d = g (+ λ·w), the momentum buffer
// b ← d (first) or (b·μ) + keep·d, u = d + μ·b (Nesterov), b or d. `t` may
// be `w` (the weights read are θ itself); g and b alias neither.
template <typename T, bool Decay, bool Buffer, bool First, bool Nesterov>
void sgd_loop(T *t, const T *w, const T *__restrict__ g, T *__restrict__ b,
              int64_t n, T lambda, T mu, T keep, T step) {
  for (int64_t k = 0; k < n; ++k) {
    T d = Decay ? g[k] + lambda * w[k] : g[k];
    T u = d;
    if (Buffer) {
      T next = First ? d : b[k] * mu + keep * d;
      b[k] = next;
      u = Nesterov ? d + mu * next : next;
    }
    t[k] = w[k] + step * u;
  }
}

template <typename T>
void fast_sgd(const std::vector<Span> &ts, const std::vector<Span> &ws,
              const std::vector<Span> &gs, const std::vector<Span> *bs,
              const std::vector<SgdTensor> &c, double momentum, double keep,
              bool nesterov) {
  const T mu = static_cast<T>(momentum), kp = static_cast<T>(keep);
  each_piece(ts, [&](size_t i, int64_t lo, int64_t hi) {
    if (lo == 0) {
      prefetch(ws, i + 1, sizeof(T));
      prefetch(gs, i + 1, sizeof(T));
      if (bs != nullptr) prefetch(*bs, i + 1, sizeof(T));
    }
    T *t = reinterpret_cast<T *>(ts[i].p) + lo;
    const T *w = reinterpret_cast<const T *>(ws[i].p) + lo;
    const T *g = reinterpret_cast<const T *>(gs[i].p) + lo;
    T *b = bs == nullptr ? nullptr : reinterpret_cast<T *>((*bs)[i].p) + lo;
    const T lambda = static_cast<T>(c[i].weight_decay);
    const T step = static_cast<T>(c[i].step);
    with_flag(c[i].weight_decay != 0.0, [&](auto decay) {
      with_flag(b != nullptr, [&](auto buffer) {
        with_flag(c[i].first != 0.0, [&](auto first) {
          with_flag(nesterov, [&](auto nest) {
            sgd_loop<T, decltype(decay)::value, decltype(buffer)::value,
                     decltype(first)::value, decltype(nest)::value>(
                t, w, g, b, hi - lo, lambda, mu, kp, step);
          });
        });
      });
    });
  });
}

} // namespace

extern "C" {

// One SGD step of n tensors: θ (params) from the weights read (`weights`,
// which may be `params` itself), the gradients (`grads` through
// `grads_view`) and the momentum buffer (`buffer`, NULL without momentum).
// *handled <- 1 when every tensor qualifies for the loop path; *handled <- 0
// and nothing written otherwise, and the caller runs the composed sequence.
char *amp_tch_sgd(at::Tensor **params, at::Tensor **weights,
                  at::Tensor **grads, int grads_view, at::Tensor **buffer,
                  size_t n, const SgdTensor *coefficients, double momentum,
                  double keep, int nesterov, int *handled) {
  return loop_entry(handled, [&] {
    if (n == 0) return true;
    TensorList theta(params, n, PLAIN);
    TensorList w(weights, n, PLAIN);
    TensorList g(grads, n, grads_view);
    at::ScalarType type = loop_type(theta);
    std::vector<Span> ts, ws, gs;
    OptionalSpans b;
    if (type == at::ScalarType::Undefined ||
        !read_spans(theta, type, true, ts) ||
        !read_spans(w, type, false, ws, &ts) ||
        !read_spans(g, type, false, gs, &ts) || !b.read(buffer, n, type, ts))
      return false;
    std::vector<SgdTensor> c(coefficients, coefficients + n);
    coalesce_with<SgdTensor>(with_optional({&ts, &ws, &gs}, b), &c,
                             elem_size(type));
    by_type(type, [&](auto t) {
      fast_sgd<decltype(t)>(ts, ws, gs, b.get(), c, momentum, keep,
                            nesterov != 0);
    });
    theta.bump();
    b.bump();
    return true;
  });
}

} // extern "C"
