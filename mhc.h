/* mhc.h - a DeepSeek-style language model with mHC residual streams, MLA attention and
   DeepSeekMoE, as one readable C header (CPU reference: every forward and backward pass).

   Use:   #define MHC_IMPLEMENTATION    in exactly one C file, before #include "mhc.h".
   Macros: MHC_DOUBLE  make mhc_real a double (finite-difference tests); default float.

   The math is ../shared/SPEC.md ("SPEC §n" below). Orientation is the mHC paper's (arXiv 2512.24880):
   one token's residual state X is [n, C] (row i = stream i), X' = H_res @ X + H_post^T f, y = H_pre @ X.
   Storage is row-major; a weight mapping R^in -> R^out is stored [out, in] and applied y = W @ x.
   Every *_forward has a *_backward next to it that ACCUMULATES (+=) into its gradient buffers.

   Sections: 1 config & presets   2 parameters   3 primitives (matmul, RMSNorm, RoPE, SwiGLU, CE)
             4 mHC / HC residual streams   5 MLA   6 MoE   7 model forward/backward   8 optimizer
             9 absorbed decode   10 files (safetensors, token shards)                                */
#ifndef MHC_H
#define MHC_H

#include <stddef.h>
#include <stdint.h>

#ifdef MHC_DOUBLE
typedef double mhc_real;
#else
typedef float mhc_real;
#endif

/* ---------------------------------------------------------------------------------------------
   1. Configuration (SPEC §1, field names as in the SPEC; they are the safetensors metadata keys)   */
enum { MHC_RESIDUAL_PLAIN, MHC_RESIDUAL_HC, MHC_RESIDUAL_MHC };
enum { MHC_INIT_IDENTITY, MHC_INIT_UNIFORM };
enum { MHC_SCHEDULE_STEP, MHC_SCHEDULE_COSINE };

typedef struct {
    /* residual streams */
    int residual;           /* plain | hc | mhc                                             */
    int hc_mult;            /* n, streams (1 for plain)                                     */
    int sinkhorn_iters;     /* t_max                                                        */
    double sinkhorn_eps;
    int mhc_init;           /* identity | uniform (SPEC §7.1)                               */
    double mhc_alpha_init;
    /* transformer */
    int vocab_size, d_model, n_layers, n_heads;               /* V, C, L, H          */
    int q_lora_rank, kv_lora_rank;                            /* d_q, d_c            */
    int qk_nope_head_dim, qk_rope_head_dim, v_head_dim;       /* d_n, d_r, d_v       */
    double rope_theta;
    /* DeepSeekMoE */
    int n_routed_experts, n_shared_experts, n_activated_experts;   /* E, N_s, K      */
    int moe_inter_dim, first_k_dense, dense_inter_dim;             /* I, -, D        */
    double route_scale;                                            /* rho            */
    int n_expert_groups, n_limited_groups;                         /* G, G_k         */
    double bias_update_speed, seq_aux_alpha;                       /* gamma, alpha   */
    double rms_eps;
    int seq_len;            /* T */
    double init_std;        /* sigma_0 */
    /* training (SPEC §12) */
    int batch_size, steps, warmup_steps, lr_schedule;
    double lr, adam_beta1, adam_beta2, adam_eps, weight_decay, grad_clip;
} MhcConfig;

/* one config field, for the metadata writer/reader and the command lines of train/infer */
enum { MHC_FIELD_INT, MHC_FIELD_REAL, MHC_FIELD_ENUM };
typedef struct {
    const char *name;
    int kind;
    int *i;                   /* MHC_FIELD_INT and MHC_FIELD_ENUM */
    double *d;                /* MHC_FIELD_REAL                   */
    const char *const *names; /* MHC_FIELD_ENUM: value names, NULL-terminated */
} MhcField;

#define MHC_MAX_FIELDS 48
int mhc_config_fields(MhcConfig *cfg, MhcField *fields);    /* returns the count */
int mhc_config_set(MhcConfig *cfg, const char *name, const char *value); /* 0 ok, -1 unknown/bad */
int mhc_config_format(MhcConfig *cfg, const char *name, char *buf, size_t size);
int mhc_config_validate(const MhcConfig *cfg, char *err, size_t size);   /* 0 ok, else reason */
int mhc_preset(MhcConfig *cfg, const char *name);                      /* tiny small 3b 9b 27b */
void mhc_config_finish(MhcConfig *cfg);     /* derived fields: plain forces n = 1 */
int mhc_m(const MhcConfig *cfg);            /* coefficients per sublayer, n^2 + 2n */
int mhc_is_moe(const MhcConfig *cfg, int layer);
void mhc_count_params(const MhcConfig *cfg, int64_t *total, int64_t *active);
double mhc_flops_per_token(const MhcConfig *cfg);  /* SPEC §15 F_train */

/* ---------------------------------------------------------------------------------------------
   2. Parameters: one slab, with named pointers into it (the same struct points into the gradient,
      Adam m and Adam v slabs).                                                                     */
typedef struct {
    mhc_real *attn_norm;                   /* [C]                                        */
    mhc_real *wq;                          /* [H*d_qk, C]      (d_q = 0)                 */
    mhc_real *wdq, *q_norm, *wuq;          /* [d_q, C], [d_q], [H*d_qk, d_q] (d_q > 0)   */
    mhc_real *wdkv;                        /* [d_c + d_r, C]   output [c | k_pe]         */
    mhc_real *kv_norm;                     /* [d_c]                                      */
    mhc_real *wukv;                        /* [H*(d_n+d_v), d_c]  per head [k_nope | v]  */
    mhc_real *wo;                          /* [C, H*d_v]                                 */
    mhc_real *ffn_norm;                    /* [C]                                        */
    mhc_real *w1, *w3, *w2;                /* dense [D,C],[D,C],[C,D]; MoE [E,I,C],[E,I,C],[E,C,I] */
    mhc_real *gate;                        /* [E, C]                                     */
    mhc_real *sw1, *sw3, *sw2;             /* shared expert [Ns*I,C],[Ns*I,C],[C,Ns*I]   */
} MhcBlock;

typedef struct {
    mhc_real *phi, *b, *alpha;             /* mhc: [m, nC], [m], [3]                      */
    mhc_real *theta, *b_pre, *b_post, *b_res; /* hc: [n+2, C], [n], [n], [n,n]; alpha [3] */
} MhcStreamParams;

typedef struct {
    mhc_real *embed, *head, *norm_final;   /* [V,C], [V,C], [C] */
    MhcBlock *blk;                         /* [L]  */
    MhcStreamParams *sub;                  /* [2L] (plain: unused) */
} MhcParams;

typedef struct {
    char name[64];
    int ndim, shape[3];
    size_t offset, size;
    int decay;              /* AdamW weight decay applies (2-D matrices, SPEC §12) */
} MhcTensor;

/* ---------------------------------------------------------------------------------------------
   Activations saved by the forward for the backward, for B sequences of T tokens (N = B*T).       */
typedef struct {
    int B, T;
    mhc_real *X;        /* [S+1, N, n, C] residual state entering each sublayer (X[S] = output) */
    mhc_real *coef_a;   /* [S, N, m] mhc: pre-activations a; hc: tanh values (per stream j: n+2)  */
    mhc_real *coef_h;   /* [S, N, m] mhc: h = phi @ x                                          */
    mhc_real *coef_H;   /* [S, N, m] H_pre | H_post | H_res (row-major)                          */
    mhc_real *coef_r;   /* [S, N, n] mhc: r in [0]; hc: per-stream rs                          */
    mhc_real *y;        /* [S, N, C] pre-mixed branch input H_pre @ X                          */
    mhc_real *u;        /* [S, N, C] RMSNorm(y)                                                */
    mhc_real *u_rstd;   /* [S, N]                                                              */
    mhc_real *f;        /* [S, N, C] branch output                                             */
    /* MLA, per layer */
    mhc_real *q;        /* [L, N, H*d_qk] queries, q_pe after RoPE                             */
    mhc_real *cq_raw, *cq, *cq_rstd;  /* [L, N, d_q], [L, N, d_q], [L, N]   (d_q > 0)        */
    mhc_real *c_raw, *c, *c_rstd;     /* [L, N, d_c] x2, [L, N] latent KV                     */
    mhc_real *kpe;      /* [L, N, d_r] shared rope key, after RoPE                             */
    mhc_real *kv;       /* [L, N, H*(d_n+d_v)]                                                 */
    mhc_real *att;      /* [L, B, H, T, T] softmax probabilities                               */
    mhc_real *o;        /* [L, N, H*d_v]                                                       */
    /* FFN / MoE, per layer; hidden width F = max(D, (K + Ns)*I): [N*K, I] routed (grouped), then shared */
    mhc_real *ffn_a, *ffn_g, *ffn_h;  /* [L, N, F] gate pre-activation, up, silu(a)*g         */
    mhc_real *moe_s;    /* [L, N, E] sigmoid affinities                                        */
    int *moe_sel;       /* [L, N, K] selected experts                                          */
    mhc_real *moe_w;    /* [L, N, K] gate weights                                              */
    mhc_real *moe_eo;   /* [L, N*K, C] expert outputs, grouped order (for dw = dout . Expert(u)) */
    mhc_real *moe_x;    /* [N*K, C] expert inputs: row r is u of assignment expert_order[r]     */
    /* head */
    mhc_real *z, *hf, *hf_rstd;  /* [N, C], [N, C], [N]                                        */
    mhc_real *logits;   /* [N, V]; after the forward: probabilities; after backward: dlogits   */
    mhc_real *losses;   /* [N] per-token CE                                                    */
    /* gradient scratch (backward only) */
    mhc_real *dX, *dX2; /* [N, n, C] ping-pong: gradient entering / leaving a sublayer          */
    mhc_real *dH;       /* [N, m] gradient of the coefficients                                 */
    mhc_real *dcoef;    /* [N, m] mhc: da then dh; hc: d(theta @ Xt)                           */
    mhc_real *Xt, *dXt; /* [N, n, C] hc normalised streams and their gradient                  */
    mhc_real *df, *du, *dy;              /* [N, C] branch output, branch input, pre-mix output  */
    mhc_real *dq, *dkv, *dkpe, *dkpe_h;  /* [N,H*d_qk], [N,H*(d_n+d_v)], [N,d_r], [N,H,d_r]     */
    mhc_real *dlat, *dlat_raw;           /* [N, d_c] latent after / before its RMSNorm          */
    mhc_real *dcq, *dcq_raw;             /* [N, d_q]                                            */
    mhc_real *dwide;                     /* [N, max(H*d_v, F)]: attention o, FFN hidden          */
    mhc_real *dffn_a, *dffn_g;           /* [N, F]                                              */
    mhc_real *moe_dy, *moe_dx;  /* [N*K, C] grouped order: w dout, and the expert input gradient */
    mhc_real *dscore;   /* [N, E] router score gradients                                       */
    mhc_real *dgw;      /* [N, K] gradient of the gate weights w                               */
    int *expert_order;  /* [N*K] assignment (token*K + slot) at each grouped row, token order    */
    int *expert_row;    /* [N*K] grouped row of each assignment (the inverse of expert_order)     */
    int *expert_start;  /* [E+1] first grouped row of each expert                                 */
} MhcActs;

typedef struct {
    MhcConfig cfg;
    int n_tensors;
    MhcTensor *tensors;    /* [n_tensors] name, shape, offset, decay */
    size_t n_params;
    mhc_real *params, *grads, *adam_m, *adam_v;   /* [n_params] each */
    MhcParams p, g;        /* named views into params and grads */
    mhc_real *expert_bias; /* [L, E] selection bias (a buffer, not a parameter); dense layers unused */
    int64_t *expert_load;  /* [L, E] assignments counted by the last forward */
    int64_t *step_load;    /* [L, E] assignments of the forwards backpropagated since mhc_zero_grad (all
                              micro-batches of a step): what the bias update balances */
    MhcActs acts;
    int step;              /* optimizer steps taken */
    /* outputs of the last forward */
    double ce, aux;
} MhcModel;

int mhc_model_init(MhcModel *m, const MhcConfig *cfg);   /* allocates parameters; 0 ok */
void mhc_model_free(MhcModel *m);
void mhc_init_params(MhcModel *m, uint64_t seed);          /* SPEC §12, §6, §7.1 */
int mhc_acts_alloc(MhcModel *m, int B, int T);             /* 0 ok */
size_t mhc_acts_bytes(const MhcConfig *cfg, int B, int T); /* activation memory of one B x T step */
/* a separate activation set (e.g. a B = 1 probe beside the training batch): forward only */
void mhc_acts_create(MhcActs *a, const MhcConfig *cfg, int B, int T);
void mhc_acts_destroy(MhcActs *a);
double mhc_forward_acts(MhcModel *m, MhcActs *a, const int *tokens, const int *targets, int B, int T);

/* forward: returns the loss CE_mean + L_aux (targets may be NULL: logits only, loss 0) */
double mhc_forward(MhcModel *m, const int *tokens, const int *targets, int B, int T);
void mhc_zero_grad(MhcModel *m);                          /* also zeroes step_load */
void mhc_backward(MhcModel *m, const int *tokens, const int *targets);   /* += grads, += step_load */
void mhc_scale_grads(MhcModel *m, double scale);          /* K micro-batches: the mean is scale 1/K */
double mhc_grad_norm(const MhcModel *m);
double mhc_clip_grad(MhcModel *m, double max_norm);       /* returns the pre-clip norm */
double mhc_lr_at(const MhcConfig *cfg, int k);            /* SPEC §12 */
void mhc_adamw_step(MhcModel *m, double lr);              /* step counter is m->step */
void mhc_update_expert_bias(MhcModel *m);                  /* SPEC §11, after the optimizer step */
double mhc_max_violation(const MhcModel *m, int layer);

/* per-token primitives exported for tests */
void mhc_sinkhorn_forward(mhc_real *H, const mhc_real *Lam, int n, int iters, double eps);
void mhc_sinkhorn_backward(mhc_real *dLam, const mhc_real *dH, const mhc_real *Lam, int n, int iters, double eps);
void mhc_rope(mhc_real *x, int d_r, int pos, double theta, int transpose);

/* random numbers: splitmix64 state, standard normals by Box-Muller */
uint64_t mhc_rng_u64(uint64_t *state);
double mhc_rng_uniform(uint64_t *state);
double mhc_rng_normal(uint64_t *state);

/* ---------------------------------------------------------------------------------------------
   9. Absorbed decode with the latent KV cache (SPEC §10)                                        */
typedef struct {
    int max_len, len;
    mhc_real *ckv;     /* [L, max_len, d_c] latent after RMSNorm */
    mhc_real *kpe;     /* [L, max_len, d_r] rope key after RoPE  */
    mhc_real *qabs, *olat, *scores;  /* [H, d_c], [H, d_c], [max_len] */
    MhcActs acts;      /* activations of one token (B = T = 1)  */
} MhcCache;
int mhc_cache_init(MhcCache *c, const MhcConfig *cfg, int max_len);   /* 0 ok */
void mhc_cache_free(MhcCache *c);
/* feed one token at position c->len; writes logits [V]; returns 0, -1 when the cache is full */
int mhc_decode_step(MhcModel *m, MhcCache *c, int token, mhc_real *logits);
/* copy the latent cache of sequence 0 of the last forward (prefill, SPEC §9 path) into c */
int mhc_cache_fill_from_forward(MhcModel *m, MhcCache *c, int T);
/* x rounded to bf16 (8 mantissa bits, to nearest, ties to even, as CUDA's __float2bfloat16), as a float */
float mhc_bf16_round(float x);
/* Decode with bf16 weights (infer --precision bf16): rounds to bf16, in place, every matrix a decoded
   token reads in the precision of the GEMMs: the blocks' MLA, FFN and expert matrices and the head. The
   mHC / HC coefficient projections, the router, the embedding and the norms' gains stay fp32, as on every
   path. The GPU's bf16 decode reads these same values from its bf16 copy of the weights. */
void mhc_round_decode_weights_bf16(MhcModel *m);

/* ---------------------------------------------------------------------------------------------
   10. Files                                                                                     */
typedef struct {
    char name[96];
    char dtype[8];
    int ndim;
    int64_t shape[4];
    uint64_t begin, end;      /* byte offsets in the data buffer */
} MhcStEntry;

typedef struct {
    char *json;               /* header text */
    int n_entries, n_meta;
    MhcStEntry *entries;
    char **meta_keys, **meta_values;
    unsigned char *data;      /* the data buffer */
    uint64_t data_size;
} MhcSafetensors;

int mhc_st_open(MhcSafetensors *st, const char *path, char *err, size_t errsize);
void mhc_st_close(MhcSafetensors *st);
const MhcStEntry *mhc_st_find(const MhcSafetensors *st, const char *name);
const char *mhc_st_meta(const MhcSafetensors *st, const char *key);
/* converts F32/F64/BF16 into dst; count must match; 0 ok */
int mhc_st_read(const MhcSafetensors *st, const char *name, mhc_real *dst, size_t count, char *err, size_t errsize);

typedef struct {
    const char *name;
    const char *dtype;        /* "F32" "F64" "I32" "I64" */
    int ndim;
    int64_t shape[4];
    const void *data;
} MhcStTensor;
/* writes path atomically (temp file + rename); meta: n_meta key/value pairs; 0 ok */
int mhc_st_write(const char *path, const MhcStTensor *tensors, int n, const char *const *meta_keys,
                 const char *const *meta_values, int n_meta, char *err, size_t errsize);

/* the model's weights (+ expert biases, config and step in the metadata) */
int mhc_save_weights(const MhcModel *m, const char *path, char *err, size_t errsize);
/* reads the config from a weights file (for "load the model this checkpoint describes") */
int mhc_read_config(const char *path, MhcConfig *cfg, int *step, char *err, size_t errsize);
int mhc_load_weights(MhcModel *m, const char *path, char *err, size_t errsize);
int mhc_save_optimizer(const MhcModel *m, const char *path, const char *const *extra_keys,
                       const char *const *extra_values, int n_extra, char *err, size_t errsize);
int mhc_load_optimizer(MhcModel *m, const char *path, MhcSafetensors *st_out, char *err, size_t errsize);

/* llm.c token shards (SPEC §16) */
typedef struct {
    int n_files, file;        /* current file */
    char **paths;
    int64_t pos;              /* token position of the next batch in the current file */
    int64_t ntok;             /* tokens in the current file */
    int version;              /* 1: uint16, 7: uint32 */
    uint32_t *tokens;         /* the current file's tokens */
    int *batch;               /* [B*T + 1] */
} MhcLoader;
int mhc_shard_write(const char *path, const uint32_t *tokens, int64_t ntok, int version, char *err, size_t errsize);
int mhc_shard_read(const char *path, uint32_t **tokens, int64_t *ntok, int *version, char *err, size_t errsize);
int mhc_loader_open(MhcLoader *l, char **paths, int n_paths, int B, int T, char *err, size_t errsize);
void mhc_loader_close(MhcLoader *l);
/* fills inputs [B*T] and targets [B*T]; 0 ok */
int mhc_loader_next(MhcLoader *l, int B, int T, int *inputs, int *targets, char *err, size_t errsize);
int mhc_loader_seek(MhcLoader *l, int file, int64_t pos, char *err, size_t errsize);

#endif /* MHC_H */

/* =============================================================================================== */
#ifdef MHC_IMPLEMENTATION
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MHC_PI 3.14159265358979323846

static void *mhc_calloc(size_t count, size_t size) {
    void *p = calloc(count ? count : 1, size);
    if (!p) {
        fprintf(stderr, "mhc: out of memory allocating %zu x %zu bytes\n", count, size);
        exit(1);
    }
    return p;
}

static char *mhc_strdup(const char *s) {
    char *d = (char *)mhc_calloc(strlen(s) + 1, 1);
    memcpy(d, s, strlen(s));
    return d;
}

static void mhc_errf(char *err, size_t size, const char *fmt, ...) {
    if (!err || !size) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, size, fmt, ap);
    va_end(ap);
}

/* ---------------------------------------------------------------------------------------------
   1. Configuration                                                                                */
static const char *const mhc_residual_names[] = {"plain", "hc", "mhc", NULL};
static const char *const mhc_init_names[] = {"identity", "uniform", NULL};
static const char *const mhc_schedule_names[] = {"step", "cosine", NULL};

static MhcField mhc_field_int(const char *name, int *v) { return (MhcField){name, MHC_FIELD_INT, v, NULL, NULL}; }
static MhcField mhc_field_real(const char *name, double *v) { return (MhcField){name, MHC_FIELD_REAL, NULL, v, NULL}; }
static MhcField mhc_field_enum(const char *name, int *v, const char *const *names) {
    return (MhcField){name, MHC_FIELD_ENUM, v, NULL, names};
}

