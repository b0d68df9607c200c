// Fused selective scan on CPU, forward and backward (float32 / float64).
//
//     h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,   y_t = C_t . h_t (+ D u_t) (* silu(z_t))
//
// Same semantics and layout as ``selective_scan._reference``: u, delta, z (B, D, L); A (D, N);
// B, C (B, N, L); D (D,); initial state (B, D, N). u, delta, z, B, C and dy may have any strides;
// the outputs are contiguous. With `softplus`, delta is the raw input of delta = softplus(delta)
// (mamba-ssm's delta_softplus): applied to each tile as it is loaded, and its derivative to ddelta.
//
// How it runs
// - A block is W channels of one batch row (W = 4 SIMD vectors: 64 float32 / 32 float64 lanes);
//   its state h is an (N, W) array that stays in L1 for the whole sequence. The sequence is walked
//   once, in tiles of `tile` steps whose u / delta / z / dy columns are first transposed into
//   (tile, W) buffers (lanes x lanes blocks transposed in registers), so a time step is a
//   contiguous lane vector whatever the input strides.
// - Work items (one or more blocks of a batch row, a count fixed by the shape alone) run on
//   torch's OpenMP threads (at::parallel_for, torch.get_num_threads()). Every cross-item sum (dA
//   and dD over the batch, dB / dC over channel groups) is done afterwards in a fixed order, so the
//   results are the same whatever the thread count.
// - exp is a branch-free 2^x polynomial (near-minimax; within 2 ulp), 2^k applied by scalef on
//   AVX-512 and by exponent-bit arithmetic otherwise. The forward stores the state at the start of
//   every tile after the first ((B, D/W, tiles - 1, N, W): N / tile times u's size) when a backward
//   will follow.
// - The backward walks the tiles last to first: it recomputes the tile's decays and states from
//   the tile's checkpoint into (tile, N, W) / (tile + 1, N, W) buffers (L2), then runs the adjoint
//   recurrence g_t = gy_t C_t + exp(delta_{t+1} A) g_{t+1} backwards through them. Sums over the
//   channel lanes (dB, dC) are done for all N states of a step at once by a transposing reduction.

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#ifndef DEFOCUS_CPU_NAMESPACE
#define DEFOCUS_CPU_NAMESPACE defocus_cpu
#endif

namespace {

using namespace defocus_simd;

// Vectors per block: four (64 float32 / 32 float64 channels). Against two: a third less time
// forward and backward (fewer per-block overheads and lane reductions per channel, more
// independent chains per step); eight is no faster and doubles the backward's tile buffers.
constexpr int64_t K = 4;
template <typename T>
constexpr int64_t W = K * Simd<T>::lanes;

// Two-source lane permutation: out[c] = m[c] < lanes ? a[m[c]] : b[m[c] - lanes].
template <typename T>
inline typename Simd<T>::V shuffle2(typename Simd<T>::V a, typename Simd<T>::V b, typename Simd<T>::I m) {
#if defined(__GNUC__) && !defined(__clang__)
  return __builtin_shuffle(a, b, m);
#else
  typename Simd<T>::V out;
  for (int64_t c = 0; c < Simd<T>::lanes; ++c) out[c] = m[c] < Simd<T>::lanes ? a[m[c]] : b[m[c] - Simd<T>::lanes];
  return out;
#endif
}

// Masks of the recursive lane-block swap, one pair per stage h = lanes/2, lanes/4, .., 1: for rows
// i and i + h (i & h == 0), lo is row i with its lanes c & h replaced by row i + h's lanes c - h,
// hi is row i + h with its lanes c & h == 0 replaced by row i's lanes c + h.
template <typename T>
struct Masks {
  static constexpr int64_t lanes = Simd<T>::lanes;
  static constexpr int stages = lanes == 16 ? 4 : 3;
  typename Simd<T>::I lo[stages], hi[stages];
  Masks() {
    for (int s = 0; s < stages; ++s) {
      const int64_t h = lanes >> (s + 1);
      for (int64_t c = 0; c < lanes; ++c) {
        lo[s][c] = (c & h) ? lanes + c - h : c;
        hi[s][c] = (c & h) ? lanes + c : c + h;
      }
    }
  }
};

template <typename T>
const Masks<T>& masks() {
  static const Masks<T> m;
  return m;
}

// In place: rows r[0..lanes) of a lanes x lanes block become its columns.
template <typename T>
inline void transpose(typename Simd<T>::V* r, const Masks<T>& m) {
  for (int s = 0; s < Masks<T>::stages; ++s) {
    const int64_t h = Masks<T>::lanes >> (s + 1);
    for (int64_t i = 0; i < Masks<T>::lanes; ++i) {
      if (i & h) continue;
      const auto a = r[i], b = r[i + h];
      r[i] = shuffle2<T>(a, b, m.lo[s]);
      r[i + h] = shuffle2<T>(a, b, m.hi[s]);
    }
  }
}

// Lane c of the result = the sum of the lanes of p[c] (p: lanes vectors, overwritten). The same
// swaps as the transpose, adding the two halves at each stage, so each stage halves the number of
// vectors: about 3 operations per sum instead of a horizontal sum each. A fixed order.
template <typename T>
inline typename Simd<T>::V reduce_rows(typename Simd<T>::V* p, const Masks<T>& m) {
  for (int s = 0; s < Masks<T>::stages; ++s) {
    const int64_t h = Masks<T>::lanes >> (s + 1);
    for (int64_t i = 0; i < h; ++i) p[i] = shuffle2<T>(p[i], p[i + h], m.lo[s]) + shuffle2<T>(p[i], p[i + h], m.hi[s]);
  }
  return p[0];
}

// A strided (B, R, L) view: element (b, r, t).
template <typename T>
struct View3 {
  const T* p = nullptr;
  int64_t sb = 0, sr = 0, st = 0;
  View3() = default;
  explicit View3(const at::Tensor& x)
      : p(x.data_ptr<T>()), sb(x.stride(0)), sr(x.stride(1)), st(x.stride(2)) {}
  const T* row(int64_t b, int64_t r) const { return p + b * sb + r * sr; }
};

// Prefetch one cache line. GCC deletes loops whose only statements are __builtin_prefetch (they
// have no side effects for the optimiser), so on x86 this is an asm statement it keeps.
inline void touch(const void* p) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p);
#endif
}

