"""The metrics against numbers worked out by hand: the harmonic mean (HM = 2bn / (b + n), not the
arithmetic mean), top-1 accuracy on a classifier whose argmin differs from its argmax (and over a
partial last batch), and the table's HM of seed-averaged accuracies (CoCoOp's 75.83)."""
import pytest
import torch
from PIL import Image
from torch import nn

from fastprompt.data import Datum
from fastprompt.scoring import accuracy, harmonic_mean
from fastprompt.table import summarize


@pytest.mark.parametrize("base, novel, hm", [(80.0, 40.0, 160 / 3), (40.0, 80.0, 160 / 3), (50.0, 50.0, 50.0),
                                             (100.0, 0.0, 0.0), (0.0, 0.0, 0.0)])
def test_harmonic_mean(base, novel, hm):
    assert harmonic_mean(base, novel) == pytest.approx(hm, abs=1e-9)


def test_hm_of_the_cocoop_paper():
    assert round(harmonic_mean(80.47, 71.69), 2) == 75.83  # METHODS.md: 2*80.47*71.69/152.16


class ShadeClassifier(nn.Module):
    """Reads which of the flat grey images it is given (shade k*40) and answers a fixed logit row
    for it; mean 0 / std 1 so a pixel is shade / 255 after the evaluation transform."""

    image_size, mean, std = 8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table)

    def forward(self, images):
        k = (images[:, 0].mean(dim=(1, 2)) * 255 / 40).round().long()
        return self.table[k]


def test_accuracy_counts_argmax_over_every_batch():
    """Image k has label labels[k]. The argmax is right for images 0, 2, 4, the argmin only for
    image 1: 60 %, not 20 % (argmin), 66.7 % (the mean of the per-batch accuracies with batches
    of 2) or 100 % (the last, partial batch alone)."""
    labels = [0, 2, 1, 0, 2]
    table = [[3.0, 1.0, 2.0],   # argmax 0 (right), argmin 1
             [1.0, 3.0, 0.0],   # argmax 1, argmin 2 (right)
             [0.0, 5.0, 4.0],   # argmax 1 (right), argmin 0
             [1.0, 2.0, 0.0],   # argmax 1, argmin 2: wrong both ways
             [0.0, 1.0, 9.0]]   # argmax 2 (right), argmin 0
    data = [Datum(None, y, f"c{y}", image=Image.new("RGB", (8, 8), (40 * k,) * 3)) for k, y in enumerate(labels)]
    clf = ShadeClassifier(table)
    assert accuracy(clf, data, torch.device("cpu"), batch_size=2) == pytest.approx(60.0)
    assert accuracy(clf, data, torch.device("cpu"), batch_size=100) == pytest.approx(60.0)


def test_table_hm_is_the_hm_of_seed_means():
    rows = [{"seed": 1, "base_acc": 90.0, "novel_acc": 30.0, "hm": harmonic_mean(90, 30)},
            {"seed": 2, "base_acc": 30.0, "novel_acc": 90.0, "hm": harmonic_mean(30, 90)}]
    summary = summarize(rows)
    assert summary["base_acc"] == summary["novel_acc"] == pytest.approx(60.0)
    assert summary["hm"] == pytest.approx(60.0)  # the mean of the per-seed HMs would be 45
