#!/usr/bin/env bash
# One GPU run of the benchmark, made for a fresh, offline GPU machine (e.g. the lent H100/H200) with
# python3, torch, triton and pytest(-benchmark) preinstalled and no package registry. It finishes in
# under 10 minutes (TOTAL_S, default 540 s, is a hard budget; rows it has no time left for are
# reported 'skipped: time budget'):
#
#   1. installs the peer wheels from bench/wheels/ (Liger-Kernel, Cut Cross-Entropy) into /tmp,
#   2. sets PYTHONPATH to this checkout (no pip install of the project needed),
#   3. runs the GPU tests (pytest -m gpu tests/; with --full also bench/test_bench_gpu.py),
#   4. runs python -m bench (default: sft and grpo, then logprobs and hpt, on llama3-8b, qwen2.5-7b and
#      gemma2-2b at N=8192, bf16, fwd+bwd, against every baseline), and
#   5. writes everything to one folder: results.json, results.md, results.png, gpu_run.log,
#      pytest_gpu.log, pytest_benchmark.json, env.txt (7 files; no subfolders).
#
# Usage: bash bench/gpu_run.sh [--quick | --full] [--skip-tests] [--out DIR] [-- extra bench args]
#   --quick       (default) few iterations per row, 2 rotating input sets: fits 10 minutes
#   --full        no --quick (more iterations, 3 input sets), also bench/test_bench_gpu.py, all modes;
#                 for a longer session: set TOTAL_S accordingly
#   --skip-tests  benchmark only
#   --out DIR     output folder (default: $OUT if set, else bench/results/<date>-<device>)
#   -- ARGS       appended to the bench command line (later options win), e.g.
#                 -- --ops logprobs,hpt      or      -- --N 32768 --shapes llama3-8b
# Environment: TOTAL_S (540), TEST_S (cap on the GPU tests, 90), WHEELS (bench/wheels),
#   UPG_BENCH_GIT_COMMIT (the commit to record when the copied checkout has no .git),
#   ALLOW_CPU=1 (dry run without a GPU; pass small shapes after --, e.g. -- --shapes tiny --N 256).
set -uo pipefail

T0=$(date +%s)
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

MODE=quick
RUN_TESTS=1
OUT_DIR="${OUT:-}"
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) MODE=quick ;;
        --full) MODE=full ;;
        --skip-tests) RUN_TESTS=0 ;;
        --out) OUT_DIR="$2"; shift ;;
        --) shift; EXTRA=("$@"); break ;;
        *) echo "gpu_run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

TOTAL_S="${TOTAL_S:-540}"
TEST_S="${TEST_S:-90}"
WHEELS="${WHEELS:-$ROOT/bench/wheels}"
PY="${PYTHON:-python3}"

if [ -z "$OUT_DIR" ]; then
    SLUG=$($PY -c "import torch,re; n=torch.cuda.get_device_name(0).lower().replace('nvidia','') if torch.cuda.is_available() else 'cpu'; print(re.sub(r'[^a-z0-9.]+','-',n).strip('-'))" 2>/dev/null || echo unknown)
    OUT_DIR="$ROOT/bench/results/$(date -u +%Y-%m-%d)-$SLUG"
