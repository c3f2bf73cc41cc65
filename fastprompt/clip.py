"""Loading a frozen open_clip backbone: `load_clip(name, pretrained="default", seed=0)`.

open_clip builds the model, loads weights, tokenizes; fastprompt's own forward pass lives in
`backbone.py`. Only ViT image towers with open_clip's standard causal text transformer are
supported; anything else is refused here, with the reason, before any method touches it.

The MLP activation is the one the weights were trained with: OpenAI's CLIP used QuickGELU
(x * sigmoid(1.702 x)) while open_clip builds `ViT-B-16` with GELU unless told otherwise, and
only warns. `activation.py` decides it (tag config, OpenAI release files, explicit choice) and
`Clip.source` records it with a fingerprint of the weights, so `fastprompt.load` and the exporters
rebuild the same network and notice other weights. `check_weights` says in seconds, before
anything is built or written, whether the weights can be had (`hub.py`: cache, then one probe).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import DEFAULT_WEIGHTS, resolve_weights
from .errors import BackboneError, first_line, setting, short_repr

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

#: The built-in backbone for tests and the offline default run: the ViT-B/16 structure (12 + 12
#: layers, 77 text tokens, the CLIP BPE vocabulary) at a width that runs in seconds on a CPU.
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 48, "layers": 12, "head_width": 16,
                   "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 12},
}
TINY_NAMES = ("tiny",)


@dataclass
class Clip:
    """A frozen open_clip model plus what is needed to rebuild it and to feed it.

    `source` is what `fastprompt.save` records so `fastprompt.load` can rebuild identical weights.
    """

    model: nn.Module
    name: str
    pretrained: str | None
    seed: int
    tokenizer: object
    image_size: int
    mean: tuple = OPENAI_MEAN
    std: tuple = OPENAI_STD
    extra: dict = field(default_factory=dict)
    quick_gelu: bool = False
    #: sampled fingerprint of the backbone's weights (see `weights_fingerprint`)
    fingerprint: str = ""

    @property
    def source(self) -> dict:
        """What rebuilds this backbone: name, weights (tag or absolute path), init seed, the
        activation, and the weights' fingerprint (checked by `fastprompt.load`)."""
        return {"model": self.name, "pretrained": self.pretrained, "seed": self.seed,
                "quick_gelu": self.quick_gelu, "fingerprint": self.fingerprint}

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def to(self, *args, **kwargs) -> "Clip":
        self.model.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device


def load_clip(name: str = "ViT-B-16", pretrained: str | None = DEFAULT_WEIGHTS, seed: int = 0,
              device: str | torch.device = "cpu", quick_gelu: bool | None = None) -> Clip:
    """Build a frozen CLIP.

    name: an open_clip model name (`ViT-B-16`), `tiny` (built in), or `hf-hub:org/repo`.
    pretrained: "default", the model's default weights as the train command has them: the shipped
    `shapes` for `tiny`, random init for any other model; None, "none" or "random": random init
    from `seed`; an open_clip tag (`openai`, `laion2b_s34b_b88k`; downloaded on first use, see
    `check_weights`); or a local checkpoint file (.pt/.bin/.safetensors, open_clip or OpenAI
    format, incl. OpenAI's released TorchScript file). For `tiny`, a bare tag names a file shipped
    in fastprompt/weights/: `shapes` (see `python -m fastprompt.pretrain`).
    quick_gelu: the MLP activation; None decides it from the weights (see `activation.py`).
    """
    import open_clip

    from .activation import resolve_quick_gelu

    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise BackboneError(f"seed must be an integer from 0 to 2**64-1 (torch's seeds), got "
                            f"{short_repr(seed)}")
    pretrained = check_weights(name, pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name in TINY_NAMES:
            if quick_gelu:
                raise BackboneError("the tiny backbone is built with GELU: drop quick_gelu=True")
            model = open_clip.model.CLIP(**TINY_CONFIG)
            tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=77)
            if pretrained is not None:
                _load_local_weights(model, pretrained, name)
        else:
            quick_gelu, release_state = resolve_quick_gelu(open_clip, name, pretrained, quick_gelu)
            model, tokenizer = _create_open_clip(open_clip, name, pretrained, quick_gelu, release_state)
    check_supported(model, name)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(device)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    from .activation import uses_quick_gelu, weights_fingerprint

    return Clip(model=model, name=name, pretrained=pretrained, seed=seed, tokenizer=tokenizer,
                image_size=image_size, mean=tuple(pp.get("mean", OPENAI_MEAN)),
                std=tuple(pp.get("std", OPENAI_STD)), quick_gelu=uses_quick_gelu(model),
                fingerprint=weights_fingerprint(model))


def check_weights(name: str, pretrained: str | None = DEFAULT_WEIGHTS) -> str | None:
    """The weights `load_clip(name, pretrained)` will load (`config.resolve_weights`; a file as an
    absolute path), checked in seconds without building anything: a known model, an existing
    regular file or a known tag, and for a tag that is not cached a server that answers
    (`hub.check_download`). BackboneError (one line) otherwise."""
    if pretrained is not None and not isinstance(pretrained, str):
        raise BackboneError(f"pretrained must be a tag or a file path, got {type(pretrained).__name__}")
    pretrained = resolve_weights(name, pretrained)
    if pretrained is not None and os.path.isfile(os.path.expanduser(pretrained)):
        return os.path.abspath(os.path.expanduser(pretrained))  # loadable from anywhere
    if pretrained is not None:
        _refuse_special_file(pretrained)
    if name in TINY_NAMES:
        if pretrained is not None and not packaged_weights(pretrained):
            raise BackboneError(f"checkpoint file not found: {pretrained} (the tiny backbone needs a "
                                f"shipped tag such as 'shapes', a local safetensors file, or "
                                f"{setting('--pretrained', 'none')} for random init)")
        return pretrained
    import open_clip

    if not name.startswith(("hf-hub:", "local-dir:")) and name not in set(open_clip.list_models()):
        raise BackboneError(f"unknown model '{name}': use 'tiny', an open_clip name such as ViT-B-16 "
                            f"(open_clip.list_models()), or hf-hub:ORG/REPO")
    if pretrained is not None and os.sep in pretrained:
        raise BackboneError(f"checkpoint file not found: {pretrained}")
    if pretrained is not None:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise BackboneError(f"unknown pretrained tag '{pretrained}' for {name}: choose one of "
                                f"{', '.join(tags) or '(none)'} or give a checkpoint file")
    from .hub import check_download

    check_download(open_clip, name, pretrained)
    return pretrained


