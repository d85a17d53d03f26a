// Multi-tensor ("foreach") operations for amp-tch.
//
// tch 0.24 does not bind ATen's `_foreach_*` operators, so this file calls
// them directly, compiled by build.rs against the headers of the very libtorch
// that tch links. Every function takes arrays of `at::Tensor*` (what
// `tch::Tensor::as_ptr` hands out), runs under `at::NoGradGuard` (the
// parameters are leaves that require grad), and returns NULL on success or a
// heap-allocated error message that the caller frees with
// `amp_tch_free_error`. No C++ exception crosses the FFI boundary.
//
// Tensor lists are addressed by a "view" flag:
//   AMP_PLAIN      the tensors themselves;
//   AMP_GRAD_READ  their `.grad()`; an undefined gradient reads as zeros;
//   AMP_GRAD_WRITE their `.grad()`; an undefined gradient is first defined as
//                  zeros, so that it can be written in place.

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

constexpr int AMP_PLAIN = 0;
constexpr int AMP_GRAD_READ = 1;
constexpr int AMP_GRAD_WRITE = 2;

// Above this many distinct axpy coefficients, axpy switches from one
// `_foreach_add_` per distinct value to `_foreach_mul` + `_foreach_add_`.
constexpr size_t MAX_ALPHA_GROUPS = 4;

char *copy_message(const char *message) {
  size_t len = std::strlen(message);
  char *out = static_cast<char *>(std::malloc(len + 1));
  if (out != nullptr) {
    std::memcpy(out, message, len + 1);
  }
  return out;
}

std::vector<at::Tensor> collect(at::Tensor **tensors, size_t n, int view) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &t = *tensors[i];
    if (view == AMP_PLAIN) {
      out.push_back(t);
      continue;
    }
    const at::Tensor &grad = t.grad();
    if (grad.defined()) {
      out.push_back(grad);
    } else if (view == AMP_GRAD_WRITE) {
      t.mutable_grad() = at::zeros_like(t, at::MemoryFormat::Contiguous);
      out.push_back(t.grad());
    } else {
      out.push_back(at::zeros_like(t, at::MemoryFormat::Contiguous));
    }
  }
  return out;
}

std::vector<at::Scalar> scalars(const double *values, size_t n) {
  std::vector<at::Scalar> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    out.emplace_back(values[i]);
  }
  return out;
}

template <typename F> char *guarded(F &&body) {
  try {
    at::NoGradGuard no_grad;
    body();
    return nullptr;
  } catch (const c10::Error &e) {
    return copy_message(e.what_without_backtrace());
  } catch (const std::exception &e) {
    return copy_message(e.what());
  } catch (...) {
    return copy_message("unknown C++ exception in amp-tch shim");
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
    auto d = collect(dst, n, dst_view);
    auto s = collect(src, n, src_view);
    at::_foreach_copy_(d, s);
  });
}

// dst[i] <- factor[i] * dst[i]
char *amp_tch_scale(at::Tensor **dst, int dst_view, const double *factor,
                    size_t n) {
  return guarded([&] {
    if (n == 0) return;
    auto d = collect(dst, n, dst_view);
    at::_foreach_mul_(d, scalars(factor, n));
  });
}

// dst[i] <- dst[i] + alpha[i] * src[i]
//
// Parameter groups give few distinct coefficients, so the common case is one
// `_foreach_add_(dst, src, alpha)` per distinct value: exactly PyTorch's
// `add_(src, alpha=a)`. With many distinct values it is two foreach calls
// through a temporary.
char *amp_tch_axpy(at::Tensor **dst, int dst_view, at::Tensor **src,
                   int src_view, const double *alpha, size_t n) {
  return guarded([&] {
    if (n == 0) return;
    auto d = collect(dst, n, dst_view);
    auto s = collect(src, n, src_view);
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
    if (distinct.size() <= MAX_ALPHA_GROUPS) {
      for (double a : distinct) {
        if (distinct.size() == 1) {
          at::_foreach_add_(d, s, a);
          break;
        }
        std::vector<at::Tensor> dg, sg;
        for (size_t i = 0; i < n; ++i) {
          if (std::memcmp(&a, &alpha[i], sizeof(double)) == 0) {
            dg.push_back(d[i]);
            sg.push_back(s[i]);
          }
        }
        at::_foreach_add_(dg, sg, a);
      }
    } else {
      auto scaled = at::_foreach_mul(s, scalars(alpha, n));
      at::_foreach_add_(d, scaled);
    }
  });
}

