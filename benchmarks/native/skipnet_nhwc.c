/* Channels-last (NHWC) kernels for the CPU skip network of Deep Image Prior: what torch's eager
 * kernels do in several passes (BatchNorm, LeakyReLU, reflection padding, concatenation), in
 * one or two passes over the activations. One image per call: an activation is P = H * W rows
 * of C floats.
 *
 * A measurement for issue 15, not shipped: benchmarks/bench_dip_layouts.py --native builds it
 * with the system C compiler; it links libgomp.so.1, which resolves to the OpenMP runtime torch
 * has already loaded, so these loops share torch's threads; k is the
 * number of threads (torch's). Work is split by thread number, not by scheduling, and partial
 * sums are added in thread order: the same inputs and k give the same bits.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

static void rows_of(long n, long *begin, long *end) { /* this thread's share of n rows */
    int t = omp_get_thread_num(), k = omp_get_num_threads();
    *begin = n * t / k;
    *end = n * (t + 1) / k;
}

/* Per channel, the sums of d and d*d for d = x - shift (shift: the first row, so the variance
 * loses no precision to a large mean), in double over blocks of float partial sums. */
static void channel_sums(const float *x, long P, int C, const float *shift, double *sum,
                         double *sq, int k) {
    double *part = calloc((size_t)2 * k * C, sizeof(double));
#pragma omp parallel num_threads(k)
    {
        long r0, r1;
        rows_of(P, &r0, &r1);
        double *s = part + (size_t)2 * C * omp_get_thread_num(), *q = s + C;
        float *bs = malloc(sizeof(float) * 2 * C), *bq = bs + C;
        for (long b0 = r0; b0 < r1; b0 += 64) {
            long b1 = b0 + 64 < r1 ? b0 + 64 : r1;
            memset(bs, 0, sizeof(float) * 2 * C);
            for (long r = b0; r < b1; r++) {
                const float *row = x + r * C;
                for (int c = 0; c < C; c++) {
                    float d = row[c] - shift[c];
                    bs[c] += d;
                    bq[c] += d * d;
                }
            }
            for (int c = 0; c < C; c++) {
                s[c] += bs[c];
                q[c] += bq[c];
            }
        }
        free(bs);
    }
    for (int c = 0; c < C; c++) sum[c] = sq[c] = 0.0;
    for (int t = 0; t < k; t++)
        for (int c = 0; c < C; c++) {
            sum[c] += part[(size_t)2 * C * t + c];
            sq[c] += part[(size_t)2 * C * t + C + c];
        }
    free(part);
}

/* y = leaky_relu(batch_norm(x)) with batch statistics (slope 1: no activation). */
void bn_act_forward(const float *x, float *y, long P, int C, const float *gamma,
                    const float *beta, float eps, float slope, float *mean, float *invstd, int k) {
    double *sum = malloc(sizeof(double) * 2 * C), *sq = sum + C;
    float *scale = malloc(sizeof(float) * 2 * C), *shift = scale + C;
    channel_sums(x, P, C, x, sum, sq, k);
    for (int c = 0; c < C; c++) {
        double d = sum[c] / P, m = x[c] + d, v = sq[c] / P - d * d;
        float inv = (float)(1.0 / sqrt((v > 0.0 ? v : 0.0) + eps));
        mean[c] = (float)m;
        invstd[c] = inv;
        scale[c] = inv * gamma[c];
        shift[c] = beta[c] - (float)m * scale[c];
    }
#pragma omp parallel num_threads(k)
    {
        long r0, r1;
        rows_of(P, &r0, &r1);
        for (long r = r0; r < r1; r++) {
            const float *row = x + r * C;
            float *out = y + r * C;
            for (int c = 0; c < C; c++) {
                float v = row[c] * scale[c] + shift[c];
                out[c] = v > 0.f ? v : v * slope;
            }
        }
    }
    free(sum);
    free(scale);
}

