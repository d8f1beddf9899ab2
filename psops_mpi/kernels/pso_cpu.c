/* Fused PSO update on the CPU: one pass over x, v, p, g with the random numbers made in
 * registers. Draws are Philox4x32-10 (Salmon et al., SC'11), the same numbers as the Triton
 * kernel and psops_mpi/kernels/philox.py: Philox block m, keyed by (key mod 2^32, key >> 32),
 * gives element 2m its (r1, r2) from words 0, 1 and element 2m+1 from words 2, 3; a word u
 * becomes (u >> 8) * 2^-24 in [0, 1). Plain C with no torch headers, so it compiles in well
 * under a second; loaded with ctypes by pso_cpu.py. */
#include <stdint.h>

#define BLOCK 64 /* elements per inner block: the r1, r2 buffers stay in L1 */

/* r1[j], r2[j] for the BLOCK elements from `start` (even). Written as loops over arrays so
 * the compiler vectorises the 32x32->64-bit multiplies across lanes. */
static void uniform_block(int64_t start, uint32_t key0, uint32_t key1, float *r1, float *r2) {
    enum { HALF = BLOCK / 2 };
    uint32_t c0[HALF], c1[HALF], c2[HALF], c3[HALF];
    for (int j = 0; j < HALF; j++) {
        uint64_t counter = ((uint64_t)start >> 1) + (uint64_t)j;
        c0[j] = (uint32_t)counter;
        c1[j] = (uint32_t)(counter >> 32);
        c2[j] = 0;
        c3[j] = 0;
    }
    uint32_t k0 = key0, k1 = key1;
    for (int round = 0; round < 10; round++) {
        for (int j = 0; j < HALF; j++) {
            uint64_t p0 = (uint64_t)0xD2511F53u * c0[j];
            uint64_t p1 = (uint64_t)0xCD9E8D57u * c2[j];
            uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1[j] ^ k0;
            uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3[j] ^ k1;
            c1[j] = (uint32_t)p1;
            c3[j] = (uint32_t)p0;
            c0[j] = n0;
            c2[j] = n2;
        }
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    for (int j = 0; j < HALF; j++) {
        r1[2 * j] = (float)(c0[j] >> 8) * 0x1p-24f;
        r2[2 * j] = (float)(c1[j] >> 8) * 0x1p-24f;
        r1[2 * j + 1] = (float)(c2[j] >> 8) * 0x1p-24f;
        r2[2 * j + 1] = (float)(c3[j] >> 8) * 0x1p-24f;
    }
}

/* Same operation order as the plain-torch reference: v*w + c1*(r1*(p-x)) + c2*(r2*(g-x)).
 * The clamp is written with comparisons (not fminf/fmaxf) so a NaN stays NaN, as in torch. */
static void update_block(float *x, float *v, const float *p, const float *g, int64_t start,
                         int64_t count, float w, float c1, float c2, float vmax, int clamp,
                         uint64_t key, int random) {
    float r1[BLOCK], r2[BLOCK];
    if (random) {
        uniform_block(start, (uint32_t)key, (uint32_t)(key >> 32), r1, r2);
    } else {
        for (int j = 0; j < BLOCK; j++) {
            r1[j] = 1.0f;
            r2[j] = 1.0f;
        }
    }
    for (int64_t j = 0; j < count; j++) {
        int64_t i = start + j;
        float xi = x[i];
        float vi = v[i] * w + c1 * (r1[j] * (p[i] - xi));
        vi = vi + c2 * (r2[j] * (g[i] - xi));
        if (clamp) vi = vi > vmax ? vmax : (vi < -vmax ? -vmax : vi);
        v[i] = vi;
        x[i] = xi + vi;
    }
}

void psops_pso_update_f32(float *x, float *v, const float *p, const float *g, int64_t n,
                          float w, float c1, float c2, float vmax, int clamp, uint64_t key,
                          int random, int num_threads) {
    int64_t num_blocks = (n + BLOCK - 1) / BLOCK;
    /* Below ~64K elements a parallel region costs more than it saves. */
#pragma omp parallel for schedule(static) num_threads(num_threads) if (n >= 65536)
    for (int64_t b = 0; b < num_blocks; b++) {
        int64_t start = b * BLOCK;
        int64_t count = n - start < BLOCK ? n - start : BLOCK;
        update_block(x, v, p, g, start, count, w, c1, c2, vmax, clamp, key, random);
    }
}
