/* Mamba's selective scan on a CPU, float32, forward and backward (Gu & Dao 2023, "Mamba:
 * Linear-Time Sequence Modeling with Selective State Spaces", Algorithm 2; the backward pass
 * recomputes the states from the inputs, as their CUDA kernel does).
 *
 *   h_t = exp(delta_t A) * h_{t-1} + delta_t u_t B_t      (per channel d: h is (S,))
 *   y_t = C_t . h_t
 *
 * u, delta, y: (batch, N, D); A: passed transposed, (S, D); B, C: (batch, N, S); all contiguous.
 * With rev the scan runs from the last token to the first (the backward branch of a bidirectional
 * block), reading the tokens in place rather than from a flipped copy.
 *
 * The work is tiled by W channels of one sample: the tile's state (S, W) lives in the L1 cache
 * (16 x 16 floats: one AVX-512 register per state index) and every time step is S vector
 * operations over the W channels, with one vector exp each (exp_decay, inlined so GCC vectorises
 * it; glibc's libmvec expf, a call per vector, made the forward pass 1.7x slower). No
 * (batch, N, D, S) tensor exists: the backward pass keeps one tile's states and decays (N, S, W)
 * at a time.
 *
 * The second half of the file is Mamba-2's scan (SSD) done the same way, for the ssd and hydra
 * mixers.
 *
 * Built and loaded by _native_scan.py (gcc -O3 -ffast-math -fopenmp-simd -march=native); without
 * a C compiler the pure-PyTorch scans (_selective_scan.py, _ssd.py) run instead.
 */
#include <stddef.h>
#include <string.h>
#include <math.h>

#define W 16     /* channels per tile */
#define SMAX 64  /* largest state size the tiles hold (Mamba: 16) */

/* exp(x) for the decays, x = delta A (<= 0 in Mamba), inlined so that GCC vectorises it with the
 * loop around it: 2^(x log2 e) as 2^n (the float's exponent bits) times 2^(t - n), |t - n| <= 1/2,
 * by the Taylor polynomial of e^f of degree 7 (truncation error below 6e-9 relative; float32's
 * rounding is 6e-8). x is held to [-87, 88]: below, it returns about 1e-38 instead of less (a
 * decay that small leaves nothing of the state either way); above, exp overflows float32. */
static inline float exp_decay(float x)
{
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float t = x * 1.44269504088896341f;
    const float n = __builtin_rintf(t);
    const float f = (t - n) * 0.693147180559945309f; /* 2^(t - n) = e^f, |f| <= ln2 / 2 */
    float p = 1.0f / 5040.0f;
    p = p * f + 1.0f / 720.0f;
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    union { int i; float f; } s = { .i = ((int)n + 127) << 23 };
    return p * s.f;
}

/* One tile's forward pass over all N steps: y for w <= W channels from d0. If keep, the states
 * and decays of every step are kept in as, laid out (N, S, W), and in hs, laid out (N + 1, S, W)
 * with the zero state first (h_t at t + 1). */
static inline __attribute__((always_inline)) void fwd_tile(
    int N, int D, int S, int d0, const int w, int rev, const float *u, const float *dl, const float *At,
    const float *Bm, const float *Cm, float *y, const int keep, float *hs, float *as)
{
    float h[SMAX * W];
    memset(h, 0, sizeof(float) * (size_t)S * W);
    for (int t = 0; t < N; ++t) {
        const size_t i = rev ? (size_t)(N - 1 - t) : (size_t)t;  /* the token at step t */
        const float *ut = u + i * D + d0, *dt = dl + i * D + d0;
        const float *Bt = Bm + i * S, *Ct = Cm + i * S;
        float x[W], acc[W];
#pragma omp simd
        for (int k = 0; k < w; ++k) {
            x[k] = dt[k] * ut[k];
            acc[k] = 0.0f;
        }
        for (int n = 0; n < S; ++n) {
            const float *an = At + (size_t)n * D + d0;
            const float bn = Bt[n], cn = Ct[n];
            float *hn = h + n * W;
            float *hk = keep ? hs + ((size_t)(t + 1) * S + n) * W : NULL;
            float *ak = keep ? as + ((size_t)t * S + n) * W : NULL;
#pragma omp simd
            for (int k = 0; k < w; ++k) {
                const float a = exp_decay(dt[k] * an[k]);
                hn[k] = a * hn[k] + x[k] * bn;
                acc[k] += cn * hn[k];
                if (keep) {  /* a constant once inlined: the loop has no branch */
                    hk[k] = hn[k];
                    ak[k] = a;
                }
            }
        }
        float *yt = y + i * D + d0;
#pragma omp simd
        for (int k = 0; k < w; ++k) yt[k] = acc[k];
    }
}

