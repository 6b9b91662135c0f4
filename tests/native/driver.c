/* Runs native.c's entry points on inputs from a file, for the bit checks under emulation
 * (tests/test_native_cross.py: built for aarch64 with a cross compiler, run with qemu-user).
 *
 *   driver IN OUT N      IN: three bf16 arrays of N elements (a, b, c), then one fp32 array x of N
 *   OUT gets, in order: lincomb(a, b, c; 1, 0.3, -0.7) as bf16 nearest, fp16 nearest, fp32, bf16
 *   stochastic (key 9, offset 2^32 + 5); lincomb(x, a; 1, 2) as bf16 nearest; lincomb_tally of the first
 *   as three int64 counts; gram of (a, b, c) with combos [[1,-1,0],[0,0.3,2],[0.3,0.7,-1.1]] per chunk
 *   of 1 << 16 elements (K*K doubles each). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

void cws_lincomb(int64_t, int64_t, int, const void *const *, const int *, const float *, void *, int, int, uint32_t,
                 int64_t);
void cws_lincomb_tally(int64_t, int64_t, int, const void *const *, const int *, const float *, void *, int, int,
                       uint32_t, int64_t, int64_t *);
void cws_gram(int64_t, int64_t, int64_t, int64_t, const void *const *, const int *, int, const int *, const int *,
              const float *, double *, float *);

static void put(FILE *f, const void *p, size_t n) {
    if (fwrite(p, 1, n, f) != n) exit(3);
}

int main(int argc, char **argv) {
    if (argc != 4) return 2;
    int64_t n = atoll(argv[3]);
    FILE *in = fopen(argv[1], "rb"), *out = fopen(argv[2], "wb");
    if (!in || !out) return 2;
    uint16_t *abc = malloc(3 * n * 2);
    float *x = malloc(n * 4), *f32 = malloc(n * 4);
    uint16_t *h = malloc(n * 2);
    if (fread(abc, 2, 3 * n, in) != (size_t)(3 * n) || fread(x, 4, n, in) != (size_t)n) return 2;
    const void *xs[3] = {abc, abc + n, abc + 2 * n};
    int bf[3] = {1, 1, 1};
    float c3[3] = {1.0f, 0.3f, -0.7f};
    cws_lincomb(0, n, 3, xs, bf, c3, h, 1, 0, 0, 0), put(out, h, n * 2);
    cws_lincomb(0, n, 3, xs, bf, c3, h, 2, 0, 0, 0), put(out, h, n * 2);
    cws_lincomb(0, n, 3, xs, bf, c3, f32, 0, 0, 0, 0), put(out, f32, n * 4);
    cws_lincomb(0, n, 3, xs, bf, c3, h, 1, 1, 9, (1LL << 32) + 5), put(out, h, n * 2);
    const void *xa[2] = {x, abc};
    int fa[2] = {0, 1};
    float c2[2] = {1.0f, 2.0f};
    cws_lincomb(0, n, 2, xa, fa, c2, h, 1, 0, 0, 0), put(out, h, n * 2);
    int64_t tally[3] = {0, 0, 0};
    cws_lincomb_tally(0, n, 3, xs, bf, c3, h, 1, 0, 0, 0, tally), put(out, tally, sizeof tally);
    int64_t chunk = 1 << 16, chunks = (n + chunk - 1) / chunk;
    int start[4] = {0, 2, 4, 7}, index[7] = {0, 1, 1, 2, 0, 1, 2};
    float coef[7] = {1.0f, -1.0f, 0.3f, 2.0f, 0.3f, 0.7f, -1.1f};
    double *g = malloc(chunks * 9 * sizeof(double));
    float *scratch = malloc(3 * 1024 * sizeof(float));
    cws_gram(n, chunk, 0, chunks, xs, bf, 3, start, index, coef, g, scratch), put(out, g, chunks * 9 * sizeof(double));
    return fclose(out) != 0;
}
