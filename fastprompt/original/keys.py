"""The generic half of the map to the authors' checkpoints; each method's own half (its `Layout`:
names, config section, detection, option reader) lives in its file (`Method.original_layout`).

Full original names are those of the original `CustomCLIP` (`prompt_learner.ctx`, ...). A Dassl
checkpoint holds the state dict of the module the trainer registered (`Layout.registered`), so its
keys are the full names minus `Layout.owner` (CoOp-style learners and MMA's adapter learner are
registered alone: `ctx`, `text_adapter.5.up.weight`; MaPLe and IVLP register the whole model).
The correspondences of each method are written out beside its `Layout`, read from the original
sources (KaiyangZhou/CoOp, muzairkhattak/multimodal-prompt-learning, ZjjConan/Multi-Modal-Adapter,
gaojingsheng/LAMM).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from ..errors import CheckpointError


class OriginalCheckpointError(CheckpointError):
    """An original checkpoint that cannot be imported (one line naming the key and what was expected)."""


def err(msg: str) -> OriginalCheckpointError:
    return OriginalCheckpointError(msg)


@dataclass(frozen=True)
class FileFormat:
    """A checkpoint file of a method's own, instead of Dassl's `model.pth.tar-N` holding a state
    dict (CLIP-LoRA's `lora_weights.pt`: nested weights and the metadata that built them)."""

    filename: str          # the file's name as the original code writes it
    #: the unpickled file -> ({file key: tensor}, {config name: value the file records}); raises
    #: OriginalCheckpointError (`err`) on a file of another shape
    read: Callable
    #: (model, {file key: fp32 CPU tensor}) -> the object the original code saves
    write: Callable


@dataclass(frozen=True)
class Layout:
    """How the original code of one method saves it, and how to read it back."""

    family: str            # what the original code calls the method
    trainers: tuple        # TRAINER.NAME values of the original trainer
    registered: str        # Dassl model name: <output_dir>/<registered>/model.pth.tar-N
    owner: str             # path of the registered module in the original CustomCLIP ("" = whole)
    section: str           # TRAINER.<section> of the original config
    #: model -> {full original name: fastprompt parameter name} for every learned tensor
    names: Callable
    #: (this layout, state dict with full names, config {NAME: value}, class count, notes list)
    #: -> the fastprompt options; cross-checks what the tensors tell against the config, appends
    #: warnings to notes, raises OriginalCheckpointError (`err`) on a mismatch
    options: Callable
    known: frozenset = frozenset()  # config names read in TRAINER.<section>
    #: other config names read, in full (LAMM's top-level command-line flags; KgCoOp's and
    #: CLIP-Adapter's DATASET.NAME, which picks their prompt)
    flags: frozenset = frozenset()
    #: what `detect` calls a checkpoint of this layout (methods sharing a format share a kind)
    kind: str = ""
    #: sorted file keys -> the key that tells this kind, or None; None: another layout of the
    #: same kind detects it
    detect: Callable | None = None
    precedence: int = 50   # detectors run from the lowest: the more specific first
    ignored: tuple = ()    # full names of saved tensors that are not learned (buffers, copies)
    ignored_prefixes: tuple = ()
    #: parameters the method keeps frozen at their initial value: the file must hold exactly it
    frozen: frozenset = field(default_factory=frozenset)
    #: model -> {full original name: tensor}: frozen tensors the original file also holds that tell
    #: it from a related format (PromptSRC's prompt-free image tower, KgCoOp's unused
    #: `bias_vectors`); `save_original` writes them, the importer skips them (`ignored...`)
    markers: Callable | None = None
    #: one file of its own that maps to a state dict (FileFormat, CLIP-LoRA); None: Dassl's checkpoint
    file_format: FileFormat | None = None
    #: files that are no state dict at all (Tip-Adapter's cache tensors): `find(layout, path)`
    #: -> the file to read; `read(layout, file, clip, classnames, config, notes)` -> (the model's
    #: options, fill(model) putting the tensors in)
    find: Callable | None = None
    read: Callable | None = None


#: PREC is accepted in every section and not used (fastprompt computes in fp32 or the precision
#: it is run at)
ALWAYS_KNOWN = frozenset({"PREC"})
#: sections of a Dassl config that say nothing about the learned tensors: ignored silently
SILENT = {"DATALOADER", "INPUT", "OPTIM", "TRAIN", "TEST", "DATASET", "MODEL", "SEED", "OUTPUT_DIR",
          "RESUME", "USE_CUDA", "VERBOSE", "ENV", "TRAINER.NAME"}


def file_key(layout: Layout, full: str) -> str:
    return full[len(layout.owner) + 1:] if layout.owner else full


def full_key(layout: Layout, key: str) -> str:
    return f"{layout.owner}.{key}" if layout.owner else key


def ignorable(layout: Layout, full: str) -> bool:
    """Saved but not learned: token buffers, LAMM's frozen copy, the CLIP of whole-model files
    (IVLP's prompts live inside that CLIP, as `...VPT...`: those are learned)."""
    return full in layout.ignored or (full.startswith(layout.ignored_prefixes) and "VPT" not in full)


def original_names(model) -> dict[str, str]:
    """{full original name: fastprompt parameter name} for every learned tensor of `model`."""
    return model.original_layout.names(model)


def first_key(keys, pattern: str) -> str | None:
    """The first of `keys` (sorted) matching the regular expression `pattern`."""
    return next((k for k in keys if re.search(pattern, k)), None)


def detect(layouts, keys) -> tuple[str, str] | None:
    """(kind, the key that tells) of a state dict, from the names alone: the first detector of
    `layouts` (by precedence) that recognises the keys."""
    keys = sorted(keys)
    for layout in sorted((lay for lay in layouts if lay.detect), key=lambda lay: lay.precedence):
        key = layout.detect(keys)
        if key:
            return layout.kind, key
    return None


def read_config(layout: Layout, config, clip_name: str | None = None) -> tuple[dict, list[str]]:
    """The original config (mapping, nested or dotted, or a YAML path) as {NAME: value} for
    this layout's section (plus its `flags`, by full name), and the names ignored as unknown.

    Unknown names are ignored with a warning (the caller's), not refused: original configs
    carry many names that do not concern the tensors. Sections that cannot matter (DATALOADER,
    OPTIM, ...) are ignored silently. TRAINER.NAME of another trainer is refused.
    """
    if config is None:
        return {}, []
    if isinstance(config, (str, bytes)) or hasattr(config, "__fspath__"):
        from pathlib import Path

        from ..readers import load_yaml
        path = Path(config)
        if not path.is_file():
            raise err(f"original config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise err(f"original config {path} is not UTF-8 text: give the trainer's YAML") from None
        try:
            config = load_yaml(text) or {}
        except ValueError as e:  # not YAML, or aliases (which could expand without end)
            raise err(f"original config {path} is {e}") from None
    if not isinstance(config, dict):
        raise err(f"config must be a mapping or a YAML path, got {type(config).__name__}")
    flat: dict = {}

    def walk(prefix, node):
        for k, v in node.items():
            key = f"{prefix}{k}"
            walk(f"{key}.", v) if isinstance(v, dict) else flat.__setitem__(key, v)
    walk("", config)
    out, unknown = {}, []
    known = layout.known | ALWAYS_KNOWN
    for key, value in flat.items():
        parts = key.split(".")
        if key == "TRAINER.NAME" and value and value not in layout.trainers:
            raise err(f"config TRAINER.NAME is '{value}', not the {layout.family} trainer "
                      f"({'/'.join(layout.trainers)})")
        if key == "MODEL.BACKBONE.NAME" and clip_name and str(value).replace("/", "-") != clip_name:
            unknown.append(f"{key}={value} (the backbone given is {clip_name})")
        ours = len(parts) == 1 or parts[:2] == ["TRAINER", layout.section] and len(parts) == 3
        if key in layout.flags:
            out[key] = value
        elif ours and parts[-1] in known:
            out[parts[-1]] = value
        elif parts[0] not in SILENT and key not in SILENT:
            unknown.append(key)
    return out, unknown


def with_recorded(cfg: dict, recorded: dict, file) -> dict:
    """The config with what the checkpoint file records about itself (CLIP-LoRA's metadata); a
    config value that contradicts the file is refused, as the original loader refuses it."""
    def same(a, b):
        if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
            return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return str(a) == str(b)

    for key, value in recorded.items():
        if cfg.get(key) is not None and not same(cfg[key], value):
            raise err(f"{file} records {key}={value!r} in its metadata, the config says "
                      f"{key}={cfg[key]!r}: a checkpoint of another setting")
    return {**cfg, **recorded}


def options_for(layout: Layout, sd: dict, cfg: dict, n_classes: int) -> tuple[dict, list[str]]:
    """fastprompt options for an original state dict `sd` (full original names, fp32), after
    cross-checking what the tensors tell against the config; and notes to warn about."""
    notes: list[str] = []
    for key in ("prompt_learner.token_prefix", "adapter_learner.tokenized_prompts"):
        if key in sd and sd[key].shape[0] != n_classes:
            raise err(f"checkpoint key '{file_key(layout, key)}' holds {sd[key].shape[0]} "
                      f"classes but {n_classes} class names were given")
    return layout.options(layout, sd, cfg, n_classes, notes), notes


# ---------------------------------------------------------------------- structure from tensors
def layers(sd: dict, pattern: str) -> list[int]:
    """The layer numbers of the keys of `sd` matching `pattern` (one group: the number), sorted."""
    return sorted({int(m.group(1)) for k in sd if (m := re.fullmatch(pattern, k))})


def contiguous(key: str, found: list[int], first: int) -> None:
    want = list(range(first, first + len(found)))
    if found != want:
        bad = (sorted(set(want) - set(found)) or [found[-1]])[0]
        raise err(f"checkpoint key '{key.format(bad)}' breaks the run of layers {found}: "
                  f"expected consecutive layers from {first}")


def flag(value) -> bool:  # YAML gives bools; a mapping may give "False"
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def given(cfg: dict, name: str, found, key: str) -> None:
    """A config value `name` must agree with what the tensors tell (`found`, read from `key`)."""
    if cfg.get(name) is not None and int(cfg[name]) != found:
        raise err(f"checkpoint key '{key}' says {name}={found}, the config says {cfg[name]}")
