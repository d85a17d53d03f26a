// The fused Adam step (`ParamStore::adam_update`) on the CPU loop path.
//
// `adam_loop` repeats, for speed, the element formula of
// `amp_core::elementwise::adam`: θ shrunk (decoupled decay), g + λθ (L2
// decay), m·β₁ + (1−β₁)·g, v·β₂ + ((1−β₂)·g)·g, AMSGrad's running maximum,
// and θ + (step·m) / (√den / divisor + eps), one rounding per operation, no
// fused multiply-add (-ffp-contract=off), the square root and the divisions
// correctly rounded (IEEE), as Rust's. What ties the two is amp-ndarray's
// fused Adam, compared bit for bit by amp-tch's tests/fast_path.rs, and the
// conformance property `adam_update_matches_composed` (amp-testkit, run on
// plain and flattened tch stores by tests/tch.rs): a change on either side
// that is not made on the other fails them.

#include "loops.h"

#include <limits>

using namespace amp_tch;

namespace {

// One tensor's coefficients, laid out as amp-tch's `AdamTensor` (ffi.rs):
// doubles only, so `coalesce_with` compares them by their bytes.
struct AdamTensor {
  double shrink;  // 1: no decoupled decay
  double l2;      // 0: no L2 decay
  double beta1;   // β₁
  double beta1c;  // 1 − β₁
  double beta2;   // β₂
  double beta2c;  // 1 − β₂
  double step;    // −lr / (1 − β₁ᵗ)
  double divisor; // √(1 − β₂ᵗ)
  double eps;
};

// The coefficients in the tensors' dtype.
template <typename T> struct Coef {
  T shrink, l2, beta1, beta1c, beta2, beta2c, step, divisor, eps;
  explicit Coef(const AdamTensor &c)
      : shrink(static_cast<T>(c.shrink)), l2(static_cast<T>(c.l2)),
        beta1(static_cast<T>(c.beta1)), beta1c(static_cast<T>(c.beta1c)),
        beta2(static_cast<T>(c.beta2)), beta2c(static_cast<T>(c.beta2c)),
        step(static_cast<T>(c.step)), divisor(static_cast<T>(c.divisor)),
        eps(static_cast<T>(c.eps)) {}
};

template <typename T, bool Shrink, bool L2, bool Max>
void adam_loop(T *__restrict__ t, const T *__restrict__ g, T *__restrict__ m,
               T *__restrict__ v, T *__restrict__ mx, int64_t n,
               const Coef<T> &c) {
  for (int64_t k = 0; k < n; ++k) {
    T theta = Shrink ? t[k] * c.shrink : t[k];
    T grad = L2 ? g[k] + c.l2 * theta : g[k];
    T mk = m[k] * c.beta1;
    mk = mk + c.beta1c * grad;
    T vk = v[k] * c.beta2;
    vk = vk + c.beta2c * grad * grad;
    T den = vk;
    if (Max) {
      // `elementwise::maximum`: NaN if either is NaN, else the larger, the
      // first of two equal values.
      T a = mx[k];
      T r = (a != a || vk != vk) ? std::numeric_limits<T>::quiet_NaN()
                                 : (a < vk ? vk : a);
      mx[k] = r;
      den = r;
    }
    t[k] = theta + c.step * mk / (std::sqrt(den) / c.divisor + c.eps);
    m[k] = mk;
    v[k] = vk;
  }
}

template <typename T>
void fast_adam(const std::vector<Span> &ts, const std::vector<Span> &gs,
               const std::vector<Span> &ms, const std::vector<Span> &vs,
               const std::vector<Span> *xs, const std::vector<AdamTensor> &c) {
  each_piece(ts, [&](size_t i, int64_t lo, int64_t hi) {
    if (lo == 0) {
      prefetch(gs, i + 1, sizeof(T));
      prefetch(ms, i + 1, sizeof(T));
      prefetch(vs, i + 1, sizeof(T));
    }
    auto at = [&](const std::vector<Span> &s) {
      return reinterpret_cast<T *>(s[i].p) + lo;
    };
    T *mx = xs == nullptr ? nullptr : at(*xs);
    const Coef<T> k(c[i]);
    with_flag(c[i].shrink != 1.0, [&](auto shrink) {
      with_flag(c[i].l2 != 0.0, [&](auto l2) {
        with_flag(mx != nullptr, [&](auto max) {
          adam_loop<T, decltype(shrink)::value, decltype(l2)::value,
                    decltype(max)::value>(at(ts), at(gs), at(ms), at(vs), mx,
                                          hi - lo, k);
        });
      });
    });
  });
}

} // namespace

