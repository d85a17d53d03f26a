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
//
// CPU fast path: libtorch's CPU `_foreach_*` kernels loop over the tensors and
// pay a full operator dispatch (~1 µs) per tensor per op, and
// `_foreach_norm(∞)` runs far below memory speed. When every tensor an
// operation touches is a dense, contiguous f32 or f64 CPU tensor (the normal
// case for parameters, autograd gradients and buffers), the operations below
// run as plain loops over the tensors' memory instead, with exactly the
// reference store's (amp-ndarray's) arithmetic:
//   copy      memmove;
//   scale     d * f, with f rounded to the dtype (factor 1 is skipped by the
//             caller);
//   axpy      d + a * s, a separate multiply and add, never a fused
//             multiply-add: build.rs compiles this file with
//             -ffp-contract=off;
//   norms     Σ x² accumulated in f64 over 8 partial sums, combined
//             pairwise, then sqrt and rounding to the dtype; the result is a
//             1-D CPU tensor of the dtype, as on the ATen path;
//   clip      coefficient min(1, max / (n + guard)) in the dtype, where a NaN
//             quotient counts as 1 (Rust's `min`); a coefficient of 1 skips
//             the tensor;
//   all_finite a branch-free exponent test over blocks of elements, stopping
//             at the first bad block.
// Everything else (CUDA, half precision, strided tensors, …) takes the ATen
// path unchanged. Destinations written by the fast path get their version
// counter bumped, as an in-place ATen op would.

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <stdexcept>
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

// The tensors an operation addresses, as pointers: straight to the tensors
// (or their gradients) when every one is defined, which costs no reference
// count traffic; otherwise through `collect`, whose copies `owned` keeps.
struct TensorList {
  std::vector<const at::Tensor *> ptrs;
  std::vector<at::Tensor> owned;

  TensorList(at::Tensor **tensors, size_t n, int view) {
    ptrs.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor *t = tensors[i];
      if (view != AMP_PLAIN) {
        t = &t->grad();
        if (!t->defined()) break;
      }
      ptrs.push_back(t);
    }
    if (ptrs.size() < n) {
      owned = collect(tensors, n, view);
      ptrs.clear();
      for (const auto &t : owned) ptrs.push_back(&t);
    }
  }

  size_t size() const { return ptrs.size(); }

  // Handles sharing the tensors, for ATen's list operators.
  std::vector<at::Tensor> aten() const {
    std::vector<at::Tensor> out;
    out.reserve(ptrs.size());
    for (const auto *t : ptrs) out.push_back(*t);
    return out;
  }
};

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

// ---------------------------------------------------------------------------
// CPU fast path

// Independent partial sums of `sum_of_squares`, as in amp-ndarray.
constexpr size_t LANES = 8;
// Elements checked between two early-exit tests of `all_finite`.
constexpr int64_t FINITE_BLOCK = 4096;

// A dense, contiguous, real f32/f64 CPU tensor that plain loops may address
// through `data_ptr`.
bool plain_cpu(const at::Tensor &t, at::ScalarType type) {
  return t.defined() && t.layout() == at::kStrided && t.device().is_cpu() &&
         t.scalar_type() == type && t.is_contiguous() && !t.is_neg() &&
         !t.is_conj() && !t._is_zerotensor() && !t.is_inference() &&
         t.has_storage();
}

// The memory of one tensor on the fast path.
struct Span {
  char *p; // NULL when n == 0
  int64_t n;
};

// The fast path's spans of `ts` (writable ones when `write`), all of `type`,
// each of the numel `like` gives when not NULL; false when the ATen path must
// run instead.
bool spans(const TensorList &ts, at::ScalarType type, bool write,
           std::vector<Span> &out, const std::vector<Span> *like = nullptr) {
  out.clear();
  out.reserve(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor &t = *ts.ptrs[i];
    if (!plain_cpu(t, type)) return false;
    int64_t n = t.numel();
    if (like != nullptr && (*like)[i].n != n) return false;
    void *p = nullptr;
    if (n > 0) {
      p = write ? t.mutable_data_ptr() : const_cast<void *>(t.const_data_ptr());
      if (p == nullptr) return false;
    }
    out.push_back(Span{static_cast<char *>(p), n});
  }
  return true;
}

