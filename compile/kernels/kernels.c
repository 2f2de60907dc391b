/* Host kernels that compiled graphs call through R.call_dps_packed (tvm-ffi "safe call" ABI).
 *
 *   vlmc_matmul_nn(a, b, out)               out = a @ b            (BLAS)
 *   vlmc_matmul_nt(a, b, out)               out = a @ b^T, b [N,K] (BLAS; nn.Linear weights; with 2 to 16 rows
 *                                           of a, batched decode steps, a GEMV kernel: f32_gemv_batch)
 *   vlmc_segment_attention(q, k, v, ranges, out)
 *       out[i,h] = softmax_j(q[i,h] . k[j,g] / sqrt(D)) v[j,g] over keys j in [ranges[i,0], ranges[i,1])
 *       q, out [N, H, D], k, v [M, Hk, D] float32 (H a multiple of Hk; query head h reads kv head g = h / (H / Hk));
 *       ranges int32 [N, 2]; an empty range gives zeros.
 *       Short ranges (windows) run in a tile kernel; long shared ones (full attention) and causal runs (row i+1's
 *       range one key longer than row i's: a prompt) as BLAS GEMMs around a softmax.
 *   vlmc_qmatmul(x, w, out)          bfloat16 / float16 weights
 *   vlmc_qmatmul(x, w, scale, out)   int8 / int4 weights
 *       out[m, n] = sum_k x[m, k] W[n, k], fp32 accumulation; x float32 [..., K] (M = product of the leading dims),
 *       out float32 [..., N] (x's leading dims). w, contiguous:
 *         bfloat16 [N, K]: W = the bf16 value widened (bits << 16);   float16 [N, K]: W = (float)fp16 (exact);
 *         int8 [N, K]: W[n, k] = (float)q[n, k] * scale[n, k / group];
 *         uint8 [N, K/2] = int4, K % 32 == 0: each 32-element block k0..k0+31 of a row (k0 % 32 == 0) lies in 16
 *           bytes, byte j = (q[k0+j] + 8) | (q[k0+16+j] + 8) << 4, q in [-8, 7]; W = (float)q * scale[n, k / group].
 *       scale float32 [N, G], group = K / G (G = 1: one scale per row; int4: group % 32 == 0).
 *       M <= 16 (decode): a GEMV kernel that reads each weight row once for all rows of x, widening 8-16 weights at
 *       a time in registers; N split over the threads. M > 16: each thread widens a block of rows (about 1 MB of
 *       fp32, at least 256 rows) into its own buffer and multiplies it with a single-threaded BLAS GEMM.
 *   vlmc_qmatmul_bf16(x, w[, scale], out)   vlmc_qmatmul with x and W rounded to bf16 (below)
 *   vlmc_qmatmul_a8(x, w, scale, out)       vlmc_qmatmul with x quantized to int8 per block of 32 (below)
 *   vlmc_qmatmul_i8(x, w, scale, out)       int8 weights, one scale per row: x quantized to int8 per row, int8 x int8
 *                                           GEMMs (AMX) (below)
 *   vlmc_cache_attention(q, k_cache, v_cache, k_new, v_new, mask, out)                    float32 / bfloat16 cache
 *   vlmc_cache_attention(q, k_cache, v_cache, k_scale, v_scale, k_new, v_new, mask, out)  int8 cache
 *       Decode attention over a KV cache plus this step's keys: q, out float32 [B, H, S, D]; k_new, v_new float32
 *       [B, Hk, S, D]; k_cache, v_cache [B, Hk, T, D] (int8: row = q_int8 * scale, k_scale/v_scale float32
 *       [B, Hk, T]); mask float32 [B, 1, S, T + S] additive. Query head h reads kv head h / (H / Hk); key j < T is
 *       cache row j, key T + i is new row i. out[b, h, s] = softmax_j(q . K_j / sqrt(D) + mask[b, 0, s, j]) V_j.
 *       Keys whose mask is <= -1e30 are skipped (never read): they weigh exactly 0 (a row with every key masked
 *       gives zeros). Each kv head's rows are dequantized once for all query heads of its group and all S rows.
 *
 * A DSO module resolves GetFunction("name") to the exported symbol "__tvm_ffi_name".
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <tvm/ffi/c_api.h>

#include <omp.h>

/* One thread pool, OpenMP's: every BLAS call is single-threaded and the kernels below split the work across OpenMP
 * threads. A graph alternates matmuls and attention; with BLAS's own pool beside OpenMP's, each pool's idle threads
 * kept spinning on the cores the other needed (measured: window attention 4x slower after a matmul than alone). */
#if defined(VLMC_BLAS_OPENBLAS64)   /* numpy's bundled scipy-openblas: ILP64, suffixed symbols */
typedef int64_t bint;
void scipy_cblas_sgemm64_(int, int, int, bint, bint, bint, float, const float*, bint,
                          const float*, bint, float, float*, bint);
void scipy_cblas_sgemv64_(int, int, bint, bint, float, const float*, bint, const float*,
                          bint, float, float*, bint);
void scipy_openblas_set_num_threads64_(int);
/* OpenBLAS's thread count is process-wide (numpy's matmuls in this process become single-threaded too); changing it
 * per call stops or starts its threads, so it is set once, when a graph library loads. */
__attribute__((constructor)) static void blas_single_threaded(void) { scipy_openblas_set_num_threads64_(1); }
static void blas_thread_init(void) {}
/* row-major C[M,N] = alpha A[M,K] op(B) with leading dimensions; tb: B stored [N,K] */
static void gemm_ld(int tb, bint M, bint N, bint K, float alpha, const float* A, bint lda, const float* B, bint ldb,
                    float* C, bint ldc) {
  scipy_cblas_sgemm64_(101, 111, tb ? 112 : 111, M, N, K, alpha, A, lda, B, ldb, 0.f, C, ldc);
}
/* y[N] = x[K] op(B), B with leading dimension ldb */
static void gemv_ld(int tb, bint N, bint K, const float* x, const float* B, bint ldb, float* y) {
  if (tb) scipy_cblas_sgemv64_(101, 111, N, K, 1.f, B, ldb, x, 1, 0.f, y, 1);
  else    scipy_cblas_sgemv64_(101, 112, K, N, 1.f, B, ldb, x, 1, 0.f, y, 1);
}
#elif defined(VLMC_BLAS_FORTRAN)    /* Fortran LP64 sgemm_/sgemv_, e.g. MKL in libtorch_cpu */
typedef int bint;
void sgemm_(const char*, const char*, const bint*, const bint*, const bint*, const float*,
            const float*, const bint*, const float*, const bint*, const float*, float*, const bint*);
void sgemv_(const char*, const bint*, const bint*, const float*, const float*, const bint*,
            const float*, const bint*, const float*, float*, const bint*);
/* The calling thread only. The C entry takes the value; the lower-case name is MKL's Fortran entry, which takes a
   pointer (passing 1 there crashed on the first matmul). */
int MKL_Set_Num_Threads_Local(int);
static void blas_thread_init(void) { MKL_Set_Num_Threads_Local(1); }
/* row-major C = alpha A op(B)  <=>  col-major C^T = alpha op(B)^T A^T */
static void gemm_ld(int tb, bint M, bint N, bint K, float alpha, const float* A, bint lda, const float* B, bint ldb,
                    float* C, bint ldc) {
  const float zero = 0.f;
  sgemm_(tb ? "T" : "N", "N", &N, &M, &K, &alpha, B, &ldb, A, &lda, &zero, C, &ldc);
}
static void gemv_ld(int tb, bint N, bint K, const float* x, const float* B, bint ldb, float* y) {
  const float one = 1.f, zero = 0.f; const bint inc = 1; /* column-major view of row-major B */
  if (tb) sgemv_("T", &K, &N, &one, B, &ldb, x, &inc, &zero, y, &inc);
  else    sgemv_("N", &N, &K, &one, B, &ldb, x, &inc, &zero, y, &inc);
}
#endif

#define SPLIT_ALIGN 16          /* columns per chunk boundary: whole cache lines of C */
#define SPLIT_MIN_FLOPS 200000. /* smaller products run on the calling thread alone */

/* batch x (C[M,N] = A[M,K] op(B)), B stored [N,K] if tb else [K,N], contiguous. Work items are whole products when
 * there are enough of them, else slices of N (or of M, when M is the longer side) on each thread. */
static void gemm_batched(int tb, int64_t batch, int64_t M, int64_t N, int64_t K, const float* A, const float* B,
                         float* C, int64_t b_stride) {
  const int threads = omp_get_max_threads();
  const int serial = 2. * batch * M * N * K < SPLIT_MIN_FLOPS || threads == 1;
  const int64_t parts = batch >= threads ? 1 : threads;
  const int split_m = M > N;
  const int64_t len = split_m ? M : N, align = split_m ? 1 : SPLIT_ALIGN;
#pragma omp parallel for schedule(static) if (!serial)
  for (int64_t item = 0; item < batch * parts; ++item) {
    blas_thread_init();
    const int64_t i = item / parts, part = item % parts;
    const int64_t lo = (len * part / parts + align - 1) / align * align;
    int64_t hi = part == parts - 1 ? len : (len * (part + 1) / parts + align - 1) / align * align;
    hi = hi < len ? hi : len;
    if (lo >= hi) continue;
    const float *a = A + i * M * K, *b = B + i * b_stride;
    float* c = C + i * M * N;
    const bint ldb = tb ? K : N;
    if (split_m)
      gemm_ld(tb, hi - lo, N, K, 1.f, a + lo * K, K, b, ldb, c + lo * N, N);
    else if (M == 1)
      gemv_ld(tb, hi - lo, K, a, tb ? b + lo * K : b + lo, ldb, c + lo);
    else
      gemm_ld(tb, M, hi - lo, K, 1.f, a, K, tb ? b + lo * K : b + lo, ldb, c + lo, N);
  }
}

static void f32_gemv_batch(const float* x, const float* w, float* out, int64_t M, int64_t N, int64_t K);
#define F32_GEMV_MAX_M 16

static DLTensor* as_dl(const TVMFFIAny* a) {  /* VM passes ffi::Tensor objects */
  if (a->type_index == kTVMFFIDLTensorPtr) return (DLTensor*)a->v_ptr;
  if (a->type_index == kTVMFFITensor) return (DLTensor*)((char*)a->v_obj + sizeof(TVMFFIObject));
  return 0;
}
static float* fp(DLTensor* t) { return (float*)((char*)t->data + t->byte_offset); }
static int fail(const char* m) { TVMFFIErrorSetRaisedFromCStr("ValueError", m); return -1; }
static int run(int tb, const TVMFFIAny* args, int32_t n, TVMFFIAny* ret) {
  ret->type_index = kTVMFFINone; ret->zero_padding = 0; ret->v_int64 = 0;
  if (n != 3) return fail("vlmc_matmul: expected (a, b, out)");
  DLTensor *A = as_dl(args), *B = as_dl(args + 1), *C = as_dl(args + 2);
  if (!A || !B || !C || A->ndim < 2 || B->ndim < 2 || C->ndim != A->ndim)
    return fail("vlmc_matmul: bad arguments");
  if (A->dtype.code != kDLFloat || A->dtype.bits != 32) return fail("vlmc_matmul: float32 only");
  int64_t K = A->shape[A->ndim - 1];
  int64_t N = B->shape[B->ndim - (tb ? 2 : 1)], Kb = B->shape[B->ndim - (tb ? 1 : 2)];
  if (K != Kb) return fail("vlmc_matmul: K mismatch");
  if (B->ndim == 2) { /* weights: flatten a's leading dims into M */
    int64_t M = 1;
    for (int i = 0; i < A->ndim - 1; ++i) M *= A->shape[i];
    if (tb && M >= 2 && M <= F32_GEMV_MAX_M) f32_gemv_batch(fp(A), fp(B), fp(C), M, N, K);
    else gemm_batched(tb, 1, M, N, K, fp(A), fp(B), fp(C), 0);
    return 0;
  }
  if (B->ndim != A->ndim) return fail("vlmc_matmul: rank mismatch");
  int64_t batch = 1, M = A->shape[A->ndim - 2];
  for (int i = 0; i < A->ndim - 2; ++i) {
    if (A->shape[i] != B->shape[i]) return fail("vlmc_matmul: batch broadcast unsupported");
    batch *= A->shape[i];
  }
  gemm_batched(tb, batch, M, N, K, fp(A), fp(B), fp(C), K * N);
  return 0;
}
__attribute__((visibility("default")))
int __tvm_ffi_vlmc_matmul_nn(void* h, const TVMFFIAny* a, int32_t n, TVMFFIAny* r) { return run(0, a, n, r); }
__attribute__((visibility("default")))
int __tvm_ffi_vlmc_matmul_nt(void* h, const TVMFFIAny* a, int32_t n, TVMFFIAny* r) { return run(1, a, n, r); }

/* ---- segment attention ----------------------------------------------------------------------------------------
 * Flash-attention style: rows that share a key range form a tile, key tiles are folded in with an online softmax,
 * so no [N, N] score matrix exists and window attention costs only its windows. Work items (tile, head) run on
 * OpenMP threads; 16-float vector types keep the score accumulators in registers. */
#define TQ 64 /* query rows per work item */
#define TK 64 /* keys per tile */
#define RB 4  /* query rows scored together, sharing each key load */
#define VW 16 /* floats per vector */
#define WIDE_KEYS 256 /* key ranges this long, shared by at least TQ rows, go through BLAS (measured: 13% faster than
                         * the tile kernel at 256 keys, 17% at 512, 40% at 1024; the same at 64) */
#define WIDE_ROWS 256 /* query rows per BLAS work item (fewer when the key range is long, see WIDE_SCORES) */
#define WIDE_SCORES (1 << 20) /* floats of scores per thread: 4 MB, 256 rows of 4096 keys */
#define CAUSAL_ROWS 128 /* rows per block of a causal run */
typedef float vf __attribute__((vector_size(VW * sizeof(float))));

typedef int32_t vi __attribute__((vector_size(VW * sizeof(int32_t))));

static inline vf vload(const float* p) { vf x; memcpy(&x, p, sizeof x); return x; }
static inline void vstore(float* p, vf x) { memcpy(p, &x, sizeof x); }
static inline vf vsplat(float a) { return (vf){0} + a; }
static inline vf vselect(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
static inline float hmax(vf x) { float m = x[0]; for (int i = 1; i < VW; ++i) m = x[i] > m ? x[i] : m; return m; }
static inline float hsum(vf x) { float s = 0.f; for (int i = 0; i < VW; ++i) s += x[i]; return s; }

/* exp(x) for x <= 0, VW lanes at once: 2^n * exp(r), |r| <= ln2/2, Taylor to r^7 (relative error ~1e-7). */
static inline vf vexp_nonpos(vf x) {
  x = vselect(x < vsplat(-87.f), vsplat(-87.f), x);
  const vi n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vi); /* round to nearest for x <= 0 */
  const vf nf = __builtin_convertvector(n, vf);
  const vf r = x - nf * 0.693145751953125f - nf * 1.428606765330187e-06f;
  const vf p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720 +
               r * (1.f / 5040)))))));
  return p * (vf)((n + 127) << 23);
}

/* Rows [r0, r1) attend to keys [lo, hi); causal: row r only to [lo, hi - (r1 - 1 - r)). */
typedef struct { int64_t r0, r1, lo, hi, causal; } Tile;
/* Head geometry: H query heads, kv head of query head h = h / group; row strides of q/out and of k/v. */
typedef struct { int64_t H, D, group, ldq, ldk; } Heads;

