#!/usr/bin/env bash
# The GPU path, validated and measured in one run on one lent H200: at most 570 s, inside the 600 s one
# device command may run (the issue allows 12 minutes; a command cannot); GPU_CHECK_BUDGET=SECONDS changes it.
#
#   bash benchmarks/gpu_wheels.sh                    # here, once: the wheels the image lacks -> .whl/
#   bash benchmarks/gpu_check.sh                     # there, from the repository root, .whl carried
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh     # anywhere: every step on the CPU at tiny sizes
#
# On the GPU the carried wheels are installed into /tmp/site (pip --no-index --no-deps --target, then
# PYTHONPATH) and the image's python3 runs everything. The dry run uses the project's venv instead,
# with benchmarks/device_sim on PYTHONPATH: the venv's packages that the image lacks and no wheel
# carries (Ray, Flask, boto3, ...) are hidden, so it fails where the GPU run would on a missing import.
#
# Steps, in order; each has its own timeout. [estimate on an H200 / limit]; the limits add up to more
# than the cap, which trims the last ones:
#   env            versions, GPU, every needed import, pip check of the carried set           [10 s / 20]
#   cuda_tests     tests/models/test_lif_triton.py (compiled Triton LIF kernels), tests/data/test_data_read_gpu.py
#                  (nvJPEG decode + GPU crop/flip loader), tests/models/test_host_sync.py and the
#                  bf16 spike-attention products against float64 (tests/models/test_attention_products.py)
#                  on CUDA                                                                    [60 s / 90]
#   lif_bench      LIF reference vs fused, T = 1 and 4, 64M elements, fp32 and bf16, GB/s
#                  against the measured copy bandwidth (benchmarks/lif_speed.py)             [30 s / 60]
#   step_eager     spikformer_v2_16_768 (172M), T = 1, 224 px, bf16, batch 64, 128 and 256: pretraining
#                  and finetuning step, images/s, MFU vs measured bf16 matmul, peak memory, best batch
#                  per mode                                                                  [60 s / 90]
#   chain          torchrun -> pipeline.launch_local: synthetic 224 px shards, pretrain, finetune,
#                  evaluate of spikformer_v2_8_512 (30 steps each), DeepSpeed ZeRO-2 bf16, nccl,
#                  MLflow sqlite; all runs FINISHED (benchmarks/gpu_chain.py)               [100 s / 170]
#   step_compiled  step_eager under torch.compile (Inductor) at batch 256, then 128, then 64 while the
#                  time lasts (each batch is its own compilation; gpu_step.py --budget-s skips a run that
#                  would not fit); dynamo's graphs / breaks / recompiles per run; the best run's
#                  top 15 kernels by CUDA time per mode (torch.profiler, 3 steps)           [~80 s a run]
#   pipeline_efficiency  benchmarks/pipeline_efficiency.py: the pretraining stage (DeepSpeed, shard
#                  loader, 14 workers, CPU and GPU decode) against the plain step at the best compiled
#                  pretraining batch; PIPELINE_EFFICIENCY_S (150) of the cap are kept for it  [the rest]
# A step never gets more than what is left of the cap (the summary keeps 15 s): the last one gets the rest.
#
# $OUT (default outputs/gpu_check) receives one JSON per step (status, time, log tail, results) and
# summary.md: a dated section to paste into docs/BENCHMARKS.md. That is 8 files, the most a lent
# machine sends back. Exit status 1 when any step did not pass (the summary then says FAILED).
# Knobs: GPU_CHECK_STEPS=chain,step_compiled (run only these, e.g. a rerun of what failed), BATCHES_172M
# ("64 128 256" eager; the compiled sweep takes them largest first), PIPELINE_EFFICIENCY_S, PYTHON,
# GPU_CHECK_WORK (scratch folder; default a temp folder), GPU_CHECK_COMMIT (when there is no .git).
set -u -o pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
DRY=${GPU_CHECK_DRY:-0}
[ "$DRY" = 0 ] || DRY=1
OUT_DIR=${OUT:-outputs/gpu_check}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=${GPU_CHECK_WORK:-$(mktemp -d)}
mkdir -p "$WORK"
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-$(( DRY ? 3600 : 570 ))}
STEPS=()

