// SIMD helpers shared by the fused CPU ops (selective_scan_cpu.cpp, mamba_cpu.cpp): a 64-byte vector
// type per float type, loads / stores / broadcasts, and a vectorised 2^x, exp, sigmoid and softplus.
#pragma once

#if defined(__AVX512F__) && !defined(DEFOCUS_CPU_GENERIC)
#include <immintrin.h>
#define DEFOCUS_CPU_AVX512 1
#endif

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace defocus_simd {

// SIMD through GCC/Clang vector extensions: one 64-byte vector (16 float32 / 8 float64 lanes) is
// one AVX-512 register, two AVX2 registers, four SSE / NEON registers; the compiler lowers it.
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  static constexpr int64_t lanes = 16;
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(64)));
  typedef int64_t I __attribute__((vector_size(64)));
  static constexpr int64_t lanes = 8;
};

template <typename T>
inline typename Simd<T>::V ld(const T* p) {
  typename Simd<T>::V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
inline void st(T* p, typename Simd<T>::V v) {
  std::memcpy(p, &v, sizeof v);
}

template <typename T>
inline typename Simd<T>::V splat(T x) {
  return typename Simd<T>::V{} + x;
}

constexpr double kLog2e = 1.4426950408889634074;

// 2^f on |f| <= 1/2: polynomials interpolating at Chebyshev nodes (near-minimax; truncation error
// 2.5e-9 in float32, 4e-18 in float64, below half an ulp), highest power first.
constexpr float kExp2Float[] = {1.5461444698569129083e-4f, 1.340042817761583794e-3f, 9.6180566785246380754e-3f,
                                5.5503272266703020589e-2f, 2.4022650922288758071e-1f, 6.9314720670283259577e-1f,
                                1.0f};
constexpr double kExp2Double[] = {4.455817908336064493e-10, 7.0741942972885210056e-9, 1.0178057087733941105e-7,
                                  1.3215432535912376166e-6, 1.5252733841556772589e-5, 1.5403530463724354209e-4,
                                  1.3333558146406470697e-3, 9.6181291075872566681e-3, 5.5504108664821627039e-2,
                                  2.4022650695910159567e-1, 6.9314718055994530925e-1, 1.0};

template <typename V, typename E, size_t M>
inline V horner(V f, const E (&c)[M]) {
  V p = splat(c[0]);
  for (size_t i = 1; i < M; ++i) p = p * f + c[i];
  return p;
}

inline Simd<float>::V exp2_poly(Simd<float>::V f) { return horner(f, kExp2Float); }
inline Simd<double>::V exp2_poly(Simd<double>::V f) { return horner(f, kExp2Double); }

// Round to nearest by the 1.5 * 2^mantissa trick: in x + kRoundMagic<E> the fraction bits fall off
// (|x| < 2^(mantissa - 1)), and round(x) then also sits in the low bits of the sum.
template <typename E>
constexpr E kRoundMagic = E(1.5) * E(int64_t{1} << (std::is_same_v<E, float> ? 23 : 52));

// 2^x = 2^k 2^f with k = round(x), f = x - k. NaN stays NaN.
#ifdef DEFOCUS_CPU_AVX512
// vscalef applies 2^k with correct overflow to inf and gradual underflow; the clamp keeps k finite
// (max / min return their second operand, x, when it is NaN).
inline Simd<float>::V vexp2(Simd<float>::V xv) {
  __m512 x = _mm512_min_ps(_mm512_set1_ps(1000.0f), _mm512_max_ps(_mm512_set1_ps(-1000.0f), (__m512)xv));
  const __m512 k = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 p = (__m512)exp2_poly((Simd<float>::V)_mm512_sub_ps(x, k));
  return (Simd<float>::V)_mm512_scalef_ps(p, k);
}

inline Simd<double>::V vexp2(Simd<double>::V xv) {
  __m512d x = _mm512_min_pd(_mm512_set1_pd(5000.0), _mm512_max_pd(_mm512_set1_pd(-5000.0), (__m512d)xv));
  const __m512d k = _mm512_roundscale_pd(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512d p = (__m512d)exp2_poly((Simd<double>::V)_mm512_sub_pd(x, k));
  return (Simd<double>::V)_mm512_scalef_pd(p, k);
}
#else
// Portable: k by kRoundMagic (read from the low bits of x + magic); 2^k applied as two factors
// 2^(k/2) so that results down to the subnormals and up to overflow come out right. x is clamped
// where 2^x has already underflowed / overflowed.
template <typename T>
struct Bits;  // IEEE layout: exponent bias, mantissa bits, 2^x underflows / overflows beyond lo / hi
template <>
struct Bits<float> {
  static constexpr int bias = 127, mantissa = 23;
  static constexpr float lo = -151.0f, hi = 129.0f;
};
template <>
struct Bits<double> {
  static constexpr int bias = 1023, mantissa = 52;
  static constexpr double lo = -1076.0, hi = 1025.0;
};

template <typename V>
inline V vexp2(V x) {
  using E = std::decay_t<decltype(x[0])>;
  using I = typename Simd<E>::I;
  using Bt = Bits<E>;
  x = x < splat(Bt::lo) ? splat(Bt::lo) : x;
  x = x > splat(Bt::hi) ? splat(Bt::hi) : x;
  const V magic = splat(kRoundMagic<E>);
  const V t = x + magic;
  const V kf = t - magic;
  const V p = exp2_poly(x - kf);
  const I k = (I)t - (I)magic;
  const I k1 = k >> 1, k2 = k - k1;
  return p * (V)((k1 + Bt::bias) << Bt::mantissa) * (V)((k2 + Bt::bias) << Bt::mantissa);
}
#endif

template <typename V>
inline V vsigmoid(V x) {
  using E = std::decay_t<decltype(x[0])>;
  return 1 / (1 + vexp2(x * E(-kLog2e)));
}

// e^x with the exponent split off exactly (Cody-Waite): k = round(x log2(e)), r = x - k ln(2) in two parts,
// e^x = 2^r log2(e) 2^k. vexp2(x log2(e)) alone rounds x log2(e) first: a relative error of about |x| ulp.
// x below -1000 gives 0 (it has underflowed long before); NaN stays NaN.
template <typename V>
inline V vexp(V x) {
  using E = std::decay_t<decltype(x[0])>;
  constexpr bool single = std::is_same_v<E, float>;
  const E ln2_hi = single ? E(0.693359375) : E(6.93147180369123816490e-01);  // few bits: k ln2_hi is exact
  const E ln2_lo = single ? E(-2.12194440e-4) : E(1.90821492927058770002e-10);
  x = x < splat(E(-1000)) ? splat(E(-1000)) : x;
  const V magic = splat(kRoundMagic<E>);
  const V k = (x * E(kLog2e) + magic) - magic;  // round to nearest (|x log2 e| < 2^22)
  const V r = (x - k * ln2_hi) - k * ln2_lo;
  return vexp2(r * E(kLog2e)) * vexp2(k);
}

// log(1 + e) for e in [0, 1]: 2 atanh(s) with s = e / (2 + e) in [0, 1/3] (straight from e, so no
// cancellation for small e), by its odd series 2 (s + s^3 / 3 + s^5 / 5 + ...). The first term left
// out is below 2e-9 of the sum in float32 (8 terms) and 2e-18 in float64 (17 terms).
template <typename V>
inline V log1p_unit(V e) {
  using E = std::decay_t<decltype(e[0])>;
  constexpr int terms = std::is_same_v<E, float> ? 8 : 17;
  const V s = e / (2 + e);
  const V s2 = s * s;
  V p = splat(E(1) / E(2 * terms - 1));
  for (int i = terms - 2; i >= 0; --i) p = p * s2 + E(1) / E(2 * i + 1);
  return 2 * s * p;
}

// softplus as torch computes it (beta 1, threshold 20): x itself above 20, else log(1 + e^x), here
// as max(x, 0) + log(1 + e^-|x|), which neither overflows nor loses small values. With `grad`, also its
// derivative as torch's backward takes it (1 above the threshold, else sigmoid(x)) from the same e^-|x|.
template <typename V>
inline V vsoftplus(V x, V* grad = nullptr) {
  using E = std::decay_t<decltype(x[0])>;
  const V zero = splat(E(0));
  const auto over = x > splat(E(20));
  const V e = vexp(x < zero ? x : -x);  // e^-|x|, in (0, 1]
  if (grad) {
    const V s = 1 / (1 + e);
    *grad = over ? splat(E(1)) : (x < zero ? e * s : s);
  }
  return over ? x : (x > zero ? x : zero) + log1p_unit(e);
}

}  // namespace defocus_simd
