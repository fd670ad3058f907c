"""Classes 2 and 3 of issue 22: untrusted model/run settings, and validation before any work.

A model directory is data from elsewhere: every ``model.json`` field has a type and a range,
no field chooses where we write, sizes are bounded before allocation, and hostile nesting or
a forged ``.npz`` header is one line. Bad command-line settings fail before a single image
is read (no cache entry, no run directory are created).
"""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from conftest import one_line_error

from imgclust.errors import InputError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from imgclust.api import ImageClusterer

    d = tmp_path_factory.mktemp("model")
    est = ImageClusterer(n_clusters=3, backbone="pixels", image_size=8, cache_dir=str(d / "cache"),
                         progress=False, method_options={"n_init": 1})
    est.fit("digits")
    return est.save(d / "model")


def _edit(model_dir, tmp_path, **params):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    meta = json.loads((d / "model.json").read_text())
    meta["params"].update(params)
    (d / "model.json").write_text(json.dumps(meta))
    return d


def test_model_json_cannot_choose_where_predict_writes(cli, model_dir, tmp_path, monkeypatch):
    evil = tmp_path / "evil_cache"
    d = _edit(model_dir, tmp_path, cache_dir=str(evil))
    assert json.loads((model_dir / "model.json").read_text())["params"]["cache_dir"] is None  # save never records it
    rc, _, err = cli("predict", d, "digits", "--out", tmp_path / "p.csv", "-q")
    assert rc == 0, err
    assert not evil.exists()  # the model's cache_dir is ignored ...
    assert (tmp_path / "cache" / "features").is_dir()  # ... IMGCLUST_CACHE is used


@pytest.mark.parametrize("params, needle", [
    ({"image_size": 100000}, "image size must be <= 4096"),
    ({"batch_size": 10**9}, "batch size must be <= 65536"),
    ({"image_size": 4096, "batch_size": 64}, "GiB per batch"),
    ({"n_clusters": 10**12}, "n_clusters must be <= "),
    ({"seed": -1}, "seed must be >= 0"),
    ({"seed": 2**40}, "seed must be <= 4294967295"),
    ({"workers": -3}, "workers must be >= 1"),
    ({"pca": -5}, "pca must be >= 0"),
    ({"backbone_options": {"image_size": 100000}}, "image size must be <= 4096"),
    ({"backbone_options": {"x": {"deep": [1]}}}, "must be a plain value"),
    ({"method": "nosuch"}, "unknown method 'nosuch'"),
])
def test_model_json_ranges_are_checked_before_anything_is_allocated(model_dir, tmp_path, params, needle):
    from imgclust.api import ImageClusterer

    d = _edit(model_dir, tmp_path, **params)
    with pytest.raises(InputError) as e:
        ImageClusterer.load(d)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_deeply_nested_model_json_is_one_line(cli, model_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    (d / "model.json").write_text("[" * 200_000 + "]" * 200_000)
    rc, _, err = cli("predict", d, "digits", "--out", tmp_path / "p.csv", "-q")
    assert rc == 2 and "nested too deeply" in one_line_error(err)


def test_deeply_nested_toml_config_is_one_line(cli, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("k = 3\nx = " + "[" * 100_000 + "]" * 100_000 + "\n")
    rc, _, err = cli("cluster", "--config", cfg, "--out", tmp_path / "run")
    assert rc == 2
    line = one_line_error(err)
    assert "nested too deeply" in line or "not valid TOML" in line


def test_tiny_npz_claiming_a_huge_shape_is_refused_before_allocation(cli, tmp_path):
    p = tmp_path / "bomb.npz"
    np.savez(p, images=np.zeros((2, 8, 8), np.uint8))
    with zipfile.ZipFile(p) as z:
        raw = z.read("images.npy")
    forged = raw.replace(b"(2, 8, 8)", b"(10000000000000, 8, 8)")
    hdr_len = int.from_bytes(forged[8:10], "little")
    body = forged[10:10 + hdr_len]
    body = body[: hdr_len - 1].rstrip() + b" " * (len(body) - len(body[: hdr_len - 1].rstrip()) - 1) + b"\n"
    forged = forged[:10] + body[:hdr_len] + raw[10 + int.from_bytes(raw[8:10], "little"):]
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("images.npy", forged)
    assert p.stat().st_size < 1000
    rc, _, err = cli("cluster", p, "--k", 2, "--backbone", "pixels", "--out", tmp_path / "run", "-q")
    line = one_line_error(err)
    assert rc == 2 and "claims shape (10000000000000, 8, 8)" in line, line


BAD_ARGS = [
    (["--method", "nosuch"], "unknown method 'nosuch'"),
    (["--option", "nosuch=1"], "unknown option(s) ['nosuch']"),
    (["--option", "n_init=abc"], "n_init"),
    (["--backbone-option", "foo=1"], "unknown backbone option(s) ['foo']"),
    (["--backbone", "efficientnet-lite0", "--backbone-option", "foo=1"], "unknown backbone option(s) ['foo']"),
    (["--backbone", "nosuch"], "unknown backbone 'nosuch'"),
    (["--seed", "-1"], "seed must be >= 0"),
    (["--seed", str(2**32)], "seed must be <= 4294967295"),
    (["--pca", "-5"], "pca must be >= 0"),
    (["--workers", "-2"], "workers must be >= 1"),
    (["--workers", "0"], "workers must be >= 1"),
    (["--batch-size", "0"], "batch size must be >= 1"),
    (["--image-size", "100000"], "image size must be <= 4096"),
    (["--image-size", "2"], "image size must be >= 8"),
    (["--limit", "0"], "limit must be >= 1"),
    (["--max-pixels", "-1"], "max pixels must be >= 1"),
    (["--k", "1"], "K must be at least 2"),
    (["--k", "auto", "--k-range", "2:100000000"], "more than 1000 candidates"),
    (["--device", "tpu:9"], "device"),
    (["--labels", "maybe"], "labels must be auto, folder or none"),
]


@pytest.mark.parametrize("args, needle", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_settings_fail_before_any_work(cli, tmp_path, args, needle):
    base = {"--k": "3", "--backbone": "pixels"}
    for i in range(0, len(args) - 1):
        base.pop(args[i], None)
    flat = [x for kv in base.items() for x in kv]
    rc, _, err = cli("cluster", "digits", *flat, *args, "--out", tmp_path / "run", "-q", "--no-report")
    line = one_line_error(err)
    assert rc == 2 and needle in line, line
    assert not (tmp_path / "run").exists()  # nothing written ...
    assert not (tmp_path / "cache").exists()  # ... and no image read (no cache entry)
