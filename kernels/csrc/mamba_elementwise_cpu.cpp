// The element-wise parts of the Mamba mixer on CPU, forward and backward, fused:
// - conv: depthwise causal conv1d (+ bias) (+ SiLU) with a carried state of the last K - 1 inputs;
// - gate: RMS norm (no weight) over consecutive channel groups of the scan's output, + D * u, times SiLU(z).
// Same semantics as ``causal_conv1d._reference`` and ``gated_norm._reference``.
//
// Why: in bf16 training on CPU, ATen runs each of these as several passes with dtype round trips
// (the depthwise convolution's backward alone is ~20 ms at (128, 256, 50)); here each is one pass
// over the data forward and one backward.
//
// Layout: (B, D, L) tensors with any strides are read as rows of channels (one per time step) into
// compute-type buffers (float64 for float64 inputs, float32 otherwise): channel-last views (the
// mixer's u and z) row by row, channel-strided ones (the scan's y) along time, a tile at a time.
// Outputs are written channel-last ((B, L, D) storage, which the Python side returns as (B, D, L)
// views) in the input dtype, rounded once. Work items are batch
// rows on torch's OpenMP threads; sums across rows (weight, bias and D gradients) are added in a
// fixed order afterwards, so results do not depend on the thread count.

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#ifndef DEFOCUS_CPU_NAMESPACE
#define DEFOCUS_CPU_NAMESPACE defocus_cpu
#endif

namespace {

using namespace defocus_simd;

template <typename T>
using ComputeOf = std::conditional_t<std::is_same_v<T, double>, double, float>;

// A (B, D, L) tensor with any strides, read as rows of channels (b, t).
template <typename T>
struct Rows {
  const T* p = nullptr;
  int64_t sb = 0, sd = 0, st = 0;
  Rows() = default;
  explicit Rows(const at::Tensor& x) : p(x.data_ptr<T>()), sb(x.stride(0)), sd(x.stride(1)), st(x.stride(2)) {}
  // rows t0 .. t0 + rows of batch b (n channels each) into out, rows dp apart. Channel-strided
  // tensors (e.g. (B, D, L) contiguous) are read along time, the contiguous direction.
  template <typename C>
  void load(int64_t b, int64_t t0, int64_t rows, int64_t n, int64_t dp, C* out) const {
    const T* r = p + b * sb + t0 * st;
    if (sd == 1) {
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t d = 0; d < n; ++d) out[i * dp + d] = static_cast<C>(r[i * st + d]);
    } else {
      for (int64_t d = 0; d < n; ++d)
        for (int64_t i = 0; i < rows; ++i) out[i * dp + d] = static_cast<C>(r[d * sd + i * st]);
    }
  }
};

// Time steps per tile of the gate's row buffers (a tile of each input stays in L2).
constexpr int64_t kTile = 32;

template <typename T, typename C>
inline void store(T* out, const C* x, int64_t n) {
  for (int64_t d = 0; d < n; ++d) out[d] = static_cast<T>(x[d]);
}

// Buffers are padded to whole vectors; the padding lanes are computed on but never stored.
template <typename C>
inline int64_t padded(int64_t n) {
  return (n + Simd<C>::lanes - 1) / Simd<C>::lanes * Simd<C>::lanes;
}

template <typename C>
std::vector<C> padded_copy(const C* x, int64_t n, int64_t np) {
  std::vector<C> out(np, C(0));
  std::copy(x, x + n, out.begin());
  return out;
}

// s = sigmoid(x) over a padded buffer.
template <typename C>
inline void sigmoid(const C* x, C* s, int64_t np) {
  for (int64_t i = 0; i < np; i += Simd<C>::lanes) st(s + i, vsigmoid(ld<C>(x + i)));
}

at::Tensor channel_last(const at::Tensor& like, int64_t batch, int64_t dim, int64_t length) {
  return at::empty({batch, length, dim}, like.options());
}

