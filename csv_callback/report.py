"""A self-contained HTML report (plus PNGs) of a fitted salience vector.

Three views: predicted vs actual score under cross-validation for each method (``fit_report["cv_pred"]``),
the weighted loss -> score curve with the fitted link, and the probe text with each token's salience as
colour, so one can read which tokens carry the capability.
"""

from __future__ import annotations

import base64
import html
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ._extras import extra_imports
from .probe import ProbeSet
from .salience import SalienceVector
from .store import LossTable

_METHOD_COLOURS = {"csv": "#c0392b", "uniform": "#2c7fb8", "label": "#41ab5d", "domain": "#8856a7"}
_GROUP_MARKERS = "osD^vP<>X*"  # with tab10's 10 colours: 100 groups, each its own (colour, marker)
# The darkest salience shade: rgba(192,57,43) at this alpha over white leaves #222 text a contrast of 4.9:1
# (WCAG AA asks 4.5:1); at full colour it would be 2.9:1.
_MAX_SHADE = 0.7


def write_report(
    sv: SalienceVector,
    out_dir: str | os.PathLike,
    probe: ProbeSet | None = None,
    table: LossTable | None = None,
    tokenizer: Any = None,
    top: int = 12,
) -> Path:
    """Write ``out_dir/index.html`` and its PNGs; returns the HTML path.

    Args:
        sv: a vector from ``fit_salience`` (its ``fit_report`` supplies the cross-validation data and each
            fitted checkpoint's group and weighted loss).
        probe: the vector's probe, for the salience text (skipped without it).
        table: losses of more checkpoints (e.g. a whole run), drawn on the link curve as predictions.
        tokenizer: decodes probe tokens; without it tokens are shown as ids. It must be the probe's tokenizer
            (:class:`ProbeMismatchError` otherwise): another one would show other text than was measured.
        top: how many probe sequences to show, most salient first.
    """
    with extra_imports("report", __name__):
        import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training server

    if probe is not None:
        sv.check_probe(probe)
        if tokenizer is not None:
            probe.check_tokenizer(tokenizer)
    if not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a positive int, got {top!r}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = sv.fit_report
    figures = []
    if "cv_pred" in rep and "scores" in rep:
        figures.append(("Predicted vs actual under cross-validation", _save(_cv_figure(rep), out / "cv.png")))
    figures.append(("Weighted loss to score: the fitted link", _save(_link_figure(sv, table), out / "link.png")))
    title = ("Weight of each validation domain" if sv.domains is not None
             else "Salience along the probe (weight relative to uniform)")
    figures.append((title, _save(_weights_figure(sv), out / "weights.png")))

    parts = [f"<h1>Salience vector: {html.escape(sv.task)} ({html.escape(sv.metric)})</h1>", _summary_html(sv)]
    for title, png in figures:
        data = base64.b64encode(png.read_bytes()).decode()
        parts.append(
            f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
        )
    if sv.domains is not None:
        pass  # a domain vector has no probe text to show
    elif probe is None:
        parts.append(_NO_PROBE)
    else:
        hint = "" if tokenizer is not None else "<p>With the CLI: csv-callback report --tokenizer DIR.</p>"
        parts.append(f"<h2>Probe text by salience</h2>{salience_html(sv, probe, tokenizer, top)}{hint}")
    index = out / "index.html"
    tmp = out / ".index.html.tmp"
    tmp.write_text(_PAGE.format(title=html.escape(f"csv-callback: {sv.task}"), body="\n".join(parts)))
    os.replace(tmp, index)
    return index


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _cv_figure(rep: dict[str, Any]):
    """One square panel per method, held-out prediction against the actual score. With groups, each group has
    its own colour and marker and one legend below the panels, in columns: the panels keep their size however
    many groups there are (36 runs of a ladder)."""
    import matplotlib.pyplot as plt

    y = np.asarray(rep["scores"])
    methods = [m for m in _METHOD_COLOURS if m in rep["cv_pred"]]
    fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 4), squeeze=False)
    lo, hi = (
        float(min(y.min(), *(min(rep["cv_pred"][m]) for m in methods))),
        float(max(y.max(), *(max(rep["cv_pred"][m]) for m in methods))),
    )
    pad = 0.05 * (hi - lo or 1.0)
    groups = rep.get("groups")
    names = sorted(set(groups)) if groups else []
    colours = plt.get_cmap("tab10").colors
    for ax, m in zip(axes[0], methods):
        pred = np.asarray(rep["cv_pred"][m])
        for i, g in enumerate(names):
            sel = np.array([x == g for x in groups])
            ax.scatter(y[sel], pred[sel], s=16, color=colours[i % len(colours)], label=str(g),
                       marker=_GROUP_MARKERS[i // len(colours) % len(_GROUP_MARKERS)], alpha=0.85, linewidths=0)
        if not names:
            ax.scatter(y, pred, s=18, color=_METHOD_COLOURS[m])
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", lw=0.8, ls="--")
        ax.set(
            xlim=(lo - pad, hi + pad),
            ylim=(lo - pad, hi + pad),
            xlabel="actual score",
            ylabel="predicted (held out)",
            title=f"{m}: MSE {rep['cv_mse'][m]:.3g}, MAE {rep['cv_mae'][m]:.3g}",
            aspect="equal",
        )
    fig.tight_layout()
    if names:
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(
            handles,
            labels,
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            ncol=min(len(names), 3 * len(methods)),
            fontsize=7,
            title=f"held-out group ({len(names)})",
            title_fontsize=8,
            frameon=False,
            handletextpad=0.2,
            columnspacing=1.0,
        )
    return fig


def _link_figure(sv: SalienceVector, table: LossTable | None):
    import matplotlib.pyplot as plt

    rep = sv.fit_report
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = []
    if "weighted_loss" in rep and "scores" in rep:
        xs += list(rep["weighted_loss"])
        ax.scatter(
            rep["weighted_loss"], rep["scores"], s=20, color="black", label="fitted checkpoints (actual)", zorder=3
        )
    if table is not None:
        wl = np.asarray(sv.weighted_loss(table.losses, table.fingerprint))
        xs += wl.tolist()
        ax.scatter(wl, sv.link(wl), s=22, facecolors="none", edgecolors=_METHOD_COLOURS["csv"],
                   label="stored checkpoints (predicted)", zorder=4)
    lo, hi = sv.loss_range
    if math.isfinite(lo) and math.isfinite(hi):
        xs += [lo, hi]
        for v in (lo, hi):
            ax.axvline(v, color="grey", lw=0.8, ls=":")
    if not xs:
        xs = [sv.link.L0 - 2 / sv.link.k, sv.link.L0 + 2 / sv.link.k]
    span = (max(xs) - min(xs)) or 1.0
    grid = np.linspace(min(xs) - 0.15 * span, max(xs) + 0.15 * span, 200)
    ax.plot(grid, sv.link(grid), color=_METHOD_COLOURS["csv"], label="fitted link")
    ax.set(xlabel="salience-weighted loss (nats)", ylabel=f"{sv.task} {sv.metric}",
           title="dotted lines: weighted-loss range seen in fitting")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _weights_figure(sv: SalienceVector):
    import matplotlib.pyplot as plt

    if sv.domains is not None:
        fig, ax = plt.subplots(figsize=(6, 0.35 * len(sv.domains) + 1.0))
        ax.barh(range(len(sv.domains)), sv.weights, color=_METHOD_COLOURS["csv"])
        ax.axvline(1.0 / len(sv.domains), color="grey", lw=0.8, ls="--", label="uniform (loss averaging)")
        ax.set_yticks(range(len(sv.domains)), sv.domains)
        ax.invert_yaxis()
        ax.set(xlabel="weight")
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig
    rel = sv.weights * sv.n_tokens
    fig, ax = plt.subplots(figsize=(8, 2.6))
    ax.plot(np.arange(sv.n_tokens), rel, lw=0.6, color=_METHOD_COLOURS["csv"])
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set(xlabel="scored token (probe order)", ylabel="weight x n_tokens")
    fig.tight_layout()
    return fig


def _summary_html(sv: SalienceVector) -> str:
    rep = sv.fit_report
    rows = [
        ("task", sv.task),
        ("metric", sv.metric),
        *([("domains", ", ".join(sv.domains))] if sv.domains is not None
          else [("probe fingerprint", sv.probe_fingerprint), ("scored tokens", sv.n_tokens)]),
        ("weighted-loss range in fitting", f"{sv.loss_range[0]:.4g} .. {sv.loss_range[1]:.4g}"),
        ("link", f"lo={sv.link.lo:.3g}, hi={sv.link.hi:.3g}, k={sv.link.k:.3g}, L0={sv.link.L0:.4g}"),
    ]
    for key, label in (("n_checkpoints", "checkpoints fitted"), ("prior", "prior the weights are shrunk towards"),
                       ("anchor", "anchor point (loss, score) of the link"), ("lam", "regularisation (lambda)"),
                       ("effective_tokens", "effective tokens (exp entropy of w)"),
                       ("best_domain", "best single domain")):
        if rep.get(key) is not None:  # an unanchored fit records anchor None: no row
            rows.append((label, f"{rep[key]:.4g}" if isinstance(rep[key], float) else rep[key]))
    out = (
        "<table>"
        + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
        + "</table>"
    )
    if "cv_mse" in rep:
        best = min(rep["cv_mse"], key=rep["cv_mse"].get)
        out += "<h2>Cross-validated error</h2><table><tr><th>method</th><th>MSE</th><th>MAE</th><th></th></tr>"
        for m, v in rep["cv_mse"].items():
            mark = "<td class='best'>best (lowest MSE)</td>" if m == best else "<td></td>"
            out += f"<tr><td>{html.escape(m)}</td><td>{v:.4g}</td><td>{rep['cv_mae'][m]:.4g}</td>{mark}</tr>"
        out += f"</table><p>Folds: {html.escape(str(rep.get('cv', '?')))}.</p>"
    return out


def salience_html(vector: SalienceVector, probe: ProbeSet, tokenizer: Any = None, top: int = 8) -> str:
    """The ``top`` probe sequences holding the most salient tokens, as an HTML fragment: the report's probe text
    and the W&B salience view.

    Sequences are ranked by their most salient token, so the vector's largest weight is always shown; each
    says what share of the vector's total weight it holds. A scored token's background shades with its weight
    relative to uniform, on a log scale: uniform or less is blank, the largest weight is the darkest shade,
    which keeps the fragment's #222 text at 4.9:1 contrast. Its tooltip gives the weight. Context tokens, not
    scored, are grey. Tokens are decoded one by one with
    ``tokenizer`` (the probe's own: another raises :class:`~csv_callback.ProbeMismatchError`), or shown as
    ``[id]`` without one. Styles are inline, as a W&B HTML panel has no stylesheet of ours.
    """
    vector.check_probe(probe)
    if tokenizer is not None:
        probe.check_tokenizer(tokenizer)
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise ValueError(f"top must be a positive int (how many probe sequences to show), got {top!r}.")
    w = vector.weights
    rel = w * vector.n_tokens
    rel_max = float(rel.max())
    # A uniform vector (up to rounding) has no token more salient than another: nothing is shaded.
    scale = math.log(rel_max) if rel_max > 1.0 + 1e-6 else math.inf
    so = probe.score_offsets.numpy()
    cum = np.concatenate([[0.0], np.cumsum(w)])
    mass = cum[so[1:]] - cum[so[:-1]]
    # Each sequence's largest weight; a sequence without scored tokens ranks last. Empty segments have no width,
    # so the starts of the others delimit exactly their own tokens.
    has_scored = np.diff(so) > 0
    peak = np.full(probe.num_sequences, -1.0)
    peak[has_scored] = np.maximum.reduceat(w, so[:-1][has_scored])
    order = np.lexsort((-mass, -peak))[:top]  # by peak weight, then by share
    blocks = []
    for i in order.tolist():
        ids, scored = probe.sequence(i)
        k = int(so[i])
        spans = []
        for tid, is_scored in zip(ids.tolist(), scored.tolist()):
            text = html.escape(tokenizer.decode([tid]) if tokenizer is not None else f"[{tid}]")
            if not is_scored:
                spans.append(f'<span style="color:#999">{text}</span>')
                continue
            r = float(rel[k])
            alpha = _MAX_SHADE * min(1.0, math.log(r) / scale) if r > 1.0 else 0.0
            spans.append(f'<span style="background:rgba(192,57,43,{alpha:.2f})" title="w={w[k]:.4g}">'
                         f"{text}</span>")
            k += 1
        blocks.append(f'<div style="border-top:1px solid #eee"><div style="font-size:12px;color:#666">sequence {i}: '
                      f"{mass[i]:.1%} of the salience</div>"
                      f'<pre style="white-space:pre-wrap;font-size:13px;line-height:1.5">{"".join(spans)}</pre></div>')
    ids_only = "" if tokenizer is not None else " Tokens are shown as [ids]: pass the probe's tokenizer to show text."
    return (f'<div style="color:#222"><p><b>{html.escape(vector.task)}</b>: the {len(order)} of '
            f"{probe.num_sequences} probe sequences with the most salient tokens ({vector.n_tokens} scored tokens; "
            f"these hold {mass[order].sum():.1%} of the weight). Shade: weight relative to uniform (log scale, darkest "
            f"= {rel_max:.3g}x uniform); grey text is context that is not scored.{ids_only}</p>"
            + "".join(blocks) + "</div>")


_NO_PROBE = ("<h2>Probe text by salience</h2><p>Not shown: this report was written without the vector's probe, "
             "which holds the text. Pass it (csv-callback report --probe probe.safetensors, or --losses STORE to use "
             "the store's probe; write_report(probe=...) in Python).</p>")


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
img {{ max-width: 100%; }} .best {{ font-weight: bold; }}
</style></head>
<body>
{body}
</body></html>
"""
