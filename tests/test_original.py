"""Checkpoints of the authors' code: import, export, refusals, a safe reader, the convert CLI.

Each checkpoint is written here with torch.save in the original layout (key names typed out from
the original sources, independently of fastprompt.original.keys), with a scheduler object of a
class defined here, fp16 tensors and the buffers the original saves, as
<out>/<registered>/model.pth.tar-2 (decoy) and model.pth.tar-5 (the newest: the one to import).
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

import fastprompt as fp
from fastprompt.convert import main as convert_main
from fastprompt.original import (OriginalCheckpointError, load_original, original_state_dict,
                                 save_original)
from fastprompt.original.unpickle import safe_load

from common import CLASSNAMES, images, tiny_clip


class WarmupScheduler:  # stands for Dassl's warm-up scheduler, which pickles whole objects
    def __init__(self):
        self.successor, self.last_epoch = {"T_max": 5}, 4


CASES = {  # case: (method, create options, original config)
    "coop": ("coop", {}, None),
    "coop-csc": ("coop", {"csc": True, "ctx_init": "", "n_ctx": 3}, {"TRAINER.COOP.CSC": True}),
    "cocoop": ("cocoop", {}, {"TRAINER": {"COCOOP": {"CTX_INIT": "a photo of a"}}}),
    "maple": ("maple", {}, {"N_CTX": 2, "PROMPT_DEPTH": 9}),
    "ivlp": ("ivlp", {"depth": 4}, {"PROMPT_DEPTH_TEXT": 4, "PROMPT_DEPTH_VISION": 4}),
    "mma": ("mma", {"start": 4, "end": 11, "width": 16, "text_scale": 0.01, "vision_scale": 0.01},
            {"ADAPTER_SCALE": 0.01, "TEXT_CTX_INIT": "a photo of a"}),
    "lamm": ("lamm", {"shots": 1}, {"origin_clip": True}),
    "coop+lamm": ("coop+lamm", {"shots": 4}, {"shots": 4, "TRAINER.COOP.CTX_INIT": "a photo of a"}),
    "maple+lamm": ("maple+lamm", {"label_layout": "of", "shots": 1, "depth": 3}, None),
    "maple+lamm-16": ("maple+lamm", {"label_layout": "of", "shots": 16, "depth": 3}, {"shots": 16}),
}
REGISTERED = {"coop": "prompt_learner", "cocoop": "prompt_learner", "lamm": "prompt_learner",
              "coop+lamm": "prompt_learner", "maple": "MultiModalPromptLearner",
              "maple+lamm": "MultiModalPromptLearner", "ivlp": "VLPromptLearner", "mma": "adapter_learner"}


def source_model(case, clip=None, names=CLASSNAMES, seed=0):
    """A fastprompt model holding fp16-representable non-initial values."""
    method, options, _ = CASES[case]
    model = fp.create(method, clip or tiny_clip(), names, **options).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_state().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05).copy_(p.half().float())
    return model


def original_keys(m, buffers=True) -> dict:
    """{key as the original trainer saves it: tensor}, typed out from the original sources;
    with `buffers`, also what it saves and fastprompt ignores (token buffers, CLIP weights)."""
    c, d = len(m.classnames), m.backbone.text_width
    pl = "" if m.name in ("coop", "cocoop", "lamm", "coop+lamm") else "prompt_learner."
    sd = {f"{pl}ctx": m.ctx.half()} if m.name != "mma" else {}
    if m.name == "cocoop":
        sd.update({f"meta_net.linear{i}.{p}": getattr(m.meta_net, f"linear{i}").get_parameter(p)
                   for i in (1, 2) for p in ("weight", "bias")})
    if "lamm" in m.name:
        sd[f"{pl}token_classes"] = m.label_emb
    if m.name.startswith("maple"):
        sd.update({f"prompt_learner.proj.{p}": m.proj.get_parameter(p).half() for p in ("weight", "bias")})
        for i, (t, f) in enumerate(zip(m.deep_text, m.deep_proj)):
            sd[f"prompt_learner.compound_prompts_text.{i}"] = t
            sd.update({f"prompt_learner.compound_prompt_projections.{i}.{p}": f.get_parameter(p)
                       for p in ("weight", "bias")})
    if m.name == "ivlp":
        sd["image_encoder.VPT"] = m.vision[0]
        for i in range(1, len(m.vision)):
            sd[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = m.vision[i].half()
            sd[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = m.deep_text[i - 1]
    if m.name == "mma":
        for k in m.text_adapter:
            for tower, branch in (("text_adapter", m.text_adapter[k]), ("visual_adapter", m.visual_adapter[k])):
                for p in ("weight", "bias"):
                    sd[f"{tower}.{k}.down.0.{p}"] = branch.down.get_parameter(p).half()
                    sd[f"{tower}.{k}.up.{p}"] = branch.up.get_parameter(p)
            sd.update({f"shared_adapter.{k}.0.{p}": m.shared_adapter[k].get_parameter(p) for p in ("weight", "bias")})
    if buffers and m.name == "mma":
        sd.update({"token_embedding": torch.randn(c, 77, d).half(), "tokenized_prompts": m.clip.tokenize(
            [f"a photo of a {n.replace('_', ' ')}." for n in m.classnames])})
    elif buffers:
        sd.update({f"{pl}token_prefix": torch.randn(c, 1, d).half(), f"{pl}token_suffix": torch.randn(c, 72, d)})
        if "lamm" in m.name:
            sd.update({f"{pl}fix_token": m.label_init, f"{pl}token_suffix_test": torch.randn(c, 73, d)})
        if pl:  # whole-model checkpoints also hold the CLIP (a few of its keys stand for all)
            sd.update({"image_encoder.class_embedding": m.clip.model.visual.class_embedding.half(),
                       "text_encoder.positional_embedding": m.clip.model.positional_embedding,
                       "logit_scale": m.clip.model.logit_scale})
    return {k: v.detach().clone() for k, v in sd.items()}


def write(path, state_dict, epoch=5, legacy=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state_dict, "epoch": epoch, "optimizer": {"state": {}, "param_groups": []},
                "scheduler": WarmupScheduler(), "val_result": 71.5}, path,
               _use_new_zipfile_serialization=not legacy)
    return path


def output_dir(tmp_path, case, sd, decoy=None):
    folder = tmp_path / "output" / REGISTERED[CASES[case][0]]
    write(folder / "model.pth.tar-2", decoy if decoy is not None else sd, epoch=2)
    write(folder / "model.pth.tar-5", sd)
    (folder / "checkpoint").write_text("model.pth.tar-5\n")
    return tmp_path / "output"


def load(case, path, names=CLASSNAMES, config="case", clip=None):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every case here is exact: no warning expected
        return load_original(CASES[case][0], path, clip or tiny_clip(), names,
                             config=CASES[case][2] if config == "case" else config).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_logits_loss_and_grads(case, tmp_path):
    src = source_model(case)
    decoy = original_keys(source_model(case, seed=1))
    model = load(case, output_dir(tmp_path, case, original_keys(src), decoy))
    x, y = images(3), torch.tensor([0, 2, 2])
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), atol=1e-5, rtol=1e-5)
    for m in (src, model):
        m.zero_grad()
        m.loss(x, y).backward()
    torch.testing.assert_close(model.loss(x, y), src.loss(x, y), atol=1e-5, rtol=1e-5)
    for name, p in src.trainable_state().items():
        torch.testing.assert_close(model.get_parameter(name).grad, p.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_original_state_dict_is_live_and_round_trips(case, tmp_path):
    src = source_model(case)
    model = load(case, write(tmp_path / "model.pth.tar-5", original_keys(src)))
    sd = original_state_dict(model)
    owner = {"prompt_learner": "prompt_learner.", "adapter_learner": "adapter_learner."}.get(
        REGISTERED[model.name], "")  # full names: the registered module's path in CustomCLIP
    learned = {owner + k: v for k, v in original_keys(src, buffers=False).items()}
    assert set(sd) == set(learned)
    for k, v in sd.items():  # lamm keeps its frozen context exact, the file holds it in fp16
        tol = {"atol": 1e-3, "rtol": 1e-3} if model.name == "lamm" and k.endswith("ctx") else {}
        torch.testing.assert_close(v.detach(), learned[k].float(), **tol)
    params = {id(p) for p in model.parameters()}
    assert all(id(v) in params for v in sd.values())
    x = images(2)
    again = load(case, save_original(model, tmp_path / "back", epoch=7))
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
        key = next(k for k in sd if sd[k].requires_grad)
        sd[key].add_(torch.randn_like(sd[key]))  # live: the model changes
        assert not torch.allclose(model(x), again(x))


def test_vit_b16_key_shapes_and_counts(tmp_path):
    clip = fp.load_clip("ViT-B-16", pretrained=None, seed=0)
    shapes = {"maple": {"prompt_learner.ctx": (2, 512), "prompt_learner.proj.weight": (768, 512),
                        "prompt_learner.compound_prompts_text.7": (2, 512),
                        "prompt_learner.compound_prompt_projections.7.weight": (768, 512)},
              "mma": {"adapter_learner.text_adapter.5.down.0.weight": (32, 512),
                      "adapter_learner.text_adapter.12.up.weight": (512, 32),
                      "adapter_learner.visual_adapter.5.down.0.weight": (32, 768),
                      "adapter_learner.visual_adapter.12.up.weight": (768, 32),
                      "adapter_learner.shared_adapter.5.0.weight": (32, 32)}}
    counts = {"maple": 3_555_072, "mma": 674_560}
    for case in ("maple", "mma"):
        src = fp.create(case, clip, CLASSNAMES[:2]).eval()
        with torch.no_grad():  # the file holds some tensors in fp16
            for p in src.trainable_state().values():
                p.copy_(p.half().float())
        sd = original_keys(src)
        path = write(tmp_path / case / "model.pth.tar-1", sd)
        model = load(case, path, CLASSNAMES[:2], config={"ADAPTER_SCALE": 0.001} if case == "mma" else None, clip=clip)
        osd = fp.original_state_dict(model)  # the package-level (lazy) export
        assert {k: tuple(osd[k].shape) for k in shapes[case]} == shapes[case]
        assert sum(p.numel() for p in osd.values()) == counts[case]
        with torch.no_grad():
            x = torch.randn(1, 3, 224, 224)
            torch.testing.assert_close(model(x), src(x), atol=1e-4, rtol=1e-4)


def _refused(match, case, path, names=CLASSNAMES, config="case"):
    with pytest.raises(OriginalCheckpointError, match=match) as err:
        load(case, path, names, config)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_refusals(tmp_path):
    maple = original_keys(source_model("maple"))
    coop = original_keys(source_model("coop"))
    mma_dir = output_dir(tmp_path / "m", "mma", original_keys(source_model("mma")))
    f = write(tmp_path / "maple.pth.tar-5", maple)
    _refused(r"looks like a maple checkpoint.*not CoOp", "coop", f)          # other method
    _refused(r"looks like a coop checkpoint", "cocoop", write(tmp_path / "c", coop))
    _refused(r"adapter_learner/ \(MMA\)", "maple", mma_dir)                  # other run folder
    _refused(r"'ctx'.*N_CTX=4.*16", "coop", write(tmp_path / "c", coop), config={"N_CTX": 16})
    _refused(r"PROMPT_DEPTH", "maple", f, config={"PROMPT_DEPTH": 3})        # depth
    _refused(r"ADAPTER_DIM=16.*64", "mma", mma_dir, config={"ADAPTER_DIM": 64})  # width
    bad = dict(original_keys(source_model("mma")))
    bad["visual_adapter.4.down.0.weight"] = torch.zeros(8, 48)
    _refused(r"'visual_adapter.4.down.0.weight' has shape \(8, 48\), expected \(16, 48\)", "mma",
             write(tmp_path / "w", bad))
    _refused(r"'token_prefix' holds 5 classes but 4", "coop", write(tmp_path / "c", coop),
             names=CLASSNAMES[:4])                                          # class count
    csc = original_keys(source_model("coop-csc"))
    csc.pop("token_prefix")
    _refused(r"5 class-specific contexts but 4", "coop-csc", write(tmp_path / "s", csc), names=CLASSNAMES[:4])
    _refused(r"key 'prompt_learner.foo' is unknown", "maple",
             write(tmp_path / "u", {**maple, "prompt_learner.foo": torch.zeros(2)}))
    missing = {k: v for k, v in maple.items() if k != "prompt_learner.compound_prompt_projections.3.bias"}
    _refused(r"lacks key 'prompt_learner.compound_prompt_projections.3.bias'", "maple", write(tmp_path / "x", missing))
    _refused(r"CLASS_TOKEN_POSITION", "coop", write(tmp_path / "c", coop), config={"CLASS_TOKEN_POSITION": "middle"})
    _refused(r"TRAINER.NAME is 'MaPLe'", "coop", write(tmp_path / "c", coop), config={"TRAINER": {"NAME": "MaPLe"}})
    _refused(r"not found", "coop", tmp_path / "nowhere")
    lamm = original_keys(source_model("coop+lamm"))  # its context was trained
    _refused(r"looks like a lamm checkpoint", "coop", write(tmp_path / "l", lamm))
    _refused(r"'ctx' differs from the embeddings of 'a photo of a'.*coop\+lamm", "lamm",
             write(tmp_path / "l", lamm), config=None)
    _refused(r"origin_clip=True", "coop+lamm", write(tmp_path / "l", lamm), config={"origin_clip": True})
    _refused(r"'tokenized_prompts' does not hold the prompt 'a photo of a red apple.' of class 0",
             "mma", mma_dir, names=CLASSNAMES[::-1])                        # class order


def test_config_names_yaml_and_warnings(tmp_path):
    sd = original_keys(source_model("maple"))
    yaml_file = tmp_path / "vit_b16_c2_ep5_batch4_2ctx.yaml"
    yaml_file.write_text("OPTIM:\n  LR: 0.0035\nTRAINER:\n  MAPLE:\n    N_CTX: 2\n    CTX_INIT: \"a photo of a\"\n"
                         "    PREC: \"fp16\"\n    PROMPT_DEPTH: 9\n    NEW_THING: 1\n")
    with pytest.warns(UserWarning, match="TRAINER.MAPLE.NEW_THING"):
        fp.load_original("maple", write(tmp_path / "m", sd), tiny_clip(), CLASSNAMES, config=str(yaml_file))
    sd["image_encoder.class_embedding"] += 1  # trained on another CLIP than the one given
    with pytest.warns(UserWarning, match="CLIP weights in the checkpoint"):
        load_original("maple", write(tmp_path / "m", sd), tiny_clip(), CLASSNAMES)
    with pytest.warns(UserWarning, match="ADAPTER_SCALE not given"):
        load_original("mma", write(tmp_path / "a", original_keys(source_model("mma"))), tiny_clip(),
                      CLASSNAMES, config={"TEXT_CTX_INIT": "a photo of a"})


def test_reader_runs_nothing_and_reads_legacy_files(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    sd = original_keys(source_model("coop"))
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": sd, "epoch": 1, "scheduler": Evil(), "optimizer": [Evil()]}, path)
    obj = safe_load(path)
    assert not marker.exists() and "system" in repr(obj["scheduler"])
    load("coop", path)  # the tensors are fine; the rest is inert
    torch.save({"state_dict": {**sd, "ctx": Evil()}}, path)
    _refused(r"'ctx' is not a tensor", "coop", path)
    assert not marker.exists()
    legacy = write(tmp_path / "legacy.pth.tar", sd, legacy=True)
    read = safe_load(legacy)
    assert read["epoch"] == 5 and torch.equal(read["state_dict"]["ctx"], sd["ctx"])
    assert read["state_dict"]["ctx"].dtype == torch.float16


def test_convert_cli_writes_a_run_that_fp_load_reads(tmp_path, capsys):
    src = source_model("maple")
    root = output_dir(tmp_path, "maple", original_keys(src))
    names = tmp_path / "classnames.txt"
    names.write_text("\n".join(CLASSNAMES) + "\n")
    out = tmp_path / "run"
    args = ["--original", "maple", str(root), "--model", "tiny", "--pretrained", "none",
            "--classnames", str(names), "--out", str(out)]
    assert convert_main(args) == 0
    model = fp.load(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images(2)), src(images(2)), atol=1e-5, rtol=1e-5)
    capsys.readouterr()
    args[2] = str(tmp_path / "missing")
    assert convert_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        convert_main(["--original", "maple", str(root), "--out", str(out)])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1
