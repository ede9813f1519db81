#!/usr/bin/env bash
# The prepared GPU check: on a fresh one-GPU machine, install DeepSpeed from wheels carried in
# .whl/ (made here by `make gpu-wheels`), run the GPU-marked tests, then compare hf,
# ds-inference, ds-hybrid and hybrid on opt-1.3b at DeepSpeed-Chat's shape (batch 16, prompt
# 256, answer 256, bf16) plus a short batch sweep of generation. Results and plots go to $OUT.
#
#   bash bench/gpu_check.sh            # on the GPU machine (budget: 8 minutes)
#   bash bench/gpu_check.sh --dry-run  # the same steps on CPU, tiny preset (CI runs this)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT="${OUT:-results/gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
t0=$SECONDS
say() { echo "[gpu_check +$((SECONDS - t0))s] $*"; }

if [[ $DRY == 1 ]]; then
  PY="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"
  export DS_ACCELERATOR=cpu
  RUN=(--preset tiny-opt --batch 4 --prompt-len 16 --gen-len 16 --steps 1 --warmup 1
       --device cpu --dtype float32 --threads 1)
  SWEEP=(--batches 2,4 --gen-len 8)
  TIMEOUT=300
else
  PY=python3
  if compgen -G ".whl/*.whl" > /dev/null; then
    say "installing carried wheels"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { say "wheel install failed"; exit 1; }
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
  else
    say "no .whl/ wheels: ds-inference and ds-hybrid will be reported unavailable"
  fi
  export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}"
  RUN=(--preset opt-1.3b --batch 16 --prompt-len 256 --gen-len 256 --steps 2 --warmup 1
       --device cuda --dtype bfloat16)
  SWEEP=(--batches 8,64 --gen-len 128)
  # 8 minutes in all: DeepSpeed's first CUDA kernel build can take minutes, so each engine gets
  # a bounded share and the row says "timed out" rather than the script overrunning
  TIMEOUT=100
fi
BUDGET=${BUDGET:-480}
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
$PY - <<'PY' | tee "$OUT/env.txt"
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
print("transformers", transformers.__version__)
try:
    import deepspeed; print("deepspeed", deepspeed.__version__)
except Exception as e:
    print("deepspeed unavailable:", type(e).__name__, e)
PY

status=0
say "GPU-marked tests"
$PY -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" | tail -15
[[ ${PIPESTATUS[0]} == 0 ]] || status=1

say "comparison: hf, ds-inference, ds-hybrid, hybrid"
$PY -m bench run --engines hf,ds-inference,ds-hybrid,hybrid "${RUN[@]}" \
    --engine-timeout $TIMEOUT --out "$OUT/compare" --overwrite 2>&1 | tee "$OUT/compare.txt"
rc=${PIPESTATUS[0]}  # 2: an engine is unavailable here (its row says why); the rest ran
[[ $rc == 0 || $rc == 2 ]] || status=1

if (( SECONDS - t0 < BUDGET - 150 )); then
  say "generation sweep over batch size"
  $PY -m bench sweep --engines hf,hybrid "${RUN[@]}" "${SWEEP[@]}" --phases generate --steps 1 \
      --warmup 0 --engine-timeout 60 --out "$OUT/sweep" --overwrite 2>&1 | tail -12 \
      | tee "$OUT/sweep.txt"
  [[ ${PIPESTATUS[0]} == 0 ]] || status=1
  $PY -m bench report "$OUT/sweep" > /dev/null 2>&1 || true
else
  say "skipping the sweep: less than 150 s of the ${BUDGET} s budget left"
fi

# what comes back from the device tool: files at most two folders down
cp "$OUT/compare/summary.csv" "$OUT/summary.csv" 2>/dev/null
cp "$OUT/compare/phases.png" "$OUT/phases.png" 2>/dev/null
cp "$OUT/sweep/sweep.csv" "$OUT/sweep.csv" 2>/dev/null
cp "$OUT/sweep/sweep.png" "$OUT/sweep.png" 2>/dev/null
say "done (status $status)"
exit $status