void check_rows(const at::Tensor& x, const char* name, at::ScalarType dtype, at::IntArrayRef sizes) {
  TORCH_CHECK(x.dim() == 3 && x.sizes() == sizes, name, " must be ", sizes, ", got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == dtype, name, " must be ", dtype, ", got ", x.scalar_type());
}

void check_vector(const at::Tensor& x, const char* name, at::ScalarType dtype, at::IntArrayRef sizes) {
  TORCH_CHECK(x.is_contiguous() && x.sizes() == sizes && x.scalar_type() == dtype, name, " must be contiguous ",
              dtype, " of size ", sizes, ", got ", x.scalar_type(), " ", x.sizes());
}

at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// ---------------------------------------------------------------------------------------------
// Causal depthwise conv: y[t] = act(bias + sum_k w[:, k] * xpad[t + k]), xpad = [state, x] (K - 1 + L rows).

struct ConvArgs {
  int64_t batch, dim, length, width, dp;
  bool silu;
};

ConvArgs conv_args(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& state, bool silu) {
  TORCH_CHECK(x.dim() == 3, "x must be (B, D, L), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kDouble || x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              "x must be float64, float32, bfloat16 or float16, got ", x.scalar_type());
  const int64_t batch = x.size(0), dim = x.size(1), length = x.size(2);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == dim && w.size(1) >= 1, "w must be (D, K), got ", w.sizes());
  const int64_t width = w.size(1);
  check_vector(w, "w", compute_type(x), {dim, width});
  if (bias) check_vector(*bias, "bias", compute_type(x), {dim});
  if (state) check_rows(*state, "state", x.scalar_type(), {batch, dim, width - 1});
  const int64_t dp = x.scalar_type() == at::kDouble ? padded<double>(dim) : padded<float>(dim);
  return {batch, dim, length, width, dp, silu};
}

// The K - 1 + L input rows of batch row b as a (K - 1 + L, dp) buffer.
template <typename T, typename C>
void load_padded(const ConvArgs& a, const Rows<T>& x, const Rows<T>* state, int64_t b, C* xp) {
  const int64_t pre = a.width - 1;
  std::fill(xp, xp + (pre + a.length) * a.dp, C(0));
  if (state) state->load(b, 0, pre, a.dim, a.dp, xp);
  x.load(b, 0, a.length, a.dim, a.dp, xp + pre * a.dp);
}

// The pre-activation of row t into out (dp entries).
template <typename C>
inline void conv_row(const ConvArgs& a, const C* wt, const C* bias, const C* xp, int64_t t, C* out) {
  for (int64_t d = 0; d < a.dp; ++d) out[d] = bias ? bias[d] : C(0);
  for (int64_t k = 0; k < a.width; ++k) {
    const C* xr = xp + (t + k) * a.dp;
    const C* wk = wt + k * a.dp;
    for (int64_t d = 0; d < a.dp; ++d) out[d] += wk[d] * xr[d];
  }
}

// w (D, K) and bias (D) as (K, dp) / (dp) buffers, zero-padded.
template <typename C>
void conv_params(const ConvArgs& a, const at::Tensor& w, const std::optional<at::Tensor>& bias, std::vector<C>& wt,
                 std::vector<C>& bt) {
  wt.assign(a.width * a.dp, C(0));
  const C* wp = w.data_ptr<C>();
  for (int64_t d = 0; d < a.dim; ++d)
    for (int64_t k = 0; k < a.width; ++k) wt[k * a.dp + d] = wp[d * a.width + k];
  bt.assign(bias ? a.dp : 0, C(0));
  if (bias) std::copy(bias->data_ptr<C>(), bias->data_ptr<C>() + a.dim, bt.begin());
}

template <typename T>
at::Tensor conv_fwd_impl(const ConvArgs& a, const at::Tensor& x, const at::Tensor& w,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& state) {
  using C = ComputeOf<T>;
  std::vector<C> wt, bt;
  conv_params<C>(a, w, bias, wt, bt);
  auto y = channel_last(x, a.batch, a.dim, a.length);
  T* yp = y.data_ptr<T>();
  const Rows<T> xr(x);
  const Rows<T> sr = state ? Rows<T>(*state) : Rows<T>();
  at::parallel_for(0, a.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<C> xp((a.width - 1 + a.length) * a.dp), pre(a.dp), s(a.dp);
    for (int64_t b = begin; b < end; ++b) {
      load_padded<T, C>(a, xr, state ? &sr : nullptr, b, xp.data());
      for (int64_t t = 0; t < a.length; ++t) {
        conv_row<C>(a, wt.data(), bias ? bt.data() : nullptr, xp.data(), t, pre.data());
        if (a.silu) {
          sigmoid<C>(pre.data(), s.data(), a.dp);
          for (int64_t d = 0; d < a.dp; ++d) pre[d] *= s[d];
        }
        store<T, C>(yp + (b * a.length + t) * a.dim, pre.data(), a.dim);
      }
    }
  });
  return y;
}

