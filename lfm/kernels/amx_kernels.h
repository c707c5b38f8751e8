// int4 weights x int8 activations on Intel AMX (TMUL): the batched-decode and prefill kernel where the CPU has it.
// Reads XQ4 (int4_prep.h): the int8 activations and their scales.
//
// Why: the AVX-512 VNNI kernel spends ~10 instructions per 128 inputs per activation row, so 16 rows cost ~13x one
// row and a batch of decodes gains little over sequential ones. One AMX tile multiply does a 16 x 64 by 64 x 16
// int8 product (16,384 multiply-adds); what is left per row is a float step per 64 inputs.
//
// The layout: a weight "unit" is what one pair of scales multiplies — 64 inputs (32 for group 32, where a unit is a
// group). Per 16 output rows, each unit's nibbles are unpacked once into an A tile (16 rows x 64 u8, in the
// activation order of XQ4: even inputs of the unit, then odd ones — exactly `v & 15`, `v >> 4` of the packed bytes),
// and the activations of 16 rows sit in B tiles (unit inputs / 4 rows x 16 rows x 4 s8, built once per call).
// TDPBUSD gives C[n][m] = sum_k q[n,k] xq[m,k] for 16 x 16 (n, m); then, per unit u of group g,
//   acc[n][m] += s[n,g] * (sx[m,u] C[n][m] + sx[m,u] (-8 sum_{k in u} xq[m,k]))   and at the end
//   + sum_g z[n,g] xsum[m,g]
// — the VNNI kernel's formula, with its own float order: results differ from it by float rounding only. Each
// (n, m) value is computed the same way whatever the batch, the thread split or the row chunking, so the general
// path and the fused decode step (which both call int4a8_amx) agree bit for bit.
// Speed at 16 rows (a decode batch) is set by the per-unit work, not by the weight stream: the unpack, the C tile's
// round trip through memory and the float step. So the unpack writes each unit with one 64-byte store, the block's
// scales are converted to float once (the FMA then broadcasts them from memory), the tile stores of one pair of units
// overlap the float step of the pair before, and the next block's weight rows are prefetched (16 rows apart are too
// many streams for the hardware prefetcher). Measured in a standalone harness (2 threads, 1024 -> 9216, 16 rows,
// weights streamed from memory): ~1.1-1.2x faster than the plain version.
#pragma once

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "int4_prep.h"

namespace {

// AMX-TILE and AMX-INT8 in CPUID.(7,0).EDX (bits 24, 25), and Linux's permission to use the tile state (asked once
// per process: ARCH_REQ_XCOMP_PERM for XTILEDATA). LFM_KERNELS_NO_AMX=1 turns the path off.
inline bool amx_int8() {
  static const bool ok = [] {
    if (std::getenv("LFM_KERNELS_NO_AMX") != nullptr) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 25) & 1)) return false;
    if (!__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512vl")) return false;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  }();
  return ok;
}

constexpr int64_t kNoAmx = int64_t(1) << 62;  // an amx_min_rows that never applies

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The activations of M rows for the AMX kernel, in 16-row m-tiles (rows past M are zero).
struct XAmx {
  int64_t MT = 0, U = 0, Ku = 64, G = 0;
  std::vector<int8_t> b;     // [MT][U][Ku / 4][64]: B tiles
  std::vector<float> sx;     // [MT][U][16]: the unit's activation scale
  std::vector<float> sxc;    // [MT][U][16]: sx times the unit's -8 sum xq
  std::vector<float> xsum;   // [MT][G][16]: exact float sum of x over each group
};

// from XQ4 (int8 activations, prepared by prep_x4 for this gs): allocation, then units (prep_amx_units)
inline void prep_amx_alloc(const XQ4& X, int64_t M, XAmx& A) {
  A.Ku = X.gs == 32 ? 32 : 64;
  A.U = X.K / A.Ku;  // real units only (group 32's padding half chunk has no weights)
  A.G = X.G;
  A.MT = (M + 15) / 16;
  const int64_t rows = A.Ku / 4;
  A.b.assign(static_cast<size_t>(A.MT * A.U * rows * 64), 0);  // rows past M stay zero
  A.sx.assign(static_cast<size_t>(A.MT * A.U * 16), 0.0f);
  A.sxc.assign(static_cast<size_t>(A.MT * A.U * 16), 0.0f);
  A.xsum.assign(static_cast<size_t>(A.MT * A.G * 16), 0.0f);
}