// Ask for the cache lines of x[b, r0 .. r0 + rows, t0 .. t0 + tl) ahead of use: the rows of a block
// are short strided pieces that the hardware prefetchers do not follow well.
template <typename T>
void prefetch(const View3<T>& x, int64_t b, int64_t r0, int64_t rows, int64_t t0, int64_t tl) {
  constexpr int64_t per_line = 64 / sizeof(T);
  if (!x.p || tl <= 0 || rows <= 0) return;
  if (x.st == 1) {
    for (int64_t r = 0; r < rows; ++r) {
      const T* p = x.row(b, r0 + r) + t0;
      for (int64_t t = 0; t < tl; t += per_line) touch(p + t);
      touch(p + tl - 1);
    }
  } else if (x.sr == 1) {
    for (int64_t t = 0; t < tl; ++t) {
      const T* p = x.row(b, r0) + (t0 + t) * x.st;
      for (int64_t r = 0; r < rows; r += per_line) touch(p + r);
      touch(p + rows - 1);
    }
  }
}

// The same for the contiguous (B, D, L) output rows, before they are written.
template <typename T>
void prefetch_out(T* out, int64_t dim, int64_t length, int64_t b, int64_t d0, int64_t rows, int64_t t0, int64_t tl) {
  constexpr int64_t per_line = 64 / sizeof(T);
  for (int64_t r = 0; r < rows; ++r) {
    T* p = out + (b * dim + d0 + r) * length + t0;
    for (int64_t t = 0; t < tl; t += per_line) touch(p + t);
    touch(p + tl - 1);
  }
}

// buf[t * W + j] = x[b, d0 + j, t0 + t] for j < nvalid, t < tl (the other lanes are left alone).
template <typename T>
void load_tile(const View3<T>& x, int64_t b, int64_t d0, int64_t nvalid, int64_t t0, int64_t tl, T* buf) {
  constexpr int64_t L = Simd<T>::lanes, Wt = W<T>;
  if (x.sr == 1) {  // channels contiguous: a time step is a contiguous lane vector
    for (int64_t t = 0; t < tl; ++t) std::memcpy(buf + t * Wt, x.row(b, d0) + (t0 + t) * x.st, nvalid * sizeof(T));
    return;
  }
  int64_t t = 0;
  if (x.st == 1 && nvalid == Wt) {  // time contiguous: transpose lanes x lanes blocks in registers
    const Masks<T>& m = masks<T>();
    for (; t + L <= tl; t += L)
      for (int64_t k = 0; k < K; ++k) {
        typename Simd<T>::V r[L];
        for (int64_t i = 0; i < L; ++i) r[i] = ld(x.row(b, d0 + k * L + i) + t0 + t);
        transpose<T>(r, m);
        for (int64_t i = 0; i < L; ++i) st(buf + (t + i) * Wt + k * L, r[i]);
      }
  }
  for (int64_t j = 0; j < nvalid; ++j) {
    const T* src = x.row(b, d0 + j) + t0 * x.st;
    for (int64_t tt = t; tt < tl; ++tt) buf[tt * Wt + j] = src[tt * x.st];
  }
}

// out[b, d0 + j, t0 + t] = buf[t * W + j], out contiguous (B, D, L).
template <typename T>
void store_tile(T* out, int64_t dim, int64_t length, int64_t b, int64_t d0, int64_t nvalid, int64_t t0, int64_t tl,
                const T* buf) {
  constexpr int64_t L = Simd<T>::lanes, Wt = W<T>;
  T* base = out + (b * dim + d0) * length + t0;
  int64_t t = 0;
  if (nvalid == Wt) {
    const Masks<T>& m = masks<T>();
    for (; t + L <= tl; t += L)
      for (int64_t k = 0; k < K; ++k) {
        typename Simd<T>::V r[L];
        for (int64_t i = 0; i < L; ++i) r[i] = ld(buf + (t + i) * Wt + k * L);
        transpose<T>(r, m);
        for (int64_t i = 0; i < L; ++i) st(base + (k * L + i) * length + t, r[i]);
      }
  }
  for (int64_t j = 0; j < nvalid; ++j)
    for (int64_t tt = t; tt < tl; ++tt) base[j * length + tt] = buf[tt * Wt + j];
}