/* One tile's backward pass: the adjoint recurrence g_t = dy_t C_t + a_{t+1} g_{t+1} from the
 * last step back, from the states hs and decays as of fwd_tile. Writes du, ddelta of the tile's
 * channels; adds dL/dA into gA (S, D) and the per-lane parts of dL/dB, dL/dC into gBw, gCw
 * (N, S, W: summed over lanes by the caller, once per sample rather than once per tile). */
static inline __attribute__((always_inline)) void bwd_tile(
    int N, int D, int S, int d0, const int w, int rev, const float *u, const float *dl, const float *At,
    const float *Bm, const float *Cm, const float *gy, const float *hs, const float *as,
    float *gu, float *gdl, float *gA, float *gBw, float *gCw)
{
    float g[SMAX * W];    /* a_{t+1} g_{t+1}: what reaches h_t from later steps */
    float gAl[SMAX * W];  /* this tile's dL/dA, (S, W), added into gA at the end */
    memset(g, 0, sizeof(float) * (size_t)S * W);
    memset(gAl, 0, sizeof(float) * (size_t)S * W);
    for (int t = N - 1; t >= 0; --t) {
        const size_t i = rev ? (size_t)(N - 1 - t) : (size_t)t;  /* the token at step t */
        const float *restrict ut = u + i * D + d0, *restrict dt = dl + i * D + d0;
        const float *restrict dy = gy + i * D + d0;
        const float *Bt = Bm + i * S, *Ct = Cm + i * S;
        float x[W], gx[W], gd[W];
#pragma omp simd
        for (int k = 0; k < w; ++k) {
            x[k] = dt[k] * ut[k];
            gx[k] = 0.0f;
            gd[k] = 0.0f;
        }
        for (int n = 0; n < S; ++n) {
            const float *restrict an = At + (size_t)n * D + d0;
            const float bn = Bt[n], cn = Ct[n];
            const size_t o = ((size_t)t * S + n) * W;
            const float *restrict hp = hs + o;  /* h_{t-1} (the zero state at t = 0) */
            const float *restrict hk = hp + (size_t)S * W, *restrict ak = as + o;
            float *restrict gn = g + n * W, *restrict ga_ = gAl + n * W;
            float *restrict gb = gBw + o, *restrict gc = gCw + o;
#pragma omp simd
            for (int k = 0; k < w; ++k) {
                const float gt = gn[k] + dy[k] * cn;  /* dL/dh_t */
                gc[k] += dy[k] * hk[k];               /* dL/dC_t, this lane's part */
                gb[k] += gt * x[k];                   /* dL/dB_t, this lane's part */
                gx[k] += gt * bn;                     /* dL/d(delta_t u_t) */
                const float ga = gt * ak[k] * hp[k];  /* dL/d(delta_t A) */
                gd[k] += ga * an[k];
                ga_[k] += ga * dt[k];
                gn[k] = ak[k] * gt;
            }
        }
        float *restrict gut = gu + i * D + d0, *restrict gdt = gdl + i * D + d0;
#pragma omp simd
        for (int k = 0; k < w; ++k) {
            gut[k] = gx[k] * dt[k];
            gdt[k] = gd[k] + gx[k] * ut[k];
        }
    }
    for (int n = 0; n < S; ++n)
        for (int k = 0; k < w; ++k) gA[(size_t)n * D + d0 + k] += gAl[n * W + k];
}

/* dL/dB and dL/dC of one sample: the per-lane parts (laid out by step, (N, S, W)) summed over the
 * lanes, written by token (lanes past a narrow tail stayed zero). */
