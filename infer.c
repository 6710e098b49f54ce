/* infer.c - sample text from a checkpoint with the absorbed MLA latent cache (SPEC §10).

   ./infer out/model.safetensors --prompt "The economy" --max-tokens 100 [--temperature 0.8]
           [--top-k 40] [--top-p 0.95] [--seed 1] [--tokenizer data/gpt2.tok] [--threads N] [--precision fp32]

   The prompt is run once through the training path (prefill, SPEC §9), which fills the latent cache;
   every new token then runs the absorbed decode: per layer only c = RMSNorm(W_dkv u) and the roped
   k_pe are cached (d_c + d_r values per token). Built with nvcc, decoding runs on the GPU, each token
   after the first as one replayed CUDA graph (--graph 0: kernel by kernel, to compare). Greedy decoding
   (--temperature 0) takes the argmax there too, so only the token crosses to the host, and sampling with
   a --top-k of 1..256 (MHC_TOP_K_MAX) finds the top-k there, so only k candidates cross. --precision bf16
   reads the MLA, FFN, expert and head matrices as bf16 (mhc_round_decode_weights_bf16): on the GPU from
   its bf16 copy, half the bytes a token moves; on the CPU the same values, rounded in place, no faster. */
#define MHC_IMPLEMENTATION
#include "mhc.h"
#ifdef __CUDACC__
#include "mhc_cuda.cuh"
#endif
#define BPE_IMPLEMENTATION
#include "data/tokenizer.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    const char *checkpoint, *prompt, *tokenizer;
    int max_tokens, top_k, threads, graph, bf16;
    double temperature, top_p;
    uint64_t seed;
} Options;

static void usage(void) {
    printf("usage: ./infer CHECKPOINT [flags]\n"
           "  --prompt TEXT        text to continue (default: start from <|endoftext|>)\n"
           "  --max-tokens N       tokens to generate (default 64)\n"
           "  --temperature X      0 = greedy (default 0.8)\n"
           "  --top-k N            keep the N most likely tokens, 0 = all (default 40); the GPU build finds\n"
           "                       1..256 of them on the GPU, more on the host\n"
           "  --top-p X            keep the smallest set with probability >= X (default 0.95)\n"
           "  --seed N             sampling seed (default 1)\n"
           "  --tokenizer FILE     default data/gpt2.tok\n"
           "  --threads N          OpenMP threads\n"
           "  --graph 0|1          GPU build: 1 replays each decoded token as one CUDA graph (default), 0 launches\n"
           "                       its kernels one by one\n"
           "  --precision P        fp32 (default) or bf16: the MLA, FFN, expert and head matrices rounded to bf16\n"
           "                       (the coefficient projections, router and embedding stay fp32); the GPU build\n"
           "                       reads them from a bf16 copy, half the bytes per token; the CPU build gives\n"
           "                       the same tokens at its fp32 speed\n");
}

static void die(const char *msg, const char *arg) {
    fprintf(stderr, "infer: %s%s\n", msg, arg);
    exit(2);
}

static double parse_real(const char *s, const char *flag, double lo, double hi) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) die("bad value for ", flag);
    return v;
}

static void parse_args(Options *o, int argc, char **argv) {
    memset(o, 0, sizeof *o);
    o->prompt = "";
    o->tokenizer = "data/gpt2.tok";
    o->max_tokens = 64;
    o->top_k = 40;
    o->temperature = 0.8;
    o->top_p = 0.95;
    o->seed = 1;
    o->graph = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { usage(); exit(0); }
        if (a[0] != '-') {
            if (o->checkpoint) die("more than one checkpoint given: ", a);
            o->checkpoint = a;
            continue;
        }
        if (i + 1 >= argc) die("missing value after ", a);
        const char *v = argv[++i];
        if (!strcmp(a, "--prompt")) o->prompt = v;
        else if (!strcmp(a, "--tokenizer")) o->tokenizer = v;
        else if (!strcmp(a, "--max-tokens")) o->max_tokens = (int)parse_real(v, a, 1, 1e6);
        else if (!strcmp(a, "--top-k")) o->top_k = (int)parse_real(v, a, 0, 1e7);
        else if (!strcmp(a, "--threads")) o->threads = (int)parse_real(v, a, 1, 4096);
        else if (!strcmp(a, "--temperature")) o->temperature = parse_real(v, a, 0, 100);
        else if (!strcmp(a, "--top-p")) o->top_p = parse_real(v, a, 1e-6, 1);
        else if (!strcmp(a, "--seed")) o->seed = (uint64_t)parse_real(v, a, 0, 1e18);
        else if (!strcmp(a, "--graph")) o->graph = (int)parse_real(v, a, 0, 1);
        else if (!strcmp(a, "--precision")) {
            if (strcmp(v, "fp32") && strcmp(v, "bf16")) die("--precision takes fp32 or bf16, not ", v);
            o->bf16 = !strcmp(v, "bf16");
        }
        else die("unknown flag (see --help): ", a);
    }
    if (!o->checkpoint) die("no checkpoint given (see --help)", "");
}

