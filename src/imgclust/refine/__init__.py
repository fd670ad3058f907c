"""Refiners: stages that improve a fitted clustering.

* :mod:`imgclust.refine.selftrain` — a linear classifier on frozen features trained on
  (consensus) pseudo-labels, learning rate chosen on held-out pseudo-labels (ICCE stage 3).
* :mod:`imgclust.refine.fixmatch` — local-consistency selection of reliable labels and
  FixMatch training on them (SPICE-Semi), for a head on frozen features or end to end.
* :mod:`imgclust.refine.ranking` and :mod:`imgclust.refine.icsr` — ICSR: rank samples inside
  every cluster by neighbourhood density, then weighted self-training; refines any fitted
  model (``imgclust refine MODEL_DIR --method icsr``).
"""