// -> dx (channel-last storage), dw (D, K), dbias (D; empty without bias), dstate (empty without state);
// the parameter gradients in the compute dtype.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bwd_impl(
    const ConvArgs& a, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& state, const at::Tensor& dy) {
  using C = ComputeOf<T>;
  std::vector<C> wt, bt;
  conv_params<C>(a, w, bias, wt, bt);
  const int64_t pre_rows = a.width - 1, rows = pre_rows + a.length;
  auto dx = channel_last(x, a.batch, a.dim, a.length);
  auto dstate = state ? channel_last(x, a.batch, a.dim, pre_rows) : at::empty({0}, x.options());
  std::vector<C> part(a.batch * (a.width + 1) * a.dp, C(0));  // per row: dw (K, dp), dbias (dp)
  T* dxp = dx.data_ptr<T>();
  T* dsp = state ? dstate.data_ptr<T>() : nullptr;
  const Rows<T> xr(x), gr(dy);
  const Rows<T> sr = state ? Rows<T>(*state) : Rows<T>();
  at::parallel_for(0, a.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<C> xp(rows * a.dp), g(a.length * a.dp, C(0)), pre(a.dp), s(a.dp), acc(a.dp);
    for (int64_t b = begin; b < end; ++b) {
      load_padded<T, C>(a, xr, state ? &sr : nullptr, b, xp.data());
      C* dw = part.data() + b * (a.width + 1) * a.dp;
      C* db = dw + a.width * a.dp;
      gr.load(b, 0, a.length, a.dim, a.dp, g.data());  // its padding columns stay zero
      for (int64_t t = 0; t < a.length; ++t) {  // g = dL/d(pre-activation)
        C* gt = g.data() + t * a.dp;
        if (a.silu) {
          conv_row<C>(a, wt.data(), bias ? bt.data() : nullptr, xp.data(), t, pre.data());
          sigmoid<C>(pre.data(), s.data(), a.dp);
          for (int64_t d = 0; d < a.dp; ++d) gt[d] *= s[d] * (C(1) + pre[d] * (C(1) - s[d]));
        }
        for (int64_t d = 0; d < a.dp; ++d) db[d] += gt[d];
        for (int64_t k = 0; k < a.width; ++k) {
          const C* xk = xp.data() + (t + k) * a.dp;
          C* dwk = dw + k * a.dp;
          for (int64_t d = 0; d < a.dp; ++d) dwk[d] += gt[d] * xk[d];
        }
      }
      for (int64_t j = 0; j < rows; ++j) {  // d xpad[j] = sum_k w[:, k] g[j - k]
        std::fill(acc.begin(), acc.end(), C(0));
        for (int64_t k = 0; k < a.width; ++k) {
          const int64_t t = j - k;
          if (t < 0 || t >= a.length) continue;
          const C* gt = g.data() + t * a.dp;
          const C* wk = wt.data() + k * a.dp;
          for (int64_t d = 0; d < a.dp; ++d) acc[d] += wk[d] * gt[d];
        }
        if (j >= pre_rows)
          store<T, C>(dxp + (b * a.length + j - pre_rows) * a.dim, acc.data(), a.dim);
        else if (dsp)
          store<T, C>(dsp + (b * pre_rows + j) * a.dim, acc.data(), a.dim);
      }
    }
  });
  const auto copt = x.options().dtype(compute_type(x));
  auto dw = at::zeros({a.dim, a.width}, copt);
  auto db = at::zeros({bias ? a.dim : 0}, copt);
  C* dwo = dw.data_ptr<C>();
  C* dbo = bias ? db.data_ptr<C>() : nullptr;
  for (int64_t b = 0; b < a.batch; ++b) {  // a fixed order, whatever the thread count
    const C* p = part.data() + b * (a.width + 1) * a.dp;
    for (int64_t d = 0; d < a.dim; ++d) {
      for (int64_t k = 0; k < a.width; ++k) dwo[d * a.width + k] += p[k * a.dp + d];
      if (dbo) dbo[d] += p[a.width * a.dp + d];
    }
  }
  return {dx, dw, db, dstate};
}

