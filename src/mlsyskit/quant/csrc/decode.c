/* One decoder layer of the Llama family for B decoding sequences (one new token each), in C.
 *
 * At batch 1 a 135M-parameter model spends more time between the matrix products than in them
 * when every small step (norms, RoPE, the KV write, SwiGLU, residual adds) is its own PyTorch
 * op: ~35 calls per layer, microseconds each. Here a layer is one call:
 *
 *   h = rmsnorm(x) * attn_norm;  qkv = h Wqkv^T (+ bias);  RoPE on the q and k heads;
 *   write k, v to the paged pool and attend (attention.c);  x += attn Wo^T;
 *   h = rmsnorm(x) * ffn_norm;   [g | u] = h Wgate_up^T;  x += (silu(g) * u) Wdown^T
 *
 * The products are mlsk_qmatmul (quantized weights, qmatmul.c); everything in between is a
 * few thousand floats, done serially. The same math as mlsyskit.models.blocks, so the engine's
 * module path and this one agree to float32 rounding.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

typedef struct qpart qpart_t; /* qmatmul.c */

int mlsk_qmatmul(const float *x, int64_t ldx, int M, int K, const qpart_t *parts, int nparts,
                 float *y, int64_t ldy, int threads);
int mlsk_attn_decode(const float *q, int64_t ldq, const float *k_new, int64_t ldk, const float *v_new,
                     int64_t ldv, const int64_t *slots, void *k_pool, void *v_pool, int kv_fp16,
                     const int32_t *tables, int max_blocks, const int32_t *lens, float *out, int B,
                     int H, int Hkv, int D, int block_size, float scale, int threads);

typedef struct {
    const qpart_t *qkv, *o, *gate_up, *down; /* each a weight's parts (kernels.QWeight) */
    int32_t n_qkv, n_o, n_gate_up, n_down;
    const float *qkv_bias;                   /* NULL or ((H + 2 Hkv) D,) */
    const float *attn_norm, *ffn_norm;       /* (dim,) */
    void *k_pool, *v_pool;                   /* (num_blocks, block_size, Hkv, D) */
} layer_t;

typedef struct {
    int32_t dim, hidden, H, Hkv, D, block_size, kv_fp16;
    float eps;
    const float *cos, *sin_signed; /* (max_pos, D): RoPE tables, sin with its first half negated */
} dims_t;

static void rmsnorm(const float *x, const float *w, float *out, int n, float eps) {
    float ss = 0.f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

/* rotate-half RoPE in place: v * cos + roll(v, D/2) * sin_signed */
static void rope(float *v, const float *cos, const float *sin_signed, int D) {
    float tmp[512];
    const int half = D / 2;
    memcpy(tmp, v, sizeof(float) * D);
    for (int d = 0; d < D; d++) v[d] = tmp[d] * cos[d] + tmp[(d + half) % D] * sin_signed[d];
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

/* With stats: seconds spent in each phase are added to stats[0..5] = qkv, attention (RoPE, KV
 * write, attention), o_proj, gate_up, down, the rest (norms, SwiGLU, residual adds). */
#define LAP(i)                                                                                     \
    if (stats) {                                                                                   \
        const double t_ = now();                                                                   \
        stats[i] += t_ - t0;                                                                       \
        t0 = t_;                                                                                   \
    }

/* x (B, dim) is updated in place; scratch holds B * (2 dim + qkv + H D + 3 hidden) floats;
 * stats: NULL, or 6 doubles the phase times are added to. Returns 0, or -1 on failure. */
int mlsk_decode_layer(const layer_t *L, const dims_t *m, float *x, int B, const int32_t *pos,
                      const int64_t *slots, const int32_t *tables, int max_blocks,
                      const int32_t *lens, float *scratch, int threads, double *stats) {
    const int dim = m->dim, D = m->D, H = m->H, Hkv = m->Hkv, hid = m->hidden;
    const int nqkv = (H + 2 * Hkv) * D;
    float *h = scratch, *qkv = h + B * dim, *att = qkv + B * nqkv, *gu = att + B * H * D;
    float *act = gu + B * 2 * hid, *tmp = act + B * hid;
    double t0 = stats ? now() : 0.0;
    if (D > 512) return -1;

    for (int b = 0; b < B; b++) rmsnorm(x + b * dim, L->attn_norm, h + b * dim, dim, m->eps);
    LAP(5)
    if (mlsk_qmatmul(h, dim, B, dim, L->qkv, L->n_qkv, qkv, nqkv, threads)) return -1;
    LAP(0)
    for (int b = 0; b < B; b++) {
        float *row = qkv + (int64_t)b * nqkv;
        if (L->qkv_bias)
            for (int i = 0; i < nqkv; i++) row[i] += L->qkv_bias[i];
        const float *c = m->cos + (int64_t)pos[b] * D, *s = m->sin_signed + (int64_t)pos[b] * D;
        for (int j = 0; j < H + Hkv; j++) rope(row + j * D, c, s, D); /* q heads, then k heads */
    }
    if (mlsk_attn_decode(qkv, nqkv, qkv + H * D, nqkv, qkv + (H + Hkv) * D, nqkv, slots, L->k_pool,
                         L->v_pool, m->kv_fp16, tables, max_blocks, lens, att, B, H, Hkv, D, m->block_size,
                         1.f / sqrtf((float)D), threads))
        return -1;
    LAP(1)
    if (mlsk_qmatmul(att, H * D, B, H * D, L->o, L->n_o, tmp, dim, threads)) return -1;
    LAP(2)
    for (int i = 0; i < B * dim; i++) x[i] += tmp[i];

    for (int b = 0; b < B; b++) rmsnorm(x + b * dim, L->ffn_norm, h + b * dim, dim, m->eps);
    LAP(5)
    if (mlsk_qmatmul(h, dim, B, dim, L->gate_up, L->n_gate_up, gu, 2 * hid, threads)) return -1;
    LAP(3)
    for (int b = 0; b < B; b++)
        for (int i = 0; i < hid; i++) {
            const float g = gu[(int64_t)b * 2 * hid + i], u = gu[(int64_t)b * 2 * hid + hid + i];
            act[(int64_t)b * hid + i] = g / (1.f + expf(-g)) * u;
        }
    LAP(5)
    if (mlsk_qmatmul(act, hid, B, hid, L->down, L->n_down, tmp, dim, threads)) return -1;
    LAP(4)
    for (int i = 0; i < B * dim; i++) x[i] += tmp[i];
    LAP(5)
    return 0;
}
