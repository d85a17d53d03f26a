// The CUDA side of amp-candle's in-place operations (src/in_place.rs and
// src/in_place/*.rs): one kernel per operation and element type, each
// element computed on its own by the same sequence of IEEE operations as
// the CPU loop it mirrors. Built to PTX by build.rs with --fmad=false, so
// that no multiplication and addition are contracted into one rounding:
// a kernel gives the CPU loop's bits.
//
// Every kernel has one signature: n elements; d the destination; e a
// second destination (or null); x and y sources (or null); six scalar
// operands in double, rounded to the element type where the CPU loop
// rounds them (`T::of`).

#include <cstddef>

template <typename T> struct Ops;
template <> struct Ops<float> {
  __device__ static float root(float x) { return sqrtf(x); }
};
template <> struct Ops<double> {
  __device__ static double root(double x) { return sqrt(x); }
};

// The store's axpy: x + s for a = 1, x - s for a = -1, else x + (s * a + 0).
template <typename T> __device__ __forceinline__ T alpha(double a, T x, T s) {
  if (a == 1.0) return x + s;
  if (a == -1.0) return x - s;
  return x + (s * (T)a + (T)0);
}

// The store's scale, skipped for a factor of 1: x * f + 0, else x.
template <typename T> __device__ __forceinline__ T factor(double f, T x) {
  return f != 1.0 ? x * (T)f + (T)0 : x;
}

#define EACH for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)

#define ARGS size_t n, T *d, T *e, const T *x, const T *y, double p0, double p1, double p2, double p3, double p4, double p5

// x <- x * factor + 0 (Scale).
template <typename T> __device__ void scale(ARGS) {
  T f = (T)p0;
  EACH d[i] = d[i] * f + (T)0;
}

// x <- x * c (Multiply).
template <typename T> __device__ void multiply(ARGS) {
  T c = (T)p0;
  EACH d[i] = d[i] * c;
}

// d <- x (CopyFrom).
template <typename T> __device__ void copy(ARGS) {
  EACH d[i] = x[i];
}

// d <- alpha(d, x) (Axpy).
template <typename T> __device__ void axpy(ARGS) {
  EACH d[i] = alpha(p0, d[i], x[i]);
}

// d <- alpha(x, y) (AxpyFrom: x the base, y the addend).
template <typename T> __device__ void axpy_from(ARGS) {
  EACH d[i] = alpha(p0, x[i], y[i]);
}

// AMP's ascent: d + x * c, or d + (x * lr + 0) * c (Ascend; p0 the inner
// learning rate, p1 c).
template <typename T> __device__ __forceinline__ T ascent(double lr, T c, T d, T g) {
  if (lr == 1.0) return d + g * c;
  return d + (g * (T)lr + (T)0) * c;
}

template <typename T> __device__ void ascend(ARGS) {
  T c = (T)p1;
  EACH d[i] = ascent(p0, c, d[i], x[i]);
}

// e <- d, then the ascent on d (AscendSaving: e the snapshot).
template <typename T> __device__ void ascend_saving(ARGS) {
  T c = (T)p1;
  EACH {
    T t = d[i];
    e[i] = t;
    d[i] = ascent(p0, c, t, x[i]);
  }
}

// d <- d + (x * a + 0) * y (Addcmul).
template <typename T> __device__ void addcmul(ARGS) {
  T a = (T)p0;
  EACH d[i] = d[i] + (x[i] * a + (T)0) * y[i];
}

// d <- d + (x * a + 0) / ((sqrt(y) / c) * 1 + eps) (AddcdivSqrt; p0 a,
// p1 the divisor, p2 eps).
template <typename T> __device__ void addcdiv_sqrt(ARGS) {
  T a = (T)p0, c = (T)p1, eps = (T)p2, one = (T)1;
  EACH {
    T den = (Ops<T>::root(y[i]) / c) * one + eps;
    d[i] = d[i] + (x[i] * a + (T)0) / den;
  }
}