struct Shape {
  int64_t batch, dim, length, nstate, tile, ntiles, nblocks;
  int64_t groups, per_group;  // backward: channel groups per batch row (one work item each), blocks per group
};

// Enough work items for the threads without splitting a batch row when there are many rows: a
// rule of the shape alone, so that the per-group partial sums, and the results, never depend on
// the thread count.
constexpr int64_t kTargetItems = 64;

template <typename T>
Shape shape_of(const at::Tensor& u, const at::Tensor& A, int64_t tile) {
  Shape s{u.size(0), u.size(1), u.size(2), A.size(1), tile, 0, 0, 1, 1};
  s.ntiles = (s.length + tile - 1) / tile;
  s.nblocks = (s.dim + W<T> - 1) / W<T>;
  const int64_t wanted = std::max<int64_t>(1, std::min(s.nblocks, (kTargetItems + s.batch - 1) / std::max<int64_t>(s.batch, 1)));
  s.per_group = std::max<int64_t>(1, (s.nblocks + wanted - 1) / wanted);
  s.groups = std::max<int64_t>(1, (s.nblocks + s.per_group - 1) / s.per_group);  // none empty
  return s;
}

// A (D, N) -> (N, W) lanes of channels d0.. (also times log2 e), D (D,) -> (W,); padded lanes are 0
// (decay 1, no input, so their state stays 0).
template <typename T>
void load_params(const Shape& s, const T* A, const T* Dp, int64_t d0, int64_t nvalid, T* a_loc, T* a2_loc, T* d_loc) {
  std::fill(a_loc, a_loc + s.nstate * W<T>, T(0));
  std::fill(a2_loc, a2_loc + s.nstate * W<T>, T(0));
  std::fill(d_loc, d_loc + W<T>, T(0));
  for (int64_t j = 0; j < nvalid; ++j) {
    for (int64_t n = 0; n < s.nstate; ++n) {
      a_loc[n * W<T> + j] = A[(d0 + j) * s.nstate + n];
      a2_loc[n * W<T> + j] = A[(d0 + j) * s.nstate + n] * T(kLog2e);
    }
    if (Dp) d_loc[j] = Dp[d0 + j];
  }
}

// state (B, D, N) <-> lanes (N, W)
template <typename T>
void load_state(const Shape& s, const T* src, int64_t b, int64_t d0, int64_t nvalid, T* h) {
  std::fill(h, h + s.nstate * W<T>, T(0));
  if (!src) return;
  for (int64_t j = 0; j < nvalid; ++j)
    for (int64_t n = 0; n < s.nstate; ++n) h[n * W<T> + j] = src[((b * s.dim) + d0 + j) * s.nstate + n];
}

template <typename T>
void store_state(const Shape& s, T* dst, int64_t b, int64_t d0, int64_t nvalid, const T* h) {
  for (int64_t j = 0; j < nvalid; ++j)
    for (int64_t n = 0; n < s.nstate; ++n) dst[((b * s.dim) + d0 + j) * s.nstate + n] = h[n * W<T> + j];
}

// One step of the recurrence for a block: h_out = exp(delta A) h_in + delta u B_t (h_out may be
// h_in), y = C_t . h_out per lane (before D and the gate); with kStoreDecay, exp(delta A) -> decay.
// dt, u: this step's (W,) lanes; a2: A log2(e) as (N, W); Bt / Ct: B / C at this step, stride bsr / csr.
template <typename T, bool kStoreDecay>
inline void scan_step(int64_t N, const T* Bt, int64_t bsr, const T* Ct, int64_t csr, const T* a2, const T* dt_in,
                      const T* u_in, const T* h_in, T* h_out, T* decay, typename Simd<T>::V* y) {
  using V = typename Simd<T>::V;
  constexpr int64_t L = Simd<T>::lanes, Wt = W<T>;
  V dt[K], du[K];
  for (int64_t k = 0; k < K; ++k) {
    dt[k] = ld(dt_in + k * L);
    du[k] = dt[k] * ld(u_in + k * L);
    y[k] = V{};
  }
  for (int64_t n = 0; n < N; ++n) {
    const T bn = Bt[n * bsr], cn = Ct[n * csr];
    for (int64_t k = 0; k < K; ++k) {
      const int64_t o = n * Wt + k * L;
      const V e = vexp2(dt[k] * ld(a2 + o));
      if constexpr (kStoreDecay) st(decay + o, e);
      const V hv = e * ld(h_in + o) + du[k] * bn;
      st(h_out + o, hv);
      y[k] += cn * hv;
    }
  }
}

