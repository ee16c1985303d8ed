/* y = x W^T with W in 32-element quantized blocks, computed on the blocks as llama.cpp does.
 *
 * The activations x (M rows of K floats) are quantized to int8 per block of 32 (d = max|x|/127,
 * q = round(x / d)), so each (weight block, activation block) pair is one integer dot product:
 *
 *     w = d_w q_w + m_w    ->    sum_j w_j x_j  =  d_w d_x sum_j q_w,j q_x,j  +  m_w (d_x sum_j q_x,j)
 *
 * Weight formats (`format`):
 *   Q4_0  GGUF: blocks of {f16 d; 16 bytes}: byte j holds element j (low nibble) and j + 16 (high
 *         nibble); w = d (q - 8), i.e. m = -8 d.
 *   Q4_1  GGUF: {f16 d; f16 m; 16 bytes}, w = d q + m.
 *   Q8_0  GGUF: {f16 d; 32 x int8}, w = d q.
 *   U4    mlsyskit quantize: nibbles as Q4_x without headers; a float scale s and zero point z
 *         per group of `group_blocks` blocks in separate (rows, groups) arrays: w = s (q - z),
 *         i.e. d = s, m = -s z.
 *   I8    mlsyskit quantize: int8 codes, float scale (and zero point) per group.
 * A layer is one or more parts (q|k|v, gate|up fused without copying the file's tensors); a part
 * may send stored row r to output column col0 + perm[r] (llama.cpp's Q/K row order, undone).
 *
 * The integer dot products use, by build (cpu.c says which): AVX-512 VNNI `vpdpbusd` (u8 x s8 ->
 * s32, 4 products per lane), AVX-VNNI (the same on 256 bits), AVX2 (`pmaddubsw` + `pmaddwd`), or
 * portable C. u8 x s8 suits the unsigned nibbles directly; for signed int8 weights the sign of
 * the weight moves onto the activation (|w| x sign(x, w)). Output rows are shared out among
 * OpenMP threads in chunks (dynamic: a thread whose core is busy with another process takes
 * fewer), and each weight block, once unpacked, serves a tile of up to MR activation rows.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define QK 32
#define MR 4

enum { FMT_Q4_0 = 2, FMT_Q4_1 = 3, FMT_Q8_0 = 8, FMT_U4 = 100, FMT_I8 = 101 };

typedef struct qpart {
    const uint8_t *data;  /* stored row r starts at data + r * row_bytes */
    int64_t row_bytes;
    const float *scale;   /* U4 / I8: (rows, groups) */
    const float *zero;    /* U4 / I8: (rows, groups), or NULL for none: w = scale (q - zero) */
    const int32_t *perm;  /* NULL, or the output column (after col0) of each stored row */
    int32_t format;
    int32_t rows;
    int32_t col0;         /* output column of the part's first row */
    int32_t group_blocks; /* U4 / I8: blocks per scale group */
} qpart_t;