at::Tensor conv_fwd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& state, bool silu) {
  const ConvArgs a = conv_args(x, w, bias, state, silu);
  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "conv_fwd",
                                  [&] { y = conv_fwd_impl<scalar_t>(a, x, w, bias, state); });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bwd(const at::Tensor& x, const at::Tensor& w,
                                                                    const std::optional<at::Tensor>& bias,
                                                                    const std::optional<at::Tensor>& state,
                                                                    bool silu, const at::Tensor& dy) {
  const ConvArgs a = conv_args(x, w, bias, state, silu);
  check_rows(dy, "dy", x.scalar_type(), x.sizes());
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "conv_bwd",
                                  [&] { out = conv_bwd_impl<scalar_t>(a, x, w, bias, state, dy); });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Gate: out = (y * r_g + D * u) * silu(z), r_g = 1 / sqrt(mean over the channel group of y^2 + eps).

struct GateArgs {
  int64_t batch, dim, length, group, ngroups, dp;
  double eps;
};

GateArgs gate_args(const at::Tensor& y, const at::Tensor& u, const at::Tensor& z, const at::Tensor& D, int64_t group,
                   double eps) {
  TORCH_CHECK(y.dim() == 3, "y must be (B, D, L), got ", y.sizes());
  TORCH_CHECK(y.scalar_type() == at::kDouble || y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16 ||
                  y.scalar_type() == at::kHalf,
              "y must be float64, float32, bfloat16 or float16, got ", y.scalar_type());
  check_rows(u, "u", y.scalar_type(), y.sizes());
  check_rows(z, "z", y.scalar_type(), y.sizes());
  const int64_t dim = y.size(1);
  TORCH_CHECK(group > 0 && dim % group == 0, "the group size must divide the channels (", dim, "), got ", group);
  check_vector(D, "D", compute_type(y), {dim});
  const int64_t dp = y.scalar_type() == at::kDouble ? padded<double>(dim) : padded<float>(dim);
  return {y.size(0), dim, y.size(2), group, dim / group, dp, eps};
}

