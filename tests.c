/* tests.c - conformance tests of mhc.h (SPEC §17). Built twice by `make test`:
     tests     (float):  PyTorch parity at fp32 tolerances, training behaviour, files, determinism
     tests64   (double): finite-difference gradient checks, invariants, PyTorch parity at fp64 tolerances
   Every check prints one line; the run ends with "N passed, N failed".
   Reference files (written by dev/reference.py) are looked up in $MHC_REF_DIR (default dev/ref). */
#define MHC_IMPLEMENTATION
#include "mhc.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int n_passed, n_failed;
static const int is_fp64 = sizeof(mhc_real) == 8;

static void check(int ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("%s ", ok ? "PASS" : "FAIL");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
    if (ok) n_passed++;
    else n_failed++;
}

/* max |a - b| / max |b| over count values: a relative error that ignores tiny entries */
static double rel_err(const mhc_real *a, const mhc_real *b, size_t count) {
    double diff = 0, scale = 0;
    for (size_t i = 0; i < count; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= diff)) diff = d;             /* NaN propagates as a failure */
        if (fabs((double)b[i]) > scale) scale = fabs((double)b[i]);
    }
    return diff / (scale > 0 ? scale : 1);
}

static const char *ref_dir(void) {
    const char *d = getenv("MHC_REF_DIR");
    return d ? d : "dev/ref";
}

/* ---------------------------------------------------------------------------------------------
   PyTorch parity: dev/reference.py (written from SPEC.md alone) stores inputs, parameters, logits,
   loss, every gradient and the losses of 10 AdamW steps; the C model must reproduce them.
   Tolerances: fp64, the two implementations differ only by summation order (~1e-13 relative), so
   1e-9 leaves room and still catches any wrong term. fp32 has ~6e-8 unit roundoff amplified through
   4 blocks and a 512-way softmax: 1e-4 (logits) and 2e-3 (gradients, relative to each tensor's max).
   The AdamW trajectory divides by sqrt(v): fp32 noise in near-zero gradients is amplified, 1e-3. */