static void lanes_to_rows(int N, int S, int rev, const float *gBw, const float *gCw, float *gB, float *gC)
{
    for (int t = 0; t < N; ++t) {
        const size_t i = rev ? (size_t)(N - 1 - t) : (size_t)t;
        for (int n = 0; n < S; ++n) {
            const size_t o = ((size_t)t * S + n) * W;
            float sb = 0.0f, sc = 0.0f;
#pragma omp simd reduction(+ : sb, sc)
            for (int k = 0; k < W; ++k) {
                sb += gBw[o + k];
                sc += gCw[o + k];
            }
            gB[i * S + n] = sb;
            gC[i * S + n] = sc;
        }
    }
}

/* y for samples [b0, b1). */
void scan_forward(int b0, int b1, int N, int D, int S, int rev, const float *u, const float *dl,
                  const float *At, const float *Bm, const float *Cm, float *y)
{
    for (int b = b0; b < b1; ++b) {
        const size_t ox = (size_t)b * N * D, os = (size_t)b * N * S;
        int d0 = 0;
        for (; d0 + W <= D; d0 += W)
            fwd_tile(N, D, S, d0, W, rev, u + ox, dl + ox, At, Bm + os, Cm + os, y + ox, 0, NULL, NULL);
        if (d0 < D)
            fwd_tile(N, D, S, d0, D - d0, rev, u + ox, dl + ox, At, Bm + os, Cm + os, y + ox, 0, NULL, NULL);
    }
}

/* Gradients for samples [b0, b1): du, ddelta, dB, dC written; dL/dA added into gA (S, D).
 * work holds (4 N + 1) S W floats. */
void scan_backward(int b0, int b1, int N, int D, int S, int rev, const float *u, const float *dl,
                   const float *At, const float *Bm, const float *Cm, const float *gy,
                   float *gu, float *gdl, float *gA, float *gB, float *gC, float *work)
{
    const size_t tile = (size_t)N * S * W;
    float *hs = work, *as = hs + tile + (size_t)S * W, *gBw = as + tile, *gCw = gBw + tile;
    memset(hs, 0, sizeof(float) * (size_t)S * W);  /* the zero state before the first step */
    for (int b = b0; b < b1; ++b) {
        const size_t ox = (size_t)b * N * D, os = (size_t)b * N * S;
        memset(gBw, 0, sizeof(float) * 2 * tile);
        for (int d0 = 0; d0 < D; d0 += W) {
            const int w = D - d0 < W ? D - d0 : W;
            /* the tile's states and decays again, then the adjoint pass over them; the y the
             * forward writes is not needed, so it goes to gu, which the backward overwrites */
            if (w == W) {
                fwd_tile(N, D, S, d0, W, rev, u + ox, dl + ox, At, Bm + os, Cm + os, gu + ox, 1, hs, as);
                bwd_tile(N, D, S, d0, W, rev, u + ox, dl + ox, At, Bm + os, Cm + os, gy + ox, hs, as,
                         gu + ox, gdl + ox, gA, gBw, gCw);
            } else {
                fwd_tile(N, D, S, d0, w, rev, u + ox, dl + ox, At, Bm + os, Cm + os, gu + ox, 1, hs, as);
                bwd_tile(N, D, S, d0, w, rev, u + ox, dl + ox, At, Bm + os, Cm + os, gy + ox, hs, as,
                         gu + ox, gdl + ox, gA, gBw, gCw);
            }
        }
        lanes_to_rows(N, S, rev, gBw, gCw, gB + os, gC + os);
    }
}

/* ---- Mamba-2's scan (SSD), step by step -------------------------------------------------------
 * Dao & Gu 2024, "Transformers are SSMs" (Mamba-2): with the state matrix a scalar per head,
 *
 *   h_t = exp(dt_t a) h_{t-1} + dt_t B_t x_t^T     (per head: h is (S, P))
 *   y_t = C_t . h_t  (+ skip_t x_t + acc_t)
 *
 * x, acc, y: (batch, N, H, P); dt, skip: (batch, N, H); a: (batch, H); B, C: (batch, N, S), shared
 * by the heads. With shift, y_t = C_{t-1} . h_{t-1} (zero at the first step: Hydra's shifted
 * scans); with rev the steps run from the last token to the first. This is the recurrence itself,
 * not the chunked matmul form of _ssd.py: on a CPU, with the state of one head's tile in L1, the
 * step costs three multiply-adds per state element and one exp per head, and no decay needs
 * factorising. Tiles are W channels of one head. */

