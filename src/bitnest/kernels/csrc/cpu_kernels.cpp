// bitnest CPU kernels: matmul on packed weights, read in their canonical checkpoint layout
// (formats/packing.py: b-bit codes, LSB-first bit stream per row, rows padded to whole bytes).
//
//   affine     y[m,i] = Σ_g α'_ig Σ_{j∈g} (q_ij + o) x_mj − Σ_g α'_ig (z'_ig + o) S_mg
//              α' = α·2^shift and z' = z/2^shift (an r-bit slice of a c-bit grid; both exact in fp32),
//              S_mg = Σ_{j∈g} x_mj (summed in double once per call), o the offset the code→float trick adds
//   sign       y[m,i] = h_i Σ_j (1 − 2·bit_ij) g_j x_mj: the 1-bit affine grid α = −2, z = ½   (OneBit / BitNet)
//   codebook   y[m,i] = Σ_g s_ig Σ_{j∈g} T_ig[q_ij] x_mj
//   int8       acc[m,i] = Σ_j xq_mj wq_ij, exact int32                                      (integer-only layers)
// plus the conversions the runtime needs: dequantize rows to a dense tile (large batches multiply it with
// at::mm tile by tile), and slice c-bit codes to r bits and pack them (Matryoshka precision switch).
//
// Vector path (AVX-512 F/BW/VBMI; VNNI for int8): 64 b-bit codes are unpacked by vpermb (bytes k·b .. k·b+b−1,
// the 8 codes of qword lane k, into lane k) and vpmultishiftqb (byte i of a lane = the 8 stream bits from
// i·b − (7 − b)), which leaves code i at bits 7−b..6 of byte i. One ternary-logic op masks it and sets bit 7 to
// the low bit of the exponent 127 + b, and one masked vpermb per 16 codes moves the byte into byte 2 of a
// dword whose byte 3 holds the rest of the exponent: the fp32 bit pattern of exactly 2^b + q. So a code
// becomes a float in ~1.3 instructions and every product is an fp32 FMA: the result equals F.linear on the
// dequantized weight up to summation order (the offset o = 2^b cancels against o·S, costing ~2 bits at
// most). 8-bit codes are centred (q − 128, o = −128) and converted by vpmovsxbd + vcvtdq2ps.
// Plain loads are used wherever the 64 bytes lie inside the buffer: masked byte loads are several times
// slower on the CPUs we measure. AVX2 + FMA (x86 without AVX-512): the spread kernels at 256 bits, section
// "AVX2" below. Portable path: plain C++ (any CPU; the tests run it with simd=false).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#include <immintrin.h>
#define BITNEST_AVX512 1
#else
#define BITNEST_AVX512 0
#endif
// x86 without AVX-512 (Zen 2/3, most laptop and desktop CPUs): the same spread kernels at 256 bits
#if !BITNEST_AVX512 && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define BITNEST_AVX2 1
#else
#define BITNEST_AVX2 0
#endif

#ifndef BN_NUS
#define BN_NUS 2
#endif
#ifndef BN_SPLIT
#define BN_SPLIT 1
#endif
#ifndef BN_NR2
#define BN_NR2 1
#endif
#ifndef BN_PFH
#define BN_PFH _MM_HINT_T1  // into L2, not L1: Zen 4 (EPYC, 4096², batch 1, cold) int8 945 → 568 µs, int4 bf16 466 → 289
#endif
#ifndef BN_X1
#define BN_X1 24576  // bytes of one activation row's x that a decode pass keeps in L1 (see spread_rows)
#endif
#ifndef BN_PFD
#define BN_PFD 8192  // bytes ahead: 2 int8 rows of 4096; measured 2048 → 8192: int8 4096² cold 525 → 409 µs, others ±3 %
#endif
#define BN_INLINE __attribute__((always_inline)) inline

namespace {

using at::Tensor;
using c10::optional;

inline float h2f(at::Half h) { return static_cast<float>(h); }

// Code j of a row (b-bit LSB-first stream). Reads the byte after the code's first byte only when the code
// straddles it, which never leaves the row.
inline uint32_t code_at(const uint8_t* row, int64_t j, int b) {
  const int64_t bit = j * b;
  const int off = static_cast<int>(bit & 7);
  uint32_t v = row[bit >> 3];
  if (off + b > 8) v |= static_cast<uint32_t>(row[(bit >> 3) + 1]) << 8;
  return (v >> off) & ((1u << b) - 1u);
}

inline float dot_scalar(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += a[j] * b[j];
  return acc;
}

// Rows [begin, end): each thread first takes one contiguous share of 3/4 of the rows (what static scheduling
// would give it, so prefetch streams stay long), then the last quarter goes out in small chunks to whoever is
// free. A VM's vCPUs are not equal (one is often slower for a while): with at::parallel_for's static halves the
// whole call waits for the slow one (measured: layers 1.5–2× slower in such processes); here the faster thread
// takes more of the tail. Serial below `min_rows`.
template <class F>
void parallel_rows(int64_t begin, int64_t end, int64_t min_rows, const F& f) {
  const int64_t n = end - begin;
  const int nt = std::max(1, at::get_num_threads());
  if (nt == 1 || n <= 2 * min_rows) {
    f(begin, end);
    return;
  }
  std::atomic<int64_t> next{-1};
#pragma omp parallel num_threads(nt)
  {
#ifdef _OPENMP
    const int64_t T = omp_get_num_threads(), t = omp_get_thread_num();
#else
    const int64_t T = 1, t = 0;
#endif
    const int64_t share = (n * 3 / 4) / T, tail0 = begin + share * T;
    const int64_t chunk = std::max<int64_t>(min_rows, (end - tail0) / (4 * T) + 1);
    int64_t expected = -1;
    next.compare_exchange_strong(expected, tail0);  // the first thread here starts the tail counter
    if (share > 0) f(begin + t * share, begin + (t + 1) * share);
    for (int64_t i0 = next.fetch_add(chunk); i0 < end; i0 = next.fetch_add(chunk)) f(i0, std::min(end, i0 + chunk));
  }
}

// The smallest chunk worth a thread: ~256k multiply-adds (a hand-off costs more than that)
inline int64_t min_rows(int64_t work_per_row) { return std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(1, work_per_row)); }

#if BITNEST_AVX512
inline __m512i load64(const uint8_t* src, __mmask64 ld, const uint8_t* end) {
  return src + 64 <= end ? _mm512_loadu_si512(src) : _mm512_maskz_loadu_epi8(ld, src);
}

BN_INLINE __m128i lane128(__m512i v, int k) {
  switch (k) {
    case 0: return _mm512_castsi512_si128(v);
    case 1: return _mm512_extracti32x4_epi32(v, 1);
    case 2: return _mm512_extracti32x4_epi32(v, 2);
    default: return _mm512_extracti32x4_epi32(v, 3);
  }
}

// 64 b-bit codes -> 4 × 16 floats of (q + offset()), code k of the chunk in lane k % 16 of vector k / 16.
struct Codes64 {
  __m512i perm, shifts, mask, lowbit, expword, idx[4], centre;
  __mmask64 ld;
  int b;
  const uint8_t* end;  // one past the packed buffer
  Codes64(int bits, const uint8_t* buffer_end) : b(bits), end(buffer_end) {
    alignas(64) uint8_t p[64], s[64], ix[4][64];
    for (int k = 0; k < 8; ++k)
      for (int i = 0; i < 8; ++i) {
        p[8 * k + i] = static_cast<uint8_t>(std::min(k * b + i, 63));
        s[8 * k + i] = static_cast<uint8_t>((i * b - (7 - b) + 64) % 64);  // code i's LSB lands on bit 7 − b
      }
    for (int v = 0; v < 4; ++v)
      for (int d = 0; d < 16; ++d)
        for (int e = 0; e < 4; ++e) ix[v][4 * d + e] = static_cast<uint8_t>(16 * v + d);  // byte 2 of dword d
    perm = _mm512_load_si512(p);
    shifts = _mm512_load_si512(s);
    for (int v = 0; v < 4; ++v) idx[v] = _mm512_load_si512(ix[v]);
    const int exp = 127 + (b < 8 ? b : 0);
    mask = _mm512_set1_epi8(static_cast<char>(((1 << b) - 1) << (7 - std::min(b, 7))));
    lowbit = _mm512_set1_epi8(static_cast<char>((exp & 1) << 7));
    expword = _mm512_set1_epi32((exp >> 1) << 24);
    centre = _mm512_set1_epi8(static_cast<char>(0x80));
    ld = b == 8 ? ~0ULL : ((1ULL << (8 * b)) - 1ULL);
  }
  float offset() const { return b < 8 ? static_cast<float>(1 << b) : -128.f; }
  BN_INLINE void operator()(const uint8_t* src, __m512* w) const {
    const __m512i raw = load64(src, ld, end);
    if (b < 8) {
      __m512i v = _mm512_multishift_epi64_epi8(shifts, _mm512_permutexvar_epi8(perm, raw));
      v = _mm512_ternarylogic_epi64(v, mask, lowbit, 0xEA);  // (v & mask) | lowbit
      for (int k = 0; k < 4; ++k)
        w[k] = _mm512_castsi512_ps(_mm512_mask_permutexvar_epi8(expword, 0x4444444444444444ULL, idx[k], v));
    } else {
      const __m512i c = _mm512_xor_si512(raw, centre);  // q − 128 as a signed byte
      for (int k = 0; k < 4; ++k) w[k] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lane128(c, k)));
    }
  }
};

// 64 b-bit codes -> 64 bytes (plain unpack, for table look-ups)
struct Unpack64 {
  __m512i perm, shifts, mask;
  __mmask64 ld;
  int b;
  const uint8_t* end;
  Unpack64(int bits, const uint8_t* buffer_end) : b(bits), end(buffer_end) {
    alignas(64) uint8_t p[64], s[64];
    for (int k = 0; k < 8; ++k)
      for (int i = 0; i < 8; ++i) {
        p[8 * k + i] = static_cast<uint8_t>(std::min(k * b + i, 63));
        s[8 * k + i] = static_cast<uint8_t>(i * b);
      }
    perm = _mm512_load_si512(p);
    shifts = _mm512_load_si512(s);
    mask = _mm512_set1_epi8(static_cast<char>((1 << b) - 1));
    ld = b == 8 ? ~0ULL : ((1ULL << (8 * b)) - 1ULL);
  }
  BN_INLINE __m512i operator()(const uint8_t* src) const {
    const __m512i raw = load64(src, ld, end);
    if (b == 8) return raw;
    return _mm512_and_si512(_mm512_multishift_epi64_epi8(shifts, _mm512_permutexvar_epi8(perm, raw)), mask);
  }
};

template <typename T>
BN_INLINE void store16(T* dst, __m512 v) {
  if constexpr (std::is_same<T, float>::value) {
    _mm512_storeu_ps(dst, v);
  } else if constexpr (std::is_same<T, at::Half>::value) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
#if defined(__AVX512BF16__)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(v));
#else
    alignas(64) float t[16];
    _mm512_store_ps(t, v);
    for (int e = 0; e < 16; ++e) dst[e] = static_cast<T>(t[e]);
#endif
  }
}

inline __m512 sum_vectors(const __m512* v, int n) {
  __m512 s = v[0];
  for (int u = 1; u < n; ++u) s = _mm512_add_ps(s, v[u]);
  return s;
}
#endif

// ------------------------------------------------------------------------------------------ affine weights

struct Affine {
  const uint8_t* qw;      // (N, row_bytes)
  int64_t row_bytes, N, K;
  int b;                  // width of the stored codes
  const at::Half* scale;  // (R, G): α
  const at::Half* zero;   // (R, G): z on the parent grid, or nullptr (symmetric: z = zc)
  int64_t srow;           // scale row stride: G, or 0 for per-tensor
  int64_t gsz;            // group size along K (K for per-channel / per-tensor)
  float zc;               // implicit zero point (symmetric) on the parent grid
  float mult;             // 2^shift: codes are r-bit slices of a c-bit grid
  // Extra-precision bucket (CSR over rows): t = 2^r is stored as 2^r − 1, so ŵ_ij gains α'_ig at these j
  const int32_t* ep_rowptr = nullptr;
  const int32_t* ep_cols = nullptr;

  int64_t groups() const { return K / gsz; }
  float alpha(int64_t i, int64_t g) const { return h2f(scale[i * srow + g]) * mult; }
  float zprime(int64_t i, int64_t g) const { return (zero ? h2f(zero[i * srow + g]) : zc) / mult; }
  const uint8_t* row(int64_t i) const { return qw + i * row_bytes; }
  const uint8_t* end() const { return qw + N * row_bytes; }
  bool simd_ok() const { return BITNEST_AVX512 && K % 64 == 0 && gsz % 16 == 0; }
};

Affine affine_args(const Tensor& qweight, int64_t bits, int64_t K, const Tensor& scale, const optional<Tensor>& zero,
                   double zc, int64_t group_size, int64_t shift, const optional<Tensor>& ep_rowptr,
                   const optional<Tensor>& ep_cols) {
  TORCH_CHECK(qweight.dtype() == at::kByte && qweight.is_contiguous() && qweight.dim() == 2, "qweight: contiguous (N, bytes) uint8");
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits in 1..8");
  TORCH_CHECK(qweight.size(1) == (K * bits + 7) / 8, "qweight row length does not match K and bits");
  TORCH_CHECK(scale.dtype() == at::kHalf && scale.is_contiguous(), "scale: contiguous float16");
  Affine a;
  a.qw = qweight.data_ptr<uint8_t>();
  a.row_bytes = qweight.size(1);
  a.N = qweight.size(0);
  a.K = K;
  a.b = static_cast<int>(bits);
  a.scale = scale.data_ptr<at::Half>();
  a.zero = nullptr;
  if (zero.has_value() && zero->defined()) {
    TORCH_CHECK(zero->dtype() == at::kHalf && zero->is_contiguous() && zero->numel() == scale.numel(), "zero: float16 like scale");
    a.zero = zero->data_ptr<at::Half>();
  }
  a.gsz = group_size > 0 ? group_size : K;
  TORCH_CHECK(K % a.gsz == 0, "group size must divide K");
  TORCH_CHECK(scale.numel() == a.N * a.groups() || scale.numel() == 1, "scale has the wrong number of entries");
  a.srow = scale.numel() == 1 ? 0 : a.groups();
  a.zc = static_cast<float>(zc);
  a.mult = std::ldexp(1.0f, static_cast<int>(shift));
  if (ep_rowptr.has_value() && ep_rowptr->defined()) {
    TORCH_CHECK(ep_rowptr->dtype() == at::kInt && ep_rowptr->numel() == a.N + 1 && ep_cols.has_value() &&
                ep_cols->dtype() == at::kInt, "extra-precision lists: int32 row pointers (N + 1) and columns");
    a.ep_rowptr = ep_rowptr->data_ptr<int32_t>();
    a.ep_cols = ep_cols->data_ptr<int32_t>();
  }
  return a;
}

// S[m, g] = Σ_{j∈g} x[m, j], summed in double: o·S cancels against Σ (q + o) x, so S must carry no error of its own
std::vector<float> group_sums(const float* X, int64_t M, int64_t K, int64_t gsz) {
  const int64_t G = K / gsz;
  std::vector<float> S(M * G);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      double s = 0.0;
      const float* x = X + m * K + g * gsz;
      for (int64_t j = 0; j < gsz; ++j) s += x[j];
      S[m * G + g] = static_cast<float>(s);
    }
  return S;
}

// α'_g and the zero-point terms α'_g (z'_g + off) of row i, for every group (vectorized: these are per-row
// costs that would otherwise rival the matmul itself for short rows and small groups)
void row_params(const Affine& a, int64_t i, float off, float* alpha, float* zterm) {
  const int64_t G = a.groups();
  const at::Half* sc = a.scale + i * a.srow;
  const at::Half* ze = a.zero ? a.zero + i * a.srow : nullptr;
  const float inv = 1.0f / a.mult;  // a power of two: exact
  int64_t g = 0;
#if BITNEST_AVX512
  const __m512 vm = _mm512_set1_ps(a.mult), vi = _mm512_set1_ps(inv), vo = _mm512_set1_ps(off);
  for (; g < G; g += 16) {
    const __mmask16 k = G - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (G - g)) - 1u);
    const __m512 va = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, sc + g)), vm);
    const __m512 vz = ze ? _mm512_mul_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, ze + g)), vi) : _mm512_set1_ps(a.zc * inv);
    _mm512_mask_storeu_ps(alpha + g, k, va);
    _mm512_mask_storeu_ps(zterm + g, k, _mm512_mul_ps(va, _mm512_add_ps(vz, vo)));
  }
