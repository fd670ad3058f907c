"""Image sources on real small files: folders, archives, .npz, benchmark layouts, open_source."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import shutil
import tarfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclust.data import (
    KINDS,
    ArchiveSource,
    ArraySource,
    BenchmarkSource,
    FolderSource,
    ImageSource,
    NpzSource,
    available_datasets,
    cifar10,
    cifar100,
    digits,
    mnist,
    open_source,
    stl10,
)
from imgclust.data.benchmarks import FASHION_MNIST_CLASSES, load_pickle_safely, read_idx
from imgclust.errors import BadImageError, InputError

# ----------------------------------------------------------------------------- helpers


def _img(seed: int, size: tuple[int, int] = (7, 5)) -> np.ndarray:
    """A small deterministic RGB image (H, W, 3) unique per seed."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = seed % 256
    a[..., 1] = np.arange(w)[None, :] * 10
    a[..., 2] = np.arange(h)[:, None] * 20
    return a


def _png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def _write_png(path: Path, seed: int) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = _img(seed)
    path.write_bytes(_png_bytes(a))
    return a


def _class_tree(root: Path) -> dict[str, np.ndarray]:
    """root/{cat,dog,élan vital}/... with hidden and non-image files mixed in."""
    files = {
        "cat/1.png": 1,
        "cat/2.PNG": 2,  # upper-case extension
        "dog/a.png": 3,
        "dog/sub/b.png": 4,  # deeper levels still belong to the first-level class
        "élan vital/ü 1.png": 5,  # unicode and spaces
    }
    out = {rel: _write_png(root / rel, seed) for rel, seed in files.items()}
    _write_png(root / "cat" / ".hidden.png", 9)
    _write_png(root / ".thumbs" / "t.png", 9)
    (root / "cat" / "notes.txt").write_text("not an image")
    return out


# ----------------------------------------------------------------------------- folders


def test_folder_labels_from_class_folders(tmp_path: Path) -> None:
    truth = _class_tree(tmp_path)
    src = FolderSource(tmp_path)
    assert isinstance(src, ImageSource)
    assert src.ids() == ["cat/1.png", "cat/2.PNG", "dog/a.png", "dog/sub/b.png", "élan vital/ü 1.png"]
    assert src.class_names == ["cat", "dog", "élan vital"]
    assert src.labels.dtype == np.int64 and src.labels.tolist() == [0, 0, 1, 1, 2]
    assert len(set(src.ids())) == len(src) == 5
    for i, rel in enumerate(src.ids()):
        assert os.path.isabs(src.path(i)) and os.path.isfile(src.path(i))
        assert np.array_equal(src.read(i), truth[rel])
    d = src.describe()
    assert d["n_images"] == 5 and d["n_classes"] == 3 and d["has_labels"]


def test_folder_order_is_deterministic(tmp_path: Path) -> None:
    for k in (5, 3, 9, 1, 7):
        _write_png(tmp_path / "b" / f"{k}.png", k)
        _write_png(tmp_path / "a" / f"{k}.png", k)
    a, b = FolderSource(tmp_path), FolderSource(str(tmp_path))
    assert a.ids() == b.ids() == sorted(a.ids(), key=lambda s: s.split("/"))
    assert a.fingerprint() == b.fingerprint()


def test_folder_label_modes(tmp_path: Path) -> None:
    _write_png(tmp_path / "x" / "1.png", 1)
    _write_png(tmp_path / "y" / "2.png", 2)
    _write_png(tmp_path / "loose.png", 3)
    assert FolderSource(tmp_path).labels is None  # an image outside class folders
    with pytest.raises(InputError, match="1 image\\(s\\) lie directly in"):
        FolderSource(tmp_path, labels="folder")
    assert FolderSource(tmp_path, labels="none").class_names is None
    with pytest.raises(InputError, match="unknown labels mode"):
        FolderSource(tmp_path, labels="bogus")

    single = tmp_path / "single"
    _write_png(single / "only" / "1.png", 1)
    assert FolderSource(single).labels is None  # one folder is not a labelling
    forced = FolderSource(single, labels="folder")
    assert forced.class_names == ["only"] and forced.labels.tolist() == [0]