// The fast path's dtype when `ts` is a non-empty list of f32 or f64 tensors,
// else Undefined; `spans` then checks every tensor.
at::ScalarType fast_type(const TensorList &ts) {
  if (ts.size() == 0 || !ts.ptrs[0]->defined()) return at::ScalarType::Undefined;
  at::ScalarType type = ts.ptrs[0]->scalar_type();
  return type == at::kFloat || type == at::kDouble ? type
                                                   : at::ScalarType::Undefined;
}

// What an in-place ATen op does to its output's autograd version counter.
void bump(const TensorList &ts) {
  for (const auto *t : ts.ptrs) t->unsafeGetTensorImpl()->bump_version();
}

// Many small tensors lie scattered in memory, and the hardware prefetcher
// only picks a stream up after a few misses in each: while one tensor is
// processed, the start of the next one is requested.
constexpr int64_t PREFETCH_BYTES = 4096;

inline void prefetch(const std::vector<Span> &v, size_t i, size_t elem) {
  if (i >= v.size()) return;
  int64_t bytes = std::min(v[i].n * static_cast<int64_t>(elem), PREFETCH_BYTES);
  for (int64_t k = 0; k < bytes; k += 64) __builtin_prefetch(v[i].p + k);
}

template <typename T> void fast_copy(const std::vector<Span> &d,
                                     const std::vector<Span> &s) {
  for (size_t i = 0; i < d.size(); ++i) {
    prefetch(s, i + 1, sizeof(T));
    if (d[i].n == 0 || d[i].p == s[i].p) continue;
    std::memmove(d[i].p, s[i].p, static_cast<size_t>(d[i].n) * sizeof(T));
  }
}

template <typename T> void scale_loop(T *__restrict__ d, int64_t n, T f) {
  for (int64_t k = 0; k < n; ++k) d[k] = d[k] * f;
}

template <typename T> void fast_scale(const std::vector<Span> &d,
                                      const double *factor) {
  for (size_t i = 0; i < d.size(); ++i) {
    prefetch(d, i + 1, sizeof(T));
    scale_loop<T>(reinterpret_cast<T *>(d[i].p), d[i].n,
                  static_cast<T>(factor[i]));
  }
}

// d + a * s, rounded after the multiply and after the add (-ffp-contract=off).
template <typename T>
void axpy_loop(T *__restrict__ d, const T *__restrict__ s, int64_t n, T a) {
  for (int64_t k = 0; k < n; ++k) d[k] = d[k] + a * s[k];
}

template <typename T> void fast_axpy(const std::vector<Span> &d,
                                     const std::vector<Span> &s,
                                     const double *alpha) {
  for (size_t i = 0; i < d.size(); ++i) {
    prefetch(d, i + 1, sizeof(T));
    prefetch(s, i + 1, sizeof(T));
    T *dp = reinterpret_cast<T *>(d[i].p);
    const T *sp = reinterpret_cast<const T *>(s[i].p);
    int64_t n = d[i].n;
    T a = static_cast<T>(alpha[i]);
    if (n > 0 && dp == sp) {
      // Only reachable through aliasing views; no __restrict__ then.
      for (int64_t k = 0; k < n; ++k) dp[k] = dp[k] + a * dp[k];
    } else {
      axpy_loop<T>(dp, sp, n, a);
    }
  }
}

// d + a * s with the addend read from b (b is not d; b may be s).
template <typename T>
void axpy_from_loop(T *__restrict__ d, const T *b, const T *s, int64_t n,
                    T a) {
  for (int64_t k = 0; k < n; ++k) d[k] = b[k] + a * s[k];
}

