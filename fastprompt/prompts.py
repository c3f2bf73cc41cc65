"""Hand-written text prompts: tokens, frozen token embeddings and where each part sits.

A `PromptTemplate` holds, for a list of class names, the tokenized sentences `fmt.format(name)`
(e.g. "a photo of a {}." or CoOp's "a photo of a {}, a type of pet."; CoOp replaces `_` in names
with spaces), their frozen token embeddings [C, L, D], the end-of-text rows, and the row where each
class name starts. Methods substitute learnable rows into `embeddings` (context after SOS, label
embeddings over the name).
"""
from __future__ import annotations

import torch
from torch import nn

from .backbone import Backbone


#: the prompt ensemble of CoOp's ZeroshotCLIP2 (CoOp trainers/imagenet_templates.py,
#: IMAGENET_TEMPLATES_SELECT); it appends the dataset's own template except on ImageNet
ENSEMBLE_TEMPLATES = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                      "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
                      "a photo of the small {}.")
DEFAULT_TEMPLATE = "a photo of a {}."


def clean_name(name: str) -> str:
    return name.replace("_", " ").strip()


def check_template(fmt: str) -> str:
    """A prompt template: text with exactly one `{}` where the class name goes."""
    if not isinstance(fmt, str) or fmt.count("{}") != 1:
        raise ValueError(f"prompt template {fmt!r} must hold exactly one '{{}}' for the class name, "
                         f"e.g. 'a photo of a {{}}.'")
    return fmt


class PromptTemplate(nn.Module):
    def __init__(self, backbone: Backbone, classnames: list[str], prefix: str = "a photo of a",
                 suffix: str = ".", fmt: str | None = None):
        """Sentences `fmt` with each class name in its `{}`; without `fmt`, "{prefix} {}{suffix}"."""
        super().__init__()
        if len(classnames) == 0:
            raise ValueError("empty class list: give at least one class name")
        self.classnames = [str(c) for c in classnames]
        self.fmt = check_template(fmt if fmt is not None else
                                  (f"{prefix} {{}}" if prefix else "{}") + suffix)
        before, after = self.fmt.split("{}")
        names = [clean_name(c) for c in self.classnames]
        texts = [before + n + after for n in names]
        device = backbone.model.logit_scale.device
        length = getattr(backbone.clip.tokenizer, "context_length", None)
        if length and len(f"{before} {after}".split()) > length - 2:  # a word is >= 1 token:
            raise ValueError(_too_long(texts[0], length))  # no need to tokenize 100k words
        tokens = backbone.clip.tokenize(texts)
        eot = backbone.eot_index(tokens)
        if int(eot.max()) >= tokens.shape[1] - 1:
            raise ValueError(_too_long(texts[int(eot.argmax())], tokens.shape[1]))
        _check_distinct(tokens, self.classnames, texts)
        #: max(eot) + 1: the text tokens that matter (a host int: no device sync when truncating)
        self.used_tokens = int(eot.max()) + 1
        tokens = tokens.to(device)
        eot = backbone.eot_index(tokens)
        bare = backbone.clip.tokenize([before + after]).to(device)
        #: first row of the class name (row 0 is SOS)
        self.name_start = 1 + self.n_tokens(backbone, before.strip())
        #: BPE tokens of each class name
        self.name_lengths = (eot - backbone.eot_index(bare)[0]).tolist()
        if min(self.name_lengths) < 1:
            i = self.name_lengths.index(min(self.name_lengths))
            raise ValueError(f"empty class name {self.classnames[i]!r:.60} (class {i}): give every "
                             f"class a name")
        with torch.no_grad():
            emb = backbone.token_embeddings(tokens)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("eot", eot, persistent=False)
        self.register_buffer("embeddings", emb, persistent=False)

    @staticmethod
    def n_tokens(backbone: Backbone, text: str) -> int:
        """BPE tokens of `text` alone (without SOS/EOT)."""
        if not text:
            return 0
        tok = backbone.clip.tokenize([text])
        return int(backbone.eot_index(tok)[0]) - 1

    @property
    def key(self) -> tuple:
        """Identifies the prompt sentences (for caches of values computed from them)."""
        return (self.fmt, tuple(self.classnames))

    def __len__(self) -> int:
        return len(self.classnames)


def _too_long(text: str, length: int) -> str:
    shown = text if len(text) <= 60 else text[:40] + " ... " + text[-15:]
    return (f"the prompt {shown!r} is too long for the text encoder's context length of {length} "
            f"tokens: use fewer context tokens (n_ctx), a shorter template or shorter class names")


def _check_distinct(tokens: torch.Tensor, classnames: list[str], texts: list[str]) -> None:
    """Two classes whose prompts tokenize alike could never be told apart (CLIP's tokenizer
    lower-cases and reads '_' as a space: folders 'Rose' and 'rose' are one prompt)."""
    seen: dict = {}
    for i, row in enumerate(tokens.tolist()):
        j = seen.setdefault(tuple(row), i)
        if j != i:
            raise ValueError(f"class names {classnames[j]!r:.60} and {classnames[i]!r:.60} give the "
                             f"same prompt {texts[i]!r:.80} (the tokenizer lower-cases and reads "
                             f"'_' as a space): rename or merge one of them")