static void attend(const float* q, const float* k, const float* v, float* out, const Heads* g, int64_t h,
                   const Tile* t, float scale, float* kt /* [D][TK] */, float* acc /* [TQ][D] */) {
  const int64_t D = g->D, ld = g->ldq, nr = t->r1 - t->r0, dv = D / VW * VW;
  k += h / g->group * D;  /* this head's keys and values: rows of stride ldk */
  v += h / g->group * D;
  const int64_t ldk = g->ldk;
  float m[TQ], l[TQ];
  for (int64_t i = 0; i < nr; ++i) { m[i] = -INFINITY; l[i] = 0.f; }
  memset(acc, 0, sizeof(float) * nr * D);
  for (int64_t j0 = t->lo; j0 < t->hi; j0 += TK) {
    const int64_t nk = t->hi - j0 < TK ? t->hi - j0 : TK;
    for (int64_t j = 0; j < TK; ++j) { /* key tile, transposed so that scores vectorize over keys */
      const float* kr = k + (j0 + (j < nk ? j : 0)) * ldk;
      for (int64_t d = 0; d < D; ++d) kt[d * TK + j] = kr[d];
    }
    vi valid[TK / VW]; /* lanes of real keys in this tile */
    for (int c = 0; c < TK / VW; ++c)
      for (int e = 0; e < VW; ++e) valid[c][e] = c * VW + e < nk ? -1 : 0;
    for (int64_t i0 = 0; i0 < nr; i0 += RB) {
      const int64_t nb = nr - i0 < RB ? nr - i0 : RB;
      const float* qr[RB];
      for (int b = 0; b < RB; ++b) qr[b] = q + (t->r0 + i0 + (b < nb ? b : 0)) * ld + h * D;
      vf s[RB][TK / VW];
      memset(s, 0, sizeof s);
      for (int64_t d = 0; d < D; ++d) {
        vf kd[TK / VW];
#pragma GCC unroll 8
        for (int c = 0; c < TK / VW; ++c) kd[c] = vload(kt + d * TK + c * VW);
#pragma GCC unroll 8
        for (int b = 0; b < RB; ++b) {
          const float a = qr[b][d];
#pragma GCC unroll 8
          for (int c = 0; c < TK / VW; ++c) s[b][c] += a * kd[c];
        }
      }
      /* online softmax: rescale what was accumulated so far by exp(m_old - m_new) */
      float p[RB][TK], alpha[RB];
      for (int b = 0; b < RB; ++b) {
        const int64_t i = i0 + (b < nb ? b : 0);
        vf mx = vsplat(m[i]);
        for (int c = 0; c < TK / VW; ++c) {
          s[b][c] = vselect(valid[c], s[b][c] * scale, vsplat(-INFINITY));
          mx = vselect(s[b][c] > mx, s[b][c], mx);
        }
        const float mnew = hmax(mx);
        vf sum = vsplat(0.f);
        for (int c = 0; c < TK / VW; ++c) {
          const vf e = vselect(valid[c], vexp_nonpos(s[b][c] - mnew), vsplat(0.f));
          vstore(p[b] + c * VW, e);
          sum += e;
        }
        alpha[b] = vexp_nonpos(vsplat(m[i] - mnew))[0];
        if (b < nb) { l[i] = l[i] * alpha[b] + hsum(sum); m[i] = mnew; }
      }
      /* acc[rows] = acc * alpha + P V, a 16-wide slice of D at a time with the rows' slices in registers */
      for (int64_t c = 0; c < dv; c += VW) {
        vf a[RB];
        for (int b = 0; b < RB; ++b) a[b] = vload(acc + (i0 + (b < nb ? b : 0)) * D + c) * alpha[b];
        for (int64_t j = 0; j < nk; ++j) {
          const vf vr = vload(v + (j0 + j) * ldk + c);
#pragma GCC unroll 8
          for (int b = 0; b < RB; ++b) a[b] += p[b][j] * vr;
        }
        for (int b = 0; b < nb; ++b) vstore(acc + (i0 + b) * D + c, a[b]);
      }
      for (int64_t d = dv; d < D; ++d) /* head_dim not a multiple of 16 */
        for (int b = 0; b < nb; ++b) {
          float x = acc[(i0 + b) * D + d] * alpha[b];
          for (int64_t j = 0; j < nk; ++j) x += p[b][j] * v[(j0 + j) * ldk + d];
          acc[(i0 + b) * D + d] = x;
        }
    }
  }
  for (int64_t i = 0; i < nr; ++i) {
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
    float* o = out + (t->r0 + i) * ld + h * D;
    for (int64_t d = 0; d < D; ++d) o[d] = acc[i * D + d] * inv;
  }
}

/* exp(S - row max) of each row of S [rows, width], in place; inv[r] = 1 / the row's sum. The division is applied to
 * the [rows, D] output instead: one pass over the scores less. Causal: row r has width - (rows - 1 - r) keys, the
 * rest of it is set to 0. */
static void softmax_rows(float* S, int64_t rows, int64_t width, int causal, float* inv) {
  for (int64_t r = 0; r < rows; ++r) {
    float* s = S + r * width;
    const int64_t n = causal ? width - (rows - 1 - r) : width;
    memset(s + n, 0, sizeof(float) * (width - n));
    const int64_t nv = n / VW * VW;
    vf mx = vsplat(-INFINITY);
    for (int64_t j = 0; j < nv; j += VW) { const vf x = vload(s + j); mx = vselect(x > mx, x, mx); }
    float m = hmax(mx);
    for (int64_t j = nv; j < n; ++j) m = s[j] > m ? s[j] : m;
    vf sum = vsplat(0.f);
    for (int64_t j = 0; j < nv; j += VW) { const vf e = vexp_nonpos(vload(s + j) - m); vstore(s + j, e); sum += e; }
    float total = hsum(sum);
    if (nv < n) { /* the tail as one vector padded with -inf, whose exp is 0 */
      float tail[VW];
      for (int e = 0; e < VW; ++e) tail[e] = nv + e < n ? s[nv + e] - m : -INFINITY;
      const vf x = vexp_nonpos(vload(tail));
      for (int64_t j = nv; j < n; ++j) { s[j] = x[j - nv]; total += s[j]; }
    }
    inv[r] = total > 0.f ? 1.f / total : 0.f; /* an empty row (a causal run may start with one) gives zeros */
  }
}

/* Long key ranges (full-attention blocks) and causal runs: per (range, head, block of rows), scores = Q K^T as one
 * GEMM, softmax, then P V as one GEMM, straight from the [N, H, D] and [M, Hk, D] layouts (leading dimensions). Each
 * OpenMP thread takes whole work items with a single-threaded BLAS: its scores stay in its own cache, and no thread
 * pool is woken three times per item (measured 16 heads x 1024 patches: 33 ms, against 40 ms with multithreaded
 * GEMMs over all rows of a head). Returns nonzero when out of memory. */
static int attend_wide(const float* q, const float* k, const float* v, float* out, const Heads* g,
                       const Tile* wide, int64_t nw, float scale) {
  const int64_t H = g->H, D = g->D, ldq = g->ldq, ldk = g->ldk;
  int64_t most = 0;
  for (int64_t w = 0; w < nw; ++w) most = wide[w].hi - wide[w].lo > most ? wide[w].hi - wide[w].lo : most;
  int64_t block = WIDE_SCORES / most;
  block = block > WIDE_ROWS ? WIDE_ROWS : block < TQ ? TQ : block;
  int64_t items = 0;
  for (int64_t w = 0; w < nw; ++w) items += H * ((wide[w].r1 - wide[w].r0 + block - 1) / block);
  int failed = 0;
#pragma omp parallel reduction(|| : failed)
  {
    float* S = (float*)aligned_alloc(64, sizeof(float) * ((block * most + 15) / 16 * 16));
    float* inv = (float*)malloc(sizeof(float) * block);
    blas_thread_init();
    failed = !S || !inv;
#pragma omp for schedule(dynamic)
    for (int64_t it = 0; it < items; ++it) {
      if (failed) continue;
      int64_t w = 0, rest = it, blocks;
      for (;; rest -= H * blocks, ++w) {
        blocks = (wide[w].r1 - wide[w].r0 + block - 1) / block;
        if (rest < H * blocks) break;
      }
      const Tile* t = &wide[w];
      const int64_t h = rest / blocks, r0 = t->r0 + rest % blocks * block;
      const int64_t rows = t->r1 - r0 < block ? t->r1 - r0 : block;
      /* keys of the block's last row: a causal block needs no more */
      const int64_t nk = (t->causal ? t->hi - (t->r1 - (r0 + rows)) : t->hi) - t->lo;
      const float *kh = k + t->lo * ldk + h / g->group * D, *vh = v + t->lo * ldk + h / g->group * D;
      float* o = out + r0 * ldq + h * D;
      gemm_ld(1, rows, nk, D, scale, q + r0 * ldq + h * D, ldq, kh, ldk, S, nk);
      softmax_rows(S, rows, nk, (int)t->causal, inv);
      gemm_ld(0, rows, D, nk, 1.f, S, nk, vh, ldk, o, ldq);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t d = 0; d < D; ++d) o[r * ldq + d] *= inv[r];
    }
    free(S);
    free(inv);
  }
  return failed;
}

static int run_attention(const TVMFFIAny* args, int32_t n, TVMFFIAny* ret) {
  ret->type_index = kTVMFFINone; ret->zero_padding = 0; ret->v_int64 = 0;
  if (n != 5) return fail("vlmc_segment_attention: expected (q, k, v, ranges, out)");
  DLTensor *Q = as_dl(args), *K = as_dl(args + 1), *V = as_dl(args + 2), *R = as_dl(args + 3), *O = as_dl(args + 4);
  if (!Q || !K || !V || !R || !O || Q->ndim != 3 || K->ndim != 3 || V->ndim != 3 || O->ndim != 3 || R->ndim != 2)
    return fail("vlmc_segment_attention: bad arguments");
  if (R->dtype.code != kDLInt || R->dtype.bits != 32) return fail("vlmc_segment_attention: ranges must be int32");
  const int64_t N = Q->shape[0], H = Q->shape[1], D = Q->shape[2], M = K->shape[0], Hk = K->shape[1];
  for (int i = 0; i < 3; ++i)
    if (O->shape[i] != Q->shape[i] || V->shape[i] != K->shape[i]) return fail("vlmc_segment_attention: shape mismatch");
  if (K->shape[2] != D || Hk < 1 || H % Hk) return fail("vlmc_segment_attention: kv heads must divide query heads");
  if (R->shape[0] != N || R->shape[1] != 2) return fail("vlmc_segment_attention: shape mismatch");
  const Heads heads = {H, D, H / Hk, H * D, Hk * D};
  const int32_t* rg = (const int32_t*)((char*)R->data + R->byte_offset);
  /* Runs of rows that share one key range: long ones (full attention) go through BLAS, the rest (windows) are cut
   * into tiles of up to TQ rows for the tile kernel. Causal runs of at least TQ rows go through BLAS in blocks of
   * CAUSAL_ROWS rows (each block computes its rows' triangle in full: smaller blocks waste less). */
  Tile* tiles = (Tile*)malloc(sizeof(Tile) * (N > 0 ? N : 1));
  Tile* wide = (Tile*)malloc(sizeof(Tile) * (N > 0 ? N : 1));
  if (!tiles || !wide) { free(tiles); free(wide); return fail("vlmc_segment_attention: out of memory"); }
  int64_t nt = 0, nw = 0;
  for (int64_t i = 0; i < N;) {
    const int64_t lo = rg[2 * i], hi = rg[2 * i + 1];
    if (lo < 0 || hi < lo || hi > M) {
      free(tiles); free(wide);
      return fail("vlmc_segment_attention: key range out of bounds");
    }
    int64_t j = i + 1;
    while (j < N && rg[2 * j] == lo && rg[2 * j + 1] == hi) ++j;
    if (j == i + 1) {
      int64_t c = i + 1;
      while (c < N && rg[2 * c] == lo && rg[2 * c + 1] == hi + (c - i) && hi + (c - i) <= M) ++c;
      if (c - i >= TQ) {
        for (int64_t r = i; r < c; r += CAUSAL_ROWS) {
          const int64_t r1 = r + CAUSAL_ROWS < c ? r + CAUSAL_ROWS : c;
          wide[nw++] = (Tile){r, r1, lo, hi + (r1 - 1 - i), 1};
        }
        i = c;
        continue;
      }
    }
    if (hi - lo >= WIDE_KEYS && j - i >= TQ) wide[nw++] = (Tile){i, j, lo, hi, 0};
    else
      for (int64_t r = i; r < j; r += TQ) tiles[nt++] = (Tile){r, r + TQ < j ? r + TQ : j, lo, hi, 0};
    i = j;
  }
  const float scale = 1.f / sqrtf((float)D);
  const float *q = fp(Q), *k = fp(K), *v = fp(V);
  float* o = fp(O);
  if (nw && attend_wide(q, k, v, o, &heads, wide, nw, scale)) {
    free(tiles); free(wide);
    return fail("vlmc_segment_attention: out of memory");
  }
  free(wide);
#pragma omp parallel
  {
    float* kt = (float*)aligned_alloc(64, sizeof(float) * ((D * TK + 15) / 16 * 16));
    float* acc = (float*)aligned_alloc(64, sizeof(float) * ((TQ * D + 15) / 16 * 16));
#pragma omp for schedule(dynamic)
    for (int64_t w = 0; w < nt * H; ++w) attend(q, k, v, o, &heads, w % H, &tiles[w / H], scale, kt, acc);
    free(kt);
    free(acc);
  }
  free(tiles);
  return 0;
}

__attribute__((visibility("default")))
int __tvm_ffi_vlmc_segment_attention(void* h, const TVMFFIAny* a, int32_t n, TVMFFIAny* r) {
  return run_attention(a, n, r);
}

/* ---- low-precision weights: vlmc_qmatmul ------------------------------------------------------------------------
 * Decode is memory bound: bytes per weight are the speed. Weights are widened to fp32 in registers right before their
 * FMAs, so each weight byte is read from memory once per call. These kernels use 8-float vectors (qv), AVX2's
 * width: GCC keeps arrays of vectors wider than the machine's (vf without AVX-512) in memory. */
#if defined(__AVX2__) || defined(__F16C__) || defined(__FMA__)
#include <immintrin.h>
#endif
#define QL 8 /* floats per qv: one AVX2 register (AVX-512 hosts run the same code, with 32 of them) */
typedef float qv __attribute__((vector_size(QL * sizeof(float))));
typedef int32_t qvi __attribute__((vector_size(QL * sizeof(int32_t))));
typedef uint32_t qvu __attribute__((vector_size(QL * sizeof(uint32_t))));
typedef uint16_t qv16 __attribute__((vector_size(QL * sizeof(uint16_t))));
typedef int8_t qvs8 __attribute__((vector_size(QL)));
typedef uint8_t qvu8 __attribute__((vector_size(QL)));

enum { QW_BF16, QW_F16, QW_I8, QW_I4, QW_F32 /* bf16-input GEMMs only */ };

static inline qv qload(const float* p) { qv x; memcpy(&x, p, sizeof x); return x; }
static inline void qstore(float* p, qv x) { memcpy(p, &x, sizeof x); }
static inline qv qsplat(float a) { return (qv){0} + a; }
/* a * b + c as one FMA: GCC's reassociation (-fassociative-math) turns acc += a * b; acc += c * d into a multiply,
 * an FMA and an add */
static inline qv qfma(qv a, qv b, qv c) {
#if defined(__FMA__)
  return (qv)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}
static inline float qsum(qv x) { float s = 0.f; for (int i = 0; i < QL; ++i) s += x[i]; return s; }
static inline float qmax(qv x) { float m = x[0]; for (int i = 1; i < QL; ++i) m = x[i] > m ? x[i] : m; return m; }
static inline qv qselect(qvi mask, qv a, qv b) { return (qv)(((qvi)a & mask) | ((qvi)b & ~mask)); }
/* vexp_nonpos for qv (vf's selects are done one lane at a time without AVX-512) */
static inline qv qexp_nonpos(qv x) {
  x = qselect(x < qsplat(-87.f), qsplat(-87.f), x);
  const qvi n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, qvi);
  const qv nf = __builtin_convertvector(n, qv);
  const qv r = x - nf * 0.693145751953125f - nf * 1.428606765330187e-06f;
  const qv p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720 +
               r * (1.f / 5040)))))));
  return p * (qv)((n + 127) << 23);
}

static inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023;
  uint32_t bits;
  float f;
  if (e == 31) bits = sign | 0x7f800000u | m << 13;
  else if (e) bits = sign | (e + 112) << 23 | m << 13;
  else { f = (float)m * 5.9604644775390625e-8f; memcpy(&bits, &f, 4); bits |= sign; } /* subnormal: m * 2^-24 */
  memcpy(&f, &bits, 4);
  return f;
}
static inline float bf16_to_float(uint16_t h) { const uint32_t b = (uint32_t)h << 16; float f; memcpy(&f, &b, 4); return f; }
/* QL weights from p, widened to fp32 */
static inline qv widen_bf16(const uint16_t* p) {
#if defined(__AVX2__)
  return (qv)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16);
#else
  qv16 h; memcpy(&h, p, sizeof h);
  return (qv)(__builtin_convertvector(h, qvu) << 16);