fi
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_run.log"
: > "$LOG"
log() { echo "[gpu_run +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
left() { echo $(( TOTAL_S - ($(date +%s) - T0) )); }

log "checkout $ROOT, mode $MODE, budget ${TOTAL_S}s, output $OUT_DIR"

# ---------------------------------------------------------------- environment
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    if git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1; then
        echo "git: $(git -C "$ROOT" rev-parse HEAD) $(git -C "$ROOT" status --porcelain --untracked-files=no | wc -l | tr -d ' ') modified tracked files"
    else
        echo "git: no git metadata here; UPG_BENCH_GIT_COMMIT=${UPG_BENCH_GIT_COMMIT:-unset}"
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv 2>&1
    $PY -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" 2>&1
    $PY -m pip list 2>/dev/null | grep -i -E "^(torch|triton|pytest|pytest-benchmark|matplotlib|transformers|liger|cut)" 
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt" | tee -a "$LOG"

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    if [ "${ALLOW_CPU:-0}" != 1 ]; then
        log "ERROR: no CUDA device visible to torch; this script is for a GPU machine (ALLOW_CPU=1 for a dry run with small shapes)"
        exit 1
    fi
    log "WARNING: no CUDA device: CPU dry run (ALLOW_CPU=1)"
fi

# ---------------------------------------------------------------- peer wheels (offline)
SITE=/tmp/upg_bench_site
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    log "installing peer wheels from $WHEELS: $(cd "$WHEELS" && ls *.whl | tr '\n' ' ')"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl >>"$LOG" 2>&1 \
        || log "WARNING: wheel install failed; the peers will be reported missing"
else
    log "WARNING: no wheels in $WHEELS; Liger and CCE will be reported missing (see bench/README.md to fill it)"
fi
export PYTHONPATH="$ROOT:$ROOT/python:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
$PY -c "import liger_kernel, cut_cross_entropy; print('peers import ok')" 2>&1 | tail -1 | tee -a "$LOG"

# ---------------------------------------------------------------- GPU tests
if [ "$RUN_TESTS" = 1 ]; then
    TARGETS=(tests/)
    [ "$MODE" = full ] && TARGETS+=(bench/test_bench_gpu.py)
    CAP=$TEST_S
    [ "$CAP" -gt $(( $(left) / 3 )) ] && CAP=$(( $(left) / 3 ))
    log "GPU tests: pytest -m gpu ${TARGETS[*]} (cap ${CAP}s)"
    timeout --kill-after=10 "$CAP" $PY -m pytest -m gpu "${TARGETS[@]}" -q -p no:cacheprovider -rfEs \
        --benchmark-json "$OUT_DIR/pytest_benchmark.json" > "$OUT_DIR/pytest_gpu.log" 2>&1
    RC=$?
    [ $RC = 124 ] || [ $RC = 137 ] && echo "gpu_run.sh: stopped at the ${CAP}s cap" >> "$OUT_DIR/pytest_gpu.log"
    log "GPU tests exit code $RC: $(tail -1 "$OUT_DIR/pytest_gpu.log")"
    grep -E "^(FAILED|ERROR)" "$OUT_DIR/pytest_gpu.log" | head -20 | tee -a "$LOG"
fi

# ---------------------------------------------------------------- benchmark
BENCH=(--ops sft,grpo,logprobs,hpt --shapes llama3-8b,qwen2.5-7b,gemma2-2b --N 8192 --dtype bf16
       --impls ours,eager,compile,liger,cce)
if [ "$MODE" = quick ]; then
    BENCH+=(--modes fwd+bwd --quick)
else
    BENCH+=(--modes fwd+bwd,fwd,bwd)
fi
REMAIN=$(left)
DEADLINE=$(( REMAIN - 75 ))       # no new row after this; leaves time for the last row and the report
[ $DEADLINE -lt 30 ] && DEADLINE=30
HARD=$(( REMAIN - 10 ))
[ $HARD -lt 40 ] && HARD=40
log "bench: python -m bench ${BENCH[*]} ${EXTRA[*]:-} --deadline $DEADLINE (hard stop ${HARD}s)"
timeout --kill-after=5 "$HARD" $PY -m bench "${BENCH[@]}" ${EXTRA[@]+"${EXTRA[@]}"} --deadline "$DEADLINE" --out "$OUT_DIR" 2>&1 | tee -a "$LOG"
RC=${PIPESTATUS[0]}
log "bench exit code $RC"
if [ "$RC" != 0 ] && [ -f "$OUT_DIR/results.json" ]; then
    log "re-making results.md / results.png from the rows written so far"
    $PY -m bench --render "$OUT_DIR/results.json" --out "$OUT_DIR" 2>&1 | tee -a "$LOG"
fi
rm -f "$OUT_DIR"/*.tmp
log "done in $(( $(date +%s) - T0 ))s; files: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
[ -f "$OUT_DIR/results.md" ] && cat "$OUT_DIR/results.md"
exit 0