// The op's inputs, as the kernels read them.
template <typename T>
struct Inputs {
  View3<T> u, delta, z, B, C;
  const T *A, *D, *h0;
  bool softplus;
  Inputs(const at::Tensor& u_, const at::Tensor& delta_, const at::Tensor& A_, const at::Tensor& B_,
         const at::Tensor& C_, const std::optional<at::Tensor>& D_, const std::optional<at::Tensor>& z_,
         const std::optional<at::Tensor>& h0_, bool softplus_)
      : u(u_), delta(delta_), z(z_ ? View3<T>(*z_) : View3<T>()), B(B_), C(C_), A(A_.data_ptr<T>()),
        D(D_ ? D_->data_ptr<T>() : nullptr), h0(h0_ ? h0_->data_ptr<T>() : nullptr), softplus(softplus_) {}
};

// A tile of delta into db: as it is, or softplus of the raw values loaded into rb, which then holds
// softplus's derivative when `grad`. Padded lanes (0 at the block's start) keep finite values there, and
// with u and A 0 in those lanes their delta changes nothing.
template <typename T>
void load_delta(const Inputs<T>& a, int64_t b, int64_t d0, int64_t nvalid, int64_t t0, int64_t tl, T* db, T* rb,
                bool grad) {
  if (!a.softplus) {
    load_tile(a.delta, b, d0, nvalid, t0, tl, db);
    return;
  }
  load_tile(a.delta, b, d0, nvalid, t0, tl, rb);
  for (int64_t i = 0; i < tl * W<T>; i += Simd<T>::lanes) {
    typename Simd<T>::V g;
    st(db + i, vsoftplus(ld(rb + i), grad ? &g : nullptr));
    if (grad) st(rb + i, g);
  }
}

template <typename T>
struct FwdArgs : Inputs<T> {
  using Inputs<T>::Inputs;
  T *y = nullptr, *last = nullptr, *ckpt = nullptr;
};

template <typename T>
void forward_block(const Shape& s, const FwdArgs<T>& a, int64_t b, int64_t blk, int64_t next, std::vector<T>& ws) {
  using V = typename Simd<T>::V;
  constexpr int64_t L = Simd<T>::lanes, Wt = W<T>;
  const int64_t N = s.nstate, d0 = blk * Wt, nvalid = std::min(Wt, s.dim - d0);
  const int64_t bsr = a.B.sr, csr = a.C.sr;
  T* a_loc = ws.data();
  T* a2_loc = a_loc + N * Wt;
  T* d_loc = a2_loc + N * Wt;
  T* h = d_loc + Wt;
  T* ub = h + N * Wt;
  T* db = ub + s.tile * Wt;
  T* zb = db + s.tile * Wt;
  T* yb = zb + s.tile * Wt;
  T* rb = yb + s.tile * Wt;  // delta before the softplus
  if (nvalid < Wt) std::fill(ub, rb + s.tile * Wt, T(0));  // padded lanes stay 0
  load_params(s, a.A, a.D, d0, nvalid, a_loc, a2_loc, d_loc);
  load_state(s, a.h0, b, d0, nvalid, h);
  // the lines of the next tile (or of the next block's first tile) while this one computes
  const auto fetch = [&](int64_t bb, int64_t dd, int64_t t0, int64_t tl) {
    const int64_t rows = std::min(Wt, s.dim - dd);
    for (const View3<T>* x : {&a.u, &a.delta, &a.z}) prefetch(*x, bb, dd, rows, t0, tl);
    prefetch(a.B, bb, 0, N, t0, tl);
    prefetch(a.C, bb, 0, N, t0, tl);
    prefetch_out(a.y, s.dim, s.length, bb, dd, rows, t0, tl);
  };
  for (int64_t c = 0; c < s.ntiles; ++c) {
    const int64_t t0 = c * s.tile, tl = std::min(s.tile, s.length - t0);
    if (a.ckpt && c > 0) std::copy(h, h + N * Wt, a.ckpt + (((b * s.nblocks + blk) * (s.ntiles - 1)) + c - 1) * N * Wt);
    load_tile(a.u, b, d0, nvalid, t0, tl, ub);
    load_delta(a, b, d0, nvalid, t0, tl, db, rb, false);
    if (a.z.p) load_tile(a.z, b, d0, nvalid, t0, tl, zb);
    if (c + 1 < s.ntiles)
      fetch(b, d0, t0 + tl, std::min(s.tile, s.length - t0 - tl));
    else if (next >= 0)
      fetch(next / s.nblocks, (next % s.nblocks) * Wt, 0, std::min(s.tile, s.length));
    for (int64_t t = 0; t < tl; ++t) {
      V y[K];
      scan_step<T, false>(N, a.B.row(b, 0) + (t0 + t) * a.B.st, bsr, a.C.row(b, 0) + (t0 + t) * a.C.st, csr, a2_loc,
                          db + t * Wt, ub + t * Wt, h, h, nullptr, y);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t o = t * Wt + k * L;
        V v = y[k] + ld(d_loc + k * L) * ld(ub + o);
        if (a.z.p) {
          const V zv = ld(zb + o);
          v = v * zv * vsigmoid(zv);
        }
        st(yb + o, v);
      }
    }
    store_tile(a.y, s.dim, s.length, b, d0, nvalid, t0, tl, yb);
  }
  store_state(s, a.last, b, d0, nvalid, h);
}