#endif
}
static inline qv widen_f16(const uint16_t* p) { /* GCC converts _Float16 vectors one lane at a time: intrinsics */
#if defined(__F16C__)
  return (qv)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
#else
  qv r;
  for (int e = 0; e < QL; ++e) r[e] = half_to_float(p[e]);
  return r;
#endif
}
/* GCC widens 8-byte integer vectors one lane at a time: intrinsics where there are */
static inline qvi widen_bytes(const void* p, int is_signed) {
#if defined(__AVX2__)
  const __m128i b = _mm_loadl_epi64((const __m128i*)p);
  return (qvi)(is_signed ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b));
#else
  qvs8 s; qvu8 u;
  memcpy(&s, p, sizeof s); memcpy(&u, p, sizeof u);
  return is_signed ? __builtin_convertvector(s, qvi) : (qvi)__builtin_convertvector(u, qvu);
#endif
}
static inline qv widen_i8(const int8_t* p) { return __builtin_convertvector(widen_bytes(p, 1), qv); }
/* int4: QL bytes of a 32-weight block from byte t: lo = weights k0+t.., hi = weights k0+16+t.. (unscaled) */
static inline void widen_i4(const uint8_t* p, qv* lo, qv* hi) {
  const qvi u = widen_bytes(p, 0);
  *lo = __builtin_convertvector((u & 15) - 8, qv);
  *hi = __builtin_convertvector((u >> 4) - 8, qv);
}
/* QL weights of a row from k (k % QL == 0 for int4), unscaled */
static inline __attribute__((always_inline)) qv qw_vec(const int kind, const void* row, int64_t k) {
  if (kind == QW_BF16) return widen_bf16((const uint16_t*)row + k);
  if (kind == QW_F16) return widen_f16((const uint16_t*)row + k);
  if (kind == QW_I8) return widen_i8((const int8_t*)row + k);
  qv lo, hi;
  widen_i4((const uint8_t*)row + k / 32 * 16 + k % 16, &lo, &hi);
  return k & 16 ? hi : lo;
}
static inline __attribute__((always_inline)) float qw_scalar(const int kind, const void* row, int64_t k) {
  if (kind == QW_BF16) return bf16_to_float(((const uint16_t*)row)[k]);
  if (kind == QW_F16) return half_to_float(((const uint16_t*)row)[k]);
  if (kind == QW_I8) return (float)((const int8_t*)row)[k];
  const uint8_t b = ((const uint8_t*)row)[k / 32 * 16 + k % 16];
  return (float)((k & 16 ? b >> 4 : b & 15) - 8);
}

typedef struct {
  int kind;
  int64_t M, N, K, G, group; /* G scale columns per row (1 for bf16/fp16), group = K / G */
  const void* w;
  const float* scale;        /* [N, G]; 0 for bf16/fp16 */
} QMat;

static inline int64_t qw_bytes(const int kind, int64_t k) { /* where weight k starts (K is even for int4) */
  return kind == QW_I8 ? k : kind == QW_I4 ? k / 2 : 2 * k;
}
static inline const void* qw_row(const QMat* q, int64_t n) { return (const char*)q->w + qw_bytes(q->kind, n * q->K); }
/* the weight rows (and scale rows, if any) of a step of NR rows from n, nr of them real: a short step repeats its
 * last row */
static inline __attribute__((always_inline)) void qw_step_rows(const QMat* q, const int NR, int64_t n, int64_t nr,
                                                               const void** row, const float** srow) {
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) {
    const int64_t rr = n + (r < nr ? r : nr - 1);
    row[r] = qw_row(q, rr);
    srow[r] = q->scale ? q->scale + rr * q->G : 0;
  }
}

/* out[m, n] for mr <= MR rows of x (row stride K; out row stride N) and weight rows [n0, n1), NR weight rows per step.
 * A short step repeats the last weight row, a short pass the last row of x, and drops their results. bf16: x is
 * permuted (qgemv_permute). int8/int4 (int4: group % 32 == 0): each widened weight is multiplied by its group's
 * scale, or with one row of x each group's partial sum is. */
#define QMR_MAX 4
#define QNR_MAX 4
static inline __attribute__((always_inline)) void qgemv_rows(const int kind, const int MR, const int NR,
                                                             const QMat* q, const float* x, int64_t mr, float* out,
                                                             int64_t n0, int64_t n1) {
  const int64_t K = q->K, N = q->N, groups = q->G, glen = q->group;
  const float* xr[QMR_MAX]; /* fixed sizes: arrays sized by a parameter would be VLAs, kept in memory */
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) xr[m] = x + (m < mr ? m : mr - 1) * K;
  for (int64_t n = n0; n < n1; n += NR) {
    const int64_t nr = n1 - n < NR ? n1 - n : NR;
    const void* row[QNR_MAX];
    const float* srow[QNR_MAX];
    qw_step_rows(q, NR, n, nr, row, srow);
    /* Software prefetch of the next step's rows, into L2, as the current ones are read: each row is a new stream the
     * hardware prefetchers (which stop at 4 KB pages) would only pick up after some misses (measured: bf16 1.6x
     * -> 1.9x, int8 2.0x -> 2.7x the speed of fp32 BLAS at 1 x 2048 x 11008). */
    const int64_t ahead = NR * (kind == QW_I4 ? K / 2 : kind == QW_I8 ? K : 2 * K); /* bytes to the next step's rows */
    qv acc[QMR_MAX][QNR_MAX];
    float tail[QMR_MAX][QNR_MAX];
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) { acc[m][r] = qsplat(0.f); tail[m][r] = 0.f; }
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * glen, kv = k0 + glen / QL * QL, k1 = k0 + glen;
      float sc[QNR_MAX];
      qv s[QNR_MAX];
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) { sc[r] = kind >= QW_I8 ? srow[r][g] : 1.f; s[r] = qsplat(sc[r]); }
      if (kind == QW_BF16) { /* pairs of bf16 in 32 bits: x is permuted, even elements first (qgemv_permute) */
        const int64_t k16 = k0 + glen / 16 * 16;
        for (int64_t k = k0; k < k16; k += 16) {
          qv ev[QNR_MAX], od[QNR_MAX];
#pragma GCC unroll 8
          for (int r = 0; r < NR; ++r) {
            qvu u;
            if (k % 32 == 0) __builtin_prefetch((const char*)((const uint16_t*)row[r] + k) + ahead, 0, 2);
            memcpy(&u, (const uint16_t*)row[r] + k, sizeof u);
            ev[r] = (qv)(u << 16);
            od[r] = (qv)(u & 0xffff0000u);
          }
#pragma GCC unroll 16
          for (int m = 0; m < MR; ++m) {
            const qv xe = qload(xr[m] + k), xo = qload(xr[m] + k + QL);
#pragma GCC unroll 8
            for (int r = 0; r < NR; ++r) acc[m][r] = qfma(xo, od[r], qfma(xe, ev[r], acc[m][r]));
          }
        }
#pragma GCC unroll 1
        for (int64_t k = k16; k < k1; ++k)
          for (int r = 0; r < NR; ++r) {
            const float wk = qw_scalar(kind, row[r], k);
            for (int m = 0; m < MR; ++m) tail[m][r] += xr[m][k] * wk;
          }
        continue;
      }
      /* int8/int4 with one row of x: the group's sum of x * q is scaled once (fewer operations per weight); with
       * more rows the scaled weights are shared by their FMAs */
      const int fold = kind >= QW_I8 && MR == 1;
      qv part[QNR_MAX];
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) part[r] = qsplat(0.f);
      if (kind == QW_I4) { /* glen % 32 == 0: whole blocks of 32 weights in 16 bytes */
        for (int64_t k = k0; k < k1; k += 32)
#pragma GCC unroll 2
          for (int t = 0; t < 16; t += QL) {
            qv lo[QNR_MAX], hi[QNR_MAX];
#pragma GCC unroll 8
            for (int r = 0; r < NR; ++r) {
              if (t == 0) __builtin_prefetch((const char*)row[r] + k / 2 + ahead, 0, 2);
              widen_i4((const uint8_t*)row[r] + k / 2 + t, &lo[r], &hi[r]);
              if (!fold) { lo[r] *= s[r]; hi[r] *= s[r]; }
            }
#pragma GCC unroll 16
            for (int m = 0; m < MR; ++m) {
              const qv xl = qload(xr[m] + k + t), xh = qload(xr[m] + k + 16 + t);
#pragma GCC unroll 8
              for (int r = 0; r < NR; ++r)
                if (fold) part[r] = qfma(xh, hi[r], qfma(xl, lo[r], part[r]));
                else acc[m][r] = qfma(xh, hi[r], qfma(xl, lo[r], acc[m][r]));
            }
          }
      } else {
        for (int64_t k = k0; k < kv; k += QL) {
          qv wv[QNR_MAX];
#pragma GCC unroll 8
          for (int r = 0; r < NR; ++r) {
            if (k % (kind == QW_I8 ? 64 : 32) == 0) /* once per cache line */
              __builtin_prefetch((const char*)row[r] + (kind == QW_I8 ? k : 2 * k) + ahead, 0, 2);
            wv[r] = qw_vec(kind, row[r], k);
            if (kind == QW_I8 && !fold) wv[r] *= s[r];
          }
#pragma GCC unroll 16
          for (int m = 0; m < MR; ++m) {
            const qv xv = qload(xr[m] + k);
#pragma GCC unroll 8
            for (int r = 0; r < NR; ++r)
              if (fold) part[r] = qfma(xv, wv[r], part[r]);
              else acc[m][r] = qfma(xv, wv[r], acc[m][r]);
          }
        }
      }
      if (fold)
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) acc[0][r] = qfma(part[r], s[r], acc[0][r]);
#pragma GCC unroll 1
      for (int64_t k = kv; k < k1; ++k) /* K (or the group) not a multiple of the vector width */
        for (int r = 0; r < NR; ++r) {
          const float wk = qw_scalar(kind, row[r], k) * sc[r];
          for (int m = 0; m < MR; ++m) tail[m][r] += xr[m][k] * wk;
        }
    }
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      if (m >= mr) break;
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r)
        if (r < nr) out[m * N + n + r] = qsum(acc[m][r]) + tail[m][r];
    }
  }
}

/* Rows of x per pass (MR) and weight rows per step (NR): the MR * NR accumulators, the widened weights and x fit
 * AVX2's 16 vector registers. A pass of m rows uses the smallest MR >= m (repeating its last row); more rows take
 * several passes over cache-resident weight rows: x's rows of a pass stay in L1 (measured at 8 and 16 rows: passes of
 * 4 rows 1.3-1.5x faster than of 8, whose x streams from L2; passes of 2 slower again). */
#define QGEMV_PASS 4
#ifdef __AVX512F__ /* 32 vector registers: 4 x 4 accumulators (measured 1.1-1.3x at 4 and 16 x 2048 x 11008) */
#define QGEMV_NR(MR) 4
#else
#define QGEMV_NR(MR) ((MR) <= 2 ? 4 : 2)
#endif
typedef void (*qgemv_fn)(const QMat*, const float*, int64_t, float*, int64_t, int64_t);
#define QGEMV_DEF(NAME, KIND, MR)                                                                                 \
  static void NAME##_##MR(const QMat* q, const float* x, int64_t mr, float* out, int64_t n0, int64_t n1) {      \
    qgemv_rows(KIND, MR, QGEMV_NR(MR), q, x, mr, out, n0, n1);                                                 \
  }
#define QGEMV_SET(NAME, KIND) QGEMV_DEF(NAME, KIND, 1) QGEMV_DEF(NAME, KIND, 2) QGEMV_DEF(NAME, KIND, 4)          \
  static const qgemv_fn NAME[QGEMV_PASS + 1] = {0, NAME##_1, NAME##_2, NAME##_4, NAME##_4};
QGEMV_SET(qgemv_bf16, QW_BF16)
QGEMV_SET(qgemv_f16, QW_F16)
QGEMV_SET(qgemv_i8, QW_I8)
QGEMV_SET(qgemv_i4, QW_I4)

/* bf16 weights: x [M, K] with each block of 16 reordered even elements first (the rest as is), to match the two
 * 8-float vectors that 16 bf16 weights, read as 8 32-bit pairs, widen to: bits << 16 (the even elements, little
 * endian) and bits & 0xffff0000 (the odd ones). */
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the bf16 kernel reads pairs of weights as one 32-bit word");
static void qgemv_permute(const float* x, int64_t M, int64_t K, float* xp) {
  for (int64_t m = 0; m < M; ++m) {
    const float* s = x + m * K;
    float* d = xp + m * K;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
      for (int i = 0; i < 8; ++i) { d[k + i] = s[k + 2 * i]; d[k + 8 + i] = s[k + 2 * i + 1]; }
    for (; k < K; ++k) d[k] = s[k];
  }
}

/* int4 with one row of x and groups of 64k weights: 32 bytes (two 32-weight blocks) per load, each 32-bit lane
 * holding 8 nibbles. Nibble p of every lane is taken by a mask alone (u << 4p, exact in fp32) and x is permuted and
 * scaled by 2^-4p to match (qgemv_i4_prepare), so a weight costs an AND, a convert and an FMA: no widening
 * shuffles, no shifts, no -8 (sum (u - 8) x = sum u x - 8 sum x, with sum x per group computed once per call). */
#define I4F_CHUNK 64 /* weights per 32-byte load */
/* xp[c * 64 + p * 8 + L] = x[64c + 32(L / 4) + 16(p % 2) + 4(L % 4) + p / 2] * 2^-4p (p < 7; p = 7 is shifted
 * down, scale 1); xsum[g] = the sum of x over group g */
static void qgemv_i4_prepare(const float* x, int64_t K, int64_t group, float* xp, float* xsum) {
  for (int64_t c = 0; c < K / I4F_CHUNK; ++c)
    for (int p = 0; p < 8; ++p)
      for (int L = 0; L < 8; ++L)
        xp[c * 64 + p * 8 + L] = x[c * 64 + 32 * (L / 4) + 16 * (p % 2) + 4 * (L % 4) + p / 2] *
                                 (p < 7 ? 1.f / (float)(1 << 4 * p) : 1.f);
  for (int64_t g = 0; g < K / group; ++g) {
    double s = 0; /* one per group per call: cheap, and keeps the -8 correction accurate */
    for (int64_t k = g * group; k < (g + 1) * group; ++k) s += x[k];
    xsum[g] = (float)s;
  }
}

#define I4F_NR 4
static void qgemv_i4_fold(const QMat* q, const float* xp, const float* xsum, float* out, int64_t n0, int64_t n1) {
  const int64_t K = q->K, G = q->G, chunks = q->group / I4F_CHUNK, rowb = K / 2;
  for (int64_t n = n0; n < n1; n += I4F_NR) {
    const int64_t nr = n1 - n < I4F_NR ? n1 - n : I4F_NR;
    const void* row[I4F_NR];
    const float* srow[I4F_NR];
    qw_step_rows(q, I4F_NR, n, nr, row, srow);
    const int64_t ahead = I4F_NR * rowb;
    qv acc[I4F_NR];
    float corr[I4F_NR];
#pragma GCC unroll 4
    for (int r = 0; r < I4F_NR; ++r) { acc[r] = qsplat(0.f); corr[r] = 0.f; }
    for (int64_t g = 0; g < G; ++g) {
      qv part[I4F_NR];
#pragma GCC unroll 4
      for (int r = 0; r < I4F_NR; ++r) part[r] = qsplat(0.f);
      for (int64_t c = g * chunks; c < (g + 1) * chunks; ++c) {
        const float* xc = xp + c * 64;
        qvi v[I4F_NR];
#pragma GCC unroll 4
        for (int r = 0; r < I4F_NR; ++r) {
          if (c % 2 == 0) __builtin_prefetch((const uint8_t*)row[r] + c * 32 + ahead, 0, 2);
          memcpy(&v[r], (const uint8_t*)row[r] + c * 32, sizeof v[r]);
        }
#pragma GCC unroll 8
        for (int p = 0; p < 8; ++p) {
          const qv xv = qload(xc + p * 8);
#pragma GCC unroll 4
          for (int r = 0; r < I4F_NR; ++r) {
            const qvi u = p < 7 ? v[r] & (int32_t)(15u << 4 * p) : (qvi)((qvu)v[r] >> 28);
            part[r] = qfma(__builtin_convertvector(u, qv), xv, part[r]);
          }
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < I4F_NR; ++r) {
        const float sg = srow[r][g];
        acc[r] = qfma(part[r], qsplat(sg), acc[r]);
        corr[r] += sg * xsum[g];
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < I4F_NR; ++r)
      if (r < nr) out[n + r] = qsum(acc[r]) - 8.f * corr[r];
  }
}

/* all M (<= 16) rows of x against weight rows [n0, n1) */
static void qgemv_range(const QMat* q, const float* x, float* out, int64_t n0, int64_t n1) {
  const qgemv_fn* fns = q->kind == QW_BF16 ? qgemv_bf16 : q->kind == QW_F16 ? qgemv_f16
                      : q->kind == QW_I8 ? qgemv_i8 : qgemv_i4;
  const int64_t M = q->M, passes = (M + QGEMV_PASS - 1) / QGEMV_PASS;
  if (passes == 1) { fns[M](q, x, M, out, n0, n1); return; }
  for (int64_t nb = n0; nb < n1; nb += SPLIT_ALIGN) { /* 16 weight rows stay in L2 for every pass */
    const int64_t ne = nb + SPLIT_ALIGN < n1 ? nb + SPLIT_ALIGN : n1;
    for (int64_t p = 0; p < passes; ++p) {
      const int64_t m0 = M * p / passes, m1 = M * (p + 1) / passes;
      fns[m1 - m0](q, x + m0 * q->K, m1 - m0, out + m0 * q->N, nb, ne);
    }
  }
}

static inline uint16_t bf16_rne(float f) {
  uint32_t b;
  memcpy(&b, &f, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN, as torch rounds it */
  return (uint16_t)((b + 0x7fffu + ((b >> 16) & 1)) >> 16);
}
/* bf16_rne of QL lanes */
static inline qv16 qv_bf16_rne(qv v) {
  qvu b;
  memcpy(&b, &v, sizeof b);
  const qvu nan = (qvu)((b & 0x7fffffffu) > 0x7f800000u);
  const qvu r = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  return __builtin_convertvector((r & ~nan) | (0x7fc0u & nan), qv16);
}
static inline void qstore16(uint16_t* p, qv16 h) { memcpy(p, &h, sizeof h); }
#if defined(__AVX512F__) && defined(__AVX512BW__)
/* bf16_rne of 16 lanes (GCC's generic vectors stay 8 lanes wide here and run this at half the rate) */
static inline __m256i bf16_rne16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v), one = _mm512_set1_epi32(1);
  const __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), _mm512_and_si512(_mm512_srli_epi32(b, 16), one)), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(b, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0)));
}
#define QW_BF16_STEP (2 * QL)
#else
#define QW_BF16_STEP QL
#endif
static void round_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  for (; i + 16 <= n; i += 16) _mm256_storeu_si256((__m256i*)(dst + i), bf16_rne16(_mm512_loadu_ps(src + i)));
#endif
  for (; i + QL <= n; i += QL) qstore16(dst + i, qv_bf16_rne(qload(src + i)));
  for (; i < n; ++i) dst[i] = bf16_rne(src[i]);
}
/* QW_BF16_STEP dequantized weights from k on, rounded to bf16 */
static inline __attribute__((always_inline)) void qw_store_bf16(const int kind, const void* row, int64_t k, qv s,
                                                                uint16_t* o) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const qv lo = qw_vec(kind, row, k) * s, hi = qw_vec(kind, row, k + QL) * s;
  _mm256_storeu_si256((__m256i*)o, bf16_rne16(_mm512_insertf32x8(_mm512_castps256_ps512((__m256)lo), (__m256)hi, 1)));
