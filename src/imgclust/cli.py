"""Command line: thin commands over :mod:`imgclust.api` (the estimator) and :mod:`imgclust.run` (the jobs).

Every predictable problem ends in one line on stderr (``error: ...``) and exit status 2
(a full disk too, naming the destination and the space needed; any other operating-system
error: status 1); Ctrl-C ends with status 130 and
SIGTERM with 143, each after keeping the finished feature batches, with a one-line hint that
rerunning resumes from the feature cache.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from imgclust.config import parse_options
from imgclust.errors import ImgclustError, InputError

if TYPE_CHECKING:
    from imgclust.config import RunConfig

#: the one description of --map (cluster and report; README says the same): keep it in step with
#: imgclust.report.embed.resolve_method
MAP_HELP = ("the report's 2-D map: auto | umap | tsne | pca; auto = PCA below 2,000 points, else UMAP if umap-learn "
            "is installed, else t-SNE up to 5,000 points, else PCA")

THREADS_HELP = ("threads for torch, faiss, BLAS and numba: a count, or auto (default: the CPUs this process may use, "
                "minus the current load; $OMP_NUM_THREADS when set)")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="imgclust: cluster unlabeled images into K groups, report, and classify new images.",
)


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
    for fb in summary.get("fallbacks") or []:
        typer.echo(f"warning: {fb['message']}; the run kept the {fb['kept']} result (fallbacks in run.json)", err=True)
    if m:
        typer.echo(f"ACC {m['acc']:.4f}  NMI {m['nmi']:.4f}  ARI {m['ari']:.4f}  (on {m['n_evaluated']} labelled images)")
    ks = summary.get("k_selection")
    if ks:
        pc = ks["per_criterion"]
        typer.echo(f"K chosen automatically: {ks['k']} (silhouette alone {pc['silhouette']}, stability alone "
                   f"{pc['stability']}, eigengap alone {pc['eigengap']}; curve in choose_k.json and the report)")
        if ks.get("candidates") and ks.get("hierarchy"):  # issue 23: the merge tree's marked K; `imgclust recut` cuts at another one
            typer.echo(f"plausible K (merge tree): {', '.join(map(str, ks['candidates']))}; classic criteria: "
                       f"{ks.get('classic_k')}; try another with `imgclust recut {out} --k N --out DIR`")
    _echo_trust(summary.get("trust"))
    typer.echo(f"outputs: {out.resolve()}  (assignments.csv, run.json{', metrics.json' if m else ''}, model/)")
    rep = summary.get("report")
    if rep and rep.get("error"):
        typer.echo(f"warning: the report could not be written ({rep['error']}); try `imgclust report {out}`", err=True)
    elif rep:
        typer.echo(f"report: {rep['path']} ({rep['bytes'] / 1e6:.1f} MB)")


def _echo_trust(trust: Optional[dict]) -> None:
    """One line: the label-free trust score (imgclust.trust) and the least trusted clusters."""
    if not trust:
        return
    from imgclust.trust import describe

    per = [(v, c) for c, v in enumerate(trust["per_cluster"]) if v is not None]
    weak = ", ".join(f"{c} ({v:.2f})" for v, c in sorted(per)[:3])
    heads = f", head agreement {trust['head_agreement']:.2f}" if "head_agreement" in trust else ""
    typer.echo(f"trust (no labels): {trust['score']:.2f} ({describe(trust['score'])}){heads}; least trusted clusters: {weak}")


@app.command()
def cluster(
    ctx: typer.Context,
    source: Optional[str] = typer.Argument(None, help="folder of images, archive (.tar/.zip), .npz, benchmark directory, or 'digits' (optional with --config)"),
    k: Optional[str] = typer.Option(None, "--k", "-k", help="number of clusters K (>= 2), or 'auto' to choose it from --k-range; required unless --config sets it"),
    k_range: str = typer.Option("2:20", help="candidates for --k auto: lo:hi, lo:hi:step or a list 5,10,20"),
    backbone: str = typer.Option("efficientnet-lite0", "--backbone", "-b", help="feature extractor (see `imgclust backbones`)"),
    method: str = typer.Option("auto", "--method", "-m", help="clustering method (see `imgclust methods`); default auto: kmeans vs spectral-kmeans (< 5,000 images) or vs UMAP x3 + consensus + self-training, chosen without labels"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory to write (default: a fresh runs/<timestamp>, then linked as runs/latest)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace the finished run already in --out (a folder that is not a run is never replaced)"),
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
    reduce: Optional[str] = typer.Option(None, "--reduce", help="manifold stage before the method: umap:D | spectral:D (cached)"),
    batch_size: int = typer.Option(64, help="images per backbone batch"),
    precision: str = typer.Option("fp32", help="fp32 | bf16 (faster, approximate) | int8 (openvino/onnxruntime, calibrated on your images) | fp16 (CUDA)"),
    engine: str = typer.Option("auto", help="inference engine: auto | torch | openvino | onnxruntime"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    workers: Optional[int] = typer.Option(None, help="image decoding threads (default: CPU count, at most 8)"),
    cache_dir: Optional[str] = typer.Option(None, help="feature cache (default $IMGCLUST_CACHE or ~/.cache/imgclust)"),
    seed: int = typer.Option(0, help="random seed"),
    config: Optional[Path] = typer.Option(None, help="TOML run config; options given on the command line win"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    chunk_rows: int = typer.Option(1024, hidden=True, help="feature rows between two cache flushes"),
    report: bool = typer.Option(True, "--report/--no-report", help="write report.html at the end"),
    report_map: str = typer.Option("auto", "--map", help=MAP_HELP),
    save_config: Optional[Path] = typer.Option(None, help="also write the effective config to this TOML file (the run dir always gets config.toml)"),
    threads: Optional[str] = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Cluster SOURCE into K groups and write a run directory (with report.html, log.jsonl and config.toml)."""
    options = {name: value for name, value in locals().items() if name != "ctx"}
    cfg = _cluster_config(options, given=lambda name: config is None
                          or getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE")
    _check_cluster_config(cfg)  # bad input fails fast, before any image is read
    if save_config is not None:
        from imgclust.config import portable
        from imgclust.config import save_config as write_config

        write_config(portable(cfg), save_config)
    from imgclust.outdir import fresh_run_dir, point_latest
    from imgclust.run import cluster as run_cluster  # after the config checks: bad input fails fast

    fresh = out is None
    out = fresh_run_dir() if out is None else out  # never replace a previous run by default
    try:
        summary = run_cluster(cfg, out, progress=not quiet, overwrite=overwrite)
    except InputError:
        if fresh:  # bad input found before any output: leave no runs/<timestamp> holding only a log
            _drop_if_only_log(out)
        raise
    from imgclust.train import dist

    if not dist.is_main():  # under torchrun only rank 0 owns the run directory (the others ran into scratch)
        return
    if fresh:
        point_latest(out)
    _print_summary(summary, out)


def _drop_if_only_log(out: Path) -> None:
    """Remove a fresh run directory that a failed run left with nothing but its log.jsonl."""
    import shutil

    if out.is_dir() and {p.name for p in out.iterdir()} <= {"log.jsonl"}:
        shutil.rmtree(out, ignore_errors=True)


def _parse_threads(value: str | None) -> int | str | None:
    """``--threads``: a count or 'auto' (None: auto too), checked here so a typo fails fast."""
    if value is None:
        return None
    from imgclust.threads import resolve_threads

    v = value.strip().lower()
    resolve_threads(v)  # raises InputError for anything but a count >= 1 or 'auto'
    return "auto" if v == "auto" else int(v)


def _parse_k(value: str | int) -> int | str:
    if isinstance(value, int) or str(value).strip().lower() != "auto":
        try:
            return int(value)
        except ValueError:
            raise InputError(f"--k must be an integer >= 2 or 'auto', got {value!r}") from None
    return "auto"


# `imgclust cluster` option -> (section of RunConfig, field); "" is the RunConfig itself (issue 17:
# the command's body is this table, not 25 assignments).
_CLUSTER_OPTIONS = {
    "method": ("", "method"), "seed": ("", "seed"), "k_range": ("", "k_range"), "report": ("", "report"),
    "report_map": ("", "report_map"), "threads": ("", "threads"),
    "split": ("source", "split"), "kind": ("source", "kind"), "labels": ("source", "labels"),
    "coarse": ("source", "coarse"), "limit": ("source", "limit"), "max_pixels": ("source", "max_pixels"),
    "backbone": ("backbone", "name"), "weights": ("backbone", "weights"), "image_size": ("backbone", "image_size"),
    "pca": ("features", "pca"), "pca_whiten": ("features", "pca_whiten"), "reduce": ("features", "reduce"),
    "batch_size": ("features", "batch_size"), "precision": ("features", "precision"), "engine": ("features", "engine"),
    "device": ("features", "device"), "workers": ("features", "workers"), "cache_dir": ("features", "cache_dir"),
    "chunk_rows": ("features", "chunk_rows"),
}


def _cluster_config(o: dict, given) -> RunConfig:
    """The RunConfig of ``imgclust cluster``: --config FILE (if any), then the options given on the command line."""
    from imgclust.config import RunConfig, load_config

    config = o["config"]
    cfg = load_config(config) if config is not None else RunConfig()
    if o["source"] is not None:
        cfg.source.path = o["source"]
    elif config is None:
        raise InputError("missing SOURCE: the images to cluster (or --config FILE that names them)")
    if o["k"] is not None:
        cfg.k = _parse_k(o["k"])
    elif config is None:
        raise InputError("missing --k: the number of clusters K (>= 2), or 'auto'")
    values = {**o, "threads": _parse_threads(o["threads"])}
    for name, (section, attr) in _CLUSTER_OPTIONS.items():
        if given(name):
            setattr(getattr(cfg, section) if section else cfg, attr, values[name])
    cfg.backbone.options.update(parse_options(o["backbone_option"], "--backbone-option"))
    cfg.method_options.update(parse_options(o["option"], "--option"))
    return cfg


def _check_cluster_config(cfg: RunConfig) -> None:
    """What the CLI checks before the run (threads applied first: before any parallel work)."""
    from imgclust.threads import apply_threads

    apply_threads(cfg.threads)  # before any parallel work (also re-applied by fit)
    from imgclust.report.embed import MAP_METHODS

    if cfg.report_map not in MAP_METHODS:
        raise InputError(f"unknown map method {cfg.report_map!r}; use one of: {', '.join(MAP_METHODS)}")
    if cfg.k == "auto":
        from imgclust.choosek import parse_k_range

        parse_k_range(cfg.k_range)
    from imgclust.engines import choose_engine  # issue 19: a bad engine/precision fails before any work
    from imgclust.features import resolve_device

    choose_engine(cfg.features.engine, cfg.features.precision, resolve_device(cfg.features.device))


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="a run directory written by `imgclust cluster`"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file to write (default RUN_DIR/report.html)"),
    map_method: str = typer.Option("auto", "--map", help=MAP_HELP),
    per_cluster: int = typer.Option(24, help="thumbnails per cluster (most confident, then the least confident)"),
    max_thumbs: int = typer.Option(2400, help="cap on gallery thumbnails over all clusters"),
    map_points: int = typer.Option(3000, help="cap on points on the map (a stratified sample)"),
    thumb_size: int = typer.Option(64, help="thumbnail size in pixels"),
    threads: Optional[str] = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Write the self-contained HTML report of a run (opens offline; no external resources)."""
    from imgclust.report import build_report
    from imgclust.threads import apply_threads

    apply_threads(threads)

    for name, v in (("per cluster", per_cluster), ("max thumbs", max_thumbs), ("map points", map_points), ("thumb size", thumb_size)):
        if v < 1:
            raise InputError(f"{name} must be >= 1, got {v}")
    rep = build_report(run_dir, out=out, map_method=map_method, per_cluster=per_cluster, max_thumbs=max_thumbs,
                       map_points=map_points, thumb_size=thumb_size)
    for n in rep["notes"]:
        typer.echo(f"note: {n}", err=True)
    typer.echo(f"report: {rep['path']} ({rep['bytes'] / 1e6:.2f} MB, map {rep['map_method']}, "
               f"{rep['n_thumbnails']} thumbnails, {rep['seconds']:.1f} s)")


@app.command("choose-k")
def choose_k_cmd(
    source: str = typer.Argument(..., help="images (same forms as for `cluster`)"),
    k_range: str = typer.Option("2:20", help="candidates: lo:hi, lo:hi:step or a list 5,10,20"),
    backbone: str = typer.Option("efficientnet-lite0", "--backbone", "-b"),
    image_size: Optional[int] = typer.Option(None),
    weights: Optional[str] = typer.Option(None),
    split: Optional[str] = typer.Option(None),
    kind: str = typer.Option("auto"),
    labels: str = typer.Option("auto", help="labels (when known) only add check columns: auto | folder | none"),
    limit: Optional[int] = typer.Option(None),
    sample: int = typer.Option(5000, help="images scored (a seeded random sample)"),
    pca_dim: int = typer.Option(64, help="PCA dimensions before scoring"),
    runs: int = typer.Option(5, help="k-means runs per K (stability)"),
    cache_dir: Optional[str] = typer.Option(None),
    batch_size: int = typer.Option(64),
    precision: str = typer.Option("fp32"),
    device: str = typer.Option("auto"),
    seed: int = typer.Option(0),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="write the scores as JSON here (a run dir gets choose_k.json)"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    threads: Optional[str] = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Score a range of K without labels (silhouette, stability, eigengap) and print the curve and the pick."""
    from imgclust.threads import apply_threads

    apply_threads(threads)
    from imgclust.choosek import format_curve, parse_k_range
    from imgclust.data import open_source
    from imgclust.data.base import SubsetSource
    from imgclust.run import choose_k_scores
    from imgclust.rundir import write_json
    from imgclust.validate import check_seed, check_sizes

    check_seed(seed)
    check_sizes(image_size, batch_size)
    for name, v in (("sample", sample), ("pca dim", pca_dim), ("runs", runs)):
        if v < 1:
            raise InputError(f"{name} must be >= 1, got {v}")
    ks = parse_k_range(k_range)
    src = open_source(source, split=split, kind=kind, labels=labels)
    if limit is not None:
        if limit < 1:
            raise InputError(f"limit must be >= 1, got {limit}")
        src = SubsetSource.sample(src, limit, seed=seed)
    res = choose_k_scores(src, ks, backbone=backbone, weights=weights, image_size=image_size, cache_dir=cache_dir,
                          batch_size=batch_size, precision=precision, device=device, seed=seed, sample=sample,
                          pca_dim=pca_dim, runs=runs, progress=not quiet)
    typer.echo(format_curve(res))
    if out is not None:
        target = out / "choose_k.json" if out.is_dir() else out
        write_json(target, res)
        typer.echo(f"scores: {target}")


@app.command()
def recut(
    run_dir: Path = typer.Argument(..., help="a run directory made with `imgclust cluster --k auto` (has hierarchy.json)"),
    k: int = typer.Option(..., "--k", "-k", help="number of clusters of the new cut"),
    out: Path = typer.Option(..., "--out", "-o", help="new run directory to write"),
    report: bool = typer.Option(True, "--report/--no-report", help="write report.html (PCA map)"),
) -> None:
    """Re-cut a finished run's merge tree at another K in seconds, without re-training."""
    from imgclust.recut import recut_run

    s = recut_run(run_dir, k, out, report=report)
    typer.echo(f"re-cut {run_dir} at K={k} in {s['timings_s']['recut']:.2f} s -> {out.resolve()} "
               f"(marked K of this tree: {', '.join(map(str, s['recut']['candidates']))})")
    m = s.get("metrics")
    if m:
        typer.echo(f"ACC {m['acc']:.4f}  NMI {m['nmi']:.4f}  ARI {m['ari']:.4f}  (on {m['n_evaluated']} labelled images)")
    _echo_trust(s.get("trust"))
    rep = s.get("report")
    if rep and rep.get("error"):
        typer.echo(f"warning: the report could not be written ({rep['error']})", err=True)
    elif rep:
        typer.echo(f"report: {rep['path']}")


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="a run directory written by `imgclust cluster`"),
    dest: Path = typer.Argument(..., help="destination: a new folder (folders, imagefolder) or a file (csv, json, parquet)"),
    to: str = typer.Option("folders", "--to", help="folders | imagefolder | csv | json | parquet"),
    mode: Optional[str] = typer.Option(None, help="symlink (folders' default) | hardlink | copy (imagefolder's default)"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Export a run's clusters: one folder per cluster (links or copies), an ImageFolder tree, or a table.
    Source images are never moved or modified."""
    from imgclust.export import export_run

    s = export_run(run_dir, to, dest, mode=mode, progress=not quiet)
    how = f" ({s['mode']}: {s['linked']} linked, {s['copied']} copied, {s['written']} written from archive/arrays)" if "mode" in s else ""
    typer.echo(f"exported {s['n_images']} images in {s['n_clusters']} clusters as {s['format']} -> {s['dest']}{how}")


@app.command("export-model")
def export_model_cmd(
    run_dir: Path = typer.Argument(..., help="a run directory (or its model/) written by `imgclust cluster`"),
    dest: Path = typer.Argument(..., help="the .onnx file to write (outside the run directory)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace DEST if it exists"),
) -> None:
    """Write the run's backbone and classifier as one ONNX file (uint8 RGB images in, cluster
    probabilities out; preprocessing in its metadata). `imgclust predict model.onnx SRC` uses it."""
    from imgclust.portable import export_model

    s = export_model(run_dir, dest, overwrite=overwrite)
    typer.echo(f"exported {s['backbone']} + {s['method']} (K={s['n_clusters']}) -> {s['path']} ({s['bytes'] / 1e6:.1f} MB)")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="run directory to write"),
    cache_dir: Optional[str] = typer.Option(None, help="feature cache directory"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Cluster scikit-learn's bundled digits (1,797 images, 10 classes) with the offline
    EfficientNet-Lite0 backbone and the default method (auto), and print ACC/NMI/ARI."""
    from imgclust.config import BackboneConfig, FeatureConfig, RunConfig, SourceConfig
    from imgclust.run import cluster as run_cluster

    cfg = RunConfig(
        k=10,
        method="auto",  # issue 18: the label-free pick of kmeans and spectral-kmeans
        source=SourceConfig(path="digits"),
        backbone=BackboneConfig(name="efficientnet-lite0", image_size=DEMO_IMAGE_SIZE),
        features=FeatureConfig(cache_dir=cache_dir, pca=DEMO_PCA, pca_whiten=True),
    )
    typer.echo(
        f"demo: digits (1,797 8x8 images) -> efficientnet-lite0 @ {DEMO_IMAGE_SIZE} px -> "
        f"PCA-whitened to {DEMO_PCA} dims -> auto (k-means or spectral, chosen without labels), K=10"
    )
    summary = run_cluster(cfg, out, progress=not quiet, overwrite=True)  # the demo's own folder: replaced on purpose
    _print_summary(summary, out)