int mhc_config_fields(MhcConfig *c, MhcField *f) {
    int k = 0;
    f[k++] = mhc_field_enum("residual", &c->residual, mhc_residual_names);
    f[k++] = mhc_field_int("hc_mult", &c->hc_mult);
    f[k++] = mhc_field_int("sinkhorn_iters", &c->sinkhorn_iters);
    f[k++] = mhc_field_real("sinkhorn_eps", &c->sinkhorn_eps);
    f[k++] = mhc_field_enum("mhc_init", &c->mhc_init, mhc_init_names);
    f[k++] = mhc_field_real("mhc_alpha_init", &c->mhc_alpha_init);
    f[k++] = mhc_field_int("vocab_size", &c->vocab_size);
    f[k++] = mhc_field_int("d_model", &c->d_model);
    f[k++] = mhc_field_int("n_layers", &c->n_layers);
    f[k++] = mhc_field_int("n_heads", &c->n_heads);
    f[k++] = mhc_field_int("q_lora_rank", &c->q_lora_rank);
    f[k++] = mhc_field_int("kv_lora_rank", &c->kv_lora_rank);
    f[k++] = mhc_field_int("qk_nope_head_dim", &c->qk_nope_head_dim);
    f[k++] = mhc_field_int("qk_rope_head_dim", &c->qk_rope_head_dim);
    f[k++] = mhc_field_int("v_head_dim", &c->v_head_dim);
    f[k++] = mhc_field_real("rope_theta", &c->rope_theta);
    f[k++] = mhc_field_int("n_routed_experts", &c->n_routed_experts);
    f[k++] = mhc_field_int("n_shared_experts", &c->n_shared_experts);
    f[k++] = mhc_field_int("n_activated_experts", &c->n_activated_experts);
    f[k++] = mhc_field_int("moe_inter_dim", &c->moe_inter_dim);
    f[k++] = mhc_field_int("first_k_dense", &c->first_k_dense);
    f[k++] = mhc_field_int("dense_inter_dim", &c->dense_inter_dim);
    f[k++] = mhc_field_real("route_scale", &c->route_scale);
    f[k++] = mhc_field_int("n_expert_groups", &c->n_expert_groups);
    f[k++] = mhc_field_int("n_limited_groups", &c->n_limited_groups);
    f[k++] = mhc_field_real("bias_update_speed", &c->bias_update_speed);
    f[k++] = mhc_field_real("seq_aux_alpha", &c->seq_aux_alpha);
    f[k++] = mhc_field_real("rms_eps", &c->rms_eps);
    f[k++] = mhc_field_int("seq_len", &c->seq_len);
    f[k++] = mhc_field_real("init_std", &c->init_std);
    f[k++] = mhc_field_int("batch_size", &c->batch_size);
    f[k++] = mhc_field_int("steps", &c->steps);
    f[k++] = mhc_field_int("warmup_steps", &c->warmup_steps);
    f[k++] = mhc_field_enum("lr_schedule", &c->lr_schedule, mhc_schedule_names);
    f[k++] = mhc_field_real("lr", &c->lr);
    f[k++] = mhc_field_real("adam_beta1", &c->adam_beta1);
    f[k++] = mhc_field_real("adam_beta2", &c->adam_beta2);
    f[k++] = mhc_field_real("adam_eps", &c->adam_eps);
    f[k++] = mhc_field_real("weight_decay", &c->weight_decay);
    f[k++] = mhc_field_real("grad_clip", &c->grad_clip);
    return k;
}

int mhc_config_set(MhcConfig *cfg, const char *name, const char *value) {
    MhcField f[MHC_MAX_FIELDS];
    int n = mhc_config_fields(cfg, f);
    for (int k = 0; k < n; k++) {
        if (strcmp(f[k].name, name) != 0) continue;
        char *end = NULL;
        errno = 0;
        if (f[k].kind == MHC_FIELD_INT) {
            long v = strtol(value, &end, 10);
            if (errno || end == value || *end || v < -2147483647L || v > 2147483647L) return -1;
            *f[k].i = (int)v;
        } else if (f[k].kind == MHC_FIELD_REAL) {
            double v = strtod(value, &end);
            if (errno || end == value || *end || !isfinite(v)) return -1;
            *f[k].d = v;
        } else {
            for (int j = 0; f[k].names[j]; j++)
                if (strcmp(f[k].names[j], value) == 0) { *f[k].i = j; return 0; }
            return -1;
        }
        return 0;
    }
    return -1;
}

int mhc_config_format(MhcConfig *cfg, const char *name, char *buf, size_t size) {
    MhcField f[MHC_MAX_FIELDS];
    int n = mhc_config_fields(cfg, f);
    for (int k = 0; k < n; k++) {
        if (strcmp(f[k].name, name) != 0) continue;
        if (f[k].kind == MHC_FIELD_INT) snprintf(buf, size, "%d", *f[k].i);
        else if (f[k].kind == MHC_FIELD_REAL) snprintf(buf, size, "%.17g", *f[k].d);
        else snprintf(buf, size, "%s", f[k].names[*f[k].i]);
        return 0;
    }
    return -1;
}

int mhc_m(const MhcConfig *cfg) { return cfg->hc_mult * cfg->hc_mult + 2 * cfg->hc_mult; }
int mhc_is_moe(const MhcConfig *cfg, int layer) { return layer >= cfg->first_k_dense; }

void mhc_config_finish(MhcConfig *cfg) {
    if (cfg->residual == MHC_RESIDUAL_PLAIN) cfg->hc_mult = 1;
}

/* SPEC §13. Fields not listed keep the §1 defaults set first. */
int mhc_preset(MhcConfig *c, const char *name) {
    memset(c, 0, sizeof *c);
    c->residual = MHC_RESIDUAL_MHC; c->hc_mult = 4; c->sinkhorn_iters = 20; c->sinkhorn_eps = 1e-6;
    c->mhc_init = MHC_INIT_IDENTITY; c->mhc_alpha_init = 0.01;
    c->q_lora_rank = 0; c->kv_lora_rank = 512; c->qk_nope_head_dim = 128; c->qk_rope_head_dim = 64;
    c->v_head_dim = 128; c->rope_theta = 10000.0; c->first_k_dense = 1; c->route_scale = 1.0;
    c->n_expert_groups = 1; c->n_limited_groups = 1; c->bias_update_speed = 0.001; c->seq_aux_alpha = 1e-4;
    c->rms_eps = 1e-6; c->init_std = 0.006;
    c->lr_schedule = MHC_SCHEDULE_STEP; c->adam_beta1 = 0.9; c->adam_beta2 = 0.95; c->adam_eps = 1e-8;
    c->weight_decay = 0.1; c->grad_clip = 1.0;
    /*                  L   C     H   dc   dn   dr  dv  E   Ns K  I     V       T     B     steps  lr      W */
    struct { const char *name; int L, C, H, dc, dn, dr, dv, E, Ns, K, I, V, T, B, steps; double lr; int warmup; } p[] = {
        {"tiny",  4,  128,  4,  64,  32,  16, 32,  8, 1, 2, 128,  50257, 256,  8,    500,   1e-3,   50},
        {"small", 12, 512,  8,  256, 64,  32, 64,  16, 2, 2, 256, 50257, 1024, 32,   10000, 1e-3,   500},
        {"3b",    12, 1280, 16, 512, 128, 64, 128, 64, 2, 6, 896, 129280, 4096, 320, 30000, 8.6e-4, 2000},
        {"9b",    18, 1920, 24, 512, 128, 64, 128, 64, 2, 6, 1280, 129280, 4096, 512, 50000, 5.9e-4, 2000},
        {"27b",   30, 2560, 32, 512, 128, 64, 128, 72, 2, 6, 1536, 129280, 4096, 1280, 50000, 4.0e-4, 2000},
    };
    for (size_t k = 0; k < sizeof p / sizeof p[0]; k++) {
        if (strcmp(p[k].name, name) != 0) continue;
        c->n_layers = p[k].L; c->d_model = p[k].C; c->n_heads = p[k].H;
        c->kv_lora_rank = p[k].dc; c->qk_nope_head_dim = p[k].dn; c->qk_rope_head_dim = p[k].dr;
        c->v_head_dim = p[k].dv;
        c->n_routed_experts = p[k].E; c->n_shared_experts = p[k].Ns; c->n_activated_experts = p[k].K;
        c->moe_inter_dim = p[k].I; c->dense_inter_dim = (p[k].Ns + p[k].K) * p[k].I;
        c->vocab_size = p[k].V; c->seq_len = p[k].T; c->batch_size = p[k].B; c->steps = p[k].steps;
        c->lr = p[k].lr; c->warmup_steps = p[k].warmup;
        if (k < 2) { c->init_std = 0.02; }
        if (k == 0) c->lr_schedule = MHC_SCHEDULE_COSINE;
        return 0;
    }
    return -1;
}

int mhc_config_validate(const MhcConfig *c, char *err, size_t size) {
    struct { const char *name; int value, lo; } ints[] = {
        {"hc_mult", c->hc_mult, 1}, {"sinkhorn_iters", c->sinkhorn_iters, 1}, {"vocab_size", c->vocab_size, 2},
        {"d_model", c->d_model, 1}, {"n_layers", c->n_layers, 1}, {"n_heads", c->n_heads, 1},
        {"q_lora_rank", c->q_lora_rank, 0}, {"kv_lora_rank", c->kv_lora_rank, 1},
        {"qk_nope_head_dim", c->qk_nope_head_dim, 1}, {"qk_rope_head_dim", c->qk_rope_head_dim, 2},
        {"v_head_dim", c->v_head_dim, 1}, {"n_routed_experts", c->n_routed_experts, 1},
        {"n_shared_experts", c->n_shared_experts, 0}, {"n_activated_experts", c->n_activated_experts, 1},
        {"moe_inter_dim", c->moe_inter_dim, 1}, {"first_k_dense", c->first_k_dense, 0},
        {"dense_inter_dim", c->dense_inter_dim, 1}, {"n_expert_groups", c->n_expert_groups, 1},
        {"n_limited_groups", c->n_limited_groups, 1}, {"seq_len", c->seq_len, 1},
        {"batch_size", c->batch_size, 1}, {"steps", c->steps, 1}, {"warmup_steps", c->warmup_steps, 0},
    };
    for (size_t k = 0; k < sizeof ints / sizeof ints[0]; k++)
        if (ints[k].value < ints[k].lo) {
            mhc_errf(err, size, "%s = %d is out of range (must be >= %d)", ints[k].name, ints[k].value, ints[k].lo);
            return -1;
        }
    if (c->residual < 0 || c->residual > MHC_RESIDUAL_MHC) { mhc_errf(err, size, "bad residual mode"); return -1; }
    if (c->residual == MHC_RESIDUAL_PLAIN && c->hc_mult != 1) { mhc_errf(err, size, "residual plain needs hc_mult 1"); return -1; }
    if (c->hc_mult > 16) { mhc_errf(err, size, "hc_mult = %d is out of range (1..16)", c->hc_mult); return -1; }
    if (c->qk_rope_head_dim % 2) { mhc_errf(err, size, "qk_rope_head_dim must be even"); return -1; }
    if (c->n_activated_experts > c->n_routed_experts) { mhc_errf(err, size, "n_activated_experts > n_routed_experts"); return -1; }
    if (c->first_k_dense > c->n_layers) { mhc_errf(err, size, "first_k_dense > n_layers"); return -1; }
    int E = c->n_routed_experts, G = c->n_expert_groups;
    if (G > 1 && (E % G || E / G < 2 || c->n_limited_groups > G || c->n_activated_experts > c->n_limited_groups * (E / G))) {
        mhc_errf(err, size, "group routing needs E %% G == 0, E/G >= 2, G_k <= G and K <= G_k*E/G (SPEC §11)");
        return -1;
    }
    struct { const char *name; double value, lo, hi; } reals[] = {
        {"sinkhorn_eps", c->sinkhorn_eps, 0, 1}, {"rms_eps", c->rms_eps, 0, 1}, {"rope_theta", c->rope_theta, 1, 1e12},
        {"route_scale", c->route_scale, 1e-6, 1e6}, {"bias_update_speed", c->bias_update_speed, 0, 1},
        {"seq_aux_alpha", c->seq_aux_alpha, 0, 1e3}, {"init_std", c->init_std, 0, 10},
        {"mhc_alpha_init", c->mhc_alpha_init, -1e3, 1e3}, {"lr", c->lr, 0, 10},
        {"adam_beta1", c->adam_beta1, 0, 0.999999}, {"adam_beta2", c->adam_beta2, 0, 0.999999999},
        {"adam_eps", c->adam_eps, 0, 1}, {"weight_decay", c->weight_decay, 0, 10}, {"grad_clip", c->grad_clip, 0, 1e9},
    };
    for (size_t k = 0; k < sizeof reals / sizeof reals[0]; k++)
        if (!(reals[k].value >= reals[k].lo && reals[k].value <= reals[k].hi)) {
            mhc_errf(err, size, "%s = %g is out of range [%g, %g]", reals[k].name, reals[k].value, reals[k].lo, reals[k].hi);
            return -1;
        }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
   2. Parameters. mhc_layout walks every tensor in one fixed order; the same walk counts the
      parameters, names them for files and points the named views into a slab. Tensors shared by
      all residual modes come first, the stream (hc.*) tensors last, so that random draws of the
      shared weights do not depend on `residual` (SPEC §12).                                       */
typedef struct {
    MhcTensor *table;     /* NULL: count only */
    int n;
    size_t offset;
    mhc_real *slab;       /* NULL: no pointers */
} MhcLayoutWalk;

static mhc_real *mhc_tensor(MhcLayoutWalk *w, const char *fmt, int index, int decay, int ndim, int d0, int d1, int d2) {
    size_t size = (size_t)d0 * (size_t)(ndim > 1 ? d1 : 1) * (size_t)(ndim > 2 ? d2 : 1);
    if (w->table) {
        MhcTensor *t = &w->table[w->n];
        snprintf(t->name, sizeof t->name, fmt, index);
        t->ndim = ndim;
        t->shape[0] = d0; t->shape[1] = ndim > 1 ? d1 : 1; t->shape[2] = ndim > 2 ? d2 : 1;
        t->offset = w->offset;
        t->size = size;
        t->decay = decay;
    }
    mhc_real *ptr = w->slab ? w->slab + w->offset : NULL;
    w->n++;
    w->offset += size;
    return ptr;
}

static void mhc_layout(const MhcConfig *c, MhcLayoutWalk *w, MhcParams *p) {
    int V = c->vocab_size, C = c->d_model, L = c->n_layers, H = c->n_heads;
    int dqk = c->qk_nope_head_dim + c->qk_rope_head_dim, dq = c->q_lora_rank, dc = c->kv_lora_rank;
    int dr = c->qk_rope_head_dim, dn = c->qk_nope_head_dim, dv = c->v_head_dim;
    int E = c->n_routed_experts, I = c->moe_inter_dim, NsI = c->n_shared_experts * c->moe_inter_dim;
    int D = c->dense_inter_dim, n = c->hc_mult, m = mhc_m(c);
    MhcParams dummy_p;
    if (!p) p = &dummy_p;
    p->embed = mhc_tensor(w, "embed", 0, 1, 2, V, C, 0);
    p->head = mhc_tensor(w, "head", 0, 1, 2, V, C, 0);
    p->norm_final = mhc_tensor(w, "norm_final", 0, 0, 1, C, 0, 0);
    for (int l = 0; l < L; l++) {
        MhcBlock dummy_b, *b = p == &dummy_p ? &dummy_b : &p->blk[l];
        memset(b, 0, sizeof *b);
        b->attn_norm = mhc_tensor(w, "blk.%d.attn_norm", l, 0, 1, C, 0, 0);
        if (dq == 0) {
            b->wq = mhc_tensor(w, "blk.%d.attn.wq", l, 1, 2, H * dqk, C, 0);
        } else {
            b->wdq = mhc_tensor(w, "blk.%d.attn.wdq", l, 1, 2, dq, C, 0);
            b->q_norm = mhc_tensor(w, "blk.%d.attn.q_norm", l, 0, 1, dq, 0, 0);
            b->wuq = mhc_tensor(w, "blk.%d.attn.wuq", l, 1, 2, H * dqk, dq, 0);
        }
        b->wdkv = mhc_tensor(w, "blk.%d.attn.wdkv", l, 1, 2, dc + dr, C, 0);
        b->kv_norm = mhc_tensor(w, "blk.%d.attn.kv_norm", l, 0, 1, dc, 0, 0);
        b->wukv = mhc_tensor(w, "blk.%d.attn.wukv", l, 1, 2, H * (dn + dv), dc, 0);
        b->wo = mhc_tensor(w, "blk.%d.attn.wo", l, 1, 2, C, H * dv, 0);
        b->ffn_norm = mhc_tensor(w, "blk.%d.ffn_norm", l, 0, 1, C, 0, 0);
        if (!mhc_is_moe(c, l)) {
            b->w1 = mhc_tensor(w, "blk.%d.ffn.w1", l, 1, 2, D, C, 0);
            b->w3 = mhc_tensor(w, "blk.%d.ffn.w3", l, 1, 2, D, C, 0);
            b->w2 = mhc_tensor(w, "blk.%d.ffn.w2", l, 1, 2, C, D, 0);
        } else {
            b->gate = mhc_tensor(w, "blk.%d.moe.gate", l, 1, 2, E, C, 0);
            b->w1 = mhc_tensor(w, "blk.%d.moe.w1", l, 1, 3, E, I, C);
            b->w3 = mhc_tensor(w, "blk.%d.moe.w3", l, 1, 3, E, I, C);
            b->w2 = mhc_tensor(w, "blk.%d.moe.w2", l, 1, 3, E, C, I);
            if (NsI > 0) {
                b->sw1 = mhc_tensor(w, "blk.%d.moe.shared.w1", l, 1, 2, NsI, C, 0);
                b->sw3 = mhc_tensor(w, "blk.%d.moe.shared.w3", l, 1, 2, NsI, C, 0);
                b->sw2 = mhc_tensor(w, "blk.%d.moe.shared.w2", l, 1, 2, C, NsI, 0);
            }
        }
    }
    for (int s = 0; s < 2 * L && c->residual != MHC_RESIDUAL_PLAIN; s++) {
        MhcStreamParams dummy_s, *q = p == &dummy_p ? &dummy_s : &p->sub[s];
        memset(q, 0, sizeof *q);
        if (c->residual == MHC_RESIDUAL_MHC) {
            q->phi = mhc_tensor(w, "hc.%d.phi", s, 1, 2, m, n * C, 0);
            q->b = mhc_tensor(w, "hc.%d.b", s, 0, 1, m, 0, 0);
        } else {
            q->theta = mhc_tensor(w, "hc.%d.theta", s, 1, 2, n + 2, C, 0);
            q->b_pre = mhc_tensor(w, "hc.%d.b_pre", s, 0, 1, n, 0, 0);
            q->b_post = mhc_tensor(w, "hc.%d.b_post", s, 0, 1, n, 0, 0);
            q->b_res = mhc_tensor(w, "hc.%d.b_res", s, 0, 2, n, n, 0);
        }
        q->alpha = mhc_tensor(w, "hc.%d.alpha", s, 0, 1, 3, 0, 0);
    }
}

/* SPEC §13: total from the layout; active = total - Emb - unselected routed experts */
void mhc_count_params(const MhcConfig *c, int64_t *total, int64_t *active) {
    MhcLayoutWalk w = {NULL, 0, 0, NULL};
    mhc_layout(c, &w, NULL);
    int moe_layers = c->n_layers - c->first_k_dense;
    *total = (int64_t)w.offset;
    *active = *total - (int64_t)c->vocab_size * c->d_model
              - (int64_t)moe_layers * (c->n_routed_experts - c->n_activated_experts) * 3 * (int64_t)c->d_model * c->moe_inter_dim;
}

/* SPEC §15: F_train = 6*N_mm + F_attn + F_res per token */
double mhc_flops_per_token(const MhcConfig *c) {
    double C = c->d_model, H = c->n_heads, dqk = c->qk_nope_head_dim + c->qk_rope_head_dim;
    double dv = c->v_head_dim, dc = c->kv_lora_rank, dr = c->qk_rope_head_dim, dq = c->q_lora_rank;
    double n = c->hc_mult, m = mhc_m(c), L = c->n_layers, T = c->seq_len, I = c->moe_inter_dim;
    double attn = (dq == 0 ? C * H * dqk : C * dq + dq * H * dqk) + C * (dc + dr)
                  + dc * H * (c->qk_nope_head_dim + dv) + H * dv * C;
    double n_mm = (double)c->vocab_size * C + L * attn;
    for (int l = 0; l < c->n_layers; l++)
        n_mm += mhc_is_moe(c, l) ? 3 * C * I * (c->n_activated_experts + c->n_shared_experts) + c->n_routed_experts * C
                                 : 3 * C * c->dense_inter_dim;
    double f_attn = 3 * L * H * (dqk + dv) * (T + 1);
    double f_res = 0;
    if (c->residual == MHC_RESIDUAL_MHC) f_res = 2 * L * (6 * n * C * m + 3 * (2 * n * n * C + 6 * n * C));
    if (c->residual == MHC_RESIDUAL_HC) f_res = 2 * L * (6 * n * C * (n + 2) + 3 * (2 * n * n * C + 6 * n * C));
    return 6 * n_mm + f_attn + f_res;
}

int mhc_model_init(MhcModel *m, const MhcConfig *cfg) {
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    mhc_config_finish(&m->cfg);
    char err[256];
    if (mhc_config_validate(&m->cfg, err, sizeof err)) {
        fprintf(stderr, "mhc: bad config: %s\n", err);
        return -1;
    }
    const MhcConfig *c = &m->cfg;
    MhcLayoutWalk count = {NULL, 0, 0, NULL};
    mhc_layout(c, &count, NULL);
    m->n_tensors = count.n;
    m->n_params = count.offset;
    m->tensors = (MhcTensor *)mhc_calloc((size_t)m->n_tensors, sizeof(MhcTensor));
    m->params = (mhc_real *)mhc_calloc(m->n_params, sizeof(mhc_real));
    m->grads = (mhc_real *)mhc_calloc(m->n_params, sizeof(mhc_real));
    m->adam_m = (mhc_real *)mhc_calloc(m->n_params, sizeof(mhc_real));
    m->adam_v = (mhc_real *)mhc_calloc(m->n_params, sizeof(mhc_real));
    m->p.blk = (MhcBlock *)mhc_calloc((size_t)c->n_layers, sizeof(MhcBlock));
    m->g.blk = (MhcBlock *)mhc_calloc((size_t)c->n_layers, sizeof(MhcBlock));
    m->p.sub = (MhcStreamParams *)mhc_calloc((size_t)2 * c->n_layers, sizeof(MhcStreamParams));
    m->g.sub = (MhcStreamParams *)mhc_calloc((size_t)2 * c->n_layers, sizeof(MhcStreamParams));
    MhcLayoutWalk wp = {m->tensors, 0, 0, m->params}, wg = {NULL, 0, 0, m->grads};
    mhc_layout(c, &wp, &m->p);
    mhc_layout(c, &wg, &m->g);
    m->expert_bias = (mhc_real *)mhc_calloc((size_t)c->n_layers * c->n_routed_experts, sizeof(mhc_real));
    m->expert_load = (int64_t *)mhc_calloc((size_t)c->n_layers * c->n_routed_experts, sizeof(int64_t));
    m->step_load = (int64_t *)mhc_calloc((size_t)c->n_layers * c->n_routed_experts, sizeof(int64_t));
    return 0;
}

static void mhc_acts_free(MhcActs *a);

void mhc_model_free(MhcModel *m) {
    mhc_acts_free(&m->acts);
    free(m->tensors); free(m->params); free(m->grads); free(m->adam_m); free(m->adam_v);
    free(m->p.blk); free(m->g.blk); free(m->p.sub); free(m->g.sub);
    free(m->expert_bias); free(m->expert_load); free(m->step_load);
    memset(m, 0, sizeof *m);
}

/* splitmix64: one 64-bit state, statistically good, trivially reproducible on CPU and GPU */
#define MHC_RNG_STEP 0x9E3779B97F4A7C15ull   /* splitmix64's state increment per draw */

uint64_t mhc_rng_u64(uint64_t *state) {
    uint64_t z = (*state += MHC_RNG_STEP);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
double mhc_rng_uniform(uint64_t *state) { return (double)(mhc_rng_u64(state) >> 11) * (1.0 / 9007199254740992.0); }
double mhc_rng_normal(uint64_t *state) {
    double u1 = mhc_rng_uniform(state), u2 = mhc_rng_uniform(state);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(2.0 * MHC_PI * u2);
}

/* what the (d+1)-th mhc_rng_normal call on a state that started at seed returns, computed directly: the
   state only ever advances by the constant above, two draws per normal, so draws can run in parallel */
static double mhc_rng_normal_at(uint64_t seed, uint64_t d) {
    uint64_t state = seed + 2 * d * MHC_RNG_STEP;
    return mhc_rng_normal(&state);
}

/* SPEC §12 (2-D weights ~ N(0, sigma_0), gains 1), §6 (HC init), §7.1 (mHC identity / uniform). */
void mhc_init_params(MhcModel *m, uint64_t seed) {
    const MhcConfig *c = &m->cfg;
    uint64_t drawn = 0;                                      /* normals drawn so far, in walk order */
    for (int k = 0; k < m->n_tensors; k++) {
        const MhcTensor *t = &m->tensors[k];
        if (strncmp(t->name, "hc.", 3) == 0) break;          /* stream tensors come last */
        mhc_real *x = m->params + t->offset;
        long long size = (long long)t->size;
        if (t->ndim == 1) {
            for (long long i = 0; i < size; i++) x[i] = 1;
            continue;
        }
#pragma omp parallel for schedule(static)
        for (long long i = 0; i < size; i++) x[i] = (mhc_real)(c->init_std * mhc_rng_normal_at(seed, drawn + (uint64_t)i));
        drawn += (uint64_t)size;
    }
    uint64_t rng = seed + 2 * drawn * MHC_RNG_STEP;            /* the sequential stream, continued */
    int n = c->hc_mult, m_ = mhc_m(c);
    for (int s = 0; s < 2 * c->n_layers && c->residual != MHC_RESIDUAL_PLAIN; s++) {
        MhcStreamParams *q = &m->p.sub[s];
        int home = s % n;
        for (int g = 0; g < 3; g++) q->alpha[g] = (mhc_real)c->mhc_alpha_init;
        if (c->residual == MHC_RESIDUAL_HC) {
            memset(q->theta, 0, sizeof(mhc_real) * (size_t)(n + 2) * c->d_model);
            for (int i = 0; i < n; i++) {
                q->b_pre[i] = i == home;
                q->b_post[i] = 1;
                for (int j = 0; j < n; j++) q->b_res[i * n + j] = i == j;
            }
        } else if (c->mhc_init == MHC_INIT_IDENTITY) {
            memset(q->phi, 0, sizeof(mhc_real) * (size_t)m_ * n * c->d_model);
            for (int i = 0; i < n; i++) {
                q->b[i] = i == home ? 3 : -3;
                q->b[n + i] = 0;
                for (int j = 0; j < n; j++) q->b[2 * n + i * n + j] = i == j ? 3 : -3;
            }
        } else {
            for (int k = 0; k < m_; k++) q->b[k] = 0;
        }
    }
    /* uniform mHC init: phi is random (a zero phi is a symmetric fixed point), drawn last */
    for (int s = 0; s < 2 * c->n_layers && c->residual == MHC_RESIDUAL_MHC && c->mhc_init == MHC_INIT_UNIFORM; s++)
        for (size_t i = 0; i < (size_t)m_ * n * c->d_model; i++)
            m->p.sub[s].phi[i] = (mhc_real)(c->init_std * mhc_rng_normal(&rng));
    memset(m->expert_bias, 0, sizeof(mhc_real) * (size_t)c->n_layers * c->n_routed_experts);
    memset(m->adam_m, 0, sizeof(mhc_real) * m->n_params);
    memset(m->adam_v, 0, sizeof(mhc_real) * m->n_params);
    m->step = 0;
}

/* ---------------------------------------------------------------------------------------------
   3. Primitives. Every matrix product goes through strided_gemm: out[m][n] (+)= sum_k A(m,k) B(n,k),
      each operand read through a row and a column stride, so a transposed operand needs no copy.
      A task owns MHC_GEMM_ROWS rows x MHC_GEMM_NR columns of out. For each MHC_KCHUNK slice of k it
      copies its columns of B into a k-major panel, then builds MHC_GEMM_MR x MHC_GEMM_NR blocks of
      out in registers as sums of outer products: per k, MR values of A broadcast times one panel row.
      Each output is owned by one task and summed in k order, so results are deterministic and the
      same for any thread count.                                                                    */
#define MHC_KCHUNK 256        /* k per panel: 256 x 32 values, 32 KiB in float, stay in L1         */
#define MHC_GEMM_ROWS 1024    /* rows of out per task: each packed panel serves this many rows      */
#define MHC_GEMM_MR 6         /* register block of out: 6 x 32 accumulators, 12 AVX-512 registers  */
#define MHC_GEMM_NR 32
static int mhc_min(int a, int b) { return a < b ? a : b; }
static mhc_real mhc_sigmoid(mhc_real z) { return (mhc_real)(1.0 / (1.0 + exp(-(double)z))); }
/* exp(x) in float for x <= 0 (a logit minus its row's max), written out so that the softmax loop over
   V = 50257 logits vectorises: libm's expf is one call per element, and this softmax is the one place
   where exp is hot. exp(x) = 2^k exp(r) with k = round(x / ln 2) and r = x - k ln 2 in [-ln2/2, ln2/2]
   (ln 2 in two parts: k * 0.693359375 is exact, the rest is a correction); exp(r) by its Taylor series
   to r^7 (the remainder is below 6e-9 relatively); 2^k goes straight into the exponent bits. Checked
   against exp() for every float in (-87, 0]: at most 1 ulp from the correctly rounded value, as libm's
   expf, and 1.02e-7 relatively at worst. Below -87 it gives 0 (exp would give at most 1.6e-38, nothing
   next to the row's largest term, 1); NaN stays NaN. */
static float softmax_expf(float x) {
    float xc = x > -87.0f ? x : -87.0f;                      /* NaN too: xc is finite from here on */
    float k = rintf(xc * 1.44269504f);                      /* x / ln 2, rounded: in [-126, 0] */
    float r = (xc - k * 0.693359375f) - k * -2.12194440e-4f;
    float e_r = 1 + r * (1 + r * (1.0f / 2 + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 +
                    r * (1.0f / 720 + r * (1.0f / 5040)))))));     /* Horner: 1 + r + r^2/2! + ... + r^7/7! */
    union { int32_t bits; float value; } two_k = {((int32_t)k + 127) << 23};   /* biased exponent, zero mantissa */
    return x > -87.0f ? e_r * two_k.value : (x != x ? x : 0.0f);
}