// The row's normalised y (yn, in place of y) and its group factors r.
template <typename C>
inline void normalise_row(const GateArgs& a, C* y, C* r) {
  for (int64_t gi = 0; gi < a.ngroups; ++gi) {
    C* yg = y + gi * a.group;
    C ss = 0;
    for (int64_t i = 0; i < a.group; ++i) ss += yg[i] * yg[i];
    r[gi] = C(1) / std::sqrt(ss / C(a.group) + C(a.eps));
    for (int64_t i = 0; i < a.group; ++i) yg[i] *= r[gi];
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> gate_fwd_impl(const GateArgs& a, const at::Tensor& y, const at::Tensor& u,
                                                 const at::Tensor& z, const at::Tensor& D) {
  using C = ComputeOf<T>;
  auto out = channel_last(y, a.batch, a.dim, a.length);
  auto rstd = at::empty({a.batch, a.length, a.ngroups}, y.options().dtype(compute_type(y)));
  T* op = out.data_ptr<T>();
  C* rp = rstd.data_ptr<C>();
  const std::vector<C> Dpad = padded_copy(D.data_ptr<C>(), a.dim, a.dp);
  const C* Dp = Dpad.data();
  const Rows<T> yr(y), ur(u), zr(z);
  at::parallel_for(0, a.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<C> ytile(kTile * a.dp, C(0)), utile(kTile * a.dp, C(0)), ztile(kTile * a.dp, C(0)), s(a.dp);
    for (int64_t b = begin; b < end; ++b)
      for (int64_t t0 = 0; t0 < a.length; t0 += kTile) {
        const int64_t rows = std::min(kTile, a.length - t0);
        yr.load(b, t0, rows, a.dim, a.dp, ytile.data());
        ur.load(b, t0, rows, a.dim, a.dp, utile.data());
        zr.load(b, t0, rows, a.dim, a.dp, ztile.data());
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t t = t0 + i;
          C* yb = ytile.data() + i * a.dp;
          const C* ub = utile.data() + i * a.dp;
          const C* zb = ztile.data() + i * a.dp;
          normalise_row<C>(a, yb, rp + (b * a.length + t) * a.ngroups);
          sigmoid<C>(zb, s.data(), a.dp);
          for (int64_t d = 0; d < a.dp; ++d) yb[d] = (yb[d] + Dp[d] * ub[d]) * zb[d] * s[d];
          store<T, C>(op + (b * a.length + t) * a.dim, yb, a.dim);
        }
      }
  });
  return {out, rstd};
}

// -> dy, du, dz (channel-last storage), dD (compute dtype)
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_bwd_impl(
    const GateArgs& a, const at::Tensor& y, const at::Tensor& u, const at::Tensor& z, const at::Tensor& D,
    const at::Tensor& rstd, const at::Tensor& dout) {
  using C = ComputeOf<T>;
  auto dy = channel_last(y, a.batch, a.dim, a.length);
  auto du = channel_last(y, a.batch, a.dim, a.length);
  auto dz = channel_last(y, a.batch, a.dim, a.length);
  std::vector<C> part(a.batch * a.dp, C(0));  // per row: dD
  T* dyp = dy.data_ptr<T>();
  T* dup = du.data_ptr<T>();
  T* dzp = dz.data_ptr<T>();
  const C* rp = rstd.data_ptr<C>();
  const std::vector<C> Dpad = padded_copy(D.data_ptr<C>(), a.dim, a.dp);
  const C* Dp = Dpad.data();
  const Rows<T> yr(y), ur(u), zr(z), gr(dout);
  at::parallel_for(0, a.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<C> ytile(kTile * a.dp, C(0)), utile(kTile * a.dp, C(0)), ztile(kTile * a.dp, C(0)),
        gtile(kTile * a.dp, C(0)), s(a.dp), o(a.dp), rfull(a.dp, C(0));
    for (int64_t b = begin; b < end; ++b) {
      C* dD = part.data() + b * a.dp;
      for (int64_t t0 = 0; t0 < a.length; t0 += kTile) {
        const int64_t rows = std::min(kTile, a.length - t0);
        yr.load(b, t0, rows, a.dim, a.dp, ytile.data());
        ur.load(b, t0, rows, a.dim, a.dp, utile.data());
        zr.load(b, t0, rows, a.dim, a.dp, ztile.data());
        gr.load(b, t0, rows, a.dim, a.dp, gtile.data());
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t t = t0 + i;
          const C* yb = ytile.data() + i * a.dp;
          C* ub = utile.data() + i * a.dp;
          const C* zb = ztile.data() + i * a.dp;
          C* gb = gtile.data() + i * a.dp;
          const C* r = rp + (b * a.length + t) * a.ngroups;
          for (int64_t gi = 0; gi < a.ngroups; ++gi) std::fill_n(rfull.data() + gi * a.group, a.group, r[gi]);
          sigmoid<C>(zb, s.data(), a.dp);
          const int64_t row = (b * a.length + t) * a.dim;
          for (int64_t d = 0; d < a.dp; ++d) {  // g = dL/d(pre) where pre = yn + D u (yb is y here)
            const C pre = yb[d] * rfull[d] + Dp[d] * ub[d];
            const C ga = gb[d] * zb[d] * s[d];
            o[d] = gb[d] * pre * s[d] * (C(1) + zb[d] * (C(1) - s[d]));  // dL/dz
            dD[d] += ga * ub[d];
            ub[d] = ga * Dp[d];  // du
            gb[d] = ga;
          }
          store<T, C>(dzp + row, o.data(), a.dim);
          store<T, C>(dup + row, ub, a.dim);
          for (int64_t gi = 0; gi < a.ngroups; ++gi) {  // dy = r (g - yn mean(g yn)) = r g - r^3 mean(g y) y
            const C* yg = yb + gi * a.group;
            const C* gg = gb + gi * a.group;
            C* og = o.data() + gi * a.group;
            const C rg = r[gi];
            C m = 0;
            for (int64_t j = 0; j < a.group; ++j) m += gg[j] * yg[j];
            m *= rg * rg * rg / C(a.group);
            for (int64_t j = 0; j < a.group; ++j) og[j] = rg * gg[j] - m * yg[j];
          }
          store<T, C>(dyp + row, o.data(), a.dim);
        }
      }
    }
  });
  auto dD = at::zeros({a.dim}, y.options().dtype(compute_type(y)));
  C* dDo = dD.data_ptr<C>();
  for (int64_t b = 0; b < a.batch; ++b)  // a fixed order, whatever the thread count
    for (int64_t d = 0; d < a.dim; ++d) dDo[d] += part[b * a.dp + d];
  return {dy, du, dz, dD};
}

