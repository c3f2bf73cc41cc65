"""DDP on the CPU: two gloo processes through the real training loop equal one process with the
same global batch — the loss of every step (the mean of the two ranks' losses) and the
parameters after it (tests/ddp_worker.py runs each process)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")
METHODS = ["coop", "maple+lamm", "mma"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, world: int, rank: int, port: int) -> subprocess.Popen:
    env = {**os.environ, "WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(WORKER), "--out", str(out), "--methods", ",".join(METHODS)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    port = free_port()
    procs = [launch(one, 1, 0, free_port()), launch(two, 2, 0, port), launch(two, 2, 1, port)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    return one, two


def result(folder: Path, method: str, rank: int):
    stem = folder / f"{method}-rank{rank}"
    return json.loads(stem.with_suffix(".json").read_text())["losses"], load_file(f"{stem}.safetensors")


def batches(folder: Path, method: str, rank: int) -> list:
    return json.loads((folder / f"{method}-rank{rank}.json").read_text())["batches"]


def test_ranks_split_each_epoch_and_reshuffle(runs):
    """Each epoch the two ranks see disjoint halves that make up the dataset (the distributed
    sampler), and a new order every epoch (its set_epoch), as the single process does."""
    one, two = runs
    single, r0, r1 = batches(one, "coop", 0), batches(two, "coop", 0), batches(two, "coop", 1)
    everything = sorted(single[0])
    assert len(everything) == len(set(everything)) == 8
    for epoch, (a, b) in enumerate(zip(r0, r1)):
        assert len(a) == len(b) == 4 and sorted(a + b) == everything, f"epoch {epoch + 1}: {a} + {b}"
    for seen in (single, r0, r1):
        assert len({tuple(s) for s in seen}) == len(seen), f"the same order in two epochs: {seen}"


@pytest.mark.parametrize("method", METHODS)
def test_two_gloo_processes_equal_one_process_with_the_global_batch(runs, method):
    one, two = runs
    single_losses, single = result(one, method, 0)
    rank_losses = [result(two, method, r)[0] for r in (0, 1)]
    r0, r1 = (result(two, method, r)[1] for r in (0, 1))
    assert len(single_losses) == len(rank_losses[0]) == len(rank_losses[1]) == 3  # 3 steps each
    for step, (l, a, b) in enumerate(zip(single_losses, *rank_losses)):
        assert abs((a + b) / 2 - l) < 1e-5, f"step {step + 1}: ranks {a:.6f}, {b:.6f} vs one process {l:.6f}"
    moved = 0.0
    for key in (k for k in single if k.startswith("final/")):
        assert torch.equal(r0[key], r1[key]), f"{key}: the two ranks hold different parameters"
        scale = (single[key] - single[key.replace("final/", "init/")]).abs().max()
        moved = max(moved, float(scale))
        gap = float((r0[key] - single[key]).abs().max())
        assert gap <= 1e-4 * float(scale) + 1e-7, f"{key}: DDP vs one process differ by {gap:.3g} (moved {scale:.3g})"
    assert moved > 1e-3, "training did not move the parameters: the comparison would prove nothing"
