"""fastprompt.training.train's data stream and optimiser: a fresh augmentation every epoch, the very
same stream when the run is repeated (per-(seed, epoch) seeding, which resume relies on), and each
step taken by SGD at the recipe's momentum, weight decay and the epoch's scheduled rate."""
import pytest
import torch
from PIL import Image

import fastprompt as fp
from fastprompt.data import Datum
from fastprompt.recipes import Recipe
from fastprompt.training import TrainEnv, train

from common import tiny_clip


def seen_batches(tmp_path, steps: list | None = None) -> list[torch.Tensor]:
    """The image batches of a 2-epoch run (2 steps each) over 8 copies of one textured image, so
    any difference between batches comes from the augmentation alone. `steps` collects the SGD
    settings of every optimiser step."""
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(48, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
    data = [Datum(None, i % 2, ["dog", "cat"][i % 2], image=Image.fromarray(pixels)) for i in range(8)]
    torch.manual_seed(0)
    model = fp.create("coop", tiny_clip(), ["dog", "cat"])
    seen, objective = [], model.loss_and_logits

    def recording(images, labels):
        seen.append(images.detach().clone())
        return objective(images, labels)
    model.loss_and_logits = recording
    env = TrainEnv(device=torch.device("cpu"), seed=1, progress=False)
    recipe = Recipe(batch_size=4, lr=1e-3, epochs=2, warmup_epochs=1, momentum=0.8, weight_decay=1e-3)
    sgd_step = torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        if steps is not None:
            steps.append({k: self.param_groups[0][k] for k in ("lr", "momentum", "weight_decay")})
        return sgd_step(self, *args, **kwargs)
    torch.optim.SGD.step = recording_step
    try:
        train(model, recipe, data, tmp_path, env, log=lambda *a: None)
    finally:
        torch.optim.SGD.step = sgd_step
    return seen


def test_fresh_augmentation_each_epoch_repeatable_and_sgd_on_schedule(tmp_path):
    steps = []
    first = seen_batches(tmp_path / "a", steps)
    assert len(first) == 4
    # Dassl's schedule: the warm-up epoch at 1e-5, then the full rate (cosine counted after it)
    assert [s["lr"] for s in steps] == pytest.approx([1e-5, 1e-5, 1e-3, 1e-3])
    assert all(s["momentum"] == 0.8 and s["weight_decay"] == 1e-3 for s in steps), steps
    for i in range(4):
        for j in range(i):
            assert not torch.allclose(first[i], first[j]), f"steps {j + 1} and {i + 1} saw the same crops"
    again = seen_batches(tmp_path / "b")
    assert all(torch.equal(a, b) for a, b in zip(first, again))
