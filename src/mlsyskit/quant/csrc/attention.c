/* Decode attention read straight from the paged KV cache (no gather copy of the blocks).
 *
 * Each decoding sequence has one new query token. Its new key/value are first written to their
 * slot of the pool ((num_blocks, block_size, n_kv_heads, head_dim), float32 or float16: at
 * batch 64 attention is memory-bound on the keys and values, and fp16 halves them), then its query
 * heads attend over the sequence's context by walking its block table: scores q.k / sqrt(d), a
 * softmax (max subtracted), the weighted sum of the values. A task is one (sequence, kv head):
 * the G = H / Hkv query heads that share that kv head (grouped-query attention) go through its
 * keys and values together, so each key and value is read once per sequence. Tasks are shared
 * among threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* exp(x) for x <= 0 (scores minus their max), to ~2 ulp: 2^(x log2 e) split into 2^n (exponent
 * bits) and 2^f, f in [-0.5, 0.5], by a degree-6 polynomial (the Cephes expf coefficients). */
static inline float exp_nonpos(float x) {
    if (x < -87.f) return 0.f;
    const float t = x * 1.44269504088896341f, n = nearbyintf(t);
    const float f = (x - n * 0.693359375f) + n * 2.12194440e-4f; /* x - n ln 2, in two parts */
    float p = 1.9875691500e-4f;
    p = p * f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    p = p * f * f + f + 1.f;
    int32_t bits;
    memcpy(&bits, &p, 4);
    bits += (int32_t)n << 23;
    memcpy(&p, &bits, 4);
    return p;
}

/* half <-> float, one value (the SIMD loops below convert 8 or 16 at a time with F16C) */
static inline float h2f(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    float f;
    if (exp == 0) {
        f = ldexpf((float)man, -24);
        return sign ? -f : f;
    }
    const uint32_t bits = exp == 31 ? sign | 0x7F800000u | (man << 13) : sign | ((exp + 112) << 23) | (man << 13);
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline uint16_t f2h(float f) {
#if defined(__F16C__)
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else /* round to nearest even; keys and values are far from the fp16 range limits */
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000;
    int32_t exp = (int32_t)((x >> 23) & 0xFF) - 127 + 15;
    uint32_t man = x & 0x7FFFFF;
    if (exp >= 31) return (uint16_t)(sign | 0x7C00);
    if (exp <= 0) { /* subnormal half */
        if (exp < -10) return (uint16_t)sign;
        man |= 0x800000;
        const int shift = 14 - exp;
        uint32_t h = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((uint32_t)exp << 10) | (man >> 13), rem = man & 0x1FFF;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
#endif
}

/* q . k over D values, k float32 or float16. Explicit SIMD: GCC turns an `omp simd` float
 * reduction into 16 scalar adds in a row (measured here: 3x slower attention). */
static inline float dot(const float *a, const void *kv, int fp16, int D) {
    const float *b = (const float *)kv;
    const uint16_t *bh = (const uint16_t *)kv;
    int d = 0;
    float out = 0.f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; d + 16 <= D; d += 16) {
        const __m512 k = fp16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(bh + d))) : _mm512_loadu_ps(b + d);
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), k, acc);
    }
    out = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    for (; d + 8 <= D; d += 8) {
        const __m256 k = fp16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(bh + d))) : _mm256_loadu_ps(b + d);
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), k, acc);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    out = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
#endif
    for (; d < D; d++) out += a[d] * (fp16 ? h2f(bh[d]) : b[d]);
    return out;
}

/* o += p * v over D values, v float32 or float16 */
static inline void axpy(float *o, float p, const void *kv, int fp16, int D) {
    const float *v = (const float *)kv;
    const uint16_t *vh = (const uint16_t *)kv;
    int d = 0;
#if defined(__AVX512F__)
    const __m512 pv = _mm512_set1_ps(p);
    for (; d + 16 <= D; d += 16) {
        const __m512 x = fp16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(vh + d))) : _mm512_loadu_ps(v + d);
        _mm512_storeu_ps(o + d, _mm512_fmadd_ps(pv, x, _mm512_loadu_ps(o + d)));
    }
