"""Training losses as pure, typed functions of tensors — one module per paper.

* :mod:`imgclust.losses.temi` — TEMI's teacher-weighted beta-PMI (Adaloglou et al., BMVC 2023)
  and ICCE's Sinkhorn-Knopp centring and pseudo-label cross-entropy.
* :mod:`imgclust.losses.spice` — SPICE-Self's double-softmax CE and prototype pseudo-labels
  (Niu et al., IEEE TIP 2022).
* :mod:`imgclust.losses.icbpl` — ICBPL's four losses around the PEDCC points (Hu et al.).

Nothing here holds state or imports a method: a method's step function calls these, the
training loop (:mod:`imgclust.train.loop`) does the rest. Statistics that span the batch go
through :mod:`imgclust.train.dist`, so one process behaves exactly as before.
"""