#elif BITNEST_AVX2
  const __m256 vm = _mm256_set1_ps(a.mult), vi = _mm256_set1_ps(inv), vo = _mm256_set1_ps(off);
  for (; g + 8 <= G; g += 8) {
    const __m256 va = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + g))), vm);
    const __m256 vz = ze ? _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ze + g))), vi)
                         : _mm256_set1_ps(a.zc * inv);
    _mm256_storeu_ps(alpha + g, va);
    _mm256_storeu_ps(zterm + g, _mm256_mul_ps(va, _mm256_add_ps(vz, vo)));
  }
#endif
  for (; g < G; ++g) {
    alpha[g] = h2f(sc[g]) * a.mult;
    zterm[g] = alpha[g] * ((ze ? h2f(ze[g]) : a.zc) * inv + off);
  }
}

inline float dot_f32(const float* a, const float* b, int64_t n) {
  int64_t j = 0;
  float s = 0.f;
#if BITNEST_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (; j + 16 <= n; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j), acc);
  s = _mm512_reduce_add_ps(acc);
#elif BITNEST_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
  alignas(32) float t[8];
  _mm256_store_ps(t, acc);
  s = ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
#endif
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

struct Codebook {
  const uint8_t* qw;
  int64_t row_bytes, N, K, gsz;
  int b;
  const at::Half* table;  // (Rt, Gt, 2^b)
  int64_t trow, tgrp;     // strides between tables (0 when shared)
  const at::Half* scale;  // (R, G) or nullptr
  int64_t srow;
  void table_at(int64_t i, int64_t g, float* T) const {
    const at::Half* t = table + (i * trow + g * tgrp) * (1 << b);
    for (int e = 0; e < (1 << b); ++e) T[e] = h2f(t[e]);
  }
  float scale_at(int64_t i, int64_t g) const { return scale ? h2f(scale[i * srow + g]) : 1.f; }
};

Codebook codebook_args(const Tensor& qweight, int64_t bits, int64_t K, const Tensor& table, const optional<Tensor>& scale,
                       int64_t group_size) {
  TORCH_CHECK(qweight.dtype() == at::kByte && qweight.is_contiguous() && qweight.size(1) == (K * bits + 7) / 8, "codebook qweight");
  TORCH_CHECK(table.dtype() == at::kHalf && table.is_contiguous() && table.dim() == 3 && table.size(2) == (1 << bits), "table");
  Codebook c;
  c.qw = qweight.data_ptr<uint8_t>();
  c.row_bytes = qweight.size(1);
  c.N = qweight.size(0);
  c.K = K;
  c.b = static_cast<int>(bits);
  c.gsz = group_size > 0 ? group_size : K;
  TORCH_CHECK(K % c.gsz == 0, "group size must divide K");
  const int64_t G = K / c.gsz;
  c.table = table.data_ptr<at::Half>();
  c.trow = table.size(0) == 1 ? 0 : table.size(1);
  c.tgrp = table.size(1) == 1 ? 0 : 1;
  TORCH_CHECK((table.size(0) == 1 || table.size(0) == c.N) && (table.size(1) == 1 || table.size(1) == G), "table shape");
  c.scale = nullptr;
  c.srow = 0;
  if (scale.has_value() && scale->defined()) {
    TORCH_CHECK(scale->dtype() == at::kHalf && scale->is_contiguous(), "codebook scale: float16");
    TORCH_CHECK(scale->numel() == 1 || scale->numel() == c.N * G, "codebook scale shape");
    c.scale = scale->data_ptr<at::Half>();
    c.srow = scale->numel() == 1 ? 0 : G;
  }
  return c;
}

void affine_rows_scalar(const Affine& a, const float* X, int64_t M, const float* S, float* Y, int64_t i0, int64_t i1) {
  const int64_t K = a.K, G = a.groups();
  std::vector<float> w(K);
  for (int64_t i = i0; i < i1; ++i) {
    const uint8_t* row = a.row(i);
    for (int64_t j = 0; j < K; ++j) w[j] = static_cast<float>(code_at(row, j, a.b));
    for (int64_t m = 0; m < M; ++m) {
      float y = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        const float al = a.alpha(i, g);
        y += al * dot_scalar(w.data() + g * a.gsz, X + m * K + g * a.gsz, a.gsz) - al * a.zprime(i, g) * S[m * G + g];
      }
      Y[m * a.N + i] = y;
    }
  }
}

#if BITNEST_AVX512
// ---- "spread" kernels: widths whose codes tile 32-bit lanes (b = 1, 2, 3, 4, 6, 8) -------------------------
// A block of 16 dwords (64 bytes; 48 for b = 3, 6, spread 3 bytes per dword by one vpermb) holds ND codes per
// dword. Code k of every dword becomes 16 floats with one shift and one ternary-logic op: shifted to bits
// 23−b..22 and OR'ed with the exponent 127 + b, the fp32 bit pattern is exactly 2^b + q. No shuffle in the
// inner loop, so the kernel keeps pace with memory. Vector k holds block elements d·ND + k (d = 0..15): x is
// permuted the same way once per call. Lane d's ND elements lie in one group whenever g is a multiple of ND,
// so groups smaller than a block are folded per block with a per-lane α vector.
template <int B>
struct Spread {
  static constexpr bool PERM = B == 3 || B == 6;
  static constexpr int ND = (PERM ? 24 : 32) / B;  // codes per dword
  static constexpr int BYTES = PERM ? 48 : 64;     // bytes per block
  static constexpr int E = 16 * ND;                // codes per block
  __m512i perm, mask, expc;
  __mmask64 ld;
  const uint8_t* end;
  explicit Spread(const uint8_t* buffer_end) : end(buffer_end) {
    alignas(64) uint8_t p[64];
    for (int d = 0; d < 16; ++d)
      for (int e = 0; e < 4; ++e) p[4 * d + e] = static_cast<uint8_t>(3 * d + std::min(e, 2));
    perm = _mm512_load_si512(p);
    mask = _mm512_set1_epi32(((1 << B) - 1) << (23 - B));
    expc = _mm512_set1_epi32((127 + B) << 23);
    ld = BYTES == 64 ? ~0ULL : ((1ULL << BYTES) - 1ULL);
  }
  BN_INLINE __m512i block(const uint8_t* src) const {
    const __m512i raw = load64(src, ld, end);
    return PERM ? _mm512_permutexvar_epi8(perm, raw) : raw;
  }
  template <int K>
  BN_INLINE __m512 code(__m512i dw) const {  // code K of every dword as fp32 2^b + q
    constexpr int sh = 23 - B - K * B;
    const __m512i v = sh >= 0 ? _mm512_slli_epi32(dw, sh) : _mm512_srli_epi32(dw, -sh);
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(v, mask, expc, 0xEA));  // (v & mask) | expc
  }
  static constexpr int STEPS = ND;  // vectors per block
  static constexpr int XE = E;      // floats of one block's activations, per activation row
  template <int K>
  static BN_INLINE __m512 madd(__m512 w, const float* xb, __m512 acc) {
    return _mm512_fmadd_ps(w, _mm512_loadu_ps(xb + 16 * K), acc);
  }
  template <int K>  // two weight rows against one activation load
  static BN_INLINE void madd2(__m512 w0, __m512 w1, const float* xb, __m512& acc0, __m512& acc1) {
    const __m512 x = _mm512_loadu_ps(xb + 16 * K);
    acc0 = _mm512_fmadd_ps(w0, x, acc0);
    acc1 = _mm512_fmadd_ps(w1, x, acc1);
  }
};

#if defined(__AVX512BF16__)
#define BN_PAIR 1
// bf16 activations, b = 1, 2, 3, 4: two codes of a dword, P and P + ND/2, become a pair of bf16 (code at bits
// 7−b..6 of each half, exponent 127 + b: exactly 2^b + q, which bf16's 8-bit significand holds for b ≤ 7) and one
// vdpbf16ps multiplies 32 of them with 32 bf16 activations. b = 1, 2, 4: the two codes lie 16 bits apart, so one
// shift and one ternary-logic op make the pair. b = 3: a dword holds 8 codes in 24 bits (vpermb, as Spread<3>), P
// and P + 4 lie 12 bits apart, so vpmultishiftqb moves each into place (a byte of a qword = the 8 bits from any
// offset of it, rotating) and the same ternary-logic op finishes: still two instructions per 32 weights.
// Products of two bf16 are exact in fp32 and are summed in fp32 (denormals flushed), so the result equals the
// fp32 kernel's on the same (bf16) activations up to summation order — with half the decode and FMA work.
// SPLIT: fp32 activations as two bf16, x ≈ hi + lo (both rounded to nearest: |x − hi − lo| ≤ 2^−18 |x|), each
// multiplied by the same decoded pair: two vdpbf16ps per 32 weights instead of two FMAs per 16 — for sign layers,
// whose spread decode was compute-bound, the relative error stays below fp32's tolerance (the 2^b + q ≤ 3 offset
// amplifies it at most 3×).
template <int B, bool SPLIT = false>
struct SpreadPair {
  static_assert(B >= 1 && B <= 4, "pairs: b = 1, 2, 3, 4");
  static constexpr bool PERM = B == 3;
  static constexpr int ND = (PERM ? 24 : 32) / B;
  static constexpr int BYTES = PERM ? 48 : 64;
  static constexpr int E = 16 * ND;
  static constexpr int STEPS = ND / 2;
  static constexpr int XE = SPLIT ? E : E / 2;  // a block's bf16 activations (hi, lo when split), counted in floats
  __m512i mask, expc, perm;
  __m512i ctrl[PERM ? ND / 2 : 1];   // b = 3: vpmultishiftqb offsets of step P (codes at bits 7−b..6)
  __m512i ictrl[PERM ? ND / 2 : 1];  // the same, codes at bits 0..2 (index<P>)
  __mmask64 ld;
  const uint8_t* end;
  explicit SpreadPair(const uint8_t* buffer_end) : end(buffer_end) {
    const uint32_t m = ((1u << B) - 1u) << (7 - B), e = (127u + B) << 7;
    mask = _mm512_set1_epi32(static_cast<int>(m | (m << 16)));
    expc = _mm512_set1_epi32(static_cast<int>(e | (e << 16)));
    alignas(64) uint8_t p[64];
    for (int d = 0; d < 16; ++d)
      for (int k = 0; k < 4; ++k) p[4 * d + k] = static_cast<uint8_t>(3 * d + std::min(k, 2));
    perm = _mm512_load_si512(p);
    ld = BYTES == 64 ? ~0ULL : ((1ULL << BYTES) - 1ULL);
    for (int P = 0; P < (PERM ? ND / 2 : 0); ++P) {
      alignas(64) uint8_t c[64];
      for (int byte = 0; byte < 64; ++byte) {  // byte 4l + 2h (+1) of dword l of a qword: code P + 4h, at bits 4..6
        const int lane = (byte / 4) % 2, half = (byte % 4) / 2;
        c[byte] = static_cast<uint8_t>((32 * lane + 3 * (P + 4 * half) - (7 - B) + 64) % 64);
      }
      ctrl[P] = _mm512_load_si512(c);
      for (int byte = 0; byte < 64; ++byte) c[byte] = static_cast<uint8_t>((c[byte] + 7 - B) % 64);
      ictrl[P] = _mm512_load_si512(c);
    }
  }
  BN_INLINE __m512i block(const uint8_t* src) const {
    const __m512i raw = load64(src, ld, end);
    return PERM ? _mm512_permutexvar_epi8(perm, raw) : raw;
  }
  template <int P>
  BN_INLINE __m512 code(__m512i dw) const {
    __m512i v;
    if constexpr (PERM) {
      v = _mm512_multishift_epi64_epi8(ctrl[P], dw);
    } else {
      constexpr int sh = 7 - B - P * B;
      v = sh >= 0 ? _mm512_slli_epi32(dw, sh) : _mm512_srli_epi32(dw, -sh);
    }
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(v, mask, expc, 0xEA));
  }
  template <int P>  // codes P and P + ND/2 at bits 0..b−1 of the two 16-bit halves (other bits: the next codes)
  BN_INLINE __m512i index(__m512i dw) const {
    if constexpr (PERM) return _mm512_multishift_epi64_epi8(ictrl[P], dw);
    else return P == 0 ? dw : _mm512_srli_epi32(dw, P * B);
  }
  template <int P>
  static BN_INLINE __m512 madd(__m512 w, const float* xb, __m512 acc) {
    const __m512bh wb = (__m512bh)_mm512_castps_si512(w);
    if constexpr (SPLIT) {  // hi words of step P, then its lo words
      acc = _mm512_dpbf16_ps(acc, wb, (__m512bh)_mm512_loadu_si512(xb + 32 * P));
      return _mm512_dpbf16_ps(acc, wb, (__m512bh)_mm512_loadu_si512(xb + 32 * P + 16));
    }
    return _mm512_dpbf16_ps(acc, wb, (__m512bh)_mm512_loadu_si512(xb + 16 * P));
  }
  template <int P>
  static BN_INLINE void madd2(__m512 w0, __m512 w1, const float* xb, __m512& acc0, __m512& acc1) {
    const __m512bh b0 = (__m512bh)_mm512_castps_si512(w0), b1 = (__m512bh)_mm512_castps_si512(w1);
    if constexpr (SPLIT) {
      const __m512bh hi = (__m512bh)_mm512_loadu_si512(xb + 32 * P), lo = (__m512bh)_mm512_loadu_si512(xb + 32 * P + 16);
      acc0 = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc0, b0, hi), b0, lo);
      acc1 = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc1, b1, hi), b1, lo);
    } else {
      const __m512bh x = (__m512bh)_mm512_loadu_si512(xb + 16 * P);
      acc0 = _mm512_dpbf16_ps(acc0, b0, x);
      acc1 = _mm512_dpbf16_ps(acc1, b1, x);
    }
  }
};
#else
#define BN_PAIR 0
#endif

// x (M, K) -> block-major, the order of the spread vectors: xp[(β·M + m)·E + 16k + d] = x[m, β·E + d·ND + k].
// A block's activations for all M rows are contiguous, so the kernel addresses them with one base pointer and
// compile-time offsets.
std::vector<float> spread_x(const float* X, int64_t M, int64_t K, int nd) {
  std::vector<float> xp(M * K);
  const int64_t E = 16 * nd;
  for (int64_t b0 = 0; b0 < K / E; ++b0)
    for (int64_t m = 0; m < M; ++m) {
      float* o = xp.data() + (b0 * M + m) * E;
      const float* x = X + m * K + b0 * E;
      for (int k = 0; k < nd; ++k)
        for (int d = 0; d < 16; ++d) o[16 * k + d] = x[d * nd + k];
    }
  return xp;
}

#if BN_PAIR
// bf16 x (M, K) -> the pair layout: 32-bit word (16P + d) of block β, row m holds x[m, β·E + d·ND + P] (low half)
// and x[m, β·E + d·ND + P + ND/2] (high half), the codes one shift of a dword puts there.
std::vector<float> spread_x_pair(const uint16_t* X, int64_t M, int64_t K, int nd) {
  std::vector<float> xp(M * K / 2);
  uint16_t* o16 = reinterpret_cast<uint16_t*>(xp.data());
  const int64_t E = 16 * nd;
  for (int64_t b0 = 0; b0 < K / E; ++b0)
    for (int64_t m = 0; m < M; ++m) {
      uint16_t* o = o16 + (b0 * M + m) * E;
      const uint16_t* x = X + m * K + b0 * E;
      for (int p = 0; p < nd / 2; ++p)
        for (int d = 0; d < 16; ++d) {
          o[32 * p + 2 * d] = x[d * nd + p];
          o[32 * p + 2 * d + 1] = x[d * nd + p + nd / 2];
        }
    }
  return xp;
}