template <typename T>
struct BwdArgs : Inputs<T> {
  using Inputs<T>::Inputs;
  View3<T> dy;
  const T *ckpt = nullptr, *dlast = nullptr;
  T *du = nullptr, *ddelta = nullptr, *dz = nullptr, *dA_part = nullptr, *dBC = nullptr, *dD_part = nullptr,
    *dh0 = nullptr;
};

// Workspace of backward_block, in elements of T.
int64_t backward_workspace(const Shape& s, int64_t w) {
  return 4 * s.nstate * w + 2 * w + (2 * s.tile + 1) * s.nstate * w + 8 * s.tile * w;
}

// One block's backward. Adds its share of dB / dC to dB_row / dC_row ((N, L) each) when `accumulate`,
// else writes it there.
template <typename T>
void backward_block(const Shape& s, const BwdArgs<T>& a, int64_t b, int64_t blk, int64_t next, T* dB_row, T* dC_row,
                    bool accumulate, std::vector<T>& ws, std::vector<typename Simd<T>::V>& part_buf) {
  using V = typename Simd<T>::V;
  constexpr int64_t L = Simd<T>::lanes, Wt = W<T>;
  const int64_t N = s.nstate, d0 = blk * Wt, nvalid = std::min(Wt, s.dim - d0), TW = s.tile * Wt;
  const int64_t bsr = a.B.sr, csr = a.C.sr, len = s.length;
  T* a_loc = ws.data();
  T* a2_loc = a_loc + N * Wt;
  T* d_loc = a2_loc + N * Wt;
  T* g = d_loc + Wt;            // (N, W): dL/dh_{t-1}, carried to the previous step
  T* dA_acc = g + N * Wt;       // (N, W)
  T* dD_acc = dA_acc + N * Wt;  // (W,)
  T* hs = dD_acc + Wt;          // (tile + 1, N, W): the states before and after each step of the tile
  T* decay = hs + (s.tile + 1) * N * Wt;  // (tile, N, W): exp(delta_t A)
  T* ub = decay + s.tile * N * Wt;
  T* db = ub + TW;
  T* zb = db + TW;
  T* gb = zb + TW;  // dy, then (with z) the gradient before the gate
  T* dub = gb + TW;
  T* ddb = dub + TW;
  T* dzb = ddb + TW;
  T* rb = dzb + TW;  // delta before the softplus, then its derivative
  const int64_t G = (N + L - 1) / L;  // states in groups of `lanes` for reduce_rows
  V* part = part_buf.data();  // (2, G * lanes): one step's per-lane partial sums of dB, dC (padding stays 0)
  if (nvalid < Wt) std::fill(ub, rb + TW, T(0));  // padded lanes stay 0
  std::fill(dA_acc, dA_acc + N * Wt + Wt, T(0));
  const Masks<T>& m = masks<T>();
  load_params(s, a.A, a.D, d0, nvalid, a_loc, a2_loc, d_loc);
  load_state(s, a.dlast, b, d0, nvalid, g);
  const auto fetch = [&](int64_t bb, int64_t dd, int64_t t0, int64_t tl) {
    const int64_t rows = std::min(Wt, s.dim - dd);
    for (const View3<T>* x : {&a.u, &a.delta, &a.z, &a.dy}) prefetch(*x, bb, dd, rows, t0, tl);
    prefetch(a.B, bb, 0, N, t0, tl);
    prefetch(a.C, bb, 0, N, t0, tl);
    prefetch_out(a.du, s.dim, s.length, bb, dd, rows, t0, tl);
    prefetch_out(a.ddelta, s.dim, s.length, bb, dd, rows, t0, tl);
    if (a.dz) prefetch_out(a.dz, s.dim, s.length, bb, dd, rows, t0, tl);
  };
  for (int64_t c = s.ntiles - 1; c >= 0; --c) {
    const int64_t t0 = c * s.tile, tl = std::min(s.tile, s.length - t0);
    if (c == 0) {
      load_state(s, a.h0, b, d0, nvalid, hs);
    } else {
      const T* ck = a.ckpt + (((b * s.nblocks + blk) * (s.ntiles - 1)) + c - 1) * N * Wt;
      std::copy(ck, ck + N * Wt, hs);
    }
    load_tile(a.u, b, d0, nvalid, t0, tl, ub);
    load_delta(a, b, d0, nvalid, t0, tl, db, rb, true);
    load_tile(a.dy, b, d0, nvalid, t0, tl, gb);
    if (a.z.p) load_tile(a.z, b, d0, nvalid, t0, tl, zb);
    if (c > 0) {
      fetch(b, d0, t0 - s.tile, s.tile);
    } else if (next >= 0) {
      const int64_t last0 = (s.ntiles - 1) * s.tile;
      fetch(next / s.nblocks, (next % s.nblocks) * Wt, last0, s.length - last0);
    }
    // recompute the tile's decays and states from its checkpoint (and, with z, the gate's input)
    for (int64_t t = 0; t < tl; ++t) {
      V y[K];
      scan_step<T, true>(N, a.B.row(b, 0) + (t0 + t) * a.B.st, bsr, a.C.row(b, 0) + (t0 + t) * a.C.st, csr, a2_loc,
                         db + t * Wt, ub + t * Wt, hs + t * N * Wt, hs + (t + 1) * N * Wt, decay + t * N * Wt, y);
      if (a.z.p) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t o = t * Wt + k * L;
          const V zv = ld(zb + o), gv = ld(gb + o);
          const V pre = y[k] + ld(d_loc + k * L) * ld(ub + o);
          const V sg = vsigmoid(zv);
          st(dzb + o, gv * pre * sg * (1 + zv * (1 - sg)));
          st(gb + o, gv * zv * sg);
        }
      }
    }
    // adjoint recurrence, last step first: dL/dh_t = gy_t C_t + exp(delta_{t+1} A) dL/dh_{t+1}
    for (int64_t t = tl - 1; t >= 0; --t) {
      const T* Bt = a.B.row(b, 0) + (t0 + t) * a.B.st;
      const T* Ct = a.C.row(b, 0) + (t0 + t) * a.C.st;
      V dt[K], ut[K], gy[K], du[K], gB[K], q[K];
      for (int64_t k = 0; k < K; ++k) {
        const int64_t o = t * Wt + k * L;
        dt[k] = ld(db + o);
        ut[k] = ld(ub + o);
        gy[k] = ld(gb + o);
        du[k] = dt[k] * ut[k];
        gB[k] = V{};
        q[k] = V{};
      }
      for (int64_t n = 0; n < N; ++n) {
        const T bn = Bt[n * bsr], cn = Ct[n * csr];
        const T* hp = hs + (t * N + n) * Wt;
        const T* hn = hs + ((t + 1) * N + n) * Wt;
        const T* an = decay + (t * N + n) * Wt;
        const T* An = a_loc + n * Wt;
        T* gn = g + n * Wt;
        T* dAn = dA_acc + n * Wt;
        V sB{}, sC{};
        for (int64_t k = 0; k < K; ++k) {
          const V gv = gy[k] * cn + ld(gn + k * L);  // dL/dh_t
          sC += gy[k] * ld(hn + k * L);
          sB += gv * du[k];
          gB[k] += gv * bn;
          const V carry = ld(an + k * L) * gv;  // dL/dh_{t-1} through the decay
          const V qv = carry * ld(hp + k * L);  // dL/d(delta_t A)
          q[k] += qv * ld(An + k * L);
          st(dAn + k * L, ld(dAn + k * L) + qv * dt[k]);
          st(gn + k * L, carry);
        }
        part[n] = sB;
        part[G * L + n] = sC;
      }
      for (int64_t which = 0; which < 2; ++which) {
        T* dst = (which ? dC_row : dB_row) + t0 + t;
        for (int64_t gi = 0; gi < G; ++gi) {
          const V sums = reduce_rows<T>(part + (which * G + gi) * L, m);
          for (int64_t c2 = 0; c2 < L && gi * L + c2 < N; ++c2)
            dst[(gi * L + c2) * len] = accumulate ? dst[(gi * L + c2) * len] + sums[c2] : sums[c2];
        }
      }
      for (int64_t k = 0; k < K; ++k) {
        const int64_t o = t * Wt + k * L;
        st(dub + o, gB[k] * dt[k] + gy[k] * ld(d_loc + k * L));
        const V dd = gB[k] * ut[k] + q[k];
        st(ddb + o, a.softplus ? dd * ld(rb + o) : dd);  // rb: softplus's derivative
        st(dD_acc + k * L, ld(dD_acc + k * L) + gy[k] * ut[k]);
      }
    }
    store_tile(a.du, s.dim, s.length, b, d0, nvalid, t0, tl, dub);
    store_tile(a.ddelta, s.dim, s.length, b, d0, nvalid, t0, tl, ddb);
    if (a.z.p) store_tile(a.dz, s.dim, s.length, b, d0, nvalid, t0, tl, dzb);
  }
  if (a.dh0) store_state(s, a.dh0, b, d0, nvalid, g);
  store_state(s, a.dA_part, b, d0, nvalid, dA_acc);
  if (a.dD_part)
    for (int64_t j = 0; j < nvalid; ++j) a.dD_part[b * s.dim + d0 + j] = dD_acc[j];
}