template <typename T> void fast_axpy_from(const std::vector<Span> &d,
                                          const std::vector<Span> &b,
                                          const std::vector<Span> &s,
                                          const double *alpha) {
  for (size_t i = 0; i < d.size(); ++i) {
    prefetch(b, i + 1, sizeof(T));
    prefetch(s, i + 1, sizeof(T));
    axpy_from_loop<T>(reinterpret_cast<T *>(d[i].p),
                      reinterpret_cast<const T *>(b[i].p),
                      reinterpret_cast<const T *>(s[i].p), d[i].n,
                      static_cast<T>(alpha[i]));
  }
}

// Σ x² in f64 exactly as amp-ndarray's `sum_of_squares`: LANES partial sums
// over whole chunks, combined pairwise, plus the tail summed in order.
template <typename T> double sum_of_squares(const T *__restrict__ p, int64_t n) {
  double lanes[LANES] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t whole = n - n % static_cast<int64_t>(LANES);
  for (int64_t k = 0; k < whole; k += LANES) {
    for (size_t j = 0; j < LANES; ++j) {
      double x = static_cast<double>(p[k + j]);
      lanes[j] += x * x;
    }
  }
  double tail = 0.0;
  for (int64_t k = whole; k < n; ++k) {
    double x = static_cast<double>(p[k]);
    tail += x * x;
  }
  for (size_t width = LANES / 2; width >= 1; width /= 2) {
    for (size_t j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  }
  return lanes[0] + tail;
}

// A 1-D CPU tensor of the dtype T holding ‖s[i]‖₂.
// o[i] <- ‖s[i]‖₂ in T.
template <typename T> void norms_into(const std::vector<Span> &s, T *o) {
  for (size_t i = 0; i < s.size(); ++i) {
    prefetch(s, i + 1, sizeof(T));
    double sum = sum_of_squares<T>(reinterpret_cast<const T *>(s[i].p), s[i].n);
    o[i] = static_cast<T>(std::sqrt(sum));
  }
}

// A 1-D CPU tensor of the dtype T holding ‖s[i]‖₂.
template <typename T> at::Tensor fast_norms(const std::vector<Span> &s,
                                            at::ScalarType type) {
  auto out = at::empty({static_cast<int64_t>(s.size())},
                       at::TensorOptions().dtype(type));
  norms_into<T>(s, out.mutable_data_ptr<T>());
  return out;
}

// `norms` holds one value per tensor of `d`, of type T, on the CPU.
template <typename T> void fast_clip(const std::vector<Span> &d,
                                     const T *norms, const double *max_norm,
                                     double guard) {
  const T one = static_cast<T>(1);
  const T g = static_cast<T>(guard);
  size_t next = 0; // the next tensor that will be scaled, for prefetching
  for (size_t i = 0; i < d.size(); ++i) {
    T q = static_cast<T>(max_norm[i]) / (norms[i] + g);
    // Rust's `min`: a NaN quotient gives 1.
    T c = q < one ? q : one;
    if (c == one) continue;
    if (next <= i) next = i + 1;
    prefetch(d, next, sizeof(T));
    scale_loop<T>(reinterpret_cast<T *>(d[i].p), d[i].n, c);
  }
}

// Σ (z·x)² in f64, z·x rounded to T first: `sum_of_squares` of the scaled
// tensor without writing it (z == 1 multiplies by nothing).
template <typename T>
double scaled_sum_of_squares(const T *__restrict__ p, int64_t n, T z) {
  if (z == static_cast<T>(1)) return sum_of_squares<T>(p, n);
  double lanes[LANES] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t whole = n - n % static_cast<int64_t>(LANES);
  for (int64_t k = 0; k < whole; k += LANES) {
    for (size_t j = 0; j < LANES; ++j) {
      double x = static_cast<double>(static_cast<T>(p[k + j] * z));
      lanes[j] += x * x;
    }
  }
  double tail = 0.0;
  for (int64_t k = whole; k < n; ++k) {
    double x = static_cast<double>(static_cast<T>(p[k] * z));
    tail += x * x;
  }
  for (size_t width = LANES / 2; width >= 1; width /= 2) {
    for (size_t j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  }
  return lanes[0] + tail;
}

// theta <- theta + (z·g)·c, with snap <- theta and delta <- (z·g)·c when
// SNAP and DELTA say so. The products are rounded as the unfused sequence
// rounds them: z·g, then ·c, then the add (a factor of exactly 1, which
// the unfused sequence skips, changes nothing). Branch-free, so that it
// vectorises.
template <typename T, bool SNAP, bool DELTA>
void perturb_loop(T *__restrict__ theta, const T *__restrict__ g,
                  T *__restrict__ snap, T *__restrict__ delta, int64_t n, T z,
                  T c) {
  for (int64_t k = 0; k < n; ++k) {
    T v = (g[k] * z) * c;
    T t = theta[k];
    if constexpr (SNAP) snap[k] = t;
    if constexpr (DELTA) delta[k] = v;
    theta[k] = t + v;
  }
}

template <typename T>
void perturb_tensor(T *theta, const T *g, T *snap, T *delta, int64_t n, T z,
                    T c) {
  if (snap != nullptr && delta != nullptr) {
    perturb_loop<T, true, true>(theta, g, snap, delta, n, z, c);
  } else if (snap != nullptr) {
    perturb_loop<T, true, false>(theta, g, snap, nullptr, n, z, c);
  } else if (delta != nullptr) {
    perturb_loop<T, false, true>(theta, g, nullptr, delta, n, z, c);
  } else {
    perturb_loop<T, false, false>(theta, g, nullptr, nullptr, n, z, c);
  }
}

// The fused first ascent step: per tensor, the norm of z·g (one read of g,
// still in cache for the second one when the tensor is small), the
// projection coefficient, then one pass writing θ (and the snapshot, δ).
// Returns the norms as a 1-D CPU tensor of T.
template <typename T>
void perturb_into(const std::vector<Span> &theta, const std::vector<Span> &g,
                  const std::vector<Span> *snap,
                  const std::vector<Span> *delta, const double *inner_lr,
                  const double *max_norm, double guard, T *o) {
  const T one = static_cast<T>(1);
  const T gd = static_cast<T>(guard);
  for (size_t i = 0; i < theta.size(); ++i) {
    prefetch(g, i + 1, sizeof(T));
    prefetch(theta, i + 1, sizeof(T));
    const T *gp = reinterpret_cast<const T *>(g[i].p);
    int64_t n = theta[i].n;
    T z = static_cast<T>(inner_lr[i]);
    T norm = static_cast<T>(std::sqrt(scaled_sum_of_squares<T>(gp, n, z)));
    o[i] = norm;
    T q = static_cast<T>(max_norm[i]) / (norm + gd);
    // Rust's `min`: a NaN quotient gives 1.
    T c = q < one ? q : one;
    perturb_tensor<T>(reinterpret_cast<T *>(theta[i].p), gp,
                      snap ? reinterpret_cast<T *>((*snap)[i].p) : nullptr,
                      delta ? reinterpret_cast<T *>((*delta)[i].p) : nullptr,
                      n, z, c);
  }
}

template <typename T>
at::Tensor fast_perturb(const std::vector<Span> &theta,
                        const std::vector<Span> &g,
                        const std::vector<Span> *snap,
                        const std::vector<Span> *delta,
                        const double *inner_lr, const double *max_norm,
                        double guard, at::ScalarType type) {
  auto out = at::empty({static_cast<int64_t>(theta.size())},
                       at::TensorOptions().dtype(type));
  perturb_into<T>(theta, g, snap, delta, inner_lr, max_norm, guard,
                  out.mutable_data_ptr<T>());
  return out;
}

// The unsigned integer of T's width, T's exponent mask and the lowest
// exponent bit.
template <typename T> struct Bits;
template <> struct Bits<float> {
  using U = uint32_t;
  static constexpr U EXP = 0x7f800000u;
  static constexpr U ONE = 0x00800000u;
};
template <> struct Bits<double> {
  using U = uint64_t;
  static constexpr U EXP = 0x7ff0000000000000ull;
  static constexpr U ONE = 0x0010000000000000ull;
};

// true when no element of p[0..n) has an all-ones exponent (inf or NaN).
// (u & EXP) + ONE reaches the sign bit exactly when the exponent is all ones;
// OR-ing those sums needs only and/add/or, which vectorise on every x86-64
// (SSE2 has no 64-bit compare).
template <typename T> bool finite_block(const T *__restrict__ p, int64_t n) {
  using U = typename Bits<T>::U;
  U bad = 0;
  for (int64_t k = 0; k < n; ++k) {
    U u;
    std::memcpy(&u, &p[k], sizeof(U));
    bad |= (u & Bits<T>::EXP) + Bits<T>::ONE;
  }
  return (bad >> (8 * sizeof(U) - 1)) == 0;
}

template <typename T> bool fast_all_finite(const std::vector<Span> &s) {
  for (size_t i = 0; i < s.size(); ++i) {
    prefetch(s, i + 1, sizeof(T));
    const T *p = reinterpret_cast<const T *>(s[i].p);
    int64_t n = s[i].n;
    for (int64_t k = 0; k < n; k += FINITE_BLOCK) {
      if (!finite_block<T>(p + k, std::min(FINITE_BLOCK, n - k))) return false;
    }
  }
  return true;
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
}

// The raw path of flattened CPU stores: the same fast-path loops, over
// spans (address, element count) that the store computed when it laid the
// tensors out and checks after every closure call, so that no tensor's
// metadata is read per operation.
constexpr int RAW_COPY = 0;
constexpr int RAW_SCALE = 1;
constexpr int RAW_AXPY = 2;
constexpr int RAW_AXPY_FROM = 3;
constexpr int RAW_NORMS = 4;
constexpr int RAW_CLIP = 5;
constexpr int RAW_ALL_FINITE = 6;
constexpr int RAW_PERTURB = 7;

// `d` is written; `a`, `b`, `e` are read (b and e: perturb's snapshot and
// δ, written, when present); `c1`, `c2` are per-tensor coefficients; `out`
// is the norms array (written by norms and perturb, read by clip) or the
// finiteness flag.
template <typename T>
void raw_op(int op, const std::vector<Span> &d, const std::vector<Span> &a,
            const std::vector<Span> &b, const std::vector<Span> &e,
            bool has_b, bool has_e, const double *c1, const double *c2,
            double guard, void *out) {
  switch (op) {
  case RAW_COPY:
    fast_copy<T>(d, a);
    break;
  case RAW_SCALE:
    fast_scale<T>(d, c1);
    break;
  case RAW_AXPY:
    fast_axpy<T>(d, a, c1);
    break;
  case RAW_AXPY_FROM:
    fast_axpy_from<T>(d, a, b, c1);
    break;
  case RAW_NORMS:
    norms_into<T>(a, static_cast<T *>(out));
    break;
  case RAW_CLIP:
    fast_clip<T>(d, static_cast<const T *>(out), c1, guard);
    break;
  case RAW_ALL_FINITE:
    *static_cast<int *>(out) = fast_all_finite<T>(a) ? 1 : 0;
    break;
  case RAW_PERTURB:
    perturb_into<T>(d, a, has_b ? &b : nullptr, has_e ? &e : nullptr, c1, c2,
                    guard, static_cast<T *>(out));
    break;
  default:
    throw std::invalid_argument("unknown raw operation");
  }
}

std::vector<Span> raw_spans(const Span *spans, size_t n) {
  return spans == nullptr ? std::vector<Span>()
                          : std::vector<Span>(spans, spans + n);
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
    at::ScalarType type = fast_type(d);
    std::vector<Span> ds, ss;
    if (type != at::ScalarType::Undefined && spans(d, type, true, ds) &&
        spans(s, type, false, ss, &ds)) {
      if (type == at::kFloat) {
        fast_copy<float>(ds, ss);
      } else {
        fast_copy<double>(ds, ss);
      }
      return bump(d);
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
    at::ScalarType type = fast_type(d);
    std::vector<Span> ds;
    if (type != at::ScalarType::Undefined && spans(d, type, true, ds)) {
      if (type == at::kFloat) {
        fast_scale<float>(ds, factor);
      } else {
        fast_scale<double>(ds, factor);
      }
      return bump(d);
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
    at::ScalarType type = fast_type(d);
    std::vector<Span> ds, ss;
    if (type != at::ScalarType::Undefined && spans(d, type, true, ds) &&
        spans(s, type, false, ss, &ds)) {
      if (type == at::kFloat) {
        fast_axpy<float>(ds, ss, alpha);
      } else {
        fast_axpy<double>(ds, ss, alpha);
      }
      return bump(d);
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
    at::ScalarType type = fast_type(d);
    std::vector<Span> ds, bs, ss;
    if (type != at::ScalarType::Undefined && spans(d, type, true, ds) &&
        spans(b, type, false, bs, &ds) && spans(s, type, false, ss, &ds)) {
      if (type == at::kFloat) {
        fast_axpy_from<float>(ds, bs, ss, alpha);
      } else {
        fast_axpy_from<double>(ds, bs, ss, alpha);
      }
      return bump(d);
    }
    auto dt = d.aten();
    at::_foreach_copy_(dt, b.aten());
    aten_axpy(dt, s.aten(), alpha, n);
  });
}

// The fused first ascent step of AMP on the CPU fast path (see
// `fast_perturb`): *handled <- 1 and *norms <- the norms of inner_lr·grad
// when every tensor qualifies; *handled <- 0 and nothing written otherwise,
// and the caller runs the unfused sequence. `snapshot` and `delta` may be
// NULL.
char *amp_tch_perturb(at::Tensor **params, at::Tensor **snapshot,
                      at::Tensor **delta, size_t n, const double *inner_lr,
                      const double *max_norm, double guard,
                      at::Tensor **norms, int *handled) {
  return guarded([&] {
    *handled = 0;
    if (n == 0) return;
    TensorList theta(params, n, AMP_PLAIN);
    TensorList g(params, n, AMP_GRAD_READ);
    at::ScalarType type = fast_type(theta);
    std::vector<Span> ts, gs, ss, dsp;
    std::unique_ptr<TensorList> snap, del;
    if (type == at::ScalarType::Undefined || !spans(theta, type, true, ts) ||
        !spans(g, type, false, gs, &ts))
      return;
    if (snapshot != nullptr) {
      snap = std::make_unique<TensorList>(snapshot, n, AMP_PLAIN);
      if (!spans(*snap, type, true, ss, &ts)) return;
    }
    if (delta != nullptr) {
      del = std::make_unique<TensorList>(delta, n, AMP_PLAIN);
      if (!spans(*del, type, true, dsp, &ts)) return;
    }
    const std::vector<Span> *sp = snapshot != nullptr ? &ss : nullptr;
    const std::vector<Span> *dp = delta != nullptr ? &dsp : nullptr;
    at::Tensor out =
        type == at::kFloat
            ? fast_perturb<float>(ts, gs, sp, dp, inner_lr, max_norm, guard, type)
            : fast_perturb<double>(ts, gs, sp, dp, inner_lr, max_norm, guard, type);
    bump(theta);
    if (snap) bump(*snap);
    if (del) bump(*del);
    *norms = new at::Tensor(out);
    *handled = 1;
  });
}

// *out <- stack(‖src[i]‖₂), a 1-D tensor of n norms on the tensors' device.
char *amp_tch_norms(at::Tensor **src, int src_view, size_t n,
                    at::Tensor **out) {
  return guarded([&] {
    TensorList s(src, n, src_view);
    at::ScalarType type = fast_type(s);
    std::vector<Span> ss;
    if (type != at::ScalarType::Undefined && spans(s, type, false, ss)) {
      *out = new at::Tensor(type == at::kFloat ? fast_norms<float>(ss, type)
                                               : fast_norms<double>(ss, type));
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
    at::ScalarType type = fast_type(d);
    std::vector<Span> ds;
    if (type != at::ScalarType::Undefined && plain_cpu(*norms, type) &&
        norms->numel() == static_cast<int64_t>(n) &&
        spans(d, type, true, ds)) {
      if (type == at::kFloat) {
        fast_clip<float>(ds, norms->const_data_ptr<float>(), max_norm, guard);
      } else {
        fast_clip<double>(ds, norms->const_data_ptr<double>(), max_norm, guard);
      }
      return bump(d);
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

// *out <- 1 when every element of every src[i] is finite, else 0. On the CPU
// fast path a direct scan; on other CPU tensors each tensor's minimum and
// maximum (NaN propagates through both), stacked and read once; on a device
// one reduction over the per-tensor infinity norms and one read to the host.
char *amp_tch_all_finite(at::Tensor **src, int src_view, size_t n, int *out) {
  return guarded([&] {
    TensorList all(src, n, src_view);
    at::ScalarType type = fast_type(all);
    std::vector<Span> ss;
    if (type != at::ScalarType::Undefined && spans(all, type, false, ss)) {
      bool ok = type == at::kFloat ? fast_all_finite<float>(ss)
                                   : fast_all_finite<double>(ss);
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

// Flat layout: every params[i] becomes a view of one new contiguous
// allocation *flat_params (set_data keeps each parameter's own TensorImpl,
// autograd metadata and version counter; values are copied), and every
// parameter that requires grad gets a gradient in one zero-filled allocation
// *flat_grads, views[i] (NULL for the others). Each gradient is a tensor of
// its own over the shared storage (`set_`, not a view), so that it has its
// own version counter: autograd's in-place accumulation bumps it, which is
// how `amp_tch_flat_grad_mask` tells the tensors that received a gradient.
// Existing gradients are copied in. Everything is allocated before any
// parameter is touched.
char *amp_tch_flatten(at::Tensor **params, size_t n, at::Tensor **views,
                      at::Tensor **flat_params, at::Tensor **flat_grads) {
  return guarded([&] {
    for (size_t i = 0; i < n; ++i) views[i] = nullptr;
    if (n == 0) return;
    int64_t total = 0;
    for (size_t i = 0; i < n; ++i) total += params[i]->numel();
    auto options = params[0]->options().requires_grad(false);
    auto fp = at::empty({total}, options);
    auto fg = at::zeros({total}, options);
    std::vector<at::Tensor> slots, grads;
    slots.reserve(n);
    grads.reserve(n);
    int64_t offset = 0;
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor &p = *params[i];
      int64_t numel = p.numel();
      auto slot = fp.narrow(0, offset, numel).view(p.sizes());
      slot.copy_(p);
      slots.push_back(slot);
      at::Tensor g;
      if (p.requires_grad()) {
        g = at::empty({0}, options);
        g.set_(fg.storage(), fg.storage_offset() + offset, p.sizes(),
               slot.strides());
        if (p.grad().defined()) g.copy_(p.grad());
      }
      grads.push_back(g);
      offset += numel;
    }
    for (size_t i = 0; i < n; ++i) {
      params[i]->set_data(slots[i]);
      if (grads[i].defined()) {
        params[i]->mutable_grad() = grads[i];
        views[i] = new at::Tensor(grads[i]);
      } else {
        params[i]->mutable_grad().reset();
      }
    }
    *flat_params = new at::Tensor(fp);
    *flat_grads = new at::Tensor(fg);
  });
}

// Flat layout's zero_grad: re-attaches views[i] as the gradient where
// something replaced it, drops gradients of tensors without a view, zeroes
// *flat_grads in one fill and records each view's version in versions[i].
char *amp_tch_flat_zero(at::Tensor **params, at::Tensor **views, size_t n,
                        at::Tensor *flat_grads, int64_t *versions) {
  return guarded([&] {
    for (size_t i = 0; i < n; ++i) {
      at::Tensor *view = views[i];
      if (view == nullptr) {
        params[i]->mutable_grad().reset();
        continue;
      }
      const at::Tensor &g = params[i]->grad();
      if (!g.defined() ||
          g.unsafeGetTensorImpl() != view->unsafeGetTensorImpl()) {
        params[i]->mutable_grad() = *view;
      }
    }
    const at::Tensor &flat = *flat_grads;
    if ((plain_cpu(flat, at::kFloat) || plain_cpu(flat, at::kDouble)) &&
        flat.numel() > 0) {
      // One memset: no operator dispatch, no wake-up of libtorch's threads
      // for what is a single streaming write. All-zero bits are +0.0.
      std::memset(flat.mutable_data_ptr(), 0,
                  static_cast<size_t>(flat.numel()) * flat.element_size());
      flat.unsafeGetTensorImpl()->bump_version();
    } else {
      flat_grads->zero_();
    }
    for (size_t i = 0; i < n; ++i) {
      versions[i] = views[i] == nullptr ? 0 : views[i]->_version();
    }
  });
}

// Flat layout's grad_mask: out[i] <- 1 where params[i] received a gradient
// since amp_tch_flat_zero (its view was written, or it has a gradient of
// its own).
char *amp_tch_flat_grad_mask(at::Tensor **params, at::Tensor **views,
                             size_t n, const int64_t *versions,
                             const Span *expected, unsigned char *out,
                             int *intact) {
  return guarded([&] {
    bool same = true;
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor &p = *params[i];
      const at::Tensor &g = p.grad();
      at::Tensor *view = views[i];
      bool own = view != nullptr &&
                 g.unsafeGetTensorImpl() == view->unsafeGetTensorImpl();
      out[i] = g.defined() && (!own || g._version() != versions[i]) ? 1 : 0;
      // The raw path's spans still describe the tensors: the parameter is
      // where, and as large as, it was laid out, and a gradient that
      // arrived lives in its place in the flat allocation.
      if (expected != nullptr &&
          (p.numel() != expected[i].n ||
           (p.numel() > 0 && p.const_data_ptr() != expected[i].p) ||
           !p.is_contiguous() || (out[i] != 0 && !own))) {
        same = false;
      }
    }
    *intact = same ? 1 : 0;
  });
}

// One operation of the raw path (see `raw_op`) over span lists of n
// entries (unused ones NULL); `is_double` picks f64 over f32; `bump` holds
// the nbump tensors whose autograd version the in-place op bumps (the
// parameters, when they are written).
char *amp_tch_raw(int op, int is_double, size_t n, const Span *d,
                  const Span *a, const Span *b, const Span *e,
                  const double *c1, const double *c2, double guard, void *out,
                  at::Tensor **bump, size_t nbump) {
  return guarded([&] {
    auto ds = raw_spans(d, n), as = raw_spans(a, n), bs = raw_spans(b, n),
         es = raw_spans(e, n);
    if (is_double != 0) {
      raw_op<double>(op, ds, as, bs, es, b != nullptr, e != nullptr, c1, c2,
                     guard, out);
    } else {
      raw_op<float>(op, ds, as, bs, es, b != nullptr, e != nullptr, c1, c2,
                    guard, out);
    }
    for (size_t i = 0; i < nbump; ++i) {
      bump[i]->unsafeGetTensorImpl()->bump_version();
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
