#!/usr/bin/env bash
# One command on a GPU machine: build, check and time ogpsa, writing everything to one folder.
#
#   benchmarks/gpu_check.sh [--dry-run] [OUTDIR]     (default OUTDIR: $OUT, else ./gpu_check_out)
#
# Needs python3 with torch (CUDA) and triton, nvcc for the CUDA extension, no network (the
# package installs with --no-deps --no-build-isolation --no-index). Stages, with their time
# limits (sized for a cold first run) and expected times on an H100 host with 16 cores:
#   stage      limit  expected  what
#   env          30      5 s    GPU name, driver, nvcc, python/torch/triton versions, date, commit
#   install     300    150 s    pip install -e . with the CUDA extension for this GPU's arch
#                               (ops_cuda.cu alone: 114 s for sm_80+sm_90 on 2 shared cores here)
#   info         30      5 s    ogpsa info --json (are the cuda and triton backends available?)
#   selftest     30      5 s    ogpsa info --selftest: every backend x device x dtype x space against
#                               the torch backend on a small random problem (selftest.txt)
#   warmup      120     30 s    benchmarks/gpu_warmup.py: every Triton variant the tests and the
#                               benchmark use (180 compiles: 40 (k, dtypes, aligned) items x 4
#                               projection kernels + 20 others; configs are fixed, nothing is
#                               autotuned) compiled in 8 parallel processes into Triton's disk
#                               cache, so later stages load binaries: 180 x 0.6 s / 8 + 15 s
#   tests       180     90 s    pytest -m "not slow": the kernel files, ops/projector, then every
#                               gpu-marked test (3 pytest processes in parallel)
#   memcheck     45     20 s    compute-sanitizer --tool memcheck  on benchmarks/gpu_sanitize_case.py
#   racecheck    45     20 s    compute-sanitizer --tool racecheck (shared-memory races)
#   initcheck    45     20 s    compute-sanitizer --tool initcheck (reads of uninitialised memory)
#   deepspeed    45     20 s    benchmarks/gpu_deepspeed_check.py (real ZeRO-2; skips without deepspeed)
#   bench      rest    120 s    ogpsa bench --suite gpu (explicit warm-up calls, then timed samples)
#   loop         60     30 s    ogpsa bench --suite loop (a training loop with zero_grad)
#   adamw        30     20 s    ogpsa bench --suite adamw (ProjectedAdamW per backend vs torch AdamW
#                               foreach/fused + a separate gradient projection; lora and 125m lists)
#   summary               1 s   one line per target: met or short
# Expected total ~530 s; the whole run is held to GPU_CHECK_SECONDS (default 540 s, 9 minutes):
# each stage's limit is cut to what is left after the reserve of the stages after it.
#
# --dry-run (or GPU_CHECK_DRY_RUN=1, or automatically when no CUDA GPU is visible): every stage
# is listed as skipped with the reason and the command it would run; the plan and the estimate
# are printed, nothing is built or timed, exit 0. tests/test_gpu_check.py runs it in `make test`.
#
# Every stage runs even when an earlier one failed; each stage's status and time go to
# stages.tsv; the script exits 1 if any stage failed. Knobs: GPU_CHECK_SKIP="install memcheck
# ..." skips stages by name (recorded as skipped); GPU_CHECK_BENCH_ARGS replaces "--suite gpu";
# TORCH_CUDA_ARCH_LIST overrides the detected architecture; OGPSA_GIT_COMMIT names the commit
# when the tree has no .git; PYTHON picks the interpreter (default python3).
#
# Output folder: env.txt stages.tsv gpu_check.log info.json tests*.xml results.json results.md
# bench.png loop.json loop.md adamw.json adamw.md summary.txt. Commit results.*, bench.png, loop.*,
# adamw.*, summary.txt and env.txt under benchmarks/results/<machine>/<date>/ (env.txt names the folder).
set -u
cd "$(dirname "$0")/.."
DRY="${GPU_CHECK_DRY_RUN:-0}"
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUTDIR="${1:-${OUT:-$PWD/gpu_check_out}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
LOG="$OUTDIR/gpu_check.log"
STAGES="$OUTDIR/stages.tsv"
PY="${PYTHON:-python3}"
START=$(date +%s)
BUDGET="${GPU_CHECK_SECONDS:-540}"
: >"$LOG"
printf 'stage\tstatus\tseconds\tdetail\n' >"$STAGES"
FAILED=0
export PYTHONUNBUFFERED=1