void check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                  const std::optional<at::Tensor>& h0, int64_t tile) {
  TORCH_CHECK(u.device().is_cpu(), "fused CPU selective scan: tensors must be on the CPU");
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
              "fused CPU selective scan: float32 or float64 only, got ", u.scalar_type());
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes(), "u and delta must be (B, D, L)");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1) && A.is_contiguous(), "A must be contiguous (D, N)");
  const std::vector<int64_t> bc{u.size(0), A.size(1), u.size(2)};
  TORCH_CHECK(B.sizes() == at::IntArrayRef(bc) && C.sizes() == at::IntArrayRef(bc), "B and C must be (B, N, L)");
  TORCH_CHECK(tile >= 1, "tile must be positive");
  for (const at::Tensor* t : {&delta, &A, &B, &C})
    TORCH_CHECK(t->scalar_type() == u.scalar_type() && t->device().is_cpu(),
                "fused CPU selective scan: all tensors must be CPU tensors of u's dtype");
  if (D)
    TORCH_CHECK(D->scalar_type() == u.scalar_type() && D->dim() == 1 && D->size(0) == u.size(1) && D->is_contiguous(),
                "D must be contiguous (D,) of u's dtype");
  if (z) TORCH_CHECK(z->scalar_type() == u.scalar_type() && z->sizes() == u.sizes(), "z must be (B, D, L)");
  if (h0)
    TORCH_CHECK(h0->scalar_type() == u.scalar_type() && h0->is_contiguous() && h0->dim() == 3 &&
                    h0->size(0) == u.size(0) && h0->size(1) == u.size(1) && h0->size(2) == A.size(1),
                "initial state must be contiguous (B, D, N) of u's dtype");
}

