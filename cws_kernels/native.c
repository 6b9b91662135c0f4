/* Native CPU loops for lincomb and gram: each input read once, fp32 math in L1-resident tiles.
 *
 * Plain C (no Python or torch headers), called through ctypes, which releases the GIL, so the
 * streaming engine's reader and writer threads run beside it. Built with -ffp-contract=off and
 * without -ffast-math: every product and sum rounds to fp32 exactly as the reference formula
 * (reference.lincomb_fp32) says, and the compiler may not reorder the sums. Each entry point is
 * cloned for x86-64-v4 (AVX-512), v3 (AVX2) and baseline; the clones do the same arithmetic, so
 * they give the same bits.
 *
 * Numerics, matching cws_kernels.rounding:
 *   nearest     fp32 -> bf16 round-to-nearest-even, NaN -> 0xFFFF (ATen's vectorized cast);
 *               fp32 -> fp16 by the C cast (IEEE nearest-even, F16C where the clone has it), or
 *               on the bits where the compiler has no _Float16 (the same results).
 *   stochastic  the counter-based hash of (key, global index) and the integer steps of
 *               rounding.round_stochastic.
 *   gram        v_k and products in fp32; each 1024-element block sums its products in 16 fixed
 *               lanes, reduced as a fixed tree, then added in fp64 to its CHUNK's partial.
 * Loops are plain C that the compiler vectorizes for each clone's ISA (16-lane vector types, written
 * by hand, compiled to slow code where the ISA has no 512-bit registers: AVX2 ran at a fifth of a copy).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && !defined(CWS_NO_CLONES)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif
#define INLINE static inline __attribute__((always_inline))

enum { F32 = 0, BF16 = 1, F16 = 2 };
enum { TILE = 1024, LANES = 16 };

INLINE float bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

INLINE uint32_t float_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

#if defined(__FLT16_MAX__) && !defined(CWS_NO_FLOAT16)
typedef _Float16 half;
INLINE float half_to_float(half h) { return (float)h; }
INLINE half float_to_half(float f) { return (half)f; } /* IEEE nearest-even (F16C where the clone has it) */
#else
/* Compilers without _Float16 (clang < 15 on x86-64; -DCWS_NO_FLOAT16 builds this path with any compiler,
 * as a test does): the IEEE conversions on the bits. fp32 -> fp16 rounds to nearest-even; NaN becomes
 * the quiet NaN 0x7E00 with its sign, as torch's conversion gives. */
typedef uint16_t half;
INLINE float half_to_float(half h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, em = h & 0x7FFFu;
    if (em >= 0x7C00u) /* inf, NaN */
        return bits_to_float(sign | 0x7F800000u | ((em & 0x3FFu) << 13));
    if (em >= 0x0400u) /* normal: rebias the exponent */
        return bits_to_float(sign | ((em << 13) + ((uint32_t)(127 - 15) << 23)));
    float f = (float)em * 5.9604644775390625e-08f; /* subnormal or zero: em * 2^-24, exact */
    return sign ? -f : f;
}
INLINE half float_to_half(float f) {
    uint32_t x = float_to_bits(f), sign = (x >> 16) & 0x8000u;
    x &= 0x7FFFFFFFu;
    if (x >= 0x47800000u) /* >= 2^16: inf, or NaN */
        return (half)(sign | (x > 0x7F800000u ? 0x7E00u : 0x7C00u));
    if (x < 0x38800000u) /* below 2^-14: a subnormal half; adding 0.5 rounds it at 2^-24, nearest-even */
        return (half)(sign | (float_to_bits(bits_to_float(x) + 0.5f) - 0x3F000000u));
    x += 0xC8000FFFu + ((x >> 13) & 1u); /* rebias (15 - 127), then round the 13 dropped bits to even */
    return (half)(sign | (x >> 13));     /* a carry out of 65504 gives 0x7C00, inf */
}
#endif

/* acc[i] (=, or += when !first) x[start + i] * c, for i < n; x in its storage dtype. Plain loops
 * the compiler vectorizes for each clone's ISA (each element's arithmetic is the same in any lane). */
