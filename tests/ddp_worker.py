"""One process of test_ddp.py's comparison (a helper script, not a test module).

Trains each of `--methods` on a fixed in-memory dataset through `fastprompt.training.train`, in the
environment torchrun gives (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; gloo on the
CPU), and writes, per method, this rank's loss of every step (`<method>-rank<R>.json`) and its
initial and final trainable tensors (`<method>-rank<R>.safetensors`), and which images each step
saw (their green value, one per image).

The images are one flat colour each, so the random crop and flip of the training augmentation
leave them unchanged: a batch's loss depends only on which images it holds, whichever process
draws them and in whatever order.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

NAMES = ["dog", "cat", "sports car", "red apple"]
PER_CLASS = 2


def flat_colour_data():
    from PIL import Image

    from fastprompt.data import Datum

    return [Datum(None, c, NAMES[c], image=Image.new("RGB", (32, 32), (50 * c + 30, 190 - 45 * c + 20 * i, 40 + 90 * i)))
            for c in range(len(NAMES)) for i in range(PER_CLASS)]


def main(argv=None) -> int:
    from safetensors.torch import save_file

    import fastprompt as fp
    from fastprompt.recipes import Recipe
    from fastprompt.training import init_distributed, train

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--methods", default="coop")
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    env.progress = False
    data = flat_colour_data()
    out = Path(args.out)
    for method in args.methods.split(","):
        torch.manual_seed(0)
        model = fp.create(method, fp.load_clip("tiny", pretrained=None), NAMES)
        init = {f"init/{k}": p.detach().clone() for k, p in model.trainable_state().items()}
        losses, batches, objective = [], [], model.loss_and_logits

        def recording(images, labels, objective=objective, losses=losses, batches=batches):
            loss, logits = objective(images, labels)
            losses.append(float(loss.detach()))
            batches.append([round(float(v), 4) for v in images[:, 1, 0, 0]])  # flat: any pixel
            return loss, logits
        model.loss_and_logits = recording
        # the whole dataset is one global batch: every epoch is one step of it
        recipe = Recipe(batch_size=len(data) // env.world_size, lr=0.05, epochs=args.epochs,
                        warmup_epochs=0)
        train(model, recipe, data, out / f"run-{method}-rank{env.rank}", env, log=lambda *a: None)
        final = {f"final/{k}": p.detach().clone().contiguous() for k, p in model.trainable_state().items()}
        stem = out / f"{method}-rank{env.rank}"
        save_file({**init, **final}, f"{stem}.safetensors")
        (stem.with_suffix(".json")).write_text(json.dumps({"losses": losses, "batches": batches, "world": env.world_size}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