/* exp in the working precision for the softmax over the vocabulary (x <= 0) */
static mhc_real mhc_exp(mhc_real x) {
    return sizeof(mhc_real) == sizeof(float) ? (mhc_real)softmax_expf((float)x) : (mhc_real)exp((double)x);
}

/* packed[k][j] = B(n0 + j, k0 + k) for k < kc, j < cols; zero for the columns past the right edge.
   The inner loop walks B along its smaller stride: a weight W[O][Ci] read as B(n,k) = W[n][k] is
   contiguous in k, an activation read as B(n,k) = X[k][n] is contiguous in n. */
static void gemm_pack_panel(mhc_real *packed, const mhc_real *B, size_t b_n, size_t b_k, int n0, int cols, int k0, int kc) {
    const mhc_real *b = B + (size_t)n0 * b_n + (size_t)k0 * b_k;
    if (b_k < b_n) {
        for (int j = 0; j < MHC_GEMM_NR; j++)
            for (int k = 0; k < kc; k++) packed[(size_t)k * MHC_GEMM_NR + j] = j < cols ? b[(size_t)j * b_n + (size_t)k * b_k] : 0;
    } else {
        for (int k = 0; k < kc; k++)
            for (int j = 0; j < MHC_GEMM_NR; j++) packed[(size_t)k * MHC_GEMM_NR + j] = j < cols ? b[(size_t)j * b_n + (size_t)k * b_k] : 0;
    }
}

/* out[r][j] (+)= sum_k A(r, k) packed[k][j] for r < rows, j < cols. Rows past the bottom edge read
   row 0 and are not stored. */
static void gemm_block(mhc_real *out, size_t ldo, const mhc_real *A, size_t a_m, size_t a_k, const mhc_real *packed,
                       int kc, int rows, int cols, int add) {
    const mhc_real *a_row[MHC_GEMM_MR];
    for (int r = 0; r < MHC_GEMM_MR; r++) a_row[r] = A + (size_t)(r < rows ? r : 0) * a_m;
    mhc_real acc[MHC_GEMM_MR][MHC_GEMM_NR] = {{0}};
    for (int k = 0; k < kc; k++) {
        const mhc_real *p = packed + (size_t)k * MHC_GEMM_NR;
        for (int r = 0; r < MHC_GEMM_MR; r++) {
            mhc_real a = a_row[r][(size_t)k * a_k];
#pragma omp simd
            for (int j = 0; j < MHC_GEMM_NR; j++) acc[r][j] += a * p[j];
        }
    }
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < cols; j++) out[r * ldo + j] = (add ? out[r * ldo + j] : 0) + acc[r][j];
}

/* out[M,N] (+)= A B^T with A(m,k) = A[m a_m + k a_k], B(n,k) = B[n b_n + k b_k]  (add = 0 overwrites) */
static void strided_gemm(mhc_real *out, const mhc_real *A, size_t a_m, size_t a_k, const mhc_real *B, size_t b_n, size_t b_k,
                         int M, int N, int K, int add) {
#pragma omp parallel
    {
        mhc_real *packed = (mhc_real *)mhc_calloc((size_t)MHC_KCHUNK * MHC_GEMM_NR, sizeof(mhc_real));
#pragma omp for collapse(2) schedule(dynamic)
        for (int n0 = 0; n0 < N; n0 += MHC_GEMM_NR)
            for (int m0 = 0; m0 < M; m0 += MHC_GEMM_ROWS) {
                int m1 = mhc_min(m0 + MHC_GEMM_ROWS, M), cols = mhc_min(MHC_GEMM_NR, N - n0);
                for (int k0 = 0; k0 < K || k0 == 0; k0 += MHC_KCHUNK) {    /* K = 0 still writes the zeros */
                    int kc = mhc_min(MHC_KCHUNK, K - k0), first = k0 == 0 && !add;
                    gemm_pack_panel(packed, B, b_n, b_k, n0, cols, k0, kc);
                    for (int m = m0; m < m1; m += MHC_GEMM_MR)
                        gemm_block(out + (size_t)m * N + n0, (size_t)N, A + m * a_m + k0 * a_k, a_m, a_k, packed, kc,
                                   mhc_min(MHC_GEMM_MR, m1 - m), cols, !first);
                    if (K == 0) break;
                }
            }
        free(packed);
    }
}

/* out[N,O] = in[N,Ci] @ W[O,Ci]^T   (y = W @ x for each row) */
static void matmul_forward(mhc_real *out, const mhc_real *in, const mhc_real *W, int N, int Ci, int O) {
    strided_gemm(out, in, (size_t)Ci, 1, W, (size_t)Ci, 1, N, O, Ci, 0);
}

/* din[N,Ci] += dout[N,O] @ W[O,Ci]   (din may be NULL);   dW[O,Ci] += dout^T @ in   (dW may be NULL),
   summed over the N rows in order. Small N (one token's expert): plain row updates. */
static void matmul_backward(mhc_real *din, mhc_real *dW, const mhc_real *dout, const mhc_real *in,
                            const mhc_real *W, int N, int Ci, int O) {
    if (N < 16) {
        for (int n = 0; n < N; n++)
            for (int o = 0; o < O; o++) {
                mhc_real d = dout[(size_t)n * O + o];
                const mhc_real *w = W + (size_t)o * Ci, *x = in + (size_t)n * Ci;
                mhc_real *dx = din ? din + (size_t)n * Ci : NULL, *dw = dW ? dW + (size_t)o * Ci : NULL;
                if (dx)
                    for (int i = 0; i < Ci; i++) dx[i] += d * w[i];
                if (dw)
                    for (int i = 0; i < Ci; i++) dw[i] += d * x[i];
            }
        return;
    }
    if (din) strided_gemm(din, dout, (size_t)O, 1, W, 1, (size_t)Ci, N, Ci, O, 1);      /* din(n, i) += sum_o dout(n, o) W(o, i) */
    if (dW) strided_gemm(dW, dout, 1, (size_t)O, in, 1, (size_t)Ci, O, Ci, N, 1);       /* dW(o, i) += sum_n dout(n, o) in(n, i) */
}

/* SPEC §8: y = g * x * r,  r = (mean(x^2) + eps)^(-1/2); in, out [N,D]; rstd [N] */
static void rmsnorm_forward(mhc_real *out, mhc_real *rstd, const mhc_real *in, const mhc_real *g, int N, int D, double eps) {
#pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const mhc_real *x = in + (size_t)n * D;
        double ss = 0;
        for (int i = 0; i < D; i++) ss += (double)x[i] * x[i];
        mhc_real r = (mhc_real)(1.0 / sqrt(ss / D + eps));
        rstd[n] = r;
        for (int i = 0; i < D; i++) out[(size_t)n * D + i] = g[i] * x[i] * r;
    }
}

/* dx += r*(g*dy) - (r^3/D) * x * sum(g*dy*x);   dg += sum over rows of dy*x*r */
static void rmsnorm_backward(mhc_real *din, mhc_real *dg, const mhc_real *dout, const mhc_real *in,
                             const mhc_real *g, const mhc_real *rstd, int N, int D) {
#pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const mhc_real *x = in + (size_t)n * D, *dy = dout + (size_t)n * D;
        mhc_real r = rstd[n];
        double dot = 0;
        for (int i = 0; i < D; i++) dot += (double)g[i] * dy[i] * x[i];
        mhc_real k = (mhc_real)(dot * r * r * r / D);
        for (int i = 0; i < D; i++) din[(size_t)n * D + i] += r * g[i] * dy[i] - k * x[i];
    }
    for (int n = 0; n < N; n++) {          /* rows in order: deterministic */
        const mhc_real *x = in + (size_t)n * D, *dy = dout + (size_t)n * D;
        for (int i = 0; i < D; i++) dg[i] += dy[i] * x[i] * rstd[n];
    }
}

/* SPEC §9 RoPE on adjacent pairs (2i, 2i+1) of x [d_r] at position pos; transpose = 1 applies R^T
   (the backward). */
void mhc_rope(mhc_real *x, int d_r, int pos, double theta, int transpose) {
    for (int i = 0; i < d_r / 2; i++) {
        double ang = pos * pow(theta, -2.0 * i / d_r);
        double cs = cos(ang), sn = transpose ? -sin(ang) : sin(ang);
        double a = x[2 * i], b = x[2 * i + 1];
        x[2 * i] = (mhc_real)(a * cs - b * sn);
        x[2 * i + 1] = (mhc_real)(a * sn + b * cs);
    }
}

/* SPEC §8 SwiGLU middle: hd = silu(a) * g, elementwise over count values */
static void swiglu_forward(mhc_real *hd, const mhc_real *a, const mhc_real *g, size_t count) {
    for (size_t i = 0; i < count; i++) hd[i] = a[i] * mhc_sigmoid(a[i]) * g[i];
}

/* da = dhd * g * sig(a) * (1 + a*(1 - sig(a)));  dg = dhd * silu(a)   (overwrite) */
static void swiglu_backward(mhc_real *da, mhc_real *dg, const mhc_real *dhd, const mhc_real *a, const mhc_real *g, size_t count) {
    for (size_t i = 0; i < count; i++) {
        mhc_real s = mhc_sigmoid(a[i]);
        da[i] = dhd[i] * g[i] * s * (1 + a[i] * (1 - s));
        dg[i] = dhd[i] * a[i] * s;
    }
}

/* SPEC §8 cross-entropy. logits [N,V] are replaced by probabilities; losses [N] */
static void crossentropy_forward(mhc_real *losses, mhc_real *logits, const int *targets, int N, int V) {
#pragma omp parallel for
    for (int n = 0; n < N; n++) {
        mhc_real *p = logits + (size_t)n * V;
        mhc_real mx = -INFINITY;
#pragma omp simd reduction(max : mx)
        for (int v = 0; v < V; v++) mx = p[v] > mx ? p[v] : mx;
        mhc_real target_logit = targets ? p[targets[n]] : 0;
#pragma omp simd
        for (int v = 0; v < V; v++) p[v] = mhc_exp(p[v] - mx);
        double sum = 0;           /* simd: several partial sums, not one chain of V dependent adds */
#pragma omp simd reduction(+ : sum)
        for (int v = 0; v < V; v++) sum += p[v];
        mhc_real inv = (mhc_real)(1.0 / sum);
#pragma omp simd
        for (int v = 0; v < V; v++) p[v] *= inv;
        losses[n] = targets ? (mhc_real)(log(sum) - (double)(target_logit - mx)) : 0;   /* log-sum-exp form */
    }
}

/* probs [N,V] -> dlogits in place: (p - onehot(tgt)) * scale,  scale = 1/N_tok */
static void crossentropy_backward(mhc_real *probs, const int *targets, int N, int V, mhc_real scale) {
#pragma omp parallel for
    for (int n = 0; n < N; n++) {
        mhc_real *p = probs + (size_t)n * V;
        for (int v = 0; v < V; v++) p[v] *= scale;
        p[targets[n]] -= scale;
    }
}

/* ---------------------------------------------------------------------------------------------
   4. Residual streams. Per token: X [n,C] -> coefficients (H_pre [n], H_post [n], H_res [n,n],
      stored together as H [m] = [pre | post | res]) -> y = H_pre @ X -> branch f = F(y) ->
      X' = H_res @ X + H_post^T f. `plain` runs the same code with n = 1 and H = [1 | 1 | 1].   */