DRY_WHY="dry run (--dry-run)"
if [[ "$DRY" != 1 ]]; then
    if ! command -v "$PY" >/dev/null; then
        DRY=1; DRY_WHY="dry run: $PY not found"
    elif ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
        DRY=1; DRY_WHY="dry run: no CUDA GPU visible to torch"
    fi
fi
[[ "$DRY" == 1 ]] && echo "gpu_check: $DRY_WHY; every stage is skipped" | tee -a "$LOG"

remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }

# run_stage NAME LIMIT_SECONDS COMMAND...: limit = min(LIMIT, time left - RESERVE for later stages)
run_stage() {
    local name="$1" limit="$2" reserve="${RESERVE:-0}"
    shift 2
    if [[ "$DRY" == 1 ]]; then
        local extra=""
        [[ -n "${NEEDS:-}" ]] && ! command -v "$NEEDS" >/dev/null && extra="; $NEEDS not found here"
        printf '%s\tskipped\t0\t%s%s; would run (limit %ss): %s\n' "$name" "$DRY_WHY" "$extra" "$limit" "$*" >>"$STAGES"
        echo "== $name: skipped ($DRY_WHY$extra); would run with limit ${limit}s: $*" | tee -a "$LOG"
        return
    fi
    if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
        printf '%s\tskipped\t0\tGPU_CHECK_SKIP\n' "$name" >>"$STAGES"
        echo "== $name: skipped (GPU_CHECK_SKIP)" | tee -a "$LOG"
        return
    fi
    local left=$(( $(remaining) - reserve ))
    (( left < limit )) && limit=$left
    if (( limit < 5 )); then
        printf '%s\tSKIPPED\t0\tno time left\n' "$name" >>"$STAGES"
        echo "== $name: SKIPPED (no time left)" | tee -a "$LOG"
        FAILED=1
        return
    fi
    echo "== $name (limit ${limit}s): $*" >>"$LOG"
    local t0=$(date +%s) rc
    # bash -c so that stages may be shell functions (exported below with export -f)
    timeout --kill-after=10 "$limit" bash -c '"$@"' stage "$@" >>"$LOG" 2>&1
    rc=$?
    local dt=$(( $(date +%s) - t0 )) status=ok
    if (( rc == 124 || rc == 137 )); then status=TIMEOUT; elif (( rc != 0 )); then status=FAIL; fi
    [[ $status != ok ]] && FAILED=1
    printf '%s\t%s\t%s\texit %s\n' "$name" "$status" "$dt" "$rc" >>"$STAGES"
    echo "== $name: $status (exit $rc, ${dt}s)" | tee -a "$LOG"
}

