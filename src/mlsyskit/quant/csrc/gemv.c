/* Weight-only quantized matrix-vector products for small batches (LLM decode) on AVX2 CPUs.
 *
 * y[b, n] = sum_g scale[n, g] * sum_{k in group g} (q[n, k] - zero[n, g]) * x[b, k]
 *
 * Decode at batch 1 is memory-bound: each weight is read once per token, so reading 1 byte
 * (int8) or half a byte (int4) instead of 4 (fp32) is the speed-up. Weights are converted to
 * fp32 in registers, scaled, and multiplied with fused multiply-adds into 4 independent
 * accumulators per row of x (one chain would stall on the FMA latency); output rows are split
 * over OpenMP threads.
 *
 * q8: int8 codes, row-major (N, K), symmetric (no zero point).
 * q4: uint8, each 32-element block of a row stored in 16 bytes: byte j holds element j in its
 *     low nibble and element j + 16 in its high nibble; codes 0..15 with a zero point per group
 *     (sum s (q - z) x = sum (s q) x - s z sum x: the zero costs one multiply per group).
 * Requirements (checked by the Python caller): K and the group size multiples of 32, B <= 8.
 */
#include <immintrin.h>
#include <stdint.h>

#define MAXB 8

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 32 int8 codes -> 4 x 8 floats, times the group scale */
static inline void load_q8(const int8_t *p, __m256 sv, __m256 w[4]) {
    __m128i a = _mm_loadu_si128((const __m128i *)p), b = _mm_loadu_si128((const __m128i *)(p + 16));
    w[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a)), sv);
    w[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(a, 8))), sv);
    w[2] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), sv);
    w[3] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))), sv);
}

/* 16 bytes = 32 packed 4-bit codes -> 4 x 8 floats, times the group scale */
static inline void load_q4(const uint8_t *p, __m256 sv, __m256 w[4]) {
    const __m128i low = _mm_set1_epi8(0x0F);
    __m128i bytes = _mm_loadu_si128((const __m128i *)p);
    __m128i lo = _mm_and_si128(bytes, low), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
    w[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), sv);
    w[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), sv);
    w[2] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), sv);
    w[3] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), sv);
}

/* xsum[b, g] = sum of x[b, k] over group g: the zero-point term of every row. */
static void group_sums(const float *x, float *xsum, int B, int K, int gs) {
    const int G = K / gs;
    for (int b = 0; b < B; b++)
        for (int g = 0; g < G; g++) {
            float s = 0.f;
            for (int k = g * gs; k < (g + 1) * gs; k++) s += x[(long)b * K + k];
            xsum[b * G + g] = s;
        }
}

/* One output row for B rows of x. B == 1 (decode of one sequence, the common case) gets its own
 * loop with 4 register accumulators; for B > 1 the B rows are the independent chains. */
static inline void row(const float *x, const void *wrow, const float *srow, const float *zrow,
                       const float *xsum, float *y, int B, int N, int K, int gs, int q4) {
    const int G = K / gs;
    if (B == 1) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        float zterm = 0.f;
        for (int g = 0; g < G; g++) {
            const __m256 sv = _mm256_set1_ps(srow[g]);
            for (int k = g * gs; k < (g + 1) * gs; k += 32) {
                __m256 w[4];
                if (q4) load_q4((const uint8_t *)wrow + k / 2, sv, w);
                else load_q8((const int8_t *)wrow + k, sv, w);
                a0 = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(x + k), a0);
                a1 = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x + k + 8), a1);
                a2 = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x + k + 16), a2);
                a3 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x + k + 24), a3);
            }
            if (zrow) zterm += srow[g] * zrow[g] * xsum[g];
        }
        y[0] = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) - zterm;
        return;
    }
    __m256 acc[MAXB];
    float zterm[MAXB];
    for (int b = 0; b < B; b++) { acc[b] = _mm256_setzero_ps(); zterm[b] = 0.f; }
    for (int g = 0; g < G; g++) {
        const __m256 sv = _mm256_set1_ps(srow[g]);
        for (int k = g * gs; k < (g + 1) * gs; k += 32) {
            __m256 w[4];
            if (q4) load_q4((const uint8_t *)wrow + k / 2, sv, w);
            else load_q8((const int8_t *)wrow + k, sv, w);
            for (int b = 0; b < B; b++) {
                const float *xb = x + (long)b * K + k;
                __m256 t = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb));
                t = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8), t);
                __m256 u = _mm256_mul_ps(w[2], _mm256_loadu_ps(xb + 16));
                u = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), u);
                acc[b] = _mm256_add_ps(acc[b], _mm256_add_ps(t, u));
            }
        }
        if (zrow)
            for (int b = 0; b < B; b++) zterm[b] += srow[g] * zrow[g] * xsum[b * G + g];
    }
    for (int b = 0; b < B; b++) y[(long)b * N] = hsum(acc[b]) - zterm[b];
}

/* Separate entry points per layout so the compiler specialises row() for each (q4 constant). */
void gemv_q8(const float *x, const int8_t *w, const float *scale, float *y,
             int B, int N, int K, int gs, int threads) {
    const int G = K / gs;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = 0; n < N; n++)
        row(x, w + (long)n * K, scale + (long)n * G, 0, 0, y + n, B, N, K, gs, 0);
}

/* int8 with a zero point per group (asymmetric codes stored as q - 128, zero - 128). */
void gemv_q8z(const float *x, const int8_t *w, const float *scale, const float *zero,
              float *xsum, float *y, int B, int N, int K, int gs, int threads) {
    const int G = K / gs;
    group_sums(x, xsum, B, K, gs);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = 0; n < N; n++)
        row(x, w + (long)n * K, scale + (long)n * G, zero + (long)n * G, xsum, y + n, B, N, K, gs, 0);
}

void gemv_q4(const float *x, const uint8_t *w, const float *scale, const float *zero,
             float *xsum, float *y, int B, int N, int K, int gs, int threads) {
    const int G = K / gs;
    group_sums(x, xsum, B, K, gs);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = 0; n < N; n++)
        row(x, w + (long)n * (K / 2), scale + (long)n * G, zero + (long)n * G, xsum, y + n, B, N, K, gs, 1);
}