template <typename T>
void run_fwd(const Shape& s, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
             const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
             const std::optional<at::Tensor>& h0, at::Tensor& y, at::Tensor& last, at::Tensor& ckpt, bool save,
             bool softplus) {
  FwdArgs<T> a(u, delta, A, B, C, D, z, h0, softplus);
  a.y = y.data_ptr<T>();
  a.last = last.data_ptr<T>();
  a.ckpt = save && s.ntiles > 1 ? ckpt.data_ptr<T>() : nullptr;
  const int64_t ws_size = 3 * s.nstate * W<T> + W<T> + 5 * s.tile * W<T>;
  at::parallel_for(0, s.batch * s.nblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> ws(ws_size);
    for (int64_t i = begin; i < end; ++i) forward_block(s, a, i / s.nblocks, i % s.nblocks, i + 1 < end ? i + 1 : -1, ws);
  });
}

// -> y (B, D, L), last state (B, D, N), checkpoints (B, ceil(D / W), tiles - 1, N, W) (empty unless save)
std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_fwd(const at::Tensor& u, const at::Tensor& delta,
                                                         const at::Tensor& A, const at::Tensor& B,
                                                         const at::Tensor& C, const std::optional<at::Tensor>& D,
                                                         const std::optional<at::Tensor>& z,
                                                         const std::optional<at::Tensor>& h0, int64_t tile,
                                                         bool save, bool softplus) {
  check_inputs(u, delta, A, B, C, D, z, h0, tile);
  const bool dbl = u.scalar_type() == at::kDouble;
  const Shape s = dbl ? shape_of<double>(u, A, tile) : shape_of<float>(u, A, tile);
  auto y = at::empty({s.batch, s.dim, s.length}, u.options());
  auto last = at::empty({s.batch, s.dim, s.nstate}, u.options());
  auto ckpt = at::empty({save ? s.batch : 0, s.nblocks, std::max<int64_t>(s.ntiles - 1, 0), s.nstate,
                         dbl ? W<double> : W<float>}, u.options());
  if (dbl)
    run_fwd<double>(s, u, delta, A, B, C, D, z, h0, y, last, ckpt, save, softplus);
  else
    run_fwd<float>(s, u, delta, A, B, C, D, z, h0, y, last, ckpt, save, softplus);
  return {y, last, ckpt};
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor>;

template <typename T>
Grads run_bwd(const Shape& s, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
              const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
              const std::optional<at::Tensor>& h0, const at::Tensor& ckpt, const at::Tensor& dy,
              const std::optional<at::Tensor>& dlast, bool softplus) {
  const auto opt = u.options();
  const int64_t NL = s.nstate * s.length;
  auto du = at::empty({s.batch, s.dim, s.length}, opt);
  auto ddelta = at::empty({s.batch, s.dim, s.length}, opt);
  auto dz = at::empty({z ? s.batch : 0, s.dim, s.length}, opt);
  auto dA_part = at::empty({s.batch, s.dim, s.nstate}, opt);
  // dB, dC per channel group: (2, B, groups, N, L); with one group that is dB, dC themselves
  auto dBC = at::empty({2, s.batch, s.groups, s.nstate, s.length}, opt);
  auto dD_part = at::empty({D ? s.batch : 0, s.dim}, opt);
  auto dh0 = at::empty({h0 ? s.batch : 0, s.dim, s.nstate}, opt);
  BwdArgs<T> a(u, delta, A, B, C, D, z, h0, softplus);
  a.dy = View3<T>(dy);
  a.ckpt = s.ntiles > 1 ? ckpt.data_ptr<T>() : nullptr;
  a.dlast = dlast ? dlast->data_ptr<T>() : nullptr;
  a.du = du.data_ptr<T>();
  a.ddelta = ddelta.data_ptr<T>();
  a.dz = z ? dz.data_ptr<T>() : nullptr;
  a.dA_part = dA_part.data_ptr<T>();
  a.dBC = dBC.data_ptr<T>();
  a.dD_part = D ? dD_part.data_ptr<T>() : nullptr;
  a.dh0 = h0 ? dh0.data_ptr<T>() : nullptr;
  const int64_t ws_size = backward_workspace(s, W<T>);
  const int64_t part_size = 2 * ((s.nstate + Simd<T>::lanes - 1) / Simd<T>::lanes) * Simd<T>::lanes;
  at::parallel_for(0, s.batch * s.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> ws(ws_size);
    std::vector<typename Simd<T>::V> part(part_size, typename Simd<T>::V{});
    // blocks of item i: [first(i), first(i) + count(i)) of batch row i / groups
    const auto first = [&](int64_t i) { return (i % s.groups) * s.per_group; };
    const auto count = [&](int64_t i) { return std::min(s.nblocks, first(i) + s.per_group) - first(i); };
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / s.groups;
      T* dB_row = a.dBC + i * NL;
      T* dC_row = dB_row + s.batch * s.groups * NL;
      if (count(i) == 0) {  // dim 0: no blocks at all
        std::fill(dB_row, dB_row + NL, T(0));
        std::fill(dC_row, dC_row + NL, T(0));
      }
      for (int64_t k = 0; k < count(i); ++k) {
        const int64_t blk = first(i) + k;
        int64_t next = -1;  // global index b * nblocks + blk of the block that follows, for prefetching
        if (k + 1 < count(i))
          next = b * s.nblocks + blk + 1;
        else if (i + 1 < end && count(i + 1) > 0)  // the next item's first block
          next = (i + 1) / s.groups * s.nblocks + first(i + 1);
        backward_block(s, a, b, blk, next, dB_row, dC_row, k > 0, ws, part);
      }
    }
  });
  // cross-item sums in a fixed order (independent of the thread count)
  at::Tensor dB, dC;
  if (s.groups == 1) {
    dB = dBC[0].view({s.batch, s.nstate, s.length});
    dC = dBC[1].view({s.batch, s.nstate, s.length});
  } else {
    dB = at::empty({s.batch, s.nstate, s.length}, opt);
    dC = at::empty({s.batch, s.nstate, s.length}, opt);
    T* dBo = dB.data_ptr<T>();
    T* dCo = dC.data_ptr<T>();
    at::parallel_for(0, s.batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        for (int which = 0; which < 2; ++which) {
          const T* src = a.dBC + (which * s.batch + b) * s.groups * NL;
          T* dst = (which ? dCo : dBo) + b * NL;
          std::copy(src, src + NL, dst);
          for (int64_t gi = 1; gi < s.groups; ++gi)
            for (int64_t i = 0; i < NL; ++i) dst[i] += src[gi * NL + i];
        }
    });
  }
  const int64_t DN = s.dim * s.nstate;
  auto dA = at::zeros({s.dim, s.nstate}, opt);
  T* dAo = dA.data_ptr<T>();
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t i = 0; i < DN; ++i) dAo[i] += a.dA_part[b * DN + i];
  auto dD = at::zeros({D ? s.dim : 0}, opt);
  if (D) {
    T* dDo = dD.data_ptr<T>();
    for (int64_t b = 0; b < s.batch; ++b)
      for (int64_t i = 0; i < s.dim; ++i) dDo[i] += a.dD_part[b * s.dim + i];
  }
  return {du, ddelta, dA, dB, dC, dD, dz, dh0};
}