static inline __attribute__((always_inline)) void ssd_fwd_tile(
    int N, int H, int P, int S, int h, int k0, const int w, int rev, const int shift, const float *x,
    const float *dt, float A, const float *Bm, const float *Cm, const float *skip, const float *acc,
    float *y, const int keep, float *hs, float *as)
{
    float st[SMAX * W];
    static const float zeros[SMAX] = {0};
    memset(st, 0, sizeof(float) * (size_t)S * W);
    for (int t = 0; t < N; ++t) {
        const size_t i = rev ? (size_t)(N - 1 - t) : (size_t)t;  /* the token at step t */
        const size_t o = (i * H + h) * P + k0;
        const float d = dt[i * H + h], a = exp_decay(d * A);
        const float *restrict xt = x + o, *Bt = Bm + i * S;
        /* the C this step's output reads: its own, or (shift) the step before's, after that step */
        const float *Cq = shift ? (t > 0 ? Cm + (rev ? i + 1 : i - 1) * S : zeros) : Cm + i * S;
        float xd[W], out[W];
#pragma omp simd
        for (int k = 0; k < w; ++k) {
            xd[k] = d * xt[k];
            out[k] = 0.0f;
        }
        for (int n = 0; n < S; ++n) {
            const float bn = Bt[n], cn = Cq[n];
            float *restrict sn = st + n * W;
#pragma omp simd
            for (int k = 0; k < w; ++k) {
                if (shift) out[k] += cn * sn[k];  /* h_{t-1} (shift is a constant once inlined) */
                sn[k] = a * sn[k] + xd[k] * bn;
                if (!shift) out[k] += cn * sn[k];
            }
            if (keep) memcpy(hs + ((size_t)(t + 1) * S + n) * W, sn, sizeof(float) * w);
        }
        if (keep) {
            as[t] = a;
            continue;  /* the backward pass's recomputation: it needs the states, not y */
        }
        const float sk = skip ? skip[i * H + h] : 0.0f;
        float *restrict yt = y + o;
#pragma omp simd
        for (int k = 0; k < w; ++k) yt[k] = out[k] + sk * xt[k] + (acc ? acc[o + k] : 0.0f);
    }
}

static inline __attribute__((always_inline)) void ssd_bwd_tile(
    int N, int H, int P, int S, int h, int k0, const int w, int rev, const int shift, const float *x,
    const float *dt, float A, const float *Bm, const float *Cm, const float *skip, const float *gy,
    const float *hs, const float *as, float *gx, float *gdt, float *gA, float *gskip, float *gBw, float *gCw)
{
    float G[SMAX * W];  /* a_{t+1} G_{t+1}: what reaches h_t from later steps */
    static const float zeros[W] = {0};
    memset(G, 0, sizeof(float) * (size_t)S * W);
    for (int t = N - 1; t >= 0; --t) {
        const size_t i = rev ? (size_t)(N - 1 - t) : (size_t)t;
        const size_t o = (i * H + h) * P + k0;
        const float d = dt[i * H + h], a = as[t];
        const float *restrict xt = x + o, *restrict gyt = gy + o;
        /* the output gradient that reads h_t: this step's, or (shift) the next step's */
        const float *restrict gq = shift ? (t < N - 1 ? gy + ((rev ? i - 1 : i + 1) * H + h) * P + k0 : zeros) : gyt;
        const float *Bt = Bm + i * S, *Ct = Cm + i * S;
        float xd[W], gxd[W], gav[W];
#pragma omp simd
        for (int k = 0; k < w; ++k) {
            xd[k] = d * xt[k];
            gxd[k] = 0.0f;
            gav[k] = 0.0f;
        }
        for (int n = 0; n < S; ++n) {
            const float bn = Bt[n], cn = Ct[n];
            const size_t q = ((size_t)t * S + n) * W;
            const float *restrict hp = hs + q, *restrict hk = hp + (size_t)S * W;  /* h_{t-1}, h_t */
            float *restrict Gn = G + n * W, *restrict gb = gBw + q, *restrict gc = gCw + q;
#pragma omp simd
            for (int k = 0; k < w; ++k) {
                const float gt = Gn[k] + cn * gq[k];  /* dL/dh_t */
                gc[k] += gq[k] * hk[k];               /* dL/dC_t, this lane's part */
                gb[k] += gt * xd[k];                  /* dL/dB_t, this lane's part */
                gxd[k] += gt * bn;                    /* dL/d(dt_t x_t) */
                gav[k] += gt * hp[k];                 /* dL/da_t, over n then lanes */
                Gn[k] = a * gt;
            }
        }
        const float sk = skip ? skip[i * H + h] : 0.0f;
        float sa = 0.0f, sd = 0.0f, ss = 0.0f;
        float *restrict gxt = gx + o;
#pragma omp simd reduction(+ : sa, sd, ss)
        for (int k = 0; k < w; ++k) {
            gxt[k] = gxd[k] * d + sk * gyt[k];
            sa += gav[k];
            sd += gxd[k] * xt[k];
            ss += gyt[k] * xt[k];
        }
        const float ga = sa * a;  /* dL/d(dt_t a) */
        gdt[i * H + h] += sd + ga * A;
        gA[h] += ga * d;
        if (gskip) gskip[i * H + h] += ss;
    }
}