INLINE void axpy_tile(float *restrict acc, const void *x, int code, float c, int first, int64_t start, int n) {
    if (code == F32) {
        const float *s = (const float *)x + start;
        if (first)
            for (int i = 0; i < n; i++) acc[i] = s[i] * c;
        else
            for (int i = 0; i < n; i++) acc[i] = acc[i] + s[i] * c;
    } else if (code == BF16) {
        const uint16_t *s = (const uint16_t *)x + start;
        if (first)
            for (int i = 0; i < n; i++) acc[i] = bits_to_float((uint32_t)s[i] << 16) * c;
        else
            for (int i = 0; i < n; i++) acc[i] = acc[i] + bits_to_float((uint32_t)s[i] << 16) * c;
    } else {
        const half *s = (const half *)x + start;
        if (first)
            for (int i = 0; i < n; i++) acc[i] = half_to_float(s[i]) * c;
        else
            for (int i = 0; i < n; i++) acc[i] = acc[i] + half_to_float(s[i]) * c;
    }
}

INLINE uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x68E31DA5u;
    return x ^ (x >> 16);
}

INLINE uint32_t random_bits(uint64_t index, uint32_t key) {
    uint32_t hi = mix32((uint32_t)((index >> 32) * 0x9E3779B1ull + key));
    return mix32((uint32_t)index ^ hi);
}

INLINE void store_nearest(void *out, int code, int64_t start, const float *restrict acc, int n) {
    if (code == F32) {
        memcpy((float *)out + start, acc, (size_t)n * 4);
    } else if (code == BF16) {
        uint16_t *o = (uint16_t *)out + start;
        for (int i = 0; i < n; i++) {
            uint32_t u = float_to_bits(acc[i]);
            uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
            o[i] = acc[i] != acc[i] ? (uint16_t)0xFFFFu : (uint16_t)r;
        }
    } else {
        half *o = (half *)out + start;
        for (int i = 0; i < n; i++) o[i] = float_to_half(acc[i]);
    }
}

/* rounding.round_stochastic, element by element; index = offset + position in the tensor. */
INLINE void store_stochastic(void *out, int code, int64_t start, const float *restrict acc, int n, uint32_t key,
                             int64_t offset) {
    for (int i = 0; i < n; i++) {
        uint32_t r = random_bits((uint64_t)(offset + start + i), key);
        uint32_t u = float_to_bits(acc[i]);
        if (code == BF16) {
            uint32_t up = (((u & 0x7FFFFFFFu) + (r & 0xFFFFu)) & 0x7FFF0000u) | (u & 0x80000000u);
            ((uint16_t *)out)[start + i] = acc[i] != acc[i] ? 0xFFFFu : (uint16_t)(up >> 16);
        } else {
            int32_t e = (int32_t)((u >> 23) & 0xFFu) - 127;
            float spacing = bits_to_float((uint32_t)((e < -14 ? -14 : e) - 10 + 127) << 23);
            float unif = (float)(r & 0x1FFFu) * (1.0f / 8192.0f);
            ((half *)out)[start + i] = float_to_half(floorf(acc[i] / spacing + unif) * spacing);
        }
    }
}

/* out[start:stop] = round(sum_i coefs[i] * xs[i][start:stop]), left to right in fp32.
 * rounding: 0 nearest, 1 stochastic (bf16/fp16 out). `out` may be one of the inputs. */
CLONES void cws_lincomb(int64_t start, int64_t stop, int n_in, const void *const *xs, const int *codes,
                        const float *coefs, void *out, int out_code, int rounding, uint32_t key, int64_t offset) {
    float acc[TILE] __attribute__((aligned(64)));
    for (int64_t s = start; s < stop; s += TILE) {
        int n = stop - s < TILE ? (int)(stop - s) : TILE;
        for (int j = 0; j < n_in; j++) axpy_tile(acc, xs[j], codes[j], coefs[j], j == 0, s, n);
        if (rounding == 1 && out_code != F32) store_stochastic(out, out_code, s, acc, n, key, offset);
        else store_nearest(out, out_code, s, acc, n);
    }
}

/* Whether two 16-bit floats of one dtype differ as values, from their bits (inf: the dtype's +Inf
 * magnitude, above it NaN): they do where the bits do unless both are zeros, and wherever one is NaN. */