#else
  qstore16(o, qv_bf16_rne(qw_vec(kind, row, k) * s));
#endif
}
#define QW_AHEAD 4096 /* bytes of weights prefetched ahead: they stream from memory once per product */
/* weights [k0, kv) of one row times s: fp32 into o32, or rounded to bf16 into o16 (kv - k0 a multiple of the step) */
static inline __attribute__((always_inline)) void qw_dequant_run(const int kind, const void* row, int64_t k0,
                                                                 int64_t kv, qv s, float* o32, uint16_t* o16) {
  if (o16)
    for (int64_t k = k0; k < kv; k += QW_BF16_STEP) {
      __builtin_prefetch((const char*)row + qw_bytes(kind, k) + QW_AHEAD, 0, 0);
      qw_store_bf16(kind, row, k, s, o16 + k);
    }
  else
    for (int64_t k = k0; k < kv; k += QL) {
      __builtin_prefetch((const char*)row + qw_bytes(kind, k) + QW_AHEAD, 0, 0);
      qstore(o32 + k, qw_vec(kind, row, k) * s);
    }
}
/* rows [n0, n0 + rows) of W, dequantized: f32[rows, K], or rounded to bf16 in the same pass: b16[rows, K] bf16 bits */
static void qw_dequant(const QMat* q, int64_t n0, int64_t rows, float* f32, uint16_t* b16) {
  const int64_t K = q->K, glen = q->group, groups = q->G, step = b16 ? QW_BF16_STEP : QL;
  for (int64_t i = 0; i < rows; ++i) {
    const void* row = qw_row(q, n0 + i);
    float* o32 = f32 ? f32 + i * K : 0;
    uint16_t* o16 = b16 ? b16 + i * K : 0;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * glen, kv = k0 + glen / step * step, k1 = k0 + glen;
      const float sc = q->scale ? q->scale[(n0 + i) * q->G + g] : 1.f;
      const qv s = qsplat(sc); /* 1 for bf16 / fp16 weights: an exact product */
      if (q->kind == QW_BF16)     qw_dequant_run(QW_BF16, row, k0, kv, s, o32, o16);
      else if (q->kind == QW_F16) qw_dequant_run(QW_F16, row, k0, kv, s, o32, o16);
      else if (q->kind == QW_I8)  qw_dequant_run(QW_I8, row, k0, kv, s, o32, o16);
      else                        qw_dequant_run(QW_I4, row, k0, kv, s, o32, o16);
      for (int64_t k = kv; k < k1; ++k) {
        const float v = qw_scalar(q->kind, row, k) * sc;
        if (o16) o16[k] = bf16_rne(v);
        else o32[k] = v;
      }
    }
  }
}

#define QBLOCK_BYTES (1 << 20) /* fp32 weight block per thread for the GEMM path (about L2-sized) ... */
#define QBLOCK_MIN_ROWS 256     /* ... but no fewer weight rows per BLAS call: the BLAS packs x again on every call,
                                 * so narrow calls run at half its rate or less (measured at M = 320, one thread, K =
                                 * 11008: 16 rows 69 GFLOP/s fp32 sgemm and 198 bf16, 256 rows 134 and 610) */

/* How the GEMM paths split a product: blocks of `rows` weight rows (about QBLOCK_BYTES of fp32 and at least
 * QBLOCK_MIN_ROWS, as far as every thread still gets a block; whole cache lines of the output), and x's rows in
 * `mparts` parts when there are fewer blocks than threads. */
typedef struct { int64_t rows, blocks, mparts; } BlockPlan;
static BlockPlan block_plan(const QMat* q, int threads) {
  const int64_t M = q->M, N = q->N, K = q->K;
  int64_t rows = QBLOCK_BYTES / (int64_t)sizeof(float) / K;
  const int64_t per_thread = (N + threads - 1) / threads;
  if (rows < QBLOCK_MIN_ROWS) rows = QBLOCK_MIN_ROWS < per_thread ? QBLOCK_MIN_ROWS : per_thread;
  rows = rows / SPLIT_ALIGN * SPLIT_ALIGN;
  rows = rows < SPLIT_ALIGN ? SPLIT_ALIGN : rows;
  const int64_t n16 = (N + SPLIT_ALIGN - 1) / SPLIT_ALIGN * SPLIT_ALIGN;
  rows = rows > n16 ? n16 : rows;
  const int64_t blocks = (N + rows - 1) / rows;
  int64_t mparts = blocks >= threads ? 1 : (threads + blocks - 1) / blocks;
  if (mparts > M / 16) mparts = M / 16 > 1 ? M / 16 : 1;
  return (BlockPlan){rows, blocks, mparts};
}

/* M > 16: threads take blocks of weight rows dynamically, widen each into their own buffer and multiply it with a
 * single-threaded BLAS GEMM (when there are fewer blocks than threads, x's rows are split too). Returns nonzero
 * when out of memory. */
static int qmatmul_blocks(const QMat* q, const float* x, float* out) {
  const int64_t M = q->M, N = q->N, K = q->K;
  const int threads = omp_get_max_threads();
  const BlockPlan bp = block_plan(q, threads);
  const int64_t rows = bp.rows, blocks = bp.blocks, mparts = bp.mparts;
  const int serial = 2. * M * N * K < SPLIT_MIN_FLOPS || threads == 1;
  int failed = 0;
#pragma omp parallel if (!serial) reduction(|| : failed)
  {
    float* buf = (float*)aligned_alloc(64, (sizeof(float) * rows * K + 63) / 64 * 64);
    int64_t have = -1;
    blas_thread_init();
    failed = !buf;
#pragma omp for schedule(dynamic)
    for (int64_t it = 0; it < blocks * mparts; ++it) {
      if (failed) continue;
      const int64_t b = it / mparts, p = it % mparts, n0 = b * rows, nr = N - n0 < rows ? N - n0 : rows;
      const int64_t m0 = M * p / mparts, m1 = M * (p + 1) / mparts;
      if (have != b) { qw_dequant(q, n0, nr, buf, 0); have = b; }
      gemm_ld(1, m1 - m0, nr, K, 1.f, x + m0 * K, K, buf, K, out + m0 * N + n0, N);
    }
    free(buf);
  }
  return failed;
}

static void* data_of(const DLTensor* t) { return (char*)t->data + t->byte_offset; }
static int is_f32(const DLTensor* t) { return t->dtype.code == kDLFloat && t->dtype.bits == 32 && t->dtype.lanes == 1; }
static int compact(const DLTensor* t) { /* row-major contiguous (strides absent or those of a compact tensor) */
  if (!t->strides) return 1;
  int64_t s = 1;
  for (int i = t->ndim - 1; i >= 0; --i) {
    if (t->shape[i] != 1 && t->strides[i] != s) return 0;
    s *= t->shape[i];
  }
  return 1;
}

/* the entry points of run_qmatmul: vlmc_qmatmul, vlmc_qmatmul_bf16 (below; float32 weights too) and vlmc_qmatmul_a8
 * (below; int8/int4 weights only) */
enum { QM_PLAIN, QM_BF16_INPUTS, QM_INT8_INPUTS, QM_INT8_ROWS };
static int qmatmul_bf16_inputs(const QMat* q, const float* x, float* out);
static int qmatmul_int8_inputs(const QMat* q, const float* x, float* out);
static int qmatmul_i8(const QMat* q, const float* x, float* out);
/* where thread `part` of `threads` starts on N rows of out (part == threads: N): whole cache lines per thread */
static inline int64_t part_edge(int64_t N, int64_t part, int64_t threads) {
  if (part >= threads) return N;
  const int64_t edge = (N * part / threads + SPLIT_ALIGN - 1) / SPLIT_ALIGN * SPLIT_ALIGN;
  return edge < N ? edge : N;
}

/* M <= 16: N split over the threads */
static void qgemv_parallel(const QMat* q, const float* x, float* out, int i4_fold) {
  const int64_t M = q->M, N = q->N, K = q->K;
  const int threads = omp_get_max_threads();
  const int serial = 2. * M * N * K < SPLIT_MIN_FLOPS || threads == 1;
#pragma omp parallel for schedule(static) if (!serial)
  for (int part = 0; part < threads; ++part) {
    const int64_t lo = part_edge(N, part, threads), hi = part_edge(N, part + 1, threads);
    if (lo >= hi) continue;
    if (i4_fold) qgemv_i4_fold(q, x, x + K, out, lo, hi);
    else qgemv_range(q, x, out, lo, hi);
  }
}

static int run_qmatmul(const TVMFFIAny* args, int32_t n, TVMFFIAny* ret, int mode) {
  const int bf16_inputs = mode == QM_BF16_INPUTS;
  ret->type_index = kTVMFFINone; ret->zero_padding = 0; ret->v_int64 = 0;
  if (n != 3 && n != 4) return fail("vlmc_qmatmul: expected (x, w, out) or (x, w, scale, out)");
  DLTensor *X = as_dl(args), *W = as_dl(args + 1), *S = n == 4 ? as_dl(args + 2) : 0, *O = as_dl(args + n - 1);
  if (!X || !W || !O || (n == 4 && !S)) return fail("vlmc_qmatmul: arguments must be tensors");
  if (!is_f32(X) || !is_f32(O)) return fail("vlmc_qmatmul: x and out must be float32");
  int kind;
  const DLDataType wt = W->dtype;
  if (wt.lanes != 1) return fail("vlmc_qmatmul: unsupported weight dtype");
  if (wt.code == kDLBfloat && wt.bits == 16) kind = QW_BF16;
  else if (wt.code == kDLFloat && wt.bits == 16) kind = QW_F16;
  else if (wt.code == kDLInt && wt.bits == 8) kind = QW_I8;
  else if (wt.code == kDLUInt && wt.bits == 8) kind = QW_I4;
  else if (bf16_inputs && is_f32(W)) kind = QW_F32;
  else return fail(bf16_inputs ? "vlmc_qmatmul_bf16: weights must be float32, bfloat16, float16, int8 or uint8 (packed int4)"
                               : "vlmc_qmatmul: weights must be bfloat16, float16, int8 or uint8 (packed int4)");
  const int scaled = kind == QW_I8 || kind == QW_I4;
  if (mode == QM_INT8_INPUTS && !scaled) return fail("vlmc_qmatmul_a8: weights must be int8 or uint8 (packed int4)");
  if (mode == QM_INT8_ROWS && (kind != QW_I8 || n != 4 || as_dl(args + 2)->ndim != 2 || as_dl(args + 2)->shape[1] != 1))
    return fail("vlmc_qmatmul_i8: weights must be int8 with one scale per row (scale [N, 1])");
  if (scaled != (n == 4))
    return fail(scaled ? "vlmc_qmatmul: int8/int4 weights take (x, w, scale, out)"
                       : "vlmc_qmatmul: bfloat16/float16 weights take (x, w, out)");
  if (X->ndim < 1 || W->ndim != 2 || O->ndim != X->ndim) return fail("vlmc_qmatmul: bad ranks (x [..., K], w [N, K])");
  if (!compact(X) || !compact(W) || !compact(O) || (S && !compact(S))) return fail("vlmc_qmatmul: tensors must be contiguous");
  const int64_t K = X->shape[X->ndim - 1], N = W->shape[0];
  int64_t M = 1;
  for (int i = 0; i < X->ndim - 1; ++i) {
    if (O->shape[i] != X->shape[i]) return fail("vlmc_qmatmul: out's leading dims must be x's");
    M *= X->shape[i];
  }
  if (O->shape[O->ndim - 1] != N) return fail("vlmc_qmatmul: out's last dim must be N");
  if (kind == QW_I4) {
    if (K % 32) return fail("vlmc_qmatmul: int4 weights need K % 32 == 0");
    if (W->shape[1] * 2 != K) return fail("vlmc_qmatmul: int4 weights must be uint8 [N, K / 2]");
  } else if (W->shape[1] != K) return fail("vlmc_qmatmul: w must be [N, K]");
  int64_t G = 1;
  if (scaled) {
    if (!is_f32(S) || S->ndim != 2 || S->shape[0] != N || S->shape[1] < 1)
      return fail("vlmc_qmatmul: scale must be float32 [N, G]");
    G = S->shape[1];
    if (K % G) return fail("vlmc_qmatmul: K must be a multiple of the scale columns G");
    if (kind == QW_I4 && (K / G) % 32) return fail("vlmc_qmatmul: int4 group size (K / G) must be a multiple of 32");
    if (mode == QM_INT8_INPUTS && G > 1 && (K / G) % 32)
      return fail("vlmc_qmatmul_a8: the group size (K / G) must be a multiple of 32 (or one scale per row)");
  }
  float* out = (float*)data_of(O);
  if (M == 0 || N == 0) return 0;
  if (K == 0) { memset(out, 0, sizeof(float) * M * N); return 0; }
  const QMat q = {kind, M, N, K, G, K / G, data_of(W), scaled ? (const float*)data_of(S) : 0};
  const float* x = (const float*)data_of(X);
  if (bf16_inputs) return qmatmul_bf16_inputs(&q, x, out) ? fail("vlmc_qmatmul_bf16: out of memory") : 0;
  if (mode == QM_INT8_INPUTS) return qmatmul_int8_inputs(&q, x, out) ? fail("vlmc_qmatmul_a8: out of memory") : 0;
  if (mode == QM_INT8_ROWS) return qmatmul_i8(&q, x, out) ? fail("vlmc_qmatmul_i8: out of memory") : 0;
  if (M > 16) return qmatmul_blocks(&q, x, out) ? fail("vlmc_qmatmul: out of memory") : 0;
  float* xp = 0;
  const int i4_fold = kind == QW_I4 && M == 1 && q.group % I4F_CHUNK == 0;
  if (kind == QW_BF16 || i4_fold) {
    if (!(xp = (float*)malloc(sizeof(float) * (M * K + (i4_fold ? G : 0))))) return fail("vlmc_qmatmul: out of memory");
    if (i4_fold) qgemv_i4_prepare(x, K, q.group, xp, xp + K);
    else qgemv_permute(x, M, K, xp);
    x = xp;
  }
  qgemv_parallel(&q, x, out, i4_fold);
  free(xp);
  return 0;
}

