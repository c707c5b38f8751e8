// The GEMV kernels (templates, no torch types): quantized activations, row kernels and their OpenMP dispatchers.
// Included by gemv.cpp (the torch-facing ops) and decode.cpp (the fused decode step).
//
// Weight-only quantized GEMV for decode (a few rows of activations times a big int8 / int4 weight), AVX2 + FMA.
//
// Three ways to multiply, chosen by the caller (act_bits) from the activations' dtype:
//
// - 32, float32 activations: the weights are converted to float and multiplied in float, 8 per FMA; the result is
//   x @ dequantized.T up to float rounding (what PyTorch's own kernels give).
// - 16, bfloat16 / float16 activations, int8 weights: activations quantized to int16 with one scale per 64 inputs
//   (~1e-5 relative error, far below bfloat16's own), integer products 16 at a time (_mm256_madd_epi16):
//     y[m,n] = c[n] * sum_b sx[m,b] * sum_{k in b} xq[m,k] q[n,k]
// - 8, bfloat16 / float16 activations, int4 weights: activations quantized to int8 with one scale per 64 inputs
//   (an error of the order of bfloat16's own rounding; what llama.cpp does for Q4 x Q8), nibbles times activations
//   32 at a time (_mm256_maddubs_epi16). With w = (q - 8) s + z per group (q in 0..15, two per byte: byte j of a
//   row holds q[2j] in its low nibble and q[2j+1] in its high one), per block b of 64 inputs (or of 32 in group 32):
//     y[m,n] = sum_b s[n,g(b)] sx[m,b] (sum_{k in b} xq[m,k] q[n,k] - 8 sum_{k in b} xq[m,k])
//              + sum_g z[n,g] xsum[m,g]                           (xsum: the exact float sum of x over the group)
//   (16 is available for int4 too: one scale per 32 inputs, nibbles widened to int16, _mm256_madd_epi16.)
//   The int4 weights are read in the portable layout as they are: instead of re-packing them, the quantized
//   activations are stored once per call in the order in which the nibbles come out of the registers (prep_x4).
//
// Activations are converted / quantized once per call (a few microseconds); weight rows are split over OpenMP
// threads (at::get_num_threads(); one for small problems). Rows of x are processed in tiles of up to 4 (more rows:
// each weight row is read from memory once, and from L1 for the other tiles; see by_row_tiles).

// The kernels, one header per kind (light headers, not <torch/extension.h>: the build takes a fraction of the time).
#pragma once
#include "int8_kernels.h"
#include "int4_prep.h"
#include "int4_kernels.h"
#include "gemvf_kernels.h"