static inline float f16_to_f32(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    uint32_t bits;
    float f;
    if (exp == 0) { /* zero or subnormal: man * 2^-24 */
        f = ldexpf((float)man, -24);
        return sign ? -f : f;
    }
    bits = exp == 31 ? sign | 0x7F800000u | (man << 13) : sign | ((exp + 112) << 23) | (man << 13);
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* -- activations --------------------------------------------------------------------------- */

/* Activation layouts. For int8 weights, natural order. For 4-bit weights, blocks go in pairs
 * ("paired" layout): the low halves (elements 0..15) of blocks A and B, then their high halves,
 * [A0-15 B0-15 A16-31 B16-31], the order in which 32 stored bytes of two nibble blocks unpack
 * ([low nibbles A, B | high nibbles A, B]) with one shift and one mask. A last odd block stays
 * in natural order. xds holds (d, s = d * sum q) per block, interleaved. */
static void quantize_rows(const float *x, int64_t ldx, int M, int K, int8_t *q_lin, int8_t *q_pair,
                          float *xds, int threads) {
    const int nb = K / QK;
#pragma omp parallel for schedule(static) num_threads(threads) if (M >= 16)
    for (int m = 0; m < M; m++)
        for (int b = 0; b < nb; b++) {
            const float *xb = x + m * ldx + b * QK;
            int8_t tmp[QK];
            float amax = 0.f;
            for (int j = 0; j < QK; j++) {
                const float a = fabsf(xb[j]);
                amax = a > amax ? a : amax;
            }
            const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
            int sum = 0;
            for (int j = 0; j < QK; j++) {
                const int v = (int)nearbyintf(xb[j] * id);
                tmp[j] = (int8_t)v;
                sum += v;
            }
            xds[((int64_t)m * nb + b) * 2] = d;
            xds[((int64_t)m * nb + b) * 2 + 1] = d * (float)sum;
            if (q_lin) memcpy(q_lin + (int64_t)m * K + b * QK, tmp, QK);
            if (!q_pair) continue;
            int8_t *row = q_pair + (int64_t)m * K;
            if ((b ^ 1) < nb) { /* in a pair: A = even block, B = odd block */
                int8_t *pr = row + (b & ~1) * QK;
                const int off = (b & 1) * (QK / 2);
                memcpy(pr + off, tmp, QK / 2);
                memcpy(pr + QK + off, tmp + QK / 2, QK / 2);
            } else {
                memcpy(row + b * QK, tmp, QK);
            }
        }
}

/* -- weight blocks ------------------------------------------------------------------------- */

static inline int is_nibbles(int fmt) { return fmt == FMT_Q4_0 || fmt == FMT_Q4_1 || fmt == FMT_U4; }
static inline int block_bytes(int fmt) {
    return fmt == FMT_Q4_0 ? 18 : fmt == FMT_Q4_1 ? 20 : fmt == FMT_Q8_0 ? 34 : fmt == FMT_U4 ? 16 : 32;
}
static inline const uint8_t *codes_of(int fmt, const uint8_t *row, int b) {
    const int head = fmt == FMT_Q4_1 ? 4 : (fmt == FMT_Q4_0 || fmt == FMT_Q8_0) ? 2 : 0;
    return row + (int64_t)b * block_bytes(fmt) + head;
}

/* Scale d and min m of block b of stored row r (w = d q + m). */
static inline void dm_of(const qpart_t *p, int fmt, const uint8_t *row, int r, int b, int G,
                         float *d, float *m) {
    const uint8_t *blk = row + (int64_t)b * block_bytes(fmt);
    switch (fmt) {
    case FMT_Q4_0: *d = f16_to_f32(blk); *m = -8.f * *d; return;
    case FMT_Q4_1: *d = f16_to_f32(blk); *m = f16_to_f32(blk + 2); return;
    case FMT_Q8_0: *d = f16_to_f32(blk); *m = 0.f; return;
    default: {
        const int64_t g = (int64_t)r * G + b / p->group_blocks;
        *d = p->scale[g];
        *m = p->zero ? -*d * p->zero[g] : 0.f;
    }
    }
}

/* Weight value j (0..31) of a block's codes. Signed codes are read through an int8_t pointer:
 * GCC 12 vectorizes `(int8_t)u8[j] * s8[j]` sums with VNNI as if unsigned (wrong results). */
static inline int code_at(int fmt, const uint8_t *qs, int j) {
    if (!is_nibbles(fmt)) return ((const int8_t *)qs)[j];
    return j < QK / 2 ? qs[j] & 0x0F : qs[j - QK / 2] >> 4;
}

/* -- a pair of blocks against one activation row, per instruction set ---------------------- *
 * pair_dm: [dA mA dB mB] of blocks b, b+1. prod = pair_dm * [xdA xsA xdB xsB] gives the
 * integer dots' scales (lanes 0, 2) and the min terms (lanes 1, 3, summed separately). */
#if defined(__AVX2__)
typedef __m128 f4;
static inline f4 f4_load(const float *p) { return _mm_loadu_ps(p); }
static inline f4 f4_mul(f4 a, f4 b) { return _mm_mul_ps(a, b); }
static inline f4 f4_add(f4 a, f4 b) { return _mm_add_ps(a, b); }
static inline f4 f4_zero(void) { return _mm_setzero_ps(); }
static inline float f4_odd_sum(f4 a) { return _mm_cvtss_f32(_mm_shuffle_ps(a, a, 1)) + _mm_cvtss_f32(_mm_shuffle_ps(a, a, 3)); }

static inline uint32_t load32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint32_t load16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

static inline f4 pair_dm(const qpart_t *p, int fmt, const uint8_t *row, int r, int b, int G) {
    const uint8_t *a = row + (int64_t)b * block_bytes(fmt), *c = a + block_bytes(fmt);
    switch (fmt) {
    case FMT_Q4_1: /* {d, m} halves at the start of each block */
        return _mm_cvtph_ps(_mm_set_epi32(0, 0, (int)load32(c), (int)load32(a)));
    case FMT_Q4_0: {
        const f4 t = _mm_cvtph_ps(_mm_set_epi32(0, 0, (int)(load16(c) * 0x10001u), (int)(load16(a) * 0x10001u)));
        return _mm_mul_ps(t, _mm_set_ps(-8.f, 1.f, -8.f, 1.f));
    }
    case FMT_Q8_0: return _mm_cvtph_ps(_mm_set_epi32(0, 0, (int)load16(c), (int)load16(a)));
    default: {
        float dA, mA, dB, mB;
        dm_of(p, fmt, row, r, b, G, &dA, &mA);
        dm_of(p, fmt, row, r, b + 1, G, &dB, &mB);
        return _mm_set_ps(mB, dB, mA, dA);
    }
    }
}
#else
typedef struct {
    float v[4];
} f4;
static inline f4 f4_load(const float *p) { f4 r = {{p[0], p[1], p[2], p[3]}}; return r; }
static inline f4 f4_mul(f4 a, f4 b) { for (int i = 0; i < 4; i++) a.v[i] *= b.v[i]; return a; }
static inline f4 f4_add(f4 a, f4 b) { for (int i = 0; i < 4; i++) a.v[i] += b.v[i]; return a; }
static inline f4 f4_zero(void) { f4 r = {{0.f, 0.f, 0.f, 0.f}}; return r; }
static inline float f4_odd_sum(f4 a) { return a.v[1] + a.v[3]; }

static inline f4 pair_dm(const qpart_t *p, int fmt, const uint8_t *row, int r, int b, int G) {
    f4 t;
    dm_of(p, fmt, row, r, b, G, &t.v[0], &t.v[1]);
    dm_of(p, fmt, row, r, b + 1, G, &t.v[2], &t.v[3]);
    return t;
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* 64 weights in one register: nibbles as [lo A, lo B, hi A, hi B] (matching the paired
 * activations), int8 as [A, B]; u = the unsigned factor, w = the signed weights (int8 only). */
typedef struct {
    __m512i u, w;
} wpair;
typedef __m512 facc;

static inline wpair load_pair(int fmt, const uint8_t *row, int b) {
    const uint8_t *a = codes_of(fmt, row, b), *c = codes_of(fmt, row, b + 1);
    wpair v;
    if (is_nibbles(fmt)) {
        const __m256i ab = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)a)),
                                                   _mm_loadu_si128((const __m128i *)c), 1);
        const __m512i t = _mm512_inserti64x4(_mm512_castsi256_si512(ab), _mm256_srli_epi16(ab, 4), 1);
        v.u = v.w = _mm512_and_si512(t, _mm512_set1_epi8(0x0F));
    } else {
        v.w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)a)),
                                 _mm256_loadu_si256((const __m256i *)c), 1);
        v.u = _mm512_abs_epi8(v.w);
    }
    return v;
}

