// nightshift's own CPU kernels, for x86-64 with AVX-512 (worker/cpu_kernels.py builds them
// for the CPU at hand). Each gives the bits MLX computes on a CPU; tests/test_packed_linear.py
// and tests/test_native_kernels.py check that.
//
// packed_matmul: the linear layers of a decode step (worker/packed_linear.py).
// C[M x N] = X[M x K] . W^T for a Linear's weight W[N x K], with few rows (a decode step's
// sequences). OpenBLAS packs W again at every call, and at such M the packing takes as
// long as the multiplication; here W is packed once, in panels of 32 output columns
// (panel p holds W[32p .. 32p+31][k] for k = 0..K-1, k-major), and streamed; as float16
// where every weight is one exactly (packed_matmul_half): the same values, half the bytes.
//
// The same bits as OpenBLAS's sgemm: each C element is one fused multiply-add chain
// over k, restarted at each boundary in `splits` (OpenBLAS's blocking of K), and the
// partial sums are added in order. packed_linear.py checks that on this machine before
// using it.
//
// swiglu: mlx-lm's SwiGLU, silu(gate) * up, with MLX's CPU exp and sigmoid (mlx/backend/cpu/
// simd/math.h, unary_ops.h) done 16 lanes at a time, operation for operation (built with
// -ffp-contract=off, as MLX's own never fuses what it keeps apart): 2.5-2.8x MLX's.
//
// decode_attention: a decode step's attention (one query per sequence and head) in one pass
// per KV head, summed in the orders of the OpenBLAS kernels MLX's matmuls reach there
// (worker/decode_attention.py checks the bits before using it).
//
// rope: mx.fast.rope's rotation (MLX's CPU fallback in mlx/fast.cpp: x1*cos - x2*sin and
// x1*sin + x2*cos, each product rounded, as here with -ffp-contract=off) with the cosines
// and sines read from a table of MLX's own (worker/rope.py).
#include <immintrin.h>

#include <cmath>
#include <vector>

#ifndef __AVX512F__
#error "needs AVX-512"
#endif

namespace {

constexpr int PANEL = 32;     // output columns per panel: two 16-float registers
constexpr int MAX_ROWS = 12;  // rows per block: 24 accumulators of the 32 registers
constexpr long PREFETCH_BYTES = 2048;  // ahead in the panel: the stream is memory-bound

// A panel's 32 weights of one k, as floats: stored as float32, or as float16 where every
// weight of the matrix is one exactly (worker/packed_linear.py): the same values, half the
// bytes to stream.
inline void load_panel(const float* w, __m512& lo, __m512& hi) {
  lo = _mm512_loadu_ps(w);
  hi = _mm512_loadu_ps(w + 16);
}
inline void load_panel(const unsigned short* w, __m512& lo, __m512& hi) {
  lo = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  hi = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16)));
}

