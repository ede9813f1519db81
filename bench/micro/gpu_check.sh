#!/usr/bin/env bash
# The prepared GPU check: on a fresh one-GPU machine, install DeepSpeed from wheels carried in
# .whl/ (made here by `make gpu-wheels`), run the GPU-marked tests, then compare hf, hybrid,
# ds-inference and ds-hybrid on opt-1.3b at DeepSpeed-Chat's shape (batch 16, prompt 256,
# answer 256, bf16) plus a short batch sweep of generation.
#
#   bash bench/micro/gpu_check.sh            # on the GPU machine (budget: 8 minutes)
#   bash bench/micro/gpu_check.sh --dry-run  # the same steps on CPU, tiny preset (CI runs this)
#
# $OUT receives at most 6 files, refreshed after every stage so that a run cut short still
# returns what it measured: log.txt, summary.csv, phases.png, sweep.csv, sweep.png and
# details.tgz (results.json of the comparison and of every sweep point, every engine's log).
# Everything else is written under a work folder outside $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT="${OUT:-results/gpu-check}"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
exec 3>&1 4>&2 > >(tee -a "$WORK/log.txt") 2>&1
TEE=$!
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
t0=$SECONDS
BUDGET=${BUDGET:-480}
say() { echo "[gpu_check +$((SECONDS - t0))s] $*"; }
left() { echo $((BUDGET - (SECONDS - t0))); }
ship() {  # copy what exists so far into $OUT (at most 6 files, none deeper than $OUT)
  cp "$WORK/compare/summary.csv" "$OUT/summary.csv" 2>/dev/null
  cp "$WORK/compare/phases.png" "$OUT/phases.png" 2>/dev/null
  cp "$WORK/sweep/sweep.csv" "$OUT/sweep.csv" 2>/dev/null
  cp "$WORK/sweep/sweep.png" "$OUT/sweep.png" 2>/dev/null
  (cd "$WORK" && tar czf "$OUT/details.tgz.tmp" --ignore-failed-read \
      $(ls -d compare/results.json compare/engines/*.log sweep/*/results.json \
        sweep/*/engines/*.log 2>/dev/null) 2>/dev/null) && mv "$OUT/details.tgz.tmp" "$OUT/details.tgz"
  rm -f "$OUT/details.tgz.tmp"
  cp "$WORK/log.txt" "$OUT/log.txt" 2>/dev/null
  true
}
OUT="$(cd "$OUT" && pwd)"

if [[ $DRY == 1 ]]; then
  PY="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"
  export DS_ACCELERATOR=cpu
  RUN=(--preset tiny-opt --batch 4 --prompt-len 16 --gen-len 16 --steps 1 --warmup 1
       --device cpu --dtype float32 --threads 1)
  SWEEP=(--batches 2,4 --gen-len 8)
  TEST_LIMIT=600
else
  PY=python3
  export DS_ACCELERATOR=cuda  # bench/cli.py would otherwise default DeepSpeed to its CPU backend
  if compgen -G ".whl/*.whl" > /dev/null; then
    say "installing carried wheels"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { say "wheel install failed"; ship; exit 1; }
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
  else
    say "no .whl/ wheels: ds-inference and ds-hybrid will be reported unavailable"
  fi
  export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}"
  RUN=(--preset opt-1.3b --batch 16 --prompt-len 256 --gen-len 256 --steps 1 --warmup 1
       --device cuda --dtype bfloat16)
  SWEEP=(--batches 8,64 --gen-len 128)
  TEST_LIMIT=150  # about three cold inductor compiles (bf16, fp32, opt-125m) and NCCL start
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
$PY - <<'PY'
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
print("transformers", transformers.__version__)
try:
    import deepspeed; print("deepspeed", deepspeed.__version__)
except Exception as e:
    print("deepspeed unavailable:", type(e).__name__, e)
PY

# DeepSpeed's CUDA inference kernels are not built ahead: with transformers 5 they cannot stand
# in for the decoder layers (engines/ds_inference.py, kernel_blocker), so ds-inference runs
# without them and says so, and ds-hybrid is unavailable. An engine that can use them builds
# them on first use, within its share of the time.
status=0
say "GPU-marked tests (at most ${TEST_LIMIT} s)"
# -v: one line per test as it ends, so a run cut off at the limit still says which passed
timeout "$TEST_LIMIT" $PY -m pytest -v --tb=short -m gpu tests/test_gpu.py -p no:cacheprovider \
    2>&1 | grep -v "^$" | tail -40
[[ ${PIPESTATUS[0]} == 0 ]] || { status=1; say "GPU tests failed or ran out of time"; }
ship

# the comparison comes first, within what is left less 50 s (start-up, writing results, the
# 30 s grace after a SIGINT): each engine gets an equal share of what is left when it starts
# (--time-budget), so time one leaves unused goes to the next (hybrid, whose cold compile is
# the longest, runs last); the sweep runs only if enough is left after
if [[ $DRY == 1 ]]; then budget=1200; else budget=$(( $(left) - 50 )); (( budget < 180 )) && budget=180; fi
ENGINES=hf,ds-inference,ds-hybrid,hybrid
# vllm where the GPU machine's python has the vllm package (its wheels are too large to carry);
# the dry run's tiny preset has a head size vLLM's CPU attention refuses
if [[ $DRY == 0 ]]; then
  if $PY -c "import vllm" > /dev/null 2>&1; then ENGINES+=,vllm
  else say "no vllm row: the vllm package does not import on this machine"; fi
fi
say "comparison: ${ENGINES//,/, } (at most ${budget} s together)"
# the harness's own start and wrap-up are outside --time-budget: past the whole budget, SIGINT
# stops it cleanly (it ends the running engine and saves what was measured), 30 s before the
# end, so that the grace before a SIGKILL also fits in the budget
timeout -s INT -k 30 $(( $(left) - 30 > 60 ? $(left) - 30 : 60 )) \
  $PY -m bench run --engines "$ENGINES" "${RUN[@]}" \
    --time-budget $budget --out "$WORK/compare" --overwrite
rc=$?  # 2: an engine is unavailable here (its row says why); the rest ran
[[ $rc == 0 || $rc == 2 ]] || status=1
ship

# each sweep point starts fresh workers: hybrid builds opt-1.3b and compiles its decode for the
# new batch size again (about a minute, estimated), so with less than 240 s its rows would only
# say "timed out"
if (( $(left) >= 240 )); then
  say "generation sweep over batch size"
  timeout -s INT -k 30 $(( $(left) - 35 )) \
    $PY -m bench sweep --engines hf,hybrid "${RUN[@]}" "${SWEEP[@]}" --phases generate --steps 1 \
      --warmup 0 --time-budget $(( $(left) - 45 )) --out "$WORK/sweep" --overwrite 2>&1 | tail -12
  [[ ${PIPESTATUS[0]} == 0 ]] || status=1
  $PY -m bench report "$WORK/sweep" > /dev/null 2>&1 || true
else
  say "skipping the sweep: $(left) s of the ${BUDGET} s budget left"
fi
say "done (status $status)"
exec 1>&3 2>&4   # close the pipe to tee and let it finish writing log.txt
wait "$TEE" 2>/dev/null
ship
exit $status