static inline facc pair_acc(facc acc, wpair w, int nibbles, const int8_t *xq, f4 prod) {
    __m512i x = _mm512_loadu_si512((const void *)xq);
    if (!nibbles) x = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w.w), _mm512_setzero_si512(), x);
    /* lanes of A get prod[0], lanes of B prod[2] */
    const __m512i idx = nibbles ? _mm512_set_epi32(2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0)
                                : _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512 sc = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(prod));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w.u, x)), sc, acc);
}

static inline facc acc_zero(void) { return _mm512_setzero_ps(); }
static inline float acc_sum(facc v) { return _mm512_reduce_add_ps(v); }

#elif defined(__AVX2__)
typedef struct {
    __m256i u0, u1, w0, w1; /* nibbles: u0 = lo A|B, u1 = hi A|B; int8: u0/w0 = A, u1/w1 = B */
} wpair;
typedef __m256 facc;

static inline wpair load_pair(int fmt, const uint8_t *row, int b) {
    const uint8_t *a = codes_of(fmt, row, b), *c = codes_of(fmt, row, b + 1);
    wpair v;
    if (is_nibbles(fmt)) {
        const __m256i ab = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)a)),
                                                   _mm_loadu_si128((const __m128i *)c), 1);
        const __m256i low = _mm256_set1_epi8(0x0F);
        v.u0 = v.w0 = _mm256_and_si256(ab, low);
        v.u1 = v.w1 = _mm256_and_si256(_mm256_srli_epi16(ab, 4), low);
    } else {
        v.w0 = _mm256_loadu_si256((const __m256i *)a);
        v.w1 = _mm256_loadu_si256((const __m256i *)c);
        v.u0 = _mm256_abs_epi8(v.w0);
        v.u1 = _mm256_abs_epi8(v.w1);
    }
    return v;
}

/* 8 lanes of int32, each the sum of 4 products u8 x s8 (added to acc) */
static inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else /* u8 x s8 pairs -> s16: no saturation, as u <= 128 and |s| <= 127 */
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

static inline facc pair_acc(facc acc, wpair w, int nibbles, const int8_t *xq, f4 prod) {
    const __m256i x0 = _mm256_loadu_si256((const __m256i *)xq), x1 = _mm256_loadu_si256((const __m256i *)(xq + 32));
    const __m256 sc = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(prod), _mm256_set_epi32(2, 2, 2, 2, 0, 0, 0, 0));
    if (nibbles) { /* lanes 0-3: block A, 4-7: block B */
        const __m256i lanes = dot_u8s8(dot_u8s8(_mm256_setzero_si256(), w.u0, x0), w.u1, x1);
        return _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), sc, acc);
    }
    const __m256i a = dot_u8s8(_mm256_setzero_si256(), w.u0, _mm256_sign_epi8(x0, w.w0));
    const __m256i c = dot_u8s8(_mm256_setzero_si256(), w.u1, _mm256_sign_epi8(x1, w.w1));
    /* sum each block's 8 lanes pairwise into 4: hadd gives [A01 A23 C01 C23 | A45 A67 C45 C67] */
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_permutevar8x32_epi32(_mm256_hadd_epi32(a, c), _mm256_set_epi32(7, 6, 3, 2, 5, 4, 1, 0))), sc, acc);
}

static inline facc acc_zero(void) { return _mm256_setzero_ps(); }