// One SGD step with momentum (SgdMomentumStep): d theta, e the buffer, x
// the gradient, y the weights (null: theta itself); p0 weight decay, p1
// momentum, p2 keep (1 - dampening), p3 step (-lr), p4 first (1 or 0), p5
// Nesterov (1 or 0).
template <typename T> __device__ void sgd_momentum(ARGS) {
  EACH {
    T w = y ? y[i] : d[i];
    T g = p0 != 0.0 ? alpha(p0, x[i], w) : x[i];
    T b = p4 != 0.0 ? g : alpha(p2, p1 != 1.0 ? e[i] * (T)p1 + (T)0 : e[i], g);
    e[i] = b;
    d[i] = p5 != 0.0 ? alpha(p3, w, alpha(p1, g, b)) : alpha(p3, w, b);
  }
}

// theta <- w - lr (g + lambda w) without momentum (SgdDecayed: x the
// weights, y the gradient; SgdDecayedSelf: x the gradient, the weights
// theta itself); p0 weight decay, p3 step.
template <typename T> __device__ void sgd_decayed(ARGS) {
  EACH d[i] = alpha(p3, x[i], alpha(p0, y[i], x[i]));
}

template <typename T> __device__ void sgd_decayed_self(ARGS) {
  EACH {
    T w = d[i];
    d[i] = alpha(p3, w, alpha(p0, x[i], w));
  }
}

// The gradient Adam's moments see: g + l2 (theta * shrink + 0) with L2
// decay, else g (p0 shrink, p1 l2).
template <typename T> __device__ __forceinline__ T adam_grad(double shrink, double l2, T g, T t) {
  return l2 != 0.0 ? alpha(l2, g, factor(shrink, t)) : g;
}

// m <- (m * beta1 + 0) + (1 - beta1) d (AdamFirst: x the gradient, y
// theta; p2 beta1, p3 1 - beta1).
template <typename T> __device__ void adam_first(ARGS) {
  EACH d[i] = alpha(p3, factor(p2, d[i]), adam_grad(p0, p1, x[i], y[i]));
}

// v <- (v * beta2 + 0) + (d * (1 - beta2) + 0) * d (AdamSecond; p2 beta2,
// p3 1 - beta2).
template <typename T> __device__ void adam_second(ARGS) {
  T c = (T)p3;
  EACH {
    T g = adam_grad(p0, p1, x[i], y[i]);
    d[i] = factor(p2, d[i]) + (g * c + (T)0) * g;
  }
}

// AMSGrad's running maximum: x where d < x or x is NaN (AdamMax).
template <typename T> __device__ void adam_max(ARGS) {
  EACH {
    T s = x[i];
    if (s != s || d[i] < s) d[i] = s;
  }
}

// theta <- (theta * shrink + 0) + (m * step + 0) / ((sqrt(den) / divisor)
// * 1 + eps) (AdamTheta: x m, y den; p0 shrink, p1 step, p2 divisor, p3
// eps).
template <typename T> __device__ void adam_theta(ARGS) {
  T step = (T)p1, c = (T)p2, eps = (T)p3, one = (T)1;
  EACH {
    T den = (Ops<T>::root(y[i]) / c) * one + eps;
    d[i] = factor(p0, d[i]) + (x[i] * step + (T)0) / den;
  }
}

#define PARAMS(T) size_t n, T *d, T *e, const T *x, const T *y, double p0, double p1, double p2, double p3, double p4, double p5
#define KERNEL(op)                                                                          \
  extern "C" __global__ void amp_##op##_f32(PARAMS(float)) { op<float>(n, d, e, x, y, p0, p1, p2, p3, p4, p5); } \
  extern "C" __global__ void amp_##op##_f64(PARAMS(double)) { op<double>(n, d, e, x, y, p0, p1, p2, p3, p4, p5); }

KERNEL(scale)
KERNEL(multiply)
KERNEL(copy)
KERNEL(axpy)
KERNEL(axpy_from)
KERNEL(ascend)
KERNEL(ascend_saving)
KERNEL(addcmul)
KERNEL(addcdiv_sqrt)
KERNEL(sgd_momentum)
KERNEL(sgd_decayed)
KERNEL(sgd_decayed_self)
KERNEL(adam_first)
KERNEL(adam_second)
KERNEL(adam_max)
KERNEL(adam_theta)
