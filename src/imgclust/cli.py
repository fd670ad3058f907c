"""Command line: thin commands over :mod:`imgclust.api`.

Every predictable problem ends in one line on stderr (``error: ...``) and exit status 2
(an operating-system error such as a full disk: status 1); Ctrl-C ends with status 130 and
SIGTERM with 143, each after keeping the finished feature batches, with a one-line hint that
rerunning resumes from the feature cache.
"""

from __future__ import annotations

import json
import signal
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from imgclust.errors import ImgclustError, InputError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="imgclust: cluster unlabeled images into K groups, report, and classify new images.",
)


def _parse_options(items: list[str] | None, what: str) -> dict:
    """``key=value`` pairs; values parsed as JSON when they can be (numbers, true/false, lists)."""
    out: dict = {}
    for it in items or []:
        if "=" not in it:
            raise InputError(f"{what} must look like key=value, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _print_summary(summary: dict, out: Path) -> None:
    m = summary.get("metrics")
    n, skipped = summary["n_images"], summary["n_skipped"]
    t = summary["timings_s"]
    ips = summary["features"]["images_per_second"]
    typer.echo(
        f"clustered {summary['n_clustered']} of {n} images into {len(summary['cluster_sizes'])} clusters "
        f"with {summary['backbone']['name']} + {summary['config']['method']} in {t['total']:.1f} s"
        + (f" (features {ips:.0f} img/s)" if ips and not summary["features"]["from_cache"] else "")
        + (" (features from cache)" if summary["features"]["from_cache"] else "")
    )
    if skipped:
        typer.echo(f"skipped {skipped} unreadable image(s): listed in {out / 'skipped.csv'}")
    empty = summary.get("empty_clusters") or []
    if empty:
        distinct = summary.get("n_distinct_features")
        typer.echo(
            f"warning: {len(empty)} of {len(summary['cluster_sizes'])} clusters are empty"
            + (f" (only {distinct} distinct images)" if distinct is not None else "")
            + "; see empty_clusters in run.json"
        )
    if m:
        typer.echo(f"ACC {m['acc']:.4f}  NMI {m['nmi']:.4f}  ARI {m['ari']:.4f}  (on {m['n_evaluated']} labelled images)")
    typer.echo(f"outputs: {out.resolve()}  (assignments.csv, run.json{', metrics.json' if m else ''}, model/)")


@app.command()
def cluster(
    ctx: typer.Context,
    source: str = typer.Argument(..., help="folder of images, archive (.tar/.zip), .npz, benchmark directory, or 'digits'"),
    k: Optional[int] = typer.Option(None, "--k", "-k", help="number of clusters K (>= 2); required unless --config sets it"),
    backbone: str = typer.Option("efficientnet-lite0", "--backbone", "-b", help="feature extractor (see `imgclust backbones`)"),
    method: str = typer.Option("kmeans", "--method", "-m", help="clustering method (see `imgclust methods`)"),
    out: Path = typer.Option(Path("runs/latest"), "--out", "-o", help="run directory to write"),
    split: Optional[str] = typer.Option(None, help="train | test | all | unlabeled, or a sub-folder name"),
    kind: str = typer.Option("auto", help="force a reader: folder, archive, npz, cifar10, cifar100, mnist, fashion-mnist, stl10, digits"),
    labels: str = typer.Option("auto", help="labels from sub-folders: auto | folder | none"),
    coarse: bool = typer.Option(False, help="CIFAR-100: use the 20 super-classes"),
    limit: Optional[int] = typer.Option(None, help="cluster a random subset of this many images (quick trials)"),
    max_pixels: Optional[int] = typer.Option(None, help="skip images with more pixels than this (default 178,956,970; decompression bombs)"),
    weights: Optional[str] = typer.Option(None, help="local backbone weights file (no download)"),
    image_size: Optional[int] = typer.Option(None, help="backbone input size in pixels (default: the backbone's)"),
    backbone_option: Optional[list[str]] = typer.Option(None, "--backbone-option", help="backbone option key=value, e.g. feature=cls+mean"),
    option: Optional[list[str]] = typer.Option(None, "--option", help="method option key=value, e.g. n_init=20"),
    pca: Optional[int] = typer.Option(None, help="reduce features to this many PCA dimensions first"),
    pca_whiten: bool = typer.Option(False, help="whiten the PCA dimensions (unit variance)"),
    batch_size: int = typer.Option(64, help="images per backbone batch"),
    precision: str = typer.Option("fp32", help="fp32 | bf16 (faster, approximate)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    workers: Optional[int] = typer.Option(None, help="image decoding threads (default: CPU count, at most 8)"),
    cache_dir: Optional[str] = typer.Option(None, help="feature cache (default $IMGCLUST_CACHE or ~/.cache/imgclust)"),
    seed: int = typer.Option(0, help="random seed"),
    config: Optional[Path] = typer.Option(None, help="TOML run config; options given on the command line win"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    chunk_rows: int = typer.Option(1024, hidden=True, help="feature rows between two cache flushes"),
) -> None:
    """Cluster SOURCE into K groups and write a run directory."""
    from imgclust.config import RunConfig, load_config

    cfg = load_config(config) if config is not None else RunConfig()

    def given(name: str) -> bool:
        src = ctx.get_parameter_source(name)
        return config is None or getattr(src, "name", "") == "COMMANDLINE"

    cfg.source.path = source
    if k is not None:
        cfg.k = k
    elif config is None:
        raise InputError("missing --k: the number of clusters K (>= 2)")
    src, bb, ft = cfg.source, cfg.backbone, cfg.features
    for name, value, obj, attr in [
        ("method", method, cfg, "method"), ("seed", seed, cfg, "seed"),
        ("split", split, src, "split"), ("kind", kind, src, "kind"), ("labels", labels, src, "labels"),
        ("coarse", coarse, src, "coarse"), ("limit", limit, src, "limit"), ("max_pixels", max_pixels, src, "max_pixels"),
        ("backbone", backbone, bb, "name"), ("weights", weights, bb, "weights"),
        ("image_size", image_size, bb, "image_size"), ("pca", pca, ft, "pca"), ("pca_whiten", pca_whiten, ft, "pca_whiten"),
        ("batch_size", batch_size, ft, "batch_size"),
        ("precision", precision, ft, "precision"), ("device", device, ft, "device"), ("workers", workers, ft, "workers"),
        ("cache_dir", cache_dir, ft, "cache_dir"), ("chunk_rows", chunk_rows, ft, "chunk_rows"),
    ]:
        if given(name):
            setattr(obj, attr, value)
    cfg.backbone.options.update(_parse_options(backbone_option, "--backbone-option"))
    cfg.method_options.update(_parse_options(option, "--option"))
    from imgclust.api import cluster as run_cluster  # after the config checks: bad input fails fast

    summary = run_cluster(cfg, out, progress=not quiet)
    _print_summary(summary, out)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="run directory to write"),
    cache_dir: Optional[str] = typer.Option(None, help="feature cache directory"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Cluster scikit-learn's bundled digits (1,797 images, 10 classes) with the offline
    EfficientNet-Lite0 backbone and k-means, and print ACC/NMI/ARI."""
    from imgclust.api import cluster as run_cluster
    from imgclust.config import BackboneConfig, FeatureConfig, RunConfig, SourceConfig

    cfg = RunConfig(
        k=10,
        method="kmeans",
        source=SourceConfig(path="digits"),
        backbone=BackboneConfig(name="efficientnet-lite0", image_size=DEMO_IMAGE_SIZE),
        features=FeatureConfig(cache_dir=cache_dir, pca=DEMO_PCA, pca_whiten=True),
    )
    typer.echo(
        f"demo: digits (1,797 8x8 images) -> efficientnet-lite0 @ {DEMO_IMAGE_SIZE} px -> "
        f"PCA-whitened to {DEMO_PCA} dims -> k-means, K=10"
    )
    summary = run_cluster(cfg, out, progress=not quiet)
    _print_summary(summary, out)


# The demo upsamples the 8x8 digits to this size: large enough for ImageNet features to be
# meaningful, small enough to finish in well under a minute on 2 cores.
DEMO_IMAGE_SIZE = 96
DEMO_PCA = 64  # whitened: ACC 0.86 on digits vs 0.70 on the raw 1280-d features


@app.command()
def predict(
    model_dir: Path = typer.Argument(..., help="a run's model/ directory (or the run directory)"),
    source: str = typer.Argument(..., help="images to classify (same forms as for `cluster`)"),
    out: Path = typer.Option(Path("predictions.csv"), "--out", "-o", help="CSV to write"),
    split: Optional[str] = typer.Option(None),
    cache_dir: Optional[str] = typer.Option(None),
    max_pixels: Optional[int] = typer.Option(None, help="skip images with more pixels than this"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Classify new images with a fitted model."""
    from imgclust.api import ImageClusterer
    from imgclust.data import open_source
    from imgclust.rundir import write_csv

    if (model_dir / "model").is_dir() and not (model_dir / "model.json").exists():
        model_dir = model_dir / "model"
    est = ImageClusterer.load(model_dir, progress=not quiet, **({"cache_dir": cache_dir} if cache_dir else {}))
    if max_pixels is not None and max_pixels < 1:
        raise InputError(f"max pixels must be >= 1, got {max_pixels}")
    src = open_source(source, split=split, max_pixels=max_pixels)
    proba = est.predict_proba(src)
    ids = src.ids()
    rows = []
    n_bad = 0
    for i in range(len(src)):
        if proba[i].sum() == 0:
            n_bad += 1
            rows.append([ids[i], src.path(i) or "", -1, "0.0000"])
        else:
            rows.append([ids[i], src.path(i) or "", int(proba[i].argmax()), f"{proba[i].max():.4f}"])
    write_csv(out, ["id", "path", "cluster", "confidence"], rows)
    typer.echo(f"predicted {len(src) - n_bad} of {len(src)} images -> {out}" + (f" ({n_bad} unreadable, cluster -1)" if n_bad else ""))


@app.command()
def datasets() -> None:
    """List the data sources imgclust can read."""
    from imgclust.data import available_datasets

    for d in available_datasets():
        splits = "/".join(d.get("splits") or [])
        typer.echo(f"{d['name']:<16} {d.get('description', '')}" + (f" [splits: {splits}]" if splits else ""))
        if d.get("how_to_get"):
            typer.echo(f"{'':<16} {d['how_to_get']}")


@app.command()
def backbones() -> None:
    """List the registered feature extractors."""
    from imgclust.backbones import available_backbones

    for b in available_backbones():
        tag = "offline" if b.offline else "download or --weights FILE"
        typer.echo(f"{b.name:<22} [{tag}] {b.description}")


@app.command()
def methods() -> None:
    """List the clustering methods and their options."""
    from dataclasses import fields

    from imgclust.methods import available_methods

    for name, cls in available_methods().items():
        opts = ", ".join(f"{f.name}={f.default!r}" for f in fields(cls.Config))
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name:<12} {doc}\n{'':<12} options: {opts}")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so the run unwinds like Ctrl-C (finished feature
    batches are flushed, temporary files removed) and exits with 143."""


_signal_seen: list[int] = []  # typer turns KeyboardInterrupt into exit code 130: remember why


def _on_signal(signum: int, frame: object) -> None:
    _signal_seen.append(signum)
    if signum == signal.SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise Terminated()
    raise KeyboardInterrupt()


def _interrupted_exit() -> None:
    term = signal.SIGTERM in _signal_seen
    typer.echo(f"{'terminated' if term else 'interrupted'}; run the same command again to resume from the feature cache",
               err=True)
    sys.exit(143 if term else 130)


def main() -> None:
    try:
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    except ValueError:  # not the main thread (embedded use): keep the defaults
        pass
    # Corrupt files make Pillow warn ("Truncated File Read", "Corrupt EXIF data") before it
    # fails or recovers; the outcome is reported per file in skipped.csv, so the warnings
    # would only be noise on the terminal.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL(\..*)?$")
    try:
        rv = app(standalone_mode=False)
    except ImgclustError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted_exit()
    except OSError as e:  # full disk, read-only or unwritable output folder, ...
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        typer.echo(f"error: {e.strerror or e}{where}", err=True)
        sys.exit(1)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        sys.exit(code)
    except typer.TyperException as e:  # usage errors: unknown option, missing argument ...
        show = getattr(e, "show", None)
        if show is not None:
            show()
        else:
            typer.echo(f"error: {e}", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    if _signal_seen:  # typer caught the KeyboardInterrupt and returned 130
        _interrupted_exit()
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