typedef struct {
    double p;
    int id;
} Candidate;

static int by_probability(const void *a, const void *b) {
    const Candidate *x = (const Candidate *)a, *y = (const Candidate *)b;
    if (x->p != y->p) return x->p < y->p ? 1 : -1;
    return x->id - y->id;
}

/* cand[0..keep) = the keep most probable of the V tokens, in by_probability order, from one pass: a
   token below the least kept one costs one comparison, any other is inserted in place. keep = V sorts. */
static void most_probable(Candidate *cand, int keep, const double *p, int V) {
    if (keep == V) {
        for (int v = 0; v < V; v++) cand[v] = (Candidate){p[v], v};
        qsort(cand, (size_t)V, sizeof(Candidate), by_probability);
        return;
    }
    int kept = 0;
    for (int v = 0; v < V; v++) {
        Candidate c = {p[v], v};
        if (kept == keep && by_probability(&c, &cand[keep - 1]) > 0) continue;
        int i = kept < keep ? kept++ : keep - 1;
        for (; i > 0 && by_probability(&c, &cand[i - 1]) < 0; i--) cand[i] = cand[i - 1];
        cand[i] = c;
    }
}

/* top-p (nucleus) over cand [n], the most probable first with unnormalised p, sum the softmax denominator
   over all V; then one draw among the tokens kept */
static int draw_token(const Candidate *cand, int n, double sum, const Options *o, uint64_t *rng) {
    int keep = n;
    double mass = 0;
    for (int k = 0; k < n; k++) {
        mass += cand[k].p / sum;
        if (mass >= o->top_p) { keep = k + 1; break; }
    }
    double total = 0;
    for (int k = 0; k < keep; k++) total += cand[k].p;
    double r = mhc_rng_uniform(rng) * total;
    for (int k = 0; k < keep; k++) {
        r -= cand[k].p;
        if (r <= 0) return cand[k].id;
    }
    return cand[keep - 1].id;
}

/* temperature, then top-k, then top-p, then one draw; temperature 0 is argmax.
   p [V]: scratch for the unnormalised probabilities. */
static int sample_token(const float *logits, int V, const Options *o, double *p, Candidate *cand, uint64_t *rng) {
    int best = 0;
    for (int v = 1; v < V; v++) if (logits[v] > logits[best]) best = v;
    if (o->temperature == 0) return best;
    double sum = 0;
    for (int v = 0; v < V; v++) {
        p[v] = exp((logits[v] - logits[best]) / o->temperature);
        sum += p[v];
    }
    int keep = o->top_k > 0 && o->top_k < V ? o->top_k : V;
    most_probable(cand, keep, p, V);
    return draw_token(cand, keep, sum, o, rng);
}

#ifdef __CUDACC__
/* the same with the top-k taken on the GPU from the logits there: only its k candidates (ids [k], logits [k]
   of scratch) and the denominator come to the host, and they are the candidates most_probable would keep */
static int sample_token_gpu(MhcGpu *g, MhcGpuCache *c, const Options *o, int *ids, float *logits, Candidate *cand,
                            uint64_t *rng) {
    double sum;
    int n = mhc_gpu_decode_top_k(g, c, o->top_k, o->temperature, ids, logits, &sum);
    if (n < 1) {
        fprintf(stderr, "infer: the model's logits are all NaN\n");
        exit(1);
    }
    for (int k = 0; k < n; k++) cand[k] = (Candidate){exp((logits[k] - logits[0]) / o->temperature), ids[k]};
    return draw_token(cand, n, sum, o, rng);
}
#endif

static double now_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static void print_token(const BpeTokenizer *tok, int id) {
    size_t len;
    const unsigned char *bytes = bpe_token_bytes(tok, (uint32_t)id, &len);
    if (bytes) fwrite(bytes, 1, len, stdout);
    fflush(stdout);
}

