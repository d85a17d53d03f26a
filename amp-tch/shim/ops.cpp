// The batched ParamStore operations of amp-tch: one entry point per
// operation, each one call per batch whatever the number of tensors.
//
// Two paths, chosen per call from the tensors as they are at that call:
//   the loop path  when every tensor the operation touches is a dense,
//                  contiguous f32/f64 CPU tensor (parameters, autograd
//                  gradients and buffers normally are): the loops of
//                  loops.h over the tensors' memory, elementwise operations
//                  merged over tensors that lie back to back (with the flat
//                  layout, usually all of them);
//   the ATen path  everything else (CUDA, half precision, strided tensors):
//                  ATen's multi-tensor `_foreach_*` operators, which tch
//                  0.24 does not bind.
// libtorch's CPU foreach kernels pay a full operator dispatch (~1 µs) per
// tensor per operator, and its infinity norm runs far below memory speed:
// that is why the loop path exists. Destinations it writes get their
// version counter bumped, as an in-place ATen op would.

#include "loops.h"

using namespace amp_tch;

namespace {

// Above this many distinct axpy coefficients, axpy switches from one
// `_foreach_add_` per distinct value to `_foreach_mul` + `_foreach_add_`.
constexpr size_t MAX_ALPHA_GROUPS = 4;

std::vector<at::Scalar> scalars(const double *values, size_t n) {
  std::vector<at::Scalar> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.emplace_back(values[i]);
  return out;
}

std::vector<double> doubles(const double *values, size_t n) {
  return std::vector<double>(values, values + n);
}

// d[i] += alpha[i] * s[i] through ATen. Parameter groups give few distinct
// coefficients, so the common case is one `_foreach_add_(dst, src, alpha)`
// per distinct value: exactly PyTorch's `add_(src, alpha=a)`. With many
// distinct values it is two foreach calls through a temporary.
void aten_axpy(std::vector<at::Tensor> &d, const std::vector<at::Tensor> &s,
               const double *alpha, size_t n) {
  std::vector<double> distinct;
  for (size_t i = 0; i < n && distinct.size() <= MAX_ALPHA_GROUPS; ++i) {
    bool seen = false;
    for (double v : distinct) {
      // Compare bit patterns so that 0.0 and -0.0 (and NaNs) stay apart.
      if (std::memcmp(&v, &alpha[i], sizeof(double)) == 0) {
        seen = true;
        break;
      }
    }
    if (!seen) distinct.push_back(alpha[i]);
  }
  if (distinct.size() > MAX_ALPHA_GROUPS) {
    auto scaled = at::_foreach_mul(s, scalars(alpha, n));
    at::_foreach_add_(d, scaled);
    return;
  }
  if (distinct.size() == 1) {
    at::_foreach_add_(d, s, distinct[0]);
    return;
  }
  for (double a : distinct) {
    std::vector<at::Tensor> dg, sg;
    for (size_t i = 0; i < n; ++i) {
      if (std::memcmp(&a, &alpha[i], sizeof(double)) == 0) {
        dg.push_back(d[i]);
        sg.push_back(s[i]);
      }
    }
    at::_foreach_add_(dg, sg, a);
  }
}

} // namespace