#elif defined(__AVX2__)
    const __m256 pv = _mm256_set1_ps(p);
    for (; d + 8 <= D; d += 8) {
        const __m256 x = fp16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vh + d))) : _mm256_loadu_ps(v + d);
        _mm256_storeu_ps(o + d, _mm256_fmadd_ps(pv, x, _mm256_loadu_ps(o + d)));
    }
#endif
    for (; d < D; d++) o[d] += p * (fp16 ? h2f(vh[d]) : v[d]);
}

/* n floats to the pool (float32, or float16 rounded to nearest even) */
static void store_kv(void *dst, const float *src, int64_t n, int fp16) {
    if (!fp16) {
        memcpy(dst, src, sizeof(float) * n);
        return;
    }
    uint16_t *h = (uint16_t *)dst;
    for (int64_t i = 0; i < n; i++) h[i] = f2h(src[i]);
}

#define MAXG 16 /* query heads per kv head handled together */

#if defined(__AVX512F__)
/* The G query heads' scores against n consecutive keys (fp32 or fp16, D a multiple of 16, at
 * most 256): each key is loaded (and converted) once for all G heads, not once per head. */
static void scores_avx512(const float *qg, const char *kb, int64_t stride, int fp16, int n, int G, int D,
                          float scale, float *s, int L, int t0, float *mx) {
    const int nd = D / 16;
    for (int t = 0; t < n; t++) {
        const char *k = kb + t * stride;
        __m512 kv[16];
        for (int j = 0; j < nd; j++)
            kv[j] = fp16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)k + 16 * j)))
                         : _mm512_loadu_ps((const float *)k + 16 * j);
        for (int g = 0; g < G; g++) {
            const float *qh = qg + g * D;
            __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qh), kv[0]);
            for (int j = 1; j < nd; j++) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * j), kv[j], acc);
            const float sc = _mm512_reduce_add_ps(acc) * scale;
            s[g * L + t0 + t] = sc;
            mx[g] = sc > mx[g] ? sc : mx[g];
        }
    }
}

/* o (G, D) += p[g][t] * v_t over n consecutive values: each value converted once for all heads */
static void values_avx512(float *o, const char *vb, int64_t stride, int fp16, int n, int G, int D,
                          const float *s, int L, int t0) {
    const int nd = D / 16;
    for (int t = 0; t < n; t++) {
        const char *v = vb + t * stride;
        __m512 vv[16];
        for (int j = 0; j < nd; j++)
            vv[j] = fp16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)v + 16 * j)))
                         : _mm512_loadu_ps((const float *)v + 16 * j);
        for (int g = 0; g < G; g++) {
            const __m512 p = _mm512_set1_ps(s[g * L + t0 + t]);
            float *og = o + g * D;
            for (int j = 0; j < nd; j++)
                _mm512_storeu_ps(og + 16 * j, _mm512_fmadd_ps(p, vv[j], _mm512_loadu_ps(og + 16 * j)));
        }
    }
}
#endif

/* q (B, H, D) row stride ldq between sequences; k_new / v_new (B, Hkv, D) row strides ldk / ldv;
 * slots (B,): flat slot (block * block_size + offset) of each new token; pools float32, or
 * float16 with kv_fp16; tables (B, max_blocks); lens (B,): context length including the new
 * token; out (B, H, D) contiguous. Returns 0, or -1 when out of memory or H / Hkv > MAXG. */
