#!/usr/bin/env bash
# One short GPU check: train a sparse adapter on SmolLM2-135M in bf16 for a fixed number of steps
# through the real CLI, then run the step-time/memory benchmark on the same model.
# Prints steps/s, peak GPU memory and the final loss. Needs an NVIDIA GPU; run from the repo root:
#   bash benchmarks/gpu_check.sh            (STEPS=200 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-200}
HOME_DIR=$(mktemp -d)
trap 'rm -rf "$HOME_DIR"' EXIT
export ADAPTERHUB_HOME="$HOME_DIR" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

$PY - <<'PY'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device (torch.cuda.is_available() is False)")
print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
PY

$PY -m adapterhub_cli.main base add smollm2 smollm2 >/dev/null
$PY - "$STEPS" <<'PY'
import json, sys, time, torch
from adapterhub.api import Workspace
from adapterhub.training import TrainConfig, train

steps = int(sys.argv[1])
ws = Workspace.open()
cfg = TrainConfig(steps=steps, select_steps=min(50, steps // 4), reselect_every=min(50, steps // 4), batch_size=16,
                  max_length=128, lr=5e-4, density=0.05, device="cuda", dtype="bf16", max_eval_examples=256)
torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
info = train(ws, base="smollm2", task="sms-spam", name="gpu-check", config=cfg)
wall = time.perf_counter() - t0
m = info.metrics
print(json.dumps({"ref": info.ref, "steps": m["steps"], "steps_per_s": m["steps_per_second"],
                  "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                  "final_loss": round(m["train_loss"], 4), "validation_accuracy": m["validation_accuracy"],
                  "nnz": info.nnz, "wall_s": round(wall, 1)}))
PY
$PY benchmarks/train_speed.py --model smollm2 --device cuda --dtype bf16 --batch-size 16 --max-length 256 --steps 20 --no-write
$PY benchmarks/train_speed.py --model minilm --device cuda --dtype bf16 --batch-size 32 --max-length 128 --steps 20 --no-write