static inline float acc_sum(facc v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#else /* portable C: 64 weights in the activations' order */
typedef struct {
    int16_t v[2 * QK];
} wpair;
typedef float facc;

static inline wpair load_pair(int fmt, const uint8_t *row, int b) {
    const uint8_t *a = codes_of(fmt, row, b), *c = codes_of(fmt, row, b + 1);
    wpair v;
    if (is_nibbles(fmt)) /* [lo A, lo B, hi A, hi B] */
        for (int k = 0; k < QK / 2; k++) {
            v.v[k] = a[k] & 0x0F;
            v.v[QK / 2 + k] = c[k] & 0x0F;
            v.v[QK + k] = a[k] >> 4;
            v.v[3 * QK / 2 + k] = c[k] >> 4;
        }
    else
        for (int j = 0; j < QK; j++) {
            v.v[j] = ((const int8_t *)a)[j];
            v.v[QK + j] = ((const int8_t *)c)[j];
        }
    return v;
}

static inline int32_t dot16(const int16_t *w, const int8_t *x) {
    int32_t s = 0;
    for (int k = 0; k < QK / 2; k++) s += w[k] * x[k];
    return s;
}

static inline facc pair_acc(facc acc, wpair w, int nibbles, const int8_t *xq, f4 prod) {
    const int16_t *v = w.v;
    int32_t sa, sb;
    if (nibbles) {
        sa = dot16(v, xq) + dot16(v + QK, xq + QK);
        sb = dot16(v + QK / 2, xq + QK / 2) + dot16(v + 3 * QK / 2, xq + 3 * QK / 2);
    } else {
        sa = dot16(v, xq) + dot16(v + QK / 2, xq + QK / 2);
        sb = dot16(v + QK, xq + QK) + dot16(v + 3 * QK / 2, xq + 3 * QK / 2);
    }
    return acc + prod.v[0] * (float)sa + prod.v[2] * (float)sb;
}

static inline facc acc_zero(void) { return 0.f; }
static inline float acc_sum(facc v) { return v; }
#endif

/* -- one weight row against a tile of activation rows -------------------------------------- */

/* blocks b, b+1 of row r against activation rows i < mr */
static inline __attribute__((always_inline)) void step(const qpart_t *p, int fmt, const uint8_t *row,
                                                     int r, int b, int G, int nb, int K,
                                                     const int8_t *xq, const float *xds, int mr,
                                                     facc *acc, f4 *accm) {
    /* rows are contiguous: fetch 1 KB ahead, so memory works while we compute (10-15 % on
     * SmolLM2's weights here, measured against no prefetch and 256 B to 2 KB ahead) */
    __builtin_prefetch(row + (int64_t)b * block_bytes(fmt) + 1024, 0, 3);
    const f4 dm = pair_dm(p, fmt, row, r, b, G);
    const wpair w = load_pair(fmt, row, b);
    for (int i = 0; i < mr; i++) {
        const f4 prod = f4_mul(dm, f4_load(xds + ((int64_t)i * nb + b) * 2));
        accm[i] = f4_add(accm[i], prod);
        acc[i] = pair_acc(acc[i], w, is_nibbles(fmt), xq + (int64_t)i * K + b * QK, prod);
    }
}

/* out[i] = row r of the part . activation row i, for i < mr (mr <= MR, a constant once inlined).
 * Two accumulator chains per row (alternate steps), so the FMA latency does not serialise. */
static inline __attribute__((always_inline)) void dot_tile(const qpart_t *p, int fmt, int r, int K,
                                                         const int8_t *xq, const float *xds, int mr,
                                                         float *out) {
    const int nb = K / QK, G = (fmt == FMT_U4 || fmt == FMT_I8) ? nb / p->group_blocks : 0;
    const uint8_t *row = p->data + (int64_t)r * p->row_bytes;
    facc a0[MR], a1[MR];
    f4 m0[MR], m1[MR];
    for (int i = 0; i < mr; i++) {
        a0[i] = a1[i] = acc_zero();
        m0[i] = m1[i] = f4_zero();
    }
    int b = 0;
    for (; b + 4 <= nb; b += 4) {
        step(p, fmt, row, r, b, G, nb, K, xq, xds, mr, a0, m0);
        step(p, fmt, row, r, b + 2, G, nb, K, xq, xds, mr, a1, m1);
    }
    if (b + 2 <= nb) {
        step(p, fmt, row, r, b, G, nb, K, xq, xds, mr, a0, m0);
        b += 2;
    }
    for (int i = 0; i < mr; i++) {
        float tail = 0.f;
        if (b < nb) { /* an odd last block, natural order in both layouts: plain C */
            float d, m;
            dm_of(p, fmt, row, r, b, G, &d, &m);
            const uint8_t *qs = codes_of(fmt, row, b);
            const int8_t *x = xq + (int64_t)i * K + b * QK;
            int32_t sum = 0;
            for (int j = 0; j < QK; j++) sum += code_at(fmt, qs, j) * x[j];
            const float *xdsi = xds + ((int64_t)i * nb + b) * 2;
            tail = d * xdsi[0] * (float)sum + m * xdsi[1];
        }
        out[i] = acc_sum(a0[i]) + acc_sum(a1[i]) + f4_odd_sum(f4_add(m0[i], m1[i])) + tail;
    }
}

#define TILES(F)                                                                                   \
    switch (mr) {                                                                                  \
    case 1: dot_tile(p, F, r, K, xq, xds, 1, out); break;                                          \
    case 2: dot_tile(p, F, r, K, xq, xds, 2, out); break;                                          \
    case 3: dot_tile(p, F, r, K, xq, xds, 3, out); break;                                          \
    default: dot_tile(p, F, r, K, xq, xds, MR, out); break;                                        \
    }

static void dot_rows(const qpart_t *p, int r, int K, const int8_t *q_lin, const int8_t *q_pair,
                     const float *xds, int mr, float *out) {
    const int8_t *xq;
    switch (p->format) {
    case FMT_Q4_0: xq = q_pair; TILES(FMT_Q4_0) break;
    case FMT_Q4_1: xq = q_pair; TILES(FMT_Q4_1) break;
    case FMT_Q8_0: xq = q_lin; TILES(FMT_Q8_0) break;
    case FMT_U4: xq = q_pair; TILES(FMT_U4) break;
    default: xq = q_lin; TILES(FMT_I8) break;
    }
}

/* -- many activation rows: one row per SIMD lane ------------------------------------------ *
 * From GEMM_ROWS rows on (batched decode, prefill chunks) the roles turn around: a register
 * holds LANES activation rows side by side, 4 bytes of each (the activations are re-laid out
 * once per call: tile of LANES rows, block, group of 4 elements). For one weight block, 8
 * broadcasts of 4 weights and 8 dot instructions then serve LANES rows, and each lane applies
 * its own row's scale. Per weight block and 16 rows that is ~12 instructions, against ~28 for
 * the one-row-at-a-time tiles above. Signed weights: on AVX-512 the activations go in as
 * unsigned x + 128 and 128 * sum(w) is taken off; on AVX2 the weights' signs move onto x. */
#if defined(__AVX2__)
#define GEMM_ROWS 8
#define GEMM_TILES 4 /* tiles of LANES rows whose accumulators stay in registers */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LANES 16
typedef __m512i ivec;
typedef __m512 fvec;
static inline ivec iv_zero(void) { return _mm512_setzero_si512(); }
static inline ivec iv_bcast(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return _mm512_set1_epi32(v); }
static inline ivec iv_load(const int8_t *p) { return _mm512_loadu_si512((const void *)p); }
/* isum += 4-element dots of weights w (broadcast) with the lanes' activations x */
static inline ivec lane_dot(ivec isum, ivec w, ivec wabs, ivec x, int nibbles) {
    (void)wabs;
    if (nibbles) return _mm512_dpbusd_epi32(isum, w, x);
    return _mm512_dpbusd_epi32(isum, _mm512_xor_si512(x, _mm512_set1_epi8((char)0x80)), w);
}
static inline ivec iv_sub_const(ivec a, int32_t c) { return _mm512_sub_epi32(a, _mm512_set1_epi32(c)); }
static inline fvec fv_zero(void) { return _mm512_setzero_ps(); }
static inline fvec fv_load(const float *p) { return _mm512_loadu_ps(p); }
static inline fvec fv_fma_scaled(fvec acc, ivec isum, float d, const float *xd) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(_mm512_set1_ps(d), fv_load(xd)), acc);
}
static inline fvec fv_fma(fvec acc, float m, const float *xs) { return _mm512_fmadd_ps(_mm512_set1_ps(m), fv_load(xs), acc); }
static inline void fv_store(float *p, fvec a, fvec b) { _mm512_storeu_ps(p, _mm512_add_ps(a, b)); }
#else
#define LANES 8
typedef __m256i ivec;
typedef __m256 fvec;
static inline ivec iv_zero(void) { return _mm256_setzero_si256(); }
static inline ivec iv_bcast(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return _mm256_set1_epi32(v); }
static inline ivec iv_load(const int8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline ivec lane_dot(ivec isum, ivec w, ivec wabs, ivec x, int nibbles) {
    if (nibbles) return dot_u8s8(isum, w, x);
    return dot_u8s8(isum, wabs, _mm256_sign_epi8(x, w));
}
static inline ivec iv_sub_const(ivec a, int32_t c) { return _mm256_sub_epi32(a, _mm256_set1_epi32(c)); }
static inline fvec fv_zero(void) { return _mm256_setzero_ps(); }
static inline fvec fv_load(const float *p) { return _mm256_loadu_ps(p); }
static inline fvec fv_fma_scaled(fvec acc, ivec isum, float d, const float *xd) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(_mm256_set1_ps(d), fv_load(xd)), acc);
}
static inline fvec fv_fma(fvec acc, float m, const float *xs) { return _mm256_fmadd_ps(_mm256_set1_ps(m), fv_load(xs), acc); }
static inline void fv_store(float *p, fvec a, fvec b) { _mm256_storeu_ps(p, _mm256_add_ps(a, b)); }
#endif