INLINE uint16_t differ16(uint16_t p, uint16_t q, uint16_t inf) {
    uint16_t mp = p & 0x7FFFu, mq = q & 0x7FFFu;
    return (uint16_t)(((p != q) & ((mp | mq) != 0)) | (mp > inf) | (mq > inf));
}

/* One tile's tally when the output and every input share one 16-bit dtype: on the bits, in 16-bit
 * lanes (n <= TILE, so the counts fit), one pass. The same counts as the float comparisons. */
INLINE void tally_tile16(const uint16_t *o, const uint16_t *x0, const uint16_t *x1, const uint16_t *x2, int n_in,
                         uint16_t inf, int n, int64_t *count) {
    uint16_t bad = 0, moved = 0, touched = 0;
    for (int i = 0; i < n; i++) {
        bad += (uint16_t)((o[i] & 0x7FFFu) >= inf);
        moved += differ16(o[i], x0[i], inf);
    }
    if (n_in >= 3)
        for (int i = 0; i < n; i++) touched += differ16(x1[i], x2[i], inf);
    else if (n_in == 2)
        for (int i = 0; i < n; i++) touched += (uint16_t)((x1[i] & 0x7FFFu) != 0);
    count[0] += bad, count[1] += moved, count[2] += touched;
}

/* cws_lincomb, plus a tally of what it stored, counted while each tile is in L1 (no second pass):
 * tally[0] += outputs that are NaN or +-Inf; tally[1] += outputs whose value differs from xs[0]'s;
 * tally[2] += elements where xs[1] != xs[2] (n_in >= 3) or xs[1] != 0 (n_in == 2): the support of
 * the update `apply` adds. Comparisons are of values, as torch's `!=` (NaN differs from itself,
 * -0 equals +0). `out` must not be an input. */
CLONES void cws_lincomb_tally(int64_t start, int64_t stop, int n_in, const void *const *xs, const int *codes,
                              const float *coefs, void *out, int out_code, int rounding, uint32_t key, int64_t offset,
                              int64_t *tally) {
    float acc[TILE] __attribute__((aligned(64)));
    float a[TILE] __attribute__((aligned(64)));
    float b[TILE] __attribute__((aligned(64)));
    int64_t count[3] = {0, 0, 0};
    int same16 = out_code != F32 && n_in <= 3;
    for (int j = 0; j < n_in; j++) same16 &= codes[j] == out_code;
    uint16_t inf = out_code == BF16 ? 0x7F80u : 0x7C00u; /* the +Inf magnitude; above it NaN */
    for (int64_t s = start; s < stop; s += TILE) {
        int n = stop - s < TILE ? (int)(stop - s) : TILE;
        for (int j = 0; j < n_in; j++) axpy_tile(acc, xs[j], codes[j], coefs[j], j == 0, s, n);
        if (rounding == 1 && out_code != F32) store_stochastic(out, out_code, s, acc, n, key, offset);
        else store_nearest(out, out_code, s, acc, n);
        if (same16) {
            const uint16_t *const *x = (const uint16_t *const *)xs;
            tally_tile16((const uint16_t *)out + s, x[0] + s, x[n_in > 1 ? 1 : 0] + s, x[n_in > 2 ? 2 : 0] + s, n_in, inf,
                         n, count);
            continue;
        }
        axpy_tile(a, out, out_code, 1.0f, 1, s, n); /* x * 1 is x exactly, NaN and -0 included */
        axpy_tile(b, xs[0], codes[0], 1.0f, 1, s, n);
        int bad = 0, moved = 0, touched = 0; /* per tile (n <= TILE): int counts vectorize */
        for (int i = 0; i < n; i++) {
            bad += (a[i] - a[i]) != 0.0f; /* NaN for NaN and +-Inf, 0 otherwise */
            moved += a[i] != b[i];
        }
        if (n_in >= 2) {
            axpy_tile(a, xs[1], codes[1], 1.0f, 1, s, n);
            if (n_in >= 3) {
                axpy_tile(b, xs[2], codes[2], 1.0f, 1, s, n);
                for (int i = 0; i < n; i++) touched += a[i] != b[i];
            } else {
                for (int i = 0; i < n; i++) touched += a[i] != 0.0f;
            }
        }
        count[0] += bad, count[1] += moved, count[2] += touched;
    }
    tally[0] += count[0], tally[1] += count[1], tally[2] += count[2];
}

