#!/usr/bin/env bash
# The GPU check (issue 10, item 4): on one H100/H200, within about 8 minutes,
#   1. the `cuda` tests (python -m pytest tests/cuda -m cuda),
#   2. the curvature-refresh cost benchmark on the GPU (precondition_cost.py --device cuda),
#   3. HyLo's step time against SGD and AdamW on ResNet-32 and a ~100M Llama (step_time.py),
#   4. a ~1.1B Llama step with bf16 autocast (step_time.py --llama-size 1b): HyLo's defaults, KIS on
#      momentum SGD and the same with delayed_refresh, plain / refresh / amortised over AdamW, and the
#      refresh time the delayed refresh took off the step (issue 20),
# writing benchmarks/results/gpu/{pytest_cuda.log, precondition_cost_cuda.json/.png, step_time.json/.md,
# SUMMARY.md, gpu_check.log} and copying them to $OUT when that variable is set (the device machine's
# return folder: flat, at most 8 files).
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run    # anywhere: CPU, tiny shapes, results in a temp folder
#   bash benchmarks/gpu_check.sh --out DIR    # results elsewhere
#
# DeepSpeed is not in the GPU image: prepare .whl/ here first (bash benchmarks/gpu_bundle.sh) and
# carry it; when .whl/ exists its wheels are installed into /tmp/site, without an index.
# Stage limits (180 + 75 + 100 + 120 s) keep the whole run under 8 minutes; the script goes on after a
# failed stage, and SUMMARY.md gives each stage's exit status and time. The exit status is that of the first failed stage (0 if none).
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PYTHON:-python3}"
DRY=0
OUT_DIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT_DIR="$2"; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (allowed: --dry-run, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$OUT_DIR" ]; then
    if [ "$DRY" = 1 ]; then OUT_DIR="$(mktemp -d /tmp/gpu_check_dry.XXXXXX)"; else OUT_DIR="$ROOT/benchmarks/results/gpu"; fi
fi
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1
STATUS=0
STAGES=()

say() { echo "$*" | tee -a "$LOG"; }

stage() {  # stage NAME LIMIT_S COMMAND... : run with a time limit, log, record status and seconds
    local name="$1" limit="$2" start rc
    shift 2
    say ""
    say "== $name (limit ${limit}s): $*"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - start ))
    [ "$rc" = 124 ] && say "!! $name ran past ${limit}s and was stopped"
    say "== $name: exit $rc after ${took}s"
    STAGES+=("| $name | $rc | $took |")
    if [ "$rc" != 0 ] && [ "$STATUS" = 0 ]; then STATUS=$rc; fi
}

# ---------------------------------------------------------------- environment
if [ "$DRY" = 1 ]; then
    export DS_ACCELERATOR=cpu PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    DEVICE=cpu
else
    if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
        say "== installing $(ls .whl/*.whl | wc -l) wheels from .whl into /tmp/site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl 2>&1 | tee -a "$LOG" || { say "!! wheel install failed"; STATUS=1; }
        export PYTHONPATH="/tmp/site:$ROOT"
    else
        say "== no .whl/ bundle: DeepSpeed tests will be skipped unless deepspeed is installed"
        export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export DS_ACCELERATOR=cuda
    DEVICE=cuda
fi

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git status --porcelain 2>/dev/null | grep -q . && echo +dirty)"
    echo "mode: $([ "$DRY" = 1 ] && echo 'dry run (CPU, tiny shapes)' || echo GPU)"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" - <<'EOF'
import importlib, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuda available {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
for name in ("deepspeed", "transformers", "accelerate", "pydantic"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as exc:  # noqa: BLE001 - report, do not stop the check
        print(f"{name}: not importable ({type(exc).__name__}: {exc})")
EOF
} 2>&1 | tee "$OUT_DIR/env.txt" | tee -a "$LOG"

# --------------------------------------------------------------------- stages
if [ "$DRY" = 1 ]; then
    stage "pytest tests/cuda (CPU variants, not slow)" 300 \
        "$PY" -m pytest tests/cuda -q -m "not slow" -p no:cacheprovider --junitxml="$OUT_DIR/pytest_cuda.xml"
    stage "precondition_cost (cpu, quick)" 120 \
        "$PY" benchmarks/precondition_cost.py --device cpu --quick --no-plot --no-progress --out-dir "$OUT_DIR"
    stage "step_time (cpu, tiny)" 120 \
        "$PY" benchmarks/step_time.py --device cpu --tiny --out "$OUT_DIR"
    stage "step_time llama 1b (cpu, tiny)" 120 \
        "$PY" benchmarks/step_time.py --device cpu --tiny --models llama --llama-size 1b \
        --optimizers adamw,hylo,kis,kis-delayed --out "$OUT_DIR"
else
    stage "pytest tests/cuda -m cuda" 180 \
        "$PY" -m pytest tests/cuda -q -m cuda -p no:cacheprovider --junitxml="$OUT_DIR/pytest_cuda.xml"
    stage "precondition_cost --device cuda" 75 \
        "$PY" benchmarks/precondition_cost.py --device cuda --workers 4,16,64 --repeats 5 --min-time 0.1 \
        --large-dim 8192 --no-progress --out-dir "$OUT_DIR"
    stage "step_time --device cuda" 100 \
        "$PY" benchmarks/step_time.py --device cuda --steps 20 --out "$OUT_DIR"
    stage "step_time llama 1b --device cuda" 120 \
        "$PY" benchmarks/step_time.py --device cuda --models llama --llama-size 1b \
        --optimizers adamw,hylo,kis,kis-delayed --steps 20 --out "$OUT_DIR"
fi
grep -E "passed|failed|error|skipped|xfail" "$LOG" | grep -E "^[0-9=]|in [0-9.]+s" >"$OUT_DIR/pytest_summary.txt" || true
sed -n '/^== pytest/,/^== pytest.*exit/p' "$LOG" >"$OUT_DIR/pytest_cuda.log"

# -------------------------------------------------------------------- summary
{
    echo "# GPU check$([ "$DRY" = 1 ] && echo ' (DRY RUN on the CPU: tiny shapes, not a measurement)')"
    echo
    echo '```'
    cat "$OUT_DIR/env.txt"
    echo '```'
    echo
    echo "| stage | exit | seconds |"
    echo "|---|---:|---:|"
    printf '%s\n' "${STAGES[@]}"
    echo
    echo "## Tests"
    echo
    echo '```'
    tail -n 25 "$OUT_DIR/pytest_cuda.log"
    echo '```'
    echo
    echo "## Refresh cost"
    echo
    "$PY" - "$OUT_DIR" <<'EOF'
import json, sys
from pathlib import Path
files = sorted(Path(sys.argv[1]).glob("precondition_cost*.json"))
if not files:
    print("(no result)")
for path in files:
    print(f"{path.name}:\n\n```\n{json.loads(path.read_text())['table']}\n```")
EOF
    echo
    for md in "$OUT_DIR"/step_time*.md; do
        [ -f "$md" ] && cat "$md" || echo "(no step-time result)"
    done
} >"$OUT_DIR/SUMMARY.md"
rm -f "$OUT_DIR/pytest_summary.txt"

say ""
say "wrote $OUT_DIR: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
    for f in SUMMARY.md gpu_check.log pytest_cuda.log step_time.json step_time.md step_time_llama1b.json \
             precondition_cost_cuda.json precondition_cost_cuda.png; do
        [ -f "$OUT_DIR/$f" ] && cp "$OUT_DIR/$f" "$OUT/"
    done
    echo "copied the results to \$OUT: $(ls "$OUT" | tr '\n' ' ')"
fi
exit "$STATUS"