/* q (M, K) int8 in natural order and xds -> xi: per tile of LANES rows, block, group of 4
 * elements, LANES x 4 bytes; xd / xs: per tile and block, LANES scales / sums (0 past M). */
static void interleave_rows(const int8_t *q, const float *xds, int M, int K, int8_t *xi, float *xd, float *xs) {
    const int nb = K / QK, T = (M + LANES - 1) / LANES;
    for (int t = 0; t < T; t++)
        for (int b = 0; b < nb; b++) {
            int8_t *dst = xi + ((int64_t)t * nb + b) * 8 * LANES * 4;
            for (int i = 0; i < LANES; i++) {
                const int m = t * LANES + i;
                for (int g = 0; g < 8; g++)
                    if (m < M) memcpy(dst + (g * LANES + i) * 4, q + (int64_t)m * K + b * QK + 4 * g, 4);
                    else memset(dst + (g * LANES + i) * 4, 0, 4);
                xd[((int64_t)t * nb + b) * LANES + i] = m < M ? xds[((int64_t)m * nb + b) * 2] : 0.f;
                xs[((int64_t)t * nb + b) * LANES + i] = m < M ? xds[((int64_t)m * nb + b) * 2 + 1] : 0.f;
            }
        }
}

/* weight row r against all M activation rows (interleaved), results into column col of y */
static inline __attribute__((always_inline)) void gemm_row(const qpart_t *p, int fmt, int r, int K,
                                                          const int8_t *xi, const float *xd,
                                                          const float *xs, int M, float *y,
                                                          int64_t ldy, int64_t col) {
    const int nb = K / QK, G = (fmt == FMT_U4 || fmt == FMT_I8) ? nb / p->group_blocks : 0;
    const int nib = is_nibbles(fmt), T = (M + LANES - 1) / LANES;
    const uint8_t *row = p->data + (int64_t)r * p->row_bytes;
    for (int t0 = 0; t0 < T; t0 += GEMM_TILES) {
        const int nt = T - t0 < GEMM_TILES ? T - t0 : GEMM_TILES;
        fvec acc[GEMM_TILES], accm[GEMM_TILES];
        for (int k = 0; k < GEMM_TILES; k++) acc[k] = accm[k] = fv_zero();
        for (int b = 0; b < nb; b++) {
            float d, m;
            dm_of(p, fmt, row, r, b, G, &d, &m);
            const uint8_t *qs = codes_of(fmt, row, b);
            int8_t w[QK]; /* the block's 32 weights in order */
            int32_t wsum = 0;
            if (nib) {
                const __m128i v = _mm_loadu_si128((const __m128i *)qs), low = _mm_set1_epi8(0x0F);
                _mm_storeu_si128((__m128i *)w, _mm_and_si128(v, low));
                _mm_storeu_si128((__m128i *)(w + 16), _mm_and_si128(_mm_srli_epi16(v, 4), low));
            } else {
                memcpy(w, qs, QK);
#if LANES == 16
                const __m256i s16 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), _mm256_loadu_si256((const __m256i *)w)),
                                                      _mm256_set1_epi16(1));
                __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s16), _mm256_extracti128_si256(s16, 1));
                h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
                wsum = _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1)));
