"""Tip-Adapter's α/β grid search (utils.py search_hp), vectorised.

The release evaluates the tip logits at every (β, α) of a 200 x 20 grid, recomputing the affinity
f·Kᵀ, the zero-shot logits and the whole cache term each time (4,000 passes over the validation
features). Here what depends on neither is computed once, the cache term once per β, and the 20 α
at once. The exponent is the release's expression, `β·A − β` (= −(β − β·A) in IEEE arithmetic;
the same float32 numbers, whatever the tensor's shape); its product with the one-hot values is a
sum over each class's keys (the same sum, in another order than the matmul's): keys sorted by
class, summed over a reshape when every class has as many keys (a few-shot cache), else with
`index_add_`. Of the α, only the classes that can win anywhere in the α range are scored
(`_correct`). Rows are taken in blocks that bound the memory, and the exponent in chunks small
enough to stay in the CPU's cache.
"""
from __future__ import annotations

import torch

#: the zero-shot logits' scale in Tip-Adapter (main.py: `100. * features @ clip_weights`)
SCALE = 100.0
#: elements of the exponent's working set ([rows, NK]: 1 MB) and of one block of affinities
#: [rows, NK] held at once (256 MB)
CHUNK_ELEMENTS = 1 << 18
BLOCK_ELEMENTS = 1 << 26


def grid(top: float, steps: int) -> list[float]:
    """`steps` values from 0.1 toward `top` (never reaching it), as the release's float64 list
    comprehension computes them: i * (top - 0.1) / steps + 0.1."""
    return [i * (top - 0.1) / steps + 0.1 for i in range(steps)]


def _class_sums(index: torch.Tensor, n_classes: int):
    """e [rows, NK] -> [rows, C], the sum of each class's columns (keys sorted by class)."""
    counts = torch.bincount(index, minlength=n_classes)
    k = int(counts[0]) if len(counts) == n_classes else 0
    if k and bool((counts == k).all()):
        return lambda e: e.view(e.shape[0], n_classes, k).sum(-1)
    return lambda e: e.new_zeros(e.shape[0], n_classes).index_add_(1, index, e)


def _correct(clip: torch.Tensor, cache: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Correct predictions [len(a)] of clip + cache·α for each α of `a` [A] (rows [R, C]).

    Only classes that can win somewhere in [min a, max a] are scored: the winner at the smallest
    α, c0, keeps at least its own logit, so a class c can win only where
    D_c(α) = (clip_c − clip_c0) + α (cache_c − cache_c0) ≥ 0, and D_c is linear in α: its maximum
    is at an end of the range (a margin far above float32 rounding keeps every class the exact
    arithmetic could let win). The candidates' logits are the release's float32 clip + cache·α;
    the first class reaching a row's maximum wins, as argmax."""
    lo, hi = a.min(), a.max()
    c0 = (cache * lo).add_(clip).argmax(-1, keepdim=True)
    d_clip, d_cache = clip - clip.gather(1, c0), cache - cache.gather(1, c0)
    margin = 1e-4 * (clip.abs().amax(1, keepdim=True) + a.abs().max() * cache.abs().amax(1, keepdim=True))
    reach = torch.maximum(d_cache * lo + d_clip, d_cache * hi + d_clip) >= -margin
    rows, cls = reach.nonzero(as_tuple=True)
    logits = (cache[rows, cls] * a.view(-1, 1)).add_(clip[rows, cls])  # [A, P]
    n_a, n_rows, index = a.numel(), clip.shape[0], rows.expand(a.numel(), -1)
    best = logits.new_full((n_a, n_rows), -torch.inf).scatter_reduce_(1, index, logits, "amax")
    at_best = torch.where(logits == best.gather(1, index), cls, clip.shape[1])
    first = torch.full((n_a, n_rows), clip.shape[1], device=clip.device).scatter_reduce_(
        1, index, at_best, "amin")
    return (first == y).sum(-1)


@torch.no_grad()
def grid_correct(features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor,
                 keys: torch.Tensor, key_labels: torch.Tensor, betas: list[float],
                 alphas: list[float]) -> torch.Tensor:
    """Correct top-1 predictions [len(betas), len(alphas)] (int64, CPU) of

        SCALE·f·Wᵀ + α·exp(−β(1 − f·Kᵀ))·V      at every (β, α)

    f: normalised features [N, E] with `labels` [N]; W: normalised text features [C, E];
    K: cache keys [NK, E] whose classes are `key_labels` [NK] (V their one-hot values). A tie
    goes to the first class (argmax)."""
    n_classes, dev = text.shape[0], features.device
    index = key_labels.long().to(dev)
    order = torch.argsort(index, stable=True)
    keys, index = keys.to(dev)[order], index[order]
    class_sums = _class_sums(index, n_classes)
    a = torch.tensor(alphas, dtype=features.dtype, device=dev)
    counts = torch.zeros(len(betas), len(alphas), dtype=torch.long, device=dev)
    n_keys = max(keys.shape[0], 1)
    block, rows = max(1, BLOCK_ELEMENTS // n_keys), max(1, CHUNK_ELEMENTS // n_keys)
    for start in range(0, features.shape[0], block):
        f, y = features[start:start + block], labels[start:start + block].to(dev)
        clip = SCALE * f @ text.t()
        affinity = f @ keys.t()
        cache = clip.new_empty(clip.shape)
        work = affinity.new_empty(min(rows, len(f)), keys.shape[0])
        for i, beta in enumerate(betas):
            for r in range(0, len(f), rows):  # the exponent's working set stays in the CPU cache
                part = work[:len(affinity[r:r + rows])]
                torch.mul(affinity[r:r + rows], beta, out=part).sub_(beta).exp_()
                cache[r:r + rows] = class_sums(part)
            counts[i] += _correct(clip, cache, y, a)
    return counts.cpu()