template <int MR, typename W>
void block(const float* x, long ldx, const W* panel, float* c, long ldc, long k0, long k1,
           bool first) {
  __m512 lo[MR], hi[MR];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    lo[m] = _mm512_setzero_ps();
    hi[m] = _mm512_setzero_ps();
  }
  const W* w = panel + k0 * PANEL;
  constexpr long ahead = PREFETCH_BYTES / sizeof(W);
  for (long k = k0; k < k1; ++k, w += PANEL) {
    for (long line = 0; line < PANEL * long(sizeof(W)); line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(w + ahead) + line, _MM_HINT_T0);
    __m512 w_lo, w_hi;
    load_panel(w, w_lo, w_hi);
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

template <typename W>
using Block = void (*)(const float*, long, const W*, float*, long, long, long, bool);
template <typename W>
constexpr Block<W> blocks[MAX_ROWS + 1] = {
    nullptr,        block<1, W>,  block<2, W>,  block<3, W>, block<4, W>,
    block<5, W>,    block<6, W>,  block<7, W>,  block<8, W>, block<9, W>,
    block<10, W>,   block<11, W>, block<12, W>};

template <typename W>
void matmul(long m, long n, long k, const float* x, const W* packed, float* c,
            const long* splits, long n_splits) {
  const long row_blocks = (m + MAX_ROWS - 1) / MAX_ROWS;
  for (long p = 0; p < n / PANEL; ++p) {
    const W* panel = packed + p * k * PANEL;
    long m0 = 0;
    for (long b = 0; b < row_blocks; ++b) {
      const long rows = (m - m0) / (row_blocks - b);  // blocks of even size
      long k0 = 0;
      for (long s = 0; s <= n_splits; ++s) {
        const long k1 = s < n_splits ? splits[s] : k;
        blocks<W>[rows](x + m0 * k, k, panel, c + m0 * n + p * PANEL, n, k0, k1, s == 0);
        k0 = k1;
      }
      m0 += rows;
    }
  }
}

template <typename W, typename Convert>
void pack_as(long n, long k, const float* w, W* out, Convert convert) {
  for (long p = 0; p < n / PANEL; ++p)
    for (long j = 0; j < PANEL; ++j) {
      const float* row = w + (p * PANEL + j) * k;
      W* dst = out + p * k * PANEL + j;
      for (long i = 0; i < k; ++i) dst[i * PANEL] = convert(row[i]);
    }
}

// MLX's exp: x * log2(e) split into integer and fraction (its x + 0.5 is a double there:
// here too, or a float rounding up to the next integer would floor differently), a
// polynomial in the fraction, times 2^integer; NaN as is, inf above 88, 0 below -88.
inline __m512 exp_mlx(__m512 x_init) {
  const __m512 x = _mm512_mul_ps(x_init, _mm512_set1_ps(1.442695f));
  const __m512d half = _mm512_set1_pd(0.5);
  constexpr int FLOOR = _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC;
  const __m512d x_lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
  const __m512d x_hi = _mm512_cvtps_pd(
      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  const __m256 ipart_lo = _mm512_cvtpd_ps(_mm512_roundscale_pd(_mm512_add_pd(x_lo, half), FLOOR));
  const __m256 ipart_hi = _mm512_cvtpd_ps(_mm512_roundscale_pd(_mm512_add_pd(x_hi, half), FLOOR));
  const __m512 ipart = _mm512_insertf32x8(_mm512_castps256_ps512(ipart_lo), ipart_hi, 1);
  const __m512 fpart = _mm512_sub_ps(x, ipart);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, fpart, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, fpart, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, fpart, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, fpart, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, fpart, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, fpart, _mm512_set1_ps(1.000000000000000f));
  const __m512i epart = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvttps_epi32(ipart), _mm512_set1_epi32(127)), 23);
  __m512 result = _mm512_mul_ps(_mm512_castsi512_ps(epart), p);
  result = _mm512_mask_mov_ps(result, _mm512_cmp_ps_mask(x_init, x_init, _CMP_UNORD_Q), x_init);
  result = _mm512_mask_mov_ps(
      result, _mm512_cmp_ps_mask(x_init, _mm512_set1_ps(88.0f), _CMP_GT_OQ),
      _mm512_set1_ps(INFINITY));
  return _mm512_mask_mov_ps(
      result, _mm512_cmp_ps_mask(x_init, _mm512_set1_ps(-88.0f), _CMP_LT_OQ),
      _mm512_setzero_ps());
}

// MLX's sigmoid, 1 / (1 + exp(|x|)) or one minus it, and nn.silu: x * sigmoid(x).
inline __m512 silu_mlx(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 y = _mm512_div_ps(one, _mm512_add_ps(one, exp_mlx(_mm512_abs_ps(x))));
  const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mul_ps(x, _mm512_mask_mov_ps(_mm512_sub_ps(one, y), negative, y));
}

// out[j] = exp(x[j] - m), n contiguous (out may be x).
inline void shifted_exp_row(long n, const float* x, float m, float* out) {
  const __m512 shift = _mm512_set1_ps(m);
  long j = 0;
  for (; j + 16 <= n; j += 16)
    _mm512_storeu_ps(out + j, exp_mlx(_mm512_sub_ps(_mm512_loadu_ps(x + j), shift)));
  if (j < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - j)) - 1);
    _mm512_mask_storeu_ps(out + j, tail,
                          exp_mlx(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, x + j), shift)));
  }
}

