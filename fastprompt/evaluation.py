"""Scoring a model on a run's protocol: the base and novel halves (or all classes) and the
--eval-datasets (`evaluate_base_novel`), and zero-shot CLIP on the same images as the reference
a method has to beat (`zero_shot_reference`, `zero_shot_scores`). `fastprompt.fit` and
`fastprompt.evaluate` (jobs.py) and the table call these."""
from __future__ import annotations

import dataclasses

from .config import TrainConfig

#: `zero_shot_ref="auto"` evaluates zero-shot CLIP as a reference below this many backbone
#: parameters (the tiny CLIP has 2.1M; ViT-B/16 150M)
ZERO_SHOT_REF_MAX_PARAMS = 30_000_000


def zero_shot_reference(config: TrainConfig, method: str, clip, env, base, novel) -> dict:
    """Zero-shot CLIP (the dataset's CoOp prompt) on the same evaluation images, as a reference:
    {"zeroshot_ref": {...}} when asked or cheap (`zero_shot_ref`, default auto: a backbone under
    ZERO_SHOT_REF_MAX_PARAMS), else {"zeroshot_ref_skipped": why}; {} for a zero-shot run itself."""
    from .methods import reference_method

    reference = reference_method()
    if method == reference:
        return {}
    if config.zero_shot_ref == "never":
        return {"zeroshot_ref_skipped": "--zero-shot-ref never"}
    size = sum(p.numel() for p in clip.model.parameters())
    if config.zero_shot_ref == "auto" and size > ZERO_SHOT_REF_MAX_PARAMS:
        return {"zeroshot_ref_skipped": f"the backbone has {size / 1e6:.0f}M parameters; "
                                        f"--zero-shot-ref always adds it, or run --method {reference}"}
    ref = zero_shot_scores(dataclasses.replace(config, eval_datasets=()), clip, env, base, novel)
    return {"zeroshot_ref": {k: v for k, v in ref.items() if k in ("base_acc", "novel_acc", "hm", "acc")}}


def zero_shot_scores(config: TrainConfig, clip, env, base, novel) -> dict:
    """`evaluate_base_novel` of zero-shot CLIP (the reference method) prompted as `config` says:
    its template / ensemble, else CoOp's template of the dataset."""
    from .api import create
    from .methods import reference_method
    from .recipes import zero_shot_templates

    model = create(reference_method(), clip, base.classnames,
                   templates=zero_shot_templates(config.dataset_name, config.template, config.ensemble))
    return evaluate_base_novel(model, config, env, base, novel)


def evaluate_base_novel(model, config: TrainConfig, env, base, novel, loaded=None) -> dict:
    """Accuracy of `model` on the base and novel halves (`config.eval_split`) and their HM, and
    on each of `config.eval_datasets` (`loaded`: those already loaded, by name)."""
    from .data import load_dataset
    from .scoring import harmonic_mean, score

    unreadable: list = []
    sets: dict = {}

    def acc(names, items, label):
        result = score(model.classifier(names), items, env.device, workers=env.workers,
                       precision=env.precision, on_error=env.on_error)
        unreadable.extend(result.unreadable)  # left out of the accuracy, counted in metrics
        sets[label] = {"classes": len(names), "images": result.read}
        return result.acc

    pick = (lambda d: d.val) if config.eval_split == "val" else (lambda d: d.test)
    if novel is not None:
        b = acc(base.classnames, pick(base), "base")
        n = acc(novel.classnames, pick(novel), "novel")
        metrics = {"base_acc": b, "novel_acc": n, "hm": harmonic_mean(b, n)}
    else:
        metrics = {"acc": acc(base.classnames, pick(base), "all")}
    for name in config.eval_datasets:
        d = (loaded or {}).get(name) or load_dataset(name, config.data_root)
        metrics[f"acc_{name}"] = acc(d.classnames, pick(d), name)
    metrics["eval_unreadable_images"] = len(unreadable)
    metrics["eval_split"], metrics["eval_sets"] = config.eval_split, sets
    notes = getattr(model, "evaluation_notes", None)  # a head on features: what its scores mean
    if notes and notes(novel.classnames if novel is not None else []):
        metrics["notes"] = notes(novel.classnames if novel is not None else [])
    return metrics
