"""imgclust: unsupervised image classification (deep image clustering).

Images in (a folder, an archive, arrays, benchmark sets), K groups out, plus a model that
classifies new images. See :class:`imgclust.ImageClusterer`.
"""

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: `import imgclust` stays fast for the CLI's --help
    if name == "ImageClusterer":
        from imgclust import api

        return api.ImageClusterer
    if name == "cluster":  # the run-directory job (issue 17: imgclust.run)
        from imgclust import run

        return run.cluster
    if name in ("RunConfig", "load_config"):
        from imgclust import config

        return getattr(config, name)
    raise AttributeError(name)


__all__ = ["ImageClusterer", "RunConfig", "cluster", "load_config", "__version__"]