def _create_open_clip(open_clip, name: str, pretrained: str | None, quick_gelu: bool,
                      release_state: dict | None):
    try:
        # files in OpenAI's release format are read by activation.py; open_clip reads the rest
        model = open_clip.create_model(name, pretrained=None if release_state is not None else pretrained,
                                       force_quick_gelu=quick_gelu)
        if release_state is not None:
            model.load_state_dict(release_state)
    except RuntimeError as e:  # open_clip raises RuntimeError for weights that don't fit
        raise BackboneError(f"could not load weights '{pretrained}' into {name}: "
                            f"{first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - a local file that is no weights file at all
        if pretrained is None or not os.path.isfile(pretrained) or isinstance(e, OSError):
            raise
        raise _not_weights(pretrained, e) from None
    return model, open_clip.get_tokenizer(name)


def _refuse_special_file(pretrained: str) -> None:
    """A `pretrained` naming a FIFO, socket or device (reading a FIFO blocks until a writer
    comes, /dev/zero never ends) is refused; tags and missing files are the loaders' business."""
    import stat

    try:
        mode = os.stat(os.path.expanduser(pretrained)).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise BackboneError(f"pretrained {pretrained} is not a regular file (a pipe, socket or "
                            f"device): give a weights file (.safetensors, .pt, .bin) or a tag")


def _not_weights(path: str, err: BaseException) -> BackboneError:
    return BackboneError(f"{path} is not a weights file ({type(err).__name__}: "
                         f"{first_line(err)[:100]}): give a .safetensors file or a torch state dict")


def read_weights_file(path: str) -> dict:
    """The {name: tensor} state dict of a local .safetensors or torch file (read with
    weights_only: nothing in it runs); BackboneError, one line, for anything else."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - the unpickler's and safetensors' many error types
        raise _not_weights(path, err) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not (isinstance(state, dict) and state and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise BackboneError(f"{path} holds {short_repr(state)}, not a state dict of named tensors: "
                            f"give the backbone's weights file")
    return state


def packaged_weights(tag: str) -> str | None:
    """The file shipped in fastprompt/weights/ for a bare tag ('shapes' or 'tiny-shapes'), if any."""
    if os.sep in tag or tag.endswith((".safetensors", ".pt", ".bin")):
        return None
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
    for stem in (f"tiny-{tag}", tag):
        path = os.path.join(folder, f"{stem}.safetensors")
        if os.path.isfile(path):
            return path
    return None


def _load_local_weights(model: nn.Module, path: str, name: str) -> None:
    """A file, or a tag shipped in fastprompt/weights/ (`check_weights` made sure of one)."""
    path = path if os.path.exists(path) else packaged_weights(path)
    state = read_weights_file(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BackboneError(f"{path} does not fit backbone '{name}': {len(missing)} missing keys "
                            f"(e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})")


def check_supported(model: nn.Module, name: str) -> None:
    """Refuse, with the reason, any model our runner would compute wrongly."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise BackboneError(f"{name}: only ViT image towers are supported "
                            f"(got {type(visual).__name__}); pick a ViT-* model")
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        raise BackboneError(f"{name}: only class-token pooling ViTs are supported (as in CLIP)")
    text = text_parts(model, name)
    for tower, blocks in (("image", visual.transformer.resblocks), ("text", text["blocks"])):
        bad = [type(b).__name__ for b in blocks if type(b) is not ResidualAttentionBlock]
        if bad:
            raise BackboneError(f"{name}: {tower} tower uses {bad[0]} blocks; only the standard "
                                f"ResidualAttentionBlock is supported")


def text_parts(model: nn.Module, name: str = "model") -> dict:
    """The pieces of the text tower, from a CLIP (flat attributes) or a CustomTextCLIP (.text)."""
    from open_clip.transformer import TextTransformer

    src = model
    if hasattr(model, "text"):
        if not isinstance(model.text, TextTransformer):
            raise BackboneError(f"{name}: only open_clip's own text transformer is supported "
                                f"(got {type(model.text).__name__}, e.g. a Hugging Face text tower)")
        src = model.text
        if src.cls_emb is not None:
            raise BackboneError(f"{name}: text towers with an appended class token (CoCa) are not supported")
    if getattr(src, "attn_mask", None) is None:
        raise BackboneError(f"{name}: the text tower must be causal (the prompt methods assume it)")
    pool = getattr(model, "text_pool_type", getattr(src, "pool_type", "argmax"))
    proj = src.text_projection
    return {
        "token_embedding": src.token_embedding,
        "positional_embedding": src.positional_embedding,
        "blocks": src.transformer.resblocks,
        "ln_final": src.ln_final,
        "projection": proj,
        "pool_type": pool,
        "eos_id": getattr(model, "text_eos_id", getattr(src, "eos_id", None)),
    }