/* vlmc_matmul's x [M, K] @ w[N, K]^T for 2 <= M <= 16 (batched decode steps). The BLAS packs all of w for so few
 * rows (measured 23 GFLOP/s at 4 x 2048 x 11008, 69 at 16 x ...). Here a tile of w (16 rows x up to F32_GEMV_KC
 * columns) is read from memory once and stays in L2 while passes of up to four rows of x (in L1) run over it with
 * 4 x 4 accumulators of the widest vectors the host has (AVX-512: 16 floats; fp32 needs no widening, so the 8-float
 * qv kernels would halve the FMA rate). At 16 rows the FMAs take longer than the tile's read, so each pass also
 * prefetches its share of the next tile: the memory stream runs through all passes instead of the first alone
 * (measured 25-35% faster at 16 x 2048 x 11008 and 16 x 11008 x 2048 with the weights streamed from DRAM). */
#ifdef __AVX512F__
#define FL 16
#else
#define FL 8
#endif
#define F32_GEMV_KC 1024
typedef float fv __attribute__((vector_size(FL * sizeof(float))));
static inline fv fvload(const float* p) { fv x; memcpy(&x, p, sizeof x); return x; }

/* out[m, n] (=, or += when add) x[m, k0:k1] . w[n, k0:k1] for mr <= 4 rows of x and rows [n0, n1) of w. Pass p of P
 * prefetches part p of each row of the next tile (next: its first row's [k0, k1) position, next_rows rows); a
 * single pass prefetches the rows four ahead of the ones it reads instead. */
static void f32_gemv_pass(const float* x, int64_t mr, const float* w, float* out, int64_t N, int64_t K, int64_t n0,
                          int64_t n1, int64_t k0, int64_t k1, int add, const float* next, int64_t next_rows,
                          int64_t p, int64_t P) {
  const float* xr[4];
  for (int m = 0; m < 4; ++m) xr[m] = x + (m < mr ? m : mr - 1) * K; /* a short pass repeats its last row */
  const int64_t kv = k0 + (k1 - k0) / FL * FL, share = (k1 - k0) * p / P;
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t nr = n1 - n < 4 ? n1 - n : 4;
    const float *wr[4], *pr[4];
    for (int r = 0; r < 4; ++r) {
      wr[r] = w + (n + (r < nr ? r : nr - 1)) * K;
      const int64_t g = n - n0 + r < next_rows ? n - n0 + r : next_rows - 1;
      pr[r] = next ? next + g * K + share : 0;
    }
    fv acc[4][4];
    for (int m = 0; m < 4; ++m)
      for (int r = 0; r < 4; ++r) acc[m][r] = (fv){0};
    /* several passes: prefetch at every P-th step, at (k - k0) / P of the next tile's rows (counted, not divided:
     * the division per step cost 5% at 8-16 rows) */
    int64_t phase = 0, ahead = 0;
    for (int64_t k = k0; k < kv; k += FL) {
      fv wv[4];
      const int pf = P > 1 && next && phase == 0;
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        if (P == 1) {
          if (k * 4 % 64 == 0) __builtin_prefetch(wr[r] + k + 4 * K, 0, 2);
        } else if (pf)
          __builtin_prefetch(pr[r] + ahead, 0, 2);
        wv[r] = fvload(wr[r] + k);
      }
      if (pf) ahead += FL;
      if (++phase == P) phase = 0;
#pragma GCC unroll 4
      for (int m = 0; m < 4; ++m) {
        const fv xv = fvload(xr[m] + k);
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) acc[m][r] += xv * wv[r];
      }
    }
    for (int m = 0; m < mr; ++m)
      for (int r = 0; r < nr; ++r) {
        float sum = 0.f;
        for (int i = 0; i < FL; ++i) sum += acc[m][r][i];
        for (int64_t k = kv; k < k1; ++k) sum += xr[m][k] * wr[r][k];
        out[m * N + n + r] = add ? out[m * N + n + r] + sum : sum;
      }
  }
}

static void f32_gemv_batch(const float* x, const float* w, float* out, int64_t M, int64_t N, int64_t K) {
  const int threads = omp_get_max_threads();
  const int serial = 2. * M * N * K < SPLIT_MIN_FLOPS || threads == 1;
  const int64_t passes = (M + 3) / 4;
  const int64_t kc = passes == 1 ? K : F32_GEMV_KC; /* one pass: x's rows fit L2 whole, the rows stream in order */
#pragma omp parallel for schedule(static) if (!serial)
  for (int part = 0; part < threads; ++part) {
    const int64_t lo = part_edge(N, part, threads), hi = part_edge(N, part + 1, threads);
    for (int64_t nb = lo; nb < hi; nb += SPLIT_ALIGN) {
      const int64_t ne = nb + SPLIT_ALIGN < hi ? nb + SPLIT_ALIGN : hi;
      for (int64_t k0 = 0; k0 < K; k0 += kc) {
        const int64_t k1 = k0 + kc < K ? k0 + kc : K;
        const float* next = 0; /* the next tile: these rows' next columns, else the next block's first */
        int64_t next_rows = ne - nb;
        if (k1 < K) next = w + nb * K + k1;
        else if (ne < hi) {
          next = w + ne * K;
          next_rows = (ne + SPLIT_ALIGN < hi ? ne + SPLIT_ALIGN : hi) - ne;
        }
        for (int64_t p = 0; p < passes; ++p) {
          const int64_t m0 = M * p / passes, m1 = M * (p + 1) / passes;
          f32_gemv_pass(x + m0 * K, m1 - m0, w, out + m0 * N, N, K, nb, ne, k0, k1, k0 > 0, next, next_rows, p,
                        passes);
        }
      }
    }
  }
}

__attribute__((visibility("default")))
int __tvm_ffi_vlmc_qmatmul(void* h, const TVMFFIAny* a, int32_t n, TVMFFIAny* r) { return run_qmatmul(a, n, r, QM_PLAIN); }

/* ---- bf16 GEMM inputs (backend.compute: bf16) --------------------------------------------------------------------
 * vlmc_qmatmul_bf16(x, w[, scale], out): vlmc_qmatmul's product with both inputs rounded to bf16 (nearest even; NaN
 * stays NaN) before it: out = bf16(x) @ bf16(W)^T, W the weight as vlmc_qmatmul defines it (float32 weights too; int8
 * and int4: bf16(q * s)). Every product of two bf16 values is exact in fp32, so the result is the exact product
 * up to fp32 accumulation order. Two paths, the same numbers:
 *   mkl:  MKL's cblas_gemm_bf16bf16f32 (in torch's libtorch_cpu, opened on first use): AMX / AVX512-BF16 kernels
 *         on Intel CPUs (measured 5x OpenBLAS fp32 on a Sapphire Rapids core). MKL has no fast path on other
 *         vendors' CPUs (0.2-0.7x fp32 measured on an AMD EPYC), so it is the default on Intel CPUs with bf16
 *         instructions only.
 *   fp32: the rounded values widened to fp32 and multiplied by the BLAS sgemm (no speed-up; for every other host).
 * VLMC_BF16_GEMM=mkl|fp32 overrides the choice (mkl falls back to fp32 when MKL cannot be opened). Work is split
 * as in qmatmul_blocks: threads take blocks of weight rows, each call single-threaded. */
#include <dlfcn.h>
typedef void (*gemm_bf16_fn)(int, int, int, int, int, int, float, const uint16_t*, int, const uint16_t*, int, float,
                             float*, int);
static gemm_bf16_fn mkl_gemm_bf16;
static int (*mkl_threads_local)(int);
enum { BF16_MKL = 1, BF16_FP32 = 2 };
static int mkl_state; /* 0: not tried, 1: opened, 2: unavailable */
static int intel_bf16 = -1;