# ---- env ------------------------------------------------------------------------------
COMMIT="${OGPSA_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
export OGPSA_GIT_COMMIT="$COMMIT"
write_env() {
    {
        echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
        echo "git_commit: $COMMIT"
        echo "host: $(hostname)"
        echo "kernel: $(uname -r)"
        echo "nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader 2>&1 | head -1)"
        echo "nvcc: $(nvcc --version 2>/dev/null | tail -1 || echo 'not found')"
        echo "compute-sanitizer: $(command -v compute-sanitizer || echo 'not found')"
        "$PY" - <<'PYEOF'
import platform, torch
print("python:", platform.python_version())
print("torch:", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu:", torch.cuda.get_device_name(0), f"capability {p.major}.{p.minor}", f"{p.multi_processor_count} SMs",
          f"{p.total_memory / 2**30:.1f} GiB")
else:
    print("gpu: none visible to torch")
try:
    import triton
    print("triton:", triton.__version__)
except Exception as exc:
    print("triton: not importable", exc)
for name in ("trl", "transformers", "peft", "matplotlib", "pytest_benchmark", "deepspeed"):
    try:
        mod = __import__(name)
        print(f"{name}:", getattr(mod, "__version__", "present"))
    except Exception:
        print(f"{name}: absent")
import datetime, re
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
print(f"results_folder: benchmarks/results/{slug}/{datetime.date.today().isoformat()}/")
PYEOF
    } >"$OUTDIR/env.txt" 2>&1
    cat "$OUTDIR/env.txt"
}
export OUTDIR PY COMMIT
export -f write_env
RESERVE=480 run_stage env 30 write_env

# ---- install with the CUDA extension for this GPU -----------------------------------------
if [[ "$DRY" != 1 ]]; then
    ARCH="${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)}"
    export TORCH_CUDA_ARCH_LIST="${ARCH:-9.0}"
fi
export OGPSA_BUILD_CUDA=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then export CUDA_HOME=/usr/local/cuda; fi
NEEDS=nvcc RESERVE=330 run_stage install 300 "$PY" -m pip install --no-deps --no-build-isolation --no-index -v -e .

# ---- info -------------------------------------------------------------------------------
info_json() {
    "$PY" -m ogpsa.cli info --json >"$OUTDIR/info.json" || return 1
    "$PY" - "$OUTDIR/info.json" <<'PYEOF'
import json, sys
d = json.load(open(sys.argv[1]))
for name, b in d["backends"].items():
    print(f"backend {name}: {'yes' if b['available'] else 'no'}  {b['detail']}")
missing = [n for n in ("cuda", "triton") if not d["backends"][n]["available"]]
sys.exit(f"GPU backends unavailable: {missing}" if missing else 0)
PYEOF
}
export -f info_json
RESERVE=320 run_stage info 30 info_json

# ---- first contact: every compiled backend checked against the torch backend (exit 1 on a mismatch)
selftest_table() { set -o pipefail; "$PY" -m ogpsa.cli info --selftest | tee "$OUTDIR/selftest.txt"; }
export -f selftest_table
RESERVE=300 run_stage selftest 30 selftest_table

# ---- compile every kernel variant once, in parallel, before anything is timed ---------------
RESERVE=290 run_stage warmup 120 "$PY" benchmarks/gpu_warmup.py

# ---- GPU tests (3 pytest processes side by side: compiles are per process) ------------------
gpu_tests() {
    local a=() b=() c=() f
    for f in tests/test_triton.py tests/test_kernels_paths.py tests/test_kernels_determinism.py; do [[ -f $f ]] && a+=("$f"); done
    for f in tests/test_cext.py tests/test_kernels_compiled.py; do [[ -f $f ]] && b+=("$f"); done
    for f in tests/test_ops.py tests/test_projector.py tests/test_bench_smoke.py; do [[ -f $f ]] && c+=("$f"); done
    local opts=(-q -m "not slow" -p no:cacheprovider)
    "$PY" -m pytest "${opts[@]}" --junitxml="$OUTDIR/tests1.xml" "${a[@]}" >"$OUTDIR/tests1.log" 2>&1 & local p1=$!
    "$PY" -m pytest "${opts[@]}" --junitxml="$OUTDIR/tests2.xml" "${b[@]}" >"$OUTDIR/tests2.log" 2>&1 & local p2=$!
    "$PY" -m pytest "${opts[@]}" --junitxml="$OUTDIR/tests3.xml" "${c[@]}" >"$OUTDIR/tests3.log" 2>&1 & local p3=$!
    local rc=0
    wait $p1 || rc=1; wait $p2 || rc=1; wait $p3 || rc=1
    tail -n 3 "$OUTDIR"/tests[123].log
    # gpu-marked tests anywhere else (trl-dependent files skip through importorskip); 5 = none collected
    "$PY" -m pytest -q -m "gpu and not slow" -p no:cacheprovider tests \
        $(printf -- '--ignore=%s ' "${a[@]}" "${b[@]}" "${c[@]}") || { r=$?; (( r != 5 )) && rc=1; }
    rm -f "$OUTDIR"/tests[123].log.tmp
    return $rc
}
export -f gpu_tests
RESERVE=260 run_stage tests 180 gpu_tests