// fp32 x (M, K) -> the split pair layout: per block β, row m and step P, 16 words of hi = bf16(x) and then 16 of
// lo = bf16(x − hi), each word pairing elements d·ND + P and d·ND + P + ND/2 as spread_x_pair does
std::vector<float> spread_x_pair_split(const float* X, int64_t M, int64_t K, int nd) {
  std::vector<float> xp(M * K);
  uint16_t* o16 = reinterpret_cast<uint16_t*>(xp.data());
  const int64_t E = 16 * nd;
  for (int64_t b0 = 0; b0 < K / E; ++b0)
    for (int64_t m = 0; m < M; ++m) {
      uint16_t* o = o16 + (b0 * M + m) * 2 * E;
      const float* x = X + m * K + b0 * E;
      for (int p = 0; p < nd / 2; ++p)
        for (int d = 0; d < 16; ++d)
          for (int half = 0; half < 2; ++half) {
            const float v = x[d * nd + p + half * (nd / 2)];
            const at::BFloat16 hi(v);  // rounded to nearest even
            o[64 * p + 2 * d + half] = hi.x;
            o[64 * p + 32 + 2 * d + half] = at::BFloat16(v - static_cast<float>(hi)).x;
          }
    }
  return xp;
}
#endif

// Decoders: one weight format as the spread kernel sees it — per-row state, the per-group fold factor, and
// how code K of every dword becomes 16 floats.
template <int B_, class SP_ = Spread<B_>>
struct AffineDec {  // ŵ = α'((2^b + q) − (z' + 2^b)): accumulate Σ (2^b + q) x, fold α' per group, subtract the z terms
  static constexpr int B = B_;
  using SP = SP_;
  const Affine& a;
  const SP sp;
  std::vector<float> alpha, zterm;  // of the current row
  explicit AffineDec(const Affine& a_) : a(a_), sp(a_.end()), alpha(a_.groups() + 16), zterm(a_.groups() + 16) {}
  int64_t K() const { return a.K; }
  int64_t N() const { return a.N; }
  int64_t gsz() const { return a.gsz; }
  const uint8_t* row(int64_t i) const { return a.row(i); }
  int64_t row_bytes() const { return a.row_bytes; }
  bool whole() const { return a.gsz == a.K; }  // per channel / tensor: α' once, at the end
  bool tables_per_group() const { return false; }
  void load_row(int64_t i) { row_params(a, i, static_cast<float>(1 << B), alpha.data(), zterm.data()); }
  void group_start(int64_t, int64_t) {}
  const float* scales() const { return alpha.data(); }
  template <int K_>
  BN_INLINE __m512 decode(__m512i dw) const { return sp.template code<K_>(dw); }
  float finish(int64_t m, float y, const float* S) const {
    const int64_t G = a.groups();
    return (whole() ? alpha[0] * y : y) - dot_f32(zterm.data(), S + m * G, G);
  }
};

#if BN_PAIR
template <int B, bool PAIR> struct CodebookSP { using type = std::conditional_t<PAIR, SpreadPair<B>, Spread<B>>; };
#else
template <int B, bool PAIR> struct CodebookSP { using type = Spread<B>; };
#endif

// ŵ = s · T[q]: code K of a dword, shifted down, indexes a table held in one register (vpermps: its 2^b entries
// repeated to 16). PAIR (bf16 activations): the table as 32 bf16 (repeated; vpermw reads 5 index bits), both codes
// of a pair looked up at once and multiplied by vdpbf16ps, as the affine pair kernels do; T is rounded to bf16, as
// the prefill tiles round the dequantized weight, and the scales apply in fp32 at each fold.
template <int B_, bool PAIR = false>
struct CodebookDec {
  static constexpr int B = B_;
  using SP = typename CodebookSP<B, PAIR>::type;
  const Codebook& c;
  const SP sp;
  std::conditional_t<PAIR, __m512i, __m512> T;  // the current table
  std::vector<float> s;                          // the current row's scales
  explicit CodebookDec(const Codebook& c_) : c(c_), sp(c_.qw + c_.N * c_.row_bytes), s(c_.K / c_.gsz + 16, 1.f) {}
  int64_t K() const { return c.K; }
  int64_t N() const { return c.N; }
  int64_t gsz() const { return c.gsz; }
  const uint8_t* row(int64_t i) const { return c.qw + i * c.row_bytes; }
  int64_t row_bytes() const { return c.row_bytes; }
  bool whole() const { return c.scale == nullptr && !tables_per_group(); }
  bool tables_per_group() const { return c.tgrp != 0; }
  void load_table(int64_t i, int64_t g) {
    float e[16];
    c.table_at(i, g, e);
    if constexpr (PAIR) {
      alignas(64) uint16_t t[32];
      for (int l = 0; l < 32; ++l) t[l] = at::BFloat16(e[l % (1 << B)]).x;
      T = _mm512_load_si512(t);
    } else {
      alignas(64) float t[16];
      for (int l = 0; l < 16; ++l) t[l] = e[l % (1 << B)];
      T = _mm512_load_ps(t);
    }
  }
  void load_row(int64_t i) {
    if (!tables_per_group()) load_table(i, 0);
    if (c.scale)
      for (int64_t g = 0; g < c.K / c.gsz; ++g) s[g] = c.scale_at(i, g);
  }
  void group_start(int64_t i, int64_t g) {
    if (tables_per_group()) load_table(i, g);
  }
  const float* scales() const { return s.data(); }
  template <int K_>
  BN_INLINE __m512 decode(__m512i dw) const {
    if constexpr (PAIR) return _mm512_castsi512_ps(_mm512_permutexvar_epi16(sp.template index<K_>(dw), T));
    else return _mm512_permutexvar_ps(_mm512_srli_epi32(dw, K_ * B), T);
  }
  float finish(int64_t, float y, const float*) const { return y; }
};

// Code K_ (and the ones after it) of GU blocks (consecutive groups of one weight row; GU = 1: one block) against
// the activations: block u's at xb + u·ustride, row m at + m·XE. GU > 1 gives GU independent FMA chains: one
// accumulator per group leaves a chain of ND dependent FMAs per block, longer than the block's decode work;
// interleaving two groups hides it (int4 g128 4096², batch 1: see BN_GU).
template <class D, int MB, int NU, int GU, int K_>
BN_INLINE void spread_blocks(const D& d, const __m512i (&dw)[GU], const float* xb, int64_t ustride,
                             __m512 (&acc)[GU][MB][NU]) {
  for (int u = 0; u < GU; ++u) {
    const __m512 w = d.template decode<K_>(dw[u]);
    for (int m = 0; m < MB; ++m)
      acc[u][m][K_ % NU] = D::SP::template madd<K_>(w, xb + u * ustride + m * D::SP::XE, acc[u][m][K_ % NU]);
  }
  if constexpr (K_ + 1 < D::SP::STEPS) spread_blocks<D, MB, NU, GU, K_ + 1>(d, dw, xb, ustride, acc);
}

// Code K_ (and the ones after it) of one block of two weight rows (decoders d0, d1) against MB activation rows:
// each activation vector is loaded once for both rows
template <class D, int MB, int K_>
BN_INLINE void spread_blocks2(const D& d0, const D& d1, __m512i dw0, __m512i dw1, const float* xb,
                              __m512 (&acc)[2][MB]) {
  const __m512 w0 = d0.template decode<K_>(dw0), w1 = d1.template decode<K_>(dw1);
  for (int m = 0; m < MB; ++m) D::SP::template madd2<K_>(w0, w1, xb + m * D::SP::XE, acc[0][m], acc[1][m]);
  if constexpr (K_ + 1 < D::SP::STEPS) spread_blocks2<D, MB, K_ + 1>(d0, d1, dw0, dw1, xb, acc);
}

#ifndef BN_GU
#define BN_GU 2
#endif

#if BN_PAIR
template <class SP> constexpr bool PAIR3 = std::is_same_v<SP, SpreadPair<3>>;
#else
template <class SP> constexpr bool PAIR3 = false;
#endif

template <class D>
struct SpreadKernel {
  using SP = typename D::SP;
  D& d;
  const int64_t nblocks, bpg, gpb;  // blocks per group (groups ≥ a block), groups per block (smaller groups)
  const bool whole;
  int64_t pfd = BN_PFD;  // software prefetch: bytes ahead of the block being read (spread_rows sets it for segments)
  __m512i lane_idx;
  explicit SpreadKernel(D& d_)
      : d(d_), nblocks(d_.K() / SP::E), bpg(d_.gsz() % SP::E == 0 ? d_.gsz() / SP::E : 1),
        gpb(d_.gsz() % SP::E == 0 ? 0 : SP::E / d_.gsz()), whole(d_.whole()) {
    alignas(64) int32_t lane_group[16];  // lane d's group relative to its block's first group
    for (int l = 0; l < 16; ++l) lane_group[l] = static_cast<int32_t>((l * SP::ND) / d.gsz());
    lane_idx = _mm512_load_si512(lane_group);
  }
  // Segment unit: a segment holds whole groups (or whole blocks, for groups smaller than a block)
  int64_t unit() const { return whole || gpb ? SP::E : d.gsz(); }
  // Y[m, i] += Σ over blocks [blk0, blk1) of weight row i · x rows m0..m0+MB, folded per group unless whole
  // STEP > 0: the blocks per group known at compile time (1 or 2, the common grouped layouts), so the block loop
  // unrolls into the group loop — a runtime trip count left a loop entry, exit and constant reloads per group,
  // which made grouped layers compute-bound at ~2× the per-channel time.
  template <int MB, int NU, bool PER_BLOCK, int STEP = 0, int GU = 1>
  void run(int64_t i, const float* XP, int64_t M, float* Y, int64_t m0, int64_t blk0, int64_t blk1) {
    const int64_t step = STEP > 0 ? STEP : (whole ? blk1 - blk0 : bpg), xstride = M * SP::XE;
    const uint8_t* row = d.row(i);
    const float* Xm = XP + m0 * SP::XE;
    __m512 tot[GU][MB];
    for (int u = 0; u < GU; ++u) for (int m = 0; m < MB; ++m) tot[u][m] = _mm512_setzero_ps();
    int64_t g = PER_BLOCK ? blk0 * gpb : blk0 / bpg;
    auto fold = [&](__m512 (&acc)[MB][NU], __m512 (&t)[MB]) {  // Σ of one group (one block when PER_BLOCK) into t
      if (whole) {
        for (int m = 0; m < MB; ++m) t[m] = _mm512_add_ps(t[m], sum_vectors(acc[m], NU));
      } else {
        const __m512 vs = PER_BLOCK ? _mm512_permutexvar_ps(lane_idx, _mm512_loadu_ps(d.scales() + g))
                                    : _mm512_set1_ps(d.scales()[g]);
        g += PER_BLOCK ? gpb : 1;
        for (int m = 0; m < MB; ++m) t[m] = _mm512_fmadd_ps(vs, sum_vectors(acc[m], NU), t[m]);
      }
    };
    int64_t b0 = blk0;
    if constexpr (GU > 1) {  // GU groups at once (STEP blocks each; their tables never change: no group_start)
      for (; b0 + GU * STEP <= blk1; b0 += GU * STEP) {
        __m512 acc[GU][MB][NU];
        for (int u = 0; u < GU; ++u) for (int m = 0; m < MB; ++m) for (int v = 0; v < NU; ++v) acc[u][m][v] = _mm512_setzero_ps();
        for (int s = 0; s < STEP; ++s) {
          __m512i dw[GU];
          for (int u = 0; u < GU; ++u) {
            const int64_t blk = b0 + u * STEP + s;
            _mm_prefetch(reinterpret_cast<const char*>(row + blk * SP::BYTES + pfd), BN_PFH);
            dw[u] = d.sp.block(row + blk * SP::BYTES);
          }
          spread_blocks<D, MB, NU, GU, 0>(d, dw, Xm + (b0 + s) * xstride, STEP * xstride, acc);
        }
        for (int u = 0; u < GU; ++u) fold(acc[u], tot[u]);
      }
    }
    for (; b0 < blk1; b0 += step) {  // one group (one block when PER_BLOCK)
      if (!whole && !PER_BLOCK) d.group_start(i, g);
      __m512 acc[1][MB][NU];
      for (int m = 0; m < MB; ++m) for (int u = 0; u < NU; ++u) acc[0][m][u] = _mm512_setzero_ps();
      for (int64_t blk = b0; blk < b0 + step; ++blk) {
        _mm_prefetch(reinterpret_cast<const char*>(row + blk * SP::BYTES + pfd), BN_PFH);
        const __m512i dw[1] = {d.sp.block(row + blk * SP::BYTES)};
        spread_blocks<D, MB, NU, 1, 0>(d, dw, Xm + blk * xstride, 0, acc);
      }
      fold(acc[0], tot[0]);
    }
    for (int u = 1; u < GU; ++u) for (int m = 0; m < MB; ++m) tot[0][m] = _mm512_add_ps(tot[0][m], tot[u][m]);
    for (int m = 0; m < MB; ++m) Y[(m0 + m) * d.N() + i] += _mm512_reduce_add_ps(tot[0][m]);
  }
  // run() for weight rows i (decoder d) and i + 1 (d1), one accumulator per (row, activation row): each activation
  // vector loaded from L1 feeds two FMAs. Several activation rows (MB ≥ 4): one load per FMA kept the load port
  // as busy as the FMA pipes.
  template <int MB, bool PER_BLOCK, int STEP = 0>
  void run2(D& d1, int64_t i, const float* XP, int64_t M, float* Y, int64_t m0, int64_t blk0, int64_t blk1) {
    const int64_t step = STEP > 0 ? STEP : (whole ? blk1 - blk0 : bpg), xstride = M * SP::XE;
    const uint8_t* row0 = d.row(i);
    const uint8_t* row1 = d1.row(i + 1);
    const float* Xm = XP + m0 * SP::XE;
    __m512 tot[2][MB];
    for (int r = 0; r < 2; ++r) for (int m = 0; m < MB; ++m) tot[r][m] = _mm512_setzero_ps();
    int64_t g = PER_BLOCK ? blk0 * gpb : blk0 / bpg;
    for (int64_t b0 = blk0; b0 < blk1; b0 += step) {  // one group (one block when PER_BLOCK)
      if (!whole && !PER_BLOCK) {
        d.group_start(i, g);
        d1.group_start(i + 1, g);
      }
      __m512 acc[2][MB];
      for (int r = 0; r < 2; ++r) for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
      for (int64_t blk = b0; blk < b0 + step; ++blk) {
        _mm_prefetch(reinterpret_cast<const char*>(row0 + blk * SP::BYTES + pfd), BN_PFH);
        _mm_prefetch(reinterpret_cast<const char*>(row1 + blk * SP::BYTES + pfd), BN_PFH);
        spread_blocks2<D, MB, 0>(d, d1, d.sp.block(row0 + blk * SP::BYTES), d1.sp.block(row1 + blk * SP::BYTES),
                                 Xm + blk * xstride, acc);
      }
      if (whole) {
        for (int r = 0; r < 2; ++r) for (int m = 0; m < MB; ++m) tot[r][m] = _mm512_add_ps(tot[r][m], acc[r][m]);
      } else {
        const __m512 v0 = PER_BLOCK ? _mm512_permutexvar_ps(lane_idx, _mm512_loadu_ps(d.scales() + g))
                                    : _mm512_set1_ps(d.scales()[g]);
        const __m512 v1 = PER_BLOCK ? _mm512_permutexvar_ps(lane_idx, _mm512_loadu_ps(d1.scales() + g))
                                    : _mm512_set1_ps(d1.scales()[g]);
        g += PER_BLOCK ? gpb : 1;
        for (int m = 0; m < MB; ++m) {
          tot[0][m] = _mm512_fmadd_ps(v0, acc[0][m], tot[0][m]);
          tot[1][m] = _mm512_fmadd_ps(v1, acc[1][m], tot[1][m]);
        }
      }
    }
    for (int m = 0; m < MB; ++m) {
      Y[(m0 + m) * d.N() + i] += _mm512_reduce_add_ps(tot[0][m]);
      Y[(m0 + m) * d.N() + i + 1] += _mm512_reduce_add_ps(tot[1][m]);
    }
  }
  template <int MB, bool PER_BLOCK>
  BN_INLINE void go2(D& d1, int64_t i, const float* XP, int64_t M, float* Y, int64_t m0, int64_t blk0, int64_t blk1) {
    if (!whole && (PER_BLOCK || bpg == 1)) run2<MB, PER_BLOCK, 1>(d1, i, XP, M, Y, m0, blk0, blk1);
    else if (!whole && bpg == 2) run2<MB, PER_BLOCK, 2>(d1, i, XP, M, Y, m0, blk0, blk1);
    else run2<MB, PER_BLOCK>(d1, i, XP, M, Y, m0, blk0, blk1);
  }
  // run() with the group loop specialised for one or two blocks per group; groups interleaved GU at a time where
  // the pass holds few activation rows (registers) and the tables are fixed per row
  template <int MB, int NU, bool PER_BLOCK>
  BN_INLINE void go(int64_t i, const float* XP, int64_t M, float* Y, int64_t m0, int64_t blk0, int64_t blk1) {
    // b = 3, 2 with fp32 FMAs: ±5 % either way (Zen 4), so not there; b = 3 in pairs (4 vdpbf16ps per block):
    // int3 g128 4096², bf16, batch 1: GU = 1 ran 1.14× the fp32-FMA kernel
    constexpr int GU = MB <= 2 && (D::B == 4 || PAIR3<typename D::SP>) ? BN_GU : 1;
    const bool inter = GU > 1 && !d.tables_per_group();
    if (!whole && (PER_BLOCK || bpg == 1)) {
      if (inter) run<MB, NU, PER_BLOCK, 1, GU>(i, XP, M, Y, m0, blk0, blk1);
      else run<MB, NU, PER_BLOCK, 1>(i, XP, M, Y, m0, blk0, blk1);
    } else if (!whole && bpg == 2) {
      if (inter) run<MB, NU, PER_BLOCK, 2, GU>(i, XP, M, Y, m0, blk0, blk1);
      else run<MB, NU, PER_BLOCK, 2>(i, XP, M, Y, m0, blk0, blk1);
    } else {
      run<MB, NU, PER_BLOCK>(i, XP, M, Y, m0, blk0, blk1);
    }
  }
};