/* SPEC §4 Sinkhorn-Knopp, rows last: exp(Lam - column max), then t_max x (column step, row step).
   Lam, H [n,n]. Arithmetic in double (n^2 values; fp32 at least, SPEC §0). */
void mhc_sinkhorn_forward(mhc_real *H, const mhc_real *Lam, int n, int iters, double eps) {
    double M[256];
    for (int j = 0; j < n; j++) {
        double mu = Lam[j];
        for (int i = 1; i < n; i++) mu = Lam[i * n + j] > mu ? Lam[i * n + j] : mu;
        for (int i = 0; i < n; i++) M[i * n + j] = exp(Lam[i * n + j] - mu);
    }
    for (int t = 0; t < iters; t++) {
        for (int j = 0; j < n; j++) {               /* column step: M[:, j] /= (column sum + eps) */
            double c = 0;
            for (int i = 0; i < n; i++) c += M[i * n + j];
            double inv = 1 / (c + eps);
            for (int i = 0; i < n; i++) M[i * n + j] *= inv;
        }
        for (int i = 0; i < n; i++) {               /* row step: M[i, :] /= (row sum + eps) */
            double r = 0;
            for (int j = 0; j < n; j++) r += M[i * n + j];
            double inv = 1 / (r + eps);
            for (int j = 0; j < n; j++) M[i * n + j] *= inv;
        }
    }
    for (int k = 0; k < n * n; k++) H[k] = (mhc_real)M[k];
}

/* SPEC §5.6: the exact derivative of the truncated iteration. Replays the forward from Lam,
   keeping every step's output and sums (the tape), then walks the steps in reverse.
   dLam = (not accumulated) gradient w.r.t. Lam, from dH = gradient w.r.t. H_res. */
void mhc_sinkhorn_backward(mhc_real *dLam, const mhc_real *dH, const mhc_real *Lam, int n, int iters, double eps) {
    int nn = n * n, steps = 2 * iters;
    double *Y = (double *)mhc_calloc((size_t)(steps + 1) * nn, sizeof(double));   /* Y[0] = M_0, Y[k] after step k */
    double *sums = (double *)mhc_calloc((size_t)steps * n, sizeof(double));
    int am[16];
    for (int j = 0; j < n; j++) {
        double mu = Lam[j];
        am[j] = 0;
        for (int i = 1; i < n; i++) if (Lam[i * n + j] > mu) { mu = Lam[i * n + j]; am[j] = i; }
        for (int i = 0; i < n; i++) Y[i * n + j] = exp(Lam[i * n + j] - mu);
    }
    for (int k = 0; k < steps; k++) {
        const double *in = Y + (size_t)k * nn;
        double *out = Y + (size_t)(k + 1) * nn, *s = sums + (size_t)k * n;
        int column = k % 2 == 0;
        for (int a = 0; a < n; a++) {
            double sum = 0;
            for (int b = 0; b < n; b++) sum += column ? in[b * n + a] : in[a * n + b];
            s[a] = sum;
            double inv = 1 / (sum + eps);
            for (int b = 0; b < n; b++) {
                int idx = column ? b * n + a : a * n + b;
                out[idx] = in[idx] * inv;
            }
        }
    }
    double G[256];
    for (int k = 0; k < nn; k++) G[k] = dH[k];
    for (int k = steps - 1; k >= 0; k--) {          /* Y_out = Y_in/(s+eps): dY_in = (G - sum(G*Y_out))/(s+eps) */
        const double *out = Y + (size_t)(k + 1) * nn, *s = sums + (size_t)k * n;
        int column = k % 2 == 0;
        for (int a = 0; a < n; a++) {
            double dot = 0;
            for (int b = 0; b < n; b++) {
                int idx = column ? b * n + a : a * n + b;
                dot += G[idx] * out[idx];
            }
            double inv = 1 / (s[a] + eps);
            for (int b = 0; b < n; b++) {
                int idx = column ? b * n + a : a * n + b;
                G[idx] = (G[idx] - dot) * inv;
            }
        }
    }
    for (int j = 0; j < n; j++) {                   /* exp with the column-max shift */
        double shift = 0;
        for (int i = 0; i < n; i++) {
            double d = G[i * n + j] * Y[i * n + j];
            dLam[i * n + j] = (mhc_real)d;
            shift += d;
        }
        dLam[am[j] * n + j] -= (mhc_real)shift;
    }
    free(Y);
    free(sums);
}

/* SPEC §4 per token. x = vec(X) [nC], h = phi @ x [m] (computed for all tokens by one GEMM).
   Writes a [m], H [m] and r. */
static void mhc_coeffs_forward(mhc_real *H, mhc_real *a, mhc_real *r_out, const mhc_real *h, const mhc_real *x,
                               const MhcStreamParams *q, const MhcConfig *c) {
    int n = c->hc_mult, nC = n * c->d_model, m = mhc_m(c);
    double S = 0;
#pragma omp simd reduction(+ : S)
    for (int k = 0; k < nC; k++) S += (double)x[k] * x[k];
    double r = 1.0 / sqrt(S / nC + c->rms_eps);
    for (int k = 0; k < m; k++) {
        int grp = k < n ? 0 : k < 2 * n ? 1 : 2;
        a[k] = (mhc_real)(q->alpha[grp] * r * h[k] + q->b[k]);
    }
    for (int j = 0; j < n; j++) H[j] = mhc_sigmoid(a[j]);
    for (int i = 0; i < n; i++) H[n + i] = 2 * mhc_sigmoid(a[n + i]);
    mhc_sinkhorn_forward(H + 2 * n, a + 2 * n, n, c->sinkhorn_iters, c->sinkhorn_eps);
    *r_out = (mhc_real)r;
}

/* SPEC §5.4 per token, given dH [m]. Writes da [m]; dx += 2 x dS (the RMS part of PATH 3);
   the phi part of PATH 3 and dphi come from one GEMM over all tokens afterwards. */
static void mhc_coeffs_backward(mhc_real *da, mhc_real *dx, const mhc_real *dH, const mhc_real *H, const mhc_real *a,
                                const mhc_real *h, mhc_real r, const mhc_real *x, const MhcStreamParams *q,
                                const MhcConfig *c) {
    int n = c->hc_mult, nC = n * c->d_model, m = mhc_m(c);
    for (int j = 0; j < n; j++) da[j] = dH[j] * H[j] * (1 - H[j]);
    for (int i = 0; i < n; i++) da[n + i] = dH[n + i] * H[n + i] * (1 - H[n + i] / 2);
    mhc_sinkhorn_backward(da + 2 * n, dH + 2 * n, a + 2 * n, n, c->sinkhorn_iters, c->sinkhorn_eps);
    double dr = 0;
    for (int k = 0; k < m; k++) dr += (double)da[k] * q->alpha[k < n ? 0 : k < 2 * n ? 1 : 2] * h[k];
    double dS = dr * (-(double)r * r * r / (2.0 * nC));
    for (int k = 0; k < nC; k++) dx[k] += (mhc_real)(2.0 * x[k] * dS);
}

/* SPEC §4/§5.4 for all N tokens of sublayer s: coefficients forward */
static void mhc_stream_coeffs_forward(MhcModel *md, MhcActs *A, int s, int N) {
    const MhcConfig *c = &md->cfg;
    int n = c->hc_mult, C = c->d_model, m = mhc_m(c);
    const mhc_real *X = A->X + (size_t)s * N * n * C;
    mhc_real *h = A->coef_h + (size_t)s * N * m, *a = A->coef_a + (size_t)s * N * m;
    mhc_real *H = A->coef_H + (size_t)s * N * m, *r = A->coef_r + (size_t)s * N * n;
    matmul_forward(h, X, md->p.sub[s].phi, N, n * C, m);
#pragma omp parallel for
    for (int t = 0; t < N; t++)
        mhc_coeffs_forward(H + (size_t)t * m, a + (size_t)t * m, r + (size_t)t * n, h + (size_t)t * m,
                           X + (size_t)t * n * C, &md->p.sub[s], c);
}

static void mhc_stream_coeffs_backward(MhcModel *md, MhcActs *A, int s, int N, const mhc_real *dH, mhc_real *dX) {
    const MhcConfig *c = &md->cfg;
    int n = c->hc_mult, C = c->d_model, m = mhc_m(c);
    const mhc_real *X = A->X + (size_t)s * N * n * C;
    const mhc_real *h = A->coef_h + (size_t)s * N * m, *a = A->coef_a + (size_t)s * N * m;
    const mhc_real *H = A->coef_H + (size_t)s * N * m, *r = A->coef_r + (size_t)s * N * n;
    const MhcStreamParams *q = &md->p.sub[s];
    MhcStreamParams *gq = &md->g.sub[s];
    mhc_real *da = A->dcoef;
#pragma omp parallel for
    for (int t = 0; t < N; t++)
        mhc_coeffs_backward(da + (size_t)t * m, dX + (size_t)t * n * C, dH + (size_t)t * m, H + (size_t)t * m,
                            a + (size_t)t * m, h + (size_t)t * m, r[(size_t)t * n], X + (size_t)t * n * C, q, c);
    for (int t = 0; t < N; t++)                      /* db, dalpha: summed over tokens in order */
        for (int k = 0; k < m; k++) {
            int grp = k < n ? 0 : k < 2 * n ? 1 : 2;
            gq->b[k] += da[(size_t)t * m + k];
            gq->alpha[grp] += da[(size_t)t * m + k] * r[(size_t)t * n] * h[(size_t)t * m + k];
        }
#pragma omp parallel for
    for (int t = 0; t < N; t++)                      /* dh = da * alpha[grp] * r, in place */
        for (int k = 0; k < m; k++) da[(size_t)t * m + k] *= q->alpha[k < n ? 0 : k < 2 * n ? 1 : 2] * r[(size_t)t * n];
    matmul_backward(dX, gq->phi, da, X, q->phi, N, n * C, m);
}

/* SPEC §6 HC coefficients. Xt [N,n,C] = X * rs (per stream); t = tanh(theta @ Xt[j]) stored per
   stream j as [pre, post, res_0..res_{n-1}] (n+2 values) in coef_a. */
static void hc_normalise_streams(mhc_real *Xt, mhc_real *rs, const mhc_real *X, int N, int n, int C, double eps) {
#pragma omp parallel for
    for (int tj = 0; tj < N * n; tj++) {
        const mhc_real *x = X + (size_t)tj * C;
        double ss = 0;
        for (int k = 0; k < C; k++) ss += (double)x[k] * x[k];
        mhc_real r = (mhc_real)(1.0 / sqrt(ss / C + eps));
        rs[tj] = r;
        for (int k = 0; k < C; k++) Xt[(size_t)tj * C + k] = x[k] * r;
    }
}

static void hc_stream_coeffs_forward(MhcModel *md, MhcActs *A, int s, int N) {
    const MhcConfig *c = &md->cfg;
    int n = c->hc_mult, C = c->d_model, m = mhc_m(c);
    const MhcStreamParams *q = &md->p.sub[s];
    mhc_real *tv = A->coef_a + (size_t)s * N * m, *H = A->coef_H + (size_t)s * N * m;
    mhc_real *rs = A->coef_r + (size_t)s * N * n;
    hc_normalise_streams(A->Xt, rs, A->X + (size_t)s * N * n * C, N, n, C, c->rms_eps);
    matmul_forward(tv, A->Xt, q->theta, N * n, C, n + 2);   /* [N*n, n+2] = [N, m] */
#pragma omp parallel for
    for (int t = 0; t < N; t++) {
        mhc_real *tt = tv + (size_t)t * m, *Ht = H + (size_t)t * m;
        for (int k = 0; k < m; k++) tt[k] = (mhc_real)tanh((double)tt[k]);
        for (int j = 0; j < n; j++) {
            const mhc_real *tj = tt + j * (n + 2);
            Ht[j] = q->alpha[0] * tj[0] + q->b_pre[j];
            Ht[n + j] = q->alpha[1] * tj[1] + q->b_post[j];
            for (int i = 0; i < n; i++) Ht[2 * n + i * n + j] = q->alpha[2] * tj[2 + i] + q->b_res[i * n + j];
        }
    }
}

static void hc_stream_coeffs_backward(MhcModel *md, MhcActs *A, int s, int N, const mhc_real *dH, mhc_real *dX) {
    const MhcConfig *c = &md->cfg;
    int n = c->hc_mult, C = c->d_model, m = mhc_m(c);
    const MhcStreamParams *q = &md->p.sub[s];
    MhcStreamParams *gq = &md->g.sub[s];
    const mhc_real *tv = A->coef_a + (size_t)s * N * m, *rs = A->coef_r + (size_t)s * N * n;
    mhc_real *dproj = A->dcoef;                      /* [N, n, n+2] */
    for (int t = 0; t < N; t++) {                    /* in token order: deterministic b/alpha sums */
        const mhc_real *tt = tv + (size_t)t * m, *dHt = dH + (size_t)t * m;
        mhc_real *dp = dproj + (size_t)t * m;
        for (int j = 0; j < n; j++) {
            const mhc_real *tj = tt + j * (n + 2);
            mhc_real *dpj = dp + j * (n + 2);
            dpj[0] = dHt[j] * q->alpha[0] * (1 - tj[0] * tj[0]);
            gq->alpha[0] += dHt[j] * tj[0];
            gq->b_pre[j] += dHt[j];
            dpj[1] = dHt[n + j] * q->alpha[1] * (1 - tj[1] * tj[1]);
            gq->alpha[1] += dHt[n + j] * tj[1];
            gq->b_post[j] += dHt[n + j];
            for (int i = 0; i < n; i++) {
                mhc_real d = dHt[2 * n + i * n + j];
                dpj[2 + i] = d * q->alpha[2] * (1 - tj[2 + i] * tj[2 + i]);
                gq->alpha[2] += d * tj[2 + i];
                gq->b_res[i * n + j] += d;
            }
        }
    }
    mhc_real *Xt = A->Xt, *dXt = A->dXt;
    const mhc_real *X = A->X + (size_t)s * N * n * C;
    for (int tj = 0; tj < N * n; tj++)               /* recompute Xt from X and the saved rs */
        for (int k = 0; k < C; k++) Xt[(size_t)tj * C + k] = X[(size_t)tj * C + k] * rs[tj];
    memset(dXt, 0, sizeof(mhc_real) * (size_t)N * n * C);
    matmul_backward(dXt, gq->theta, dproj, Xt, q->theta, N * n, C, n + 2);
#pragma omp parallel for
    for (int tj = 0; tj < N * n; tj++) {             /* PATH 3: per-stream RMS backward */
        const mhc_real *xt = Xt + (size_t)tj * C, *dxt = dXt + (size_t)tj * C;
        double dot = 0;
        for (int k = 0; k < C; k++) dot += (double)dxt[k] * xt[k];
        for (int k = 0; k < C; k++) dX[(size_t)tj * C + k] += rs[tj] * (dxt[k] - xt[k] * (mhc_real)(dot / C));
    }
}

/* SPEC §3: y = H_pre @ X for each token. X [N,n,C], H [N,m], y [N,C] */
static void stream_pre_forward(mhc_real *y, const mhc_real *H, const mhc_real *X, int N, int n, int C, int m) {
#pragma omp parallel for
    for (int t = 0; t < N; t++) {
        const mhc_real *Xt = X + (size_t)t * n * C, *Hp = H + (size_t)t * m;
        mhc_real *yt = y + (size_t)t * C;
        for (int k = 0; k < C; k++) yt[k] = 0;
        for (int j = 0; j < n; j++)
            for (int k = 0; k < C; k++) yt[k] += Hp[j] * Xt[j * C + k];
    }
}

/* SPEC §5.3: dH_pre[j] = dy . X[j];  dX[j] += H_pre[j] * dy  (PATH 2) */
static void stream_pre_backward(mhc_real *dX, mhc_real *dH, const mhc_real *dy, const mhc_real *H, const mhc_real *X,
                                int N, int n, int C, int m) {
#pragma omp parallel for
    for (int t = 0; t < N; t++) {
        const mhc_real *Xt = X + (size_t)t * n * C, *dyt = dy + (size_t)t * C;
        for (int j = 0; j < n; j++) {
            double d = 0;
#pragma omp simd reduction(+ : d)
            for (int k = 0; k < C; k++) {
                d += (double)dyt[k] * Xt[j * C + k];
                dX[(size_t)t * n * C + j * C + k] += H[(size_t)t * m + j] * dyt[k];
            }
            dH[(size_t)t * m + j] = (mhc_real)d;
        }
    }
}

/* SPEC §3: X'[i] = sum_j H_res[i][j] X[j] + H_post[i] f */
static void stream_merge_forward(mhc_real *Xo, const mhc_real *H, const mhc_real *X, const mhc_real *f, int N, int n, int C, int m) {
#pragma omp parallel for
    for (int t = 0; t < N; t++) {
        const mhc_real *Xt = X + (size_t)t * n * C, *ft = f + (size_t)t * C, *Ht = H + (size_t)t * m;
        mhc_real *Xot = Xo + (size_t)t * n * C;
        for (int i = 0; i < n; i++) {
            mhc_real *xo = Xot + i * C;
            for (int k = 0; k < C; k++) xo[k] = Ht[n + i] * ft[k];
            for (int j = 0; j < n; j++) {
                mhc_real hr = Ht[2 * n + i * n + j];
                for (int k = 0; k < C; k++) xo[k] += hr * Xt[j * C + k];
            }
        }
    }
}