/* A block's LANES lane sums meet in a fixed tree. */
INLINE float reduce_lanes(float *lane) {
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) lane[l] = lane[l] + lane[l + w];
    return lane[0];
}

/* The fp32 sums of a[t] * b[t] over one TILE-element block in LANES lanes: lane l sums elements
 * l, l + LANES, ... in order (a plain loop the compiler vectorizes; the order is fixed). */
INLINE void lane_sums(const float *restrict a, const float *restrict b, float *restrict lane) {
    for (int l = 0; l < LANES; l++) lane[l] = 0.0f;
    for (int t = 0; t < TILE; t += LANES)
        for (int l = 0; l < LANES; l++) lane[l] = lane[l] + a[t + l] * b[t + l];
}

/* g[i][j] += sum over one TILE-element block of v_i * v_j (fp32 products), for i <= j. */
INLINE void block_gram(const float *restrict v, int k, double *g) {
    float lane[LANES] __attribute__((aligned(64)));
    if (k == 2) { /* one update against one direction, the common case: both tiles read once for three sums */
        float s00[LANES] __attribute__((aligned(64))), s01[LANES] __attribute__((aligned(64)));
        float s11[LANES] __attribute__((aligned(64)));
        const float *a = v, *b = v + TILE;
        for (int l = 0; l < LANES; l++) s00[l] = s01[l] = s11[l] = 0.0f;
        for (int t = 0; t < TILE; t += LANES)
            for (int l = 0; l < LANES; l++) {
                float x = a[t + l], y = b[t + l];
                s00[l] = s00[l] + x * x, s01[l] = s01[l] + x * y, s11[l] = s11[l] + y * y;
            }
        g[0] += (double)reduce_lanes(s00), g[1] += (double)reduce_lanes(s01), g[3] += (double)reduce_lanes(s11);
        return;
    }
    for (int i = 0; i < k; i++)
        for (int j = i; j < k; j++) {
            lane_sums(v + (int64_t)i * TILE, v + (int64_t)j * TILE, lane);
            g[i * k + j] += (double)reduce_lanes(lane);
        }
}

/* Per CHUNK-element chunk c of [0, n) with first_chunk <= c < stop_chunk: the K x K Gram matrix of
 * v_k = sum_t coef[k][t] * xs[index[k][t]] (terms of combo k at term_start[k] .. term_start[k+1]),
 * written to out[(c - first_chunk) * K * K ...]. scratch: K * TILE floats. */
CLONES void cws_gram(int64_t n, int64_t chunk, int64_t first_chunk, int64_t stop_chunk, const void *const *xs,
                     const int *codes, int k, const int *term_start, const int *term_index, const float *term_coef,
                     double *out, float *scratch) {
    float *v = scratch;
    for (int64_t c = first_chunk; c < stop_chunk; c++) {
        double *g = out + (c - first_chunk) * k * k;
        memset(g, 0, sizeof(double) * k * k);
        int64_t end = (c + 1) * chunk < n ? (c + 1) * chunk : n;
        for (int64_t s = c * chunk; s < end; s += TILE) {
            int m = end - s < TILE ? (int)(end - s) : TILE;
            for (int r = 0; r < k; r++) {
                float *vr = v + (int64_t)r * TILE;
                if (term_start[r] == term_start[r + 1]) memset(vr, 0, sizeof(float) * m);
                for (int t = term_start[r]; t < term_start[r + 1]; t++)
                    axpy_tile(vr, xs[term_index[t]], codes[term_index[t]], term_coef[t], t == term_start[r], s, m);
                if (m < TILE) memset(vr + m, 0, sizeof(float) * (TILE - m));
            }
            block_gram(v, k, g);
        }
        for (int i = 0; i < k; i++)
            for (int j = 0; j < i; j++) g[i * k + j] = g[j * k + i];
    }
}