// Rows [i0, i1). x is cut into K-segments (all M activation rows of a segment: ≈ 24 KB, in L1, below 8 rows;
// ≈ 256 KB, in L2, from 8) and every weight row of the range is run against a segment before the next one: each
// weight byte is read once. From 8 activation rows weight rows go in pairs against blocks of 8 activation rows;
// the rest in whole blocks of 8, 4, 2, 1 (no runtime bounds in the inner loop); one row (decode) takes a single
// segment, except as below.
template <class D, bool PER_BLOCK>
void spread_rows(D& d, const float* XP, int64_t M, const float* S, float* Y, int64_t i0, int64_t i1) {
  constexpr int ST = D::SP::STEPS, N1 = ST >= 8 ? 8 : ST;
  SpreadKernel<D> kr(d);
  const int64_t E = D::SP::E, unit = kr.unit(), N = d.N();
  // M·seg floats ≈ 24 KB (L1) below 8 rows; from 8 rows (pairs of weight rows, half the activation loads) ≈ 256 KB
  // (L2): a segment of a few blocks left the per-segment folds and horizontal sums a third of the work. Measured
  // interleaved, 4096², 16 rows, L2-sized vs L1-sized segments (with weight-row pairs in both): 0.70–0.85× the
  // time (int3, int3 g128, nf4 g64, int4, int8; fp32 and bf16); at 4 rows L2-sized segments were 1.1–1.7× slower
  int64_t seg = std::max<int64_t>(unit, ((BN_NR2 && M >= 8 ? 65536 : 6144) / M) / unit * unit);
  // fewer accumulators: cheaper folds. One per group of whole blocks (no adds before the fold: int3 g128 4096²
  // 367 → 325 µs, int4 g128 369 → 343 cold), two when a block holds several groups (int2 g64: equal)
  const bool short_groups = !kr.whole && kr.bpg < 4;
  int64_t blk0_ = 0, blk1_ = 0;  // the current segment's blocks
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t m = 0; m < M; ++m) Y[m * N + i] = 0.f;
  // One row (decode), b = 2 or 4, x past BN_X1 bytes (K > 6144 in fp32): L1-sized segments. These
  // decode faster than L2 feeds them one x float per weight (warm, 2 threads: int4 fp32 1840 µs at 4096×11008 with
  // 43 KB of x per row against 1150 at 11008×4096; bf16 pairs, 22 KB, 823 vs 918). Cold 4096×11008, 4 runs
  // (bench/kernel_ab.py): int4 0.60–0.96× the time, int2 0.72–0.98×; grouped rows too (cold 4096×11008
  // fp32, 3 runs: int4 g128 0.62–0.66×, int2 g64 0.83–0.84×). Not b = 3 (0.88–1.12×; int3 g128
  // 1.00–1.07×), int8 (memory-bound: 1.12–1.78×). In segments a row is read a piece at a time, so the prefetch runs
  // rows ahead at the same offset.
  const int64_t seg1 = std::max<int64_t>(unit, BN_X1 / (4 * D::SP::XE / E) / unit * unit);
  const bool pieces = M == 1 && (D::B == 2 || D::B == 4) && d.K() > seg1;
  if (pieces) {
    const int64_t nseg = (d.K() + seg1 - 1) / seg1;  // segments of equal size (K = 11008 fp32: 2 × 5504)
    seg = ((d.K() + nseg - 1) / nseg + unit - 1) / unit * unit;
    const int64_t piece = seg / E * D::SP::BYTES;  // bytes of a row per segment
    kr.pfd = (BN_PFD + piece - 1) / piece * d.row_bytes();
  }
  if (M == 1 && !pieces) {  // decode: one segment; finish each row while its parameters are loaded
    for (int64_t i = i0; i < i1; ++i) {
      d.load_row(i);
      if (short_groups) kr.template go<1, PER_BLOCK ? 2 : 1, PER_BLOCK>(i, XP, M, Y, 0, 0, kr.nblocks);
      else kr.template go<1, N1, PER_BLOCK>(i, XP, M, Y, 0, 0, kr.nblocks);
      Y[i] = d.finish(0, Y[i], S);
    }
    return;
  }
  auto rest = [&](int64_t i, int64_t m0) {  // row i (loaded in d) against activation rows [m0, M)
    for (; m0 + 8 <= M; m0 += 8) kr.template go<8, 1, PER_BLOCK>(i, XP, M, Y, m0, blk0_, blk1_);
    if (m0 + 4 <= M) { kr.template go<4, 2, PER_BLOCK>(i, XP, M, Y, m0, blk0_, blk1_); m0 += 4; }
    if (m0 + 2 <= M) { kr.template go<2, 4, PER_BLOCK>(i, XP, M, Y, m0, blk0_, blk1_); m0 += 2; }
    if (m0 < M) {
      if (short_groups) kr.template go<1, PER_BLOCK ? 2 : 1, PER_BLOCK>(i, XP, M, Y, m0, blk0_, blk1_);
      else kr.template go<1, N1, PER_BLOCK>(i, XP, M, Y, m0, blk0_, blk1_);
    }
  };
  D d1 = d;  // the second row of a pair
  for (int64_t k0 = 0; k0 < d.K(); k0 += seg) {
    blk0_ = k0 / E;
    blk1_ = std::min(d.K(), k0 + seg) / E;
    int64_t i = i0;
    if (BN_NR2 && M >= 8)  // pairs of weight rows against the activation rows in blocks of 8, then the rest
      for (; i + 1 < i1; i += 2) {
        d.load_row(i);
        d1.load_row(i + 1);
        int64_t m0 = 0;
        for (; m0 + 8 <= M; m0 += 8) kr.template go2<8, PER_BLOCK>(d1, i, XP, M, Y, m0, blk0_, blk1_);
        if (m0 < M) {
          rest(i, m0);
          d.load_row(i + 1);
          rest(i + 1, m0);
        }
      }
    for (; i < i1; ++i) {
      d.load_row(i);
      rest(i, 0);
    }
  }
  for (int64_t i = i0; i < i1; ++i) {
    d.load_row(i);
    for (int64_t m = 0; m < M; ++m) Y[m * N + i] = d.finish(m, Y[m * N + i], S);
  }
}

template <class D>
void spread_dispatch(D& d, const float* XP, int64_t M, const float* S, float* Y, int64_t i0, int64_t i1) {
  if (d.gsz() % D::SP::E == 0) spread_rows<D, false>(d, XP, M, S, Y, i0, i1);
  else spread_rows<D, true>(d, XP, M, S, Y, i0, i1);
}

// Whether a layer's codes and groups tile the spread blocks of width B
template <int B>
bool spread_fits(int64_t K, int64_t gsz, bool tables_per_group) {
  constexpr int E = Spread<B>::E, ND = Spread<B>::ND;
  return K % E == 0 && (gsz % E == 0 || (!tables_per_group && E % gsz == 0 && gsz % ND == 0));
}

int spread_nd(int b) { return b == 3 || b == 6 ? 24 / b : 32 / b; }

// The affine spread kernel for this layer's width, or false when its widths/groups do not tile (b = 5, 7)
bool affine_spread(const Affine& a, const float* XP, int64_t M, const float* S, float* Y, int64_t i0, int64_t i1) {
  auto go = [&](auto dec) {
    spread_dispatch(dec, XP, M, S, Y, i0, i1);
    return true;
  };
  switch (a.b) {
    case 1: return go(AffineDec<1>(a));
    case 2: return go(AffineDec<2>(a));
    case 3: return go(AffineDec<3>(a));
    case 4: return go(AffineDec<4>(a));
    case 6: return go(AffineDec<6>(a));
    case 8: return go(AffineDec<8>(a));
    default: return false;
  }
}

#if BN_PAIR
void affine_spread_split(const Affine& a, const float* XP, int64_t M, const float* S, float* Y, int64_t i0, int64_t i1) {
  AffineDec<1, SpreadPair<1, true>> dec(a);  // sign layers (1-bit affine); b = 2, 4 keep fp32 FMAs (their offset
  spread_dispatch(dec, XP, M, S, Y, i0, i1);   // amplifies the split's error up to 2^b + q ≤ 31×)
}

void affine_spread_pair(const Affine& a, const float* XP, int64_t M, const float* S, float* Y, int64_t i0, int64_t i1) {
  auto go = [&](auto dec) { spread_dispatch(dec, XP, M, S, Y, i0, i1); };
  switch (a.b) {
    case 1: go(AffineDec<1, SpreadPair<1>>(a)); break;
    case 2: go(AffineDec<2, SpreadPair<2>>(a)); break;
    case 3: go(AffineDec<3, SpreadPair<3>>(a)); break;
    default: go(AffineDec<4, SpreadPair<4>>(a)); break;
  }
}
#endif

bool affine_spread_ok(const Affine& a) {
  switch (a.b) {
    case 1: return spread_fits<1>(a.K, a.gsz, false);
    case 2: return spread_fits<2>(a.K, a.gsz, false);
    case 3: return spread_fits<3>(a.K, a.gsz, false);
    case 4: return spread_fits<4>(a.K, a.gsz, false);
    case 6: return spread_fits<6>(a.K, a.gsz, false);
    case 8: return spread_fits<8>(a.K, a.gsz, false);
    default: return false;
  }
}

bool codebook_spread_ok(const Codebook& c) {
  const bool tpg = c.tgrp != 0;
  switch (c.b) {
    case 1: return spread_fits<1>(c.K, c.gsz, tpg);
    case 2: return spread_fits<2>(c.K, c.gsz, tpg);
    case 3: return spread_fits<3>(c.K, c.gsz, tpg);
    case 4: return spread_fits<4>(c.K, c.gsz, tpg);
    default: return false;
  }
}

template <bool PAIR>  // PAIR: bf16 activations in the pair layout (spread_x_pair)
void codebook_spread(const Codebook& c, const float* XP, int64_t M, float* Y, int64_t i0, int64_t i1) {
  auto go = [&](auto dec) { spread_dispatch(dec, XP, M, nullptr, Y, i0, i1); };
  switch (c.b) {
    case 1: go(CodebookDec<1, PAIR>(c)); break;
    case 2: go(CodebookDec<2, PAIR>(c)); break;
    case 3: go(CodebookDec<3, PAIR>(c)); break;
    default: go(CodebookDec<4, PAIR>(c)); break;
  }
}

// ---- generic vector kernel (any width, groups of 16k): Codes64 per 64-chunk, fold after every group ----------
template <int MB>
void affine_rows_generic(const Affine& a, const float* X, int64_t M, const float* S, float* Y, int64_t i0, int64_t i1) {
  const int64_t K = a.K, G = a.groups(), vpg = a.gsz / 16, cb = 8 * a.b;
  const Codes64 cv(a.b, a.end());
  const float off = cv.offset();
  for (int64_t i = i0; i < i1; ++i) {
    const uint8_t* row = a.row(i);
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
      const int mb = static_cast<int>(std::min<int64_t>(MB, M - m0));
      __m512 tot[MB], acc[MB][2];
      float z[MB];
      for (int m = 0; m < MB; ++m) { tot[m] = acc[m][0] = acc[m][1] = _mm512_setzero_ps(); z[m] = 0.f; }
      int64_t g = 0, left = vpg;
      for (int64_t c = 0; c < K / 64; ++c) {
        __m512 w[4];
        cv(row + c * cb, w);
        for (int v = 0; v < 4; ++v) {
          for (int m = 0; m < mb; ++m)
            acc[m][v & 1] = _mm512_fmadd_ps(w[v], _mm512_loadu_ps(X + (m0 + m) * K + c * 64 + 16 * v), acc[m][v & 1]);
          if (--left == 0) {
            const float al = a.alpha(i, g), zt = al * (a.zprime(i, g) + off);
            for (int m = 0; m < mb; ++m) {
              tot[m] = _mm512_fmadd_ps(_mm512_set1_ps(al), _mm512_add_ps(acc[m][0], acc[m][1]), tot[m]);
              acc[m][0] = acc[m][1] = _mm512_setzero_ps();
              z[m] += zt * S[(m0 + m) * G + g];
            }
            ++g;
            left = vpg;
          }
        }
      }
      for (int m = 0; m < mb; ++m) Y[(m0 + m) * a.N + i] = _mm512_reduce_add_ps(tot[m]) - z[m];
    }
  }
}

void affine_rows_avx512(const Affine& a, const float* X, int64_t M, const float* S, float* Y, int64_t i0, int64_t i1) {
  if (M == 1) affine_rows_generic<1>(a, X, M, S, Y, i0, i1);
  else if (M <= 4) affine_rows_generic<4>(a, X, M, S, Y, i0, i1);
  else affine_rows_generic<8>(a, X, M, S, Y, i0, i1);
}
#endif

#if BITNEST_AVX2
// ---- AVX2 + FMA: the spread kernels at 256 bits ------------------------------------------------------------
// A block is 8 dwords (32 bytes; 24 for b = 3, 6: 12 bytes per 128-bit lane spread 3 per dword by one vpshufb),
// ND codes per dword; code K of every dword becomes 8 floats 2^b + q by a shift, an AND and an OR (AVX2 has no
// ternary logic), then one FMA per activation row. x is permuted once per call to the block order. bf16
// activations are widened to fp32 (no bf16 dot product before AVX-512). 16 vector registers: at most 4 activation
// rows per pass.
namespace avx2 {

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

template <int B>
struct Spread {
  static constexpr bool PERM = B == 3 || B == 6;
  static constexpr int ND = (PERM ? 24 : 32) / B;  // codes per dword
  static constexpr int BYTES = PERM ? 24 : 32;     // bytes per block
  static constexpr int E = 8 * ND;                 // codes per block
  static constexpr int STEPS = ND;
  __m256i shuf, mask, expc;
  const uint8_t* end;
  explicit Spread(const uint8_t* buffer_end) : end(buffer_end) {
    alignas(32) uint8_t p[32];
    for (int d = 0; d < 4; ++d)
      for (int e = 0; e < 4; ++e) p[4 * d + e] = p[16 + 4 * d + e] = static_cast<uint8_t>(3 * d + std::min(e, 2));
    shuf = _mm256_load_si256(reinterpret_cast<const __m256i*>(p));
    mask = _mm256_set1_epi32(((1 << B) - 1) << (23 - B));
    expc = _mm256_set1_epi32((127 + B) << 23);
  }
  BN_INLINE __m256i block(const uint8_t* src) const {
    if constexpr (!PERM) {
      return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    } else {  // lane 0: bytes 0..11, lane 1: bytes 12..23 (the 16-byte load past them stays inside the buffer but at its end)
      __m128i hi;
      if (src + 28 <= end) {
        hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 12));
      } else {
        alignas(16) uint8_t t[16] = {0};
        std::memcpy(t, src + 12, 12);
        hi = _mm_load_si128(reinterpret_cast<const __m128i*>(t));
      }
      const __m256i raw = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))), hi, 1);
      return _mm256_shuffle_epi8(raw, shuf);
    }
  }
  template <int K>
  BN_INLINE __m256 code(__m256i dw) const {  // code K of every dword as fp32 2^b + q
    constexpr int sh = 23 - B - K * B;
    __m256i v;
    if constexpr (sh >= 0) v = _mm256_slli_epi32(dw, sh);
    else v = _mm256_srli_epi32(dw, -sh);
    return _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(v, mask), expc));
  }
  // code K of every dword as the fp32 q·2^(K·b): masked in place and converted (the top code shifted down
  // instead: bit 31 is a sign); x carries the 2^(−K·b) (spread_x with scaled = true), exact powers of two
  template <int K>
  BN_INLINE __m256 code_cvt(__m256i dw) const {
    constexpr int lo = K * B;
    if constexpr (lo + B >= 32) return _mm256_cvtepi32_ps(_mm256_srli_epi32(dw, lo));
    else return _mm256_cvtepi32_ps(_mm256_and_si256(dw, _mm256_set1_epi32(((1 << B) - 1) << lo)));
  }
};

