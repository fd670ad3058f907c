"""The local review app (``imgclust review RUN``) and applying its edits (``imgclust apply-edits``).

* :mod:`imgclust.review.server` — the Starlette app, its pages and its security rules.
* :mod:`imgclust.review.state` — what the app holds for one run (labels after the edits, thumbnails, faiss).
* :mod:`imgclust.review.apply` — writes the reviewed run and retrains its model.
"""
