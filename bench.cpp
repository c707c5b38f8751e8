#include "amx_kernels.h"
#include <chrono>
#include <cstdio>
#include <omp.h>
#include <random>
int main(int argc, char** argv) {
  const int64_t M = atoi(argv[1]), K = atoi(argv[2]), N = atoi(argv[3]), gs = 64;
  const int reps = 40;
  // many copies of the weights so they stream from memory (like a decode step): 16 layers' worth
  const int copies = std::max<int64_t>(1, 300000000 / (N * K));
  std::mt19937 rng(0);
  std::vector<std::vector<uint8_t>> W(copies);
  for (auto& w : W) { w.resize(N * K / 2); for (auto& b : w) b = rng(); }
  std::vector<BFloat16> S(N * K / gs), Z(N * K / gs);
  for (auto& s : S) s = BFloat16(0.01f * (rng() % 100 + 1)); for (auto& z : Z) z = BFloat16(0.001f * (int(rng() % 100) - 50));
  std::vector<float> x(M * K); std::normal_distribution<float> nd(0, 1); for (auto& v : x) v = nd(rng);
  XQ4 X; prep_x4_alloc(M, K, gs, false, X); std::vector<float> xf(X.Kp); prep_x4_rows(x.data(), 0, M, X, xf.data());
  XAmx A; prep_amx(X, M, A);
  std::vector<float> Y(M * N);
  if (!amx_int8()) { printf("no amx\n"); return 1; }
  int nt = omp_get_max_threads();
  std::vector<std::vector<uint8_t>> scr(nt, std::vector<uint8_t>(amx_scratch_bytes(K) + 64));
  std::vector<double> ts;
  for (int rep = 0; rep < reps; ++rep) {
    const uint8_t* w = W[rep % copies].data();
    auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel
    {
      uint8_t* s = (uint8_t*)(((uintptr_t)scr[omp_get_thread_num()].data() + 63) & ~uintptr_t(63));
#pragma omp for schedule(dynamic, 1)
      for (int64_t c = 0; c < N / 64; ++c) int4a8_amx(A, M, K, gs, w, S.data(), Z.data(), Y.data(), N, c * 64, c * 64 + 64, s);
    }
    ts.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ts.begin(), ts.end());
  double cs = 0; for (auto v : Y) cs += v;
  printf("M %ld K %ld N %ld threads %d: median %.0f us  min %.0f  => %.1f Gw/s  (cs %.4f)\n", M, K, N, nt, ts[reps/2], ts[0], N*K/ts[reps/2]/1e3, cs);
}