/* VLMC_BF16_GEMM is read on every call (a test or a benchmark may switch it); MKL is opened once */
static int choose_bf16_path(void) {
  const char* env = getenv("VLMC_BF16_GEMM");
  int want_mkl;
  if (env && !strcmp(env, "mkl")) want_mkl = 1;
  else if (env && !strcmp(env, "fp32")) want_mkl = 0;
  else {
    if (intel_bf16 < 0) {
      __builtin_cpu_init();
      intel_bf16 = __builtin_cpu_is("intel") && (__builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16"));
    }
    want_mkl = intel_bf16;
  }
  if (!want_mkl) return BF16_FP32;
#pragma omp critical(vlmc_mkl_open)
  if (!mkl_state) {
    mkl_state = 2;
#ifdef VLMC_MKL_LIB
    void* lib = dlopen(VLMC_MKL_LIB, RTLD_NOW | RTLD_LOCAL);
    if (lib) {
      mkl_threads_local = (int (*)(int))dlsym(lib, "MKL_Set_Num_Threads_Local");
      mkl_gemm_bf16 = (gemm_bf16_fn)dlsym(lib, "cblas_gemm_bf16bf16f32");
      if (mkl_gemm_bf16 && mkl_threads_local) mkl_state = 1;
    }
#endif
  }
  return mkl_state == 1 ? BF16_MKL : BF16_FP32;
}

static void round_in_fp32(const float* src, float* dst, int64_t n) { /* bf16(src) widened back */
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(bf16_rne(src[i]));
}

/* rows [n0, n0 + rows) of W rounded to bf16: as bf16 bits in b16 (mkl; never for bf16 weights, which MKL reads in
 * place), else widened in f32 */
static void qw_block_bf16(const QMat* q, int64_t n0, int64_t rows, float* f32, uint16_t* b16) {
  const int64_t len = rows * q->K;
  const float* src = (const float*)q->w + n0 * q->K; /* float32 weights: rounded straight from the parameter */
  if (b16) {
    if (q->kind == QW_F32) round_to_bf16(src, b16, len);
    else qw_dequant(q, n0, rows, 0, b16);
    return;
  }
  if (q->kind != QW_F32) {
    qw_dequant(q, n0, rows, f32, 0);
    if (q->kind == QW_BF16) return; /* widened bf16 values: already rounded */
    src = f32;
  }
  round_in_fp32(src, f32, len);
}

static int qmatmul_bf16_inputs(const QMat* q, const float* x, float* out) {
  const int64_t M = q->M, N = q->N, K = q->K;
  const int path = choose_bf16_path(), mkl = path == BF16_MKL;
  const int threads = omp_get_max_threads();
  const int serial = 2. * M * N * K < SPLIT_MIN_FLOPS || threads == 1;
  void* xr = malloc((mkl ? sizeof(uint16_t) : sizeof(float)) * M * K);
  if (!xr) return 1;
#pragma omp parallel for schedule(static) if (!serial)
  for (int64_t m = 0; m < M; ++m) {
    if (mkl) round_to_bf16(x + m * K, (uint16_t*)xr + m * K, K);
    else round_in_fp32(x + m * K, (float*)xr + m * K, K);
  }
  const BlockPlan bp = block_plan(q, threads);
  const int64_t rows = bp.rows, blocks = bp.blocks, mparts = bp.mparts;
  const int direct = mkl && q->kind == QW_BF16; /* MKL reads stored bf16 weights in place */
  /* per-thread buffers: the fp32 path's rounded rows widened in fp32; the rows MKL reads as bf16 (dequantized or
   * rounded straight from the parameter), unless it reads stored bf16 weights in place */
  const int need_f32 = !mkl, need_b16 = mkl && !direct;
  int failed = 0;
#pragma omp parallel if (!serial) reduction(|| : failed)
  {
    float* f32 = need_f32 ? (float*)aligned_alloc(64, (sizeof(float) * rows * K + 63) / 64 * 64) : 0;
    uint16_t* b16 = need_b16 ? (uint16_t*)aligned_alloc(64, (sizeof(uint16_t) * rows * K + 63) / 64 * 64) : 0;
    int64_t have = -1;
    if (mkl) mkl_threads_local(1);
    else blas_thread_init();
    failed = (need_f32 && !f32) || (need_b16 && !b16);
#pragma omp for schedule(dynamic)
    for (int64_t it = 0; it < blocks * mparts; ++it) {
      if (failed) continue;
      const int64_t b = it / mparts, p = it % mparts, n0 = b * rows, nr = N - n0 < rows ? N - n0 : rows;
      const int64_t m0 = M * p / mparts, m1 = M * (p + 1) / mparts;
      if (!direct && have != b) { qw_block_bf16(q, n0, nr, f32, b16); have = b; }
      if (mkl)
        mkl_gemm_bf16(101, 111, 112, (int)(m1 - m0), (int)nr, (int)K, 1.f, (const uint16_t*)xr + m0 * K, (int)K,
                      direct ? (const uint16_t*)q->w + n0 * K : b16, (int)K, 0.f, out + m0 * N + n0, (int)N);
      else
        gemm_ld(1, m1 - m0, nr, K, 1.f, (const float*)xr + m0 * K, K, f32, K, out + m0 * N + n0, N);
    }
    free(f32);
    free(b16);
  }
  free(xr);
  return failed;
}

__attribute__((visibility("default")))
int __tvm_ffi_vlmc_qmatmul_bf16(void* h, const TVMFFIAny* a, int32_t n, TVMFFIAny* r) {
  return run_qmatmul(a, n, r, QM_BF16_INPUTS);
}
/* which path vlmc_qmatmul_bf16 takes in this process: 1 mkl, 2 fp32 */
__attribute__((visibility("default")))
int __tvm_ffi_vlmc_bf16_gemm_path(void* h, const TVMFFIAny* a, int32_t n, TVMFFIAny* r) {
  r->type_index = kTVMFFIInt; r->zero_padding = 0; r->v_int64 = choose_bf16_path();
  return 0;
}

/* ---- int8 GEMV inputs (backend.decode_compute: int8) -------------------------------------------------------------
 * vlmc_qmatmul_a8(x, w, scale, out), int8 and int4 weights: vlmc_qmatmul's product with x quantized first. Each row
 * of x, in blocks of 32 inputs (the last one shorter when K % 32): d = max|x| / 127, xq = clamp(round_half_even(x /
 * d), -127, 127) (0 where d == 0); out = (xq * d) @ W^T, W = q * scale as vlmc_qmatmul defines it.
 * M <= 16 (decode): the sums of xq * q over each block are exact integer dot products, scaled by d and the weight's
 * scale in fp32. On AVX512-VNNI hosts vpdpbusd does 64 byte products per instruction with no widening (the widening
 * of int8/int4 weights to fp32 is what keeps vlmc_qmatmul's GEMV above the memory floor). vpdpbusd takes unsigned x
 * signed bytes: int8 weights are made unsigned by flipping their top bit (q + 128), int4 nibbles already are (q + 8),
 * and the excess (128 or 8 times the sum of xq) is subtracted lane by lane, precomputed once per row of x.
 * M > 16: x is replaced by xq * d and the product runs as vlmc_qmatmul's. */
#define A8_BLOCK 32

static void a8_quantize_row(const float* x, int64_t K, int8_t* xq, float* d) {
  for (int64_t b = 0; b * A8_BLOCK < K; ++b) {
    const int64_t k0 = b * A8_BLOCK, k1 = k0 + A8_BLOCK < K ? k0 + A8_BLOCK : K;
    float amax = 0.f;
    for (int64_t k = k0; k < k1; ++k) amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
    const float s = amax / 127.f; /* a true division, as torch computes it: the same xq bit for bit */
    d[b] = s;
    for (int64_t k = k0; k < k1; ++k) {
      const float r = s > 0.f ? nearbyintf(x[k] / s) : 0.f; /* nearest even: the default rounding mode */
      xq[k] = (int8_t)(r > 127.f ? 127.f : r < -127.f ? -127.f : r);
    }
  }
}

/* x quantized for the GEMV: per row, chunks of 64 inputs (int8 weights) or 128 (int4: 64 bytes of packed weights),
 * each with its bytes in the order of the weight bytes they meet, the per-lane excess to subtract and the per-lane
 * block scale d (lane L of vpdpbusd's 16 sums 4 consecutive bytes, so it belongs to one block of 32). */
typedef struct {
  int64_t chunks;
  int8_t* bytes;  /* [M, chunks, 64 or 128]: int4: the 64 bytes meeting the low nibbles, then the high ones */
  int32_t* corr;  /* [M, chunks, 16] minus the excess of each lane */
  float* dl;      /* [M, chunks, 16] d of each lane's block (0 past K) */
} A8X;

static int a8_prepare(const QMat* q, const float* x, A8X* ax) {
  const int i4 = q->kind == QW_I4;
  const int64_t K = q->K, M = q->M, clen = i4 ? 128 : 64, chunks = (K + clen - 1) / clen, blocks = chunks * clen / 32;
  ax->chunks = chunks;
  ax->bytes = (int8_t*)aligned_alloc(64, M * chunks * clen);
  ax->corr = (int32_t*)aligned_alloc(64, M * chunks * 64);
  ax->dl = (float*)aligned_alloc(64, M * chunks * 64);
  int8_t* xq = (int8_t*)calloc(chunks * clen, 1);
  float* d = (float*)calloc(blocks, sizeof(float));
  if (!ax->bytes || !ax->corr || !ax->dl || !xq || !d) { free(xq); free(d); return 1; }
  for (int64_t m = 0; m < M; ++m) {
    a8_quantize_row(x + m * K, K, xq, d); /* the padding past K stays 0 */
    for (int64_t c = 0; c < chunks; ++c) {
      int8_t* out = ax->bytes + (m * chunks + c) * clen;
      const int8_t* src = xq + c * clen;
      int32_t* corr = ax->corr + (m * chunks + c) * 16;
      float* dl = ax->dl + (m * chunks + c) * 16;
      if (i4) /* byte 16b + j of the packed chunk: low nibble input 32b + j, high nibble input 32b + 16 + j */
        for (int b = 0; b < 4; ++b)
          for (int j = 0; j < 16; ++j) { out[16 * b + j] = src[32 * b + j]; out[64 + 16 * b + j] = src[32 * b + 16 + j]; }
      else memcpy(out, src, 64);
      for (int L = 0; L < 16; ++L) {
        int32_t sum = 0;
        for (int t = 0; t < 4; ++t) sum += out[4 * L + t] + (i4 ? out[64 + 4 * L + t] : 0);
        corr[L] = -(i4 ? 8 : 128) * sum;
        dl[L] = d[c * clen / 32 + L / (i4 ? 4 : 8)];
      }
    }
  }
  free(xq); free(d);
  return 0;
}
static void a8_free(A8X* ax) { free(ax->bytes); free(ax->corr); free(ax->dl); }

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define A8_NR 4
/* out[m, n] for rows m0..m0 + mr (<= MR) of x and weight rows [n0, n1), A8_NR rows per step (a short step repeats its
 * last row). Scales: one per row (G == 1) multiplies the row's sum at the end; groups (a multiple of 32 inputs) give
 * each lane its group's scale, gathered from the chunk's <= 4 scales by one permute. */
static inline __attribute__((always_inline)) void a8_rows(const int i4, const int MR, const QMat* q, const A8X* ax,
                                                          int64_t m0, int64_t mr, float* out, int64_t n0, int64_t n1) {
  const int64_t K = q->K, N = q->N, G = q->G, group = q->group, chunks = ax->chunks, clen = i4 ? 128 : 64;
  const int64_t rowb = i4 ? K / 2 : K, ahead = A8_NR * rowb;
  const int grouped = G > 1;
  const int64_t nscale = clen / group > 1 ? clen / group : 1; /* scales a chunk spans */
  int32_t idx[16];
  for (int L = 0; L < 16; ++L) idx[L] = grouped ? (int32_t)(L / (i4 ? 4 : 8) * 32 / group) : 0;
  const __m512i sidx = _mm512_loadu_si512(idx), low4 = _mm512_set1_epi8(0x0f), top = _mm512_set1_epi8((char)0x80);
  int64_t xm[QMR_MAX];
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) xm[m] = m0 + (m < mr ? m : mr - 1);
  for (int64_t n = n0; n < n1; n += A8_NR) {
    const int64_t nr = n1 - n < A8_NR ? n1 - n : A8_NR;
    const void* row[A8_NR];
    const float* srow[A8_NR];
    qw_step_rows(q, A8_NR, n, nr, row, srow);
    if (grouped) /* the next step's group scales: a stream of their own that the weights' prefetch does not cover */
#pragma GCC unroll 4
      for (int r = 0; r < A8_NR; ++r)
        for (int64_t b = 0; b < G * (int64_t)sizeof(float); b += 64)
          __builtin_prefetch((const char*)(srow[r] + A8_NR * G) + b, 0, 2);
    __m512 acc[QMR_MAX][A8_NR];
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
      for (int r = 0; r < A8_NR; ++r) acc[m][r] = _mm512_setzero_ps();
    int64_t first = 0; /* grouped: the chunk's first scale, floor(c * clen / group), counted up (a division per row
                        * and chunk cost 18% of the int4 GEMV from cache) */
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t off = c * 64, left = rowb - off;
      const __mmask64 mask = left >= 64 ? ~0ULL : (1ULL << left) - 1; /* the last chunk of a row may be short */
      __mmask16 smask = 0;
      if (grouped) {
        while ((first + 1) * group <= c * clen) ++first;
        smask = (__mmask16)((1u << (G - first < nscale ? G - first : nscale)) - 1);
      }
      __m512i wa[A8_NR], wb[A8_NR];
      __m512 sv[A8_NR];
#pragma GCC unroll 4
      for (int r = 0; r < A8_NR; ++r) {
        const char* p = (const char*)row[r] + off;
        __builtin_prefetch(p + ahead, 0, 2);
        const __m512i v = left >= 64 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(mask, p);
        if (i4) { wa[r] = _mm512_and_si512(v, low4); wb[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4); }
        else wa[r] = _mm512_xor_si512(v, top);
        if (grouped) sv[r] = _mm512_permutexvar_ps(sidx, _mm512_maskz_loadu_ps(smask, srow[r] + first));
      }
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) {
        const int64_t at = xm[m] * chunks + c;
        const int8_t* xb = ax->bytes + at * clen;
        const __m512i xa = _mm512_load_si512(xb), corr = _mm512_load_si512(ax->corr + at * 16);
        const __m512i xh = i4 ? _mm512_load_si512(xb + 64) : xa;
        const __m512 dl = _mm512_load_ps(ax->dl + at * 16);
#pragma GCC unroll 4
        for (int r = 0; r < A8_NR; ++r) {
          __m512i t = _mm512_dpbusd_epi32(corr, wa[r], xa);
          if (i4) t = _mm512_dpbusd_epi32(t, wb[r], xh);
          const __m512 f = _mm512_cvtepi32_ps(t);
          acc[m][r] = grouped ? _mm512_fmadd_ps(_mm512_mul_ps(f, dl), sv[r], acc[m][r]) : _mm512_fmadd_ps(f, dl, acc[m][r]);
        }
      }
    }
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      if (m >= mr) break;
#pragma GCC unroll 4
      for (int r = 0; r < A8_NR; ++r)
        if (r < nr) out[(m0 + m) * N + n + r] = _mm512_reduce_add_ps(acc[m][r]) * (grouped ? 1.f : srow[r][0]);
    }
  }
}
typedef void (*a8_fn)(const QMat*, const A8X*, int64_t, int64_t, float*, int64_t, int64_t);
#define A8_DEF(I4, MR) \
  static void a8_rows_##I4##_##MR(const QMat* q, const A8X* ax, int64_t m0, int64_t mr, float* out, int64_t n0,   \
                                  int64_t n1) { a8_rows(I4, MR, q, ax, m0, mr, out, n0, n1); }
A8_DEF(0, 1) A8_DEF(0, 2) A8_DEF(0, 4) A8_DEF(1, 1) A8_DEF(1, 2) A8_DEF(1, 4)
static const a8_fn A8_FNS[2][QGEMV_PASS + 1] = {{0, a8_rows_0_1, a8_rows_0_2, a8_rows_0_4, a8_rows_0_4},
                                                {0, a8_rows_1_1, a8_rows_1_2, a8_rows_1_4, a8_rows_1_4}};
#define A8_VNNI 1
#else
#define A8_VNNI 0
#endif

/* weight rows [n0, n1) against every row of x: with VNNI, passes of <= 4 rows of x over tiles of 16 weight rows (in
 * L2 for every pass, as in qgemv_range); elsewhere the same integer sums one at a time */
static void a8_range(const QMat* q, const A8X* ax, float* out, int64_t n0, int64_t n1, int vnni) {
  const int64_t M = q->M;
#if A8_VNNI
  if (vnni) {
    const a8_fn* fns = A8_FNS[q->kind == QW_I4];
    const int64_t passes = (M + QGEMV_PASS - 1) / QGEMV_PASS;
    if (passes == 1) { fns[M](q, ax, 0, M, out, n0, n1); return; }
    for (int64_t nb = n0; nb < n1; nb += SPLIT_ALIGN) {
      const int64_t ne = nb + SPLIT_ALIGN < n1 ? nb + SPLIT_ALIGN : n1;
      for (int64_t p = 0; p < passes; ++p) {
        const int64_t m0 = M * p / passes, m1 = M * (p + 1) / passes;
        fns[m1 - m0](q, ax, m0, m1 - m0, out, nb, ne);
      }
    }
    return;
  }
#endif
  const int i4 = q->kind == QW_I4;
  const int64_t K = q->K, chunks = ax->chunks, clen = i4 ? 128 : 64;
  for (int64_t n = n0; n < n1; ++n) {
    const void* row = qw_row(q, n);
    const float* srow = q->scale + n * q->G;
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b * A8_BLOCK < K; ++b) { /* block b: inputs 32b.. of chunk c = 32b / clen */
        const int64_t c = b * A8_BLOCK / clen, at = m * chunks + c;
        const int8_t* xb = ax->bytes + at * clen;
        const int lane0 = (int)(b * A8_BLOCK % clen / 32) * (i4 ? 4 : 8);
        int32_t sum = 0;
        for (int64_t k = 32 * b; k < 32 * b + A8_BLOCK && k < K; ++k) {
          const int64_t j = k % clen; /* input j of the chunk */
          if (i4) {
            const int blk = (int)(j / 32), e = (int)(j % 32);
            const int8_t xv = xb[(e < 16 ? 0 : 64) + 16 * blk + e % 16];
            sum += xv * (int32_t)qw_scalar(QW_I4, row, k);
          } else sum += xb[j] * (int32_t)((const int8_t*)row)[k];
        }
        acc += (float)sum * ax->dl[at * 16 + lane0] * srow[q->G > 1 ? 32 * b / q->group : 0];
      }
      out[m * q->N + n] = acc;
    }
  }
}
/* whether this call takes the VNNI kernel: on hosts that have it, unless VLMC_INT8_GEMV=portable (read on every call:
 * a test compares the two) */
static int a8_use_vnni(void) {
  const char* env = getenv("VLMC_INT8_GEMV");
  return A8_VNNI && !(env && !strcmp(env, "portable"));
}

static int qmatmul_int8_inputs(const QMat* q, const float* x, float* out) {
  const int64_t M = q->M, N = q->N, K = q->K;
  if (M > 16) { /* x replaced by xq * d, then vlmc_qmatmul's GEMM path */
    float* xd = (float*)malloc(sizeof(float) * (M * K + (K + A8_BLOCK - 1) / A8_BLOCK));
    int8_t* xq = (int8_t*)malloc(K);
    int failed = !xd || !xq;
    if (!failed) {
      float* d = xd + M * K;
      for (int64_t m = 0; m < M; ++m) {
        a8_quantize_row(x + m * K, K, xq, d);
        for (int64_t k = 0; k < K; ++k) xd[m * K + k] = (float)xq[k] * d[k / A8_BLOCK];
      }
      failed = qmatmul_blocks(q, xd, out);
    }
    free(xd); free(xq);
    return failed;
  }
  A8X ax;
  if (a8_prepare(q, x, &ax)) { a8_free(&ax); return 1; }
  const int vnni = a8_use_vnni();
  const int threads = omp_get_max_threads();
  const int serial = 2. * M * N * K < SPLIT_MIN_FLOPS || threads == 1;
#pragma omp parallel for schedule(static) if (!serial)
  for (int part = 0; part < threads; ++part) {
    const int64_t lo = part_edge(N, part, threads), hi = part_edge(N, part + 1, threads);
    if (lo < hi) a8_range(q, &ax, out, lo, hi, vnni);
  }
  a8_free(&ax);
  return 0;
}

__attribute__((visibility("default")))
int __tvm_ffi_vlmc_qmatmul_a8(void* h, const TVMFFIAny* a, int32_t n, TVMFFIAny* r) {
  return run_qmatmul(a, n, r, QM_INT8_INPUTS);
}

/* ---- int8 x int8 GEMMs (backend.compute: int8) -------------------------------------------------------------------
 * vlmc_qmatmul_i8(x, w, scale, out), int8 weights with one scale per row: vlmc_qmatmul's product with x quantized per
 * row first: d = max|x row| / 127, xq = clamp(round_half_even(x / d), -127, 127) (0 where d == 0), then
 * out[m, n] = (d[m] * scale[n]) * sum_k xq[m, k] q[n, k], the sums exact in int32 (|sum| <= K * 127^2 < 2^31).
 * On hosts with AMX-INT8 (Intel Sapphire Rapids and later) for M > 16: tdpbssd multiplies 16 x 64 bytes by 64 x 16
 * bytes per instruction, twice AMX's bf16 rate, with no dequantized copy of the weights. The weights are the A
 * operand as stored: C^T[n, m] = W[n, :] . xq[m, :]; x is quantized and packed once into B's layout (VNNI: 4
 * consecutive k of one row side by side), zero-padded to whole 16-row tiles and 64-byte chunks. Each thread takes a
 * range of panels of 32 weight rows, copies each panel's part of the current K block into contiguous 1 KB tiles
 * (zero-padded past N and K), and runs every 32 rows of x over it (2 x 2 tiles of C). K is cut into blocks whose slice of packed x (about 1 MB) stays in L2
 * while the thread's panels pass over it (measured 1.4x at 320 x 2048 x 11008 against streaming all of x from L3
 * for every panel); C tiles wait in memory between blocks. C^T tiles are transposed in registers, scaled and
 * stored as rows of out. Elsewhere (and for M <= 16), and with VLMC_INT8_GEMM=fp32, x is replaced by
 * xq * d and the product runs as vlmc_qmatmul's: the same numbers up to fp32 summation order. */
#define I8_TILE 16  /* rows of a tile */
#define I8_CHUNK 64 /* bytes of K per tile row */
#define I8_XP_BLOCK (1 << 20) /* bytes of packed x per K block: half an L2 */

static void i8_quantize_row(const float* x, int64_t K, int8_t* xq, float* d) {
  float amax = 0.f;
  int64_t k0 = 0;
#ifdef __AVX512F__
  __m512 vmax = _mm512_setzero_ps();
  for (; k0 + 16 <= K; k0 += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + k0)));
  amax = _mm512_reduce_max_ps(vmax);
#endif
  for (int64_t k = k0; k < K; ++k) amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
  const float s = amax / 127.f;
  *d = s;
  int64_t k1 = 0;
#ifdef __AVX512F__
  if (s > 0.f) { /* x / s correctly rounded (no reciprocal), nearest even, clamped, narrowed */
    const __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
    for (; k1 + 16 <= K; k1 += 16) {
      const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + k1), vs),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512i v = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo), hi));
      _mm_storeu_si128((__m128i*)(xq + k1), _mm512_cvtsepi32_epi8(v));
    }
  }
