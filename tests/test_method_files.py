"""A method's knowledge in its own file (#16): cards, registry order, original layouts, runtime
switches apart from the saved config, and the backbone's text paths the methods use."""
import dataclasses
import json

import pytest
import torch

import fastprompt as fp
from common import ALL_METHODS, CLASSNAMES, TRAINING_FREE, images, perturb, tiny_clip
from fastprompt import catalog
from fastprompt.backbone import (NO_HOOKS, RUNTIME_OPTIONS, Backbone, RunOptions, TowerHooks,
                                 insert_rows)
from fastprompt.errors import InputError
from fastprompt.methods import METHODS, card, list_methods, reference_method, register
from fastprompt.recipes import PROTOCOLS, recipe_for

_TIP_DTD = {"search_beta": 13.0, "search_alpha": 13.0, "alpha": 2.0}
#: Tip-Adapter on ImageNet: configs/imagenet.yaml's numbers are the defaults; the 7-template
#: ensemble of main_imagenet.py; no search (its validation split is its test set)
_TIP_IMAGENET = {"search": False, "templates": [
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}."]}
#: (batch, lr, epochs, warm-up epochs, options) per method and protocol, as the released configs
#: give them (METHODS.md), and the departures on ImageNet (any protocol)
PINNED = {
    "zeroshot": {"base2novel": (32, 0.002, 0, 0, {}), "cross": (32, 0.002, 0, 0, {})},
    "coop": {"base2novel": (32, 0.002, 200, 1, {}), "cross": (32, 0.002, 50, 1, {})},
    "cocoop": {"base2novel": (1, 0.002, 10, 1, {}), "cross": (1, 0.002, 10, 1, {})},
    "maple": {"base2novel": (4, 0.0035, 5, 1, {}), "cross": (4, 0.0026, 2, 1, {"depth": 3})},
    "ivlp": {"base2novel": (4, 0.0035, 5, 1, {}), "cross": (4, 0.0035, 5, 1, {})},
    "mma": {"base2novel": (16, 0.0015, 5, 0, {}), "cross": (16, 0.0015, 5, 0, {})},
    "lamm": {"base2novel": (32, 0.002, 50, 1, {}), "cross": (32, 0.002, 50, 1, {})},
    "coop+lamm": {"base2novel": (32, 0.002, 50, 1, {}), "cross": (32, 0.002, 50, 1, {})},
    "maple+lamm": {"base2novel": (4, 0.0035, 5, 1, {}), "cross": (4, 0.0035, 5, 1, {})},
    # GPA's mean and std by protocol; few-shot on DTD: the yaml's second group (45 / 5)
    "promptsrc": {"base2novel": (4, 0.0025, 20, 1, {"gpa_mean": 15.0, "gpa_std": 1.0}),
                  "cross": (4, 0.0025, 20, 1, {"depth": 3, "gpa_mean": 6.0, "gpa_std": 10.0}),
                  "fewshot": (4, 0.0025, 50, 1, {"gpa_mean": 45.0, "gpa_std": 5.0})},
    "kgcoop": {"base2novel": (128, 0.002, 100, 1, {}), "cross": (128, 0.002, 100, 1, {})},
    # Tip-Adapter configs/dtd.yaml: search_scale [13, 13], init_alpha 2 (every protocol)
    "tip_adapter": {p: (256, 0.002, 0, 0, _TIP_DTD) for p in PROTOCOLS},
    "tip_adapter_f": {p: (256, 0.001, 20, 0, _TIP_DTD) for p in PROTOCOLS},
    "clip_adapter": {"base2novel": (32, 0.002, 200, 1, {}), "cross": (32, 0.002, 50, 1, {})},
    # a step budget, not epochs (tests/test_clip_lora.py pins the rest of the recipe)
    "clip_lora": {"base2novel": (32, 0.0002, 0, 0, {}), "cross": (32, 0.0002, 0, 0, {}),
                  "fewshot": (32, 0.0002, 0, 0, {})},
}
for _pinned in PINNED.values():  # no released few-shot config of their own: the base2novel one
    _pinned.setdefault("fewshot", _pinned["base2novel"])
ON_IMAGENET = {"coop": {"epochs": 50}, "mma": {"batch_size": 128}, "clip_adapter": {"epochs": 50},
               "tip_adapter": {"options": _TIP_IMAGENET}, "tip_adapter_f": {"options": _TIP_IMAGENET},
               # PromptSRC's few-shot GPA group of ImageNet, Caltech, Pets, Food, UCF, SUN
               ("promptsrc", "fewshot"): {"options": {"gpa_mean": 30.0, "gpa_std": 30.0}}}


def fields(r):
    return (r.batch_size, r.lr, r.epochs, r.warmup_epochs, r.options)


# ---------------------------------------------------------------- cards and registry

def test_registry_order_reference_and_cards_read_without_torch():
    assert list(METHODS) == ALL_METHODS  # the table's order
    assert list_methods() == sorted(ALL_METHODS) == fp.list_methods()
    assert reference_method() == "zeroshot"
    assert list(catalog.CARDS) == ALL_METHODS
    assert catalog.method_cards() == {name: card(name) for name in METHODS}
    # those that learn from training images: all but zero-shot (Tip-Adapter's cache takes no step)
    assert catalog.method_names(trained=True) == [m for m in ALL_METHODS if m != "zeroshot"]
    assert [m for m in ALL_METHODS if not catalog.recipe_from_card(m, catalog.CARDS[m]).trains] \
        == TRAINING_FREE


@pytest.mark.parametrize("method", ALL_METHODS)
def test_cards_give_the_released_recipes(method):
    for protocol in PROTOCOLS:
        r = recipe_for(method, "dtd", protocol)
        assert fields(r) == PINNED[method][protocol], (method, protocol)
        assert r.source, (method, protocol)
        imagenet = recipe_for(method, "imagenet", protocol)
        want = dataclasses.replace(r, **ON_IMAGENET.get((method, protocol), ON_IMAGENET.get(method, {})))
        assert fields(imagenet) == fields(want), (method, protocol)
    assert card(method)["about"] == catalog.METHOD_SUMMARIES[method]


def test_recipe_options_are_a_copy():
    r = recipe_for("maple", recipe="cross")
    r.options["depth"] = 99
    assert recipe_for("maple", recipe="cross").options == {"depth": 3}


def test_register_needs_a_card_and_a_new_name():
    before = dict(METHODS)
    with pytest.raises(TypeError, match="no entry in CARDS"):
        register("no-card")(type("NoCard", (), {"__module__": __name__}))
    with pytest.raises(TypeError, match="registered twice"):
        register("coop")(type("Again", (), {"__module__": "fastprompt.methods.coop"}))
    assert METHODS == before


# ---------------------------------------------------------------- original layouts

@pytest.mark.parametrize("method", [m for m in ALL_METHODS[1:] if not METHODS[m].original_layout.read])
def test_each_layout_detects_its_own_checkpoint(method, tmp_path):
    from fastprompt.original import layouts, read_state_dict, save_original
    from fastprompt.original.keys import detect, file_key

    model = fp.create(method, tiny_clip(), CLASSNAMES)
    layout = type(model).original_layout
    assert layouts()[method] is layout
    sd, _ = read_state_dict(method, save_original(model, tmp_path))
    keys = [file_key(layout, k) for k in sd]
    assert detect(layouts().values(), keys)[0] == layout.kind
    assert set(layout.names(model).values()) == set(model.trainable_state()) | layout.frozen


def test_zero_shot_has_no_original_format():
    from fastprompt.original import OriginalCheckpointError, find_checkpoint

    assert METHODS["zeroshot"].original_layout is None
    with pytest.raises(OriginalCheckpointError, match="no original checkpoint format"):
        find_checkpoint("zeroshot", ".")


# ---------------------------------------------------------------- runtime switches

def test_runtime_switches_are_not_config():
    model = fp.create("mma", tiny_clip(), CLASSNAMES, kernels=False, cache="false", text_chunk=2,
                      width=8)
    assert model.runtime == RunOptions(kernels=False, truncate_text=True, text_chunk=2, cache=False)
    assert model.config.width == 8
    assert not set(RUNTIME_OPTIONS) & set(model.options())
    assert not any(hasattr(model.config, k) for k in RUNTIME_OPTIONS)
    with pytest.raises(InputError, match="option 'text_chunk' of method 'coop' must be >= 0"):
        fp.create("coop", tiny_clip(), CLASSNAMES, text_chunk=-1)
    with pytest.raises(InputError, match="valid options: .*kernels.*text_chunk"):
        fp.create("coop", tiny_clip(), CLASSNAMES, nope=1)
    assert model.set_fast(True).runtime == RunOptions(text_chunk=2)
    assert model.set_fast(False).runtime == RunOptions(text_chunk=2).plain()


def test_a_plain_model_reloads_fast_and_old_configs_load(tmp_path):
    model = perturb(fp.create("maple", tiny_clip(), CLASSNAMES)).set_fast(False).eval()
    run = fp.save(model, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    assert not set(RUNTIME_OPTIONS) & set(config["options"])
    x = images(2)
    want = model(x)
    assert fp.load(run, clip=tiny_clip()).runtime == RunOptions()
    # a run saved before the switches left the config: they are ignored
    config["options"].update(kernels=False, truncate_text=False, cache=False, text_chunk=0)
    (run / "config.json").write_text(json.dumps(config))
    again = fp.load(run, clip=tiny_clip()).eval()
    assert again.runtime == RunOptions()
    assert torch.allclose(again(x), want, atol=1e-5)


def test_methods_leave_the_callers_config_alone():
    coop, zeroshot = METHODS["coop"], METHODS["zeroshot"]
    config = coop.Config(ctx_init="", n_ctx=3)
    model = coop(tiny_clip(), CLASSNAMES, config)
    assert config.prompt == "a photo of a" and model.config.prompt == "X X X"
    config = zeroshot.Config(templates="a {} here.")
    model = zeroshot(tiny_clip(), CLASSNAMES, config)
    assert config.templates == "a {} here." and model.config.templates == ["a {} here."]


# ---------------------------------------------------------------- backbone text paths

def _text(seed=0):
    bb = Backbone(tiny_clip())
    tpl = METHODS["zeroshot"](tiny_clip(), CLASSNAMES, METHODS["zeroshot"].Config()).template
    g = torch.Generator().manual_seed(seed)
    prompts = {i: torch.randn(2, bb.text_width, generator=g) for i in range(1, bb.n_text_layers)}
    return bb, tpl, prompts


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_text_from_layer_k_equals_the_whole_tower(layer):
    bb, tpl, prompts = _text()
    hooks = TowerHooks(prompts={i: p for i, p in prompts.items() if i >= layer})
    whole = bb.encode_text(tpl.embeddings, tpl.eot, hooks, used=tpl.used_tokens)
    hidden = bb.text_hidden(tpl.embeddings, tpl.eot, RunOptions(), layer, used=tpl.used_tokens)
    assert hidden.shape[1] == tpl.used_tokens
    parts = bb.encode_text_from(hidden, tpl.eot, layer, hooks)
    assert torch.allclose(parts, whole, atol=1e-6)
    if layer > 1:  # text_hidden applies no hooks: prompts below `layer` would change the result
        below = TowerHooks(prompts=prompts)
        assert not torch.allclose(bb.encode_text(tpl.embeddings, tpl.eot, below), whole, atol=1e-4)


def test_text_per_prompt_equals_one_pass_per_prompt():
    bb, tpl, _ = _text()
    rows = torch.randn(3, 4, bb.text_width, generator=torch.Generator().manual_seed(1))
    for opts in (RunOptions(), RunOptions().plain(), RunOptions(text_chunk=4)):
        got = bb.encode_text_per_prompt(tpl.embeddings, tpl.eot, rows, opts, used=tpl.used_tokens)
        assert got.shape == (3, len(CLASSNAMES), bb.embed_dim)
        for b in range(3):
            one = bb.encode_text(insert_rows(tpl.embeddings, rows[b], 1), tpl.eot, NO_HOOKS, opts)
            assert torch.allclose(got[b], one, atol=1e-5)


def test_kernels_off_insertion_is_the_reference(monkeypatch):
    """Kernels off: the deep-prompt insertion + ln_1 is `kernels.reference`'s, bit-identical to
    torch.cat + open_clip's LayerNorm (fp32 and bf16, with and without autocast)."""
    from fastprompt.kernels import reference

    ln = tiny_clip().model.transformer.resblocks[1].ln_1
    for dtype in (torch.float32, torch.bfloat16):
        for amp in (False, True):
            x = torch.randn(3, 10, ln.weight.shape[0]).to(dtype)
            p = torch.randn(2, ln.weight.shape[0])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                cat = insert_rows(x, p, 1)
                ref_x, ref_h = reference.insert_prompts_layernorm(x, p.to(dtype), 1, ln.weight,
                                                                  ln.bias, ln.eps)
                assert torch.equal(ref_x, cat) and torch.equal(ref_h, ln(cat)), (dtype, amp)
    from fastprompt import kernels

    real, calls, fused = reference.insert_prompts_layernorm, [], []
    monkeypatch.setattr(reference, "insert_prompts_layernorm",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(kernels, "insert_prompts_layernorm",
                        lambda *a, **k: fused.append(1) or real(*a, **k))
    model = fp.create("maple", tiny_clip(), CLASSNAMES, kernels=False)
    model(images(1))
    deep = 2 * (model.config.depth - 1)  # deep prompts of both towers
    assert (len(calls), len(fused)) == (deep, 0)
    model.set_fast(True)(images(1))
    assert (len(calls), len(fused)) == (deep, deep)  # kernels on: the dispatcher, not the reference
