"""Report section for the label-free choice of method (``--method auto``, issue 18)."""

from __future__ import annotations

import html
from typing import Any


def selection_section(run: dict[str, Any]) -> str:
    """Every candidate's label-free scores (and ACC/NMI when labels exist); '' when no choice was made."""
    sel = (run.get("method_history") or {}).get("selection")
    if not isinstance(sel, dict) or not sel.get("candidates"):
        return ""
    e = lambda x: html.escape(str(x), quote=True)  # noqa: E731
    cands = sel["candidates"]
    has_acc = any("acc" in c for c in cands)
    head = ("<tr><th>candidate</th><th>generalization</th><th>kNN</th><th>ANMI</th><th>balanced</th><th>s</th>"
            + ("<th>ACC</th><th>NMI</th>" if has_acc else "") + "</tr>")

    def f(v: Any) -> str:
        return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else e(v))

    trs = []
    for c in cands:
        cls = ' class="pick"' if c["name"] == sel.get("chosen") else ""
        tds = "".join(f"<td>{f(c.get(k))}</td>" for k in ("generalization", "knn", "anmi", "balanced", "seconds"))
        if has_acc:
            tds += f"<td>{f(c.get('acc'))}</td><td>{f(c.get('nmi'))}</td>"
        trs.append(f"<tr{cls}><td>{e(c['name'])}</td>{tds}</tr>")
    rho = sel.get("spearman_vs_acc")
    trust = "" if not has_acc else (
        f" With the labels, the Spearman correlation between the criterion and ACC over the candidates is {rho:.2f}."
        if rho is not None else " (Too few candidates for a rank correlation with ACC.)")
    return (f'<section id="selection"><h2>Choice of method: {e(sel.get("chosen"))}</h2>'
            f'<p>Chosen without labels by the <b>{e(sel.get("criterion"))}</b> criterion (imgclust.select: held-out, '
            f'chance-corrected agreement of a linear classifier (generalization) or of the 10 nearest neighbours (kNN) '
            f'with each candidate\'s clusters; balanced = their mean).{e(trust)}</p>'
            f'<table class="num">{head}{"".join(trs)}</table></section>')
