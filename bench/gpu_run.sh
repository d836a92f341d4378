#!/usr/bin/env bash
# One GPU run of the benchmark, made for a fresh, offline GPU machine (e.g. an H100/H200) with
# python3, torch, triton and pytest(-benchmark) preinstalled and no package registry. It finishes in
# under 10 minutes (TOTAL_S, default 540 s, is a hard budget; rows it has no time left for are
# reported 'skipped: time budget'):
#
#   1. installs the peer wheels from bench/wheels/ (Liger-Kernel, Cut Cross-Entropy) into /tmp,
#   2. sets PYTHONPATH to this checkout (no pip install of the project needed),
#   3. runs the GPU tests (pytest -m gpu tests/; with --full also bench/test_bench_gpu.py),
#   4. runs python -m bench in three passes, most important first: paths/ (every forward/backward
#      path of ours -- ours, ours-atomic, ours-gemmfwd, ours-ws1g, ours-gif -- beside eager, compile,
#      Liger and CCE; grpo and logprobs, llama3-8b, N=8192, bf16, fwd / bwd / fwd+bwd), zero_adv/ (grpo
#      with half the groups at zero advantage), shapes/ (qwen2.5-7b and gemma2-2b, every op), and
#   5. writes everything to one folder: gpu_run.log, pytest_gpu.log, pytest_benchmark.json, env.txt
#      and one subfolder per pass with results.json, results.md, results.png.
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
# Three passes, most important first, each into its own folder (each has results.json/.md/.png):
#   paths/     every forward/backward path of ours beside eager, compile, Liger, CCE: grpo + logprobs, llama3-8b
#   zero_adv/  grpo with half the groups at zero advantage (the backward skips their rows), ours vs eager
#   shapes/    the remaining yardstick shapes and ops, default impls
OURS_ALL=ours,ours-atomic,ours-gemmfwd,ours-ws1g,ours-gif
PASS_PATHS=(--ops grpo,logprobs --shapes llama3-8b --N 8192 --dtype bf16 --impls $OURS_ALL,eager,compile,liger,cce)
PASS_ZERO=(--ops grpo --shapes llama3-8b --N 8192 --dtype bf16 --impls ours,ours-ws1g,eager --zero-adv-frac 0.5 --no-peak)
PASS_SHAPES=(--ops sft,grpo,logprobs,hpt --shapes qwen2.5-7b,gemma2-2b --N 8192 --dtype bf16 --impls ours,eager,compile,liger,cce --no-peak)
if [ "$MODE" = quick ]; then
    PASS_PATHS+=(--modes fwd+bwd,fwd,bwd --quick); PASS_ZERO+=(--modes fwd+bwd,bwd --quick)
    PASS_SHAPES+=(--modes fwd+bwd --quick)
else
    PASS_PATHS+=(--modes fwd+bwd,fwd,bwd); PASS_ZERO+=(--modes fwd+bwd,bwd); PASS_SHAPES+=(--modes fwd+bwd,fwd,bwd)
fi

bench_pass() {   # name, share of the time left (percent), args...
    local name="$1" share="$2"; shift 2
    local remain; remain=$(left)
    local budget=$(( remain * share / 100 ))
    local deadline=$(( budget - 60 )); [ $deadline -lt 20 ] && deadline=20
    local hard=$(( budget - 5 )); [ $hard -lt 30 ] && hard=30
    mkdir -p "$OUT_DIR/$name"
    log "bench [$name]: python -m bench $* ${EXTRA[*]:-} --deadline $deadline (hard stop ${hard}s)"
    timeout --kill-after=5 "$hard" $PY -m bench "$@" ${EXTRA[@]+"${EXTRA[@]}"} --deadline "$deadline" --out "$OUT_DIR/$name" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    log "bench [$name] exit code $rc"
    if [ "$rc" != 0 ] && [ -f "$OUT_DIR/$name/results.json" ]; then
        $PY -m bench --render "$OUT_DIR/$name/results.json" --out "$OUT_DIR/$name" 2>&1 | tee -a "$LOG"
    fi
}
bench_pass paths 60 "${PASS_PATHS[@]}"
bench_pass zero_adv 45 "${PASS_ZERO[@]}"
bench_pass shapes 95 "${PASS_SHAPES[@]}"
rm -f "$OUT_DIR"/*.tmp "$OUT_DIR"/*/*.tmp
log "done in $(( $(date +%s) - T0 ))s; files: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
for d in paths zero_adv shapes; do [ -f "$OUT_DIR/$d/results.md" ] && cat "$OUT_DIR/$d/results.md"; done
exit 0