inline int nd(int b) { return b == 3 || b == 6 ? 24 / b : 32 / b; }

#ifndef BN_AVX2_CVT
#define BN_AVX2_CVT 1
#endif
// Which affine decoder a width uses: mask + convert for b ≥ 3 (two ops a vector, measured 10–25 % faster at
// 4096², batch 1, than shift + AND + OR); b = 1, 2 need a mask per code (16–32 constants): shift + AND + OR
constexpr bool cvt_codes(int b) { return BN_AVX2_CVT && b >= 3; }

// x (M, K) -> block-major: xp[(β·M + m)·E + 8k + d] = x[m, β·E + d·ND + k], times 2^(−shift of code k) when
// `b` > 0 (the affine decoders' code_cvt)
std::vector<float> spread_x(const float* X, int64_t M, int64_t K, int nd, int b = 0) {
  std::vector<float> xp(M * K);
  const int64_t E = 8 * nd;
  float mul[32];
  for (int k = 0; k < nd; ++k) mul[k] = cvt_codes(b) ? std::ldexp(1.0f, -(k * b + b >= 32 ? 0 : k * b)) : 1.f;
  for (int64_t b0 = 0; b0 < K / E; ++b0)
    for (int64_t m = 0; m < M; ++m) {
      float* o = xp.data() + (b0 * M + m) * E;
      const float* x = X + m * K + b0 * E;
      for (int k = 0; k < nd; ++k)
        for (int d = 0; d < 8; ++d) o[8 * k + d] = x[d * nd + k] * mul[k];
    }
  return xp;
}

template <int B_>
struct AffineDec {  // ŵ = α'((2^b + q) − (z' + 2^b)), as in the AVX-512 AffineDec
  static constexpr int B = B_;
  using SP = Spread<B>;
  const Affine& a;
  const SP sp;
  std::vector<float> alpha, zterm;
  explicit AffineDec(const Affine& a_) : a(a_), sp(a_.end()), alpha(a_.groups() + 16), zterm(a_.groups() + 16) {}
  int64_t K() const { return a.K; }
  int64_t N() const { return a.N; }
  int64_t gsz() const { return a.gsz; }
  const uint8_t* row(int64_t i) const { return a.row(i); }
  bool whole() const { return a.gsz == a.K; }
  void load_row(int64_t i) { row_params(a, i, cvt_codes(B) ? 0.f : static_cast<float>(1 << B), alpha.data(), zterm.data()); }
  void group_start(int64_t, int64_t) {}
  const float* scales() const { return alpha.data(); }
  template <int K_>
  BN_INLINE __m256 decode(__m256i dw) const {
    if constexpr (cvt_codes(B)) return sp.template code_cvt<K_>(dw);
    else return sp.template code<K_>(dw);
  }
  float finish(int64_t m, float y, const float* S) const {
    const int64_t G = a.groups();
    return (whole() ? alpha[0] * y : y) - dot_f32(zterm.data(), S + m * G, G);
  }
};

template <int B_>
struct CodebookDec {  // ŵ = s · T[q]: vpermps looks up 8 entries; 16-entry tables take two and a blend on bit 3
  static constexpr int B = B_;
  using SP = Spread<B>;
  const Codebook& c;
  const SP sp;
  __m256 T0, T1;
  std::vector<float> s;
  explicit CodebookDec(const Codebook& c_) : c(c_), sp(c_.qw + c_.N * c_.row_bytes), s(c_.K / c_.gsz + 16, 1.f) {}
  int64_t K() const { return c.K; }
  int64_t N() const { return c.N; }
  int64_t gsz() const { return c.gsz; }
  const uint8_t* row(int64_t i) const { return c.qw + i * c.row_bytes; }
  bool whole() const { return c.scale == nullptr && c.tgrp == 0; }
  void load_table(int64_t i, int64_t g) {
    alignas(32) float t[16];
    float e[16];
    c.table_at(i, g, e);
    for (int l = 0; l < 16; ++l) t[l] = e[l % (1 << B)];
    T0 = _mm256_load_ps(t);
    T1 = _mm256_load_ps(t + 8);
  }
  void load_row(int64_t i) {
    if (c.tgrp == 0) load_table(i, 0);
    if (c.scale)
      for (int64_t g = 0; g < c.K / c.gsz; ++g) s[g] = c.scale_at(i, g);
  }
  void group_start(int64_t i, int64_t g) {
    if (c.tgrp != 0) load_table(i, g);
  }
  const float* scales() const { return s.data(); }
  template <int K_>
  BN_INLINE __m256 decode(__m256i dw) const {
    constexpr int sh = K_ * B;
    const __m256i idx = sh ? _mm256_srli_epi32(dw, sh) : dw;  // vpermps reads the low 3 bits
    if constexpr (B <= 3) {
      return _mm256_permutevar8x32_ps(T0, idx);
    } else {
      const __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(dw, 28 - sh));  // bit 3 of the code -> sign bit
      return _mm256_blendv_ps(_mm256_permutevar8x32_ps(T0, idx), _mm256_permutevar8x32_ps(T1, idx), sel);
    }
  }
  float finish(int64_t, float y, const float*) const { return y; }
};

template <class D, int MB, int NU, int K_>
BN_INLINE void spread_block(const D& d, __m256i dw, const float* xb, __m256 (&acc)[MB][NU]) {
  const __m256 w = d.template decode<K_>(dw);
  for (int m = 0; m < MB; ++m)
    acc[m][K_ % NU] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xb + m * D::SP::E + 8 * K_), acc[m][K_ % NU]);
  if constexpr (K_ + 1 < D::SP::STEPS) spread_block<D, MB, NU, K_ + 1>(d, dw, xb, acc);
}

template <int NU>
BN_INLINE __m256 sum_vectors(const __m256 (&v)[NU]) {
  __m256 s = v[0];
  for (int u = 1; u < NU; ++u) s = _mm256_add_ps(s, v[u]);
  return s;
}

template <class D>
struct SpreadKernel {
  using SP = typename D::SP;
  D& d;
  const int64_t nblocks, bpg, gpb;  // blocks per group (groups ≥ a block), groups per block (smaller groups)
  const bool whole;
  __m256i lane_idx;
  explicit SpreadKernel(D& d_)
      : d(d_), nblocks(d_.K() / SP::E), bpg(d_.gsz() % SP::E == 0 ? d_.gsz() / SP::E : 1),
        gpb(d_.gsz() % SP::E == 0 ? 0 : SP::E / d_.gsz()), whole(d_.whole()) {
    alignas(32) int32_t lane_group[8];  // lane d's group relative to its block's first group
    for (int l = 0; l < 8; ++l) lane_group[l] = static_cast<int32_t>((l * SP::ND) / d.gsz());
    lane_idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(lane_group));
  }
  int64_t unit() const { return whole || gpb ? SP::E : d.gsz(); }
  // Y[m, i] += Σ over blocks [blk0, blk1) of weight row i · x rows m0..m0+MB, folded per group unless whole;
  // STEP > 0: blocks per group known at compile time (see the AVX-512 kernel)
  template <int MB, int NU, bool PER_BLOCK, int STEP = 0>
  void run(int64_t i, const float* XP, int64_t M, float* Y, int64_t m0, int64_t blk0, int64_t blk1) {
    const int64_t step = STEP > 0 ? STEP : (whole ? blk1 - blk0 : bpg), xstride = M * SP::E;
    const uint8_t* row = d.row(i);
    const float* Xm = XP + m0 * SP::E;
    __m256 tot[MB];
    for (int m = 0; m < MB; ++m) tot[m] = _mm256_setzero_ps();
    int64_t g = PER_BLOCK ? blk0 * gpb : blk0 / bpg;
    for (int64_t b0 = blk0; b0 < blk1; b0 += step) {
      if (!whole && !PER_BLOCK) d.group_start(i, g);
      __m256 acc[MB][NU];
      for (int m = 0; m < MB; ++m)
        for (int u = 0; u < NU; ++u) acc[m][u] = _mm256_setzero_ps();
      for (int64_t blk = b0; blk < b0 + step; ++blk) {
        _mm_prefetch(reinterpret_cast<const char*>(row + blk * SP::BYTES + BN_PFD), BN_PFH);
        spread_block<D, MB, NU, 0>(d, d.sp.block(row + blk * SP::BYTES), Xm + blk * xstride, acc);
      }
      if (whole) {
        for (int m = 0; m < MB; ++m) tot[m] = _mm256_add_ps(tot[m], sum_vectors<NU>(acc[m]));
      } else {
        const __m256 vs = PER_BLOCK ? _mm256_permutevar8x32_ps(_mm256_loadu_ps(d.scales() + g), lane_idx)
                                    : _mm256_set1_ps(d.scales()[g]);
        g += PER_BLOCK ? gpb : 1;
        for (int m = 0; m < MB; ++m) tot[m] = _mm256_fmadd_ps(vs, sum_vectors<NU>(acc[m]), tot[m]);
      }
    }
    for (int m = 0; m < MB; ++m) Y[(m0 + m) * d.N() + i] += hsum(tot[m]);
  }
  template <int MB, int NU, bool PER_BLOCK>
  BN_INLINE void go(int64_t i, const float* XP, int64_t M, float* Y, int64_t m0, int64_t blk0, int64_t blk1) {
    if (!whole && (PER_BLOCK || bpg == 1)) run<MB, NU, PER_BLOCK, 1>(i, XP, M, Y, m0, blk0, blk1);
    else if (!whole && bpg == 2) run<MB, NU, PER_BLOCK, 2>(i, XP, M, Y, m0, blk0, blk1);
    else run<MB, NU, PER_BLOCK>(i, XP, M, Y, m0, blk0, blk1);
  }
};

// Rows [i0, i1): K-segments that stay in L1, activation rows in passes of 4, 2, 1 (see spread_rows above)
template <class D, bool PER_BLOCK>
void spread_rows(D& d, const float* XP, int64_t M, const float* S, float* Y, int64_t i0, int64_t i1) {
#ifndef BN_AVX2_NU
#define BN_AVX2_NU 4
#endif
  constexpr int ST = D::SP::STEPS, N1 = ST >= BN_AVX2_NU ? BN_AVX2_NU : ST;
  SpreadKernel<D> kr(d);
  const int64_t E = D::SP::E, unit = kr.unit(), N = d.N();
  const int64_t seg = M == 1 ? d.K() : std::max<int64_t>(unit, (6144 / M) / unit * unit);
  const bool short_groups = !kr.whole && kr.bpg < 4;
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t m = 0; m < M; ++m) Y[m * N + i] = 0.f;
  if (M == 1) {
    for (int64_t i = i0; i < i1; ++i) {
      d.load_row(i);
      if (short_groups) kr.template go<1, 2, PER_BLOCK>(i, XP, M, Y, 0, 0, kr.nblocks);
      else kr.template go<1, N1, PER_BLOCK>(i, XP, M, Y, 0, 0, kr.nblocks);
      Y[i] = d.finish(0, Y[i], S);
    }
    return;
  }
  for (int64_t k0 = 0; k0 < d.K(); k0 += seg) {
    const int64_t blk0 = k0 / E, blk1 = std::min(d.K(), k0 + seg) / E;
    for (int64_t i = i0; i < i1; ++i) {
      d.load_row(i);
      int64_t m0 = 0;
#ifndef BN_AVX2_MB8
#define BN_AVX2_MB8 1
#endif
      if (BN_AVX2_MB8) for (; m0 + 8 <= M; m0 += 8) kr.template go<8, 1, PER_BLOCK>(i, XP, M, Y, m0, blk0, blk1);
      for (; m0 + 4 <= M; m0 += 4) kr.template go<4, 1, PER_BLOCK>(i, XP, M, Y, m0, blk0, blk1);
      if (m0 + 2 <= M) { kr.template go<2, 2, PER_BLOCK>(i, XP, M, Y, m0, blk0, blk1); m0 += 2; }
      if (m0 < M) kr.template go<1, 2, PER_BLOCK>(i, XP, M, Y, m0, blk0, blk1);
    }
  }
  for (int64_t i = i0; i < i1; ++i) {
    d.load_row(i);
    for (int64_t m = 0; m < M; ++m) Y[m * N + i] = d.finish(m, Y[m * N + i], S);
  }
}

template <class D>
void spread_dispatch(D& d, const float* XP, int64_t M, const float* S, float* Y, int64_t i0, int64_t i1) {
  if (d.gsz() % D::SP::E == 0) spread_rows<D, false>(d, XP, M, S, Y, i0, i1);
  else spread_rows<D, true>(d, XP, M, S, Y, i0, i1);
}

template <int B>
bool fits(int64_t K, int64_t gsz, bool tables_per_group) {
  constexpr int E = Spread<B>::E, ND = Spread<B>::ND;
  return K % E == 0 && (gsz % E == 0 || (!tables_per_group && E % gsz == 0 && gsz % ND == 0));
}

bool affine_ok(const Affine& a) {
  switch (a.b) {
    case 1: return fits<1>(a.K, a.gsz, false);
    case 2: return fits<2>(a.K, a.gsz, false);
    case 3: return fits<3>(a.K, a.gsz, false);
    case 4: return fits<4>(a.K, a.gsz, false);
    case 6: return fits<6>(a.K, a.gsz, false);
    case 8: return fits<8>(a.K, a.gsz, false);
    default: return false;
  }
}

void affine_spread(const Affine& a, const float* XP, int64_t M, const float* S, float* Y, int64_t i0, int64_t i1) {
  auto go = [&](auto dec) { spread_dispatch(dec, XP, M, S, Y, i0, i1); };
  switch (a.b) {
    case 1: go(AffineDec<1>(a)); break;
    case 2: go(AffineDec<2>(a)); break;
    case 3: go(AffineDec<3>(a)); break;
    case 4: go(AffineDec<4>(a)); break;
    case 6: go(AffineDec<6>(a)); break;
    default: go(AffineDec<8>(a)); break;
  }
}

bool codebook_ok(const Codebook& c) {
  const bool tpg = c.tgrp != 0;
  switch (c.b) {
    case 1: return fits<1>(c.K, c.gsz, tpg);
    case 2: return fits<2>(c.K, c.gsz, tpg);
    case 3: return fits<3>(c.K, c.gsz, tpg);
    case 4: return fits<4>(c.K, c.gsz, tpg);
    default: return false;
  }
}

void codebook_spread(const Codebook& c, const float* XP, int64_t M, float* Y, int64_t i0, int64_t i1) {
  auto go = [&](auto dec) { spread_dispatch(dec, XP, M, nullptr, Y, i0, i1); };
  switch (c.b) {
    case 1: go(CodebookDec<1>(c)); break;
    case 2: go(CodebookDec<2>(c)); break;
    case 3: go(CodebookDec<3>(c)); break;
    default: go(CodebookDec<4>(c)); break;
  }
}

