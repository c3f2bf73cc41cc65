"""fastprompt.data on tiny fake datasets written in CoOp's real folder layouts (CPU, fast)."""

import json
import math
import os
import warnings

import pytest
import torch
from PIL import Image

from fastprompt.data import (DataError, DatasetSplits, Datum, ImageDataset, few_shot,
                             list_datasets, load_dataset, split_base_novel, test_transform,
                             train_transform)


def write_image(path, colour=(200, 30, 30), size=(12, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write_split_dataset(root, dataset_dir, image_dir, split_file, classes, counts=(6, 4, 3),
                        flat=False):
    """A split-file dataset: ``classes`` = [(folder, classname)]; returns the split dict written."""
    base = os.path.join(root, dataset_dir, image_dir) if image_dir else os.path.join(root, dataset_dir)
    split = {"train": [], "val": [], "test": []}
    for label, (folder, cname) in enumerate(classes):
        for s, n in zip(split, counts):
            for i in range(n):
                rel = f"{folder}_{s}_{i}.jpg" if flat else f"{folder}/{s}_{i}.jpg"
                write_image(os.path.join(base, rel), (20 * label, 10 * i, 100))
                split[s].append([rel, label, cname])
    with open(os.path.join(root, dataset_dir, split_file), "w") as f:
        json.dump(split, f)
    return split


# (name, CoOp config name, dataset_dir, image_dir, split file)
SPLIT_DATASETS = [
    ("caltech101", "Caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    ("oxford_pets", "OxfordPets", "oxford_pets", "images", "split_zhou_OxfordPets.json"),
    ("stanford_cars", "StanfordCars", "stanford_cars", "", "split_zhou_StanfordCars.json"),
    ("oxford_flowers", "OxfordFlowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    ("food101", "Food101", "food-101", "images", "split_zhou_Food101.json"),
    ("sun397", "SUN397", "sun397", "SUN397", "split_zhou_SUN397.json"),
    ("dtd", "DescribableTextures", "dtd", "images", "split_zhou_DescribableTextures.json"),
    ("eurosat", "EuroSAT", "eurosat", "2750", "split_zhou_EuroSAT.json"),
    ("ucf101", "UCF101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
]
CLASSES = [("c0", "abyssinian"), ("c1", "basset hound"), ("c2", "beagle"), ("c3", "boxer"),
           ("c4", "chihuahua")]


@pytest.fixture
def pets(tmp_path):
    split = write_split_dataset(tmp_path, "oxford_pets", "images", "split_zhou_OxfordPets.json",
                                CLASSES, counts=(20, 6, 3), flat=True)
    return tmp_path, split


# ---------------------------------------------------------------- the CoOp datasets

@pytest.mark.parametrize("name,coop,dataset_dir,image_dir,split_file", SPLIT_DATASETS)
def test_split_datasets_match_split_file(tmp_path, name, coop, dataset_dir, image_dir, split_file):
    split = write_split_dataset(tmp_path, dataset_dir, image_dir, split_file, CLASSES,
                                flat=name in ("oxford_pets", "oxford_flowers"))
    for alias in (name, coop, coop.upper(), dataset_dir):
        d = load_dataset(alias, str(tmp_path))
        assert d.name == name and d.classnames == [c for _, c in CLASSES]
        for s in ("train", "val", "test"):
            got = [(os.path.relpath(x.impath, os.path.join(tmp_path, dataset_dir, image_dir)),
                    x.label, x.classname) for x in getattr(d, s)]
            assert got == [tuple(e) for e in split[s]]
            assert all(os.path.isfile(x.impath) for x in getattr(d, s))


def test_caltech_and_eurosat_class_renames(tmp_path):
    write_split_dataset(tmp_path, "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
                        [("Faces", "Faces"), ("Leopards", "leopard"), ("ant", "ant")])
    assert load_dataset("caltech-101", tmp_path).classnames == ["face", "leopard", "ant"]
    write_split_dataset(tmp_path, "eurosat", "2750", "split_zhou_EuroSAT.json",
                        [("AnnualCrop", "AnnualCrop"), ("SeaLake", "Sea or Lake")])
    d = load_dataset("EuroSAT", tmp_path)
    assert d.classnames == ["Annual Crop Land", "Sea or Lake"]
    assert {x.classname for x in d.train} == set(d.classnames)


def test_fgvc_aircraft(tmp_path):
    ddir = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "F-16A/B"]
    ddir.mkdir()
    (ddir / "variants.txt").write_text("\n".join(variants) + "\n")
    expected = {}
    for s in ("train", "val", "test"):
        lines = []
        for y, v in enumerate(variants):
            for i in range(2):
                img = f"{s[0]}{y}{i:05d}"
                write_image(str(ddir / "images" / f"{img}.jpg"))
                lines.append(f"{img} {v}")
        (ddir / f"images_variant_{s}.txt").write_text("\n".join(lines) + "\n")
        expected[s] = lines
    d = load_dataset("FGVCAircraft", tmp_path)
    assert d.classnames == variants
    for s in ("train", "val", "test"):
        got = [f"{os.path.basename(x.impath)[:-4]} {x.classname}" for x in getattr(d, s)]
        assert got == expected[s]
        assert [x.label for x in getattr(d, s)] == [variants.index(x.classname) for x in getattr(d, s)]
    with open(ddir / "images_variant_test.txt", "a") as f:
        f.write("t999 Boeing 999\n")
    with pytest.raises(DataError, match="Boeing 999.*variants.txt"):
        load_dataset("fgvc_aircraft", tmp_path)


WNIDS = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark",
         "n01491361": "tiger shark", "n01494475": "hammerhead shark"}


def write_classnames(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(f"{w} {c}\n" for w, c in WNIDS.items())


def write_imagenet(root):
    ddir = os.path.join(root, "imagenet")
    write_classnames(os.path.join(ddir, "classnames.txt"))
    for wnid in reversed(list(WNIDS)):  # creation order must not matter
        for i in range(5):
            write_image(os.path.join(ddir, "images", "train", wnid, f"{wnid}_{i}.JPEG"))
        write_image(os.path.join(ddir, "images", "val", wnid, f"ILSVRC2012_val_{wnid}.JPEG"))
    return ddir


def test_imagenet(tmp_path):
    write_imagenet(tmp_path)
    d = load_dataset("ImageNet", tmp_path)
    assert d.classnames == list(WNIDS.values())  # labels follow the sorted wnids
    assert len(d.train) == 25 and len(d.test) == 5 and d.val == d.test
    for x in d.train + d.test:
        assert list(WNIDS)[x.label] in x.impath and x.classname == d.classnames[x.label]


def test_imagenet_shift_targets(tmp_path):
    write_classnames(os.path.join(tmp_path, "imagenet", "classnames.txt"))
    subset = ["n01494475", "n01443537"]  # an -R-style subset, out of order on purpose
    r = os.path.join(tmp_path, "imagenet-rendition")
    write_classnames(os.path.join(r, "classnames.txt"))
    for w in subset:
        write_image(os.path.join(r, "imagenet-r", w, "art_1.jpg"))
    open(os.path.join(r, "imagenet-r", "README.txt"), "w").close()
    d = load_dataset("imagenet-r", tmp_path)
    assert d.classnames == ["goldfish", "hammerhead shark"] and not d.train and not d.val
    assert sorted((x.label, x.classname) for x in d.test) == [(0, "goldfish"), (1, "hammerhead shark")]
    # -A without its own classnames.txt falls back to root/imagenet/classnames.txt
    write_image(os.path.join(tmp_path, "imagenet-adversarial", "imagenet-a", "n01484850", "a.jpg"))
    assert load_dataset("ImageNetA", tmp_path).classnames == ["great white shark"]
    write_image(os.path.join(tmp_path, "imagenet-sketch", "images", "n01440764", "s.JPEG"))
    assert load_dataset("imagenet_sketch", tmp_path).test[0].classname == "tench"
    v2 = os.path.join(tmp_path, "imagenetv2", "imagenetv2-matched-frequency-format-val")
    write_image(os.path.join(v2, "3", "x.jpeg"))
    d = load_dataset("ImageNetV2", tmp_path)
    assert d.classnames == list(WNIDS.values()) and (d.test[0].label, d.test[0].classname) == (3, "tiger shark")
    os.makedirs(os.path.join(r, "imagenet-r", "n99999999"))
    with pytest.raises(DataError, match="n99999999"):
        load_dataset("imagenet_r", tmp_path)


def test_list_datasets():
    names = set(list_datasets())
    assert {"imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
            "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101", "imagenetv2", "imagenet_sketch",
            "imagenet_a", "imagenet_r", "folder", "builtin"} <= names


# ---------------------------------------------------------------- protocol

def test_few_shot_counts_and_determinism(pets):
    d = load_dataset("oxford_pets", pets[0])
    for k in (1, 4, 16):
        fs = few_shot(d, shots=k, seed=1)
        for y in range(5):
            assert sum(x.label == y for x in fs.train) == k
            assert sum(x.label == y for x in fs.val) == min(k, 4)
        assert fs.test == d.test and fs.classnames == d.classnames
        assert len({x.impath for x in fs.train}) == 5 * k  # no repeats

    def paths(fs):
        return [x.impath for x in fs.train] + [x.impath for x in fs.val]
    assert paths(few_shot(d, 4, seed=1)) == paths(few_shot(d, 4, seed=1))
    assert paths(few_shot(d, 4, seed=1)) != paths(few_shot(d, 4, seed=2))
    assert few_shot(d, 0) is d  # shots < 1 keeps everything


def test_few_shot_too_few_images(pets):
    d = load_dataset("oxford_pets", pets[0])
    d.train = [x for x in d.train if x.label != 3 or x.impath.endswith("_1.jpg")]
    with pytest.raises(DataError, match=r"'boxer' has 1 training image.*--shots"):
        few_shot(d, shots=2)


@pytest.mark.parametrize("n", [2, 5, 7, 10])
def test_split_base_novel(n):
    names = [f"class {i}" for i in range(n)]
    data = [Datum(f"/x/{y}_{i}.jpg", y, names[y]) for y in range(n) for i in range(3)]
    d = DatasetSplits("toy", names, data, data[::3], data)
    base, novel = split_base_novel(d)
    m = math.ceil(n / 2)
    assert base.classnames == names[:m] and novel.classnames == names[m:]
    for half, offset in ((base, 0), (novel, m)):
        for split in (half.train, half.val, half.test):
            assert split and {x.label for x in split} == set(range(len(half.classnames)))
            for x in split:
                assert x.classname == half.classnames[x.label] == names[x.label + offset]
                assert x.impath.startswith(f"/x/{x.label + offset}_")
    assert len(base.test) + len(novel.test) == len(d.test)
    with pytest.raises(DataError, match="at least 2 classes"):
        split_base_novel(DatasetSplits("one", ["a"], data[:1], [], data[:1]))


# ---------------------------------------------------------------- folder and builtin

def test_folder_auto_split(tmp_path):
    for cname, n in (("golden_retriever", 10), ("tabby_cat", 7), ("zebra", 2)):
        for i in range(n):
            write_image(str(tmp_path / cname / f"{i}.png"))
    (tmp_path / "zebra" / "notes.txt").write_text("not an image")
    d = load_dataset("folder", tmp_path)
    assert d.classnames == ["golden retriever", "tabby cat", "zebra"]
    counts = [tuple(sum(x.label == y for x in s) for s in (d.train, d.val, d.test)) for y in range(3)]
    assert counts == [(5, 2, 3), (4, 1, 2), (1, 0, 1)]
    all_paths = [x.impath for x in d.train + d.val + d.test]
    assert len(set(all_paths)) == 19 and all(p.endswith(".png") for p in all_paths)
    again = load_dataset("folder", tmp_path)
    assert [x.impath for x in again.train] == [x.impath for x in d.train]
    other = load_dataset("folder", tmp_path, seed=3)
    assert [x.impath for x in other.train] != [x.impath for x in d.train]


def test_folder_with_subtrees(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for cname in ("ant", "bee_hive"):
            for i in range(n):
                write_image(str(tmp_path / split / cname / f"{i}.jpg"))
    d = load_dataset("folder", tmp_path)
    assert d.classnames == ["ant", "bee hive"] and d.val == []
    assert (len(d.train), len(d.test)) == (6, 4)
    assert all(f"{os.sep}test{os.sep}" in x.impath for x in d.test)
    write_image(str(tmp_path / "val" / "ant" / "v.jpg"))
    assert len(load_dataset("folder", tmp_path).val) == 1
    write_image(str(tmp_path / "test" / "wasp" / "w.jpg"))
    with pytest.raises(DataError, match="wasp"):
        load_dataset("folder", tmp_path)


def test_builtin_is_deterministic():
    a, b = load_dataset("builtin"), load_dataset("BUILTIN", "/ignored")
    assert a.classnames == b.classnames and len(a.classnames) == 10
    assert (len(a.train), len(a.val), len(a.test)) == (320, 80, 160)
    assert all(x.impath is None and x.image.size == (64, 64) for x in a.train[:5])
    for i in (0, 77, 319):
        assert a.train[i].image.tobytes() == b.train[i].image.tobytes()
        assert a.train[i].classname == a.classnames[a.train[i].label]
    c = load_dataset("builtin", seed=1)
    assert a.train[0].image.tobytes() != c.train[0].image.tobytes()
    assert a.train[0].image.tobytes() != a.test[0].image.tobytes()


# ---------------------------------------------------------------- images and transforms

def test_transforms_and_dataset(pets):
    d = load_dataset("oxford_pets", pets[0])
    for tf in (train_transform(32), test_transform(32)):
        ds = ImageDataset(d.train[:3], tf)
        x, y = ds[1]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == d.train[1].label
    x, _ = ImageDataset(load_dataset("builtin").test[:1], test_transform(48))[0]
    assert x.shape == (3, 48, 48)
    batch = next(iter(torch.utils.data.DataLoader(ImageDataset(d.test, test_transform(16)), 4)))
    assert batch[0].shape == (4, 3, 16, 16)


def test_corrupt_image_skip_and_raise(pets):
    d = load_dataset("oxford_pets", pets[0])
    bad = d.train[0].impath
    with open(bad, "wb") as f:
        f.write(b"\x00garbage, not a jpeg" * 8)
    with pytest.raises(DataError, match=bad.replace("\\", "\\\\")):
        ImageDataset(d.train, test_transform(16), on_error="raise")[0]
    ds = ImageDataset(d.train, test_transform(16), on_error="skip")
    with pytest.warns(RuntimeWarning, match="skipping unreadable"):
        x, y = ds[0]
    assert x.shape == (3, 16, 16) and y == d.train[0].label  # replaced within its class
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        ds[0]
    assert ds.skipped == [bad]


def corrupt(path):
    with open(path, "wb") as f:
        f.write(b"\x00garbage, not a jpeg" * 8)


@pytest.mark.parametrize("workers", [0, 2])
def test_skipped_images_are_seen_across_loader_workers(pets, workers):
    """Skips made inside DataLoader worker processes reach the caller's dataset."""
    d = load_dataset("oxford_pets", pets[0])
    bad = sorted([d.train[3].impath, d.train[45].impath])  # two classes, two workers' batches
    for path in bad:
        corrupt(path)
    ds = ImageDataset(d.train, test_transform(16), on_error="skip")
    loader = torch.utils.data.DataLoader(ds, batch_size=10, num_workers=workers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the per-process "skipping" warning
        labels = torch.cat([y for _, y in loader])
    assert labels.tolist() == [x.label for x in d.train]  # stand-ins keep the labels
    assert ds.skipped == bad


def test_accuracy_reports_skips_made_in_workers(pets):
    from fastprompt.scoring import accuracy

    d = load_dataset("oxford_pets", pets[0])
    corrupt(d.test[4].impath)

    class Constant(torch.nn.Module):  # a classifier stand-in: always class 0
        image_size, mean, std = 16, (0.5,) * 3, (0.5,) * 3

        def forward(self, x):
            return torch.zeros(len(x), 5).index_fill_(1, torch.tensor([0]), 1.0)

    with pytest.warns(RuntimeWarning, match=f"1 of {len(d.test)} evaluation images were unreadable"):
        acc = accuracy(Constant(), d.test, torch.device("cpu"), batch_size=4, workers=2)
    read = [x for i, x in enumerate(d.test) if i != 4]  # the unreadable one is left out, not replaced
    assert acc == pytest.approx(100 * sum(x.label == 0 for x in read) / len(read))

# ---------------------------------------------------------------- errors: one line, name + fix

def load_error(*args, **kwargs):
    with pytest.raises(DataError) as info:
        load_dataset(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and " — " in message  # one line: the problem — the fix
    return message


def test_errors_name_the_problem(tmp_path, pets):
    root = pets[0]
    assert "choose one of" in load_error("imagenet-z", root) and "oxford_pets" in load_error("nope")
    assert "data root not found" in load_error("dtd", tmp_path / "missing")
    assert "--data-root" in load_error("dtd", None)
    msg = load_error("dtd", root)
    assert "dataset folder not found" in msg and os.path.join("", "dtd") in msg
    os.makedirs(tmp_path / "dtd")
    assert "image folder not found" in load_error("dtd", root) and "images" in load_error("dtd", root)
    os.makedirs(tmp_path / "dtd" / "images")
    msg = load_error("dtd", root)
    assert "split file not found" in msg and "split_zhou_DescribableTextures.json" in msg
    assert "variants.txt" in (os.makedirs(tmp_path / "fgvc_aircraft" / "images") or
                              load_error("fgvc_aircraft", root))
    assert "classnames.txt" in (os.makedirs(tmp_path / "imagenet" / "images") or
                                load_error("imagenet", root))


def test_split_file_errors(pets):
    root, split = pets
    path = os.path.join(root, "oxford_pets", "split_zhou_OxfordPets.json")
    images = os.path.join(root, "oxford_pets", "images")
    os.remove(os.path.join(images, split["test"][1][0]))
    os.remove(os.path.join(images, split["test"][2][0]))
    msg = load_error("oxford_pets", root)
    assert "2 of" in msg and split["test"][1][0] in msg and "split_zhou_OxfordPets.json" in msg

    for rel, _, _ in split["test"][1:3]:
        write_image(os.path.join(images, rel))

    def rewrite(mutate):
        s = json.loads(json.dumps(pets[1]))
        mutate(s)
        with open(path, "w") as f:
            json.dump(s, f)
    rewrite(lambda s: s["test"].__setitem__(1, [s["test"][1][0].replace("c0", "nodir/c0"), 0,
                                                 "abyssinian"]))
    msg = load_error("oxford_pets", root)
    assert "1 of" in msg and "'abyssinian' has no folder" in msg and "nodir" in msg
    rewrite(lambda s: s["val"].append([s["val"][0][0], 0, "sphynx"]))
    assert "'sphynx'" in load_error("oxford_pets", root)
    rewrite(lambda s: s["val"].append([s["val"][0][0], 7, "abyssinian"]))
    with pytest.warns(RuntimeWarning, match="'abyssinian' is used by labels 0 and 7"):
        assert "label 7 is used" in load_error("oxford_pets", root)
    rewrite(lambda s: s.update({k: [[p, 9 if y == 4 else y, c] for p, y, c in v] for k, v in s.items()}))
    assert "labels must be 0..4" in load_error("oxford_pets", root)
    rewrite(lambda s: s.pop("val"))
    assert "'val'" in load_error("oxford_pets", root)
    rewrite(lambda s: s["train"].__setitem__(0, ["x.jpg", "abyssinian"]))
    assert "entry 0 of 'train'" in load_error("oxford_pets", root)
    with open(path, "w") as f:
        f.write("{not json")
    assert "cannot read split file" in load_error("oxford_pets", root)


def test_imagenet_errors(tmp_path):
    ddir = write_imagenet(tmp_path)
    write_image(os.path.join(ddir, "images", "val", "n02000000", "x.JPEG"))
    assert "n02000000" in load_error("imagenet", tmp_path)
    os.remove(os.path.join(ddir, "images", "val", "n02000000", "x.JPEG"))
    os.rmdir(os.path.join(ddir, "images", "val", "n02000000"))
    os.makedirs(os.path.join(ddir, "images", "train", "n03000000"))
    assert "n03000000" in load_error("imagenet", tmp_path)


def test_folder_errors(tmp_path):
    assert "image folder not found" in load_error("folder", tmp_path / "nope")
    assert "no class folders" in load_error("folder", tmp_path)
    write_image(str(tmp_path / "ant" / "1.jpg"))
    msg = load_error("folder", tmp_path)
    assert os.path.join(str(tmp_path), "ant") in msg and "1 image" in msg
    os.makedirs(tmp_path / "sub" / "train" / "ant")
    assert "no images" in load_error("folder", tmp_path / "sub")
    write_image(str(tmp_path / "sub" / "train" / "ant" / "1.jpg"))
    assert "neither test/ nor val/" in load_error("folder", tmp_path / "sub")
