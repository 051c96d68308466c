#!/usr/bin/env bash
# GPU speed check for one lent GPU (written for an H200; < 8 minutes: the step timeouts sum to 440 s).
#
#   bash benchmarks/gpu_check.sh            # from the repository root, with .venv present (or PYTHON=...)
#
# Runs, in order:
#   1. the compiled Triton LIF kernels against the PyTorch reference on CUDA (pytest, exact spikes);
#   2. the LIF micro-benchmark: reference vs fused, T = 1 and 4, 64M elements, fp32 and bf16, with
#      GB/s against the measured copy bandwidth;
#   3. the 172M model (spikformer_v2_16_768, 16-768, T = 1, 224 px, bf16) pretraining (MIM) and
#      finetuning steps on one GPU under ZeRO-2: images/s, model FLOPs per image, MFU against the
#      measured bf16 matmul rate, peak memory;
#   4. the 8-512 (spikformer_v2_8_512) at T = 4 finetuning step, fused LIF, then the PyTorch LIF
#      (model_speed.py) for the model-level effect of the kernels.
# Each benchmark prints a Markdown table and appends a dated section to docs/BENCHMARKS.md; at the end
# the appended Markdown is printed between BEGIN/END markers, ready to paste (and written to
# $OUT/benchmarks_gpu.md when $OUT is set). Larger 172M batch: BATCH_172M=128 bash benchmarks/gpu_check.sh
set -u -o pipefail

cd "$(dirname "$0")/.."
# the project's venv when there is one; else the machine's python3 (a lent GPU's image holds torch,
# triton and timm; deepspeed and the project must then be importable, e.g. carried wheels + PYTHONPATH)
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DOC=docs/BENCHMARKS.md
OUT_DIR=${OUT:-}
START=$(date +%s)
DOC_LINES=$( [ -f "$DOC" ] && wc -l < "$DOC" || echo 0 )
STATUS=0

step() {  # step SECONDS LABEL COMMAND...: run with a timeout, keep going on failure, remember it
    local limit=$1 label=$2
    shift 2
    echo
    echo "=== [$(( $(date +%s) - START ))s] $label"
    if ! timeout "$limit" "$@"; then
        echo "!!! $label failed or timed out (limit ${limit}s)"
        STATUS=1
    fi
}

echo "=== gpu_check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
"$PYTHON" -c "import torch, triton, deepspeed; print('torch', torch.__version__, 'triton', triton.__version__,
'deepspeed', deepspeed.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

step 60 "fused LIF vs reference on CUDA (pytest)" \
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/models/test_lif_triton.py -k compiled_kernels_on_cuda

step 75 "LIF micro-benchmark (64M elements, T = 1 and 4)" \
    "$PYTHON" benchmarks/lif_speed.py --T 1 4 --elements 64M --dtype float32 bfloat16 --iters 20 \
    --note "gpu_check.sh"

step 150 "172M (16-768, T = 1, 224 px) pretrain + finetune step, bf16, ZeRO-2" \
    "$PYTHON" benchmarks/train_step.py spikformer_v2_16_768 --mode pretrain finetune --T 1 --img 224 \
    --batch "${BATCH_172M:-64}" --steps 10 --warmup 3 --zero 2 --precision bf16 --note "gpu_check.sh; fused LIF (auto)"

step 75 "8-512, T = 4, finetune step, bf16, ZeRO-2" \
    "$PYTHON" benchmarks/train_step.py spikformer_v2_8_512 --mode finetune --T 4 --img 224 \
    --batch 32 --steps 10 --warmup 3 --zero 2 --precision bf16 --note "gpu_check.sh; fused LIF (auto)"

step 40 "8-512, T = 4, forward+backward, fused LIF (fp32 eager)" \
    "$PYTHON" benchmarks/model_speed.py spikformer_v2_8_512 --T 4 --batch 32 --steps 5 --warmup 2 --fused \
    --note "gpu_check.sh"

step 40 "8-512, T = 4, forward+backward, PyTorch LIF (fp32 eager)" \
    "$PYTHON" benchmarks/model_speed.py spikformer_v2_8_512 --T 4 --batch 32 --steps 5 --warmup 2 \
    --note "gpu_check.sh"

echo
echo "=== [$(( $(date +%s) - START ))s] done, status $STATUS"
echo "----- BEGIN docs/BENCHMARKS.md additions -----"
tail -n +"$(( DOC_LINES + 1 ))" "$DOC"
echo "----- END docs/BENCHMARKS.md additions -----"
if [ -n "$OUT_DIR" ]; then
    tail -n +"$(( DOC_LINES + 1 ))" "$DOC" > "$OUT_DIR/benchmarks_gpu.md"
fi
exit $STATUS
