/* dev/bench_decode.c - where a batch-1 decode step's time goes (issue 5): a model of a preset with its
   SPEC §12 initial weights (no checkpoint needed) decodes STEPS tokens through mhc_gpu_decode_step with
   the logits copied to the host (as sampling from all V needs them), then STEPS more greedily (the argmax
   on the GPU, as infer_gpu --temperature 0), then STEPS more with sampling's top-k 40 on the GPU (as
   infer_gpu samples by default; the host's draw among 40 candidates is left out). The step's wall time is set against the GPU time of its captured
   graph alone (cudaEvents around replays of it) and against the logits' copy to the host alone. The
   rows are not subtracted: on small the graph alone came out above a whole step (H100: 0.975 against
   0.968 ms), so their difference is not the host's time. Built by `make gpu` as dev/bench_decode; run
   on the GPU machine:

       ./dev/bench_decode [preset [name=value ...]]      e.g. ./dev/bench_decode 3b n_layers=4 precision=bf16

   Default: small. A setting is a config field (mhc_config_set), or precision=fp32|bf16: the decode's
   weights, as infer_gpu --precision (bf16: the MLA, FFN, expert and head matrices from the bf16 copy).
   Prints one markdown table. */
#define MHC_IMPLEMENTATION
#include "mhc.h"
#include "mhc_cuda.cuh"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define STEPS 64
#define TOP_K 40                                    /* infer's default --top-k */

static double wall_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

int main(int argc, char **argv) {
    MhcConfig cfg;
    const char *preset = argc > 1 ? argv[1] : "small";
    char err[256];
    int bf16 = 0;
    if (mhc_preset(&cfg, preset)) {
        fprintf(stderr, "bench_decode: unknown preset %s\n", preset);
        return 2;
    }
    for (int k = 2; k < argc; k++) {
        char name[64], *eq = strchr(argv[k], '=');
        if (!eq || eq - argv[k] >= (long)sizeof name) {
            fprintf(stderr, "bench_decode: expected name=value, got %s\n", argv[k]);
            return 2;
        }
        memcpy(name, argv[k], eq - argv[k]);
        name[eq - argv[k]] = 0;
        if (!strcmp(name, "precision")) {
            if (strcmp(eq + 1, "fp32") && strcmp(eq + 1, "bf16")) {
                fprintf(stderr, "bench_decode: precision takes fp32 or bf16, not %s\n", eq + 1);
                return 2;
            }
            bf16 = !strcmp(eq + 1, "bf16");
        } else if (mhc_config_set(&cfg, name, eq + 1)) {
            fprintf(stderr, "bench_decode: bad setting %s\n", argv[k]);
            return 2;
        }
    }
    mhc_config_finish(&cfg);
    if (mhc_config_validate(&cfg, err, sizeof err)) {
        fprintf(stderr, "bench_decode: %s\n", err);
        return 2;
    }
    MhcModel m;
    if (mhc_model_init(&m, &cfg)) return 1;
    mhc_init_params(&m, 1);
    MhcGpu g;
    MhcGpuCache c;
    if (mhc_gpu_init(&g, &m, 1, 1) || mhc_gpu_cache_init(&c, &g, 3 * STEPS)) return 1;
    mhc_gpu_set_precision(&g, bf16 ? MHC_PREC_BF16 : MHC_PREC_FP32);   /* of the decode's weights */
    int V = cfg.vocab_size;
    float *logits = (float *)mhc_calloc((size_t)V, sizeof(float));

    /* STEPS steps as infer_gpu makes them (the first launch by launch, then the graph), each token the
       argmax of the last logits */
    double wall[STEPS];
    int token = 0;
    for (int s = 0; s < STEPS; s++) {
        double t0 = wall_seconds();
        if (mhc_gpu_decode_step(&g, &c, token, logits)) return 1;
        wall[s] = wall_seconds() - t0;
        for (int v = 1; v < V; v++) if (logits[v] > logits[token]) token = v;
    }
    double graph_wall = 0;                          /* steps 2.. replay the graph */
    for (int s = 1; s < STEPS; s++) graph_wall += wall[s];
    graph_wall /= STEPS - 1;
    double t0 = wall_seconds();
    for (int s = 0; s < STEPS; s++) {
        if (mhc_gpu_decode_step(&g, &c, token, NULL)) return 1;
        token = mhc_gpu_decode_argmax(&g, &c);
    }
    double greedy_wall = (wall_seconds() - t0) / STEPS;
    int ids[TOP_K];
    float top[TOP_K];
    double denominator;
    t0 = wall_seconds();
    for (int s = 0; s < STEPS; s++) {
        if (mhc_gpu_decode_step(&g, &c, token, NULL) || mhc_gpu_decode_top_k(&g, &c, TOP_K, 0.8, ids, top, &denominator) < 1)
            return 1;
        token = ids[0];
    }
    double sampled_wall = (wall_seconds() - t0) / STEPS;
    t0 = wall_seconds();                            /* the top-k alone, on the last logits */
    for (int r = 0; r < STEPS; r++) mhc_gpu_decode_top_k(&g, &c, TOP_K, 0.8, ids, top, &denominator);
    double top_k_ms = 1e3 * (wall_seconds() - t0) / STEPS;

    /* the graph alone, replayed at the last position (it rewrites that cache row with the same values) */
    cudaEvent_t start, stop;
    CUDA_CHECK(cudaEventCreate(&start));
    CUDA_CHECK(cudaEventCreate(&stop));
    CUDA_CHECK(cudaEventRecord(start, cudaStreamPerThread));
    for (int r = 0; r < STEPS; r++) CUDA_CHECK(cudaGraphLaunch(c.graph, cudaStreamPerThread));
    CUDA_CHECK(cudaEventRecord(stop, cudaStreamPerThread));
    CUDA_CHECK(cudaEventSynchronize(stop));
    float graph_ms;
    CUDA_CHECK(cudaEventElapsedTime(&graph_ms, start, stop));
    graph_ms /= STEPS;

    t0 = wall_seconds();                            /* the logits' copy alone (pageable host memory) */
    for (int r = 0; r < STEPS; r++)
        CUDA_CHECK(cudaMemcpy(logits, c.acts.a.logits, sizeof(float) * V, cudaMemcpyDeviceToHost));
    double copy_ms = 1e3 * (wall_seconds() - t0) / STEPS;

    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    printf("decode of %s%s on %s, batch 1, positions 1..%d, %s weights\n\n", preset, argc > 2 ? " with settings" : "", prop.name,
           3 * STEPS, bf16 ? "bf16" : "fp32");
    printf("| what | ms per token |\n|---|---|\n");
    printf("| first step (launch by launch, captures nothing) | %.3f |\n", 1e3 * wall[0]);
    printf("| a step with the graph, logits to the host (wall, mean of %d) | %.3f |\n", STEPS - 1, 1e3 * graph_wall);
    printf("| a greedy step: the graph, the argmax on the GPU (wall, mean of %d) | %.3f |\n", STEPS, 1e3 * greedy_wall);
    printf("| a sampled step: the graph, top-k %d on the GPU (wall, mean of %d) | %.3f |\n", TOP_K, STEPS, 1e3 * sampled_wall);
    printf("| its graph alone, back to back (GPU, events) | %.3f |\n", graph_ms);
    printf("| the top-k %d alone, candidates to the host (wall) | %.3f |\n", TOP_K, top_k_ms);
    printf("| the logits' copy to the host alone (%d floats) | %.3f |\n", V, copy_ms);
    mhc_gpu_cache_free(&c);
    mhc_gpu_free(&g);
    mhc_model_free(&m);
    free(logits);
    return 0;
}