#define SSD_TILES(CALL)                                            \
    for (int h = 0; h < H; ++h)                                    \
        for (int k0 = 0; k0 < P; k0 += W) {                        \
            const int w = P - k0 < W ? P - k0 : W;                 \
            if (w == W) { if (shift) CALL(W, 1) else CALL(W, 0) }  \
            else { if (shift) CALL(w, 1) else CALL(w, 0) }         \
        }

/* y for samples [b0, b1); skip and acc may be NULL. */
void ssd_forward(int b0, int b1, int N, int H, int P, int S, int rev, int shift, const float *x,
                 const float *dt, const float *A, const float *Bm, const float *Cm, const float *skip,
                 const float *acc, float *y)
{
    for (int b = b0; b < b1; ++b) {
        const size_t ox = (size_t)b * N * H * P, oh = (size_t)b * N * H, os = (size_t)b * N * S;
#define FWD(WW, SH) ssd_fwd_tile(N, H, P, S, h, k0, WW, rev, SH, x + ox, dt + oh, A[(size_t)b * H + h], Bm + os, \
                                 Cm + os, skip ? skip + oh : NULL, acc ? acc + ox : NULL, y + ox, 0, NULL, NULL);
        SSD_TILES(FWD)
#undef FWD
    }
}

/* Gradients for samples [b0, b1): gx, gB, gC written; gdt, gA (batch, H) and gskip (if not NULL)
 * added into (the caller zeroes them). work holds (3 N + 1) S W + N floats. */
void ssd_backward(int b0, int b1, int N, int H, int P, int S, int rev, int shift, const float *x,
                  const float *dt, const float *A, const float *Bm, const float *Cm, const float *skip,
                  const float *gy, float *gx, float *gdt, float *gA, float *gskip, float *gB, float *gC,
                  float *work)
{
    const size_t tile = (size_t)N * S * W;
    float *hs = work, *gBw = hs + tile + (size_t)S * W, *gCw = gBw + tile, *as = gCw + tile;
    memset(hs, 0, sizeof(float) * (size_t)S * W);  /* the zero state before the first step */
    for (int b = b0; b < b1; ++b) {
        const size_t ox = (size_t)b * N * H * P, oh = (size_t)b * N * H, os = (size_t)b * N * S;
        memset(gBw, 0, sizeof(float) * 2 * tile);
#define BWD(WW, SH) {                                                                                            \
            ssd_fwd_tile(N, H, P, S, h, k0, WW, rev, SH, x + ox, dt + oh, A[(size_t)b * H + h], Bm + os, Cm + os, \
                         NULL, NULL, NULL, 1, hs, as);                                                            \
            ssd_bwd_tile(N, H, P, S, h, k0, WW, rev, SH, x + ox, dt + oh, A[(size_t)b * H + h], Bm + os, Cm + os, \
                         skip ? skip + oh : NULL, gy + ox, hs, as, gx + ox, gdt + oh, gA + (size_t)b * H,         \
                         gskip ? gskip + oh : NULL, gBw, gCw); }
        SSD_TILES(BWD)
#undef BWD
        lanes_to_rows(N, S, rev, gBw, gCw, gB + os, gC + os);
    }
}