extern "C" {

// One Adam step of n tensors: θ (params), the gradients (`grads` through
// `grads_view`, only read), the moments m and v and AMSGrad's maximum
// (`max`, NULL without AMSGrad). *handled <- 1 when every tensor qualifies
// for the loop path; *handled <- 0 and nothing written otherwise, and the
// caller runs the composed sequence.
char *amp_tch_adam(at::Tensor **params, at::Tensor **grads, int grads_view,
                   at::Tensor **exp_avg, at::Tensor **exp_avg_sq,
                   at::Tensor **max_exp_avg_sq, size_t n,
                   const AdamTensor *coefficients, int *handled) {
  return loop_entry(handled, [&] {
    if (n == 0) return true;
    TensorList theta(params, n, PLAIN);
    TensorList g(grads, n, grads_view);
    TensorList m(exp_avg, n, PLAIN);
    TensorList v(exp_avg_sq, n, PLAIN);
    at::ScalarType type = loop_type(theta);
    std::vector<Span> ts, gs, ms, vs;
    OptionalSpans x;
    if (type == at::ScalarType::Undefined ||
        !read_spans(theta, type, true, ts) ||
        !read_spans(g, type, false, gs, &ts) ||
        !read_spans(m, type, true, ms, &ts) ||
        !read_spans(v, type, true, vs, &ts) ||
        !x.read(max_exp_avg_sq, n, type, ts))
      return false;
    std::vector<AdamTensor> c(coefficients, coefficients + n);
    coalesce_with<AdamTensor>(with_optional({&ts, &gs, &ms, &vs}, x), &c,
                              elem_size(type));
    by_type(type, [&](auto t) {
      fast_adam<decltype(t)>(ts, gs, ms, vs, x.get(), c);
    });
    theta.bump();
    m.bump();
    v.bump();
    x.bump();
    return true;
  });
}

} // extern "C"

namespace {

// `addcdiv_sqrt`'s coefficients of one tensor, laid out as amp-tch's
// `AddcdivTensor` (ffi.rs).
struct AddcdivTensor {
  double alpha;
  double divisor;
  double eps;
};

// d + (alpha · num) / (√den / divisor + eps): `elementwise::addcdiv_sqrt`,
// one rounding per operation.
template <typename T>
void addcdiv_sqrt_loop(T *__restrict__ d, const T *__restrict__ num,
                       const T *__restrict__ den, int64_t n, T alpha,
                       T divisor, T eps) {
  for (int64_t k = 0; k < n; ++k) {
    d[k] = d[k] + alpha * num[k] / (std::sqrt(den[k]) / divisor + eps);
  }
}

} // namespace

extern "C" {

// dst[i] <- dst[i] + (alpha · num[i]) / (√den[i] / divisor + eps) on the
// loop path (dst is neither source; `num` may be `den`). *handled as in
// `amp_tch_adam`.
char *amp_tch_addcdiv_sqrt(at::Tensor **dst, int dst_view, at::Tensor **num,
                           int num_view, at::Tensor **den, int den_view,
                           size_t n, const AddcdivTensor *coefficients,
                           int *handled) {
  return loop_entry(handled, [&] {
    if (n == 0) return true;
    TensorList d(dst, n, dst_view);
    TensorList x(num, n, num_view);
    TensorList y(den, n, den_view);
    at::ScalarType type = loop_type(d);
    std::vector<Span> ds, xs, ys;
    if (type == at::ScalarType::Undefined || !read_spans(d, type, true, ds) ||
        !read_spans(x, type, false, xs, &ds) ||
        !read_spans(y, type, false, ys, &ds))
      return false;
    std::vector<AddcdivTensor> c(coefficients, coefficients + n);
    coalesce_with<AddcdivTensor>({&ds, &xs, &ys}, &c, elem_size(type));
    by_type(type, [&](auto t) {
      using T = decltype(t);
      each_piece(ds, [&](size_t i, int64_t lo, int64_t hi) {
        addcdiv_sqrt_loop<T>(reinterpret_cast<T *>(ds[i].p) + lo,
                             reinterpret_cast<const T *>(xs[i].p) + lo,
                             reinterpret_cast<const T *>(ys[i].p) + lo, hi - lo,
                             static_cast<T>(c[i].alpha),
                             static_cast<T>(c[i].divisor),
                             static_cast<T>(c[i].eps));
      });
    });
    d.bump();
    return true;
  });
}

} // extern "C"