/* SPEC §5.1: dH_res, dH_post into dH; df = H_post^T dX' (overwrite); dX = H_res^T dX' (PATH 1, overwrite) */
static void stream_merge_backward(mhc_real *dX, mhc_real *df, mhc_real *dH, const mhc_real *dXo, const mhc_real *H,
                                  const mhc_real *X, const mhc_real *f, int N, int n, int C, int m) {
#pragma omp parallel for
    for (int t = 0; t < N; t++) {
        const mhc_real *dXot = dXo + (size_t)t * n * C, *Xt = X + (size_t)t * n * C, *ft = f + (size_t)t * C;
        const mhc_real *Ht = H + (size_t)t * m;
        mhc_real *dHt = dH + (size_t)t * m, *dft = df + (size_t)t * C, *dXt = dX + (size_t)t * n * C;
        for (int k = 0; k < C; k++) dft[k] = 0;
        for (int k = 0; k < n * C; k++) dXt[k] = 0;
        for (int i = 0; i < n; i++) {
            const mhc_real *g = dXot + i * C;
            double dpost = 0;        /* simd: partial sums, not one chain of C dependent adds */
#pragma omp simd reduction(+ : dpost)
            for (int k = 0; k < C; k++) { dpost += (double)g[k] * ft[k]; dft[k] += Ht[n + i] * g[k]; }
            dHt[n + i] = (mhc_real)dpost;
            for (int j = 0; j < n; j++) {
                double dres = 0;
                mhc_real hr = Ht[2 * n + i * n + j];
#pragma omp simd reduction(+ : dres)
                for (int k = 0; k < C; k++) { dres += (double)g[k] * Xt[j * C + k]; dXt[j * C + k] += hr * g[k]; }
                dHt[2 * n + i * n + j] = (mhc_real)dres;
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------
   5. MLA (SPEC §9 training/prefill, §10 absorbed decode).                                       */

/* Projections shared by training and decode: q (optionally through the q latent), the KV latent c
   with its RMSNorm, k_pe, and RoPE at position pos0 + (t mod T). u [N,C]. with_kv: also kv = W_ukv c,
   which training and prefill attend over; absorbed decode (SPEC §10) folds W_ukv into q and o instead. */
static void mla_project(MhcModel *md, MhcActs *A, int l, const mhc_real *u, int N, int T, int pos0, int with_kv) {
    const MhcConfig *c = &md->cfg;
    const MhcBlock *b = &md->p.blk[l];
    int C = c->d_model, H = c->n_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim;
    int dqk = dn + dr, dq = c->q_lora_rank, dc = c->kv_lora_rank, dv = c->v_head_dim;
    mhc_real *q = A->q + (size_t)l * N * H * dqk;
    if (dq == 0) {
        matmul_forward(q, u, b->wq, N, C, H * dqk);
    } else {
        mhc_real *cq_raw = A->cq_raw + (size_t)l * N * dq, *cq = A->cq + (size_t)l * N * dq;
        matmul_forward(cq_raw, u, b->wdq, N, C, dq);
        rmsnorm_forward(cq, A->cq_rstd + (size_t)l * N, cq_raw, b->q_norm, N, dq, c->rms_eps);
        matmul_forward(q, cq, b->wuq, N, dq, H * dqk);
    }
    mhc_real *c_raw = A->c_raw + (size_t)l * N * dc, *lat = A->c + (size_t)l * N * dc;
    mhc_real *kpe = A->kpe + (size_t)l * N * dr;
    matmul_forward(c_raw, u, b->wdkv, N, C, dc);                    /* rows [0, d_c) of W_dkv   */
    matmul_forward(kpe, u, b->wdkv + (size_t)dc * C, N, C, dr);     /* rows [d_c, d_c+d_r)      */
    rmsnorm_forward(lat, A->c_rstd + (size_t)l * N, c_raw, b->kv_norm, N, dc, c->rms_eps);
    if (with_kv) matmul_forward(A->kv + (size_t)l * N * H * (dn + dv), lat, b->wukv, N, dc, H * (dn + dv));
#pragma omp parallel for
    for (int t = 0; t < N; t++) {
        int pos = pos0 + t % T;
        for (int h = 0; h < H; h++) mhc_rope(q + (size_t)t * H * dqk + h * dqk + dn, dr, pos, c->rope_theta, 0);
        mhc_rope(kpe + (size_t)t * dr, dr, pos, c->rope_theta, 0);
    }
}

/* Causal attention, Q[h] = [q_nope | q_pe], K[h] = [k_nope | k_pe] with ONE k_pe per token for all
   heads. q [N,H*d_qk], kv [N,H*(d_n+d_v)], kpe [N,d_r] -> att [B,H,T,T], o [N,H*d_v]. */
static void attention_forward(mhc_real *o, mhc_real *att, const mhc_real *q, const mhc_real *kv, const mhc_real *kpe,
                              int B, int T, const MhcConfig *c) {
    int H = c->n_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim, dv = c->v_head_dim, dqk = dn + dr;
    double scale = 1.0 / sqrt((double)dqk);
#pragma omp parallel for collapse(3)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                const mhc_real *Q = q + ((size_t)b * T + t) * H * dqk + h * dqk;
                mhc_real *P = att + (((size_t)b * H + h) * T + t) * T;
                double mx = -INFINITY, sum = 0;
                for (int s = 0; s <= t; s++) {
                    const mhc_real *Kn = kv + ((size_t)b * T + s) * H * (dn + dv) + h * (dn + dv);
                    const mhc_real *Kp = kpe + ((size_t)b * T + s) * dr;
                    mhc_real dot = 0;
#pragma omp simd reduction(+ : dot)
                    for (int i = 0; i < dn; i++) dot += Q[i] * Kn[i];
#pragma omp simd reduction(+ : dot)
                    for (int i = 0; i < dr; i++) dot += Q[dn + i] * Kp[i];
                    P[s] = (mhc_real)(dot * scale);
                    mx = P[s] > mx ? P[s] : mx;
                }
                for (int s = 0; s <= t; s++) { P[s] = (mhc_real)exp(P[s] - mx); sum += P[s]; }
                for (int s = 0; s <= t; s++) P[s] = (mhc_real)(P[s] / sum);
                for (int s = t + 1; s < T; s++) P[s] = 0;
                mhc_real *ot = o + ((size_t)b * T + t) * H * dv + h * dv;
                for (int i = 0; i < dv; i++) ot[i] = 0;
                for (int s = 0; s <= t; s++) {
                    const mhc_real *v = kv + ((size_t)b * T + s) * H * (dn + dv) + h * (dn + dv) + dn;
                    for (int i = 0; i < dv; i++) ot[i] += P[s] * v[i];
                }
            }
}

/* SPEC §9 backward of the attention core: dq, dkv (k_nope and v parts) are overwritten; the k_pe
   gradient of each head goes to dkpe_h [N,H,d_r] (summed over heads by the caller). */
static void attention_backward(mhc_real *dq, mhc_real *dkv, mhc_real *dkpe_h, const mhc_real *dout, const mhc_real *o,
                               const mhc_real *att, const mhc_real *q, const mhc_real *kv, const mhc_real *kpe,
                               int B, int T, const MhcConfig *c) {
    int H = c->n_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim, dv = c->v_head_dim, dqk = dn + dr;
    mhc_real scale = (mhc_real)(1.0 / sqrt((double)dqk));
    int N = B * T;
    memset(dq, 0, sizeof(mhc_real) * (size_t)N * H * dqk);
    memset(dkv, 0, sizeof(mhc_real) * (size_t)N * H * (dn + dv));
    memset(dkpe_h, 0, sizeof(mhc_real) * (size_t)N * H * dr);
#pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++)             /* each (b,h) writes only its own slices */
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                size_t bt = (size_t)b * T + t;
                const mhc_real *Q = q + bt * H * dqk + h * dqk, *P = att + (((size_t)b * H + h) * T + t) * T;
                const mhc_real *dot_ = dout + bt * H * dv + h * dv, *ot = o + bt * H * dv + h * dv;
                mhc_real *dQ = dq + bt * H * dqk + h * dqk;
                double Dt = 0;
                for (int i = 0; i < dv; i++) Dt += (double)dot_[i] * ot[i];
                for (int s = 0; s <= t; s++) {
                    size_t bs = (size_t)b * T + s;
                    const mhc_real *Kn = kv + bs * H * (dn + dv) + h * (dn + dv), *Kp = kpe + bs * dr, *v = Kn + dn;
                    mhc_real *dKn = dkv + bs * H * (dn + dv) + h * (dn + dv), *dv_ = dKn + dn;
                    mhc_real *dKp = dkpe_h + bs * H * dr + h * dr;
                    mhc_real dP = 0;
#pragma omp simd reduction(+ : dP)
                    for (int i = 0; i < dv; i++) dP += dot_[i] * v[i];
                    mhc_real dSc = (mhc_real)(P[s] * (dP - Dt)) * scale;
                    for (int i = 0; i < dv; i++) dv_[i] += P[s] * dot_[i];
                    for (int i = 0; i < dn; i++) { dQ[i] += dSc * Kn[i]; dKn[i] += dSc * Q[i]; }
                    for (int i = 0; i < dr; i++) { dQ[dn + i] += dSc * Kp[i]; dKp[i] += dSc * Q[dn + i]; }
                }
            }
}

/* training / prefill: out [N,C] = MLA(u) */
static void mla_forward(MhcModel *md, MhcActs *A, int l, const mhc_real *u, mhc_real *out, int B, int T) {
    const MhcConfig *c = &md->cfg;
    int N = B * T, C = c->d_model, H = c->n_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim;
    int dv = c->v_head_dim;
    mla_project(md, A, l, u, N, T, 0, 1);
    mhc_real *o = A->o + (size_t)l * N * H * dv;
    attention_forward(o, A->att + (size_t)l * B * H * T * T, A->q + (size_t)l * N * H * (dn + dr),
                      A->kv + (size_t)l * N * H * (dn + dv), A->kpe + (size_t)l * N * dr, B, T, c);
    matmul_forward(out, o, md->p.blk[l].wo, N, H * dv, C);
}

/* du += dMLA/du applied to dout */
static void mla_backward(MhcModel *md, MhcActs *A, int l, const mhc_real *u, const mhc_real *dout, mhc_real *du, int B, int T) {
    const MhcConfig *c = &md->cfg;
    const MhcBlock *b = &md->p.blk[l];
    MhcBlock *gb = &md->g.blk[l];
    int N = B * T, C = c->d_model, H = c->n_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim;
    int dqk = dn + dr, dv = c->v_head_dim, dc = c->kv_lora_rank, dq = c->q_lora_rank;
    const mhc_real *q = A->q + (size_t)l * N * H * dqk, *kv = A->kv + (size_t)l * N * H * (dn + dv);
    const mhc_real *kpe = A->kpe + (size_t)l * N * dr, *o = A->o + (size_t)l * N * H * dv;
    const mhc_real *lat = A->c + (size_t)l * N * dc;
    mhc_real *d_o = A->dwide;
    memset(d_o, 0, sizeof(mhc_real) * (size_t)N * H * dv);
    matmul_backward(d_o, gb->wo, dout, o, b->wo, N, H * dv, C);
    attention_backward(A->dq, A->dkv, A->dkpe_h, d_o, o, A->att + (size_t)l * B * H * T * T, q, kv, kpe, B, T, c);
#pragma omp parallel for
    for (int t = 0; t < N; t++) {            /* k_pe is shared: sum over heads, then RoPE^T */
        int pos = t % T;
        mhc_real *dk = A->dkpe + (size_t)t * dr;
        for (int i = 0; i < dr; i++) dk[i] = 0;
        for (int h = 0; h < H; h++)
            for (int i = 0; i < dr; i++) dk[i] += A->dkpe_h[((size_t)t * H + h) * dr + i];
        mhc_rope(dk, dr, pos, c->rope_theta, 1);
        for (int h = 0; h < H; h++) mhc_rope(A->dq + (size_t)t * H * dqk + h * dqk + dn, dr, pos, c->rope_theta, 1);
    }
    memset(A->dlat, 0, sizeof(mhc_real) * (size_t)N * dc);
    memset(A->dlat_raw, 0, sizeof(mhc_real) * (size_t)N * dc);
    matmul_backward(A->dlat, gb->wukv, A->dkv, lat, b->wukv, N, dc, H * (dn + dv));
    rmsnorm_backward(A->dlat_raw, gb->kv_norm, A->dlat, A->c_raw + (size_t)l * N * dc, b->kv_norm,
                     A->c_rstd + (size_t)l * N, N, dc);
    matmul_backward(du, gb->wdkv, A->dlat_raw, u, b->wdkv, N, C, dc);
    matmul_backward(du, gb->wdkv + (size_t)dc * C, A->dkpe, u, b->wdkv + (size_t)dc * C, N, C, dr);
    if (dq == 0) {
        matmul_backward(du, gb->wq, A->dq, u, b->wq, N, C, H * dqk);
    } else {
        const mhc_real *cq_raw = A->cq_raw + (size_t)l * N * dq, *cq = A->cq + (size_t)l * N * dq;
        memset(A->dcq, 0, sizeof(mhc_real) * (size_t)N * dq);
        memset(A->dcq_raw, 0, sizeof(mhc_real) * (size_t)N * dq);
        matmul_backward(A->dcq, gb->wuq, A->dq, cq, b->wuq, N, dq, H * dqk);
        rmsnorm_backward(A->dcq_raw, gb->q_norm, A->dcq, cq_raw, b->q_norm, A->cq_rstd + (size_t)l * N, N, dq);
        matmul_backward(du, gb->wdq, A->dcq_raw, u, b->wdq, N, C, dq);
    }
}

/* SPEC §10 absorbed decode of ONE token at position cache->len: writes its c and k_pe into the
   cache first, then attends over positions 0..len with q_abs = W_uk^T q_nope and the latent values. */
static void mla_decode_forward(MhcModel *md, MhcCache *cache, int l, const mhc_real *u, mhc_real *out) {
    const MhcConfig *c = &md->cfg;
    const MhcBlock *b = &md->p.blk[l];
    MhcActs *A = &cache->acts;
    int C = c->d_model, H = c->n_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim;
    int dqk = dn + dr, dv = c->v_head_dim, dc = c->kv_lora_rank, t = cache->len;
    double scale = 1.0 / sqrt((double)dqk);
    mla_project(md, A, l, u, 1, 1, t, 0);
    mhc_real *ckv = cache->ckv + (size_t)l * cache->max_len * dc, *kpe = cache->kpe + (size_t)l * cache->max_len * dr;
    memcpy(ckv + (size_t)t * dc, A->c + (size_t)l * dc, sizeof(mhc_real) * dc);
    memcpy(kpe + (size_t)t * dr, A->kpe + (size_t)l * dr, sizeof(mhc_real) * dr);
    const mhc_real *q = A->q + (size_t)l * H * dqk;
    mhc_real *o = A->o + (size_t)l * H * dv;
    for (int h = 0; h < H; h++) {
        const mhc_real *qn = q + h * dqk, *qp = qn + dn;
        const mhc_real *Wk = b->wukv + (size_t)h * (dn + dv) * dc, *Wv = Wk + (size_t)dn * dc;  /* W_uk[h], W_uv[h] */
        mhc_real *qabs = cache->qabs + (size_t)h * dc, *olat = cache->olat + (size_t)h * dc;
        for (int k = 0; k < dc; k++) qabs[k] = 0;
        for (int i = 0; i < dn; i++)
            for (int k = 0; k < dc; k++) qabs[k] += Wk[(size_t)i * dc + k] * qn[i];
        double mx = -INFINITY, sum = 0;
        for (int s = 0; s <= t; s++) {
            double dot = 0;
            for (int k = 0; k < dc; k++) dot += (double)qabs[k] * ckv[(size_t)s * dc + k];
            for (int i = 0; i < dr; i++) dot += (double)qp[i] * kpe[(size_t)s * dr + i];
            cache->scores[s] = (mhc_real)(dot * scale);
            mx = cache->scores[s] > mx ? cache->scores[s] : mx;
        }
        for (int s = 0; s <= t; s++) { cache->scores[s] = (mhc_real)exp(cache->scores[s] - mx); sum += cache->scores[s]; }
        for (int k = 0; k < dc; k++) olat[k] = 0;
        for (int s = 0; s <= t; s++) {
            mhc_real p = (mhc_real)(cache->scores[s] / sum);
            for (int k = 0; k < dc; k++) olat[k] += p * ckv[(size_t)s * dc + k];
        }
        for (int i = 0; i < dv; i++) {
            double acc = 0;
            for (int k = 0; k < dc; k++) acc += (double)Wv[(size_t)i * dc + k] * olat[k];
            o[h * dv + i] = (mhc_real)acc;
        }
    }
    matmul_forward(out, o, b->wo, 1, H * dv, C);
}

/* ---------------------------------------------------------------------------------------------
   6. FFN: dense SwiGLU (SPEC §8) and DeepSeekMoE (SPEC §11).
      Per layer the hidden buffers ffn_a/g/h hold [N, D] (dense) or [N*K, I] for the routed
      assignments in grouped order (moe_group_by_expert) followed by [N, Ns*I] for the shared expert. */
static int mhc_ffn_width(const MhcConfig *c) {
    int moe = (c->n_activated_experts + c->n_shared_experts) * c->moe_inter_dim;
    return c->dense_inter_dim > moe ? c->dense_inter_dim : moe;
}

/* SwiGLU of width W over N rows: a = u @ W1^T, g = u @ W3^T, h = silu(a) * g, out = h @ W2^T */
static void swiglu_ffn_forward(mhc_real *out, mhc_real *a, mhc_real *g, mhc_real *h, const mhc_real *u,
                               const mhc_real *w1, const mhc_real *w3, const mhc_real *w2, int N, int C, int W) {
    matmul_forward(a, u, w1, N, C, W);
    matmul_forward(g, u, w3, N, C, W);
    swiglu_forward(h, a, g, (size_t)N * W);
    matmul_forward(out, h, w2, N, W, C);
}

/* du += ..., dW1/dW3/dW2 += ...; scratch dh, da, dg [N, W] */
static void swiglu_ffn_backward(mhc_real *du, mhc_real *dw1, mhc_real *dw3, mhc_real *dw2, const mhc_real *dout,
                                const mhc_real *a, const mhc_real *g, const mhc_real *h, const mhc_real *u,
                                const mhc_real *w1, const mhc_real *w3, const mhc_real *w2,
                                mhc_real *dh, mhc_real *da, mhc_real *dg, int N, int C, int W) {
    memset(dh, 0, sizeof(mhc_real) * (size_t)N * W);
    matmul_backward(dh, dw2, dout, h, w2, N, W, C);
    swiglu_backward(da, dg, dh, a, g, (size_t)N * W);
    matmul_backward(du, dw1, da, u, w1, N, C, W);
    matmul_backward(du, dw3, dg, u, w3, N, C, W);
}

/* SPEC §11 routing of one token: selection by s + bias (groups masked with -inf), top-K with the
   lowest index winning ties, weights from the UNBIASED s normalised over Sel, times rho. */
static void moe_route(int *sel, mhc_real *w, const mhc_real *s, const mhc_real *bias, const MhcConfig *c) {
    int E = c->n_routed_experts, K = c->n_activated_experts, G = c->n_expert_groups;
    double score[1024];
    for (int i = 0; i < E; i++) score[i] = (double)s[i] + bias[i];
    if (G > 1) {
        int per = E / G;
        double gscore[1024];
        int keep[1024];
        for (int gi = 0; gi < G; gi++) {        /* group score: sum of its top-2 selection scores */
            double b1 = -INFINITY, b2 = -INFINITY;
            for (int i = gi * per; i < (gi + 1) * per; i++) {
                if (score[i] > b1) { b2 = b1; b1 = score[i]; }
                else if (score[i] > b2) b2 = score[i];
            }
            gscore[gi] = b1 + b2;
            keep[gi] = 0;
        }
        for (int r = 0; r < c->n_limited_groups; r++) {
            int best = -1;
            for (int gi = 0; gi < G; gi++)
                if (!keep[gi] && (best < 0 || gscore[gi] > gscore[best])) best = gi;
            keep[best] = 1;
        }
        for (int i = 0; i < E; i++) if (!keep[i / per]) score[i] = -INFINITY;
    }
    double Z = 0;
    for (int k = 0; k < K; k++) {
        int best = -1;
        for (int i = 0; i < E; i++) {
            int taken = 0;
            for (int j = 0; j < k; j++) taken |= sel[j] == i;
            if (!taken && (best < 0 || score[i] > score[best])) best = i;
        }
        sel[k] = best;
        Z += s[best];
    }
    for (int k = 0; k < K; k++) w[k] = (mhc_real)(c->route_scale * s[sel[k]] / Z);
}

/* Group the N*K assignments p = token*K + slot by expert, token order inside each expert: grouped row
   r holds assignment order[r], assignment p sits at row[p], expert e owns rows [start[e], start[e+1]).
   The experts then run as one GEMM each over their rows (the tokens are permuted once). */
static void moe_group_by_expert(int *order, int *row, int *start, const int *sel, int N, int K, int E) {
    for (int e = 0; e <= E; e++) start[e] = 0;
    for (int p = 0; p < N * K; p++) start[sel[p] + 1]++;
    for (int e = 0; e < E; e++) start[e + 1] += start[e];
    int *fill = (int *)mhc_calloc((size_t)E, sizeof(int));
    for (int p = 0; p < N * K; p++) {
        row[p] = start[sel[p]] + fill[sel[p]]++;
        order[row[p]] = p;
    }
    free(fill);
}

/* x [N*K, C]: grouped row r is the input u of token order[r] / K */
static void moe_gather(mhc_real *x, const mhc_real *u, const int *order, int NK, int K, int C) {
#pragma omp parallel for
    for (int r = 0; r < NK; r++) memcpy(x + (size_t)r * C, u + (size_t)(order[r] / K) * C, sizeof(mhc_real) * C);
}

/* out[t] += sum_k w[t*K+k] src[row[t*K+k]], k in order (w NULL: weight 1). Grouped rows back to tokens. */
static void moe_combine(mhc_real *out, const mhc_real *src, const int *row, const mhc_real *w, int N, int K, int C) {
#pragma omp parallel for
    for (int t = 0; t < N; t++)
        for (int k = 0; k < K; k++) {
            int p = t * K + k;
            mhc_real wp = w ? w[p] : 1;
            const mhc_real *x = src + (size_t)row[p] * C;
            for (int i = 0; i < C; i++) out[(size_t)t * C + i] += wp * x[i];
        }
}

/* SPEC §11 sequence-wise balance loss over the B sequences of T tokens, for one layer:
   returns mean_b alpha * sum_i f_i P_i. If ds is not NULL, adds its gradient (scaled as part of a
   total loss over B sequences) to ds [N,E]. */
static double moe_balance_loss(mhc_real *ds, const mhc_real *s, const int *sel, int B, int T, const MhcConfig *c) {
    int E = c->n_routed_experts, K = c->n_activated_experts;
    double alpha = c->seq_aux_alpha, total = 0;
    if (alpha == 0) return 0;
    double *f = (double *)mhc_calloc((size_t)E, sizeof(double));
    double *P = (double *)mhc_calloc((size_t)E, sizeof(double));
    for (int b = 0; b < B; b++) {
        for (int i = 0; i < E; i++) f[i] = P[i] = 0;
        for (int t = b * T; t < (b + 1) * T; t++) {
            for (int k = 0; k < K; k++) f[sel[(size_t)t * K + k]] += (double)E / ((double)K * T);
            double sum = 0;
            for (int i = 0; i < E; i++) sum += s[(size_t)t * E + i];
            for (int i = 0; i < E; i++) P[i] += s[(size_t)t * E + i] / sum / T;
        }
        double lb = 0;
        for (int i = 0; i < E; i++) lb += f[i] * P[i];
        total += alpha * lb / B;
        if (!ds) continue;
        for (int t = b * T; t < (b + 1) * T; t++) {   /* gp_i = alpha f_i / T / N_seq */
            double sum = 0, dot = 0;
            for (int i = 0; i < E; i++) sum += s[(size_t)t * E + i];
            for (int i = 0; i < E; i++) dot += alpha * f[i] / T / B * s[(size_t)t * E + i] / sum;
            for (int k = 0; k < E; k++) ds[(size_t)t * E + k] += (mhc_real)((alpha * f[k] / T / B - dot) / sum);
        }
    }
    free(f);
    free(P);
    return total;
}

/* SPEC §11 forward for layer l: out [N,C] = Shared(u) + sum_{i in Sel} w_i Expert_i(u).
   Returns this layer's L_aux. Counts the assignments into expert_load. */
static double moe_forward(MhcModel *md, MhcActs *A, int l, const mhc_real *u, mhc_real *out, int B, int T) {
    const MhcConfig *c = &md->cfg;
    const MhcBlock *b = &md->p.blk[l];
    int N = B * T, C = c->d_model, E = c->n_routed_experts, K = c->n_activated_experts, I = c->moe_inter_dim;
    int NsI = c->n_shared_experts * I, F = mhc_ffn_width(c), NK = N * K;
    mhc_real *s = A->moe_s + (size_t)l * N * E, *w = A->moe_w + (size_t)l * N * K;
    int *sel = A->moe_sel + (size_t)l * N * K;
    mhc_real *ha = A->ffn_a + (size_t)l * N * F, *hg = A->ffn_g + (size_t)l * N * F, *hh = A->ffn_h + (size_t)l * N * F;
    mhc_real *eo = A->moe_eo + (size_t)l * N * K * C;
    const mhc_real *bias = md->expert_bias + (size_t)l * E;
    matmul_forward(s, u, b->gate, N, C, E);
#pragma omp parallel for
    for (int t = 0; t < N; t++) {
        for (int i = 0; i < E; i++) s[(size_t)t * E + i] = mhc_sigmoid(s[(size_t)t * E + i]);
        moe_route(sel + (size_t)t * K, w + (size_t)t * K, s + (size_t)t * E, bias, c);
    }
    if (NsI > 0) {
        size_t off = (size_t)N * K * I;        /* shared expert after the routed slots */
        swiglu_ffn_forward(out, ha + off, hg + off, hh + off, u, b->sw1, b->sw3, b->sw2, N, C, NsI);
    } else {
        memset(out, 0, sizeof(mhc_real) * (size_t)N * C);
    }
    const int *start = A->expert_start;
    moe_group_by_expert(A->expert_order, A->expert_row, A->expert_start, sel, N, K, E);
    for (int e = 0; e < E; e++) md->expert_load[(size_t)l * E + e] = start[e + 1] - start[e];
    moe_gather(A->moe_x, u, A->expert_order, NK, K, C);
    for (int e = 0; e < E; e++) {              /* expert e on its rows r0 .. r0 + rows - 1 */
        int r0 = start[e], rows = start[e + 1] - r0;
        matmul_forward(ha + (size_t)r0 * I, A->moe_x + (size_t)r0 * C, b->w1 + (size_t)e * I * C, rows, C, I);
        matmul_forward(hg + (size_t)r0 * I, A->moe_x + (size_t)r0 * C, b->w3 + (size_t)e * I * C, rows, C, I);
    }
    swiglu_forward(hh, ha, hg, (size_t)NK * I);
    for (int e = 0; e < E; e++) {
        int r0 = start[e], rows = start[e + 1] - r0;
        matmul_forward(eo + (size_t)r0 * C, hh + (size_t)r0 * I, b->w2 + (size_t)e * C * I, rows, I, C);
    }
    moe_combine(out, eo, A->expert_row, w, N, K, C);
    return moe_balance_loss(NULL, s, sel, B, T, c);
}

static void moe_backward(MhcModel *md, MhcActs *A, int l, const mhc_real *u, const mhc_real *dout, mhc_real *du, int B, int T) {
    const MhcConfig *c = &md->cfg;
    const MhcBlock *b = &md->p.blk[l];
    MhcBlock *gb = &md->g.blk[l];
    int N = B * T, C = c->d_model, E = c->n_routed_experts, K = c->n_activated_experts, I = c->moe_inter_dim;
    int NsI = c->n_shared_experts * I, F = mhc_ffn_width(c), NK = N * K;
    const mhc_real *s = A->moe_s + (size_t)l * N * E, *w = A->moe_w + (size_t)l * NK;
    const int *sel = A->moe_sel + (size_t)l * NK, *start = A->expert_start;
    const mhc_real *ha = A->ffn_a + (size_t)l * N * F, *hg = A->ffn_g + (size_t)l * N * F, *hh = A->ffn_h + (size_t)l * N * F;
    const mhc_real *eo = A->moe_eo + (size_t)l * NK * C;
    mhc_real *dh = A->dwide, *da = A->dffn_a, *dg = A->dffn_g;   /* [N*K, I] grouped, free after the shared expert */
    if (NsI > 0) {
        size_t off = (size_t)NK * I;
        swiglu_ffn_backward(du, gb->sw1, gb->sw3, gb->sw2, dout, ha + off, hg + off, hh + off, u, b->sw1, b->sw3, b->sw2,
                            A->dwide, A->dffn_a, A->dffn_g, N, C, NsI);
    }
    moe_group_by_expert(A->expert_order, A->expert_row, A->expert_start, sel, N, K, E);   /* the forward's again */
    moe_gather(A->moe_x, u, A->expert_order, NK, K, C);
#pragma omp parallel for
    for (int r = 0; r < NK; r++) {             /* dw_p = dout . Expert_p(u);  dy_r = w_p dout */
        int p = A->expert_order[r];
        const mhc_real *d = dout + (size_t)(p / K) * C, *y = eo + (size_t)r * C;
        double dot = 0;
        for (int i = 0; i < C; i++) dot += (double)d[i] * y[i];
        A->dgw[p] = (mhc_real)dot;
        for (int i = 0; i < C; i++) A->moe_dy[(size_t)r * C + i] = w[p] * d[i];
    }
    memset(dh, 0, sizeof(mhc_real) * (size_t)NK * I);
    for (int e = 0; e < E; e++) {
        int r0 = start[e], rows = start[e + 1] - r0;
        matmul_backward(dh + (size_t)r0 * I, gb->w2 + (size_t)e * C * I, A->moe_dy + (size_t)r0 * C, hh + (size_t)r0 * I,
                        b->w2 + (size_t)e * C * I, rows, I, C);
    }
    swiglu_backward(da, dg, dh, ha, hg, (size_t)NK * I);
    memset(A->moe_dx, 0, sizeof(mhc_real) * (size_t)NK * C);
    for (int e = 0; e < E; e++) {
        int r0 = start[e], rows = start[e + 1] - r0;
        const mhc_real *x = A->moe_x + (size_t)r0 * C;
        mhc_real *dx = A->moe_dx + (size_t)r0 * C;
        matmul_backward(dx, gb->w1 + (size_t)e * I * C, da + (size_t)r0 * I, x, b->w1 + (size_t)e * I * C, rows, C, I);
        matmul_backward(dx, gb->w3 + (size_t)e * I * C, dg + (size_t)r0 * I, x, b->w3 + (size_t)e * I * C, rows, C, I);
    }
    moe_combine(du, A->moe_dx, A->expert_row, NULL, N, K, C);   /* the assignments' input gradients, k in order */
    mhc_real *ds = A->dscore;
    memset(ds, 0, sizeof(mhc_real) * (size_t)N * E);
#pragma omp parallel for
    for (int t = 0; t < N; t++) {
        double Z = 0, dot = 0;                 /* ds_i = (rho/Z) (dw_i - sum_j dw_j s_j / Z) */
        for (int k = 0; k < K; k++) Z += s[(size_t)t * E + sel[(size_t)t * K + k]];
        for (int k = 0; k < K; k++) dot += A->dgw[(size_t)t * K + k] * s[(size_t)t * E + sel[(size_t)t * K + k]] / Z;
        for (int k = 0; k < K; k++)
            ds[(size_t)t * E + sel[(size_t)t * K + k]] += (mhc_real)(c->route_scale / Z * (A->dgw[(size_t)t * K + k] - dot));
    }
    moe_balance_loss(ds, s, sel, B, T, c);
    for (size_t k = 0; k < (size_t)N * E; k++) ds[k] *= s[k] * (1 - s[k]);   /* through the sigmoid */
    matmul_backward(du, gb->gate, ds, u, b->gate, N, C, E);
}

/* SPEC §11 aux-loss-free balancing, after the optimizer step: bias_i += gamma * sign(mean - load_i), with
   the loads of the step's batch (every micro-batch backpropagated since mhc_zero_grad) */
void mhc_update_expert_bias(MhcModel *m) {
    const MhcConfig *c = &m->cfg;
    int E = c->n_routed_experts;
    for (int l = c->first_k_dense; l < c->n_layers; l++) {
        int64_t total = 0;
        for (int e = 0; e < E; e++) total += m->step_load[(size_t)l * E + e];
        double mean = (double)total / E;
        for (int e = 0; e < E; e++) {
            double d = mean - (double)m->step_load[(size_t)l * E + e];
            m->expert_bias[(size_t)l * E + e] += (mhc_real)(c->bias_update_speed * ((d > 0) - (d < 0)));
        }
    }
}

double mhc_max_violation(const MhcModel *m, int layer) {
    int E = m->cfg.n_routed_experts;
    int64_t total = 0, mx = 0;
    for (int e = 0; e < E; e++) {
        int64_t v = m->expert_load[(size_t)layer * E + e];
        total += v;
        mx = v > mx ? v : mx;
    }
    return total ? (double)mx / ((double)total / E) - 1 : 0;
}

/* ---------------------------------------------------------------------------------------------
   7. The model (SPEC §2): embed, expand once, S = 2L sublayers, reduce once, norm, head, CE.      */
/* Every activation buffer with its element count: one table allocates, frees and sizes them. */
typedef struct {
    mhc_real **real;    /* exactly one of real / integer is set */
    int **integer;
    size_t count;
    int grad;           /* backward scratch only */
} MhcBuffer;

static MhcBuffer mhc_buf(mhc_real **real, size_t count, int grad) {
    MhcBuffer b = {real, NULL, count, grad};
    return b;
}
static MhcBuffer mhc_buf_int(int **integer, size_t count) {
    MhcBuffer b = {NULL, integer, count, 0};
    return b;
}

#define MHC_MAX_BUFFERS 64
static int mhc_acts_table(MhcActs *a, const MhcConfig *c, int B, int T, MhcBuffer *t) {
    size_t N = (size_t)B * T, C = c->d_model, n = c->hc_mult, m = mhc_m(c), S = 2 * (size_t)c->n_layers;
    size_t L = c->n_layers, H = c->n_heads, dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim;
    size_t dqk = dn + dr, dv = c->v_head_dim, dc = c->kv_lora_rank, dq = c->q_lora_rank, V = c->vocab_size;
    size_t E = c->n_routed_experts, K = c->n_activated_experts, F = mhc_ffn_width(c);
    size_t wide = H * dv > F ? H * dv : F;
    int k = 0;
    t[k++] = mhc_buf(&a->X, (S + 1) * N * n * C, 0);
    t[k++] = mhc_buf(&a->coef_a, S * N * m, 0);
    t[k++] = mhc_buf(&a->coef_h, S * N * m, 0);
    t[k++] = mhc_buf(&a->coef_H, S * N * m, 0);
    t[k++] = mhc_buf(&a->coef_r, S * N * n, 0);
    t[k++] = mhc_buf(&a->y, S * N * C, 0);
    t[k++] = mhc_buf(&a->u, S * N * C, 0);
    t[k++] = mhc_buf(&a->u_rstd, S * N, 0);
    t[k++] = mhc_buf(&a->f, S * N * C, 0);
    t[k++] = mhc_buf(&a->q, L * N * H * dqk, 0);
    t[k++] = mhc_buf(&a->cq_raw, L * N * dq, 0);
    t[k++] = mhc_buf(&a->cq, L * N * dq, 0);
    t[k++] = mhc_buf(&a->cq_rstd, L * N, 0);
    t[k++] = mhc_buf(&a->c_raw, L * N * dc, 0);
    t[k++] = mhc_buf(&a->c, L * N * dc, 0);
    t[k++] = mhc_buf(&a->c_rstd, L * N, 0);
    t[k++] = mhc_buf(&a->kpe, L * N * dr, 0);
    t[k++] = mhc_buf(&a->kv, L * N * H * (dn + dv), 0);
    t[k++] = mhc_buf(&a->att, L * B * H * T * T, 0);
    t[k++] = mhc_buf(&a->o, L * N * H * dv, 0);
    t[k++] = mhc_buf(&a->ffn_a, L * N * F, 0);
    t[k++] = mhc_buf(&a->ffn_g, L * N * F, 0);
    t[k++] = mhc_buf(&a->ffn_h, L * N * F, 0);
    t[k++] = mhc_buf(&a->moe_s, L * N * E, 0);
    t[k++] = mhc_buf_int(&a->moe_sel, L * N * K);
    t[k++] = mhc_buf(&a->moe_w, L * N * K, 0);
    t[k++] = mhc_buf(&a->moe_eo, L * N * K * C, 0);
    t[k++] = mhc_buf(&a->moe_x, N * K * C, 0);
    t[k++] = mhc_buf_int(&a->expert_order, N * K);
    t[k++] = mhc_buf_int(&a->expert_row, N * K);
    t[k++] = mhc_buf_int(&a->expert_start, E + 1);
    t[k++] = mhc_buf(&a->z, N * C, 0);
    t[k++] = mhc_buf(&a->hf, N * C, 0);
    t[k++] = mhc_buf(&a->hf_rstd, N, 0);
    t[k++] = mhc_buf(&a->logits, N * V, 0);
    t[k++] = mhc_buf(&a->losses, N, 0);
    t[k++] = mhc_buf(&a->Xt, N * n * C, 0);
    t[k++] = mhc_buf(&a->dX, N * n * C, 1);
    t[k++] = mhc_buf(&a->dX2, N * n * C, 1);
    t[k++] = mhc_buf(&a->dH, N * m, 1);
    t[k++] = mhc_buf(&a->dcoef, N * m, 1);
    t[k++] = mhc_buf(&a->dXt, N * n * C, 1);
    t[k++] = mhc_buf(&a->df, N * C, 1);
    t[k++] = mhc_buf(&a->du, N * C, 1);
    t[k++] = mhc_buf(&a->dy, N * C, 1);
    t[k++] = mhc_buf(&a->dq, N * H * dqk, 1);
    t[k++] = mhc_buf(&a->dkv, N * H * (dn + dv), 1);
    t[k++] = mhc_buf(&a->dkpe, N * dr, 1);
    t[k++] = mhc_buf(&a->dkpe_h, N * H * dr, 1);
    t[k++] = mhc_buf(&a->dlat, N * dc, 1);
    t[k++] = mhc_buf(&a->dlat_raw, N * dc, 1);
    t[k++] = mhc_buf(&a->dcq, N * dq, 1);
    t[k++] = mhc_buf(&a->dcq_raw, N * dq, 1);
    t[k++] = mhc_buf(&a->dwide, N * wide, 1);
    t[k++] = mhc_buf(&a->dffn_a, N * F, 1);
    t[k++] = mhc_buf(&a->dffn_g, N * F, 1);
    t[k++] = mhc_buf(&a->moe_dy, N * K * C, 1);
    t[k++] = mhc_buf(&a->moe_dx, N * K * C, 1);
    t[k++] = mhc_buf(&a->dscore, N * E, 1);
    t[k++] = mhc_buf(&a->dgw, N * K, 1);
    return k;
}

static void mhc_acts_free(MhcActs *a) {
    MhcConfig zero;
    MhcBuffer t[MHC_MAX_BUFFERS];
    memset(&zero, 0, sizeof zero);
    int n = mhc_acts_table(a, &zero, 0, 0, t);
    for (int k = 0; k < n; k++) {
        if (t[k].real) { free(*t[k].real); *t[k].real = NULL; }
        else { free(*t[k].integer); *t[k].integer = NULL; }
    }
    a->B = a->T = 0;
}

/* backward scratch is allocated only when with_grad is set (decode needs none) */
static void mhc_acts_init(MhcActs *a, const MhcConfig *c, int B, int T, int with_grad) {
    MhcBuffer t[MHC_MAX_BUFFERS];
    mhc_acts_free(a);
    int n = mhc_acts_table(a, c, B, T, t);
    for (int k = 0; k < n; k++) {
        if (t[k].grad && !with_grad) continue;
        if (t[k].real) *t[k].real = (mhc_real *)mhc_calloc(t[k].count, sizeof(mhc_real));
        else *t[k].integer = (int *)mhc_calloc(t[k].count, sizeof(int));
    }
    a->B = B;
    a->T = T;
}

size_t mhc_acts_bytes(const MhcConfig *c, int B, int T) {
    MhcActs a;
    MhcBuffer t[MHC_MAX_BUFFERS];
    size_t bytes = 0;
    memset(&a, 0, sizeof a);
    int n = mhc_acts_table(&a, c, B, T, t);
    for (int k = 0; k < n; k++) bytes += t[k].count * (t[k].real ? sizeof(mhc_real) : sizeof(int));
    return bytes;
}

int mhc_acts_alloc(MhcModel *m, int B, int T) {
    if (B < 1 || T < 1) return -1;
    if (m->acts.B != B || m->acts.T != T) mhc_acts_init(&m->acts, &m->cfg, B, T, 1);
    return 0;
}

/* The coefficients of sublayer s for all tokens: mHC (§4), HC (§6), or the constants of plain. */
static void stream_coeffs_forward(MhcModel *md, MhcActs *A, int s, int N) {
    const MhcConfig *c = &md->cfg;
    int m = mhc_m(c);
    if (c->residual == MHC_RESIDUAL_PLAIN) {
        for (size_t k = 0; k < (size_t)N * m; k++) A->coef_H[(size_t)s * N * m + k] = 1;   /* n = 1: H = [1 | 1 | 1] */
    } else if (c->residual == MHC_RESIDUAL_MHC) {
        mhc_stream_coeffs_forward(md, A, s, N);
    } else {
        hc_stream_coeffs_forward(md, A, s, N);
    }
}

/* One sublayer (SPEC §3): X_{s+1} = H_res X_s + H_post^T F_s(H_pre X_s). cache != NULL: one token
   of absorbed decode (B = T = 1). Returns the MoE balance loss of an FFN sublayer. */
static double sublayer_forward(MhcModel *md, MhcActs *A, int s, int B, int T, MhcCache *cache) {
    const MhcConfig *c = &md->cfg;
    int N = B * T, n = c->hc_mult, C = c->d_model, m = mhc_m(c), l = s / 2;
    const mhc_real *X = A->X + (size_t)s * N * n * C, *H = A->coef_H + (size_t)s * N * m;
    mhc_real *y = A->y + (size_t)s * N * C, *u = A->u + (size_t)s * N * C, *f = A->f + (size_t)s * N * C;
    const MhcBlock *b = &md->p.blk[l];
    double aux = 0;
    stream_coeffs_forward(md, A, s, N);
    stream_pre_forward(y, H, X, N, n, C, m);
    rmsnorm_forward(u, A->u_rstd + (size_t)s * N, y, s % 2 == 0 ? b->attn_norm : b->ffn_norm, N, C, c->rms_eps);
    if (s % 2 == 0 && cache) {
        mla_decode_forward(md, cache, l, u, f);
    } else if (s % 2 == 0) {
        mla_forward(md, A, l, u, f, B, T);
    } else if (mhc_is_moe(c, l)) {
        aux = moe_forward(md, A, l, u, f, B, T);
    } else {
        int D = c->dense_inter_dim;
        swiglu_ffn_forward(f, A->ffn_a + (size_t)l * N * mhc_ffn_width(c), A->ffn_g + (size_t)l * N * mhc_ffn_width(c),
                           A->ffn_h + (size_t)l * N * mhc_ffn_width(c), u, b->w1, b->w3, b->w2, N, C, D);
    }
    stream_merge_forward(A->X + (size_t)(s + 1) * N * n * C, H, X, f, N, n, C, m);
    return aux;
}

/* embed, expand (replicate to n streams); after the sublayers: reduce (sum), norm, head */
static double model_forward(MhcModel *md, MhcActs *A, const int *tokens, const int *targets, int B, int T, MhcCache *cache) {
    const MhcConfig *c = &md->cfg;
    int N = B * T, n = c->hc_mult, C = c->d_model, V = c->vocab_size, S = 2 * c->n_layers;
#pragma omp parallel for
    for (int t = 0; t < N; t++)
        for (int i = 0; i < n; i++)
            memcpy(A->X + ((size_t)t * n + i) * C, md->p.embed + (size_t)tokens[t] * C, sizeof(mhc_real) * C);
    double aux = 0;
    for (int s = 0; s < S; s++) aux += sublayer_forward(md, A, s, B, T, cache);
    const mhc_real *XS = A->X + (size_t)S * N * n * C;
#pragma omp parallel for
    for (int t = 0; t < N; t++)
        for (int k = 0; k < C; k++) {
            mhc_real sum = 0;
            for (int i = 0; i < n; i++) sum += XS[((size_t)t * n + i) * C + k];
            A->z[(size_t)t * C + k] = sum;
        }
    rmsnorm_forward(A->hf, A->hf_rstd, A->z, md->p.norm_final, N, C, c->rms_eps);
    matmul_forward(A->logits, A->hf, md->p.head, N, C, V);
    md->aux = aux;
    md->ce = 0;
    if (!targets) return aux;
    crossentropy_forward(A->losses, A->logits, targets, N, V);
    for (int t = 0; t < N; t++) md->ce += A->losses[t];
    md->ce /= N;
    return md->ce + aux;
}

double mhc_forward(MhcModel *m, const int *tokens, const int *targets, int B, int T) {
    mhc_acts_alloc(m, B, T);
    return model_forward(m, &m->acts, tokens, targets, B, T, NULL);
}

void mhc_acts_create(MhcActs *a, const MhcConfig *cfg, int B, int T) {
    memset(a, 0, sizeof *a);
    mhc_acts_init(a, cfg, B, T, 0);
}

void mhc_acts_destroy(MhcActs *a) { mhc_acts_free(a); }

double mhc_forward_acts(MhcModel *m, MhcActs *a, const int *tokens, const int *targets, int B, int T) {
    return model_forward(m, a, tokens, targets, B, T, NULL);
}

void mhc_zero_grad(MhcModel *m) {
    memset(m->grads, 0, sizeof(mhc_real) * m->n_params);
    memset(m->step_load, 0, sizeof(int64_t) * m->cfg.n_layers * m->cfg.n_routed_experts);
}

void mhc_scale_grads(MhcModel *m, double scale) {
    for (size_t i = 0; i < m->n_params; i++) m->grads[i] *= (mhc_real)scale;
}

/* Backward of one sublayer (SPEC §5): from dX' (dXo) to dX = PATH 1 (residual) + PATH 2 (pre) +
   PATH 3 (coefficients), accumulating every parameter gradient of the sublayer on the way. */
static void sublayer_backward(MhcModel *md, MhcActs *A, int s, const mhc_real *dXo, mhc_real *dX) {
    const MhcConfig *c = &md->cfg;
    int B = A->B, T = A->T, N = B * T, n = c->hc_mult, C = c->d_model, m = mhc_m(c), l = s / 2;
    const MhcBlock *b = &md->p.blk[l];
    MhcBlock *gb = &md->g.blk[l];
    const mhc_real *X = A->X + (size_t)s * N * n * C, *H = A->coef_H + (size_t)s * N * m;
    const mhc_real *y = A->y + (size_t)s * N * C, *u = A->u + (size_t)s * N * C, *f = A->f + (size_t)s * N * C;
    stream_merge_backward(dX, A->df, A->dH, dXo, H, X, f, N, n, C, m);           /* §5.1, PATH 1 */
    memset(A->du, 0, sizeof(mhc_real) * (size_t)N * C);
    if (s % 2 == 0) {
        mla_backward(md, A, l, u, A->df, A->du, B, T);                           /* §5.2 */
    } else if (mhc_is_moe(c, l)) {
        moe_backward(md, A, l, u, A->df, A->du, B, T);
    } else {
        int F = mhc_ffn_width(c), D = c->dense_inter_dim;
        swiglu_ffn_backward(A->du, gb->w1, gb->w3, gb->w2, A->df, A->ffn_a + (size_t)l * N * F,
                            A->ffn_g + (size_t)l * N * F, A->ffn_h + (size_t)l * N * F, u, b->w1, b->w3, b->w2,
                            A->dwide, A->dffn_a, A->dffn_g, N, C, D);
    }
    memset(A->dy, 0, sizeof(mhc_real) * (size_t)N * C);
    rmsnorm_backward(A->dy, s % 2 == 0 ? gb->attn_norm : gb->ffn_norm, A->du, y,
                     s % 2 == 0 ? b->attn_norm : b->ffn_norm, A->u_rstd + (size_t)s * N, N, C);
    stream_pre_backward(dX, A->dH, A->dy, H, X, N, n, C, m);                     /* §5.3, PATH 2 */
    if (c->residual == MHC_RESIDUAL_MHC) mhc_stream_coeffs_backward(md, A, s, N, A->dH, dX);   /* PATH 3 */
    if (c->residual == MHC_RESIDUAL_HC) hc_stream_coeffs_backward(md, A, s, N, A->dH, dX);
}

/* Backward of the last mhc_forward (with targets); accumulates into m->grads, and its expert loads into
   m->step_load. */
void mhc_backward(MhcModel *md, const int *tokens, const int *targets) {
    const MhcConfig *c = &md->cfg;
    MhcActs *A = &md->acts;
    int N = A->B * A->T, n = c->hc_mult, C = c->d_model, V = c->vocab_size, S = 2 * c->n_layers;
    for (size_t i = 0; i < (size_t)c->n_layers * c->n_routed_experts; i++) md->step_load[i] += md->expert_load[i];
    crossentropy_backward(A->logits, targets, N, V, (mhc_real)(1.0 / N));
    memset(A->dy, 0, sizeof(mhc_real) * (size_t)N * C);
    matmul_backward(A->dy, md->g.head, A->logits, A->hf, md->p.head, N, C, V);
    memset(A->du, 0, sizeof(mhc_real) * (size_t)N * C);
    rmsnorm_backward(A->du, md->g.norm_final, A->dy, A->z, md->p.norm_final, A->hf_rstd, N, C);
    mhc_real *dXo = A->dX, *dX = A->dX2;
#pragma omp parallel for
    for (int t = 0; t < N; t++)              /* reduce by sum: every stream receives dz */
        for (int i = 0; i < n; i++)
            memcpy(dXo + ((size_t)t * n + i) * C, A->du + (size_t)t * C, sizeof(mhc_real) * C);
    for (int s = S - 1; s >= 0; s--) {
        sublayer_backward(md, A, s, dXo, dX);
        mhc_real *swap = dXo;
        dXo = dX;
        dX = swap;
    }
    for (int t = 0; t < N; t++)              /* expand: dx0 = sum_i dX_0[i]; scatter-add in token order */
        for (int i = 0; i < n; i++)
            for (int k = 0; k < C; k++) md->g.embed[(size_t)tokens[t] * C + k] += dXo[((size_t)t * n + i) * C + k];
}

/* ---------------------------------------------------------------------------------------------
   8. Optimizer (SPEC §12): global-norm clipping, AdamW with decay on 2-D matrices, LR schedules. */
/* sum of squares over fixed blocks, the block sums added in order: the same bits for any thread count */
double mhc_grad_norm(const MhcModel *m) {
    size_t block = 1 << 16, n_blocks = (m->n_params + block - 1) / block;
    double *partial = (double *)mhc_calloc(n_blocks, sizeof(double)), sum = 0;
#pragma omp parallel for
    for (size_t k = 0; k < n_blocks; k++) {
        size_t end = (k + 1) * block < m->n_params ? (k + 1) * block : m->n_params;
        double s = 0;
        for (size_t i = k * block; i < end; i++) s += (double)m->grads[i] * m->grads[i];
        partial[k] = s;
    }
    for (size_t k = 0; k < n_blocks; k++) sum += partial[k];
    free(partial);
    return sqrt(sum);
}

double mhc_clip_grad(MhcModel *m, double max_norm) {
    double norm = mhc_grad_norm(m);
    if (max_norm > 0 && norm > max_norm) {
        mhc_real scale = (mhc_real)(max_norm / norm);
        for (size_t i = 0; i < m->n_params; i++) m->grads[i] *= scale;
    }
    return norm;
}

double mhc_lr_at(const MhcConfig *c, int k) {
    int W = c->warmup_steps, N = c->steps;
    double lr = c->lr;
    if (k < W) return lr * (k + 1) / W;
    if (c->lr_schedule == MHC_SCHEDULE_COSINE) {
        double lr_min = 0.1 * lr, frac = N > W ? (double)(k - W) / (N - W) : 1.0;
        if (frac > 1) frac = 1;
        return lr_min + 0.5 * (lr - lr_min) * (1 + cos(MHC_PI * frac));
    }
    if (k < (int)floor(0.8 * N)) return lr;
    if (k < (int)floor(0.9 * N)) return 0.316 * lr;
    return 0.1 * lr;
}

void mhc_adamw_step(MhcModel *m, double lr) {
    const MhcConfig *c = &m->cfg;
    m->step++;
    double b1 = c->adam_beta1, b2 = c->adam_beta2;
    double bc1 = 1 - pow(b1, m->step), bc2 = 1 - pow(b2, m->step);
    for (int k = 0; k < m->n_tensors; k++) {
        const MhcTensor *t = &m->tensors[k];
        double wd = t->decay ? c->weight_decay : 0;
        mhc_real *p = m->params + t->offset, *g = m->grads + t->offset;
        mhc_real *mm = m->adam_m + t->offset, *vv = m->adam_v + t->offset;
#pragma omp parallel for
        for (size_t i = 0; i < t->size; i++) {
            double gi = g[i];
            double mi = b1 * mm[i] + (1 - b1) * gi, vi = b2 * vv[i] + (1 - b2) * gi * gi;
            mm[i] = (mhc_real)mi;
            vv[i] = (mhc_real)vi;
            p[i] = (mhc_real)(p[i] * (1 - lr * wd) - lr * (mi / bc1) / (sqrt(vi / bc2) + c->adam_eps));
        }
    }
}

/* ---------------------------------------------------------------------------------------------
   9. Absorbed decode (SPEC §10): the same sublayers on one token, attention over the latent cache. */
int mhc_cache_init(MhcCache *c, const MhcConfig *cfg, int max_len) {
    memset(c, 0, sizeof *c);
    if (max_len < 1) return -1;
    c->max_len = max_len;
    c->ckv = (mhc_real *)mhc_calloc((size_t)cfg->n_layers * max_len * cfg->kv_lora_rank, sizeof(mhc_real));
    c->kpe = (mhc_real *)mhc_calloc((size_t)cfg->n_layers * max_len * cfg->qk_rope_head_dim, sizeof(mhc_real));
    c->qabs = (mhc_real *)mhc_calloc((size_t)cfg->n_heads * cfg->kv_lora_rank, sizeof(mhc_real));
    c->olat = (mhc_real *)mhc_calloc((size_t)cfg->n_heads * cfg->kv_lora_rank, sizeof(mhc_real));
    c->scores = (mhc_real *)mhc_calloc((size_t)max_len, sizeof(mhc_real));
    mhc_acts_init(&c->acts, cfg, 1, 1, 0);
    return 0;
}

void mhc_cache_free(MhcCache *c) {
    free(c->ckv); free(c->kpe); free(c->qabs); free(c->olat); free(c->scores);
    mhc_acts_free(&c->acts);
    memset(c, 0, sizeof *c);
}

int mhc_decode_step(MhcModel *m, MhcCache *c, int token, mhc_real *logits) {
    if (c->len >= c->max_len || token < 0 || token >= m->cfg.vocab_size) return -1;
    model_forward(m, &c->acts, &token, NULL, 1, 1, c);
    memcpy(logits, c->acts.logits, sizeof(mhc_real) * m->cfg.vocab_size);
    c->len++;
    return 0;
}

int mhc_cache_fill_from_forward(MhcModel *m, MhcCache *c, int T) {
    const MhcConfig *cfg = &m->cfg;
    int N = m->acts.B * m->acts.T, dc = cfg->kv_lora_rank, dr = cfg->qk_rope_head_dim;
    if (T > m->acts.T || T > c->max_len) return -1;
    for (int l = 0; l < cfg->n_layers; l++) {
        memcpy(c->ckv + (size_t)l * c->max_len * dc, m->acts.c + (size_t)l * N * dc, sizeof(mhc_real) * (size_t)T * dc);
        memcpy(c->kpe + (size_t)l * c->max_len * dr, m->acts.kpe + (size_t)l * N * dr, sizeof(mhc_real) * (size_t)T * dr);
    }
    c->len = T;
    return 0;
}

float mhc_bf16_round(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return x;      /* NaN stays NaN */
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;  /* a carry out of the mantissa bumps the exponent */
    memcpy(&x, &u, 4);
    return x;
}

/* the head, and every matrix of a block but the router (blk.L.moe.gate) */
static int mhc_is_decode_matrix(const MhcTensor *t) {
    return !strcmp(t->name, "head") || (t->ndim >= 2 && !strncmp(t->name, "blk.", 4) && !strstr(t->name, ".gate"));
}

void mhc_round_decode_weights_bf16(MhcModel *m) {
    for (int k = 0; k < m->n_tensors; k++) {
        const MhcTensor *t = &m->tensors[k];
        if (!mhc_is_decode_matrix(t)) continue;
        mhc_real *w = m->params + t->offset;
        for (size_t i = 0; i < t->size; i++) w[i] = (mhc_real)mhc_bf16_round((float)w[i]);
    }
}

/* ---------------------------------------------------------------------------------------------
   10. Files. safetensors (SPEC §16): u64 header length, JSON header, data buffer. The JSON reader
       below handles exactly what that header holds: objects, strings, integer arrays.
       Multi-byte values are little-endian (x86-64 and ARM64 hosts).                              */
typedef struct {
    const char *p, *end;
} MhcJson;

static void json_space(MhcJson *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\n' || *j->p == '\r' || *j->p == '\t')) j->p++;
}

static int json_take(MhcJson *j, char ch) {
    json_space(j);
    if (j->p < j->end && *j->p == ch) { j->p++; return 1; }
    return 0;
}

/* a JSON string into out (UTF-8; \uXXXX escapes of the BMP); -1 on error or overflow */
static int json_string(MhcJson *j, char *out, size_t size) {
    size_t n = 0;
    if (!json_take(j, '"')) return -1;
    while (j->p < j->end && *j->p != '"') {
        unsigned code = (unsigned char)*j->p++;
        if (code == '\\') {
            if (j->p >= j->end) return -1;
            char e = *j->p++;
            const char *simple = "\"\\/bfnrt", *value = "\"\\/\b\f\n\r\t";
            const char *hit = strchr(simple, e);
            if (e == 'u') {
                if (j->end - j->p < 4) return -1;
                char hex[5] = {j->p[0], j->p[1], j->p[2], j->p[3], 0};
                char *stop;
                code = (unsigned)strtoul(hex, &stop, 16);
                if (*stop) return -1;
                j->p += 4;
            } else if (hit && e) {
                code = (unsigned char)value[hit - simple];
            } else {
                return -1;
            }
            unsigned char buf[3];
            int len = code < 0x80 ? 1 : code < 0x800 ? 2 : 3;
            if (len == 1) buf[0] = (unsigned char)code;
            if (len == 2) { buf[0] = (unsigned char)(0xC0 | (code >> 6)); buf[1] = (unsigned char)(0x80 | (code & 0x3F)); }
            if (len == 3) {
                buf[0] = (unsigned char)(0xE0 | (code >> 12));
                buf[1] = (unsigned char)(0x80 | ((code >> 6) & 0x3F));
                buf[2] = (unsigned char)(0x80 | (code & 0x3F));
            }
            for (int k = 0; k < len; k++) { if (n + 1 >= size) return -1; out[n++] = (char)buf[k]; }
        } else {
            if (n + 1 >= size) return -1;
            out[n++] = (char)code;
        }
    }
    if (j->p >= j->end) return -1;
    j->p++;
    out[n] = 0;
    return (int)n;
}

static int json_int(MhcJson *j, int64_t *v) {
    json_space(j);
    char *stop;
    errno = 0;
    long long x = strtoll(j->p, &stop, 10);
    if (stop == j->p || stop > j->end || errno) return -1;
    j->p = stop;
    *v = x;
    return 0;
}

/* [int, int, ...] with at most max values; returns the count or -1 */
static int json_int_array(MhcJson *j, int64_t *v, int max) {
    int n = 0;
    if (!json_take(j, '[')) return -1;
    if (json_take(j, ']')) return 0;
    do {
        if (n >= max || json_int(j, &v[n])) return -1;
        n++;
    } while (json_take(j, ','));
    return json_take(j, ']') ? n : -1;
}

static size_t mhc_dtype_size(const char *dtype) {
    if (!strcmp(dtype, "F64") || !strcmp(dtype, "I64")) return 8;
    if (!strcmp(dtype, "F32") || !strcmp(dtype, "I32")) return 4;
    if (!strcmp(dtype, "BF16") || !strcmp(dtype, "F16")) return 2;
    return 0;
}

static int mhc_st_parse(MhcSafetensors *st, char *err, size_t es) {
    MhcJson j = {st->json, st->json + strlen(st->json)};
    char key[256], value[1024];
    int cap = 64, mcap = 64;
    st->entries = (MhcStEntry *)mhc_calloc((size_t)cap, sizeof(MhcStEntry));
    st->meta_keys = (char **)mhc_calloc((size_t)mcap, sizeof(char *));
    st->meta_values = (char **)mhc_calloc((size_t)mcap, sizeof(char *));
    if (!json_take(&j, '{')) { mhc_errf(err, es, "header is not a JSON object"); return -1; }
    if (json_take(&j, '}')) return 0;
    do {
        if (json_string(&j, key, sizeof key) < 0 || !json_take(&j, ':') || !json_take(&j, '{')) {
            mhc_errf(err, es, "malformed JSON header");
            return -1;
        }
        if (!strcmp(key, "__metadata__")) {
            if (json_take(&j, '}')) continue;
            do {
                if (json_string(&j, key, sizeof key) < 0 || !json_take(&j, ':') || json_string(&j, value, sizeof value) < 0) {
                    mhc_errf(err, es, "malformed __metadata__ (string values only)");
                    return -1;
                }
                if (st->n_meta == mcap) {
                    mcap *= 2;
                    st->meta_keys = (char **)realloc(st->meta_keys, sizeof(char *) * mcap);
                    st->meta_values = (char **)realloc(st->meta_values, sizeof(char *) * mcap);
                    if (!st->meta_keys || !st->meta_values) { mhc_errf(err, es, "out of memory"); return -1; }
                }
                st->meta_keys[st->n_meta] = mhc_strdup(key);
                st->meta_values[st->n_meta] = mhc_strdup(value);
                st->n_meta++;
            } while (json_take(&j, ','));
            if (!json_take(&j, '}')) { mhc_errf(err, es, "malformed __metadata__"); return -1; }
            continue;
        }
        if (st->n_entries == cap) {
            cap *= 2;
            st->entries = (MhcStEntry *)realloc(st->entries, sizeof(MhcStEntry) * cap);
            if (!st->entries) { mhc_errf(err, es, "out of memory"); return -1; }
        }
        MhcStEntry *e = &st->entries[st->n_entries];
        memset(e, 0, sizeof *e);
        if (strlen(key) >= sizeof e->name) { mhc_errf(err, es, "tensor name too long: %s", key); return -1; }
        strcpy(e->name, key);
        int have = 0;
        do {
            char field[32];
            int64_t offs[2];
            if (json_string(&j, field, sizeof field) < 0 || !json_take(&j, ':')) { mhc_errf(err, es, "malformed entry %s", e->name); return -1; }
            if (!strcmp(field, "dtype")) {
                if (json_string(&j, e->dtype, sizeof e->dtype) < 0) { mhc_errf(err, es, "bad dtype for %s", e->name); return -1; }
                have |= 1;
            } else if (!strcmp(field, "shape")) {
                if ((e->ndim = json_int_array(&j, e->shape, 4)) < 0) { mhc_errf(err, es, "bad shape for %s", e->name); return -1; }
                have |= 2;
            } else if (!strcmp(field, "data_offsets")) {
                if (json_int_array(&j, offs, 2) != 2 || offs[0] < 0 || offs[1] < offs[0]) {
                    mhc_errf(err, es, "bad data_offsets for %s", e->name);
                    return -1;
                }
                e->begin = (uint64_t)offs[0];
                e->end = (uint64_t)offs[1];
                have |= 4;
            } else {
                mhc_errf(err, es, "unknown field %s in %s", field, e->name);
                return -1;
            }
        } while (json_take(&j, ','));
        if (have != 7 || !json_take(&j, '}')) { mhc_errf(err, es, "incomplete entry %s", e->name); return -1; }
        size_t esize = mhc_dtype_size(e->dtype);
        uint64_t numel = 1;
        for (int d = 0; d < e->ndim; d++) {
            if (e->shape[d] < 0) { mhc_errf(err, es, "negative shape in %s", e->name); return -1; }
            numel *= (uint64_t)e->shape[d];
        }
        if (!esize) { mhc_errf(err, es, "unsupported dtype %s for %s", e->dtype, e->name); return -1; }
        if (e->end - e->begin != numel * esize || e->end > st->data_size) {
            mhc_errf(err, es, "tensor %s: its data_offsets do not match its shape or lie past the end of the file", e->name);
            return -1;
        }
        st->n_entries++;
    } while (json_take(&j, ','));
    if (!json_take(&j, '}')) { mhc_errf(err, es, "malformed JSON header"); return -1; }
    return 0;
}

void mhc_st_close(MhcSafetensors *st) {
    for (int k = 0; k < st->n_meta; k++) { free(st->meta_keys[k]); free(st->meta_values[k]); }
    free(st->meta_keys); free(st->meta_values); free(st->entries); free(st->json); free(st->data);
    memset(st, 0, sizeof *st);
}

int mhc_st_open(MhcSafetensors *st, const char *path, char *err, size_t es) {
    memset(st, 0, sizeof *st);
    FILE *fp = fopen(path, "rb");
    if (!fp) { mhc_errf(err, es, "cannot open %s: %s", path, strerror(errno)); return -1; }
    unsigned char len8[8];
    uint64_t hlen = 0, fsize;
    if (fseek(fp, 0, SEEK_END) || (fsize = (uint64_t)ftell(fp)) < 8 || fseek(fp, 0, SEEK_SET) || fread(len8, 1, 8, fp) != 8) {
        mhc_errf(err, es, "%s: not a safetensors file (too short)", path);
        fclose(fp);
        return -1;
    }
    for (int k = 7; k >= 0; k--) hlen = hlen << 8 | len8[k];
    if (hlen < 2 || hlen > 100000000 || 8 + hlen > fsize) {
        mhc_errf(err, es, "%s: not a safetensors file (header length %llu, file size %llu)", path,
                 (unsigned long long)hlen, (unsigned long long)fsize);
        fclose(fp);
        return -1;
    }
    st->json = (char *)mhc_calloc(hlen + 1, 1);
    st->data_size = fsize - 8 - hlen;
    st->data = (unsigned char *)mhc_calloc(st->data_size, 1);
    if (fread(st->json, 1, hlen, fp) != hlen || fread(st->data, 1, st->data_size, fp) != st->data_size) {
        mhc_errf(err, es, "%s: read error", path);
        fclose(fp);
        mhc_st_close(st);
        return -1;
    }
    fclose(fp);
    char perr[200];
    if (mhc_st_parse(st, perr, sizeof perr)) {
        mhc_errf(err, es, "%s: corrupt safetensors header: %s", path, perr);
        mhc_st_close(st);
        return -1;
    }
    return 0;
}

const MhcStEntry *mhc_st_find(const MhcSafetensors *st, const char *name) {
    for (int k = 0; k < st->n_entries; k++)
        if (!strcmp(st->entries[k].name, name)) return &st->entries[k];
    return NULL;
}

const char *mhc_st_meta(const MhcSafetensors *st, const char *key) {
    for (int k = 0; k < st->n_meta; k++)
        if (!strcmp(st->meta_keys[k], key)) return st->meta_values[k];
    return NULL;
}

int mhc_st_read(const MhcSafetensors *st, const char *name, mhc_real *dst, size_t count, char *err, size_t es) {
    const MhcStEntry *e = mhc_st_find(st, name);
    if (!e) { mhc_errf(err, es, "tensor %s is missing", name); return -1; }
    size_t esize = mhc_dtype_size(e->dtype);
    if ((e->end - e->begin) / esize != count) {
        mhc_errf(err, es, "tensor %s has %llu values, expected %zu", name, (unsigned long long)((e->end - e->begin) / esize), count);
        return -1;
    }
    const unsigned char *src = st->data + e->begin;
    for (size_t i = 0; i < count; i++) {
        if (!strcmp(e->dtype, "F32")) { float v; memcpy(&v, src + 4 * i, 4); dst[i] = (mhc_real)v; }
        else if (!strcmp(e->dtype, "F64")) { double v; memcpy(&v, src + 8 * i, 8); dst[i] = (mhc_real)v; }
        else if (!strcmp(e->dtype, "BF16")) {
            uint32_t bits = (uint32_t)(src[2 * i] | src[2 * i + 1] << 8) << 16;
            float v;
            memcpy(&v, &bits, 4);
            dst[i] = (mhc_real)v;
        } else if (!strcmp(e->dtype, "I32")) { int32_t v; memcpy(&v, src + 4 * i, 4); dst[i] = (mhc_real)v; }
        else { mhc_errf(err, es, "tensor %s: dtype %s is not supported here", name, e->dtype); return -1; }
    }
    for (size_t i = 0; i < count; i++)
        if (!isfinite((double)dst[i])) { mhc_errf(err, es, "tensor %s holds a non-finite value", name); return -1; }
    return 0;
}

/* write everything to path.tmp, then rename over path: an interrupted save leaves path intact */
int mhc_st_write(const char *path, const MhcStTensor *t, int n, const char *const *mk, const char *const *mv, int n_meta,
                 char *err, size_t es) {
    size_t cap = 4096 + (size_t)n * 256, len = 0;
    for (int k = 0; k < n_meta; k++) cap += strlen(mk[k]) + strlen(mv[k]) + 16;
    char *h = (char *)mhc_calloc(cap, 1);
    len += (size_t)snprintf(h + len, cap - len, "{\"__metadata__\":{");
    for (int k = 0; k < n_meta; k++)                 /* keys and values are plain ASCII names and numbers */
        len += (size_t)snprintf(h + len, cap - len, "%s\"%s\":\"%s\"", k ? "," : "", mk[k], mv[k]);
    len += (size_t)snprintf(h + len, cap - len, "}");
    uint64_t offset = 0;
    for (int k = 0; k < n; k++) {
        uint64_t numel = 1;
        len += (size_t)snprintf(h + len, cap - len, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[", t[k].name, t[k].dtype);
        for (int d = 0; d < t[k].ndim; d++) {
            numel *= (uint64_t)t[k].shape[d];
            len += (size_t)snprintf(h + len, cap - len, "%s%lld", d ? "," : "", (long long)t[k].shape[d]);
        }
        uint64_t bytes = numel * mhc_dtype_size(t[k].dtype);
        len += (size_t)snprintf(h + len, cap - len, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)offset,
                                (unsigned long long)(offset + bytes));
        offset += bytes;
    }
    len += (size_t)snprintf(h + len, cap - len, "}");
    while ((8 + len) % 8) h[len++] = ' ';
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *fp = fopen(tmp, "wb");
    if (!fp) { mhc_errf(err, es, "cannot write %s: %s", tmp, strerror(errno)); free(h); return -1; }
    unsigned char len8[8];
    for (int k = 0; k < 8; k++) len8[k] = (unsigned char)((uint64_t)len >> (8 * k));
    int ok = fwrite(len8, 1, 8, fp) == 8 && fwrite(h, 1, len, fp) == len;
    for (int k = 0; k < n && ok; k++) {
        uint64_t numel = 1;
        for (int d = 0; d < t[k].ndim; d++) numel *= (uint64_t)t[k].shape[d];
        ok = fwrite(t[k].data, mhc_dtype_size(t[k].dtype), numel, fp) == numel;
    }
    free(h);
    if (fclose(fp) != 0) ok = 0;
    if (!ok || rename(tmp, path) != 0) {
        mhc_errf(err, es, "cannot write %s: %s", path, strerror(errno));
        remove(tmp);
        return -1;
    }
    return 0;
}

static const char *mhc_real_dtype(void) { return sizeof(mhc_real) == 8 ? "F64" : "F32"; }

/* config fields as metadata, plus format_version and step */
static int mhc_config_meta(MhcConfig *cfg, int step, char (*keys)[48], char (*values)[48], int max) {
    MhcField f[MHC_MAX_FIELDS];
    int n = mhc_config_fields(cfg, f), k = 0;
    for (; k < n && k < max - 2; k++) {
        snprintf(keys[k], 48, "%s", f[k].name);
        mhc_config_format(cfg, f[k].name, values[k], 48);
    }
    snprintf(keys[k], 48, "format_version"); snprintf(values[k++], 48, "1");
    snprintf(keys[k], 48, "step"); snprintf(values[k++], 48, "%d", step);
    return k;
}

int mhc_save_weights(const MhcModel *m, const char *path, char *err, size_t es) {
    const MhcConfig *c = &m->cfg;
    int moe_layers = c->n_layers - c->first_k_dense, nt = m->n_tensors + moe_layers;
    MhcStTensor *t = (MhcStTensor *)mhc_calloc((size_t)nt, sizeof(MhcStTensor));
    char (*names)[64] = (char (*)[64])mhc_calloc((size_t)moe_layers + 1, 64);
    for (int k = 0; k < m->n_tensors; k++) {
        const MhcTensor *x = &m->tensors[k];
        t[k] = (MhcStTensor){x->name, mhc_real_dtype(), x->ndim, {x->shape[0], x->shape[1], x->shape[2], 0},
                             m->params + x->offset};
    }
    for (int l = c->first_k_dense, k = 0; l < c->n_layers; l++, k++) {
        snprintf(names[k], 64, "blk.%d.moe.bias", l);
        t[m->n_tensors + k] = (MhcStTensor){names[k], mhc_real_dtype(), 1, {c->n_routed_experts, 0, 0, 0},
                                            m->expert_bias + (size_t)l * c->n_routed_experts};
    }
    char keys[MHC_MAX_FIELDS + 2][48], values[MHC_MAX_FIELDS + 2][48];
    const char *kp[MHC_MAX_FIELDS + 2], *vp[MHC_MAX_FIELDS + 2];
    MhcConfig cfg = *c;
    int nm = mhc_config_meta(&cfg, m->step, keys, values, MHC_MAX_FIELDS + 2);
    for (int k = 0; k < nm; k++) { kp[k] = keys[k]; vp[k] = values[k]; }
    int rc = mhc_st_write(path, t, nt, kp, vp, nm, err, es);
    free(t);
    free(names);
    return rc;
}

static int mhc_config_from_st(const MhcSafetensors *st, const char *path, MhcConfig *cfg, int *step, char *err, size_t es) {
    MhcField f[MHC_MAX_FIELDS];
    memset(cfg, 0, sizeof *cfg);
    int n = mhc_config_fields(cfg, f);
    for (int k = 0; k < n; k++) {
        const char *v = mhc_st_meta(st, f[k].name);
        if (!v) { mhc_errf(err, es, "%s: metadata lacks the config field %s", path, f[k].name); return -1; }
        if (mhc_config_set(cfg, f[k].name, v)) { mhc_errf(err, es, "%s: bad value '%s' for %s", path, v, f[k].name); return -1; }
    }
    const char *s = mhc_st_meta(st, "step");
    char *stop = NULL;
    long sv = s ? strtol(s, &stop, 10) : -1;
    if (!s || *stop || sv < 0) { mhc_errf(err, es, "%s: metadata lacks a valid step", path); return -1; }
    if (step) *step = (int)sv;
    char verr[200];
    if (mhc_config_validate(cfg, verr, sizeof verr)) { mhc_errf(err, es, "%s: %s", path, verr); return -1; }
    return 0;
}

int mhc_read_config(const char *path, MhcConfig *cfg, int *step, char *err, size_t es) {
    MhcSafetensors st;
    if (mhc_st_open(&st, path, err, es)) return -1;
    int rc = mhc_config_from_st(&st, path, cfg, step, err, es);
    mhc_st_close(&st);
    return rc;
}

/* the fields that define the network; a checkpoint must agree on all of them */
static const char *const mhc_arch_fields[] = {
    "residual", "hc_mult", "sinkhorn_iters", "sinkhorn_eps", "vocab_size", "d_model", "n_layers", "n_heads",
    "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_theta",
    "n_routed_experts", "n_shared_experts", "n_activated_experts", "moe_inter_dim", "first_k_dense",
    "dense_inter_dim", "route_scale", "n_expert_groups", "n_limited_groups", "rms_eps", NULL};

int mhc_load_weights(MhcModel *m, const char *path, char *err, size_t es) {
    MhcSafetensors st;
    MhcConfig fc, mc = m->cfg;
    int step;
    if (mhc_st_open(&st, path, err, es)) return -1;
    if (mhc_config_from_st(&st, path, &fc, &step, err, es)) { mhc_st_close(&st); return -1; }
    for (int k = 0; mhc_arch_fields[k]; k++) {
        char a[48], b[48];
        mhc_config_format(&fc, mhc_arch_fields[k], a, sizeof a);
        mhc_config_format(&mc, mhc_arch_fields[k], b, sizeof b);
        if (strcmp(a, b)) {
            mhc_errf(err, es, "%s: checkpoint has %s = %s but the model has %s", path, mhc_arch_fields[k], a, b);
            mhc_st_close(&st);
            return -1;
        }
    }
    char rerr[256];
    for (int k = 0; k < m->n_tensors; k++) {
        const MhcTensor *t = &m->tensors[k];
        const MhcStEntry *e = mhc_st_find(&st, t->name);
        int same = e && e->ndim == t->ndim;
        for (int d = 0; same && d < t->ndim; d++) same = e->shape[d] == t->shape[d];
        if (!same) { mhc_errf(err, es, "%s: tensor %s is missing or has the wrong shape", path, t->name); mhc_st_close(&st); return -1; }
        if (mhc_st_read(&st, t->name, m->params + t->offset, t->size, rerr, sizeof rerr)) {
            mhc_errf(err, es, "%s: %s", path, rerr);
            mhc_st_close(&st);
            return -1;
        }
    }
    for (int l = m->cfg.first_k_dense; l < m->cfg.n_layers; l++) {
        char name[64];
        snprintf(name, sizeof name, "blk.%d.moe.bias", l);
        if (mhc_st_read(&st, name, m->expert_bias + (size_t)l * m->cfg.n_routed_experts, m->cfg.n_routed_experts, rerr, sizeof rerr)) {
            mhc_errf(err, es, "%s: %s", path, rerr);
            mhc_st_close(&st);
            return -1;
        }
    }
    m->step = step;
    mhc_st_close(&st);
    return 0;
}

int mhc_save_optimizer(const MhcModel *m, const char *path, const char *const *ek, const char *const *ev, int n_extra,
                       char *err, size_t es) {
    MhcStTensor t[2] = {{"adam_m", mhc_real_dtype(), 1, {(int64_t)m->n_params, 0, 0, 0}, m->adam_m},
                        {"adam_v", mhc_real_dtype(), 1, {(int64_t)m->n_params, 0, 0, 0}, m->adam_v}};
    const char **keys = (const char **)mhc_calloc((size_t)n_extra + 1, sizeof(char *));
    const char **values = (const char **)mhc_calloc((size_t)n_extra + 1, sizeof(char *));
    char step[32];
    snprintf(step, sizeof step, "%d", m->step);
    keys[0] = "step";
    values[0] = step;
    for (int k = 0; k < n_extra; k++) { keys[k + 1] = ek[k]; values[k + 1] = ev[k]; }
    int rc = mhc_st_write(path, t, 2, keys, values, n_extra + 1, err, es);
    free(keys);
    free(values);
    return rc;
}

int mhc_load_optimizer(MhcModel *m, const char *path, MhcSafetensors *st, char *err, size_t es) {
    char rerr[256];
    if (mhc_st_open(st, path, err, es)) return -1;
    const char *s = mhc_st_meta(st, "step");
    if (!s || atoi(s) != m->step) {
        mhc_errf(err, es, "%s: optimizer step %s does not match the weights' step %d", path, s ? s : "(missing)", m->step);
        mhc_st_close(st);
        return -1;
    }
    if (mhc_st_read(st, "adam_m", m->adam_m, m->n_params, rerr, sizeof rerr) ||
        mhc_st_read(st, "adam_v", m->adam_v, m->n_params, rerr, sizeof rerr)) {
        mhc_errf(err, es, "%s: %s", path, rerr);
        mhc_st_close(st);
        return -1;
    }
    return 0;
}

/* token shards (SPEC §16): 256 x int32 header (magic, version, ntok), then ntok uint16 or uint32 */
int mhc_shard_write(const char *path, const uint32_t *tokens, int64_t ntok, int version, char *err, size_t es) {
    int32_t header[256] = {0};
    header[0] = version == 7 ? 20240801 : 20240520;
    header[1] = version;
    header[2] = (int32_t)ntok;
    if ((version != 1 && version != 7) || ntok < 0 || ntok > INT32_MAX) { mhc_errf(err, es, "bad shard version or size"); return -1; }
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *fp = fopen(tmp, "wb");
    if (!fp) { mhc_errf(err, es, "cannot write %s: %s", tmp, strerror(errno)); return -1; }
    int ok = fwrite(header, sizeof header, 1, fp) == 1;
    for (int64_t i = 0; i < ntok && ok; i++) {
        if (version == 1) {
            if (tokens[i] > 65535) { mhc_errf(err, es, "token %u does not fit a uint16 shard", tokens[i]); fclose(fp); remove(tmp); return -1; }
            uint16_t v = (uint16_t)tokens[i];
            ok = fwrite(&v, 2, 1, fp) == 1;
        } else {
            ok = fwrite(&tokens[i], 4, 1, fp) == 1;
        }
    }
    if (fclose(fp) != 0) ok = 0;
    if (!ok || rename(tmp, path) != 0) { mhc_errf(err, es, "cannot write %s", path); remove(tmp); return -1; }
    return 0;
}

int mhc_shard_read(const char *path, uint32_t **tokens, int64_t *ntok, int *version, char *err, size_t es) {
    FILE *fp = fopen(path, "rb");
    if (!fp) { mhc_errf(err, es, "cannot open shard %s: %s", path, strerror(errno)); return -1; }
    int32_t header[256];
    if (fread(header, sizeof header, 1, fp) != 1) { mhc_errf(err, es, "shard %s: truncated header", path); fclose(fp); return -1; }
    int width = header[0] == 20240520 && header[1] == 1 ? 2 : header[0] == 20240801 && header[1] == 7 ? 4 : 0;
    if (!width) {
        mhc_errf(err, es, "shard %s: unknown magic %d / version %d", path, header[0], header[1]);
        fclose(fp);
        return -1;
    }
    int64_t n = header[2];
    if (fseek(fp, 0, SEEK_END)) { mhc_errf(err, es, "shard %s: cannot seek", path); fclose(fp); return -1; }
    int64_t size = (int64_t)ftell(fp);
    if (n < 0 || size != 1024 + n * width) {
        mhc_errf(err, es, "shard %s: size %lld bytes, header says %lld tokens (%lld bytes expected)", path, (long long)size,
                 (long long)n, (long long)(1024 + n * width));
        fclose(fp);
        return -1;
    }
    fseek(fp, 1024, SEEK_SET);
    uint32_t *t = (uint32_t *)mhc_calloc((size_t)n, sizeof(uint32_t));
    int ok = 1;
    for (int64_t i = 0; i < n && ok; i++) {
        if (width == 2) { uint16_t v; ok = fread(&v, 2, 1, fp) == 1; t[i] = v; }
        else ok = fread(&t[i], 4, 1, fp) == 1;
    }
    fclose(fp);
    if (!ok) { mhc_errf(err, es, "shard %s: read error", path); free(t); return -1; }
    *tokens = t;
    *ntok = n;
    if (version) *version = header[1];
    return 0;
}

static int mhc_loader_load(MhcLoader *l, int file, int B, int T, char *err, size_t es) {
    free(l->tokens);
    l->tokens = NULL;
    if (mhc_shard_read(l->paths[file], &l->tokens, &l->ntok, &l->version, err, es)) return -1;
    if (l->ntok < (int64_t)B * T + 1) {
        mhc_errf(err, es, "shard %s has %lld tokens, fewer than one batch needs (%lld)", l->paths[file], (long long)l->ntok,
                 (long long)B * T + 1);
        return -1;
    }
    l->file = file;
    return 0;
}

int mhc_loader_open(MhcLoader *l, char **paths, int n_paths, int B, int T, char *err, size_t es) {
    memset(l, 0, sizeof *l);
    if (n_paths < 1) { mhc_errf(err, es, "no shard files given"); return -1; }
    l->paths = paths;
    l->n_files = n_paths;
    return mhc_loader_load(l, 0, B, T, err, es);
}

void mhc_loader_close(MhcLoader *l) { free(l->tokens); memset(l, 0, sizeof *l); }

int mhc_loader_seek(MhcLoader *l, int file, int64_t pos, char *err, size_t es) {
    if (file < 0 || file >= l->n_files) { mhc_errf(err, es, "data position names shard %d of %d", file, l->n_files); return -1; }
    int B = 1, T = 1;
    if (file != l->file && mhc_loader_load(l, file, B, T, err, es)) return -1;
    if (pos < 0 || pos >= l->ntok) { mhc_errf(err, es, "data position %lld is outside the shard", (long long)pos); return -1; }
    l->pos = pos;
    return 0;
}

/* inputs[b][t] = tok[pos + b*T + t], targets = the next token; moves to the next shard (wrapping)
   when fewer than B*T+1 tokens remain */
int mhc_loader_next(MhcLoader *l, int B, int T, int *inputs, int *targets, char *err, size_t es) {
    int64_t need = (int64_t)B * T + 1;
    if (l->pos + need > l->ntok) {
        int next = (l->file + 1) % l->n_files;
        if (next != l->file && mhc_loader_load(l, next, B, T, err, es)) return -1;
        if (l->ntok < need) { mhc_errf(err, es, "shard %s is smaller than one batch", l->paths[l->file]); return -1; }
        l->pos = 0;
    }
    for (int64_t i = 0; i < need - 1; i++) {
        inputs[i] = (int)l->tokens[l->pos + i];
        targets[i] = (int)l->tokens[l->pos + i + 1];
    }
    l->pos += need - 1;
    return 0;
}

#endif /* MHC_IMPLEMENTATION */