// The B tile of a unit holds, for each activation row m, its Ku int8 values as Ku / 4 dwords at a stride of 64 bytes:
// a scatter of the unit's dwords (standalone, 16 rows x 4608 inputs: 33 us against 57 for dword copies in a loop and
// 37 unrolled). Ku = 64: the unit is 64 contiguous bytes (evens then odds); Ku = 32: its evens and its odds are two
// 16-byte runs 32 bytes apart (group 32's lane layout). Units [u0, u1) for all M rows (and the groups that go with
// them): split between threads by units, never by rows — 16 rows share every cache line of a B tile, so threads
// splitting rows would write the same lines (perf: tile building by rows took ~4% of a 16-sequence decode step's
// samples; by units, that step's time outside the GEMVs and attention fell from ~5.5 to ~3.7 ms).
__attribute__((target("avx512f,avx512vl"))) inline void prep_amx_units(const XQ4& X, int64_t M, int64_t u0,
                                                                       int64_t u1, XAmx& A) {
  const int64_t rows = A.Ku / 4, srow = X.U + 8;
  const __m512i idx16 = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(16));
  const __m256i idx8 = _mm512_castsi512_si256(idx16);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t mt = m / 16, mm = m % 16;
    const int8_t* q = X.q8.data() + m * X.Kp;
    for (int64_t u = u0; u < u1; ++u) {
      int8_t* dst = A.b.data() + (mt * A.U + u) * rows * 64 + mm * 4;
      if (A.Ku == 64) {
        _mm512_i32scatter_epi32(dst, idx16, _mm512_loadu_si512(q + u * 64), 4);
      } else {
        const int8_t* lo = q + (u / 2) * 64 + 16 * (u % 2);
        const __m256i v = _mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo))),
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(lo + 32)), 1);
        _mm256_i32scatter_epi32(dst, idx8, v, 4);
      }
      A.sx[(mt * A.U + u) * 16 + mm] = X.s[m * srow + u];
      A.sxc[(mt * A.U + u) * 16 + mm] = X.s[m * srow + u] * X.corr[m * srow + u];
    }
    for (int64_t g = u0 * A.G / A.U; g < u1 * A.G / A.U; ++g) A.xsum[(mt * A.G + g) * 16 + mm] = X.sum[m * X.G + g];
  }
}

// one unit's products c [16 n][16 m] into the accumulators: acc[n] += s[n, g] (sx c[n] + sx corr), the scales
// read as floats from sc [16][Gp] (a function of its own: lambdas do not inherit the target attribute)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"), always_inline)) inline void amx_unit(
    const int32_t* c, const float* sxc, const float* sx, const float* sc, int64_t Gp, int64_t g, __m512* acc) {
  const __m512 b = _mm512_loadu_ps(sxc), a = _mm512_loadu_ps(sx);
  for (int r = 0; r < 16; ++r) {
    const __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(c + r * 16)), a, b);
    acc[r] = _mm512_fmadd_ps(t, _mm512_set1_ps(sc[r * Gp + g]), acc[r]);
  }
}

// units u and u + 1 (if there is one) of a pair, their products stored at c and c + 256
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"), always_inline)) inline void amx_pair(
    const int32_t* c, int64_t u, int64_t U, int64_t Ku, int64_t gs, const float* cv, const float* sv, const float* sc,
    int64_t Gp, __m512* acc) {
  amx_unit(c, cv + u * 16, sv + u * 16, sc, Gp, u * Ku / gs, acc);
  if (u + 1 < U) amx_unit(c + 256, cv + (u + 1) * 16, sv + (u + 1) * 16, sc, Gp, (u + 1) * Ku / gs, acc);
}

// bytes of per-thread scratch int4a8_amx needs for a K-input weight: the unpacked A tiles of 16 rows, two pairs of C
// tiles, the output tile, the block's scales and zeros as float
inline int64_t amx_scratch_bytes(int64_t K) {
  return 16 * round_up(K, 64) + 4 * 1024 + 1024 + 128 + 2 * 16 * 4 * round_up(K / 32 + 16, 16);
}