std::tuple<at::Tensor, at::Tensor> gate_fwd(const at::Tensor& y, const at::Tensor& u, const at::Tensor& z,
                                            const at::Tensor& D, int64_t group, double eps) {
  const GateArgs a = gate_args(y, u, z, D, group, eps);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "gate_fwd",
                                  [&] { out = gate_fwd_impl<scalar_t>(a, y, u, z, D); });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_bwd(const at::Tensor& y, const at::Tensor& u,
                                                                    const at::Tensor& z, const at::Tensor& D,
                                                                    const at::Tensor& rstd, const at::Tensor& dout,
                                                                    int64_t group, double eps) {
  const GateArgs a = gate_args(y, u, z, D, group, eps);
  check_rows(dout, "dout", y.scalar_type(), y.sizes());
  check_vector(rstd, "rstd", compute_type(y), {a.batch, a.length, a.ngroups});
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "gate_bwd",
                                  [&] { out = gate_bwd_impl<scalar_t>(a, y, u, z, D, rstd, dout); });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(DEFOCUS_CPU_NAMESPACE, m) {
  m.def("conv_fwd(Tensor x, Tensor w, Tensor? bias, Tensor? state, bool silu) -> Tensor");
  m.def("conv_bwd(Tensor x, Tensor w, Tensor? bias, Tensor? state, bool silu, Tensor dy) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("gate_fwd(Tensor y, Tensor u, Tensor z, Tensor D, int group, float eps) -> (Tensor, Tensor)");
  m.def("gate_bwd(Tensor y, Tensor u, Tensor z, Tensor D, Tensor rstd, Tensor dout, int group, float eps) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(DEFOCUS_CPU_NAMESPACE, CPU, m) {
  m.impl("conv_fwd", &conv_fwd);
  m.impl("conv_bwd", &conv_bwd);
  m.impl("gate_fwd", &gate_fwd);
  m.impl("gate_bwd", &gate_bwd);
}
