"""Contrastive (CLIP) pretraining of the `tiny` backbone on the generated corpus.

Reproducible bit-for-bit on a CPU for a given seed, step count, batch size and torch version:
the model is initialised from the seed, every sample is generated from its own seed in the main
process, `torch.use_deterministic_algorithms(True)` and a fixed thread count (2) are set. The
weights are written as fp16 safetensors (the full open_clip state dict, loadable by
`open_clip.model.CLIP(**TINY_CONFIG)`), with a JSON record beside them.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..schedule import warmup_cosine
from . import corpus


@dataclass
class PretrainConfig:
    seed: int = 0
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 150
    weight_decay: float = 0.05
    threads: int = 2
    log_every: int = 50


def build_backbone(seed: int):
    """A trainable random-init tiny CLIP (all parameters require grad) and our runner around it."""
    import open_clip

    from ..backbone import Backbone
    from ..clip import TINY_CONFIG, Clip

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**TINY_CONFIG)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=77)
    clip = Clip(model=model, name="tiny", pretrained=None, seed=seed, tokenizer=tokenizer,
                image_size=corpus.IMAGE_SIZE)
    for p in model.parameters():
        p.requires_grad_(True)
    return Backbone(clip)


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up over `cfg.warmup` steps, then a cosine over the rest (`fastprompt.schedule`)."""
    return warmup_cosine(cfg.lr, step, cfg.steps - cfg.warmup, cfg.warmup, warmup="linear")


def encode(backbone, images: torch.Tensor, tokens: torch.Tensor):
    """Normalised image and text features (exact text shortcut: max(eot)+1 tokens)."""
    from ..backbone import RunOptions

    opts = RunOptions(kernels=False, truncate_text=True)
    img = F.normalize(backbone.encode_image(images, opts=opts), dim=-1)
    eot = backbone.eot_index(tokens)
    txt = backbone.encode_text(backbone.token_embeddings(tokens), eot, opts=opts,
                               used=int(eot.max()) + 1)
    return img, F.normalize(txt, dim=-1)


def pretrain(cfg: PretrainConfig, out: str | Path | None = None, log=print) -> dict:
    """Train; write `out` (.safetensors) and `out` with .json when given. Returns the record."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _pretrain(cfg, out, log)
    finally:  # leave the process as it was (tests run this in-process)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _pretrain(cfg: PretrainConfig, out, log) -> dict:
    backbone = build_backbone(cfg.seed)
    model = backbone.model
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98),
                            eps=1e-6)
    cache: dict[str, torch.Tensor] = {}
    started, losses = time.perf_counter(), []
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        images, texts = corpus.batch(cfg.seed, step * cfg.batch_size, cfg.batch_size)
        for t in set(texts) - cache.keys():
            cache[t] = backbone.clip.tokenize([t])[0]
        tokens = torch.stack([cache[t] for t in texts])
        img, txt = encode(backbone, images, tokens)
        logits = model.logit_scale.exp() * img @ txt.t()
        labels = torch.arange(len(texts))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if log and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            el = time.perf_counter() - started
            log(f"step {step}/{cfg.steps} loss {sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:]):.4f} "
                f"scale {model.logit_scale.exp().item():.1f} lr {lr_at(step, cfg):.2e} {el:.0f}s")
    wall = time.perf_counter() - started
    model.eval()
    record = {"config": asdict(cfg), "wall_s": round(wall, 1), "final_loss": losses[-1] if losses else None,
              "torch": torch.__version__, "dtype": "float16", "image_size": corpus.IMAGE_SIZE}
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    if out is not None:
        from safetensors.torch import save_file

        from ..checkpoint import CheckpointError, check_finite
        from ..errors import TrainingError
        from ..files import atomic_write, write_json

        try:
            check_finite(state, "the pretrained backbone")
        except CheckpointError as err:  # say it as a training failure
            raise TrainingError(f"{err}; nothing written to {out}") from None
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda tmp: save_file(state, str(tmp)))
        record["sha256"] = hashlib.sha256(out.read_bytes()).hexdigest()
        write_json(out.with_suffix(".json"), record)
    record["state"] = state
    return record