# ---- compute-sanitizer on a small case (Triton binaries come from the warm disk cache) --------
sanitize() {
    command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not found"; return 1; }
    local extra=()
    [[ "$1" == racecheck ]] && extra=(--racecheck-report all)
    compute-sanitizer --tool "$1" "${extra[@]}" --error-exitcode 9 --print-limit 20 "$PY" benchmarks/gpu_sanitize_case.py
}
export -f sanitize
NEEDS=compute-sanitizer RESERVE=215 run_stage memcheck 45 sanitize memcheck
NEEDS=compute-sanitizer RESERVE=195 run_stage racecheck 45 sanitize racecheck
NEEDS=compute-sanitizer RESERVE=175 run_stage initcheck 45 sanitize initcheck

# ---- DeepSpeed ZeRO-2 on the GPU (exits 0 with status "skipped" when deepspeed is absent) -----
if [[ -f benchmarks/gpu_deepspeed_check.py ]]; then
    RESERVE=150 run_stage deepspeed 45 "$PY" benchmarks/gpu_deepspeed_check.py
fi

# ---- benchmark: its own warm-up calls come before the timed samples; kernels are compiled ------
LEFT=$(( $(remaining) - 105 ))
(( LEFT < 60 )) && LEFT=60
MINUTES=$(awk -v s="$LEFT" 'BEGIN { m = (s - 30) / 60; if (m < 0.5) m = 0.5; printf "%.2f", m }')
# shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS is a list of words on purpose
RESERVE=100 run_stage bench "$LEFT" "$PY" -m ogpsa.cli bench --out "$OUTDIR" --max-minutes "$MINUTES" \
    ${GPU_CHECK_BENCH_ARGS:---suite gpu}

# ---- the loop suite: a training loop with zero_grad(set_to_none=True) ---------------------------
RESERVE=35 run_stage loop 60 "$PY" -m ogpsa.cli bench --suite loop --out "$OUTDIR" --no-plot

# ---- the projected-AdamW suite: every backend of the update-space step vs torch AdamW ----------
RESERVE=5 run_stage adamw 30 "$PY" -m ogpsa.cli bench --suite adamw --out "$OUTDIR" --budget-s 1 --max-minutes 0.3

# ---- summary ---------------------------------------------------------------------------------
echo "== total $(( $(date +%s) - START ))s; stages:" | tee -a "$LOG"
column -t -s $'\t' "$STAGES" 2>/dev/null || cat "$STAGES"
WHY=""
[[ "$DRY" == 1 ]] && WHY="$DRY_WHY"
if command -v "$PY" >/dev/null && "$PY" -c 'import sys' 2>/dev/null; then
    "$PY" benchmarks/gpu_summary.py "$OUTDIR" "$WHY" | tee "$OUTDIR/summary.txt" | tee -a "$LOG"
else
    echo "target: none measured ($PY not found)" | tee "$OUTDIR/summary.txt"
fi
if [[ "$DRY" == 1 ]]; then
    "$PY" benchmarks/gpu_warmup.py --estimate --workers 8 2>/dev/null | sed 's/^/warmup plan: /' | tee -a "$LOG"
    echo "gpu_check: dry run finished; nothing was built, run or timed"
    exit 0
fi
if (( FAILED )); then
    echo "gpu_check: SOME STAGES FAILED (see $STAGES and $LOG)" >&2
    exit 1
fi
echo "gpu_check: all stages ok; results in $OUTDIR"
