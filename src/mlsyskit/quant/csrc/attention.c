/* Decode attention read straight from the paged KV cache (no gather copy of the blocks).
 *
 * Each decoding sequence has one new query token. Its new key/value are first written to their
 * slot of the pool (float32, (num_blocks, block_size, n_kv_heads, head_dim)), then its query
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

/* q . k over D floats. Explicit SIMD: GCC turns an `omp simd` float reduction into 16 scalar
 * adds in a row (measured here: 3x slower attention). */
static inline float dot(const float *a, const float *b, int D) {
    int d = 0;
    float out = 0.f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; d + 16 <= D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
    out = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    out = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
#endif
    for (; d < D; d++) out += a[d] * b[d];
    return out;
}

#define MAXG 16 /* query heads per kv head handled together */

/* q (B, H, D) row stride ldq between sequences; k_new / v_new (B, Hkv, D) row strides ldk / ldv;
 * slots (B,): flat slot (block * block_size + offset) of each new token; tables (B, max_blocks);
 * lens (B,): context length including the new token; out (B, H, D) contiguous.
 * Returns 0, or -1 when out of memory or H / Hkv > MAXG. */
int mlsk_attn_decode(const float *q, int64_t ldq, const float *k_new, int64_t ldk, const float *v_new,
                     int64_t ldv, const int64_t *slots, float *k_pool, float *v_pool,
                     const int32_t *tables, int max_blocks, const int32_t *lens, float *out, int B,
                     int H, int Hkv, int D, int block_size, float scale, int threads) {
    const int64_t row = (int64_t)Hkv * D; /* floats per token in the pool */
    const int G = H / Hkv;
    int max_len = 0;
    int64_t work = 0;
    if (G > MAXG) return -1;
    for (int b = 0; b < B; b++) {
        memcpy(k_pool + slots[b] * row, k_new + b * ldk, sizeof(float) * row);
        memcpy(v_pool + slots[b] * row, v_new + b * ldv, sizeof(float) * row);
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
                const float *kb = k_pool + (int64_t)table[t0 / block_size] * block_size * row + hk * D;
                const int n = L - t0 < block_size ? L - t0 : block_size;
                for (int t = 0; t < n; t++) {
                    const float *k = kb + t * row;
                    for (int g = 0; g < G; g++) {
                        const float sc = dot(qg + g * D, k, D) * scale;
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
                const float *vb = v_pool + (int64_t)table[t0 / block_size] * block_size * row + hk * D;
                const int n = L - t0 < block_size ? L - t0 : block_size;
                for (int t = 0; t < n; t++) {
                    const float *v = vb + t * row;
                    for (int g = 0; g < G; g++) {
                        const float p = s[g * L + t0 + t];
                        float *og = o + g * D;
#pragma omp simd
                        for (int d = 0; d < D; d++) og[d] += p * v[d];
                    }
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