// 8 b-bit codes (b bytes of the stream, natural order) -> 8 int32: one byte shuffle puts the two bytes code e
// can touch into dword e, a variable shift and a mask cut it out. For dequantization (prefill tiles).
struct Codes8 {
  __m256i shuf, shifts, mask;
  int b;
  const uint8_t* end;
  Codes8(int bits, const uint8_t* buffer_end) : b(bits), end(buffer_end) {
    alignas(32) uint8_t p[32];
    alignas(32) int32_t s[8];
    for (int e = 0; e < 8; ++e) {
      const int byte = e * b / 8;
      s[e] = e * b % 8;
      for (int lane = 0; lane < 2; ++lane) {
        uint8_t* q = p + 16 * lane + 4 * (e % 4);
        if (e / 4 != lane) continue;
        q[0] = static_cast<uint8_t>(byte);
        q[1] = byte + 1 < 8 ? static_cast<uint8_t>(byte + 1) : 0x80;
        q[2] = q[3] = 0x80;
      }
    }
    shuf = _mm256_load_si256(reinterpret_cast<const __m256i*>(p));
    shifts = _mm256_load_si256(reinterpret_cast<const __m256i*>(s));
    mask = _mm256_set1_epi32((1 << b) - 1);
  }
  BN_INLINE __m256i operator()(const uint8_t* src) const {
    uint64_t u = 0;
    std::memcpy(&u, src, src + 8 <= end ? 8 : static_cast<size_t>(end - src));
    const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi64x(static_cast<int64_t>(u)), shuf);
    return _mm256_and_si256(_mm256_srlv_epi32(v, shifts), mask);
  }
};

template <typename T>
BN_INLINE void store8(T* dst, __m256 v) {
  if constexpr (std::is_same<T, float>::value) {
    _mm256_storeu_ps(dst, v);
  } else if constexpr (std::is_same<T, at::Half>::value) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {  // bf16, round to nearest even (as torch's .to(bfloat16) for finite values)
    const __m256i u = _mm256_castps_si256(v);
    const __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)))), 16);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
  }
}

}  // namespace avx2
#endif

void extra_precision(const Affine& a, const float* X, int64_t M, float* Y, int64_t i0, int64_t i1) {
  if (!a.ep_rowptr) return;
  for (int64_t i = i0; i < i1; ++i)
    for (int32_t e = a.ep_rowptr[i]; e < a.ep_rowptr[i + 1]; ++e) {
      const int64_t j = a.ep_cols[e];
      const float al = a.alpha(i, j / a.gsz);
      for (int64_t m = 0; m < M; ++m) Y[m * a.N + i] += al * X[m * a.K + j];
    }
}

#if BITNEST_AVX512
// ---- look-up-table kernel (T-MAC-style) for b = 1, 2, 4 at small batches ---------------------------------
// Four stream bits of a row (one nibble: 4/b codes) index a 16-entry table of the partial sums they can select:
//   T_m[p][e] = Σ_u (code_u(e) − c) x[m, p·n + u],   n = 4/b codes per nibble, c = (2^b − 1)/2 (centred: no
// large offset to cancel; for sign layers c = z' = ½, so y = α·acc with no group-sum term).
// Lanes are 16 *output rows*: 64 bytes of each of 16 rows are loaded and transposed (16 × 16 dwords, 64
// shuffles), so dword c of row k lands in lane k of vector V_c; then nibble t of every lane is V_c >> 4t (vpermps
// reads only the low 4 bits of each index) and one vpermps against table (8c + t) gives 16 rows' partial sums of
// n weights: shift + look-up + add per 16·n weights, against the spread kernels' decode + FMA per 16 (sign layers:
// a third of the work; see lut_use for where it wins). Rows stay in the checkpoint layout.
// Fold per group: y += α'(acc + (c − z')S).
std::atomic<int> g_lut_max_m{16};  // activation rows up to which the LUT kernel runs (0: never); set_lut_max_batch
std::atomic<bool> g_lut_force{false};  // every width and batch lut_ok admits (tests: the kernel on b = 2, 4, 1 row)

bool lut_ok(const Affine& a) {
  return (a.b == 1 || a.b == 2 || a.b == 4) && a.N >= 16 && (a.K * a.b) % 32 == 0 && (a.gsz * a.b) % 32 == 0;
}

// Where it is the faster kernel (Zen 4, 4096², interleaved A/B, LUT ÷ spread time): b = 1 at every batch (fp32
// activations: 0.66 at 1 row, 0.37 at 16; bf16 0.90 / 0.28; against the spread kernels with weight-row pairs:
// 0.51–0.70 at 4–16 rows). b = 2: never since the spread kernels take weight rows in pairs from 8 activation rows
// (LUT was 1.14 fp32 / 2.12 bf16 at 1 row; at 8 rows 1.18–1.28 fp32, 16 rows 0.9–1.03 fp32 and 1.9 bf16). b = 4
// never (1.3–2.8: one look-up per weight is no cheaper than one FMA). Tests force it on b = 2, 4 (`g_lut_force`).
bool lut_use(const Affine& a, int64_t M) {
  if (M > g_lut_max_m.load() || !lut_ok(a)) return false;
  return a.b == 1 || g_lut_force.load();
}

// T (M, K·b/4, 16): the tables of every activation row (rows in parallel)
std::vector<float> lut_tables(const float* X, int64_t M, int64_t K, int b) {
  const int n = 4 / b, mask = (1 << b) - 1;
  const int64_t P = K * b / 4;
  const float c = 0.5f * static_cast<float>(mask);
  alignas(64) float coef[4][16];
  for (int u = 0; u < n; ++u)
    for (int e = 0; e < 16; ++e) coef[u][e] = static_cast<float>((e >> (u * b)) & mask) - c;
  __m512 C[4];
  for (int u = 0; u < n; ++u) C[u] = _mm512_load_ps(coef[u]);
  std::vector<float> T(M * P * 16);
  at::parallel_for(0, M * P, 1024, [&](int64_t r0, int64_t r1) {  // r = m·P + p
    for (int64_t m = r0 / P, p = r0 % P, r = r0; r < r1; ++r) {  // (m, p) stepped, not divided per entry
      const float* x = X + m * K + p * n;
      __m512 t = _mm512_mul_ps(C[0], _mm512_set1_ps(x[0]));
      for (int u = 1; u < n; ++u) t = _mm512_fmadd_ps(C[u], _mm512_set1_ps(x[u]), t);
      _mm512_storeu_ps(T.data() + r * 16, t);
      if (++p == P) { p = 0; ++m; }
    }
  });
  return T;
}

// r[k] (dwords of row k) -> r[c] (dword c of rows 0..15): 4 rounds of 16 shuffles
BN_INLINE void transpose16(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  __m512i u[16];  // u[4g + s], 128-bit lane L: rows 4g..4g+3 of dword 4L + s
  for (int g = 0; g < 4; ++g) {
    u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int s = 0; s < 4; ++s) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[s], u[4 + s], 0x88), w0 = _mm512_shuffle_i32x4(u[s], u[4 + s], 0xDD);
    const __m512i v1 = _mm512_shuffle_i32x4(u[8 + s], u[12 + s], 0x88), w1 = _mm512_shuffle_i32x4(u[8 + s], u[12 + s], 0xDD);
    r[s] = _mm512_shuffle_i32x4(v0, v1, 0x88);
    r[8 + s] = _mm512_shuffle_i32x4(v0, v1, 0xDD);
    r[4 + s] = _mm512_shuffle_i32x4(w0, w1, 0x88);
    r[12 + s] = _mm512_shuffle_i32x4(w0, w1, 0xDD);
  }
}

// Activation rows m0 .. m0 + MB − 1 against H transposed 16-row sets V[h·VS ..] (H = 2: each table load serves two
// look-ups; H = 4 measured no faster). A accumulators per row hide the add latency; the fold at every group end adds
// α'·acc + α'(c − z')·S.
template <int MB, int A, int H>
BN_INLINE void lut_pass(const __m512i* V, int64_t VS, int64_t F, const float* T, int64_t P, const float* S, int64_t G,
                        const __m512* alpha, const __m512* bterm, int64_t m0, __m512 (&y)[H][4]) {
  __m512 acc[H][MB][A];
  for (int h = 0; h < H; ++h)
    for (int m = 0; m < MB; ++m) {
      y[h][m] = _mm512_setzero_ps();
      for (int k = 0; k < A; ++k) acc[h][m][k] = _mm512_setzero_ps();
    }
  const float* Tm = T + m0 * P * 16;
  for (int64_t g = 0; g < G; ++g) {  // (no per-dword modulo: a 64-bit division per dword cost more than its look-ups)
    for (int64_t w = g * F; w < (g + 1) * F; ++w) {
      __m512i v[H];
      for (int h = 0; h < H; ++h) v[h] = _mm512_loadu_si512(V + h * VS + w);
      const float* tw = Tm + w * 128;
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t)
        for (int m = 0; m < MB; ++m) {
          const __m512 tab = _mm512_loadu_ps(tw + m * P * 16 + t * 16);
          for (int h = 0; h < H; ++h) {
            const __m512i idx = t ? _mm512_srli_epi32(v[h], 4 * t) : v[h];  // (the compiler keeps one per t)
            acc[h][m][t % A] = _mm512_add_ps(acc[h][m][t % A], _mm512_permutexvar_ps(idx, tab));
          }
        }
    }
    for (int h = 0; h < H; ++h)
      for (int m = 0; m < MB; ++m) {
        const __m512 s = sum_vectors(acc[h][m], A);
        y[h][m] = _mm512_fmadd_ps(alpha[h * G + g], s,
                                  _mm512_fmadd_ps(bterm[h * G + g], _mm512_set1_ps(S[(m0 + m) * G + g]), y[h][m]));
        for (int k = 0; k < A; ++k) acc[h][m][k] = _mm512_setzero_ps();
      }
  }
}

// 16 rows from `base` -> V (NCH·16 vectors, dword w of the 16 rows in V[w]) and their α', α'(c − z') per group
struct LutBlock {
  const Affine& a;
  int64_t NCH, G;
  __mmask64 tmask;  // the bytes of a row's last 64-byte chunk
  float c;
  std::vector<float> al, zt;
  LutBlock(const Affine& aff) : a(aff), NCH((aff.row_bytes + 63) / 64), G(aff.groups()),
      tmask(aff.row_bytes % 64 ? (1ULL << (aff.row_bytes % 64)) - 1ULL : ~0ULL),
      c(0.5f * static_cast<float>((1 << aff.b) - 1)), al(16 * G + 16), zt(16 * G + 16) {}
  void load(int64_t i, int64_t ahead, __m512i* V, __m512* alpha, __m512* bterm) {
    const uint8_t* base = a.row(i);
    for (int64_t ch = 0; ch < NCH; ++ch) {
      __m512i r[16];
      for (int k = 0; k < 16; ++k) {  // a last chunk reads into the next row (never looked up); masked at the end
        const uint8_t* src = base + k * a.row_bytes + ch * 64;
        r[k] = load64(src, tmask, a.end());
        if (ahead) _mm_prefetch(reinterpret_cast<const char*>(src + ahead * a.row_bytes), BN_PFH);  // the next block
      }
      transpose16(r);
      for (int k = 0; k < 16; ++k) V[ch * 16 + k] = r[k];
    }
    for (int k = 0; k < 16; ++k) row_params(a, i + k, -c, al.data() + k * G, zt.data() + k * G);  // zt = α'(z' − c)
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int>(G)));
    for (int64_t g = 0; g < G; ++g) {  // lane k: row i + k
      alpha[g] = _mm512_i32gather_ps(rows, al.data() + g, 4);
      bterm[g] = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_i32gather_ps(rows, zt.data() + g, 4));
    }
  }
};

template <int H>
void lut_run(LutBlock& lb, const __m512i* V, int64_t VS, const float* T, int64_t M, const float* S, const __m512* alpha,
             const __m512* bterm, float* Y, int64_t i) {
  const Affine& a = lb.a;
  const int64_t F = a.gsz * a.b / 32, G = lb.G, P = a.K * a.b / 4;
  int64_t m0 = 0;
  __m512 y[H][4];
  auto store = [&](int mb) {
    for (int h = 0; h < H; ++h)
      for (int m = 0; m < mb; ++m) _mm512_storeu_ps(Y + (m0 + m) * a.N + i + 16 * h, y[h][m]);
    m0 += mb;
  };
  for (; m0 + 4 <= M;) { lut_pass<4, 1, H>(V, VS, F, T, P, S, G, alpha, bterm, m0, y); store(4); }
  if (m0 + 2 <= M) { lut_pass<2, 2, H>(V, VS, F, T, P, S, G, alpha, bterm, m0, y); store(2); }
  if (m0 < M) { lut_pass<1, 4, H>(V, VS, F, T, P, S, G, alpha, bterm, m0, y); store(1); }
}

// Rows [i0, i1) (whole blocks of 16) of y = x Ŵᵀ through the tables T: pairs of 16-row sets, then one set
void lut_rows(const Affine& a, const float* T, int64_t M, const float* S, float* Y, int64_t i0, int64_t i1) {
  LutBlock lb(a);
  const int64_t VS = lb.NCH * 16, G = lb.G;
  std::vector<__m512i> V(2 * VS);
  std::vector<__m512> alpha(2 * G), bterm(2 * G);
  int64_t i = i0;
  for (; i + 32 <= i1; i += 32) {
    const int64_t ahead = i + 64 <= i1 ? 32 : 0;
    lb.load(i, ahead, V.data(), alpha.data(), bterm.data());
    lb.load(i + 16, ahead, V.data() + VS, alpha.data() + G, bterm.data() + G);
    lut_run<2>(lb, V.data(), VS, T, M, S, alpha.data(), bterm.data(), Y, i);
  }
  if (i < i1) {
    lb.load(i, 0, V.data(), alpha.data(), bterm.data());
    lut_run<1>(lb, V.data(), VS, T, M, S, alpha.data(), bterm.data(), Y, i);
  }
}

#endif

// y (M, N) fp32 for activations X (M, K) fp32, contiguous; `xbf`, when defined, the same activations in bf16
// (they were bf16 to begin with), which the b = 1–4 kernels multiply in pairs
Tensor affine_run(const Affine& a, const Tensor& xf, bool simd, const Tensor& xbf = Tensor(), bool split = false) {
  const int64_t K = a.K, M = xf.size(0);
  Tensor y = at::empty({M, a.N}, xf.options());
  const float* X = xf.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const std::vector<float> S = group_sums(X, M, K, a.gsz);
  const bool vec = simd && a.simd_ok();
  int64_t done = 0;  // rows [0, done) computed by the LUT kernel
#if BITNEST_AVX512
  if (simd && lut_use(a, M)) {
    const std::vector<float> T = lut_tables(X, M, K, a.b);
    done = a.N / 16 * 16;
    parallel_rows(0, done / 16, min_rows(16 * K * M), [&](int64_t b0, int64_t b1) {
      lut_rows(a, T.data(), M, S.data(), Y, 16 * b0, 16 * b1);
      extra_precision(a, X, M, Y, 16 * b0, 16 * b1);
    });
    if (done == a.N) return y;
  }
  const bool sw = vec && affine_spread_ok(a);
  // b = 3 per channel at one row: the fp32-FMA kernel (cold weights, 4096², Zen 4, interleaved: pairs 472 vs
  // 385 µs, though 0.70× warm; int3 g128 at one row equal cold; int3 at 4 rows 0.77× in pairs)
  const bool pair = BN_PAIR && sw && xbf.defined() && a.b <= 4 && !(a.b == 3 && M == 1 && a.gsz == K);
  const bool spl = BN_PAIR && BN_SPLIT && sw && !pair && split && a.b == 1;
  std::vector<float> XP;
#if BN_PAIR
  if (pair) XP = spread_x_pair(reinterpret_cast<const uint16_t*>(xbf.data_ptr<at::BFloat16>()), M, K, spread_nd(a.b));
  if (spl) XP = spread_x_pair_split(X, M, K, spread_nd(a.b));
#endif
  if (sw && !pair && !spl) XP = spread_x(X, M, K, spread_nd(a.b));
#elif BITNEST_AVX2
  const bool sw = simd && avx2::affine_ok(a);
  const std::vector<float> XP = sw ? avx2::spread_x(X, M, K, avx2::nd(a.b), a.b) : std::vector<float>();
#endif
  parallel_rows(done, a.N, min_rows(K * M), [&](int64_t i0, int64_t i1) {
#if BITNEST_AVX2
    if (sw) avx2::affine_spread(a, XP.data(), M, S.data(), Y, i0, i1);
    else
#endif
#if BITNEST_AVX512
#if BN_PAIR
    if (pair) affine_spread_pair(a, XP.data(), M, S.data(), Y, i0, i1);
    else if (spl) affine_spread_split(a, XP.data(), M, S.data(), Y, i0, i1);
    else
#endif
    if (sw) affine_spread(a, XP.data(), M, S.data(), Y, i0, i1);
    else if (vec) affine_rows_avx512(a, X, M, S.data(), Y, i0, i1);
    else
#endif
      affine_rows_scalar(a, X, M, S.data(), Y, i0, i1);
    extra_precision(a, X, M, Y, i0, i1);
  });
  return y;
}