#endif
            }
            ivec wb[8], wabs[8];
            for (int g = 0; g < 8; g++) {
                wb[g] = iv_bcast(w + 4 * g);
#if LANES == 8
                wabs[g] = _mm256_abs_epi8(wb[g]);
#else
                wabs[g] = wb[g];
#endif
            }
            for (int k = 0; k < nt; k++) {
                const int64_t tb = (int64_t)(t0 + k) * nb + b;
                const int8_t *x = xi + tb * 8 * LANES * 4;
                ivec isum = iv_zero();
                for (int g = 0; g < 8; g++) isum = lane_dot(isum, wb[g], wabs[g], iv_load(x + g * LANES * 4), nib);
#if LANES == 16
                if (!nib) isum = iv_sub_const(isum, 128 * wsum); /* x went in as x + 128 */
#endif
                acc[k] = fv_fma_scaled(acc[k], isum, d, xd + tb * LANES);
                if (fmt != FMT_Q8_0) accm[k] = fv_fma(accm[k], m, xs + tb * LANES);
            }
        }
        for (int k = 0; k < nt; k++) {
            float out[LANES];
            fv_store(out, acc[k], accm[k]);
            for (int i = 0; i < LANES && (t0 + k) * LANES + i < M; i++) y[(int64_t)((t0 + k) * LANES + i) * ldy + col] = out[i];
        }
    }
}

static void gemm_rows(const qpart_t *p, int r, int K, const int8_t *xi, const float *xd, const float *xs, int M,
                      float *y, int64_t ldy, int64_t col) {
    switch (p->format) {
    case FMT_Q4_0: gemm_row(p, FMT_Q4_0, r, K, xi, xd, xs, M, y, ldy, col); break;
    case FMT_Q4_1: gemm_row(p, FMT_Q4_1, r, K, xi, xd, xs, M, y, ldy, col); break;
    case FMT_Q8_0: gemm_row(p, FMT_Q8_0, r, K, xi, xd, xs, M, y, ldy, col); break;
    case FMT_U4: gemm_row(p, FMT_U4, r, K, xi, xd, xs, M, y, ldy, col); break;
    default: gemm_row(p, FMT_I8, r, K, xi, xd, xs, M, y, ldy, col); break;
    }
}
#endif

/* -- entry points -------------------------------------------------------------------------- */

/* Scratch for the quantized activations, kept between calls (grows, never shrinks). The
 * engine calls from one thread at a time; a second caller thread gets its own buffer. */