static void test_parity(const char *file) {
    char path[1024], err[512];
    snprintf(path, sizeof path, "%s/%s.safetensors", ref_dir(), file);
    MhcSafetensors st;
    MhcConfig cfg;
    MhcModel m;
    if (mhc_st_open(&st, path, err, sizeof err) || mhc_read_config(path, &cfg, NULL, err, sizeof err)) {
        check(0, "parity %s: %s (run dev/reference.py, see Makefile)", file, err);
        return;
    }
    if (mhc_model_init(&m, &cfg) || mhc_load_weights(&m, path, err, sizeof err)) {
        check(0, "parity %s: %s", file, err);
        mhc_st_close(&st);
        return;
    }
    int B = cfg.batch_size, T = cfg.seq_len, N = B * T, V = cfg.vocab_size;
    size_t buf_size = (size_t)N * V;
    for (int k = 0; k < m.n_tensors; k++) buf_size = m.tensors[k].size > buf_size ? m.tensors[k].size : buf_size;
    mhc_real *buf = calloc(buf_size, sizeof(mhc_real));
    int *tokens = calloc((size_t)N, sizeof(int)), *targets = calloc((size_t)N, sizeof(int));
    mhc_st_read(&st, "tokens", buf, N, err, sizeof err);
    for (int i = 0; i < N; i++) tokens[i] = (int)buf[i];
    mhc_st_read(&st, "targets", buf, N, err, sizeof err);
    for (int i = 0; i < N; i++) targets[i] = (int)buf[i];

    double tol_logit = is_fp64 ? 1e-9 : 1e-4, tol_grad = is_fp64 ? 1e-9 : 2e-3, tol_adam = is_fp64 ? 1e-7 : 1e-3;
    mhc_real ref[4];
    double loss = mhc_forward(&m, tokens, targets, B, T);
    mhc_forward(&m, tokens, NULL, B, T);                   /* raw logits (the CE pass turns them into probabilities) */
    mhc_st_read(&st, "logits", buf, (size_t)N * V, err, sizeof err);
    double e = rel_err(m.acts.logits, buf, (size_t)N * V);
    check(e <= tol_logit, "parity %s: logits max rel err %.2e (tol %.0e)", file, e, tol_logit);
    mhc_st_read(&st, "loss", ref, 1, err, sizeof err);
    mhc_st_read(&st, "aux", ref + 1, 1, err, sizeof err);
    e = fabs(loss - ref[0]) / fabs((double)ref[0]);
    check(e <= tol_logit, "parity %s: loss %.10f vs %.10f (rel %.2e), aux %.3e vs %.3e", file, loss, (double)ref[0], e,
          m.aux, (double)ref[1]);

    mhc_zero_grad(&m);
    mhc_forward(&m, tokens, targets, B, T);
    mhc_backward(&m, tokens, targets);
    double worst = 0;
    const char *worst_name = "";
    int missing = 0;
    for (int k = 0; k < m.n_tensors; k++) {
        const MhcTensor *t = &m.tensors[k];
        char name[128];
        snprintf(name, sizeof name, "grad.%s", t->name);
        if (mhc_st_read(&st, name, buf, t->size, err, sizeof err)) { missing++; continue; }
        e = rel_err(m.grads + t->offset, buf, t->size);
        if (!(e <= worst)) { worst = e; worst_name = t->name; }
    }
    check(!missing && worst <= tol_grad, "parity %s: %d gradient tensors, worst max rel err %.2e in %s (tol %.0e)", file,
          m.n_tensors, worst, worst_name, tol_grad);

    mhc_real adam_ref[10];
    double adam_worst = 0;
    mhc_st_read(&st, "adam_loss", adam_ref, 10, err, sizeof err);
    for (int k = 0; k < 10; k++) {
        mhc_zero_grad(&m);
        double l = mhc_forward(&m, tokens, targets, B, T);
        mhc_backward(&m, tokens, targets);
        mhc_clip_grad(&m, cfg.grad_clip);
        mhc_adamw_step(&m, mhc_lr_at(&m.cfg, k));
        mhc_update_expert_bias(&m);
        double d = fabs(l - adam_ref[k]) / fabs((double)adam_ref[k]);
        if (!(d <= adam_worst)) adam_worst = d;
    }
    int moe_layers = cfg.n_layers - cfg.first_k_dense, E = cfg.n_routed_experts;
    mhc_st_read(&st, "adam_bias", buf, (size_t)moe_layers * E, err, sizeof err);
    double bias_err = rel_err(m.expert_bias + (size_t)cfg.first_k_dense * E, buf, (size_t)moe_layers * E);
    /* The hc file has random b_res, a pre-clip gradient norm near 400 and expert scores tied to 3e-6:
       fp32 round-off flips a selection within 10 steps (no tie-free seed exists at 1e-4), so its
       trajectory is checked in the fp64 build only. */
    if (is_fp64 || strcmp(file, "hc") != 0)
        check(adam_worst <= tol_adam && bias_err <= 1e-6, "parity %s: 10 AdamW steps, loss max rel err %.2e (tol %.0e), expert bias err %.1e",
              file, adam_worst, tol_adam, bias_err);
    free(buf); free(tokens); free(targets);
    mhc_model_free(&m);
    mhc_st_close(&st);
}

int main(int argc, char **argv) {
    const char *only = argc > 1 ? argv[1] : NULL;
    printf("mhc tests, %s build\n", is_fp64 ? "float64" : "float32");
    if (!only || !strcmp(only, "parity")) {
        const char *files[] = {"plain", "hc", "mhc", "mhc_qlora_groups"};
        for (int k = 0; k < 4; k++) test_parity(files[k]);
    }
    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed ? 1 : 0;
}