#endif
  for (int64_t k = k1; k < K; ++k) {
    const float r = s > 0.f ? nearbyintf(x[k] / s) : 0.f; /* a true division, rounded to nearest even, as torch */
    xq[k] = (int8_t)(r > 127.f ? 127.f : r < -127.f ? -127.f : r);
  }
}

/* fallback: x replaced by xq * d, then vlmc_qmatmul's path */
static int i8_dequantized_inputs(const QMat* q, const float* x, float* out) {
  const int64_t M = q->M, K = q->K;
  float* xd = (float*)malloc(sizeof(float) * M * K);
  int8_t* xq = (int8_t*)malloc(K);
  int failed = !xd || !xq;
  if (!failed) {
    for (int64_t m = 0; m < M; ++m) {
      float d;
      i8_quantize_row(x + m * K, K, xq, &d);
      for (int64_t k = 0; k < K; ++k) xd[m * K + k] = (float)xq[k] * d;
    }
    if (M > 16) failed = qmatmul_blocks(q, xd, out);
    else qgemv_parallel(q, xd, out, 0);
  }
  free(xd); free(xq);
  return failed;
}

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512BW__)
#include <sys/syscall.h>
#include <unistd.h>
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
static int amx_state; /* 0: not tried, 1: usable, 2: not */

/* The kernel must grant a process AMX's tile state before its first use (Linux >= 5.16); a refusal means fallback. */
static int amx_usable(void) {
#pragma omp critical(vlmc_amx)
  if (!amx_state) {
    __builtin_cpu_init();
    amx_state = __builtin_cpu_supports("amx-int8") && __builtin_cpu_supports("amx-tile") &&
                syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : 2;
  }
  return amx_state == 1;
}

typedef struct __attribute__((packed, aligned(64))) {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} TileConfig;

/* tiles 0-3: C (int32, 16 x 16), 4-5: A (16 weight rows x 64 bytes), 6-7: B (16 rows of 4 k x 16 rows of x) */
static void i8_tiles_on(void) {
  TileConfig c;
  memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int t = 0; t < 8; ++t) { c.rows[t] = I8_TILE; c.colsb[t] = 64; }
  _tile_loadconfig(&c);
}

/* 16 vectors of 16 int32 (rows) transposed in place (columns) */
static inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) { /* r[4i + j], 128-bit lane L: column 4L + j of rows 4i .. 4i + 3 */
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) { /* column 4L + j = lane L of r[j], r[4 + j], r[8 + j], r[12 + j] */
    const __m512i p0 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44), p1 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xEE);
    const __m512i p2 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44);
    const __m512i p3 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xEE);
    t[j] = _mm512_shuffle_i32x4(p0, p2, 0x88);
    t[4 + j] = _mm512_shuffle_i32x4(p0, p2, 0xDD);
    t[8 + j] = _mm512_shuffle_i32x4(p1, p3, 0x88);
    t[12 + j] = _mm512_shuffle_i32x4(p1, p3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

/* C^T tile (16 weight rows n0.. x 16 rows of x m0..) -> out[m, n] = d[m] * s[n] * C^T[n, m], within M x N */
static inline void i8_store(const int32_t* c, const float* s, const float* d, float* out, int64_t m0, int64_t n0,
                            int64_t M, int64_t N) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(c + 16 * i);
  transpose16(r);
  const int64_t nn = N - n0 < 16 ? N - n0 : 16, mm = M - m0 < 16 ? M - m0 : 16;
  const __mmask16 keep = (__mmask16)((1u << nn) - 1);
  const __m512 sv = _mm512_maskz_loadu_ps(keep, s + n0);
  for (int64_t j = 0; j < mm; ++j)
    _mm512_mask_storeu_ps(out + (m0 + j) * N + n0, keep,
                          _mm512_mul_ps(_mm512_cvtepi32_ps(r[j]), _mm512_mul_ps(sv, _mm512_set1_ps(d[m0 + j]))));
}

/* chunks [c0, c1) of weight rows n0 .. n0 + 31 as 2 x (c1 - c0) tiles of 1 KB (16 rows x 64 bytes, contiguous), rows
 * past N and bytes past K zero: tile loads then stream whole lines, and nothing reads past the weights */
static void i8_copy_panel(const int8_t* W, int64_t N, int64_t K, int64_t n0, int64_t c0, int64_t c1, int8_t* wp) {
  const int64_t nb = c1 - c0;
  for (int64_t r = 0; r < 2 * I8_TILE; ++r) {
    const int64_t n = n0 + r;
    int8_t* dst = wp + ((r / I8_TILE) * nb * I8_TILE + r % I8_TILE) * I8_CHUNK;
    for (int64_t ch = c0; ch < c1; ++ch, dst += I8_TILE * I8_CHUNK) {
      const int64_t left = n < N ? K - ch * I8_CHUNK : 0;
      const __mmask64 keep = left >= 64 ? ~(__mmask64)0 : left > 0 ? ((__mmask64)1 << left) - 1 : 0;
      _mm512_store_si512(dst, _mm512_maskz_loadu_epi8(keep, n < N ? W + n * K + ch * I8_CHUNK : W));
    }
  }
}

static int qmatmul_i8_amx(const QMat* q, const float* x, float* out) {
  const int64_t M = q->M, N = q->N, K = q->K;
  const int64_t chunks = (K + I8_CHUNK - 1) / I8_CHUNK, Kp = chunks * I8_CHUNK, mtiles = (M + I8_TILE - 1) / I8_TILE;
  const int64_t ntiles = (N + I8_TILE - 1) / I8_TILE, panels = (ntiles + 1) / 2;
  const int8_t* W = (const int8_t*)q->w;
  /* xp[mt][chunk][r][i][4]: bytes 4r .. 4r + 3 of the chunk, of x row mt * 16 + i; tile (mt, chunk) is 1 KB */
  int8_t* xp = (int8_t*)aligned_alloc(64, mtiles * Kp * I8_TILE);
  float* d = (float*)malloc(sizeof(float) * mtiles * I8_TILE);
  if (!xp || !d) { free(xp); free(d); return 1; }
  const int threads = omp_get_max_threads();
  const int serial = 2. * M * N * K < SPLIT_MIN_FLOPS || threads == 1;
#pragma omp parallel for schedule(static) if (!serial)
  for (int64_t mt = 0; mt < mtiles; ++mt) {
    int8_t row[Kp] __attribute__((aligned(64)));
    int8_t* tile = xp + mt * Kp * I8_TILE;
    for (int i = 0; i < I8_TILE; ++i) {
      const int64_t m = mt * I8_TILE + i;
      memset(row, 0, Kp);
      if (m < M) i8_quantize_row(x + m * K, K, row, d + m);
      else d[m] = 0.f;
      const int32_t* src = (const int32_t*)row;
      int32_t* dst = (int32_t*)tile + i;
      for (int64_t g = 0; g < Kp / 4; ++g) dst[(g / 16) * 256 + (g % 16) * 16] = src[g]; /* chunk g/16, row g%16 */
    }
  }
  /* K in blocks whose slice of the packed x (all its rows) stays in L2 while every panel of the thread passes over
   * it; the C tiles of each (panel, pair of x tiles) wait in acc between blocks (int32: exact) */
  const int64_t fit = I8_XP_BLOCK / (mtiles * I8_TILE * I8_CHUNK), per_block = fit > 0 ? fit : 1;
  const int64_t kblocks = (chunks + per_block - 1) / per_block, mpairs = (mtiles + 1) / 2;
  int failed = 0;
#pragma omp parallel if (!serial) reduction(|| : failed)
  {
    const int64_t T = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t p0 = panels * t / T, p1 = panels * (t + 1) / T;
    int32_t c[4][256] __attribute__((aligned(64)));
    int32_t* acc = kblocks > 1 && p1 > p0 ? (int32_t*)aligned_alloc(64, (p1 - p0) * mpairs * 4 * 1024) : 0;
    int8_t* wp = p1 > p0 ? (int8_t*)aligned_alloc(64, 2 * per_block * 1024) : 0;
    failed = p1 > p0 && ((kblocks > 1 && !acc) || !wp);
    if (!failed && p1 > p0) {
      i8_tiles_on();
      for (int64_t kb = 0; kb < kblocks; ++kb) {
        const int64_t c0 = kb * per_block, c1 = c0 + per_block < chunks ? c0 + per_block : chunks;
        const int first = kb == 0, last_block = kb == kblocks - 1;
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t nt0 = 2 * p, two_n = nt0 + 1 < ntiles, nb = c1 - c0;
          i8_copy_panel(W, N, K, nt0 * I8_TILE, c0, c1, wp);
          const int8_t* a[2] = {wp, wp + nb * 1024}; /* tile (h, chunk ch) at a[h] + (ch - c0) * 1024 */
          for (int64_t mt = 0; mt < mtiles; mt += 2) {
            const int two_m = mt + 1 < mtiles;
            const int8_t* b0 = xp + mt * Kp * I8_TILE;
            const int8_t* b1 = two_m ? b0 + Kp * I8_TILE : b0;
            int32_t* held = acc ? acc + ((p - p0) * mpairs + mt / 2) * 1024 : 0;
            if (first) { _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3); }
            else {
              _tile_loadd(0, held, 64); _tile_loadd(1, held + 256, 64);
              _tile_loadd(2, held + 512, 64); _tile_loadd(3, held + 768, 64);
            }
            for (int64_t ch = c0; ch < c1; ++ch) {
              _tile_loadd(4, a[0] + (ch - c0) * 1024, 64);
              _tile_loadd(5, a[1] + (ch - c0) * 1024, 64);
              _tile_loadd(6, b0 + ch * 1024, 64);
              _tile_loadd(7, b1 + ch * 1024, 64);
              _tile_dpbssd(0, 4, 6);
              _tile_dpbssd(1, 4, 7);
              _tile_dpbssd(2, 5, 6);
              _tile_dpbssd(3, 5, 7);
            }
            if (!last_block) {
              _tile_stored(0, held, 64); _tile_stored(1, held + 256, 64);
              _tile_stored(2, held + 512, 64); _tile_stored(3, held + 768, 64);
              continue;
            }
            _tile_stored(0, c[0], 64); _tile_stored(1, c[1], 64); _tile_stored(2, c[2], 64); _tile_stored(3, c[3], 64);
            const int64_t n0 = nt0 * I8_TILE, m0 = mt * I8_TILE;
            i8_store(c[0], q->scale, d, out, m0, n0, M, N);
            if (two_m) i8_store(c[1], q->scale, d, out, m0 + I8_TILE, n0, M, N);
            if (two_n) {
              i8_store(c[2], q->scale, d, out, m0, n0 + I8_TILE, M, N);
              if (two_m) i8_store(c[3], q->scale, d, out, m0 + I8_TILE, n0 + I8_TILE, M, N);
            }
          }
        }
      }
      _tile_release();
    }
    free(acc);
    free(wp);
  }
  free(xp); free(d);
  return failed;
}
#endif

/* VLMC_INT8_GEMM=fp32 takes the fallback path on any host (tests and benchmarks compare the two) */
static int qmatmul_i8(const QMat* q, const float* x, float* out) {
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512BW__)
  const char* env = getenv("VLMC_INT8_GEMM");
  if (q->M > 16 && !(env && !strcmp(env, "fp32")) && amx_usable()) return qmatmul_i8_amx(q, x, out);
#endif
  return i8_dequantized_inputs(q, x, out);
}

__attribute__((visibility("default")))
int __tvm_ffi_vlmc_qmatmul_i8(void* h, const TVMFFIAny* a, int32_t n, TVMFFIAny* r) {
  return run_qmatmul(a, n, r, QM_INT8_ROWS);
}
/* which path vlmc_qmatmul_i8 takes for M > 16 in this process: 1 amx, 2 fp32 */
__attribute__((visibility("default")))
int __tvm_ffi_vlmc_int8_gemm_path(void* h, const TVMFFIAny* a, int32_t n, TVMFFIAny* r) {
  int path = 2;
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512BW__)
  const char* env = getenv("VLMC_INT8_GEMM");
  if (!(env && !strcmp(env, "fp32")) && amx_usable()) path = 1;
#endif
  r->type_index = kTVMFFIInt; r->zero_padding = 0; r->v_int64 = path;
  return 0;
}

/* ---- decode attention over a low-precision KV cache: vlmc_cache_attention --------------------------------------
 * Work item: one (batch row, kv head), a block of its query rows (the group's heads x S positions, row r = head
 * offset * S + s, contiguous in q and out) and one part of its unmasked keys. Keys are gathered a block at a time,
 * dequantized into fp32 rows padded with zeros to Dp (a multiple of 16), scored 8 at a time against 4 query rows
 * at a time and folded in with an online softmax. When there are fewer (batch row, kv head, row block) units than
 * threads, the unmasked keys are split into parts whose partial softmax states are merged at the end. */
#define CA_KEYS 64          /* keys per block */
#define CA_ROWS 32          /* query rows per work item */
#define CA_PART_KEYS 16     /* keys a split part has at least */
#define CA_MASKED (-1e30f)  /* mask values at or below this: the key is skipped */
#define CA_PV 4             /* query rows per P V step (their accumulators stay in registers) */
#define CA_QK 4             /* query rows scored together */

typedef struct {
  int kind; /* QW_BF16, QW_I8, or -1 for float32 */
  int64_t B, H, Hk, S, T, D, Dp, group, nb, parts, rows; /* rows: query rows per block, nb blocks per kv head */
  const float *q, *kn, *vn, *ks, *vs, *mask;
  const void *kc, *vc;
} CacheAttn;

/* r[i] = sum of the lanes of a[i], i < QL: a transpose-and-add tree */
static inline qv qreduce(const qv* a) {
  const qvi l2 = {0, 1, 2, 3, 8, 9, 10, 11}, h2 = {4, 5, 6, 7, 12, 13, 14, 15};
  const qvi l3 = {0, 1, 4, 5, 8, 9, 12, 13}, h3 = {2, 3, 6, 7, 10, 11, 14, 15};
  const qvi l4 = {0, 2, 4, 6, 8, 10, 12, 14}, h4 = {1, 3, 5, 7, 9, 11, 13, 15};
  qv c[4], d[2];
  for (int i = 0; i < 4; ++i) c[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], l2) + __builtin_shuffle(a[2 * i], a[2 * i + 1], h2);
  for (int i = 0; i < 2; ++i) d[i] = __builtin_shuffle(c[2 * i], c[2 * i + 1], l3) + __builtin_shuffle(c[2 * i], c[2 * i + 1], h3);
  return __builtin_shuffle(d[0], d[1], l4) + __builtin_shuffle(d[0], d[1], h4);
}

/* key/value row j of (b, kv head) bg as D floats at dst (dst's padding to Dp is left alone: zero) */
static inline void ca_row(const CacheAttn* a, const void* cache, const float* scale, const float* fresh, int64_t bg,
                          int64_t j, float* dst) {
  const int64_t D = a->D, dv = D / QL * QL;
  if (j >= a->T || a->kind < 0) { /* float32: a copy (inline: most rows are short) */
    const float* s = j >= a->T ? fresh + (bg * a->S + j - a->T) * D : (const float*)cache + (bg * a->T + j) * D;
    for (int64_t d = 0; d < dv; d += QL) qstore(dst + d, qload(s + d));
    for (int64_t d = dv; d < D; ++d) dst[d] = s[d];
    return;
  }
  const int64_t off = (bg * a->T + j) * D;
  if (a->kind == QW_BF16) {
    const uint16_t* s = (const uint16_t*)cache + off;
    for (int64_t d = 0; d < dv; d += QL) qstore(dst + d, widen_bf16(s + d));
    for (int64_t d = dv; d < D; ++d) dst[d] = bf16_to_float(s[d]);
  } else {
    const int8_t* s = (const int8_t*)cache + off;
    const float sc = scale[bg * a->T + j];
    const qv sv = qsplat(sc);
    for (int64_t d = 0; d < dv; d += QL) qstore(dst + d, widen_i8(s + d) * sv);
    for (int64_t d = dv; d < D; ++d) dst[d] = (float)s[d] * sc;
  }
}

typedef struct { float *kb, *vb, *qb, *acc, *p, *madd, *m, *l, *alpha; int64_t* keys; } CaBuf;

/* Work item: kv head unit bg = b * Hk + g, row block rb, key part `part`. Writes, per row, the unnormalized output
 * (D floats), then its running max and sum, to res [rows][Dp + 2]; with one part, the final rows to out. */