// Y[m, n] for all M rows and output rows [n0, n1) (n0 a multiple of 16). W: [N, K / 2] packed nibbles; S, Z:
// [N, G]. scratch: amx_scratch_bytes(K) bytes, 64-aligned.
template <typename TS, typename TO>
__attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq"))) void int4a8_amx(
    const XAmx& A, int64_t M, int64_t K, int64_t gs, const uint8_t* W, const TS* S, const TS* Z, TO* Y, int64_t N,
    int64_t n0, int64_t n1, uint8_t* scratch) {
  const int64_t Ku = A.Ku, U = A.U, G = A.G, rowsB = Ku / 4, half = K / 2, ub = Ku / 2;
  uint8_t* abuf = scratch;                                                  // [16][U][Ku]
  int32_t* cbuf = reinterpret_cast<int32_t*>(scratch + 16 * round_up(K, 64));  // 2 pairs x 2 x [16][16]
  float* obuf = reinterpret_cast<float*>(cbuf + 4 * 256);                  // [16][16]
  const int64_t Gp = round_up(G, 16);
  float* scf = obuf + 256 + 32;                                            // [16][Gp] scales as float
  float* zcf = scf + 16 * Gp;                                              // [16][Gp] zeros as float
  TileConfig cfg;
  for (int t = 0; t < 2; ++t) {  // tiles 0, 1: C; 2, 3: A; 4, 5: B
    cfg.rows[t] = 16, cfg.colsb[t] = 64;
    cfg.rows[2 + t] = 16, cfg.colsb[2 + t] = static_cast<uint16_t>(Ku);
    cfg.rows[4 + t] = static_cast<uint8_t>(rowsB), cfg.colsb[4 + t] = 64;
  }
  _tile_loadconfig(&cfg);
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  constexpr int64_t kMGroup = 4;  // m-tiles per pass over the weights: their B tiles stay in L2
  for (int64_t mg = 0; mg < A.MT; mg += kMGroup) {
    for (int64_t nb = n0; nb < n1; nb += 16) {
      const int64_t nr = std::min<int64_t>(16, n1 - nb);
      for (int64_t r = 0; r < 16; ++r) {  // unpack: unit u of row r at abuf[r * U * Ku + u * Ku]
        if (r >= nr) {
          for (int64_t u = 0; u < U; ++u) std::memset(abuf + r * U * Ku + u * Ku, 0, Ku);
          continue;
        }
        const uint8_t* w = W + (nb + r) * half;
        if (nb + 16 + r < N) {  // the next block's row: 16 rows apart, too many streams for the hardware prefetcher
          const char* pn = reinterpret_cast<const char*>(W + (nb + 16 + r) * half);
          for (int64_t o = 0; o < half; o += 64) _mm_prefetch(pn + o, _MM_HINT_T0);
        }
        if (Ku == 64) {
          uint8_t* d = abuf + r * U * 64;
          const __m512i lo4z = _mm512_set1_epi8(0x0F);
          for (int64_t u = 0; u < U; ++u) {  // [v & 15 | v >> 4 & 15]: one 64-byte store per unit
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + u * ub));
            const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1);
            _mm512_storeu_si512(d + u * 64, _mm512_and_si512(z, lo4z));
          }
        } else {
          for (int64_t u = 0; u < U; ++u) {
            const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + u * ub));
            uint8_t* d = abuf + r * U * 32 + u * 32;
            const __m128i l4 = _mm256_castsi256_si128(lo4);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm_and_si128(v, l4));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 16), _mm_and_si128(_mm_srli_epi16(v, 4), l4));
          }
        }
      }
      // the block's scales and zeros as float [16][Gp] (rows past N read row N - 1)
      for (int64_t r = 0; r < 16; ++r) {
        const int64_t n = std::min(nb + r, N - 1);
        for (int64_t g = 0; g < G; ++g) { scf[r * Gp + g] = to_f(S[n * G + g]); zcf[r * Gp + g] = to_f(Z[n * G + g]); }
      }
      for (int64_t mt = mg; mt < std::min(A.MT, mg + kMGroup); ++mt) {
        __m512 acc[16];
        for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
        const int8_t* bt = A.b.data() + mt * U * rowsB * 64;
        const float* cv = A.sxc.data() + mt * U * 16;
        const float* sv = A.sx.data() + mt * U * 16;
        // units in pairs (tiles 0/2/4 and 1/3/5); the products of a pair are stored while the float step of the
        // pair before runs, so the vector loads never wait on the tile stores just issued
        int pp = 0;  // which half of cbuf the pair being computed goes to
        for (int64_t u = 0; u < U; u += 2, pp ^= 1) {
          _tile_loadd(2, abuf + u * Ku, U * Ku);
          _tile_loadd(4, bt + u * rowsB * 64, 64);
          _tile_zero(0);
          _tile_dpbusd(0, 2, 4);
          if (u + 1 < U) {
            _tile_loadd(3, abuf + (u + 1) * Ku, U * Ku);
            _tile_loadd(5, bt + (u + 1) * rowsB * 64, 64);
            _tile_zero(1);
            _tile_dpbusd(1, 3, 5);
          }
          if (u > 0) amx_pair(cbuf + (pp ^ 1) * 512, u - 2, U, Ku, gs, cv, sv, scf, Gp, acc);
          _tile_stored(0, cbuf + pp * 512, 64);
          if (u + 1 < U) _tile_stored(1, cbuf + pp * 512 + 256, 64);
        }
        amx_pair(cbuf + (pp ^ 1) * 512, (U - 1) / 2 * 2, U, Ku, gs, cv, sv, scf, Gp, acc);
        const float* xs = A.xsum.data() + mt * G * 16;
        for (int64_t g = 0; g < G; ++g) {
          const __m512 v = _mm512_loadu_ps(xs + g * 16);
          for (int r = 0; r < 16; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(zcf[r * Gp + g]), v, acc[r]);
        }
        for (int r = 0; r < 16; ++r) _mm512_storeu_ps(obuf + r * 16, acc[r]);
        const int64_t mr = std::min<int64_t>(16, M - mt * 16);
        for (int64_t mm = 0; mm < mr; ++mm) {
          TO* y = Y + (mt * 16 + mm) * N + nb;
          for (int64_t r = 0; r < nr; ++r) store_out(y + r, obuf[r * 16 + mm]);
        }
      }
    }
  }
  _tile_release();
}

}  // namespace