// *out <- stack(‖src[i]‖₂), a 1-D tensor of n norms on the tensors' device.
char *amp_tch_norms(at::Tensor **src, int src_view, size_t n,
                    at::Tensor **out) {
  return guarded([&] {
    auto s = collect(src, n, src_view);
    *out = new at::Tensor(at::stack(at::_foreach_norm(s, 2)));
  });
}

// dst[i] <- dst[i] * min(1, max_norm[i] / (norms[i] + guard)), with the
// coefficients computed and kept on the device, in the tensors' dtype.
char *amp_tch_clip(at::Tensor **dst, int dst_view, size_t n,
                   at::Tensor *norms, const double *max_norm, double guard) {
  return guarded([&] {
    if (n == 0) return;
    auto d = collect(dst, n, dst_view);
    auto host = at::empty({static_cast<int64_t>(n)},
                          at::TensorOptions().dtype(at::kDouble));
    std::memcpy(host.data_ptr<double>(), max_norm, n * sizeof(double));
    // Round ε to the tensors' dtype first, as the reference store does.
    auto limit = host.to(norms->options());
    auto coefficient = (limit / (*norms + guard)).clamp_max(1.0);
    at::_foreach_mul_(d, coefficient.unbind(0));
  });
}

// *out <- 1 when every element of every src[i] is finite, else 0. One
// reduction over the per-tensor infinity norms and one read to the host.
char *amp_tch_all_finite(at::Tensor **src, int src_view, size_t n, int *out) {
  return guarded([&] {
    auto all = collect(src, n, src_view);
    std::vector<at::Tensor> s;
    s.reserve(all.size());
    for (auto &t : all) {
      // The infinity norm of an empty tensor is undefined; it is finite.
      if (t.numel() > 0) s.push_back(t);
    }
    if (s.empty()) {
      *out = 1;
      return;
    }
    auto peaks = at::stack(at::_foreach_norm(s, INFINITY));
    *out = peaks.isfinite().all().item<bool>() ? 1 : 0;
  });
}

// Undefines the gradients of all n tensors (PyTorch's zero_grad with
// set_to_none=True). No kernel runs: it only drops references.
char *amp_tch_reset_grads(at::Tensor **params, size_t n) {
  return guarded([&] {
    for (size_t i = 0; i < n; ++i) {
      params[i]->mutable_grad().reset();
    }
  });
}

// out[i] <- 1 where params[i] has a defined gradient.
char *amp_tch_grad_mask(at::Tensor **params, size_t n, unsigned char *out) {
  return guarded([&] {
    for (size_t i = 0; i < n; ++i) {
      out[i] = params[i]->grad().defined() ? 1 : 0;
    }
  });
}

// params.grad <- value (a tensor of the parameter's shape, dtype and device).
char *amp_tch_set_grad(at::Tensor *param, at::Tensor *value) {
  return guarded([&] {
    param->mutable_grad() = value->detach();
  });
}

// *out <- a new tensor holding params[i].grad() (an undefined tensor when
// there is none).
char *amp_tch_get_grad(at::Tensor *param, at::Tensor **out) {
  return guarded([&] { *out = new at::Tensor(param->grad()); });
}

// out[i] <- zero-filled tensors shaped like params[i], all views into one
// contiguous allocation (one allocation and one fill for the whole buffer).
char *amp_tch_alloc_like(at::Tensor **params, size_t n, at::Tensor **out) {
  return guarded([&] {
    if (n == 0) return;
    int64_t total = 0;
    for (size_t i = 0; i < n; ++i) total += params[i]->numel();
    auto flat = at::zeros({total}, params[0]->options().requires_grad(false));
    int64_t offset = 0;
    for (size_t i = 0; i < n; ++i) {
      int64_t numel = params[i]->numel();
      out[i] = new at::Tensor(
          flat.narrow(0, offset, numel).view(params[i]->sizes()));
      offset += numel;
    }
  });
}

} // extern "C"
