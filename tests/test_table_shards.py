"""One table over several processes or machines: `--shard I/N` (or a Slurm array task, or a
torchrun rank) computes a disjoint part of the cells into `--cells DIR`, `--merge DIR...` builds
the table; a cell with a result is never computed twice, a cut-short one resumes."""
import json

import pytest

from fastprompt.cells import Cell, grid, shard_of, units
from fastprompt.errors import InputError
from fastprompt.table import main as table

FLAGS = ["--methods", "zeroshot,coop,ivlp", "--datasets", "shapes_colour", "--seeds", "1,2",
         "--shots", "2", "--epochs", "2", "--batch-size", "8", "--zero-shot-ref", "never",
         "--pack", "2"]


def table_of(out: str) -> str:
    return out[out.index("| dataset |"):]


def test_two_shards_and_a_merge_equal_the_table_of_one_process(tmp_path, capsys):
    assert table([*FLAGS, "--cells", str(tmp_path / "one")]) == 0
    whole = table_of(capsys.readouterr().out)
    for i in (1, 2):
        assert table([*FLAGS, "--cells", str(tmp_path / f"part{i}"), "--shard", f"{i}/2"]) == 0
        out = capsys.readouterr().out
        assert f"shard {i}/2 done" in out and "| dataset |" not in out
    part = [sorted(p.relative_to(tmp_path / f"part{i}") for p in (tmp_path / f"part{i}" / "cells").rglob("*.json"))
            for i in (1, 2)]
    assert part[0] and part[1] and not set(part[0]) & set(part[1])  # disjoint, both did work
    assert table([*FLAGS, "--merge", str(tmp_path / "part1"), str(tmp_path / "part2")]) == 0
    assert table_of(capsys.readouterr().out) == whole
    # one shard's folder alone: the table of what is there, and which cells are missing
    assert table([*FLAGS, "--merge", str(tmp_path / "part1")]) == 0
    captured = capsys.readouterr()
    assert "cells missing" in captured.err and "Missing cells" in captured.out


def test_a_killed_shard_started_again_trains_nothing_twice(tmp_path, capsys, monkeypatch):
    """The pack of coop's two seeds is killed in its second epoch (the first is checkpointed);
    ivlp's pack has not started. Started again: zero-shot is not evaluated again, coop resumes
    from epoch 1 (its first epoch is not trained twice), ivlp trains from the start."""
    import fastprompt.sweep as sweep
    import fastprompt.table as table_module

    cells = tmp_path / "cells"
    advance, steps = sweep._advance, []

    def killed_in_coops_second_epoch(seat):
        steps.append(seat.trainer.epoch)
        if seat.trainer.model.name == "coop" and seat.trainer.epoch == 1:
            raise KeyboardInterrupt
        return advance(seat)
    monkeypatch.setattr(sweep, "_advance", killed_in_coops_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        table_module._main([*FLAGS, "--cells", str(cells)])
    monkeypatch.setattr(sweep, "_advance", advance)
    assert sorted(p.name for p in (cells / "cells").rglob("*.json")) == ["seed1.json"]  # zero-shot
    zero_shot, trained = [], []
    evaluate = table_module.zero_shot
    monkeypatch.setattr(table_module, "zero_shot", lambda *a, **k: zero_shot.append(a) or evaluate(*a, **k))
    start = sweep.Trainer.__init__

    def recording(self, model, recipe, data, run_dir, env, resume=False, *a, **k):
        start(self, model, recipe, data, run_dir, env, resume, *a, **k)
        trained.append((model.name, run_dir.name, self.epoch))
    monkeypatch.setattr(sweep.Trainer, "__init__", recording)
    assert table([*FLAGS, "--cells", str(cells)]) == 0
    assert zero_shot == []
    assert sorted(trained) == [("coop", "seed1", 1), ("coop", "seed2", 1), ("ivlp", "seed1", 0),
                               ("ivlp", "seed2", 0)]
    log = [json.loads(line) for line in (cells / "runs/shapes_colour/coop/seed1/log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2]


def test_cells_are_grouped_by_the_table_alone():
    cells = grid(["zeroshot", "coop", "maple"], ["a", "b"], [1, 2, 3], "zeroshot")
    assert Cell("a", "zeroshot", 1) in cells and Cell("a", "zeroshot", 2) not in cells
    packs = units(cells, 4, "zeroshot")
    assert [len(u) for u in packs] == [1, 1, 4, 2, 4, 2]
    assert all(len({c.method for c in u}) == 1 for u in packs)
    assert sorted(c for u in packs for c in u) == sorted(cells)


@pytest.mark.parametrize("flag, env, want", [
    ("2/3", {}, (1, 3)),
    (None, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "4"}, (1, 4)),
    (None, {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"}, (0, 2)),
    (None, {"RANK": "3", "WORLD_SIZE": "4"}, (3, 4)),
    (None, {}, (0, 1)),
    ("1/1", {"RANK": "3", "WORLD_SIZE": "4"}, (0, 1)),
])
def test_shard_from_flag_slurm_or_torchrun(flag, env, want):
    assert shard_of(flag, env) == want


@pytest.mark.parametrize("flag, env", [("0/2", {}), ("3/2", {}), ("a/2", {}), ("2", {}), ("١/2", {}),
                                       (None, {"RANK": "4", "WORLD_SIZE": "4"})])
def test_bad_shards_are_one_line(flag, env):
    with pytest.raises(InputError):
        shard_of(flag, env)


def test_cells_of_other_settings_are_refused(tmp_path, capsys):
    args = ["--methods", "zeroshot", "--datasets", "shapes_colour", "--seeds", "1", "--cells",
            str(tmp_path)]
    assert table(args) == 0
    capsys.readouterr()
    assert table([*args, "--template", "a drawing of a {}."]) == 2
    err = capsys.readouterr().err
    assert "was made with template=None" in err and err.count("\n") == 1
    assert table(["--shard", "1/2", *args[:-2]]) == 2
    assert "--shard needs --cells DIR" in capsys.readouterr().err


#: packed and solo runs compared within PACK_RTOL: the same intra-op threading for both
pytestmark = pytest.mark.usefixtures("one_thread")
