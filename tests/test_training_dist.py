"""Two CPU processes (gloo): every rank trains on its share of each batch, gradients are averaged,
both ranks end with the same adapter bytes, and that adapter is the one a single process trains on
the whole batches (same mask, values equal up to float summation order); launched by torchrun, only
rank 0 registers."""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from test_training_util import sentiment_rows, tiny_model, write_csv

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg():
    from adapterhub.training import TrainConfig

    return TrainConfig(steps=6, select_steps=2, reselect_every=2, batch_size=8, max_length=24, density=0.1,
                       lr=1e-2, max_eval_examples=6, mask="connection-sensitivity")


def _worker(rank: int, world: int, port: int, base: str, csv: str, out: str) -> None:
    import torch.distributed as dist

    from adapterhub import format as fmt
    from adapterhub.data import load_dataset
    from adapterhub.training import train_adapter

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        res = train_adapter(Path(base), load_dataset(f"csv:{csv}"), _cfg(), task_name="toy")
        data = fmt.save(res.adapter)
        Path(out, f"rank{rank}.safetensors").write_bytes(data)
        Path(out, f"rank{rank}.txt").write_text(f"{hashlib.sha256(data).hexdigest()} {res.world_size} {res.adapter.nnz}")
    finally:
        dist.destroy_process_group()


def _no_dropout(folder: Path) -> Path:
    """Switch the tiny BERT's dropout off: with it, one process draws one dropout mask for a batch of 8
    and two ranks two masks for 4 rows each, so only a deterministic forward can match a single process."""
    import json

    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_two_gloo_processes_agree_bit_for_bit(tmp_path):
    base = _no_dropout(tiny_model("bert", tmp_path / "bert"))
    csv = write_csv(tmp_path / "toy.csv", sentiment_rows(60))
    mp.spawn(_worker, args=(2, _free_port(), str(base), str(csv), str(tmp_path)), nprocs=2, join=True)
    r0 = (tmp_path / "rank0.txt").read_text().split()
    r1 = (tmp_path / "rank1.txt").read_text().split()
    assert r0 == r1  # the ranks agree bit for bit
    assert r0[1] == "2"
    # oracle: one process, no process group, the same settings on the whole batches of 8
    from adapterhub import format as fmt
    from adapterhub.data import load_dataset
    from adapterhub.training import train_adapter

    torch.set_num_threads(1)
    single = train_adapter(base, load_dataset(f"csv:{csv}"), _cfg(), task_name="toy")
    assert single.world_size == 1
    dist = fmt.load((tmp_path / "rank0.safetensors").read_bytes())
    assert int(r0[2]) == dist.nnz == single.adapter.nnz
    assert sorted(dist.params) == sorted(single.adapter.params) and sorted(dist.extras) == sorted(single.adapter.extras)
    for k, p in single.adapter.params.items():
        q = dist.params[k]
        assert q.shape == p.shape and torch.equal(q.flat()[0], p.flat()[0]), k  # the same mask
        # mean of two half-batch gradients == full-batch gradient, up to float summation order
        assert torch.allclose(q.flat()[1], p.flat()[1], rtol=1e-4, atol=1e-6), k
        assert float(p.values.abs().sum()) > 0, k  # trained, so the comparison is not of zeros
    for k, t in single.adapter.extras.items():
        assert torch.allclose(dist.extras[k], t, rtol=1e-4, atol=1e-6), k


@pytest.mark.slow
def test_torchrun_two_cpu_processes_registers_once(tmp_path):
    from adapterhub.workspace import Workspace

    base = tiny_model("bert", tmp_path / "bert")
    csv = write_csv(tmp_path / "toy.csv", sentiment_rows(60))
    home = tmp_path / "home"
    with Workspace.open(home) as ws:
        ws.add_base("tb", str(base))
    env = dict(os.environ, OMP_NUM_THREADS="1", ADAPTERHUB_HOME=str(home))
    # accelerate's --cpu launcher starts one process (multi-CPU needs MPI); on GPUs
    # `accelerate launch --multi_gpu` runs torchrun underneath, which this uses directly
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "adapterhub.cli.main", "train", "--base", "tb",
           "--dataset", f"csv:{csv}", "--name", "dist", "--steps", "4", "--select-steps", "2",
           "--batch-size", "8", "--max-length", "24", "--max-eval-examples", "6", "--json"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    with Workspace.open(home) as ws:
        vs = ws.list_versions()
    assert [v.ref for v in vs] == ["dist@1"]
    assert vs[0].card["training"]["world_size"] == 2