// -> du, ddelta, dA, dB, dC, dD (empty without D), dz (empty without z), dh0 (empty without h0)
Grads scan_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
               const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
               const std::optional<at::Tensor>& h0, const at::Tensor& ckpt, const at::Tensor& dy,
               const std::optional<at::Tensor>& dlast, int64_t tile, bool softplus) {
  check_inputs(u, delta, A, B, C, D, z, h0, tile);
  const bool dbl = u.scalar_type() == at::kDouble;
  const Shape s = dbl ? shape_of<double>(u, A, tile) : shape_of<float>(u, A, tile);
  TORCH_CHECK(dy.sizes() == u.sizes() && dy.scalar_type() == u.scalar_type(), "dy must be like u");
  const int64_t lanes = dbl ? W<double> : W<float>;
  TORCH_CHECK(s.ntiles <= 1 ||
                  (ckpt.is_contiguous() && ckpt.numel() == s.batch * s.nblocks * (s.ntiles - 1) * s.nstate * lanes),
              "checkpoints do not match the inputs (was the forward run with save=True and the same tile?)");
  if (dlast)
    TORCH_CHECK(dlast->is_contiguous() && dlast->scalar_type() == u.scalar_type() &&
                    dlast->sizes() == at::IntArrayRef({s.batch, s.dim, s.nstate}),
                "the last state's gradient must be contiguous (B, D, N) of u's dtype");
  return dbl ? run_bwd<double>(s, u, delta, A, B, C, D, z, h0, ckpt, dy, dlast, softplus)
             : run_bwd<float>(s, u, delta, A, B, C, D, z, h0, ckpt, dy, dlast, softplus);
}

// Which exp / 2^k code this build uses (the tests compare the portable build with the default one).
std::string variant() {
#ifdef DEFOCUS_CPU_AVX512
  return "avx512";
#else
  return "portable";
#endif
}

}  // namespace

TORCH_LIBRARY(DEFOCUS_CPU_NAMESPACE, m) {
  m.def("scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? h0, int tile, "
        "bool save, bool softplus) -> (Tensor, Tensor, Tensor)");
  m.def("scan_bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? h0, "
        "Tensor ckpt, Tensor dy, Tensor? dlast, int tile, bool softplus) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor, Tensor, Tensor)");
  m.def("variant", &variant);
}

TORCH_LIBRARY_IMPL(DEFOCUS_CPU_NAMESPACE, CPU, m) {
  m.impl("scan_fwd", &scan_fwd);
  m.impl("scan_bwd", &scan_bwd);
}