if [ "$DRY" = 1 ]; then
    PYTHON=${PYTHON:-.venv/bin/python}
    export PYTHONPATH="$REPO/benchmarks/device_sim:$REPO${PYTHONPATH:+:$PYTHONPATH}"
    export DEVICE_SIM_HIDDEN=$WORK/device_sim_hidden.json DEVICE_SIM_LOG=$WORK/device_sim_hidden_imports.log
    export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    PYTHON=${PYTHON:-python3}
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "gpu_check: no .whl/*.whl: run benchmarks/gpu_wheels.sh here and carry .whl"
        exit 2
    fi
    echo "=== installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "gpu_check: installing the wheels failed"; exit 2; }
    export PYTHONPATH="/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

COMMIT=${GPU_CHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}

wanted() { [ -z "${GPU_CHECK_STEPS:-}" ] || [[ ",$GPU_CHECK_STEPS," == *",$1,"* ]]; }

# step NAME LIMIT [--result|--junit|--no-skips ...] -- COMMAND...: run under its own timeout, then record
step() {
    local name=$1 limit=$2
    shift 2
    wanted "$name" || return 0
    local report=()
    while [ "$1" != "--" ]; do report+=("$1"); shift; done
    shift
    STEPS+=("$name")
    local left=$(( BUDGET - 15 - ($(date +%s) - START) ))
    (( limit > left )) && limit=$left
    echo
    echo "=== [$(( $(date +%s) - START ))s] $name (limit ${limit}s): $*"
    local began=$(date +%s) rc
    if (( limit < 5 )); then
        echo "out of time" > "$WORK/$name.log"
        rc=124
    else
        GPU_CHECK_STEP_LIMIT=$limit timeout -k 10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
        rc=${PIPESTATUS[0]}
    fi
    "$PYTHON" benchmarks/gpu_report.py step --name "$name" --rc "$rc" --seconds "$(( $(date +%s) - began ))" \
        --limit "$limit" --log "$WORK/$name.log" --out "$OUT_DIR/$name.json" "${report[@]}"
}

absent() {  # absent NAME WHY: a step that does not apply here
    wanted "$1" || return 0
    STEPS+=("$1")
    "$PYTHON" benchmarks/gpu_report.py step --name "$1" --rc 0 --seconds 0 --limit 0 --absent "$2" \
        --out "$OUT_DIR/$1.json"
}

if [ "$DRY" = 1 ]; then
    # the CUDA-only tests skip; the interpreter LIF tests, the CPU decode tests, host_sync and the CPU
    # attention-product tests run
    CUDA_K="odd_shapes or non_contiguous or compiled_kernels_on_cuda or test_data_read_gpu or test_host_sync or products"
    LIF_SIZE=(--elements 64K --iters 2 --device cpu)
    STEP_ARGS=(spikformer_v2_tiny --img 32 --steps 2 --warmup 1 --precision fp32 --device cpu --threads 1)
    EAGER_BATCHES=(2 4) COMPILED_BATCHES=(4 2)
    COMPILE=(--compile --compile-backend aot_eager)  # tracing without Inductor's C++ build: minutes on 2 CPUs
    EFFICIENCY_ARGS=(--variant spikformer_v2_tiny --img-size 32 --workers 1 --decode cpu --steps 2 --warmup 2
                     --log-every 2 --threads 1)
    NO_SKIPS=() ENV_ARGS=() CHAIN_ARGS=(--dry) L=(60 420 120 200 400 500 600)
else
    CUDA_K="compiled_kernels_on_cuda or test_data_read_gpu or test_host_sync or products"  # those modules
    LIF_SIZE=(--elements 64M --iters 20 --device cuda)
    STEP_ARGS=(spikformer_v2_16_768 --T 1 --img 224 --steps 10 --warmup 3 --precision bf16)
    read -r -a EAGER_BATCHES <<< "${BATCHES_172M:-64 128 256}"
    mapfile -t COMPILED_BATCHES < <(printf '%s\n' "${EAGER_BATCHES[@]}" | sort -rn)
    COMPILE=(--compile)
    # --log-every 5: the window (warm-up 15, 60 steps) starts and ends at log steps
    # kNN bank/eval capped so the step fits its reserve; the JSON records the sizes its kNN cost is for
    EFFICIENCY_ARGS=(--variant spikformer_v2_16_768 --img-size 224 --workers 14 --decode cpu,gpu --steps 60
                     --warmup 15 --log-every 5 --knn-bank 2000 --knn-eval 512)
    NO_SKIPS=(--no-skips) ENV_ARGS=(--expect-cuda) CHAIN_ARGS=() L=(20 90 60 90 170 600 600)