int main(int argc, char **argv) {
    Options o;
    parse_args(&o, argc, argv);
#ifdef _OPENMP
    if (o.threads) omp_set_num_threads(o.threads);
#endif
    char err[512];
    MhcConfig cfg;
    MhcModel m;
    if (mhc_read_config(o.checkpoint, &cfg, NULL, err, sizeof err)) { fprintf(stderr, "infer: %s\n", err); return 1; }
    if (mhc_model_init(&m, &cfg)) return 1;
    if (mhc_load_weights(&m, o.checkpoint, err, sizeof err)) { fprintf(stderr, "infer: %s\n", err); return 1; }
    BpeTokenizer tok;
    if (bpe_load(&tok, o.tokenizer)) return 1;
    int V = cfg.vocab_size;
    if ((int)bpe_vocab_size(&tok) > V) {
        fprintf(stderr, "infer: the tokenizer has %u tokens, the model only %d\n", bpe_vocab_size(&tok), V);
        return 1;
    }
    uint32_t *ids = NULL;
    size_t n_ids = 0;
    if (bpe_encode(&tok, o.prompt, strlen(o.prompt), &ids, &n_ids)) return 1;
    int P = (int)n_ids + 1, total = P + o.max_tokens;       /* <|endoftext|> starts every document */
    if (total > cfg.seq_len) {
        fprintf(stderr, "infer: prompt (%d tokens) + --max-tokens %d exceeds the model's context of %d tokens\n", P,
                o.max_tokens, cfg.seq_len);
        return 2;
    }
    int *prompt = (int *)mhc_calloc((size_t)P, sizeof(int));
    prompt[0] = (int)bpe_eot_id(&tok);
    for (int i = 1; i < P; i++) prompt[i] = (int)ids[i - 1];
    float *logits = (float *)mhc_calloc((size_t)V, sizeof(float));
    mhc_real *out = (mhc_real *)mhc_calloc((size_t)V, sizeof(mhc_real));
    Candidate *cand = (Candidate *)mhc_calloc((size_t)V, sizeof(Candidate));
    double *prob = (double *)mhc_calloc((size_t)V, sizeof(double));
    uint64_t rng = o.seed;

    fputs(o.prompt, stdout);
    double t0 = now_seconds();
#ifdef __CUDACC__
    MhcGpu gpu;
    MhcGpuCache cache;
    if (mhc_gpu_init(&gpu, &m, 1, 1) || mhc_gpu_cache_init(&cache, &gpu, total)) return 1;
    mhc_gpu_set_precision(&gpu, o.bf16 ? MHC_PREC_BF16 : MHC_PREC_FP32);   /* of the decode's weights */
    cache.use_graph &= o.graph;
    /* greedy takes the argmax on the GPU, and a top-k of 1..MHC_TOP_K_MAX the candidates there; a larger
       top-k (or 0, all V) brings every logit to the host */
    int top_k_on_gpu = o.top_k > 0 && o.top_k <= MHC_TOP_K_MAX && o.top_k < V;
    float *host_logits = o.temperature == 0 || top_k_on_gpu ? NULL : logits;
    int top_ids[MHC_TOP_K_MAX];
    float top_logits[MHC_TOP_K_MAX];
    for (int i = 0; i < P; i++)                                  /* prefill token by token */
        mhc_gpu_decode_step(&gpu, &cache, prompt[i], i == P - 1 ? host_logits : NULL);
#else
    if (o.bf16) mhc_round_decode_weights_bf16(&m);
    MhcCache cache;
    mhc_cache_init(&cache, &cfg, total);
    mhc_forward(&m, prompt, NULL, 1, P);                    /* prefill: SPEC §9 path, every position */
    mhc_cache_fill_from_forward(&m, &cache, P);
    for (int v = 0; v < V; v++) logits[v] = (float)m.acts.logits[(size_t)(P - 1) * V + v];
#endif
    double t1 = now_seconds();
    int generated = 0;
    for (; generated < o.max_tokens; generated++) {
#ifdef __CUDACC__
        int next = host_logits              ? sample_token(logits, V, &o, prob, cand, &rng)
                   : o.temperature == 0 ? mhc_gpu_decode_argmax(&gpu, &cache)
                                        : sample_token_gpu(&gpu, &cache, &o, top_ids, top_logits, cand, &rng);
#else
        int next = sample_token(logits, V, &o, prob, cand, &rng);
#endif
        if (next == (int)bpe_eot_id(&tok)) break;
        print_token(&tok, next);
        if (generated + 1 == o.max_tokens) { generated++; break; }
#ifdef __CUDACC__
        mhc_gpu_decode_step(&gpu, &cache, next, host_logits);
#else
        mhc_decode_step(&m, &cache, next, out);
        for (int v = 0; v < V; v++) logits[v] = (float)out[v];
#endif
    }
    double t2 = now_seconds();
    printf("\n");
    fprintf(stderr, "prefill %d tokens in %.3fs; generated %d tokens in %.3fs (%.1f tokens/s)\n", P, t1 - t0, generated,
            t2 - t1, generated / (t2 - t1 > 0 ? t2 - t1 : 1e-9));
#ifdef __CUDACC__
    mhc_gpu_cache_free(&cache);
    mhc_gpu_free(&gpu);
#else
    mhc_cache_free(&cache);
#endif
    free(prompt); free(logits); free(out); free(cand); free(prob); free(ids);
    bpe_free(&tok);
    mhc_model_free(&m);
    return 0;
}