// OpenBLAS's small-matrix sgemm kernels for AVX-512 (kernel/x86_64/sgemm_small_kernel_tn_
// and _nn_skylakex.c) are what MLX's matmuls reach at a decode step's attention: each query
// times a sequence's keys (TN: a dot product per key, 16 lanes summed over the head's
// dimensions, then added across lanes: four keys at a time in one tree, the last L mod 4
// keys each in _mm512_reduce_add_ps's), and the probabilities times its values (NN: one
// fused multiply-add chain per output over the keys, in order). `decode_attention` sums in
// those orders, so its bits are MLX's.
inline __m128 reduce_four(__m512 rr0, __m512 rr1, __m512 rr2, __m512 rr3) {
  __m512 r0 = _mm512_unpacklo_ps(rr0, rr1), r1 = _mm512_unpackhi_ps(rr0, rr1);
  __m512 r2 = _mm512_unpacklo_ps(rr2, rr3), r3 = _mm512_unpackhi_ps(rr2, rr3);
  __m512 t0 = _mm512_shuffle_ps(r0, r2, _MM_SHUFFLE(1, 0, 1, 0));
  __m512 t1 = _mm512_shuffle_ps(r0, r2, _MM_SHUFFLE(3, 2, 3, 2));
  __m512 t2 = _mm512_shuffle_ps(r1, r3, _MM_SHUFFLE(1, 0, 1, 0));
  __m512 t3 = _mm512_shuffle_ps(r1, r3, _MM_SHUFFLE(3, 2, 3, 2));
  r0 = _mm512_add_ps(t0, t1);
  r1 = _mm512_add_ps(t2, t3);
  t0 = _mm512_add_ps(r0, r1);
  __m128 s0 = _mm512_extractf32x4_ps(t0, 0), s1 = _mm512_extractf32x4_ps(t0, 1);
  __m128 s2 = _mm512_extractf32x4_ps(t0, 2), s3 = _mm512_extractf32x4_ps(t0, 3);
  return _mm_add_ps(_mm_add_ps(s0, s1), _mm_add_ps(s2, s3));
}

constexpr int HEADS = 4;  // query heads of one KV head done together

// scores[h][j] = q[h] . k[j] for `heads` queries (at most HEADS) and `length` keys, dims a
// multiple of 16, in OpenBLAS's TN order.
void head_scores(int heads, long length, long dims, const float* q, const float* k, long kst,
                 float* scores) {
  const long four = length & ~3L;
  long j = 0;
  for (; j < four; j += 4) {
    __m512 acc[HEADS][4];
    for (int h = 0; h < HEADS; ++h)
      for (int i = 0; i < 4; ++i) acc[h][i] = _mm512_setzero_ps();
    for (long d = 0; d < dims; d += 16) {
      __m512 key[4];
      for (int i = 0; i < 4; ++i) key[i] = _mm512_loadu_ps(k + (j + i) * kst + d);
      for (int h = 0; h < heads; ++h) {
        const __m512 qh = _mm512_loadu_ps(q + h * dims + d);
        for (int i = 0; i < 4; ++i) acc[h][i] = _mm512_fmadd_ps(key[i], qh, acc[h][i]);
      }
    }
    for (int h = 0; h < heads; ++h)
      _mm_storeu_ps(scores + h * length + j, reduce_four(acc[h][0], acc[h][1], acc[h][2], acc[h][3]));
  }
  for (; j < length; ++j) {
    for (int h = 0; h < heads; ++h) {
      __m512 acc = _mm512_setzero_ps();
      for (long d = 0; d < dims; d += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(k + j * kst + d), _mm512_loadu_ps(q + h * dims + d), acc);
      scores[h * length + j] = _mm512_reduce_add_ps(acc);
    }
  }
}