Tensor affine_linear(const Tensor& x, const Tensor& qweight, int64_t bits, int64_t K, const Tensor& scale,
                     const optional<Tensor>& zero, double zc, int64_t group_size, int64_t shift,
                     const optional<Tensor>& ep_rowptr, const optional<Tensor>& ep_cols, bool simd) {
  const Affine a = affine_args(qweight, bits, K, scale, zero, zc, group_size, shift, ep_rowptr, ep_cols);
  TORCH_CHECK(x.size(-1) == K, "x has ", x.size(-1), " features, the weight ", K);
  const Tensor x2 = x.reshape({-1, K});
  const Tensor xbf = x2.scalar_type() == at::kBFloat16 ? x2.contiguous() : Tensor();
  return affine_run(a, x2.to(at::kFloat).contiguous(), simd, xbf);
}

// Sign layers (OneBit, BitNet): y = ((x ⊙ g) · Sᵀ) ⊙ h with S = 1 − 2·bit, i.e. the 1-bit affine grid α = −2,
// z = ½ (exact in float16), so they share the affine kernels; g and h are applied here, in one call (each
// extra torch op costs several µs, a fifth of a 4096×4096 layer's time at batch 1); so is OneBit's LayerNorm.
Tensor sign_affine_linear(const Tensor& x, const Tensor& qweight, int64_t K, const optional<Tensor>& g,
                          const optional<Tensor>& h, bool post_ln, double eps, bool simd) {
  TORCH_CHECK(qweight.dtype() == at::kByte && qweight.is_contiguous() && qweight.size(1) == (K + 7) / 8, "sign qweight");
  TORCH_CHECK(x.size(-1) == K, "x has ", x.size(-1), " features, the weight ", K);
  static const at::Half alpha(-2.0f), zero(0.5f);
  Affine a;
  a.qw = qweight.data_ptr<uint8_t>();
  a.row_bytes = qweight.size(1);
  a.N = qweight.size(0);
  a.K = K;
  a.b = 1;
  a.scale = &alpha;
  a.zero = &zero;
  a.srow = 0;
  a.gsz = K;
  a.zc = 0.f;
  a.mult = 1.f;
  Tensor u = x.reshape({-1, K}).to(at::kFloat).contiguous();
  if (g.has_value() && g->defined()) {
    u = u.clone();
    const Tensor gf = g->to(at::kFloat).contiguous();
    float* U = u.data_ptr<float>();
    const float* Gv = gf.data_ptr<float>();
    for (int64_t m = 0; m < u.size(0); ++m)
      for (int64_t j = 0; j < K; ++j) U[m * K + j] *= Gv[j];
  }
  Tensor y = affine_run(a, u, simd, Tensor(), /*split=*/true);
  if (h.has_value() && h->defined()) {
    const Tensor hf = h->to(at::kFloat).contiguous();
    const float* H = hf.data_ptr<float>();
    const int64_t hs = hf.numel() > 1 ? 1 : 0;
    float* Y = y.data_ptr<float>();
    for (int64_t m = 0; m < y.size(0); ++m)
      for (int64_t i = 0; i < a.N; ++i) Y[m * a.N + i] *= H[i * hs];
  }
  if (post_ln) {  // OneBit's parameter-free LayerNorm over the outputs (F.layer_norm: biased variance, eps inside)
    float* Y = y.data_ptr<float>();
    for (int64_t m = 0; m < y.size(0); ++m) {
      float* r = Y + m * a.N;
      double mean = 0.0, var = 0.0;
      for (int64_t i = 0; i < a.N; ++i) mean += r[i];
      mean /= a.N;
      for (int64_t i = 0; i < a.N; ++i) var += (r[i] - mean) * (r[i] - mean);
      const float inv = static_cast<float>(1.0 / std::sqrt(var / a.N + eps)), mu = static_cast<float>(mean);
      for (int64_t i = 0; i < a.N; ++i) r[i] = (r[i] - mu) * inv;
    }
  }
  return y;
}

template <typename T>
void affine_dequant_rows(const Affine& a, T* out, int64_t i0, int64_t i1, bool simd) {
  const int64_t K = a.K, gsz = a.gsz, G = a.groups();
#if BITNEST_AVX512
  const bool vec = simd && a.simd_ok();
  const Codes64 cv(a.b, a.end());
  std::vector<float> alpha(G + 16), zterm(G + 16);
#elif BITNEST_AVX2
  const bool vec = simd && K % 8 == 0 && gsz % 8 == 0;
  const avx2::Codes8 cv(a.b, a.end());
#endif
  for (int64_t i = i0; i < i1; ++i) {
    const uint8_t* row = a.row(i);
    T* o = out + (i - i0) * K;
#if BITNEST_AVX512
    if (vec) {  // ŵ = α'((q + o) − o − z'): the reference's float operations exactly ((q + o) − o is exact)
      for (int64_t g = 0; g < G; ++g) {
        alpha[g] = a.alpha(i, g);
        zterm[g] = a.zprime(i, g);
      }
      const __m512 vo = _mm512_set1_ps(cv.offset());
      for (int64_t c = 0; c < K / 64; ++c) {
        __m512 w[4];
        cv(row + c * 8 * a.b, w);
        for (int v = 0; v < 4; ++v) {
          const int64_t g = (c * 64 + 16 * v) / gsz;
          const __m512 q = _mm512_sub_ps(_mm512_sub_ps(w[v], vo), _mm512_set1_ps(zterm[g]));
          store16<T>(o + c * 64 + 16 * v, _mm512_mul_ps(q, _mm512_set1_ps(alpha[g])));
        }
      }
    } else
#elif BITNEST_AVX2
    if (vec) {  // ŵ = α'(q − z'): the reference's float operations exactly
      for (int64_t g = 0; g < G; ++g) {
        const __m256 al = _mm256_set1_ps(a.alpha(i, g)), zp = _mm256_set1_ps(a.zprime(i, g));
        for (int64_t j = g * gsz; j < (g + 1) * gsz; j += 8) {
          const __m256 q = _mm256_cvtepi32_ps(cv(row + j / 8 * a.b));
          avx2::store8<T>(o + j, _mm256_mul_ps(_mm256_sub_ps(q, zp), al));
        }
      }
    } else
#endif
    {
      for (int64_t j = 0; j < K; ++j) {
        const int64_t g = j / gsz;
        o[j] = static_cast<T>(a.alpha(i, g) * (static_cast<float>(code_at(row, j, a.b)) - a.zprime(i, g)));
      }
    }
    if (a.ep_rowptr)
      for (int32_t e = a.ep_rowptr[i]; e < a.ep_rowptr[i + 1]; ++e) {
        const int64_t j = a.ep_cols[e], g = j / gsz;
        o[j] = static_cast<T>(a.alpha(i, g) * (static_cast<float>(code_at(row, j, a.b)) + 1.f - a.zprime(i, g)));
      }
  }
}

// Rows [row0, row1) of the dequantized weight ŵ = α'(q − z'), (row1 − row0, K) in `dtype`.
Tensor affine_dequant(const Tensor& qweight, int64_t bits, int64_t K, const Tensor& scale, const optional<Tensor>& zero,
                      double zc, int64_t group_size, int64_t shift, const optional<Tensor>& ep_rowptr,
                      const optional<Tensor>& ep_cols, int64_t row0, int64_t row1, at::ScalarType dtype, bool simd) {
  const Affine a = affine_args(qweight, bits, K, scale, zero, zc, group_size, shift, ep_rowptr, ep_cols);
  TORCH_CHECK(0 <= row0 && row0 <= row1 && row1 <= a.N, "row range");
  Tensor out = at::empty({row1 - row0, K}, qweight.options().dtype(dtype));
  parallel_rows(row0, row1, min_rows(K), [&](int64_t i0, int64_t i1) {
    const int64_t off = (i0 - row0) * K;
    if (dtype == at::kFloat) affine_dequant_rows<float>(a, out.data_ptr<float>() + off, i0, i1, simd);
    else if (dtype == at::kBFloat16) affine_dequant_rows<at::BFloat16>(a, out.data_ptr<at::BFloat16>() + off, i0, i1, simd);
    else if (dtype == at::kHalf) affine_dequant_rows<at::Half>(a, out.data_ptr<at::Half>() + off, i0, i1, simd);
    else TORCH_CHECK(false, "dequantize to float32, bfloat16 or float16");
  });
  return out;
}

// ------------------------------------------------------------------------------------------ sign (OneBit / BitNet)

// Rows [row0, row1) of S as ±1, (row1 − row0, K) in `dtype`.
Tensor sign_dequant(const Tensor& qweight, int64_t K, int64_t row0, int64_t row1, at::ScalarType dtype, bool simd) {
  TORCH_CHECK(qweight.dtype() == at::kByte && qweight.is_contiguous() && qweight.size(1) == (K + 7) / 8, "sign qweight");
  TORCH_CHECK(0 <= row0 && row0 <= row1 && row1 <= qweight.size(0), "row range");
  const int64_t rb = qweight.size(1);
  Tensor out = at::empty({row1 - row0, K}, qweight.options().dtype(dtype));
  const uint8_t* QW = qweight.data_ptr<uint8_t>();
  auto fill = [&](auto* O) {
    using T = std::remove_pointer_t<decltype(O)>;
    parallel_rows(row0, row1, min_rows(K), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const uint8_t* row = QW + i * rb;
        T* o = O + (i - row0) * K;
        int64_t j = 0;
#if BITNEST_AVX512
        if (simd) {
          const __m512 pos = _mm512_set1_ps(1.f), neg = _mm512_set1_ps(-1.f);
          for (; j + 16 <= K; j += 16) {
            uint16_t bits;
            std::memcpy(&bits, row + j / 8, 2);
            store16<T>(o + j, _mm512_mask_blend_ps(static_cast<__mmask16>(bits), pos, neg));
          }
        }
#elif BITNEST_AVX2
        if (simd) {
          const __m256 pos = _mm256_set1_ps(1.f), neg = _mm256_set1_ps(-1.f);
          const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
          for (; j + 8 <= K; j += 8) {
            const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(row[j / 8]), sel), sel);
            avx2::store8<T>(o + j, _mm256_blendv_ps(pos, neg, _mm256_castsi256_ps(set)));
          }
        }
#endif
        for (; j < K; ++j) o[j] = static_cast<T>(((row[j >> 3] >> (j & 7)) & 1) ? -1.f : 1.f);
      }
    });
  };
  if (dtype == at::kFloat) fill(out.data_ptr<float>());
  else if (dtype == at::kBFloat16) fill(out.data_ptr<at::BFloat16>());
  else if (dtype == at::kHalf) fill(out.data_ptr<at::Half>());
  else TORCH_CHECK(false, "signs as float32, bfloat16 or float16");
  return out;
}

// ------------------------------------------------------------------------------------------ codebook

// y = Σ_g s_g Σ_j T_g[q_j] x_j. Vector path: tables of ≤ 32 entries live in registers (vpermps / vpermt2ps
// look up 16 codes per instruction); wider tables are gathered.
Tensor codebook_linear(const Tensor& x, const Tensor& qweight, int64_t bits, int64_t K, const Tensor& table,
                       const optional<Tensor>& scale, int64_t group_size, bool simd) {
  const Codebook c = codebook_args(qweight, bits, K, table, scale, group_size);
  TORCH_CHECK(x.size(-1) == K, "x has ", x.size(-1), " features, the weight ", K);
  const Tensor xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = xf.size(0), G = K / c.gsz;
  Tensor y = at::empty({M, c.N}, xf.options());
  const float* X = xf.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const bool vec = simd && BITNEST_AVX512 && K % 64 == 0 && c.gsz % 64 == 0;
#if BITNEST_AVX512
  if (simd && codebook_spread_ok(c)) {  // b ≤ 4: tables in a register, no shuffle but the look-up itself
#if BN_PAIR
    if (x.scalar_type() == at::kBFloat16) {  // pairs of bf16 codes' table entries, vdpbf16ps
      const Tensor xb = x.reshape({-1, K}).contiguous();
      const std::vector<float> XP =
          spread_x_pair(reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>()), M, K, spread_nd(c.b));
      parallel_rows(0, c.N, min_rows(K * M), [&](int64_t i0, int64_t i1) { codebook_spread<true>(c, XP.data(), M, Y, i0, i1); });
      return y;
    }
#endif
    const std::vector<float> XP = spread_x(X, M, K, spread_nd(c.b));
    parallel_rows(0, c.N, min_rows(K * M), [&](int64_t i0, int64_t i1) { codebook_spread<false>(c, XP.data(), M, Y, i0, i1); });
    return y;
  }
#elif BITNEST_AVX2
  if (simd && avx2::codebook_ok(c)) {
    const std::vector<float> XP = avx2::spread_x(X, M, K, avx2::nd(c.b));
    parallel_rows(0, c.N, min_rows(K * M), [&](int64_t i0, int64_t i1) { avx2::codebook_spread(c, XP.data(), M, Y, i0, i1); });
    return y;
  }
#endif
  parallel_rows(0, c.N, min_rows(K * M), [&](int64_t i0, int64_t i1) {
    std::vector<float> T((1 << c.b) + 16), w(c.gsz), acc(M);
#if BITNEST_AVX512
    const Unpack64 unpack(c.b, c.qw + c.N * c.row_bytes);
#endif
    for (int64_t i = i0; i < i1; ++i) {
      const uint8_t* row = c.qw + i * c.row_bytes;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t g = 0; g < G; ++g) {
        c.table_at(i, g, T.data());
        const int64_t j0 = g * c.gsz;
#if BITNEST_AVX512
        if (vec) {
          const __m512 t0 = _mm512_loadu_ps(T.data()), t1 = _mm512_loadu_ps(T.data() + 16);
          for (int64_t k0 = j0; k0 < j0 + c.gsz; k0 += 64) {
            const __m512i q = unpack(row + (k0 / 64) * 8 * c.b);
            for (int v = 0; v < 4; ++v) {
              const __m512i idx = _mm512_cvtepu8_epi32(lane128(q, v));
              const __m512 wv = c.b <= 4 ? _mm512_permutexvar_ps(idx, t0)
                              : c.b == 5 ? _mm512_permutex2var_ps(t0, idx, t1)
                                         : _mm512_i32gather_ps(idx, T.data(), 4);
              _mm512_storeu_ps(w.data() + (k0 - j0) + 16 * v, wv);
            }
          }
        } else
#endif
        {
          for (int64_t j = 0; j < c.gsz; ++j) w[j] = T[code_at(row, j0 + j, c.b)];
        }
        const float s = c.scale_at(i, g);
        for (int64_t m = 0; m < M; ++m) {
          const float* xm = X + m * K + j0;
          float d;
#if BITNEST_AVX512
          if (vec) {
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            for (int64_t j = 0; j < c.gsz; j += 32) {
              a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w.data() + j), _mm512_loadu_ps(xm + j), a0);
              a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w.data() + j + 16), _mm512_loadu_ps(xm + j + 16), a1);
            }
            d = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
          } else
#endif
            d = dot_scalar(w.data(), xm, c.gsz);
          acc[m] += s * d;
        }
      }
      for (int64_t m = 0; m < M; ++m) Y[m * c.N + i] = acc[m];
    }
  });
  return y;
}

// Rows [row0, row1) of the codebook weight s·T[q], in `dtype`.
template <typename T>
void codebook_dequant_rows(const Codebook& c, T* O, int64_t row0, int64_t i0, int64_t i1, bool simd) {
  const int64_t G = c.K / c.gsz;
  std::vector<float> tab((1 << c.b) + 16, 0.f);
#if BITNEST_AVX512
  const bool vec = simd && c.K % 64 == 0 && c.gsz % 16 == 0;
  const Unpack64 unpack(c.b, c.qw + c.N * c.row_bytes);
#endif
  for (int64_t i = i0; i < i1; ++i) {
    const uint8_t* row = c.qw + i * c.row_bytes;
    T* o = O + (i - row0) * c.K;
#if BITNEST_AVX512
    if (vec) {
      for (int64_t k0 = 0; k0 < c.K; k0 += 64) {
        const __m512i q = unpack(row + (k0 / 64) * 8 * c.b);
        for (int v = 0; v < 4; ++v) {
          const int64_t g = (k0 + 16 * v) / c.gsz;
          if ((k0 + 16 * v) % c.gsz == 0) c.table_at(i, g, tab.data());
          const __m512i idx = _mm512_cvtepu8_epi32(lane128(q, v));
          const __m512 t0 = _mm512_loadu_ps(tab.data()), t1 = _mm512_loadu_ps(tab.data() + 16);
          const __m512 w = c.b <= 4 ? _mm512_permutexvar_ps(idx, t0)
                         : c.b == 5 ? _mm512_permutex2var_ps(t0, idx, t1) : _mm512_i32gather_ps(idx, tab.data(), 4);
          store16<T>(o + k0 + 16 * v, _mm512_mul_ps(w, _mm512_set1_ps(c.scale_at(i, g))));
        }
      }
      continue;
    }
#endif
    for (int64_t g = 0; g < G; ++g) {
      c.table_at(i, g, tab.data());
      const float sg = c.scale_at(i, g);
      for (int64_t j = g * c.gsz; j < (g + 1) * c.gsz; ++j) o[j] = static_cast<T>(sg * tab[code_at(row, j, c.b)]);
    }
  }
}

