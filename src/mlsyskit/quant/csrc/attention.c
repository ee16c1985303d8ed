/* Decode attention read straight from the paged KV cache (no gather copy of the blocks).
 *
 * Each decoding sequence has one new query token. Its new key/value are first written to their
 * slot of the pool (float32, (num_blocks, block_size, n_kv_heads, head_dim)), then every query
 * head attends over the sequence's context by walking its block table: scores q.k / sqrt(d), a
 * softmax (max subtracted), and the weighted sum of the values. Query head h reads kv head
 * h / (H / Hkv) (grouped-query attention). (sequence, head) pairs are shared among threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* q (B, H, D) row stride ldq between sequences; k_new / v_new (B, Hkv, D) row strides ldk / ldv;
 * slots (B,): flat slot (block * block_size + offset) of each new token; tables (B, max_blocks);
 * lens (B,): context length including the new token; out (B, H, D) contiguous.
 * Returns 0, or -1 when out of memory. */
int mlsk_attn_decode(const float *q, int64_t ldq, const float *k_new, int64_t ldk, const float *v_new,
                     int64_t ldv, const int64_t *slots, float *k_pool, float *v_pool,
                     const int32_t *tables, int max_blocks, const int32_t *lens, float *out, int B,
                     int H, int Hkv, int D, int block_size, float scale, int threads) {
    const int64_t row = (int64_t)Hkv * D; /* floats per token in the pool */
    int max_len = 0;
    int64_t work = 0;
    for (int b = 0; b < B; b++) {
        memcpy(k_pool + slots[b] * row, k_new + b * ldk, sizeof(float) * row);
        memcpy(v_pool + slots[b] * row, v_new + b * ldv, sizeof(float) * row);
        max_len = lens[b] > max_len ? lens[b] : max_len;
        work += lens[b];
    }
    const int group = H / Hkv;
    int failed = 0;
    /* a single short sequence is cheaper on one thread than waking the others */
#pragma omp parallel num_threads(threads) if (work * H * D >= (1 << 16))
    {
        float *s = malloc(sizeof(float) * (max_len > 0 ? max_len : 1));
        if (!s) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < B * H; i++) {
            if (!s) continue;
            const int b = i / H, h = i % H, L = lens[b];
            const int64_t hk = h / group;
            const float *qh = q + b * ldq + (int64_t)h * D;
            const int32_t *table = tables + (int64_t)b * max_blocks;
            float mx = -INFINITY;
            for (int t = 0; t < L; t++) {
                const float *k = k_pool + ((int64_t)table[t / block_size] * block_size + t % block_size) * row + hk * D;
                float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                for (int d = 0; d < D; d++) dot += qh[d] * k[d];
                s[t] = dot * scale;
                mx = s[t] > mx ? s[t] : mx;
            }
            float *o = out + (int64_t)i * D, sum = 0.f;
            memset(o, 0, sizeof(float) * D);
            for (int t = 0; t < L; t++) {
                const float p = expf(s[t] - mx);
                const float *v = v_pool + ((int64_t)table[t / block_size] * block_size + t % block_size) * row + hk * D;
                sum += p;
#pragma omp simd
                for (int d = 0; d < D; d++) o[d] += p * v[d];
            }
            const float inv = 1.f / sum;
            for (int d = 0; d < D; d++) o[d] *= inv;
        }
        free(s);
    }
    return failed ? -1 : 0;
}