extern "C" {

void amp_tch_free_error(char *message) { std::free(message); }

// dst[i] <- src[i]
char *amp_tch_copy(at::Tensor **dst, int dst_view, at::Tensor **src,
                   int src_view, size_t n) {
  return guarded([&] {
    if (n == 0) return;
    TensorList d(dst, n, dst_view);
    TensorList s(src, n, src_view);
    at::ScalarType type = loop_type(d);
    std::vector<Span> ds, ss;
    if (type != at::ScalarType::Undefined && read_spans(d, type, true, ds) &&
        read_spans(s, type, false, ss, &ds)) {
      coalesce({&ds, &ss}, nullptr, elem_size(type));
      by_type(type, [&](auto t) { fast_copy<decltype(t)>(ds, ss); });
      return d.bump();
    }
    at::_foreach_copy_(d.aten(), s.aten());
  });
}

// dst[i] <- factor[i] * dst[i]
char *amp_tch_scale(at::Tensor **dst, int dst_view, const double *factor,
                    size_t n) {
  return guarded([&] {
    if (n == 0) return;
    TensorList d(dst, n, dst_view);
    at::ScalarType type = loop_type(d);
    std::vector<Span> ds;
    if (type != at::ScalarType::Undefined && read_spans(d, type, true, ds)) {
      auto f = doubles(factor, n);
      coalesce({&ds}, &f, elem_size(type));
      by_type(type, [&](auto t) { fast_scale<decltype(t)>(ds, f.data()); });
      return d.bump();
    }
    at::_foreach_mul_(d.aten(), scalars(factor, n));
  });
}

// dst[i] <- dst[i] + alpha[i] * src[i]
char *amp_tch_axpy(at::Tensor **dst, int dst_view, at::Tensor **src,
                   int src_view, const double *alpha, size_t n) {
  return guarded([&] {
    if (n == 0) return;
    TensorList d(dst, n, dst_view);
    TensorList s(src, n, src_view);
    at::ScalarType type = loop_type(d);
    std::vector<Span> ds, ss;
    if (type != at::ScalarType::Undefined && read_spans(d, type, true, ds) &&
        read_spans(s, type, false, ss, &ds)) {
      auto a = doubles(alpha, n);
      coalesce({&ds, &ss}, &a, elem_size(type));
      by_type(type, [&](auto t) { fast_axpy<decltype(t)>(ds, ss, a.data()); });
      return d.bump();
    }
    auto dt = d.aten();
    aten_axpy(dt, s.aten(), alpha, n);
  });
}

// dst[i] <- base[i] + alpha[i] * src[i]; base is never dst (the caller
// uses amp_tch_axpy then), src is never dst.
char *amp_tch_axpy_from(at::Tensor **dst, int dst_view, at::Tensor **base,
                        int base_view, at::Tensor **src, int src_view,
                        const double *alpha, size_t n) {
  return guarded([&] {
    if (n == 0) return;
    TensorList d(dst, n, dst_view);
    TensorList b(base, n, base_view);
    TensorList s(src, n, src_view);
    at::ScalarType type = loop_type(d);
    std::vector<Span> ds, bs, ss;
    if (type != at::ScalarType::Undefined && read_spans(d, type, true, ds) &&
        read_spans(b, type, false, bs, &ds) &&
        read_spans(s, type, false, ss, &ds)) {
      auto a = doubles(alpha, n);
      coalesce({&ds, &bs, &ss}, &a, elem_size(type));
      by_type(type, [&](auto t) {
        fast_axpy_from<decltype(t)>(ds, bs, ss, a.data());
      });
      return d.bump();
    }
    auto dt = d.aten();
    at::_foreach_copy_(dt, b.aten());
    aten_axpy(dt, s.aten(), alpha, n);
  });
}

// The fused first ascent step of AMP on the loop path (see `perturb_into`):
// *handled <- 1 and *norms <- the norms of inner_lr·grad when every tensor
// qualifies; *handled <- 0 and nothing written otherwise, and the caller
// runs the unfused sequence. `snapshot` and `delta` may be NULL.
char *amp_tch_perturb(at::Tensor **params, at::Tensor **snapshot,
                      at::Tensor **delta, size_t n, const double *inner_lr,
                      const double *max_norm, double guard,
                      at::Tensor **norms, int *handled) {
  return loop_entry(handled, [&] {
    if (n == 0) return false;
    TensorList theta(params, n, PLAIN);
    TensorList g(params, n, GRAD_READ);
    at::ScalarType type = loop_type(theta);
    std::vector<Span> ts, gs;
    OptionalSpans snap, del;
    if (type == at::ScalarType::Undefined ||
        !read_spans(theta, type, true, ts) ||
        !read_spans(g, type, false, gs, &ts) ||
        !snap.read(snapshot, n, type, ts) || !del.read(delta, n, type, ts))
      return false;
    at::Tensor out;
    by_type(type, [&](auto t) {
      out = fast_perturb<decltype(t)>(ts, gs, snap.get(), del.get(), inner_lr,
                                      max_norm, guard, type);
    });
    theta.bump();
    snap.bump();
    del.bump();
    *norms = new at::Tensor(out);
    return true;
  });
}

char *amp_tch_norms(at::Tensor **src, int src_view, size_t n,
                    at::Tensor **out) {
  return guarded([&] {
    TensorList s(src, n, src_view);
    at::ScalarType type = loop_type(s);
    std::vector<Span> ss;
    if (type != at::ScalarType::Undefined && read_spans(s, type, false, ss)) {
      by_type(type, [&](auto t) {
        *out = new at::Tensor(fast_norms<decltype(t)>(ss, type));
      });
      return;
    }
    *out = new at::Tensor(at::stack(at::_foreach_norm(s.aten(), 2)));
  });
}

// dst[i] <- dst[i] * min(1, max_norm[i] / (norms[i] + guard)), with the
// coefficients computed and kept on the device, in the tensors' dtype.
char *amp_tch_clip(at::Tensor **dst, int dst_view, size_t n,
                   at::Tensor *norms, const double *max_norm, double guard) {
  return guarded([&] {
    if (n == 0) return;
    TensorList d(dst, n, dst_view);
    at::ScalarType type = loop_type(d);
    std::vector<Span> ds;
    if (type != at::ScalarType::Undefined && plain_cpu(*norms, type) &&
        norms->numel() == static_cast<int64_t>(n) &&
        read_spans(d, type, true, ds)) {
      by_type(type, [&](auto t) {
        using T = decltype(t);
        fast_clip<T>(ds, norms->const_data_ptr<T>(), max_norm, guard);
      });
      return d.bump();
    }
    auto host = at::empty({static_cast<int64_t>(n)},
                          at::TensorOptions().dtype(at::kDouble));
    std::memcpy(host.data_ptr<double>(), max_norm, n * sizeof(double));
    // Round ε to the tensors' dtype first, as the reference store does.
    auto limit = host.to(norms->options());
    auto coefficient = (limit / (*norms + guard)).clamp_max(1.0);
    at::_foreach_mul_(d.aten(), coefficient.unbind(0));
  });
}

// *out <- 1 when every element of every src[i] is finite, else 0. On the
// loop path a direct scan; on other CPU tensors each tensor's minimum and
// maximum (NaN propagates through both), stacked and read once; on a device
// one reduction over the per-tensor infinity norms and one read to the host.
char *amp_tch_all_finite(at::Tensor **src, int src_view, size_t n, int *out) {
  return guarded([&] {
    TensorList all(src, n, src_view);
    at::ScalarType type = loop_type(all);
    std::vector<Span> ss;
    if (type != at::ScalarType::Undefined && read_spans(all, type, false, ss)) {
      coalesce({&ss}, nullptr, elem_size(type));
      bool ok = false;
      by_type(type, [&](auto t) { ok = fast_all_finite<decltype(t)>(ss); });
      *out = ok ? 1 : 0;
      return;
    }
    std::vector<at::Tensor> s;
    s.reserve(all.size());
    for (const auto *t : all.ptrs) {
      // The infinity norm of an empty tensor is undefined; it is finite.
      if (t->numel() > 0) s.push_back(*t);
    }
    if (s.empty()) {
      *out = 1;
      return;
    }
    at::Tensor peaks;
    if (s[0].device().is_cpu()) {
      // aminmax runs at memory speed on the CPU; the infinity norm does not.
      std::vector<at::Tensor> extremes;
      extremes.reserve(2 * s.size());
      for (const auto &t : s) {
        auto mm = at::aminmax(t);
        extremes.push_back(std::get<0>(mm));
        extremes.push_back(std::get<1>(mm));
      }
      peaks = at::stack(extremes);
    } else {
      peaks = at::stack(at::_foreach_norm(s, INFINITY));
    }
    *out = peaks.isfinite().all().item<bool>() ? 1 : 0;
  });
}

} // extern "C"
