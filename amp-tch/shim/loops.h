// The arithmetic of the CPU loop path: plain loops over spans of f32/f64
// memory, compiled with -O3 -ffp-contract=off (build.rs).
//
// These loops repeat, for speed, formulas that live in Rust:
//   axpy, scale, copy, clip  the reference store's elementwise arithmetic
//                            (`d + a * s` as a separate multiply and add,
//                            never a fused multiply-add; clip coefficient
//                            min(1, max / (n + guard)) in the dtype, a NaN
//                            quotient counting as 1, as Rust's `min`);
//   sum_of_squares           amp-ndarray's `sum_of_squares` (f64, 8 lanes,
//                            pairwise combination, tail in order);
//   perturb_into             amp_core::composed::perturb_from_grads, fused.
// What ties them to the Rust originals is the test suite, bit for bit: the
// conformance property `fused_ops_match_composed` (amp-testkit; run on
// plain and flattened tch stores by tests/tch.rs) and amp-tch's
// tests/fast_path.rs, which compares every operation with amp-ndarray's
// store bit for bit. A change on either side that is not made on the other
// fails those tests.
#pragma once

#include "common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>

namespace amp_tch {

// Independent partial sums of `sum_of_squares`, as in amp-ndarray.
constexpr size_t LANES = 8;
// Elements checked between two early-exit tests of `all_finite`.
constexpr int64_t FINITE_BLOCK = 4096;

// From this many elements on, an element-wise loop is split over ATen's
// intra-op threads (at::parallel_for, OpenMP in PyTorch's builds: the shim
// is compiled with -fopenmp) in pieces of at least GRAIN elements. Every
// element is computed on its own, so the bits do not depend on the split;
// the sums of squares stay on one thread (their order is amp-ndarray's).
constexpr int64_t PARALLEL = int64_t{1} << 18;
constexpr int64_t GRAIN = int64_t{1} << 16;

// f(begin, end) over [0, n), split over threads for a long range.
template <typename F> void split(int64_t n, const F &f) {
  if (n >= PARALLEL && at::get_num_threads() > 1 && !at::in_parallel_region()) {
    at::parallel_for(0, n, GRAIN, f);
  } else if (n > 0) {
    f(0, n);
  }
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
    char *dp = d[i].p;
    const char *sp = s[i].p;
    if (dp < sp + d[i].n * static_cast<int64_t>(sizeof(T)) &&
        sp < dp + d[i].n * static_cast<int64_t>(sizeof(T))) {
      // Overlapping views: one memmove, in order.
      std::memmove(dp, sp, static_cast<size_t>(d[i].n) * sizeof(T));
      continue;
    }
    split(d[i].n, [&](int64_t b, int64_t e) {
      std::memcpy(dp + b * sizeof(T), sp + b * sizeof(T),
                  static_cast<size_t>(e - b) * sizeof(T));
    });
  }
}

template <typename T> void scale_loop(T *__restrict__ d, int64_t n, T f) {
  for (int64_t k = 0; k < n; ++k) d[k] = d[k] * f;
}

template <typename T> void fast_scale(const std::vector<Span> &d,
                                      const double *factor) {
  for (size_t i = 0; i < d.size(); ++i) {
    prefetch(d, i + 1, sizeof(T));
    T *dp = reinterpret_cast<T *>(d[i].p);
    T f = static_cast<T>(factor[i]);
    split(d[i].n, [&](int64_t b, int64_t e) { scale_loop<T>(dp + b, e - b, f); });
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
      split(n, [&](int64_t b, int64_t e) { axpy_loop<T>(dp + b, sp + b, e - b, a); });
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
    T *dp = reinterpret_cast<T *>(d[i].p);
    const T *bp = reinterpret_cast<const T *>(b[i].p);
    const T *sp = reinterpret_cast<const T *>(s[i].p);
    T a = static_cast<T>(alpha[i]);
    split(d[i].n, [&](int64_t lo, int64_t hi) {
      axpy_from_loop<T>(dp + lo, bp + lo, sp + lo, hi - lo, a);
    });
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
    T *dp = reinterpret_cast<T *>(d[i].p);
    split(d[i].n, [&](int64_t b, int64_t e) { scale_loop<T>(dp + b, e - b, c); });
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
void perturb_range(T *theta, const T *g, T *snap, T *delta, int64_t n, T z,
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

template <typename T>
void perturb_tensor(T *theta, const T *g, T *snap, T *delta, int64_t n, T z,
                    T c) {
  split(n, [&](int64_t b, int64_t e) {
    perturb_range<T>(theta + b, g + b, snap ? snap + b : nullptr,
                     delta ? delta + b : nullptr, e - b, z, c);
  });
}

// The fused first ascent step: per tensor, the norm of z·g (one read of g,
// still in cache for the second one when the tensor is small), the
// projection coefficient, then one pass writing θ (and the snapshot, δ).
// o[i] <- ‖z·g[i]‖₂ in T.
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

// true when p[b..e) holds no inf or NaN, read FINITE_BLOCK elements at a
// time; gives up early (returning true) once `go` is false, when another
// thread has already found one.
template <typename T>
bool finite_range(const T *p, int64_t b, int64_t e,
                  const std::atomic<bool> &go) {
  for (int64_t k = b; k < e && go.load(std::memory_order_relaxed);
       k += FINITE_BLOCK) {
    if (!finite_block<T>(p + k, std::min(FINITE_BLOCK, e - k))) return false;
  }
  return true;
}

template <typename T> bool fast_all_finite(const std::vector<Span> &s) {
  std::atomic<bool> finite{true};
  for (size_t i = 0; i < s.size(); ++i) {
    prefetch(s, i + 1, sizeof(T));
    const T *p = reinterpret_cast<const T *>(s[i].p);
    int64_t n = s[i].n;
    if (n >= PARALLEL) {
      split(n, [&](int64_t b, int64_t e) {
        if (!finite_range<T>(p, b, e, finite)) {
          finite.store(false, std::memory_order_relaxed);
        }
      });
    } else if (!finite_range<T>(p, 0, n, finite)) {
      finite.store(false, std::memory_order_relaxed);
    }
    if (!finite.load()) return false;
  }
  return true;
}

} // namespace amp_tch