def test_folder_split_level_is_not_a_class(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for cls in ("ant", "bee"):
            _write_png(tmp_path / split / cls / "0.png", 0)
    src = FolderSource(tmp_path)
    assert src.class_names == ["ant", "bee"] and src.labels_from == "split/folder"
    assert src.labels.tolist() == [0, 1, 0, 1]  # test/ant, test/bee, train/ant, train/bee
    assert FolderSource(tmp_path, labels="folder").class_names == ["test", "train"]


def test_folder_fingerprint_tracks_files(tmp_path: Path) -> None:
    _class_tree(tmp_path)
    src = FolderSource(tmp_path)
    fp = src.fingerprint()
    assert len(fp) == 64 and fp == FolderSource(tmp_path).fingerprint()
    target = Path(src.path(0))
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touch
    fp_touched = src.fingerprint()
    assert fp_touched != fp
    target.write_bytes(_png_bytes(_img(200, (9, 9))))  # rewrite
    assert src.fingerprint() not in (fp, fp_touched)
    assert FolderSource(tmp_path, labels="none").fingerprint() != FolderSource(tmp_path).fingerprint()
    _write_png(tmp_path / "cat" / "3.png", 3)  # a new image changes the selection
    assert FolderSource(tmp_path).fingerprint() != src.fingerprint()


def test_folder_symlink_loop_terminates(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _write_png(root / "a" / "1.png", 1)
    _write_png(root / "b" / "2.png", 2)
    os.symlink(root, root / "a" / "loop")  # a/loop -> root
    os.symlink("self", root / "b" / "self")  # dangling self-reference
    (root / "c").mkdir()
    os.symlink(root / "c", root / "c" / "again")
    outside = tmp_path / "outside"
    _write_png(outside / "3.png", 3)
    os.symlink(outside, root / "linked")
    os.symlink(root / "a" / "1.png", root / "b" / "file-link.png")  # symlinked file: included

    default = FolderSource(root)
    assert default.ids() == ["a/1.png", "b/2.png", "b/file-link.png"]
    followed = FolderSource(root, follow_symlinks=True)
    assert followed.ids() == ["a/1.png", "b/2.png", "b/file-link.png", "linked/3.png"]
    assert len(set(followed.ids())) == len(followed)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="source folder not found"):
        FolderSource(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no images found in .*empty \(looked for \.jpg"):
        FolderSource(tmp_path / "empty")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    with pytest.raises(InputError, match="no images found"):
        FolderSource(tmp_path / "texts")


def test_folder_bad_images_are_reported_not_raised_by_read_many(tmp_path: Path) -> None:
    _write_png(tmp_path / "good.png", 1)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    src = FolderSource(tmp_path)
    assert src.ids() == ["empty.jpg", "good.png", "text.png"]
    out = src.read_many(range(3))
    assert isinstance(out[0], BadImageError) and str(out[0]) == "empty file"
    assert isinstance(out[1], np.ndarray) and out[1].shape == (5, 7, 3)
    assert isinstance(out[2], BadImageError) and "not an image" in str(out[2])
    big = FolderSource(tmp_path, max_pixels=10)
    with pytest.raises(BadImageError, match="image too large: 7 x 5 pixels > 10"):
        big.read(1)


# ----------------------------------------------------------------------------- archives


def _archive_tree() -> dict[str, np.ndarray]:
    names = {}
    seed = 0
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            for k in range(n):
                seed += 1
                names[f"{split}/{cls}/{k:04d}.png"] = _img(seed)
    return names


def _add_bytes_tar(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _make_archive(path: Path, tree: dict[str, np.ndarray], prefix: str = "", evil: bool = True) -> Path:
    payload = {prefix + n: _png_bytes(a) for n, a in tree.items()}
    bad = _png_bytes(_img(250))
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(prefix + "train/", b"")  # a directory entry
            for n, data in payload.items():
                zf.writestr(n, data)
            if evil:
                zf.writestr("../evil.png", bad)
                zf.writestr("train/../../evil2.png", bad)
                zf.writestr(prefix + "train/cat/.hidden.png", bad)
                zf.writestr("__MACOSX/" + prefix + "train/cat/._0000.png", bad)
                zf.writestr(prefix + "README.txt", b"hi")
        return path
    mode = {".tar": "w", ".gz": "w:gz", ".tgz": "w:gz", ".bz2": "w:bz2", ".xz": "w:xz"}[path.suffix]
    with tarfile.open(path, mode) as tf:
        for n, data in payload.items():
            _add_bytes_tar(tf, n, data)
        if evil:
            _add_bytes_tar(tf, "../evil.png", bad)
            _add_bytes_tar(tf, "/abs/evil.png", bad)
            _add_bytes_tar(tf, prefix + "test/cat/../../../evil3.png", bad)
            link = tarfile.TarInfo(prefix + "train/cat/link.png")
            link.type = tarfile.SYMTYPE
            link.linkname = "/etc/passwd"
            tf.addfile(link)
            _add_bytes_tar(tf, prefix + "notes.txt", b"hello")
    return path


ARCHIVE_NAMES = ["data.tar", "data.tar.gz", "data.tgz", "data.tar.bz2", "data.tar.xz", "data.zip"]


@pytest.mark.parametrize("name", ARCHIVE_NAMES)
def test_archive_reads_split_with_labels(tmp_path: Path, name: str) -> None:
    tree = _archive_tree()
    path = _make_archive(tmp_path / name, tree)
    src = ArchiveSource(path, subdir="test")
    assert src.ids() == ["cat/0000.png", "cat/0001.png", "dog/0000.png", "dog/0001.png"]
    assert src.class_names == ["cat", "dog"] and src.labels.tolist() == [0, 0, 1, 1]
    assert src.path(0) is None
    for i, rel in enumerate(src.ids()):
        assert np.array_equal(src.read(i), tree["test/" + rel])
    whole = ArchiveSource(path)
    assert len(whole) == len(tree) and set(whole.ids()) == set(tree)  # traversal/hidden/links skipped
    assert whole.class_names == ["cat", "dog"]  # train/ + test/ are splits, not classes
    assert not list(tmp_path.parent.glob("evil*.png")) and not list(tmp_path.glob("evil*.png"))


@pytest.mark.parametrize("name", ["w.tar", "w.tar.gz", "w.zip"])
def test_archive_wrapper_folder_is_unwrapped(tmp_path: Path, name: str) -> None:
    tree = _archive_tree()
    path = _make_archive(tmp_path / name, tree, prefix="CIFAR-10-images-master/", evil=False)
    src = ArchiveSource(path, subdir="train")
    assert len(src) == 6 and src.class_names == ["cat", "dog"]
    assert src.ids()[0] == "cat/0000.png"
    explicit = ArchiveSource(path, subdir="CIFAR-10-images-master/train")
    assert explicit.ids() == src.ids()
    assert sorted(ArchiveSource(path).ids()) == sorted(tree)


@pytest.mark.parametrize("name", ["t.tar", "t.tar.gz", "t.zip"])
def test_archive_threads_and_pickle(tmp_path: Path, name: str) -> None:
    tree = _archive_tree()
    src = ArchiveSource(_make_archive(tmp_path / name, tree))
    seq = [src.read(i) for i in range(len(src))]
    with ThreadPoolExecutor(4) as ex:
        par = list(ex.map(src.read, list(range(len(src))) * 4))
    for k, a in enumerate(par):
        assert np.array_equal(a, seq[k % len(src)])
    clone = pickle.loads(pickle.dumps(src))
    assert clone.ids() == src.ids() and clone.fingerprint() == src.fingerprint()
    assert all(np.array_equal(clone.read(i), seq[i]) for i in range(len(src)))
    assert np.array_equal(pickle.loads(pickle.dumps(clone)).read(0), seq[0])  # after use, too


def test_archive_fingerprint(tmp_path: Path) -> None:
    path = _make_archive(tmp_path / "f.tar.gz", _archive_tree())
    a = ArchiveSource(path, subdir="test")
    fp = a.fingerprint()
    assert fp == ArchiveSource(path, subdir="test").fingerprint()
    assert fp != ArchiveSource(path, subdir="train").fingerprint()
    assert fp != ArchiveSource(path, subdir="test", labels="none").fingerprint()
    # Content-addressed: a touched or copied identical archive keeps its fingerprint (and cache) ...
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    copy = tmp_path / "copy" / "f.tar.gz"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    assert ArchiveSource(path, subdir="test").fingerprint() == fp == ArchiveSource(copy, subdir="test").fingerprint()
    # ... and a changed image changes it.
    tree = _archive_tree()
    first = sorted(n for n in tree if n.startswith("test/"))[0]
    tree[first] = 255 - tree[first]
    changed = _make_archive(tmp_path / "g.tar.gz", tree)
    assert ArchiveSource(changed, subdir="test").fingerprint() != fp


def test_archive_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="archive not found"):
        ArchiveSource(tmp_path / "nope.tar")
    garbage = tmp_path / "bad.tar.gz"
    garbage.write_bytes(b"\x1f\x8b" + b"garbage" * 100)
    with pytest.raises(InputError, match="cannot read archive"):
        ArchiveSource(garbage)
    for name in ("d.zip", "d.tar.gz"):
        path = _make_archive(tmp_path / name, _archive_tree())
        with pytest.raises(InputError, match=r"no folder 'val' with images .*top-level folders: test, train"):
            ArchiveSource(path, subdir="val")
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("readme.txt", "x")
    with pytest.raises(InputError, match="no images found in archive"):
        ArchiveSource(empty)


def test_archive_bad_member_is_bad_image(tmp_path: Path) -> None:
    path = tmp_path / "m.tar"
    with tarfile.open(path, "w") as tf:
        _add_bytes_tar(tf, "a.png", _png_bytes(_img(1)))
        _add_bytes_tar(tf, "b.jpg", b"not a jpeg at all")
        _add_bytes_tar(tf, "c.png", b"")
    src = ArchiveSource(path)
    assert src.read(0).shape == (5, 7, 3)
    with pytest.raises(BadImageError, match="not an image"):
        src.read(1)
    with pytest.raises(BadImageError, match="empty file"):
        src.read(2)


# ----------------------------------------------------------------------------- npz


@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW", "NHW1"])
def test_npz_shapes(tmp_path: Path, layout: str) -> None:
    rgb = np.stack([_img(k, (6, 4)) for k in range(3)])  # (3, 4, 6, 3)
    gray = rgb[..., 1]
    arr = {"NHW": gray, "NHWC": rgb, "NCHW": rgb.transpose(0, 3, 1, 2), "NHW1": gray[..., None]}[layout]
    p = tmp_path / "a.npz"
    np.savez(p, images=arr, labels=np.array([2, 0, 1]), class_names=np.array(["a", "b", "c"]))
    src = open_source(p)
    assert isinstance(src, NpzSource) and isinstance(src, ArraySource)
    assert len(src) == 3 and src.class_names == ["a", "b", "c"] and src.labels.tolist() == [2, 0, 1]
    out = src.read(1)
    assert out.shape == (4, 6, 3)
    if layout in ("NHWC", "NCHW"):
        assert np.array_equal(out, rgb[1])
    else:
        assert np.array_equal(out[..., 0], gray[1]) and np.array_equal(out[..., 2], gray[1])


def test_npz_fallback_keys_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "b.npz"
    np.savez(p, X=np.zeros((4, 5, 5), np.float32) + 0.5, y=np.array(["dog", "cat", "dog", "cat"]))
    src = NpzSource(p)
    assert src.class_names == ["cat", "dog"] and src.labels.tolist() == [1, 0, 1, 0]
    assert src.read(0)[0, 0, 0] == 128
    nolab = tmp_path / "c.npz"
    np.savez(nolab, data=np.zeros((2, 3, 3), np.uint8))
    assert NpzSource(nolab).labels is None
    wrong = tmp_path / "d.npz"
    np.savez(wrong, pixels=np.zeros((2, 3, 3)))
    with pytest.raises(InputError, match="no image array: expected a key named images"):
        NpzSource(wrong)
    obj = tmp_path / "e.npz"
    np.savez(obj, images=np.array([np.zeros((2, 2)), None], dtype=object))
    with pytest.raises(InputError, match="pickled"):
        NpzSource(obj)
    mism = tmp_path / "f.npz"
    np.savez(mism, images=np.zeros((3, 4, 4), np.uint8), labels=np.array([0, 1]))
    with pytest.raises(InputError, match="2 labels for 3 images"):
        NpzSource(mism)
    with pytest.raises(InputError, match="not found"):
        NpzSource(tmp_path / "missing.npz")


# ----------------------------------------------------------------------------- CIFAR


def _cifar_rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 32, 32, 3) images and their official (n, 3072) row encoding (R, G, B planes)."""
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    rows = imgs.transpose(0, 3, 1, 2).reshape(n, 3072)
    return imgs, rows


def _dump(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # Python-2 era protocol, bytes keys as in the originals


def _fake_cifar10(root: Path, n: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    _dump(d / "batches.meta", {b"label_names": names, b"num_cases_per_batch": n, b"num_vis": 3072})
    truth = {}
    for k, fname in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        imgs, rows = _cifar_rows(n, k)
        labels = [(k + j) % 10 for j in range(n)]
        _dump(
            d / fname,
            {b"batch_label": fname.encode(), b"labels": labels, b"data": rows, b"filenames": [b"x.png"] * n},
        )
        truth[fname] = (imgs, labels)
    return truth


def test_cifar10_pickles(tmp_path: Path) -> None:
    truth = _fake_cifar10(tmp_path)
    src = cifar10(tmp_path, "train")  # parent of cifar-10-batches-py
    assert isinstance(src, BenchmarkSource) and len(src) == 15
    assert src.class_names[:3] == ["airplane", "automobile", "bird"]
    imgs1, labels1 = truth["data_batch_1"]
    assert np.array_equal(src.read(0), imgs1[0])
    # orientation/channel order: row 0, column 1 of the red plane is byte 1 of the row
    assert src.read(0)[0, 1, 0] == imgs1[0, 0, 1, 0]
    assert src.labels[:3].tolist() == labels1
    assert src.ids()[:2] == ["train/0", "train/1"]
    test = cifar10(tmp_path / "cifar-10-batches-py", "test")
    assert len(test) == 3 and np.array_equal(test.read(2), truth["test_batch"][0][2])
    both = cifar10(tmp_path, "all")
    assert len(both) == 18 and both.ids()[15] == "test/0" and len(set(both.ids())) == 18
    with pytest.raises(InputError, match="unknown split 'val'"):
        cifar10(tmp_path, "val")
    via = open_source(tmp_path, split="test")
    assert isinstance(via, BenchmarkSource) and via.dataset == "cifar10" and len(via) == 3


def test_cifar100_fine_and_coarse(tmp_path: Path) -> None:
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    fine_names = [f"fine{k}".encode() for k in range(100)]
    coarse_names = [f"coarse{k}".encode() for k in range(20)]
    _dump(d / "meta", {b"fine_label_names": fine_names, b"coarse_label_names": coarse_names})
    for k, part in enumerate(("train", "test")):
        _, rows = _cifar_rows(4, 10 + k)
        _dump(
            d / part,
            {
                b"data": rows,
                b"fine_labels": [99, 1, 2, 3],
                b"coarse_labels": [19, 0, 1, 1],
                b"filenames": [b"f"] * 4,
            },
        )
    fine = cifar100(tmp_path, "train")
    assert len(fine.class_names) == 100 and fine.labels.tolist() == [99, 1, 2, 3]
    coarse = open_source(d, split="test", coarse=True)
    assert coarse.class_names[19] == "coarse19" and coarse.labels.tolist() == [19, 0, 1, 1]
    assert np.array_equal(coarse.read(0), _cifar_rows(4, 11)[0][0])
    assert coarse.fingerprint() != open_source(d, split="test").fingerprint()


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    _fake_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    _dump(bad, {b"data": Evil(), b"labels": [0]})
    with pytest.raises(InputError, match="refusing to unpickle"):
        cifar10(tmp_path, "train")
    with pytest.raises(InputError, match="refusing"):
        load_pickle_safely(bad)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Evil(), protocol=5))
    with pytest.raises(InputError, match="refusing"):
        load_pickle_safely(tmp_path / "evil.pkl")
    assert not marker.exists()
    # plain data and numpy arrays at the modern protocol still load
    (tmp_path / "ok.pkl").write_bytes(pickle.dumps({"a": np.arange(3)}, protocol=5))
    assert load_pickle_safely(tmp_path / "ok.pkl")["a"].tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------- idx


def _idx_bytes(a: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[a.dtype]
    header = bytes([0, 0, code, a.ndim]) + np.array(a.shape, dtype=">u4").tobytes()
    return header + a.tobytes()


def _fake_idx_dir(
    d: Path, n_train: int = 5, n_test: int = 3, gz: bool = True
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    d.mkdir(parents=True)
    truth = {}
    rng = np.random.default_rng(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) * 3 % 10).astype(np.uint8)
        for kind, arr, ndim in (("images", imgs, 3), ("labels", labels, 1)):
            data = _idx_bytes(arr)
            name = f"{prefix}-{kind}-idx{ndim}-ubyte"
            if gz and prefix == "train":
                (d / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (d / name).write_bytes(data)
        truth[prefix] = (imgs, labels)
    return truth


def test_mnist_idx_raw_and_gz(tmp_path: Path) -> None:
    truth = _fake_idx_dir(tmp_path / "mnist")
    train = mnist(tmp_path / "mnist")
    assert train.dataset == "mnist" and train.class_names == [str(k) for k in range(10)]
    assert len(train) == 5 and np.array_equal(train.read(4)[..., 0], truth["train"][0][4])
    assert train.read(0).shape == (28, 28, 3)
    assert train.labels.tolist() == truth["train"][1].tolist()
    test = open_source(tmp_path / "mnist", split="test")  # raw (not gzipped) files
    assert len(test) == 3 and np.array_equal(test.read(1)[..., 1], truth["t10k"][0][1])
    assert len(open_source(tmp_path / "mnist", split="all")) == 8


def test_fashion_mnist_detection(tmp_path: Path) -> None:
    _fake_idx_dir(tmp_path / "Fashion-MNIST", gz=True)
    src = open_source(tmp_path / "Fashion-MNIST")
    assert src.dataset == "fashion-mnist" and src.class_names == FASHION_MNIST_CLASSES
    _fake_idx_dir(tmp_path / "plain")
    forced = open_source(tmp_path / "plain", kind="fashion-mnist")
    assert forced.class_names[9] == "Ankle boot"
    assert open_source(tmp_path / "plain").class_names[9] == "9"


def test_idx_header_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x01\x02\x03\x04" + b"\x00" * 20)
    with pytest.raises(InputError, match="bad magic"):
        read_idx(bad)
    cut = tmp_path / "cut-idx"
    cut.write_bytes(_idx_bytes(np.zeros((4, 28, 28), np.uint8))[:-100])
    with pytest.raises(InputError, match="truncated idx"):
        read_idx(cut)
    wide = tmp_path / "wide-idx"
    wide.write_bytes(_idx_bytes(np.array([1, -2, 300], dtype=">i4")))
    assert read_idx(wide).tolist() == [1, -2, 300]


# ----------------------------------------------------------------------------- STL-10


def _fake_stl10(d: Path) -> dict[str, np.ndarray]:
    d.mkdir(parents=True)
    rng = np.random.default_rng(2)
    truth = {}
    for part, n in (("train", 2), ("test", 3), ("unlabeled", 2)):
        imgs = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        imgs[:, 0, :5, 0] = 255  # a red mark at the top-left, along the first row
        # Official layout: per image, per channel, column-major 96x96 -> (N, C, W, H) in C order.
        (d / f"{part}_X.bin").write_bytes(np.ascontiguousarray(imgs.transpose(0, 3, 2, 1)).tobytes())
        if part != "unlabeled":
            (d / f"{part}_y.bin").write_bytes((np.arange(n) % 10 + 1).astype(np.uint8).tobytes())
        truth[part] = imgs
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (d / "class_names.txt").write_text("".join(f"{n}\n" for n in names))
    return truth


def test_stl10_binaries(tmp_path: Path) -> None:
    truth = _fake_stl10(tmp_path / "stl10_binary")
    train = stl10(tmp_path, "train")
    assert len(train) == 2 and train.class_names[7] == "monkey"
    out = train.read(1)
    assert out.shape == (96, 96, 3) and np.array_equal(out, truth["train"][1])
    assert out[0, :5, 0].tolist() == [255] * 5  # orientation: the mark is on row 0
    assert train.labels.tolist() == [0, 1]  # 1..10 -> 0..9
    unl = open_source(tmp_path, split="unlabeled")
    assert unl.labels.tolist() == [-1, -1] and np.array_equal(unl.read(1), truth["unlabeled"][1])
    mixed = stl10(tmp_path / "stl10_binary", "train+unlabeled")
    assert len(mixed) == 4 and mixed.ids() == ["train/0", "train/1", "unlabeled/0", "unlabeled/1"]
    assert mixed.labels.tolist() == [0, 1, -1, -1]
    assert len(stl10(tmp_path, "all")) == 5
    with pytest.raises(InputError, match="unknown split"):
        stl10(tmp_path, "validation")
    assert len(train.fingerprint()) == 64


# ----------------------------------------------------------------------------- digits / open_source


def test_digits_bundled() -> None:
    src = open_source("digits")
    assert isinstance(src, ArraySource) and len(src) == 1797
    img = src.read(0)
    assert img.shape == (8, 8, 3) and img.dtype == np.uint8
    assert src.class_names == [str(k) for k in range(10)] and set(src.labels.tolist()) == set(range(10))
    assert max(int(src.read(i).max()) for i in range(20)) == 255
    assert digits("all").fingerprint() == src.fingerprint()
    with pytest.raises(InputError, match="single split"):
        digits("test")
    assert open_source("digits", labels="none").labels is None


def test_open_source_folder_and_archive_splits(tmp_path: Path) -> None:
    tree = _archive_tree()
    for rel, a in tree.items():
        (tmp_path / "tree" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / rel).write_bytes(_png_bytes(a))
    folder = open_source(tmp_path / "tree", split="test")
    assert isinstance(folder, FolderSource) and len(folder) == 4 and folder.class_names == ["cat", "dog"]
    assert len(open_source(tmp_path / "tree")) == 10
    with pytest.raises(InputError, match="no 'val' sub-folder"):
        open_source(tmp_path / "tree", split="val")
    arch = open_source(_make_archive(tmp_path / "t.tar.gz", tree), split="train")
    assert isinstance(arch, ArchiveSource) and len(arch) == 6 and arch.labels.tolist() == [0, 0, 0, 1, 1, 1]
    forced = open_source(tmp_path / "t.tar.gz", kind="archive", labels="none")
    assert forced.labels is None and len(forced) == 10


def test_open_source_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="source not found"):
        open_source(tmp_path / "missing")
    txt = tmp_path / "y.txt"
    txt.write_text("x")
    with pytest.raises(
        InputError, match=r"y\.txt is a file of another type; give a folder of images, an archive"
    ):
        open_source(txt)
    one = tmp_path / "photo.JPG"
    one.write_bytes(b"")
    single = open_source(one)  # one image file is a source of one image (issue 24; unreadable here)
    assert len(single) == 1 and single.ids() == ["photo.JPG"] and single.labels is None
    with pytest.raises(InputError, match="unknown source kind 'imagenet'; use one of: auto, folder"):
        open_source(tmp_path, kind="imagenet")
    with pytest.raises(InputError, match="unknown labels mode"):
        open_source("digits", labels="yes")
    _write_png(tmp_path / "imgs" / "a.png", 1)
    with pytest.raises(InputError, match=r"coarse .* only to CIFAR-100"):
        open_source(tmp_path / "imgs", coarse=True)
    with pytest.raises(InputError, match=r"CIFAR-10 file missing|no cifar-10-batches-py"):
        open_source(tmp_path / "imgs", kind="cifar10")


def test_open_source_finds_benchmark_one_level_down(tmp_path: Path) -> None:
    _fake_idx_dir(tmp_path / "downloads" / "fashion-mnist")
    _write_png(tmp_path / "downloads" / "other" / "x.png", 1)  # a folder of images beside it
    src = open_source(tmp_path / "downloads", split="test")
    assert isinstance(src, BenchmarkSource) and src.dataset == "fashion-mnist" and len(src) == 3
    _fake_cifar10(tmp_path / "downloads")
    with pytest.raises(InputError, match="several benchmark folders"):
        open_source(tmp_path / "downloads")
    assert open_source(tmp_path / "downloads", kind="cifar10").dataset == "cifar10"


def test_available_datasets() -> None:
    items = available_datasets()
    names = {d["name"] for d in items}
    assert {"digits", "cifar10", "cifar100", "mnist", "fashion-mnist", "stl10"} <= names
    for d in items:
        assert {"name", "kind", "description", "how_to_get"} <= set(d)
        assert d["kind"] in KINDS


# ----------------------------------------------------------------------------- shared real data


def test_shared_cifar10_tar_test_split(shared_dir: Path) -> None:
    tar = shared_dir / "data" / "cifar10-jpg.tar.gz"
    if not tar.is_file():
        pytest.skip(f"{tar} not present")
    t0 = time.perf_counter()
    src = open_source(tar, split="test")
    opened = time.perf_counter() - t0
    assert len(src) == 10_000
    assert src.class_names == [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    assert np.bincount(src.labels).tolist() == [1000] * 10
    assert len(set(src.ids())) == 10_000
    for i in (0, 4321, 9999):
        img = src.read(i)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    t1 = time.perf_counter()
    with ThreadPoolExecutor(2) as ex:
        shapes = {a.shape for a in ex.map(src.read, range(0, 10_000, 10))}
    assert shapes == {(32, 32, 3)}
    assert opened < 20.0, f"opening the CIFAR-10 tar test split took {opened:.1f}s"
    assert time.perf_counter() - t1 < 20.0


def test_shared_fashion_mnist_test_split(shared_dir: Path) -> None:
    d = shared_dir / "data" / "fashion-mnist"
    if not d.is_dir():
        pytest.skip(f"{d} not present")
    src = open_source(d, split="test")
    assert src.dataset == "fashion-mnist" and len(src) == 10_000
    assert src.images.shape == (10_000, 28, 28) and src.read(0).shape == (28, 28, 3)
    assert len(src.labels) == 10_000 and np.bincount(src.labels).tolist() == [1000] * 10
    assert src.class_names == FASHION_MNIST_CLASSES