fi
echo "=== gpu_check $(date -u +%FT%TZ) commit $COMMIT" \
     "$([ "$DRY" = 1 ] && echo '(DRY RUN on the CPU)')"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null || true

step env "${L[0]}" --result "$WORK/env.result.json" -- \
    "$PYTHON" benchmarks/gpu_env.py --json "$WORK/env.result.json" "${ENV_ARGS[@]}"

step cuda_tests "${L[1]}" --junit "$WORK/cuda_tests.xml" "${NO_SKIPS[@]}" -- \
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/models/test_lif_triton.py tests/data/test_data_read_gpu.py \
    tests/models/test_host_sync.py tests/models/test_attention_products.py -k "$CUDA_K" --junitxml "$WORK/cuda_tests.xml"

step lif_bench "${L[2]}" --result "$WORK/lif_bench.result.json" -- \
    "$PYTHON" benchmarks/gpu_lif.py --json "$WORK/lif_bench.result.json" --T 1 4 --dtype float32 bfloat16 \
    "${LIF_SIZE[@]}"

step step_eager "${L[3]}" --result "$WORK/step_eager.result.json" -- \
    "$PYTHON" benchmarks/gpu_step.py "${STEP_ARGS[@]}" --batch "${EAGER_BATCHES[@]}" \
    --json "$WORK/step_eager.result.json"

step chain "${L[4]}" --result "$WORK/chain.result.json" -- \
    "$PYTHON" benchmarks/gpu_chain.py --work "$WORK/chain" --json "$WORK/chain.result.json" "${CHAIN_ARGS[@]}"

# the compiled sweep leaves PIPELINE_EFFICIENCY_S of the cap to the last step
reserve=$(( DRY ? 0 : ${PIPELINE_EFFICIENCY_S:-150} ))
wanted pipeline_efficiency || reserve=0
compiled_limit=$(( BUDGET - 15 - ($(date +%s) - START) - reserve ))
(( compiled_limit > L[5] )) && compiled_limit=${L[5]}
step step_compiled "$compiled_limit" --result "$WORK/step_compiled.result.json" -- \
    "$PYTHON" benchmarks/gpu_step.py "${STEP_ARGS[@]}" --batch "${COMPILED_BATCHES[@]}" "${COMPILE[@]}" \
    --profile-steps 3 --budget-s "$(( compiled_limit > 40 ? compiled_limit - 20 : compiled_limit ))" \
    --json "$WORK/step_compiled.result.json"

# the best pretraining batch: the compiled sweep's, else the eager one's, else 64
best_batch() {
    "$PYTHON" - "$WORK/step_compiled.result.json" "$WORK/step_eager.result.json" <<'PY'
import json, sys
for path in sys.argv[1:]:
    try:
        print(json.load(open(path))["best"]["pretrain"]["batch"])
        break
    except (OSError, ValueError, KeyError):
        continue
else:
    print(64)
PY
}
if [ -f benchmarks/pipeline_efficiency.py ]; then
    step pipeline_efficiency "${L[6]}" --result "$WORK/pipeline_efficiency.result.json" -- \
        "$PYTHON" benchmarks/pipeline_efficiency.py "${EFFICIENCY_ARGS[@]}" --batch "$(best_batch)" \
        --work "$WORK/pipeline_efficiency" --json "$WORK/pipeline_efficiency.result.json"
else
    absent pipeline_efficiency "benchmarks/pipeline_efficiency.py does not exist at this commit: skipped"
fi

echo
echo "=== [$(( $(date +%s) - START ))s] summary ($OUT_DIR/summary.md)"
summary_args=(--dir "$OUT_DIR" --steps "$(IFS=,; echo "${STEPS[*]}")" --commit "$COMMIT")
[ "$DRY" = 1 ] && summary_args+=(--dry --hidden-log "$DEVICE_SIM_LOG")
"$PYTHON" benchmarks/gpu_report.py summary "${summary_args[@]}"