// MLX's softmax (worker/native_kernels.py `softmax`) of `heads` rows of n in place, each
// after its masked-out entries (mask[j] zero, if a mask is given) are set to the lowest
// float as mx.where does: the maximum (NaN if any is), exp of the differences, each times
// one over their sum, the sum taken in order (the rows' sums interleaved, not reordered).
void masked_softmax_rows(int heads, long n, const unsigned char* mask, float* x) {
  const __m512 lowest = _mm512_set1_ps(-3.40282347e+38f);  // mx.finfo(float32).min
  float maxima[HEADS];
  for (int h = 0; h < heads; ++h) {
    float* row = x + h * n;
    __m512 m = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    for (long j = 0; j < n; j += 16) {
      const __mmask16 part = n - j >= 16 ? 0xffff : static_cast<__mmask16>((1u << (n - j)) - 1);
      __m512 s = _mm512_maskz_loadu_ps(part, row + j);
      if (mask != nullptr) {
        const __m128i flags = _mm_maskz_loadu_epi8(part, mask + j);
        s = _mm512_mask_mov_ps(lowest, _mm_test_epi8_mask(flags, flags), s);
        _mm512_mask_storeu_ps(row + j, part, s);
      }
      nan |= _mm512_mask_cmp_ps_mask(part, s, s, _CMP_UNORD_Q);
      m = _mm512_mask_max_ps(m, part, m, s);
    }
    maxima[h] = nan ? NAN : _mm512_reduce_max_ps(m);
    shifted_exp_row(n, row, maxima[h], row);
  }
  float sums[HEADS] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (long j = 0; j < n; ++j)
    for (int h = 0; h < heads; ++h) sums[h] = x[h * n + j] + sums[h];
  for (int h = 0; h < heads; ++h) {
    const float r = 1.0f / sums[h];
    float* row = x + h * n;
    for (long j = 0; j < n; ++j) row[j] = row[j] * r;
  }
}

// out[h] = sum_j p[h][j] v[j] in OpenBLAS's NN order: one chain per output, keys in order.
void weighted_values(int heads, long length, long dims, const float* p, const float* v,
                     long vst, float* out) {
  for (long d0 = 0; d0 < dims; d0 += 64) {
    const int chunks = static_cast<int>(dims - d0 >= 64 ? 4 : (dims - d0) / 16);
    __m512 acc[HEADS][4];
    for (int h = 0; h < HEADS; ++h)
      for (int c = 0; c < 4; ++c) acc[h][c] = _mm512_setzero_ps();
    for (long j = 0; j < length; ++j) {
      const float* vj = v + j * vst + d0;
      __m512 val[4];
      for (int c = 0; c < chunks; ++c) val[c] = _mm512_loadu_ps(vj + 16 * c);
      for (int h = 0; h < heads; ++h) {
        const __m512 ph = _mm512_set1_ps(p[h * length + j]);
        for (int c = 0; c < chunks; ++c) acc[h][c] = _mm512_fmadd_ps(val[c], ph, acc[h][c]);
      }
    }
    for (int h = 0; h < heads; ++h)
      for (int c = 0; c < chunks; ++c) _mm512_storeu_ps(out + h * dims + d0 + 16 * c, acc[h][c]);
  }
}

// rope's traditional layout, adjacent pairs. Not vectorised: GCC reads this as a complex
// product and fuses it into vfmaddsub even with -ffp-contract=off, one bit off MLX's.
__attribute__((optimize("no-tree-vectorize"))) void rotate_pairs(long h, const float* in,
                                                                 const float* row, float* o) {
  for (long i = 0; i < h; ++i) {
    const float c = row[2 * i], s = row[2 * i + 1];
    const float x1 = in[2 * i], x2 = in[2 * i + 1];
    o[2 * i] = x1 * c - x2 * s;
    o[2 * i + 1] = x1 * s + x2 * c;
  }
}

}  // namespace

extern "C" {

// out[r][j] = exp(x[r][j] - m[r]): the exponentials of a softmax, rows x cols contiguous.
void shifted_exp(long rows, long cols, const float* x, const float* m, float* out) {
  for (long r = 0; r < rows; ++r) shifted_exp_row(cols, x + r * cols, m[r], out + r * cols);
}

// out = silu(gate) * up, n elements each, contiguous.
void swiglu(long n, const float* gate, const float* up, float* out) {
  long i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(out + i, _mm512_mul_ps(silu_mlx(_mm512_loadu_ps(gate + i)),
                                            _mm512_loadu_ps(up + i)));
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(out + i, tail,
                          _mm512_mul_ps(silu_mlx(_mm512_maskz_loadu_ps(tail, gate + i)),
                                        _mm512_maskz_loadu_ps(tail, up + i)));
  }
}

