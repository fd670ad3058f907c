"""Hostile-input sweep of the CLI (issue 22): >= 100 bad inputs and faults, one table.

Every case runs ``imgclust`` in this process (``imgclust.cli.main``; an exception that
escapes is a traceback) against a scratch workspace, then is classified:

* **clean error**: expected to fail, and it did with a non-zero status, no traceback and a
  short message (an ``error:`` line or a usage error);
* **ok**: expected to succeed, and it did, and its own check of the outputs passed;
* **traceback**: an exception escaped, or ``Traceback`` appeared on stderr;
* **wrong output**: succeeded where it should have failed, failed where it should have
  succeeded, or its outputs fail the case's check (e.g. a model chose where we write);
* **data lost**: a protected file (the user's files in ``--out``, the source folder, an
  export destination, a finished run) changed: sha256 and mtime are compared.

Classes: bad arguments, bad sources, bad configs, untrusted models, output-directory
policy, disk full (injected with ``IMGCLUST_FAKE_FREE_BYTES`` and ENOSPC from the writer;
a real 4 MB tmpfs too when this process may mount one), edges (long names, non-finite
pixels, identical images).

Usage::

    python benchmarks/soak_hostile.py [--keep DIR] [--only SUBSTRING] [-v]

Exit status 0 when there are no tracebacks, wrong outputs or lost data.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SMALL = ["--backbone", "pixels", "--image-size", "8", "--option", "n_init=1", "--no-report", "-q"]


@dataclass
class Case:
    name: str
    args: list[Any]
    expect: str = "error"  # error | ok
    cls: str = "arguments"
    setup: Callable[[], None] | None = None
    protect: list[Path] = field(default_factory=list)
    check: Callable[[], bool] | None = None  # extra check of outputs (True = good)
    env: dict[str, str] = field(default_factory=dict)
    patch: Callable[[], Callable[[], None]] | None = None  # installs a fault; returns its undo


def run_cli(args: list[Any]) -> tuple[int | None, str, str, str | None]:
    """(status or None, stdout, stderr, traceback text when an exception escaped)."""
    import signal

    from imgclust import cli as cli_mod

    old_argv, old_sig = sys.argv, {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    sys.argv = ["imgclust", *map(str, args)]
    cli_mod._signal_seen.clear()
    out, err = io.StringIO(), io.StringIO()
    rc: int | None = None
    tb = None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli_mod.main()
        rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - that is exactly what we count
        tb = traceback.format_exc()
    finally:
        sys.argv = old_argv
        for s, h in old_sig.items():
            signal.signal(s, h)
    return rc, out.getvalue(), err.getvalue(), tb


def snapshot(paths: list[Path]) -> dict[str, tuple[str, int]]:
    snap = {}
    for root in paths:
        files = [root] if root.is_file() else (sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
                                               if root.is_dir() else [])
        for p in files:
            snap[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        if not root.exists():
            snap[str(root)] = ("absent", 0)
    return snap


def classify(c: Case, rc: int | None, err: str, tb: str | None, lost: bool, check_ok: bool) -> str:
    if lost:
        return "data lost"
    if tb is not None or "Traceback" in err:
        return "traceback"
    if c.expect == "ok":
        return "ok" if rc == 0 and check_ok else "wrong output"
    if rc == 0:
        return "wrong output"
    short = len([ln for ln in err.splitlines() if ln.strip()]) <= 12
    has_msg = any(ln.startswith("error:") for ln in err.splitlines()) or "Error" in err or "Usage" in err
    return "clean error" if short and has_msg and check_ok else "wrong output"


# --------------------------------------------------------------------- the workspace
def build_cases(ws: Path) -> tuple[list[Case], Path | None]:
    from PIL import Image

    rng = np.random.default_rng(0)
    photos = ws / "photos"
    for c in ("cat", "dog"):
        (photos / c).mkdir(parents=True, exist_ok=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(photos / c / f"{i}.png")
    run = ws / "run"
    rc, _, err, tb = run_cli(["cluster", photos, "--k", 2, *SMALL, "--out", run])
    assert rc == 0 and tb is None, err + (tb or "")
    model = run / "model"
    cases: list[Case] = []
    add = cases.append
    P = [photos]

    # ---- bad arguments (cluster and the other commands) --------------------------------
    bad = [
        ["--method", "nosuch"], ["--option", "nosuch=1"], ["--option", "n_init=abc"], ["--option", "n_init=-1"],
        ["--option", "noequals"], ["--backbone-option", "foo=1"], ["--backbone", "nosuch"],
        ["--seed", "-1"], ["--seed", str(2**32)], ["--seed", str(10**30)], ["--seed", "abc"], ["--pca", "-5"],
        ["--workers", "-2"], ["--workers", "0"], ["--batch-size", "0"], ["--batch-size", "-7"], ["--chunk-rows", "0"],
        ["--image-size", "100000"], ["--image-size", "0"], ["--image-size", "-3"], ["--limit", "0"], ["--limit", "-5"],
        ["--max-pixels", "0"], ["--precision", "fp8"], ["--device", "tpu:9"], ["--device", "cuda:77"], ["--map", "nosuch"],
        ["--kind", "nosuch"], ["--labels", "maybe"], ["--split", "nosuch"],
    ]
    for a in bad:
        add(Case(f"cluster {' '.join(a)}", ["cluster", photos, "--k", 2, *SMALL, *a, "--out", ws / "o" / "x"], protect=P,
                 check=lambda: not (ws / "o" / "x" / "run.json").exists()))
    for k in ["0", "1", "-3", "abc", "1.5", str(10**12), "100"]:
        add(Case(f"cluster --k {k}", ["cluster", photos, "--k", k, *SMALL, "--out", ws / "o" / "k"], protect=P))
    for kr in ["2", "5:2", "2:100000000", "a:b", "2:10:0", "1,2", "2:8:-1", ""]:
        add(Case(f"cluster --k auto --k-range {kr!r}", ["cluster", photos, "--k", "auto", "--k-range", kr, *SMALL,
                                                       "--out", ws / "o" / "kr"], protect=P))
    add(Case("cluster without K", ["cluster", photos, "--out", ws / "o" / "nok"]))
    add(Case("cluster without source", ["cluster", "--k", 2]))
    add(Case("unknown command", ["nosuch"]))
    add(Case("unknown option", ["cluster", photos, "--k", 2, "--nosuch"]))
    add(Case("predict --max-pixels 0", ["predict", model, photos, "--max-pixels", 0, "--out", ws / "p0.csv"]))
    add(Case("report --per-cluster 0", ["report", run, "--per-cluster", 0], protect=[run]))
    add(Case("report --thumb-size -1", ["report", run, "--thumb-size", -1], protect=[run]))
    add(Case("export --to nosuch", ["export", run, ws / "e_bad", "--to", "nosuch"], protect=[run]))
    add(Case("export --mode nosuch", ["export", run, ws / "e_bad2", "--mode", "nosuch"], protect=[run]))
    add(Case("export --mode with csv", ["export", run, ws / "e.csv", "--to", "csv", "--mode", "copy"], protect=[run]))
    add(Case("refine --method nosuch", ["refine", run, "--method", "nosuch", "--out", ws / "rf"], protect=[run]))

    # ---- bad sources ----------------------------------------------------------------------
    def src_case(name: str, make: Callable[[Path], Path], expect: str = "error", check: Callable[[], bool] | None = None,
                 extra: list[Any] | None = None) -> None:
        d = ws / "src" / name.replace(" ", "_")
        d.mkdir(parents=True, exist_ok=True)
        p = make(d)
        add(Case(f"source: {name}", ["cluster", p, "--k", 2, *SMALL, *(extra or []), "--out", d / "run"], expect=expect,
                 cls="sources", protect=[p] if p.exists() else [], check=check))

    def wb(p: Path, data: bytes) -> Path:
        p.write_bytes(data)
        return p

    src_case("missing path", lambda d: d / "nope")
    src_case("empty folder", lambda d: (d / "empty").mkdir() or d / "empty")
    src_case("text file", lambda d: wb(d / "a.txt", b"hi"))
    src_case("zero-byte .npz", lambda d: wb(d / "a.npz", b""))
    src_case("garbage .npz", lambda d: wb(d / "a.npz", os.urandom(300)))
    src_case("garbage .zip", lambda d: wb(d / "a.zip", b"PK\x03\x04" + os.urandom(300)))
    src_case("garbage .tar.gz", lambda d: wb(d / "a.tar.gz", b"\x1f\x8b" + os.urandom(300)))

    def npz(d: Path, **arrays: Any) -> Path:
        np.savez(d / "a.npz", **arrays)
        return d / "a.npz"

    src_case("npz without images", lambda d: npz(d, foo=np.zeros(3)))
    src_case("npz object array", lambda d: npz(d, images=np.array([{"a": 1}, None], dtype=object)))
    src_case("npz 1-D images", lambda d: npz(d, images=np.zeros(10, np.uint8)))
    src_case("npz 5 channels", lambda d: npz(d, images=np.zeros((4, 8, 8, 5), np.uint8)))
    src_case("npz zero images", lambda d: npz(d, images=np.zeros((0, 8, 8), np.uint8)))
    src_case("npz label count mismatch", lambda d: npz(d, images=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(3)))
    src_case("npz float labels", lambda d: npz(d, images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0.5, 1, 2, 3])))
    src_case("npz complex images", lambda d: npz(d, images=np.zeros((4, 8, 8), np.complex64)))
    src_case("npz all inf", lambda d: npz(d, images=np.full((4, 8, 8), np.inf, np.float32)))

    def forged(d: Path) -> Path:
        np.savez(d / "a.npz", images=np.zeros((2, 8, 8), np.uint8))
        with zipfile.ZipFile(d / "a.npz") as z:
            raw = z.read("images.npy")
        n = int.from_bytes(raw[8:10], "little")
        hdr = raw[10:10 + n].replace(b"(2, 8, 8), }", b"(10**13, 8, 8)}".replace(b"10**13", b"10000000000000"))
        hdr = hdr.rstrip(b" \n")
        hdr = hdr + b" " * (n - len(hdr) - 1) + b"\n"
        with zipfile.ZipFile(d / "a.npz", "w") as z:
            z.writestr("images.npy", raw[:10] + hdr + raw[10 + n:])
        return d / "a.npz"

    src_case("npz header claims 10**13 images", forged)

    def one_inf(d: Path) -> Path:
        x = np.random.default_rng(1).random((20, 8, 8, 3)).astype(np.float32)
        x[3, 1, 1, 1] = np.inf
        return npz(d, images=x)

    src_case("npz one inf pixel", one_inf, expect="ok",
             check=lambda: "non-finite" in (ws / "src" / "npz_one_inf_pixel" / "run" / "skipped.csv").read_text())

    def corrupt_only(d: Path) -> Path:
        f = d / "imgs"
        f.mkdir()
        for i in range(4):
            (f / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(50))
        (f / "0b.jpg").write_bytes(b"")
        return f

    src_case("only corrupt images", corrupt_only)

    def dir_named_png(d: Path) -> Path:
        f = d / "imgs"
        (f / "x.png").mkdir(parents=True)
        (f / "dangling.png").symlink_to(d / "nowhere.png")
        return f

    src_case("dir named x.png and a dangling link", dir_named_png)

    def identical(d: Path) -> Path:
        f = d / "same"
        f.mkdir()
        for i in range(12):
            Image.new("RGB", (8, 8), (70, 70, 70)).save(f / f"{i}.png")
        return f

    src_case("identical images, k auto", identical, expect="ok", extra=["--k", "auto", "--k-range", "2:5"])

    def long_names(d: Path) -> Path:
        f = d / "long" / ("c" * 120)
        f.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(f / (f"{i}" + "é" * 120 + "x.png"))
        return d / "long"

    src_case("names over 255 bytes", long_names, expect="ok")
    ln_run = ws / "src" / "names_over_255_bytes" / "run"
    add(Case("export names over 255 bytes", ["export", ln_run, ws / "src" / "ln_export", "--to", "folders"], expect="ok",
             cls="edges", check=lambda: len(list((ws / "src" / "ln_export").rglob("*.png"))) == 4))

    # ---- bad configs ----------------------------------------------------------------------
    def cfg_case(name: str, text: str | bytes) -> None:
        p = ws / "cfg" / (name.replace(" ", "_") + ".toml")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        add(Case(f"config: {name}", ["cluster", "--config", p, "--out", ws / "cfg" / "run"], cls="configs", protect=[p]))

    src_line = f'[source]\npath = "{photos}"\n'
    cfg_case("not TOML", "k = = 3")
    cfg_case("binary", os.urandom(200))
    cfg_case("deep nesting", "k = 2\nx = " + "[" * 50_000 + "]" * 50_000)
    cfg_case("unknown key", "k = 2\nnosuch = 1\n" + src_line)
    cfg_case("k as text", 'k = "ten"\n' + src_line)
    cfg_case("k negative", "k = -2\n" + src_line)
    cfg_case("seed negative", "k = 2\nseed = -5\n" + src_line)
    cfg_case("seed huge", f"k = 2\nseed = {2**40}\n" + src_line)
    cfg_case("source not a table", 'k = 2\nsource = "x"\n')
    cfg_case("method options wrong type", 'k = 2\n[method_options]\nn_init = "many"\n' + src_line)
    cfg_case("unknown method option", "k = 2\n[method_options]\nnope = 1\n" + src_line)
    cfg_case("unknown backbone option", 'k = 2\n[backbone]\nname = "pixels"\n[backbone.options]\nzzz = 1\n' + src_line)
    cfg_case("image size huge", 'k = 2\n[backbone]\nname = "pixels"\nimage_size = 100000\n' + src_line)
    cfg_case("workers negative", "k = 2\n[features]\nworkers = -1\n" + src_line)
    cfg_case("pca negative", "k = 2\n[features]\npca = -1\n" + src_line)
    cfg_case("missing file", "")
    (ws / "cfg" / "missing_file.toml").unlink()

    # ---- untrusted models ----------------------------------------------------------------
    def model_case(name: str, edit: Callable[[Path], None], expect: str = "error",
                   check: Callable[[Path], bool] | None = None) -> None:
        d = ws / "models" / name.replace(" ", "_")
        shutil.copytree(model, d)
        edit(d)
        add(Case(f"model: {name}", ["predict", d, photos, "--out", d.parent / (d.name + ".csv"), "-q"], expect=expect,
                 cls="models", protect=[photos], check=None if check is None else (lambda d=d: check(d))))

    def set_params(**kw: Any) -> Callable[[Path], None]:
        def edit(d: Path) -> None:
            meta = json.loads((d / "model.json").read_text())
            meta["params"].update(kw)
            (d / "model.json").write_text(json.dumps(meta))
        return edit

    def set_meta(**kw: Any) -> Callable[[Path], None]:
        def edit(d: Path) -> None:
            meta = json.loads((d / "model.json").read_text())
            meta.update(kw)
            (d / "model.json").write_text(json.dumps(meta))
        return edit

    evil = ws / "evil_cache"
    model_case("cache_dir elsewhere", set_params(cache_dir=str(evil)), expect="ok", check=lambda d: not evil.exists())
    for name, kw in [("image_size 100000", {"image_size": 100000}), ("batch_size 1e9", {"batch_size": 10**9}),
                     ("n_clusters 1e12", {"n_clusters": 10**12}), ("seed -1", {"seed": -1}), ("workers -3", {"workers": -3}),
                     ("pca -5", {"pca": -5}), ("method nosuch", {"method": "nosuch"}), ("unknown param", {"evil": 1}),
                     ("n_clusters text", {"n_clusters": "ten"}), ("backbone option huge size", {"backbone_options": {"image_size": 10**6}}),
                     ("backbone option nested", {"backbone_options": {"a": {"b": [1]}}}),
                     ("backbone option unknown", {"backbone_options": {"zzz": 1}})]:
        model_case(name, set_params(**kw))
    model_case("format 99", set_meta(format=99))
    model_case("n_features_in -1", set_meta(n_features_in=-1))
    model_case("json array", lambda d: (d / "model.json").write_text("[1, 2]"))
    model_case("json garbage", lambda d: (d / "model.json").write_bytes(os.urandom(100)))
    model_case("json deep nesting", lambda d: (d / "model.json").write_text("[" * 200_000 + "]" * 200_000))
    model_case("model.pt truncated", lambda d: (d / "model.pt").write_bytes((d / "model.pt").read_bytes()[:100]))
    model_case("model.pt pickle payload", lambda d: (d / "model.pt").write_bytes(
        b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94\x8c\x05touch\x94\x85\x94R\x94."))
    model_case("model.pt missing", lambda d: (d / "model.pt").unlink())
    model_case("weights path elsewhere", set_params(backbone_weights="/nonexistent/w.pth"))

    # ---- output-directory policy -----------------------------------------------------
    foreign = ws / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    (foreign / ".draft.abcd1234.tmp").write_text("looks like a temp file")
    for extra in ([], ["--overwrite"]):
        add(Case(f"out: foreign non-empty folder {extra}", ["cluster", photos, "--k", 2, *SMALL, "--out", foreign, *extra],
                 cls="outputs", protect=[foreign, photos]))
    add(Case("out: finished run without --overwrite", ["cluster", photos, "--k", 3, *SMALL, "--out", run],
             cls="outputs", protect=[run]))
    (ws / "afile").write_text("x")
    add(Case("out: is a file", ["cluster", photos, "--k", 2, *SMALL, "--out", ws / "afile"], cls="outputs",
             protect=[ws / "afile"]))
    add(Case("out: inside the source folder", ["cluster", photos, "--k", 2, *SMALL, "--out", photos / "run"],
             cls="outputs", protect=[photos], check=lambda: not (photos / "run").exists()))
    for to, name in [("json", "assignments.csv"), ("csv", "assignments.csv"), ("csv", "run.json"), ("folders", "sub"),
                     ("json", "model/model.json")]:
        add(Case(f"export into the run dir: --to {to} {name}", ["export", run, run / name, "--to", to], cls="outputs",
                 protect=[run]))
    mine = ws / "mine.json"
    mine.write_text("precious")
    add(Case("export over an existing file", ["export", run, mine, "--to", "json"], cls="outputs", protect=[mine]))
    add(Case("export tree into a non-empty folder", ["export", run, foreign, "--to", "folders"], cls="outputs",
             protect=[foreign]))
    add(Case("export tree into the source", ["export", run, photos / "exp", "--to", "folders"], cls="outputs",
             protect=[photos]))
    add(Case("export from a non-run folder", ["export", foreign, ws / "e_x", "--to", "csv"], cls="outputs",
             protect=[foreign]))
    add(Case("report of a missing run", ["report", ws / "nope"], cls="outputs"))
    add(Case("export still works after the refusals", ["export", run, ws / "after.csv", "--to", "csv"], expect="ok",
             cls="outputs", check=lambda: (ws / "after.csv").read_text().startswith("id,path,cluster")))

    # ---- disk full --------------------------------------------------------------------
    add(Case("disk full: feature cache (injected)", ["cluster", photos, "--k", 2, *SMALL, "--image-size", "32",
                                                     "--cache-dir", ws / "fullcache", "--out", ws / "o" / "df1"],
             cls="disk full", env={"IMGCLUST_FAKE_FREE_BYTES": "1000"}, protect=P,
             check=lambda: not list((ws / "fullcache").rglob("features.npy"))))
    add(Case("disk full: export copies (injected)", ["export", run, ws / "df_export", "--to", "imagefolder", "-q"],
             cls="disk full", env={"IMGCLUST_FAKE_FREE_BYTES": "1000"}, protect=[run, photos],
             check=lambda: not (ws / "df_export").exists()))

    def enospc_copy() -> Callable[[], None]:
        real = shutil.copyfile
        n = {"i": 0}

        def f(a: Any, b: Any, *x: Any, **k: Any) -> Any:
            n["i"] += 1
            if n["i"] == 3:
                Path(b).write_bytes(b"")
                raise OSError(errno.ENOSPC, "No space left on device", str(a))
            return real(a, b, *x, **k)

        shutil.copyfile = f
        return lambda: setattr(shutil, "copyfile", real)

    add(Case("disk full: export mid-copy (injected ENOSPC)", ["export", run, ws / "df_export2", "--to", "imagefolder", "-q"],
             cls="disk full", patch=enospc_copy, protect=[run, photos], check=lambda: not (ws / "df_export2").exists()))

    def enospc_torch() -> Callable[[], None]:
        import torch

        real = torch.save

        def f(*a: Any, **k: Any) -> None:
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from None

        torch.save = f
        return lambda: setattr(torch, "save", real)

    add(Case("disk full: saving the model (injected)", ["cluster", photos, "--k", 2, *SMALL, "--out", ws / "o" / "df3"],
             cls="disk full", patch=enospc_torch, protect=P, check=lambda: not (ws / "o" / "df3" / "run.json").exists()))
    fs = ws / "tmpfs"
    fs.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(fs)],
                                                   capture_output=True).returncode == 0
    if mounted:
        add(Case("disk full: feature cache on a 1 MB tmpfs", ["cluster", photos, "--k", 2, *SMALL, "--image-size", "128",
                                                              "--cache-dir", fs / "cache", "--out", ws / "o" / "df4"],
                 cls="disk full", protect=P, check=lambda: not list((fs / "cache").rglob("features.npy"))))
        add(Case("disk full: run dir on a 1 MB tmpfs", ["cluster", photos, "--k", 2, "--backbone", "pixels",
                                                        "--image-size", "256", "--no-report", "-q", "--out", fs / "run"],
                 cls="disk full", protect=P, check=lambda: not (fs / "run" / "run.json").exists()))
    return cases, (fs if mounted else None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", type=Path, default=None, help="work here and keep the workspace")
    ap.add_argument("--only", default=None, help="run only cases whose name contains this")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case")
    a = ap.parse_args()
    ws = a.keep or Path(tempfile.mkdtemp(prefix="imgclust-hostile-"))
    ws.mkdir(parents=True, exist_ok=True)
    os.environ["IMGCLUST_CACHE"] = str(ws / "cache")
    os.environ.setdefault("IMGCLUST_REPORT_MAP", "pca")
    t0 = time.perf_counter()
    fs = None
    try:
        cases, fs = build_cases(ws)
        if a.only:
            cases = [c for c in cases if a.only in c.name]
        counts: dict[str, int] = {}
        by_class: dict[str, dict[str, int]] = {}
        bad_cases = []
        for c in cases:
            before = snapshot(c.protect)
            saved = {k: os.environ.get(k) for k in c.env}
            os.environ.update(c.env)
            undo = c.patch() if c.patch else None
            try:
                rc, out, err, tb = run_cli(c.args)
            finally:
                if undo:
                    undo()
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            lost = snapshot(c.protect) != before
            try:
                check_ok = c.check() if c.check else True
            except Exception:  # noqa: BLE001
                check_ok = False
            verdict = classify(c, rc, err, tb, lost, check_ok)
            counts[verdict] = counts.get(verdict, 0) + 1
            by_class.setdefault(c.cls, {}).setdefault(verdict, 0)
            by_class[c.cls][verdict] += 1
            msg = (tb or err).strip().splitlines()
            if verdict in ("traceback", "wrong output", "data lost"):
                bad_cases.append((c.name, verdict, rc, (tb or err)[-600:]))
            if a.verbose:
                print(f"{verdict:<12} rc={rc!s:<4} {c.name}: {msg[-1][:150] if msg else ''}")
        cols = ["tried", "clean error", "ok", "traceback", "wrong output", "data lost"]
        print(f"\n{'class':<12}" + "".join(f"{h:>14}" for h in cols))
        for cls, v in list(by_class.items()) + [("TOTAL", counts)]:
            print(f"{cls:<12}" + "".join(f"{(sum(v.values()) if h == 'tried' else v.get(h, 0)):>14}" for h in cols))
        print(f"\n{len(cases)} cases in {time.perf_counter() - t0:.0f} s")
        for name, verdict, rc, text in bad_cases:
            print(f"\n[{verdict}] {name} (rc={rc})\n{text}")
        return 0 if not bad_cases else 1
    finally:
        if fs is not None:
            subprocess.run(["umount", "-l", str(fs)], capture_output=True)
        if a.keep is None:
            shutil.rmtree(ws, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