static __thread int8_t *scratch;
static __thread size_t scratch_bytes;

static int8_t *scratch_for(size_t bytes) {
    if (bytes > scratch_bytes) {
        free(scratch);
        scratch = malloc(bytes);
        scratch_bytes = scratch ? bytes : 0;
    }
    return scratch;
}

/* y (M, N) row stride ldy = x (M, K) row stride ldx times the parts' rows (N in all).
 * Returns 0, or -1 when memory for the quantized activations is lacking. */
int mlsk_qmatmul(const float *x, int64_t ldx, int M, int K, const qpart_t *parts, int nparts,
                 float *y, int64_t ldy, int threads) {
    const int nb = K / QK;
    int need_pair = 0, need_lin = 0, total = 0, starts[17];
    for (int i = 0; i < nparts && i < 16; i++) {
        starts[i] = total;
        total += parts[i].rows;
        if (is_nibbles(parts[i].format)) need_pair = 1;
        else need_lin = 1;
    }
    starts[nparts] = total;
    /* ~8 chunks per thread: small enough to balance, large enough to amortise the hand-out */
    const int chunk = total / (8 * threads) > 4 ? total / (8 * threads) : 4;
    const size_t qbytes = ((size_t)M * K + 63) & ~(size_t)63;
#if defined(__AVX2__)
    if (M >= GEMM_ROWS) { /* activation rows in lanes (see gemm_row) */
        const size_t T = (M + LANES - 1) / LANES, ibytes = T * LANES * (size_t)K;
        int8_t *buf = scratch_for(qbytes + ibytes + sizeof(float) * (2 * (size_t)M * nb + 2 * T * LANES * nb));
        if (!buf) return -1;
        int8_t *q = buf, *xi = buf + qbytes;
        float *xds = (float *)(xi + ibytes), *xd = xds + 2 * (size_t)M * nb, *xs = xd + T * LANES * nb;
        quantize_rows(x, ldx, M, K, q, NULL, xds, threads);
        interleave_rows(q, xds, M, K, xi, xd, xs);
#pragma omp parallel for schedule(dynamic, chunk) num_threads(threads)
        for (int n = 0; n < total; n++) {
            int pi = 0;
            while (n >= starts[pi + 1]) pi++;
            const qpart_t *p = &parts[pi];
            const int r = n - starts[pi];
            gemm_rows(p, r, K, xi, xd, xs, M, y, ldy, p->col0 + (p->perm ? p->perm[r] : r));
        }
        return 0;
    }
#endif
    int8_t *buf = scratch_for(2 * qbytes + 2 * sizeof(float) * (size_t)M * nb);
    if (!buf) return -1;
    int8_t *q_lin = need_lin ? buf : NULL, *q_pair = need_pair ? buf + qbytes : NULL;
    float *xds = (float *)(buf + 2 * qbytes);
    quantize_rows(x, ldx, M, K, q_lin, q_pair, xds, threads);

#pragma omp parallel for schedule(dynamic, chunk) num_threads(threads)
    for (int n = 0; n < total; n++) {
        int pi = 0;
        while (n >= starts[pi + 1]) pi++;
        const qpart_t *p = &parts[pi];
        const int r = n - starts[pi];
        const int64_t col = p->col0 + (p->perm ? p->perm[r] : r);
        for (int m0 = 0; m0 < M; m0 += MR) {
            float out[MR];
            const int mr = M - m0 < MR ? M - m0 : MR;
            const int64_t off = (int64_t)m0 * K;
            dot_rows(p, r, K, q_lin ? q_lin + off : NULL, q_pair ? q_pair + off : NULL,
                     xds + (int64_t)m0 * nb * 2, mr, out);
            for (int i = 0; i < mr; i++) y[(m0 + i) * ldy + col] = out[i];
        }
    }
    return 0;
}

/* -- dequantization (prefill: one float/bf16 GEMM instead of many integer dots) ----------- */

/* one block of 32 weights -> 32 floats; int8 codes as an int8_t pointer (see code_at) */
static inline void dequant_block(int nibbles, const uint8_t *qs, float d, float m, float *o) {
#if defined(__AVX512F__)
    const __m512 vd = _mm512_set1_ps(d), vm = _mm512_set1_ps(m);
    const __m128i bytes = _mm_loadu_si128((const __m128i *)qs);
    __m512i lo, hi;
    if (nibbles) {
        const __m128i low = _mm_set1_epi8(0x0F);
        lo = _mm512_cvtepu8_epi32(_mm_and_si128(bytes, low));
        hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), low));
    } else {
        lo = _mm512_cvtepi8_epi32(bytes);
        hi = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qs + 16)));
    }
    _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), vd, vm));
    _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), vd, vm));
#elif defined(__AVX2__)
    const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
    const __m128i bytes = _mm_loadu_si128((const __m128i *)qs);
    __m128i lo, hi;
    if (nibbles) {
        const __m128i low = _mm_set1_epi8(0x0F);
        lo = _mm_and_si128(bytes, low);
        hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
    } else {
        lo = bytes;
        hi = _mm_loadu_si128((const __m128i *)(qs + 16));
    }
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int i = 0; i < 4; i++) {
        const __m256i q = nibbles ? _mm256_cvtepu8_epi32(parts[i]) : _mm256_cvtepi8_epi32(parts[i]);
        _mm256_storeu_ps(o + 8 * i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), vd, vm));
    }