// W[N x K] row-major -> N/32 panels of K x 32. N must be a multiple of 32.
void pack(long n, long k, const float* w, float* out) {
  pack_as(n, k, w, out, [](float v) { return v; });
}

// As `pack`, each weight as float16; returns whether every one is a float16 exactly (if
// not, `out` is not to be used).
long pack_half(long n, long k, const float* w, unsigned short* out) {
  bool exact = true;
  pack_as(n, k, w, out, [&exact](float v) {
    const unsigned short h = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
    exact = exact && _cvtsh_ss(h) == v;  // NaN never is: kept as float32
    return h;
  });
  return exact;
}

// C[M x N] = X[M x K] . W^T from W packed by `pack`; X and C row-major, contiguous.
void packed_matmul(long m, long n, long k, const float* x, const float* packed, float* c,
                   const long* splits, long n_splits) {
  matmul(m, n, k, x, packed, c, splits, n_splits);
}

// The same from W packed by `pack_half`: the same sums of the same values.
void packed_matmul_half(long m, long n, long k, const float* x, const unsigned short* packed,
                        float* c, const long* splits, long n_splits) {
  matmul(m, n, k, x, packed, c, splits, n_splits);
}

// out[b, n, t, :] = x[b, n, t, :] rotated by the table's row start[b] + t, which holds
// [cos_0 .. cos_h-1, sin_0 .. sin_h-1] (h = dims / 2) or, traditional, [cos_0, sin_0, ...].
// x's last axis is contiguous; its other strides (in floats) are given; out is contiguous.
void rope(long batch, long heads, long steps, long d, long dims, long traditional,
          const float* x, long sb, long sn, long st, const int* start, const float* table,
          float* out) {
  const long h = dims / 2;
  for (long b = 0; b < batch; ++b) {
    for (long n = 0; n < heads; ++n) {
      for (long t = 0; t < steps; ++t) {
        const float* row = table + (start[b] + t) * dims;
        const float* in = x + b * sb + n * sn + t * st;
        float* o = out + ((b * heads + n) * steps + t) * d;
        if (traditional) {
          rotate_pairs(h, in, row, o);
        } else {
          for (long i = 0; i < h; ++i) {
            const float c = row[i], s = row[h + i];
            const float x1 = in[i], x2 = in[h + i];
            o[i] = x1 * c - x2 * s;
            o[h + i] = x1 * s + x2 * c;
          }
        }
        for (long i = dims; i < d; ++i) o[i] = in[i];
      }
    }
  }
}

// A decode step's attention, mx.fast.scaled_dot_product_attention as MLX computes it on a
// CPU (worker/native_kernels.py `attention`) for one query per sequence: q [batch][n_kv *
// repeats][dims] contiguous; k, v [batch][n_kv][length][dims] with the given strides (in
// floats; dims contiguous, a multiple of 16); mask[b * mask_stride + j] zero where the key
// is masked out, or null; out like q.
void decode_attention(long batch, long n_kv, long repeats, long length, long dims, float scale,
                      const float* q, const float* k, long ksb, long ksn, long kst,
                      const float* v, long vsb, long vsn, long vst, const unsigned char* mask,
                      long mask_stride, float* out) {
  std::vector<float> scratch(HEADS * (length + dims));
  float* scores = scratch.data();
  float* scaled = scores + HEADS * length;
  for (long b = 0; b < batch; ++b) {
    for (long g = 0; g < n_kv; ++g) {
      const float* kg = k + b * ksb + g * ksn;
      const float* vg = v + b * vsb + g * vsn;
      for (long h0 = 0; h0 < repeats; h0 += HEADS) {
        const int heads = static_cast<int>(repeats - h0 < HEADS ? repeats - h0 : HEADS);
        const long first = (b * n_kv + g) * repeats + h0;  // its first query head
        for (long i = 0; i < heads * dims; ++i) scaled[i] = scale * q[first * dims + i];
        head_scores(heads, length, dims, scaled, kg, kst, scores);
        masked_softmax_rows(heads, length, mask ? mask + b * mask_stride : nullptr, scores);
        weighted_values(heads, length, dims, scores, vg, vst, out + first * dims);
      }
    }
  }
}

}  // extern "C"
