#!/usr/bin/env bash
# Runs every test suite (`make test` builds what they need first) and ends with one line
# "N passed, N failed" summed over the suites. Exit status: 0 only if nothing failed.
#   tests64            float64 build: finite-difference checks, invariants, PyTorch parity (fp64)
#   tests              float32 build: PyTorch parity (fp32), training, files, determinism
#   tests_emu          the same GPU tests on the CPU: mhc_cuda.cuh under dev/cuda_emu (`make emu`)
#   tests_gpu          CUDA build against the CPU reference (only where a GPU is present)
#   check_tokenizer    the C BPE encoder vs the npm package's own encoder on the whole corpus
#   test_cli           train / infer end to end: bad input, resume, sampling
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export MHC_REF_DIR=${MHC_REF_DIR:-dev/ref}
passed=0 failed=0 status=0
run_suite() {
    local name=$1; shift
    echo "=== $name"
    local log
    log=$(mktemp)
    "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    local line
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1)
    rm -f "$log"
    if [ -z "$line" ]; then
        echo "FAIL $name printed no summary (exit status $rc)"
        failed=$((failed + 1)); status=1; return
    fi
    local p f
    p=$(echo "$line" | awk '{print $1}'); f=$(echo "$line" | awk '{print $3}')
    passed=$((passed + p)); failed=$((failed + f))
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        echo "FAIL $name exited with status $rc"
        failed=$((failed + 1))
    fi
    [ "$rc" -ne 0 ] && status=1
}
run_suite tests64 ./tests64
run_suite tests ./tests
run_suite tests_emu ./dev/cuda_emu/build/tests_emu gpu
if [ -x ./tests_gpu ] && nvidia-smi -L >/dev/null 2>&1; then run_suite tests_gpu ./tests_gpu; fi
run_suite check_tokenizer bash data/check_tokenizer.sh
run_suite test_cli bash dev/test_cli.sh
echo "$passed passed, $failed failed"
exit $status
