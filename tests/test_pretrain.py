"""The pretraining corpus, the pretraining script and the generated downstream datasets."""
import json

import numpy as np
import torch

from fastprompt.data import load_dataset, split_base_novel
from fastprompt.data.generated import GENERATED, held_out_classes
from fastprompt.pretrain import corpus
from fastprompt.pretrain.__main__ import main as pretrain_main
from fastprompt.pretrain.train import PretrainConfig, pretrain


def test_corpus_is_deterministic_per_sample():
    a = corpus.sample(3, 17)
    b = corpus.sample(3, 17)
    assert a[1] == b[1] and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    c = corpus.sample(3, 18)
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    x1, t1 = corpus.batch(0, 10, 4)
    x2, t2 = corpus.batch(0, 8, 6)  # the same samples whatever the batch boundaries
    assert t1 == t2[2:] and torch.equal(x1, x2[2:])
    assert x1.shape == (4, 3, corpus.IMAGE_SIZE, corpus.IMAGE_SIZE)


def test_corpus_never_shows_held_out_pairs():
    for i in range(500):
        scene = corpus.sample_scene(np.random.default_rng([0, i]))
        assert (scene["colour"], scene["shape"]) not in corpus.HELD_OUT
    assert held_out_classes() == ["red triangle", "pink circle"]  # in shapes_colour


def test_two_short_runs_give_identical_weights(tmp_path):
    threads = torch.get_num_threads()
    cfg = PretrainConfig(steps=3, batch_size=8, warmup=2, log_every=100)
    a = pretrain(cfg, tmp_path / "a.safetensors", log=None)
    b = pretrain(cfg, tmp_path / "b.safetensors", log=None)
    assert a["sha256"] == b["sha256"]
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    c = pretrain(PretrainConfig(steps=3, batch_size=8, warmup=2, seed=1), None, log=None)
    assert any(not torch.equal(a["state"][k], c["state"][k]) for k in a["state"])


def test_pretrain_cli_writes_loadable_weights_and_record(tmp_path, capsys):
    import fastprompt as fp

    out = tmp_path / "w.safetensors"
    assert pretrain_main(["--steps", "2", "--batch-size", "4", "--out", str(out)]) == 0
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["config"]["steps"] == 2 and rec["torch"] == torch.__version__ and len(rec["sha256"]) == 64
    clip = fp.load_clip("tiny", pretrained=str(out))
    assert clip.model.logit_scale.dtype == torch.float32


def test_generated_datasets():
    sizes = {"shapes_colour": 24, "shapes_texture": 24, "shapes_count": 24}
    assert set(GENERATED) == set(sizes)
    for name in GENERATED:
        n = sizes[name]
        d = load_dataset(name, n_train=2, n_val=1, n_test=1)
        assert len(d.classnames) == n == len(set(d.classnames))
        assert len(d.train) == 2 * n and d.train[0].image.size == (32, 32)
        base, novel = split_base_novel(d)
        assert base.classnames == d.classnames[:n // 2] and novel.classnames == d.classnames[n // 2:]
        again = load_dataset(name.replace("_", "-").upper(), n_train=2, n_val=1, n_test=1)
        assert np.array_equal(np.asarray(d.test[5].image), np.asarray(again.test[5].image))
    assert load_dataset("shapes_count").classnames[:3] == ["one blue circle", "two blue circles",
                                                          "three blue circles"]
    assert load_dataset("shapes_texture").classnames[:2] == ["striped red circle", "plain red circle"]


def test_generated_domains_move_the_pixels_off_the_corpus():
    """Dim light darkens the scenes, fog squeezes their contrast (generated.py's docstring)."""
    corpus_px = np.stack([np.asarray(corpus.sample(0, i)[0], dtype=float) for i in range(24)])
    dim = np.stack([np.asarray(x.image, dtype=float) for x in load_dataset("shapes_colour").train[::32]])
    fog = np.stack([np.asarray(x.image, dtype=float) for x in load_dataset("shapes_texture").train[::32]])
    assert dim.mean() < 0.8 * corpus_px.mean()
    assert fog.std(axis=(1, 2)).mean() < 0.6 * corpus_px.std(axis=(1, 2)).mean()


def test_table_rebuilds_from_saved_results(tmp_path):
    from fastprompt.table import main
    saved = {"shapes_texture/maple": [{"seed": 1, "base_acc": 80.0, "novel_acc": 50.0, "hm": 61.5},
                                      {"seed": 2, "base_acc": 70.0, "novel_acc": 60.0, "hm": 64.6}]}
    (tmp_path / "r.json").write_text(json.dumps(saved))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- table:begin -->\nold\n<!-- table:end -->\nrest\n")
    assert main(["--from-json", str(tmp_path / "r.json"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    # HM of the seed means, as the papers: 2 * 75 * 55 / 130 = 63.46 (the mean of the per-seed
    # HMs would be 63.05)
    assert "| shapes_texture | maple | 75.0 | 55.0 | 63.5 |" in text
    assert "mean over seeds 1, 2;" in text and "shapes_texture 8.3/8.3" in text
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text
