// The linear layers of a decode step on an x86-64 CPU with AVX-512 (worker/packed_linear.py).
//
// C[M x N] = X[M x K] . W^T for a Linear's weight W[N x K], with few rows (a decode step's
// sequences). OpenBLAS packs W again at every call, and at such M the packing takes as
// long as the multiplication; here W is packed once, in panels of 32 output columns
// (panel p holds W[32p .. 32p+31][k] for k = 0..K-1, k-major), and streamed.
//
// The same bits as OpenBLAS's sgemm: each C element is one fused multiply-add chain
// over k, restarted at each boundary in `splits` (OpenBLAS's blocking of K), and the
// partial sums are added in order. packed_linear.py checks that on this machine before
// using it.
#include <immintrin.h>

#ifndef __AVX512F__
#error "needs AVX-512"
#endif

namespace {

constexpr int PANEL = 32;     // output columns per panel: two 16-float registers
constexpr int MAX_ROWS = 12;  // rows per block: 24 accumulators of the 32 registers
constexpr int PREFETCH = 512; // floats ahead in the panel (2 KB): the stream is memory-bound

template <int MR>
void block(const float* x, long ldx, const float* panel, float* c, long ldc, long k0,
           long k1, bool first) {
  __m512 lo[MR], hi[MR];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    lo[m] = _mm512_setzero_ps();
    hi[m] = _mm512_setzero_ps();
  }
  const float* w = panel + k0 * PANEL;
  for (long k = k0; k < k1; ++k, w += PANEL) {
    _mm_prefetch(reinterpret_cast<const char*>(w + PREFETCH), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + PREFETCH + 16), _MM_HINT_T0);
    const __m512 w_lo = _mm512_loadu_ps(w), w_hi = _mm512_loadu_ps(w + 16);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const __m512 xm = _mm512_set1_ps(x[m * ldx + k]);
      lo[m] = _mm512_fmadd_ps(xm, w_lo, lo[m]);
      hi[m] = _mm512_fmadd_ps(xm, w_hi, hi[m]);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    float* cm = c + m * ldc;
    if (first) {
      _mm512_storeu_ps(cm, lo[m]);
      _mm512_storeu_ps(cm + 16, hi[m]);
    } else {
      _mm512_storeu_ps(cm, _mm512_add_ps(_mm512_loadu_ps(cm), lo[m]));
      _mm512_storeu_ps(cm + 16, _mm512_add_ps(_mm512_loadu_ps(cm + 16), hi[m]));
    }
  }
}

using Block = void (*)(const float*, long, const float*, float*, long, long, long, bool);
const Block blocks[MAX_ROWS + 1] = {nullptr,   block<1>, block<2>,  block<3>, block<4>,
                                    block<5>,  block<6>, block<7>,  block<8>, block<9>,
                                    block<10>, block<11>, block<12>};

}  // namespace

extern "C" {

// W[N x K] row-major -> N/32 panels of K x 32. N must be a multiple of 32.
void pack(long n, long k, const float* w, float* out) {
  for (long p = 0; p < n / PANEL; ++p)
    for (long j = 0; j < PANEL; ++j) {
      const float* row = w + (p * PANEL + j) * k;
      float* dst = out + p * k * PANEL + j;
      for (long i = 0; i < k; ++i) dst[i * PANEL] = row[i];
    }
}

// C[M x N] = X[M x K] . W^T from W packed by `pack`; X and C row-major, contiguous.
void packed_matmul(long m, long n, long k, const float* x, const float* packed, float* c,
                   const long* splits, long n_splits) {
  const long row_blocks = (m + MAX_ROWS - 1) / MAX_ROWS;
  for (long p = 0; p < n / PANEL; ++p) {
    const float* panel = packed + p * k * PANEL;
    long m0 = 0;
    for (long b = 0; b < row_blocks; ++b) {
      const long rows = (m - m0) / (row_blocks - b);  // blocks of even size
      long k0 = 0;
      for (long s = 0; s <= n_splits; ++s) {
        const long k1 = s < n_splits ? splits[s] : k;
        blocks[rows](x + m0 * k, k, panel, c + m0 * n + p * PANEL, n, k0, k1, s == 0);
        k0 = k1;
      }
      m0 += rows;
    }
  }
}

}  // extern "C"
