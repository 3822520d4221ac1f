#!/usr/bin/env bash
# One command on a GPU machine: build, check and time ogpsa, writing everything to one folder.
#
#   benchmarks/gpu_check.sh [OUTDIR]        (default: $OUT, else ./gpu_check_out)
#
# Needs python3 with torch (CUDA) and triton, nvcc for the CUDA extension, no network
# (no pip downloads: the package installs with --no-deps --no-build-isolation). Stages:
#   env        GPU name, driver, nvcc, python/torch/triton versions, date, commit
#   install    pip install -e . with the CUDA extension built for this GPU's architecture
#   info       ogpsa info --json (are the cuda and triton backends available?)
#   tests      pytest -m "not slow" on the CUDA-relevant test files, then every gpu-marked
#              test; tests needing trl skip cleanly when trl is absent
#   sanitizer  compute-sanitizer memcheck on benchmarks/gpu_sanitize_case.py
#   deepspeed  benchmarks/gpu_deepspeed_check.py (real ZeRO-2 engine; skips without deepspeed)
#   bench      ogpsa bench --suite gpu (JSON + markdown + PNG)
# Every stage runs even when an earlier one failed; each stage's status and time go to
# stages.tsv; the script exits 1 if any stage failed. The whole run is held to
# GPU_CHECK_SECONDS (default 520 s, under 9 minutes): every stage gets a time limit and
# the benchmark stops starting new cases when its share is spent.
# Knobs: GPU_CHECK_SKIP="install sanitizer ..." skips stages by name (recorded as skipped);
# GPU_CHECK_BENCH_ARGS replaces "--suite gpu"; TORCH_CUDA_ARCH_LIST overrides the detected
# architecture; OGPSA_GIT_COMMIT names the commit when the tree has no .git; PYTHON picks
# the interpreter (default python3).
#
# Output folder (8 files, so that it fits a file-count limit of 8):
#   env.txt stages.tsv gpu_check.log info.json tests.xml results.json results.md bench.png
# Commit results.json, results.md, bench.png and env.txt under
# benchmarks/results/<machine>/<date>/ (env.txt names the folder).
set -u
cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-$PWD/gpu_check_out}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
LOG="$OUTDIR/gpu_check.log"
STAGES="$OUTDIR/stages.tsv"
PY="${PYTHON:-python3}"
START=$(date +%s)
BUDGET="${GPU_CHECK_SECONDS:-520}"
: >"$LOG"
printf 'stage\tstatus\tseconds\tdetail\n' >"$STAGES"
FAILED=0
export PYTHONUNBUFFERED=1

remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }

# run_stage NAME LIMIT_SECONDS COMMAND...: limit = min(LIMIT, time left - reserve for later stages)
run_stage() {
    local name="$1" limit="$2" reserve="${RESERVE:-0}"
    shift 2
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
        "$PY" - <<'EOF'
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
for name in ("trl", "transformers", "peft", "matplotlib", "pytest_benchmark"):
    try:
        mod = __import__(name)
        print(f"{name}:", getattr(mod, "__version__", "present"))
    except Exception:
        print(f"{name}: absent")
import datetime, re
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
print(f"results_folder: benchmarks/results/{slug}/{datetime.date.today().isoformat()}/")
EOF
    } >"$OUTDIR/env.txt" 2>&1
    cat "$OUTDIR/env.txt"
}
export OUTDIR PY COMMIT
export -f write_env
run_stage env 60 write_env

# ---- install with the CUDA extension for this GPU -----------------------------------------
ARCH="${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)}"
export TORCH_CUDA_ARCH_LIST="${ARCH:-9.0}"
export OGPSA_BUILD_CUDA=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then export CUDA_HOME=/usr/local/cuda; fi
RESERVE=250 run_stage install 180 "$PY" -m pip install --no-deps --no-build-isolation --no-index -v -e .

# ---- info -------------------------------------------------------------------------------
info_json() {
    "$PY" -m ogpsa.cli info --json >"$OUTDIR/info.json" || return 1
    "$PY" - "$OUTDIR/info.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
for name, b in d["backends"].items():
    print(f"backend {name}: {'yes' if b['available'] else 'no'}  {b['detail']}")
missing = [n for n in ("cuda", "triton") if not d["backends"][n]["available"]]
sys.exit(f"GPU backends unavailable: {missing}" if missing else 0)
EOF
}
export -f info_json
RESERVE=250 run_stage info 30 info_json

# ---- GPU tests --------------------------------------------------------------------------
gpu_tests() {
    local files=() f rc=0
    for f in tests/test_cext.py tests/test_triton.py tests/test_ops.py tests/test_projector.py tests/test_bench_smoke.py; do
        [[ -f $f ]] && files+=("$f")
    done
    "$PY" -m pytest -q -m "not slow" -p no:cacheprovider --junitxml="$OUTDIR/tests.xml" "${files[@]}" || rc=1
    # gpu-marked tests anywhere else (trl-dependent files skip through importorskip)
    "$PY" -m pytest -q -m "gpu and not slow" -p no:cacheprovider tests \
        $(printf -- '--ignore=%s ' "${files[@]}") || { r=$?; (( r != 5 )) && rc=1; }
    return $rc
}
export -f gpu_tests
RESERVE=190 run_stage tests 120 gpu_tests

# ---- compute-sanitizer on a small case -----------------------------------------------------
sanitize() {
    command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not found"; return 1; }
    compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 "$PY" benchmarks/gpu_sanitize_case.py
}
export -f sanitize
RESERVE=170 run_stage sanitizer 80 sanitize

# ---- DeepSpeed ZeRO-2 on the GPU (exits 0 with status "skipped" when deepspeed is absent) -----
if [[ -f benchmarks/gpu_deepspeed_check.py ]]; then
    RESERVE=150 run_stage deepspeed 60 "$PY" benchmarks/gpu_deepspeed_check.py
fi

# ---- benchmark ----------------------------------------------------------------------------
LEFT=$(( $(remaining) - 15 ))
MINUTES=$("$PY" -c "print(max(0.5, ($LEFT - 60) / 60))")
# shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS is a list of words on purpose
RESERVE=5 run_stage bench "$LEFT" "$PY" -m ogpsa.cli bench --out "$OUTDIR" --max-minutes "$MINUTES" \
    ${GPU_CHECK_BENCH_ARGS:---suite gpu}

echo "== total $(( $(date +%s) - START ))s; stages:" | tee -a "$LOG"
column -t -s $'\t' "$STAGES" 2>/dev/null || cat "$STAGES"
[[ -f "$OUTDIR/results.md" ]] && sed -n '/## Targets/,$p' "$OUTDIR/results.md"
if (( FAILED )); then
    echo "gpu_check: SOME STAGES FAILED (see $STAGES and $LOG)" >&2
    exit 1
fi
echo "gpu_check: all stages ok; results in $OUTDIR"