# The demo upsamples the 8x8 digits to this size: large enough for ImageNet features to be
# meaningful, small enough to finish in well under a minute on 2 cores.
DEMO_IMAGE_SIZE = 96
DEMO_PCA = 64  # whitened: ACC 0.86 on digits vs 0.70 on the raw 1280-d features


@app.command()
def predict(
    model_dir: Path = typer.Argument(..., help="a run's model/ directory (or the run directory), or a model.onnx from `imgclust export-model`"),
    source: str = typer.Argument(..., help="images to classify (same forms as for `cluster`)"),
    out: Path = typer.Option(Path("predictions.csv"), "--out", "-o", help="CSV to write"),
    split: Optional[str] = typer.Option(None),
    cache_dir: Optional[str] = typer.Option(None),
    max_pixels: Optional[int] = typer.Option(None, help="skip images with more pixels than this"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    threads: Optional[str] = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Classify new images with a fitted model."""
    from imgclust.api import ImageClusterer
    from imgclust.data import open_source
    from imgclust.rundir import write_csv

    if (model_dir / "model").is_dir() and not (model_dir / "model.json").exists():
        model_dir = model_dir / "model"
    onnx_model = model_dir.suffix.lower() == ".onnx"  # issue 19: portable model
    if onnx_model and not model_dir.is_file():
        raise InputError(f"{model_dir}: no such model file")
    if not onnx_model:
        est = ImageClusterer.load(model_dir, progress=not quiet, threads=threads,
                                  **({"cache_dir": cache_dir} if cache_dir else {}))
    if max_pixels is not None and max_pixels < 1:
        raise InputError(f"max pixels must be >= 1, got {max_pixels}")
    src = open_source(source, split=split, max_pixels=max_pixels)
    if onnx_model:
        from imgclust.portable import predict_onnx

        proba = predict_onnx(model_dir, src, progress=not quiet)
    else:
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
def refine(
    model_dir: Path = typer.Argument(..., help="a run directory (or its model/) written by `imgclust cluster`"),
    source: Optional[str] = typer.Argument(None, help="images to refine on (default: the run's own, from its run.json)"),
    method: str = typer.Option("icsr", "--method", "-m", help="refiner (registry: imgclust.refine.base): icsr"),
    out: Path = typer.Option(Path("runs/refined"), "--out", "-o", help="run directory to write"),
    option: Optional[list[str]] = typer.Option(None, "--option", help="refiner option key=value, e.g. epochs=60"),
    split: Optional[str] = typer.Option(None),
    cache_dir: Optional[str] = typer.Option(None),
    seed: Optional[int] = typer.Option(None, help="random seed (default: the base run's)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (mode=end_to_end trains on it)"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Refine a fitted model (any method) and write a new run directory whose model/ `predict` uses."""
    from imgclust.refine.base import get_refiner
    from imgclust.run import refine_model

    info = get_refiner(method)  # unknown names fail here, listing the registered refiners
    s = refine_model(model_dir, source, out, options=parse_options(option, "--option"), split=split,
                     cache_dir=cache_dir, seed=seed, device=device, progress=not quiet, refiner=info.name)
    m = s.get("metrics")
    typer.echo(f"refined {s['n_clustered']} images with {info.name} in {s['timings_s']['total']:.1f} s; "
               f"{s['changed_vs_base']} changed cluster")
    if m:
        b = m["base"]
        typer.echo(f"ACC {b['acc']:.4f} -> {m['acc']:.4f}  NMI {b['nmi']:.4f} -> {m['nmi']:.4f}  "
                   f"ARI {b['ari']:.4f} -> {m['ari']:.4f}")
    r = s.get("mean_rsr") or {}
    if r.get("after"):
        typer.echo("R_sr(p) averaged over clusters, last ranking: "
                   + "  ".join(f"{p}% {v:.3f}" for p, v in r["after"].items()))
    diag = f"{info.diagnostics}, " if info.diagnostics else ""
    typer.echo(f"outputs: {out.resolve()}  (assignments.csv, {diag}run.json{', metrics.json' if m else ''}, model/)")


@app.command()
def review(
    run_dir: Path = typer.Argument(..., help="a run directory written by `imgclust cluster`"),
    port: int = typer.Option(8765, "--port", "-p", help="port to listen on (0: a free one)"),
    host: str = typer.Option("127.0.0.1", help="address to bind; anything but loopback needs a token"),
    token: str = typer.Option("auto", help="auto (a random token unless loopback) | none | a value of >= 16 characters"),
    open_browser: bool = typer.Option(False, "--open", help="open the page in the default browser"),
    map_method: str = typer.Option("pca", "--map", help="2-D map: pca | umap | tsne | auto"),
) -> None:
    """Review a run in the browser: clusters, map, similar images, duplicates, outliers; edit and apply. (issue 21)"""
    from imgclust.review.server import free_port, serve

    serve(run_dir, host=host, port=port or free_port(host), token=token, open_browser=open_browser, map_method=map_method)


@app.command("apply-edits")
def apply_edits_cmd(
    run_dir: Path = typer.Argument(..., help="a reviewed run directory (with edits.jsonl)"),
    out: Path = typer.Option(..., "--out", "-o", help="the new run directory to write"),
    seed: Optional[int] = typer.Option(None, help="random seed (default: the run's)"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Write a new run with the edited labels and a model retrained on them (predict reflects the edits). (issue 21)"""
    from imgclust.run import apply_edits

    s = apply_edits(run_dir, out, seed=seed, progress=not quiet)
    e = s["edits"]
    typer.echo(f"applied {e['n_applied']} edit(s): {e['n_changed']} images changed cluster, {e['n_moved']} moved by hand, "
               f"{e['n_outliers_marked']} marked as outliers -> {out.resolve()} (changes.csv, model/)")


@app.command()
def pretrain(
    source: str = typer.Argument(..., help="the images to learn from: folder, archive, .npz, benchmark directory, or 'digits'"),
    method: str = typer.Option("simclr", "--method", "-m", help="simclr | mocov2 | byol | barlowtwins"),
    arch: str = typer.Option("resnet18", help="resnet18 | resnet34 | resnet50 | vit_tiny | vit_small (ResNets get the 3x3 stem up to 64 px)"),
    out: Path = typer.Option(..., "--out", "-o", help="directory to write; then use it as --backbone DIR"),
    epochs: int = typer.Option(100, help="training epochs"),
    batch_size: int = typer.Option(256, help="images per step (per process under torchrun)"),
    image_size: int = typer.Option(32, help="training (and feature) image size in pixels"),
    lr: Optional[float] = typer.Option(None, help="base learning rate at batch 256 (default: the method's)"),
    split: Optional[str] = typer.Option(None, help="train | test | all | unlabeled, or a sub-folder name"),
    limit: Optional[int] = typer.Option(None, help="train on a random subset of this many images"),
    option: Optional[list[str]] = typer.Option(None, "--option", help="more options key=value, e.g. temperature=0.2, queue_size=8192"),
    precision: str = typer.Option("auto", help="auto | fp32 | bf16 | fp16 (fp16: GPU only)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    seed: int = typer.Option(0, help="random seed"),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="continue from OUT/checkpoint.pt when it exists"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Self-supervised pre-training of a backbone on SOURCE; OUT then works as --backbone OUT."""
    from imgclust.data import open_source
    from imgclust.data.base import SubsetSource
    from imgclust.pretrain import PretrainConfig
    from imgclust.pretrain import pretrain as run_pretrain

    opts = parse_options(option, "--option")
    cfg = PretrainConfig(method=method, arch=arch, epochs=epochs, batch_size=batch_size, image_size=image_size,
                         base_lr=lr, precision=precision, seed=seed, **opts)
    src = open_source(source, split=split)
    if limit is not None:
        src = SubsetSource.sample(src, limit, seed=seed)
    summary = run_pretrain(src, out, cfg, device=device, resume=resume, progress=not quiet)
    if summary["rank"] != 0:  # under torchrun only rank 0 monitors and reports
        return
    last = summary["history"][-1]
    knn = f"  kNN acc {last['knn_acc']:.4f}" if "knn_acc" in last else ""
    speed = f"  {last['images_per_s']:.1f} img/s" if "images_per_s" in last else ""
    typer.echo(f"{summary['method']} {summary['arch']}: epoch {summary['epochs_done']}/{cfg.epochs}  "
               f"loss {last.get('loss', float('nan')):.4f}  alignment {last['alignment']:.3f}  "
               f"uniformity {last['uniformity']:.3f}{knn}{speed}")
    typer.echo(f"backbone: {Path(out).resolve()}  (use --backbone {out})")


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
        defaults = cls.Config().to_dict()  # default_factory fields (lists, dicts) resolved too
        opts = ", ".join(f"{f.name}={defaults[f.name]!r}" for f in fields(cls.Config))
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


def _end_process_group(ordered: bool) -> None:
    """Under torchrun: destroy the process group before the interpreter exits (ranks in step after a
    finished command, at once after an error). Nothing to do when torch.distributed was never loaded."""
    if "torch.distributed" in sys.modules:
        from imgclust.train import dist

        try:
            dist.shutdown(ordered=ordered)
        except Exception:  # a peer died during the closing barrier: the command's own exit code stands
            with contextlib.suppress(Exception):
                dist.shutdown(ordered=False)


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
    from imgclust.runlog import report_warnings, route_warnings

    # imgclust's own warnings: one line each ("warning: ..."); library warnings go to the
    # run's log.jsonl, with one summary line at exit
    route_warnings()
    ok = False
    try:
        rv = app(standalone_mode=False)
        ok = True
    except ImgclustError as e:
        report_warnings()
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
    finally:
        _end_process_group(ordered=ok and not _signal_seen)
    report_warnings()
    if _signal_seen:  # typer caught the KeyboardInterrupt and returned 130
        _interrupted_exit()
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