/* Gradients of bn_act_forward: dx, and dgamma / dbeta (sums over the image). */
void bn_act_backward(const float *g, const float *x, const float *y, float *dx, long P, int C,
                     const float *gamma, const float *mean, const float *invstd, float slope,
                     float *dgamma, float *dbeta, int k) {
    double *part = calloc((size_t)2 * k * C, sizeof(double));
#pragma omp parallel num_threads(k)
    {
        long r0, r1;
        rows_of(P, &r0, &r1);
        double *sg = part + (size_t)2 * C * omp_get_thread_num(), *sgx = sg + C;
        float *bg = malloc(sizeof(float) * 2 * C), *bgx = bg + C;
        for (long b0 = r0; b0 < r1; b0 += 64) {
            long b1 = b0 + 64 < r1 ? b0 + 64 : r1;
            memset(bg, 0, sizeof(float) * 2 * C);
            for (long r = b0; r < b1; r++) {
                const float *gr = g + r * C, *xr = x + r * C, *yr = y + r * C;
                for (int c = 0; c < C; c++) {
                    float gm = yr[c] > 0.f ? gr[c] : gr[c] * slope;
                    bg[c] += gm;
                    bgx[c] += gm * (xr[c] - mean[c]);
                }
            }
            for (int c = 0; c < C; c++) {
                sg[c] += bg[c];
                sgx[c] += bgx[c];
            }
        }
        free(bg);
    }
    float *a = malloc(sizeof(float) * 3 * C), *kx = a + C, *b = a + 2 * C;
    for (int c = 0; c < C; c++) {
        double s = 0.0, sx = 0.0;
        for (int t = 0; t < k; t++) {
            s += part[(size_t)2 * C * t + c];
            sx += part[(size_t)2 * C * t + C + c];
        }
        dbeta[c] = (float)s;
        dgamma[c] = (float)(sx * invstd[c]);
        /* dx = gamma*invstd * (gm - mean(gm) - xhat * mean(gm * xhat)) */
        double gi = (double)gamma[c] * invstd[c];
        a[c] = (float)gi;
        kx[c] = (float)(-gi * invstd[c] * invstd[c] * sx / P);
        b[c] = (float)(-gi * s / P);
    }
    free(part);
#pragma omp parallel num_threads(k)
    {
        long r0, r1;
        rows_of(P, &r0, &r1);
        for (long r = r0; r < r1; r++) {
            const float *gr = g + r * C, *xr = x + r * C, *yr = y + r * C;
            float *o = dx + r * C;
            for (int c = 0; c < C; c++) {
                float gm = yr[c] > 0.f ? gr[c] : gr[c] * slope;
                o[c] = a[c] * gm + kx[c] * (xr[c] - mean[c]) + b[c];
            }
        }
    }
    free(a);
}

static long reflect(long i, long n) { /* index i in [-1, n] of a one-pixel reflection pad */
    return i < 0 ? -i : (i >= n ? 2 * n - 2 - i : i);
}

/* Channels [c0, c0 + cp) of out ((H+2) x (W+2) x ctot) = the part (H x W x cp), reflected. */
void pad_part_forward(const float *part, float *out, long H, long W, int cp, int ctot, int c0,
                      int k) {
#pragma omp parallel num_threads(k)
    {
        long i0, i1;
        rows_of(H + 2, &i0, &i1);
        for (long i = i0; i < i1; i++) {
            const float *src = part + reflect(i - 1, H) * W * cp;
            float *dst = out + i * (W + 2) * ctot + c0;
            memcpy(dst, src + cp, sizeof(float) * cp); /* column 0 = column 1 of the part */
            if (cp == ctot)
                memcpy(dst + ctot, src, sizeof(float) * W * cp);
            else
                for (long j = 0; j < W; j++)
                    memcpy(dst + (j + 1) * ctot, src + j * cp, sizeof(float) * cp);
            memcpy(dst + (W + 1) * ctot, src + (W - 2) * cp, sizeof(float) * cp);
        }
    }
}

/* The part's gradient: every padded position's gradient added onto the pixel it copies. */
void pad_part_backward(const float *grad, float *dpart, long H, long W, int cp, int ctot,
                       int c0, int k) {
#pragma omp parallel num_threads(k)
    {
        long r0, r1;
        rows_of(H, &r0, &r1);
        for (long r = r0; r < r1; r++) {
            long rows[3] = {r + 1, -1, -1}; /* padded rows that copy row r */
            int n = 1;
            if (r == 1) rows[n++] = 0;
            if (r == H - 2) rows[n++] = H + 1;
            float *dst = dpart + r * W * cp;
            for (long j = 0; j < W; j++) {
                long cols[3] = {j + 1, -1, -1};
                int m = 1;
                if (j == 1) cols[m++] = 0;
                if (j == W - 2) cols[m++] = W + 1;
                float *o = dst + j * cp;
                for (int c = 0; c < cp; c++) o[c] = 0.f;
                for (int a = 0; a < n; a++)
                    for (int b = 0; b < m; b++) {
                        const float *s = grad + (rows[a] * (W + 2) + cols[b]) * ctot + c0;
                        for (int c = 0; c < cp; c++) o[c] += s[c];
                    }
            }
        }
    }
}
