"""Hand-written text prompts: tokens, frozen token embeddings and where each part sits.

A `PromptTemplate` holds, for a list of class names, the tokenized sentences
`"{prefix} {name}{suffix}"` (CoOp replaces `_` in names with spaces), their frozen token
embeddings [C, L, D], the end-of-text rows, and the row where each class name starts. Methods
substitute learnable rows into `embeddings` (context after SOS, label embeddings over the name).
"""
from __future__ import annotations

import torch
from torch import nn

from .backbone import Backbone


def clean_name(name: str) -> str:
    return name.replace("_", " ").strip()


class PromptTemplate(nn.Module):
    def __init__(self, backbone: Backbone, classnames: list[str], prefix: str = "a photo of a",
                 suffix: str = "."):
        super().__init__()
        if len(classnames) == 0:
            raise ValueError("empty class list: give at least one class name")
        self.classnames = [str(c) for c in classnames]
        self.prefix, self.suffix = prefix, suffix
        names = [clean_name(c) for c in self.classnames]
        texts = [" ".join(t for t in (prefix, n) if t) + suffix for n in names]
        device = backbone.model.logit_scale.device
        tokens = backbone.clip.tokenize(texts)
        #: max(eot) + 1: the text tokens that matter (a host int: no device sync when truncating)
        self.used_tokens = int(backbone.eot_index(tokens).max()) + 1
        tokens = tokens.to(device)
        eot = backbone.eot_index(tokens)
        bare = backbone.clip.tokenize([prefix + suffix]).to(device)
        #: first row of the class name (row 0 is SOS)
        self.name_start = int(backbone.eot_index(bare)[0]) - self.n_tokens(backbone, suffix)
        #: BPE tokens of each class name
        self.name_lengths = (eot - backbone.eot_index(bare)[0]).tolist()
        if min(self.name_lengths) < 1:
            raise ValueError(f"empty class name in {self.classnames!r}")
        if int(eot.max()) >= tokens.shape[1] - 1:
            raise ValueError(f"a prompt fills all {tokens.shape[1]} text tokens: shorten the class "
                             f"names or the prompt prefix")
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
        return (self.prefix, self.suffix, tuple(self.classnames))

    def __len__(self) -> int:
        return len(self.classnames)