#else
    for (int j = 0; j < QK; j++) o[j] = d * (float)code_at(nibbles ? FMT_Q4_1 : FMT_Q8_0, qs, j) + m;
#endif
}

/* one block -> (q + m) * d: the rounding of a zero-point scheme's S (q - Z) */
static inline void dequant_block_shifted(int nibbles, const uint8_t *qs, float d, float m, float *o) {
    for (int j = 0; j < QK; j++) o[j] = ((float)code_at(nibbles ? FMT_U4 : FMT_I8, qs, j) + m) * d;
}

/* n floats -> bfloat16, rounded to nearest even */
static inline void to_bf16(const float *x, uint16_t *o, int n) {
    int k = 0;
#if defined(__AVX512F__)
    for (; k + 16 <= n; k += 16) {
        __m512i u = _mm512_castps_si512(_mm512_loadu_ps(x + k));
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
        _mm256_storeu_si256((__m256i *)(o + k), _mm512_cvtepi32_epi16(u));
    }
#elif defined(__AVX2__)
    for (; k + 16 <= n; k += 16) {
        __m256i u[2];
        for (int i = 0; i < 2; i++) {
            const __m256i v = _mm256_castps_si256(_mm256_loadu_ps(x + k + 8 * i));
            const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(v, 16), _mm256_set1_epi32(1));
            u[i] = _mm256_srli_epi32(_mm256_add_epi32(v, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
        }
        /* packus works per 128-bit lane: [u0 lo, u1 lo, u0 hi, u1 hi] -> reorder the 64-bit quarters */
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(u[0], u[1]), _MM_SHUFFLE(3, 1, 2, 0));
        _mm256_storeu_si256((__m256i *)(o + k), packed);
    }
#endif
    for (; k < n; k++) {
        uint32_t u;
        memcpy(&u, x + k, 4);
        o[k] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
}

static inline __attribute__((always_inline)) void dequant_row(const qpart_t *p, int fmt, int r,
                                                            int K, float *out) {
    const int nb = K / QK, G = (fmt == FMT_U4 || fmt == FMT_I8) ? nb / p->group_blocks : 0;
    const uint8_t *row = p->data + (int64_t)r * p->row_bytes;
    for (int b = 0; b < nb; b++) {
        float d, m;
        dm_of(p, fmt, row, r, b, G, &d, &m);
        if (G && p->zero) { /* S (q - Z) exactly as QuantizedTensor.dequantize: d (q + m') */
            d = p->scale[(int64_t)r * G + b / p->group_blocks];
            m = -p->zero[(int64_t)r * G + b / p->group_blocks];
            dequant_block_shifted(is_nibbles(fmt), codes_of(fmt, row, b), d, m, out + b * QK);
        } else {
            dequant_block(is_nibbles(fmt), codes_of(fmt, row, b), d, m, out + b * QK);
        }
    }
}

static void dequant_any(const qpart_t *p, int r, int K, float *out) {
    switch (p->format) {
    case FMT_Q4_0: dequant_row(p, FMT_Q4_0, r, K, out); break;
    case FMT_Q4_1: dequant_row(p, FMT_Q4_1, r, K, out); break;
    case FMT_Q8_0: dequant_row(p, FMT_Q8_0, r, K, out); break;
    case FMT_U4: dequant_row(p, FMT_U4, r, K, out); break;
    default: dequant_row(p, FMT_I8, r, K, out); break;
    }
}

/* The layer's weight as a dense (N, K) matrix, float32 (bf16 = 0) or bfloat16 (bf16 = 1). */
void mlsk_dequantize(const qpart_t *parts, int nparts, int K, void *out, int bf16, int threads) {
    int total = 0, starts[17];
    for (int i = 0; i < nparts && i < 16; i++) {
        starts[i] = total;
        total += parts[i].rows;
    }
    starts[nparts] = total;
#pragma omp parallel num_threads(threads)
    {
        float *tmp = bf16 ? malloc(sizeof(float) * K) : NULL;
#pragma omp for schedule(dynamic, 16)
        for (int n = 0; n < total; n++) {
            int pi = 0;
            while (n >= starts[pi + 1]) pi++;
            const qpart_t *p = &parts[pi];
            const int r = n - starts[pi];
            const int64_t col = p->col0 + (p->perm ? p->perm[r] : r);
            if (!bf16) {
                dequant_any(p, r, K, (float *)out + col * K);
            } else if (tmp) {
                uint16_t *o = (uint16_t *)out + col * K;
                dequant_any(p, r, K, tmp);
                to_bf16(tmp, o, K);
            }
        }
        free(tmp);
    }
}

/* Rows ids[i] of a one-part weight (an embedding table), dequantized to out (n, K) float32. */
void mlsk_gather_rows(const qpart_t *p, const int64_t *ids, int n, int K, float *out) {
    for (int i = 0; i < n; i++) dequant_any(p, (int)ids[i], K, out + (int64_t)i * K);
}