Tensor codebook_dequant(const Tensor& qweight, int64_t bits, int64_t K, const Tensor& table, const optional<Tensor>& scale,
                        int64_t group_size, int64_t row0, int64_t row1, at::ScalarType dtype, bool simd) {
  const Codebook c = codebook_args(qweight, bits, K, table, scale, group_size);
  TORCH_CHECK(0 <= row0 && row0 <= row1 && row1 <= c.N, "row range");
  Tensor out = at::empty({row1 - row0, K}, qweight.options().dtype(dtype));
  parallel_rows(row0, row1, min_rows(K), [&](int64_t i0, int64_t i1) {
    if (dtype == at::kFloat) codebook_dequant_rows<float>(c, out.data_ptr<float>(), row0, i0, i1, simd);
    else if (dtype == at::kBFloat16) codebook_dequant_rows<at::BFloat16>(c, out.data_ptr<at::BFloat16>(), row0, i0, i1, simd);
    else if (dtype == at::kHalf) codebook_dequant_rows<at::Half>(c, out.data_ptr<at::Half>(), row0, i0, i1, simd);
    else TORCH_CHECK(false, "dequantize to float32, bfloat16 or float16");
  });
  return out;
}

// ------------------------------------------------------------------------------------------ int8 × int8 -> int32

// acc (M, N) int32 = xq (M, K) int8 · wq (N, K)ᵀ int8, exact. VNNI: vpdpbusd multiplies unsigned × signed
// bytes, so x is offset by 128 (u = x + 128) and 128·Σ_j w_ij is subtracted again.
Tensor int8_linear(const Tensor& xq, const Tensor& wq, bool simd) {
  TORCH_CHECK(xq.dtype() == at::kChar && wq.dtype() == at::kChar && wq.is_contiguous() && wq.dim() == 2, "int8 operands");
  const int64_t K = wq.size(1), N = wq.size(0);
  TORCH_CHECK(xq.size(-1) == K, "x has ", xq.size(-1), " features, the weight ", K);
  const Tensor x = xq.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  Tensor acc = at::empty({M, N}, x.options().dtype(at::kInt));
  const int8_t* X = x.data_ptr<int8_t>();
  const int8_t* W = wq.data_ptr<int8_t>();
  int32_t* A = acc.data_ptr<int32_t>();
#if BITNEST_AVX512 && defined(__AVX512VNNI__)
  const bool vec = simd && K % 64 == 0;
  std::vector<uint8_t> xu(vec ? M * K : 0);
  for (size_t e = 0; e < xu.size(); ++e) xu[e] = static_cast<uint8_t>(static_cast<int32_t>(X[e]) + 128);
#endif
  parallel_rows(0, N, min_rows(K * M), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int8_t* w = W + i * K;
#if BITNEST_AVX512 && defined(__AVX512VNNI__)
      if (vec) {
        const __m512i ones = _mm512_set1_epi8(1);
        __m512i wsum = _mm512_setzero_si512();
        for (int64_t k0 = 0; k0 < K; k0 += 64) wsum = _mm512_dpbusd_epi32(wsum, ones, _mm512_loadu_si512(w + k0));
        const int32_t ws = _mm512_reduce_add_epi32(wsum);
        for (int64_t m = 0; m < M; ++m) {
          const uint8_t* u = xu.data() + m * K;
          __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
          int64_t k0 = 0;
          for (; k0 + 128 <= K; k0 += 128) {
            s0 = _mm512_dpbusd_epi32(s0, _mm512_loadu_si512(u + k0), _mm512_loadu_si512(w + k0));
            s1 = _mm512_dpbusd_epi32(s1, _mm512_loadu_si512(u + k0 + 64), _mm512_loadu_si512(w + k0 + 64));
          }
          if (k0 < K) s0 = _mm512_dpbusd_epi32(s0, _mm512_loadu_si512(u + k0), _mm512_loadu_si512(w + k0));
          A[m * N + i] = _mm512_reduce_add_epi32(_mm512_add_epi32(s0, s1)) - 128 * ws;
        }
        continue;
      }
#endif
#if BITNEST_AVX2
      if (simd && K % 16 == 0) {  // int8 -> int16, vpmaddwd: pairs of products summed exactly in int32
        for (int64_t m = 0; m < M; ++m) {
          const int8_t* xm = X + m * K;
          __m256i s0 = _mm256_setzero_si256();
          for (int64_t k0 = 0; k0 < K; k0 += 16) {
            const __m256i xv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xm + k0)));
            const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k0)));
            s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(xv, wv));
          }
          const __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s0), _mm256_extracti128_si256(s0, 1));
          const __m128i q = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
          A[m * N + i] = _mm_cvtsi128_si32(_mm_add_epi32(q, _mm_shuffle_epi32(q, 0xB1)));
        }
        continue;
      }
#endif
      for (int64_t m = 0; m < M; ++m) {
        int32_t s = 0;
        const int8_t* xm = X + m * K;
        for (int64_t j = 0; j < K; ++j) s += static_cast<int32_t>(xm[j]) * static_cast<int32_t>(w[j]);
        A[m * N + i] = s;
      }
    }
  });
  return acc;
}

// y (M, N) in `dtype` = s_y · clamp((acc + b_q) · M0 + 2^(k−1) >> k, ±127): the requantization of
// kernels/integer.py::requantize (int64 products, arithmetic shift = floor), fused with the output scale.
Tensor int8_requantize(const Tensor& acc, const optional<Tensor>& bias_q, const Tensor& M0, const Tensor& k,
                       const Tensor& y_scale, at::ScalarType dtype) {
  TORCH_CHECK(acc.dtype() == at::kInt && acc.is_contiguous() && acc.dim() == 2, "int32 accumulators (M, N)");
  const int64_t M = acc.size(0), N = acc.size(1);
  const Tensor m0 = M0.to(at::kLong).contiguous(), kk = k.to(at::kLong).contiguous(), ys = y_scale.to(at::kFloat).contiguous();
  const Tensor bq = bias_q.has_value() && bias_q->defined() ? bias_q->to(at::kLong).contiguous() : Tensor();
  TORCH_CHECK(m0.numel() == N && kk.numel() == N && (ys.numel() == N || ys.numel() == 1), "per-channel requantization");
  Tensor y = at::empty({M, N}, acc.options().dtype(at::kFloat));
  const int32_t* A = acc.data_ptr<int32_t>();
  const int64_t *P = m0.data_ptr<int64_t>(), *Kk = kk.data_ptr<int64_t>(), *Bq = bq.defined() ? bq.data_ptr<int64_t>() : nullptr;
  const float* Ys = ys.data_ptr<float>();
  const int64_t ystride = ys.numel() == 1 ? 0 : 1;
  float* Y = y.data_ptr<float>();
  parallel_rows(0, M, std::max<int64_t>(1, (1 << 16) / N), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t j = 0; j < N; ++j) {
        const int64_t a = static_cast<int64_t>(A[r * N + j]) + (Bq ? Bq[j] : 0);
        const int64_t q = std::min<int64_t>(127, std::max<int64_t>(-127, (a * P[j] + (int64_t(1) << (Kk[j] - 1))) >> Kk[j]));
        Y[r * N + j] = static_cast<float>(q) * Ys[j * ystride];
      }
  });
  return dtype == at::kFloat ? y : y.to(dtype);
}

// ------------------------------------------------------------------------------------------ Matryoshka slicing

// Eight 8-bit parent codes in one 64-bit word -> their r-bit slices packed in the low 8·ob bits (SWAR: a switch
// of a 1B-weight model slices ≈ 1 GB of codes, and the byte-by-byte loop ran at ≈ 1 GB/s; this one is memory-bound).
// Per byte: t = (q >> s) + bit s−1 of q ≤ 2^r (no carry into the next byte); the clamp subtracts 1 exactly where
// t = 2^r (bit r set); then pairs, quads and halves of the word are folded together at ob, 2·ob, 4·ob bits.
inline uint64_t slice8(uint64_t w, int s, int r, int ob, bool clamp) {
  constexpr uint64_t ones = 0x0101010101010101ull;
  uint64_t t = ((w >> s) & ((0xFFull >> s) * ones)) + ((w >> (s - 1)) & ones);
  if (clamp) t -= (t >> r) & ones;
  t = (t & 0x00FF00FF00FF00FFull) | ((t & 0xFF00FF00FF00FF00ull) >> (8 - ob));
  t = (t & 0x0000FFFF0000FFFFull) | ((t & 0xFFFF0000FFFF0000ull) >> (16 - 2 * ob));
  return (t & 0x00000000FFFFFFFFull) | ((t & 0xFFFFFFFF00000000ull) >> (32 - 4 * ob));
}

// c-bit codes packed at c bits (N, ⌈K·c/8⌉) -> t = min((q >> s) + ((q >> (s−1)) & 1), 2^r − 1), s = c − r,
// packed at r bits (clamp=false: no min, t may reach 2^r, written at r + 1 bits). Same bits as
// grids/nested.py::slice_codes followed by formats/packing.py::pack. out_: where to write (a caller's
// buffer; kernels/cpu.py passes none: a switch's copies stay on ordinary pages), else a new tensor.
Tensor slice_pack(const Tensor& qweight, int64_t c, int64_t r, int64_t K, bool clamp, const optional<Tensor>& out_) {
  TORCH_CHECK(qweight.dtype() == at::kByte && qweight.is_contiguous() && qweight.size(1) == (K * c + 7) / 8, "slice qweight");
  TORCH_CHECK(1 <= r && r < c && c <= 8, "slice widths");
  const int ob = static_cast<int>(clamp ? r : r + 1);
  const int64_t N = qweight.size(0), rb_in = qweight.size(1), rb_out = (K * ob + 7) / 8;
  Tensor out = out_.has_value() ? *out_ : at::empty({N, rb_out}, qweight.options());
  TORCH_CHECK(out.dtype() == at::kByte && out.is_contiguous() && out.dim() == 2 && out.size(0) == N && out.size(1) == rb_out,
              "slice_pack out");
  const uint8_t* Q = qweight.data_ptr<uint8_t>();
  uint8_t* O = out.data_ptr<uint8_t>();
  const int s = static_cast<int>(c - r);
  const uint32_t tmax = clamp ? (1u << r) - 1u : (1u << ob) - 1u;
  parallel_rows(0, N, min_rows(K), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const uint8_t* in = Q + i * rb_in;
      uint8_t* o = O + i * rb_out;
      int64_t j = 0;
      // The common parent c = 8: 8 codes in one word -> ob bytes out. Words [0, whole) are stored as whole 8-byte
      // words (each overwrites the previous one's zero high bytes), 8 of them at a time so that the compiler
      // vectorizes slice8 across them (one word at a time ran at ≈ 2 GB/s); the last few byte by byte.
      if (c == 8) {
        const int64_t words = K / 8, whole = rb_out < 8 ? 0 : std::min(words, (rb_out - 8) / ob + 1);
        int64_t w8 = 0;
        for (; w8 + 8 <= whole; w8 += 8) {
          uint64_t t[8];
          std::memcpy(t, in + 8 * w8, 64);
          for (int e = 0; e < 8; ++e) t[e] = slice8(t[e], s, static_cast<int>(r), ob, clamp);
          for (int e = 0; e < 8; ++e) std::memcpy(o + (w8 + e) * ob, t + e, 8);
        }
        for (; w8 < words; ++w8) {
          uint64_t w;
          std::memcpy(&w, in + 8 * w8, 8);
          w = slice8(w, s, static_cast<int>(r), ob, clamp);
          if (w8 < whole) std::memcpy(o + w8 * ob, &w, 8);
          else for (int e = 0; e < ob; ++e) o[w8 * ob + e] = static_cast<uint8_t>(w >> (8 * e));
        }
        j = 8 * words;
      }
      std::memset(o + (j / 8) * ob, 0, rb_out - (j / 8) * ob);  // the tail is OR-ed in below
      for (; j < K; ++j) {
        const uint32_t q = code_at(in, j, static_cast<int>(c));
        const uint32_t t = std::min((q >> s) + ((q >> (s - 1)) & 1u), tmax);
        const int64_t bit = j * ob;
        o[bit >> 3] |= static_cast<uint8_t>(t << (bit & 7));
        if ((bit & 7) + ob > 8) o[(bit >> 3) + 1] |= static_cast<uint8_t>(t >> (8 - (bit & 7)));
      }
    }
  });
  return out;
}

// Activation rows up to which the look-up-table kernel runs (0: never; no effect without AVX-512); `force`: on every
// width and batch it can compute, not only where it is the faster kernel. Returns the previous (limit, force). Tests
// run both kernels through it; benches compare them.
std::tuple<int64_t, bool> set_lut_max_batch(int64_t m, bool force) {
#if BITNEST_AVX512
  const bool was = g_lut_force.exchange(force);
  return {g_lut_max_m.exchange(static_cast<int>(m)), was};
#else
  return {0, false};
#endif
}

bool has_avx512() { return BITNEST_AVX512; }
// The vector path this build uses: "avx512", "avx2" or "portable"
std::string isa() { return BITNEST_AVX512 ? "avx512" : BITNEST_AVX2 ? "avx2" : "portable"; }

// Reads every byte of `buf` once (vector loads, all threads; the hardware prefetchers alone: software prefetch
// slows a pure stream here); returns a checksum so the reads cannot be optimized away. bench/speed.py times it:
// the machine's read bandwidth, the roofline every batch-1 row is compared with.
int64_t stream_read(const Tensor& buf) {
  TORCH_CHECK(buf.is_contiguous() && buf.dtype() == at::kByte, "a contiguous uint8 buffer");
  const uint8_t* p = buf.data_ptr<uint8_t>();
  const int64_t n = buf.numel() / 64 * 64;
  std::atomic<int64_t> check{0};
  parallel_rows(0, n / 64, 1 << 12, [&](int64_t b0, int64_t b1) {
    int64_t s = 0;
#if BITNEST_AVX512
    __m512i acc = _mm512_setzero_si512();
    for (int64_t b = b0; b < b1; ++b) acc = _mm512_xor_si512(acc, _mm512_loadu_si512(p + b * 64));
    s = _mm512_reduce_add_epi64(acc);
#elif BITNEST_AVX2
    __m256i acc = _mm256_setzero_si256();
    for (int64_t b = b0; b < b1; ++b) {
      acc = _mm256_xor_si256(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + b * 64)));
      acc = _mm256_xor_si256(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + b * 64 + 32)));
    }
    alignas(32) int64_t t[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(t), acc);
    s = t[0] ^ t[1] ^ t[2] ^ t[3];
#else
    for (int64_t b = b0 * 64; b < b1 * 64; b += 8) { int64_t v; std::memcpy(&v, p + b, 8); s ^= v; }
#endif
    check.fetch_xor(s);
  });
  return check.load();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("affine_linear", &affine_linear);
  m.def("affine_dequant", &affine_dequant);
  m.def("sign_affine_linear", &sign_affine_linear);
  m.def("sign_dequant", &sign_dequant);
  m.def("codebook_linear", &codebook_linear);
  m.def("codebook_dequant", &codebook_dequant);
  m.def("int8_linear", &int8_linear);
  m.def("int8_requantize", &int8_requantize);
  m.def("slice_pack", &slice_pack);
  m.def("set_lut_max_batch", &set_lut_max_batch);
  m.def("has_avx512", &has_avx512);
  m.def("isa", &isa);
  m.def("stream_read", &stream_read);
}