int mlsk_attn_decode(const float *q, int64_t ldq, const float *k_new, int64_t ldk, const float *v_new,
                     int64_t ldv, const int64_t *slots, void *k_pool, void *v_pool, int kv_fp16,
                     const int32_t *tables, int max_blocks, const int32_t *lens, float *out, int B,
                     int H, int Hkv, int D, int block_size, float scale, int threads) {
    const int64_t row = (int64_t)Hkv * D; /* values per token in the pool */
    const size_t es = kv_fp16 ? 2 : 4;
    char *kp = (char *)k_pool, *vp = (char *)v_pool;
    const int G = H / Hkv;
    int max_len = 0;
    int64_t work = 0;
    if (G > MAXG) return -1;
    for (int b = 0; b < B; b++) {
        store_kv(kp + slots[b] * row * es, k_new + b * ldk, row, kv_fp16);
        store_kv(vp + slots[b] * row * es, v_new + b * ldv, row, kv_fp16);
        max_len = lens[b] > max_len ? lens[b] : max_len;
        work += lens[b];
    }
    int failed = 0;
    /* a single short sequence is cheaper on one thread than waking the others */
#pragma omp parallel num_threads(threads) if (work * H * D >= (1 << 16))
    {
        float *s = malloc(sizeof(float) * G * (max_len > 0 ? max_len : 1)); /* (G, L) scores */
        if (!s) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < B * Hkv; i++) {
            if (!s) continue;
            const int b = i / Hkv, hk = i % Hkv, L = lens[b];
            const float *qg = q + b * ldq + (int64_t)hk * G * D; /* the group's G query heads */
            const int32_t *table = tables + (int64_t)b * max_blocks;
            float mx[MAXG], sum[MAXG];
            for (int g = 0; g < G; g++) mx[g] = -INFINITY, sum[g] = 0.f;
            /* the context block by block: token t of a block at base + t * row, no divisions */
            for (int t0 = 0; t0 < L; t0 += block_size) {
                const char *kb = kp + ((int64_t)table[t0 / block_size] * block_size * row + hk * D) * es;
                const int n = L - t0 < block_size ? L - t0 : block_size;
#if defined(__AVX512F__)
                if (D % 16 == 0 && D <= 256) {
                    scores_avx512(qg, kb, row * es, kv_fp16, n, G, D, scale, s, L, t0, mx);
                    continue;
                }
#endif
                for (int t = 0; t < n; t++) {
                    const void *k = kb + t * row * es;
                    for (int g = 0; g < G; g++) {
                        const float sc = dot(qg + g * D, k, kv_fp16, D) * scale;
                        s[g * L + t0 + t] = sc;
                        mx[g] = sc > mx[g] ? sc : mx[g];
                    }
                }
            }
            for (int g = 0; g < G; g++) {
                float *sg = s + g * L, acc = 0.f;
#pragma omp simd reduction(+ : acc)
                for (int t = 0; t < L; t++) {
                    sg[t] = exp_nonpos(sg[t] - mx[g]);
                    acc += sg[t];
                }
                sum[g] = acc;
            }
            float *o = out + ((int64_t)b * H + (int64_t)hk * G) * D; /* (G, D) */
            memset(o, 0, sizeof(float) * G * D);
            for (int t0 = 0; t0 < L; t0 += block_size) {
                const char *vb = vp + ((int64_t)table[t0 / block_size] * block_size * row + hk * D) * es;
                const int n = L - t0 < block_size ? L - t0 : block_size;
#if defined(__AVX512F__)
                if (D % 16 == 0 && D <= 256) {
                    values_avx512(o, vb, row * es, kv_fp16, n, G, D, s, L, t0);
                    continue;
                }
#endif
                for (int t = 0; t < n; t++) {
                    const void *v = vb + t * row * es;
                    for (int g = 0; g < G; g++) axpy(o + g * D, s[g * L + t0 + t], v, kv_fp16, D);
                }
            }
            for (int g = 0; g < G; g++) {
                const float inv = 1.f / sum[g];
                for (int d = 0; d < D; d++) o[g * D + d] *= inv;
            }
        }
        free(s);
    }
    return failed ? -1 : 0;
}
