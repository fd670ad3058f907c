"""Notices about a source that is probably not what the user meant (issue 24).

An archive or folder holding ``train/`` and ``test/`` read without ``--split`` clusters both
splits together (CIFAR-10's JPEG tar: 60,000 images, not the 10,000 of the test split) —
allowed, but said, with the flag that picks one.
"""

from __future__ import annotations

from imgclust.data.base import ImageSource
from imgclust.data.folder import SPLIT_NAMES


def mixed_splits_note(source: ImageSource, split: str | None) -> str | None:
    """A one-line notice when ``source`` (read with ``split``) spans several split folders."""
    if split not in (None, "all"):
        return None
    tops: dict[str, int] = {}
    for i in source.ids():
        head, sep, _ = i.partition("/")
        if sep:
            tops[head] = tops.get(head, 0) + 1
    splits = sorted(t for t in tops if t.lower() in SPLIT_NAMES)
    if len(splits) < 2:
        return None
    counts = ", ".join(f"{t}/ {tops[t]:,}" for t in splits)
    what = "all of them together" if split is None else "all of them (--split all)"
    return (f"{source.name} holds several splits ({counts} images); clustering {what}. "
            f"Give --split {' or --split '.join(splits)} to use one")


def small_images_note(source: ImageSource, backbone: str, size: int, image_size_given: bool,
                      sample: int = 8) -> str | None:
    """A notice when a backbone upsamples much smaller images to its default input size.

    MNIST's 28x28 digits through EfficientNet-Lite0 at its default 224 px cost 64x the pixels
    of the images; the demo runs the 8x8 digits at 96 px (ACC 0.86 with PCA-whitening).
    Only when the size was not chosen (``image_size_given``), the backbone is not raw pixels,
    and the first ``sample`` readable images are all at most a quarter of ``size`` on each side.
    """
    if image_size_given or backbone.startswith("pixels") or len(source) == 0:
        return None
    sides = []
    for i in range(min(sample, len(source))):
        try:
            img = source.read(i)
        except Exception:  # noqa: BLE001 - unreadable images are reported by the run itself
            continue
        sides.append(max(img.shape[:2]))
    if not sides or max(sides) * 4 > size:
        return None
    side = max(sides)
    suggest = max(32, min(size // 2, 96))
    return (f"the images are small ({side}x{side} px or less) and {backbone} upsamples them to {size} px "
            f"({(size / side) ** 2:.0f}x the pixels); --image-size {suggest} is several times faster and often as good")


__all__ = ["mixed_splits_note", "small_images_note"]