static void ca_item(const CacheAttn* a, int64_t bg, int64_t rb, int64_t part, const CaBuf* w, float* res, float* out) {
  const int64_t D = a->D, Dp = a->Dp, S = a->S, TS = a->T + a->S, b = bg / a->Hk, g = bg % a->Hk;
  const int64_t R = a->group * S, r0 = rb * a->rows, nr = R - r0 < a->rows ? R - r0 : a->rows;
  const int64_t row0 = (b * a->H + g * a->group) * S + r0; /* q/out row of r0 */
  const float scale = 1.f / sqrtf((float)D);
  const float* mrow[CA_ROWS];
  for (int64_t i = 0; i < nr; ++i) {
    mrow[i] = a->mask + (b * S + (r0 + i) % S) * TS;
    const float* qi = a->q + (row0 + i) * D;
    for (int64_t d = 0; d < D; ++d) w->qb[i * Dp + d] = qi[d] * scale;
    for (int64_t d = D; d < Dp; ++d) w->qb[i * Dp + d] = 0.f;
    w->m[i] = -INFINITY; w->l[i] = 0.f;
  }
  memset(w->acc, 0, sizeof(float) * nr * Dp);
  const int64_t ns = nr < S ? nr : S; /* the distinct positions s of these rows: rows 0..ns-1 */
#define CA_ACTIVE(j) ({ int on_ = 0; for (int64_t i_ = 0; i_ < ns; ++i_) on_ |= mrow[i_][j] > CA_MASKED; on_; })
  int64_t first = 0, last = INT64_MAX; /* ranks of this part's unmasked keys */
  if (a->parts > 1) {
    int64_t count = 0;
    for (int64_t j = 0; j < TS; ++j) count += CA_ACTIVE(j);
    first = count * part / a->parts;
    last = count * (part + 1) / a->parts;
  }
  const void *kc = a->kc, *vc = a->vc;
  int64_t rank = 0, j = 0;
  while (j < TS && rank < last) {
    int64_t nk = 0; /* gather the next block of unmasked keys */
    for (; j < TS && nk < CA_KEYS && rank < last; ++j)
      if (CA_ACTIVE(j)) { if (rank >= first) w->keys[nk++] = j; ++rank; }
    if (!nk) continue;
    for (int64_t i = 0; i < nk; ++i) {
      ca_row(a, kc, a->ks, a->kn, bg, w->keys[i], w->kb + i * Dp);
      ca_row(a, vc, a->vs, a->vn, bg, w->keys[i], w->vb + i * Dp);
    }
    for (int64_t i = 0; i < ns; ++i) /* the positions' additive masks of these keys; -inf: skipped */
      for (int64_t c = 0; c < CA_KEYS; ++c) {
        const float mv = c < nk ? mrow[i][w->keys[c]] : -INFINITY;
        w->madd[i * CA_KEYS + c] = mv > CA_MASKED ? mv : -INFINITY;
      }
    const int64_t nq = (nk + QL - 1) / QL;
    for (int64_t r0 = 0; r0 < nr; r0 += CA_QK) { /* scores of CA_QK rows, sharing each key load */
      const float* qr[CA_QK];
      for (int j = 0; j < CA_QK; ++j) qr[j] = w->qb + (r0 + j < nr ? r0 + j : r0) * Dp;
      for (int64_t c = 0; c < nq; ++c) { /* QL keys' dot products, one key per vector, lanes summed by qreduce */
        qv dots[CA_QK][QL];
        const float* kb = w->kb + c * QL * Dp;
        for (int i = 0; i < QL; i += 2) { /* two keys at a time: 8 independent FMA chains */
          qv d[CA_QK][2];
#pragma GCC unroll 4
          for (int j = 0; j < CA_QK; ++j) d[j][0] = d[j][1] = qsplat(0.f);
          for (int64_t e = 0; e < Dp; e += QL) {
            const qv k0 = qload(kb + i * Dp + e), k1 = qload(kb + (i + 1) * Dp + e);
#pragma GCC unroll 4
            for (int j = 0; j < CA_QK; ++j) {
              const qv qj = qload(qr[j] + e);
              d[j][0] = qfma(qj, k0, d[j][0]);
              d[j][1] = qfma(qj, k1, d[j][1]);
            }
          }
#pragma GCC unroll 4
          for (int j = 0; j < CA_QK; ++j) { dots[j][i] = d[j][0]; dots[j][i + 1] = d[j][1]; }
        }
        for (int j = 0; j < CA_QK && r0 + j < nr; ++j)
          qstore(w->p + (r0 + j) * CA_KEYS + c * QL, qreduce(dots[j]));
      }
    }
    for (int64_t r = 0; r < nr; ++r) { /* + mask, online softmax */
      const float* ma = w->madd + r % ns * CA_KEYS;
      float* pr = w->p + r * CA_KEYS;
      qv mx = qsplat(-INFINITY);
      for (int64_t c = 0; c < nq; ++c) {
        const qv mv = qload(ma + c * QL);
        const qv sc = qselect(mv > qsplat(-INFINITY), qload(pr + c * QL) + mv, qsplat(-INFINITY));
        qstore(pr + c * QL, sc);
        mx = qselect(sc > mx, sc, mx);
      }
      const float mnew = qmax(mx) > w->m[r] ? qmax(mx) : w->m[r];
      if (mnew == -INFINITY) { w->alpha[r] = 1.f; memset(pr, 0, sizeof(float) * nq * QL); continue; }
      qv sum = qsplat(0.f);
      for (int64_t c = 0; c < nq; ++c) {
        const qv sc = qload(pr + c * QL);
        const qv e = qselect(sc > qsplat(-INFINITY), qexp_nonpos(sc - mnew), qsplat(0.f));
        qstore(pr + c * QL, e);
        sum += e;
      }
      w->alpha[r] = w->m[r] == -INFINITY ? 0.f : qexp_nonpos(qsplat(w->m[r] - mnew))[0];
      w->l[r] = w->l[r] * w->alpha[r] + qsum(sum);
      w->m[r] = mnew;
    }
    /* acc = acc * alpha + P V: blocks of CA_PV rows x 2 vectors of D in registers (8 FMA chains; each loaded value
     * of V or P feeds several FMAs) */
    for (int64_t r0b = 0; r0b < nr; r0b += CA_PV) {
      const int64_t nb = nr - r0b < CA_PV ? nr - r0b : CA_PV;
      int64_t ri[CA_PV];
      for (int i = 0; i < CA_PV; ++i) ri[i] = r0b + (i < nb ? i : 0);
      for (int64_t d = 0; d < Dp; d += 2 * QL) { /* Dp % 16 == 0 */
        qv o[CA_PV][2];
#pragma GCC unroll 4
        for (int i = 0; i < CA_PV; ++i) {
          const qv al = qsplat(w->alpha[ri[i]]);
          o[i][0] = qload(w->acc + ri[i] * Dp + d) * al;
          o[i][1] = qload(w->acc + ri[i] * Dp + d + QL) * al;
        }
        for (int64_t k = 0; k < nk; ++k) {
          const qv v0 = qload(w->vb + k * Dp + d), v1 = qload(w->vb + k * Dp + d + QL);
#pragma GCC unroll 4
          for (int i = 0; i < CA_PV; ++i) {
            const qv pk = qsplat(w->p[ri[i] * CA_KEYS + k]);
            o[i][0] = qfma(pk, v0, o[i][0]);
            o[i][1] = qfma(pk, v1, o[i][1]);
          }
        }
        for (int i = 0; i < nb; ++i) {
          qstore(w->acc + (r0b + i) * Dp + d, o[i][0]);
          qstore(w->acc + (r0b + i) * Dp + d + QL, o[i][1]);
        }
      }
    }
  }
#undef CA_ACTIVE
  for (int64_t r = 0; r < nr; ++r) {
    if (a->parts == 1) {
      const float inv = w->l[r] > 0.f ? 1.f / w->l[r] : 0.f;
      float* o = out + (row0 + r) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = w->acc[r * Dp + d] * inv;
    } else {
      float* o = res + r * (Dp + 2);
      memcpy(o, w->acc + r * Dp, sizeof(float) * D);
      o[Dp] = w->m[r];
      o[Dp + 1] = w->l[r];
    }
  }
}

static int run_cache_attention(const TVMFFIAny* args, int32_t n, TVMFFIAny* ret) {
  ret->type_index = kTVMFFINone; ret->zero_padding = 0; ret->v_int64 = 0;
  if (n != 7 && n != 9)
    return fail("vlmc_cache_attention: expected (q, k_cache, v_cache, k_new, v_new, mask, out) or "
                "(q, k_cache, v_cache, k_scale, v_scale, k_new, v_new, mask, out)");
  DLTensor* t[9];
  for (int i = 0; i < n; ++i)
    if (!(t[i] = as_dl(args + i))) return fail("vlmc_cache_attention: arguments must be tensors");
  const int sc = n == 9;
  DLTensor *Q = t[0], *KC = t[1], *VC = t[2], *KS = sc ? t[3] : 0, *VS = sc ? t[4] : 0;
  DLTensor *KN = t[3 + 2 * sc], *VN = t[4 + 2 * sc], *MK = t[5 + 2 * sc], *O = t[6 + 2 * sc];
  for (int i = 0; i < n; ++i)
    if (!compact(t[i])) return fail("vlmc_cache_attention: tensors must be contiguous");
  if (!is_f32(Q) || !is_f32(KN) || !is_f32(VN) || !is_f32(MK) || !is_f32(O) || (sc && (!is_f32(KS) || !is_f32(VS))))
    return fail("vlmc_cache_attention: q, k_new, v_new, mask, out (and scales) must be float32");
  const DLDataType ct = KC->dtype;
  if (ct.code != VC->dtype.code || ct.bits != VC->dtype.bits || ct.lanes != 1 || VC->dtype.lanes != 1)
    return fail("vlmc_cache_attention: k_cache and v_cache must have one dtype");
  int kind;
  if (ct.code == kDLFloat && ct.bits == 32) kind = -1;
  else if (ct.code == kDLBfloat && ct.bits == 16) kind = QW_BF16;
  else if (ct.code == kDLInt && ct.bits == 8) kind = QW_I8;
  else return fail("vlmc_cache_attention: the cache must be float32, bfloat16 or int8");
  if ((kind == QW_I8) != sc)
    return fail(sc ? "vlmc_cache_attention: scales go with an int8 cache only"
                   : "vlmc_cache_attention: an int8 cache needs k_scale and v_scale");
  if (Q->ndim != 4 || KC->ndim != 4 || VC->ndim != 4 || KN->ndim != 4 || VN->ndim != 4 || MK->ndim != 4 ||
      O->ndim != 4 || (sc && (KS->ndim != 3 || VS->ndim != 3)))
    return fail("vlmc_cache_attention: bad ranks");
  const int64_t B = Q->shape[0], H = Q->shape[1], S = Q->shape[2], D = Q->shape[3];
  const int64_t Hk = KC->shape[1], T = KC->shape[2];
  for (int i = 0; i < 4; ++i)
    if (O->shape[i] != Q->shape[i] || VC->shape[i] != KC->shape[i] || VN->shape[i] != KN->shape[i])
      return fail("vlmc_cache_attention: shape mismatch");
  if (KC->shape[0] != B || KC->shape[3] != D || KN->shape[0] != B || KN->shape[1] != Hk || KN->shape[2] != S ||
      KN->shape[3] != D)
    return fail("vlmc_cache_attention: shape mismatch (k/v [B, Hk, T or S, D])");
  if (MK->shape[0] != B || MK->shape[1] != 1 || MK->shape[2] != S || MK->shape[3] != T + S)
    return fail("vlmc_cache_attention: mask must be [B, 1, S, T + S]");
  if (sc)
    for (int i = 0; i < 3; ++i)
      if (KS->shape[i] != KC->shape[i] || VS->shape[i] != KC->shape[i])
        return fail("vlmc_cache_attention: scales must be [B, Hk, T]");
  if (Hk < 1 || H % Hk) return fail("vlmc_cache_attention: kv heads must divide query heads");
  if (B == 0 || H == 0 || S == 0 || D == 0) return 0;
  const int64_t R = H / Hk * S, blocks = (R + CA_ROWS - 1) / CA_ROWS, rows = (R + blocks - 1) / blocks;
  const int64_t units = B * Hk * blocks, threads = omp_get_max_threads();
  int64_t parts = units >= threads ? 1 : (threads + units - 1) / units;
  const int64_t most = (T + S) / CA_PART_KEYS > 1 ? (T + S) / CA_PART_KEYS : 1;
  parts = parts < most ? parts : most;
  const int64_t Dp = (D + VW - 1) / VW * VW;
  const CacheAttn a = {kind, B, H, Hk, S, T, D, Dp, H / Hk, blocks, parts, rows,
                       (const float*)data_of(Q), (const float*)data_of(KN), (const float*)data_of(VN),
                       sc ? (const float*)data_of(KS) : 0, sc ? (const float*)data_of(VS) : 0,
                       (const float*)data_of(MK), data_of(KC), data_of(VC)};
  float* out = (float*)data_of(O);
  float* res = 0;
  if (parts > 1 && !(res = (float*)malloc(sizeof(float) * units * parts * rows * (Dp + 2))))
    return fail("vlmc_cache_attention: out of memory");
  const int serial = (double)B * H * S * (T + S) * D < 65536. || threads == 1;
  int failed = 0;
#pragma omp parallel if (!serial) reduction(|| : failed)
  {
    CaBuf w;
    const size_t kv = sizeof(float) * CA_KEYS * Dp, rq = sizeof(float) * rows * Dp; /* multiples of 64 bytes */
    w.kb = (float*)aligned_alloc(64, kv); w.vb = (float*)aligned_alloc(64, kv);
    w.qb = (float*)aligned_alloc(64, rq); w.acc = (float*)aligned_alloc(64, rq);
    w.p = (float*)aligned_alloc(64, sizeof(float) * rows * CA_KEYS);
    w.madd = (float*)aligned_alloc(64, sizeof(float) * rows * CA_KEYS);
    w.m = (float*)malloc(sizeof(float) * 3 * rows); w.l = w.m ? w.m + rows : 0; w.alpha = w.m ? w.m + 2 * rows : 0;
    w.keys = (int64_t*)malloc(sizeof(int64_t) * CA_KEYS);
    failed = !w.kb || !w.vb || !w.qb || !w.acc || !w.p || !w.madd || !w.m || !w.keys;
    if (!failed) { memset(w.kb, 0, kv); memset(w.vb, 0, kv); }
#pragma omp for schedule(dynamic)
    for (int64_t it = 0; it < units * parts; ++it) {
      if (failed) continue;
      const int64_t u = it / parts;
      ca_item(&a, u / blocks, u % blocks, it % parts, &w, res ? res + it * rows * (Dp + 2) : 0, out);
    }
    free(w.kb); free(w.vb); free(w.qb); free(w.acc); free(w.p); free(w.madd); free(w.m); free(w.keys);
  }
  if (!failed && parts > 1) { /* merge the parts' softmax states */
#pragma omp parallel for schedule(static) if (!serial)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t bg = u / blocks, rb = u % blocks, b = bg / Hk, g = bg % Hk, r0 = rb * rows;
      const int64_t nr = R - r0 < rows ? R - r0 : rows;
      for (int64_t r = 0; r < nr; ++r) {
        float m = -INFINITY, l = 0.f;
        for (int64_t p = 0; p < parts; ++p) {
          const float mp = res[((u * parts + p) * rows + r) * (Dp + 2) + Dp];
          m = mp > m ? mp : m;
        }
        float* o = out + ((b * H + g * (H / Hk)) * S + r0 + r) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
        if (m == -INFINITY) continue;
        for (int64_t p = 0; p < parts; ++p) {
          const float* e = res + ((u * parts + p) * rows + r) * (Dp + 2);
          if (e[Dp] == -INFINITY) continue;
          const float f = expf(e[Dp] - m);
          l += e[Dp + 1] * f;
          for (int64_t d = 0; d < D; ++d) o[d] += e[d] * f;
        }
        const float inv = l > 0.f ? 1.f / l : 0.f;
        for (int64_t d = 0; d < D; ++d) o[d] *= inv;
      }
    }
  }
  free(res);
  return failed ? fail("vlmc_cache_attention: out of memory") : 0;
}

__attribute__((visibility("default")))
int __tvm_ffi_vlmc_cache_attention(void* h, const TVMFFIAny* a, int32_t n, TVMFFIAny* r) {
  return run_cache_attention(a, n, r);
}
