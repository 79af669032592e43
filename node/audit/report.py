"""The audit's self-contained HTML report for the site's data-protection officer: pass/fail
table against the policy, ROC curves, histograms of distances train vs holdout, and the closest
synthetic / real pairs. Plots are inline SVG, images inline base64 PNG: the file opens offline.

It shows real patient images, so it stays at the site (reports/, never in a bundle).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image

from common.fileio import atomic_write_text
from node.site.status import control_message

_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "&ndash;"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return html.escape(str(x))


def _ci(lo_hi) -> str:
    if not lo_hi or lo_hi[0] is None:
        return ""
    return f" <span class=ci>[{lo_hi[0]:.3g}, {lo_hi[1]:.3g}]</span>"


def svg_roc(curves: dict[str, dict], *, size: int = 300) -> str:
    """ROC curves {label: {"fpr": [...], "tpr": [...]}} on one square plot, with the chance diagonal."""
    m = 35
    w = size - m - 10
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size + 150}" height="{size}" font-size="11">',
        f'<rect x="{m}" y="10" width="{w}" height="{w}" fill="none" stroke="#444"/>',
        f'<line x1="{m}" y1="{10 + w}" x2="{m + w}" y2="10" stroke="#aaa" stroke-dasharray="4"/>',
        f'<text x="{m + w / 2}" y="{size - 5}" text-anchor="middle">false-positive rate</text>',
        f'<text x="10" y="{10 + w / 2}" transform="rotate(-90 10 {10 + w / 2})" text-anchor="middle">'
        "true-positive rate</text>",
    ]
    for i, (label, c) in enumerate(curves.items()):
        if not c.get("fpr"):
            continue
        pts = " ".join(f"{m + f * w:.1f},{10 + (1 - t) * w:.1f}" for f, t in zip(c["fpr"], c["tpr"]))
        col = _COLOURS[i % len(_COLOURS)]
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{col}" stroke-width="1.5"/>')
        parts.append(f'<text x="{m + w + 8}" y="{20 + 14 * i}" fill="{col}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_hist(series: dict[str, np.ndarray], *, title: str, bins: int = 30, width: int = 420, height: int = 180) -> str:
    """Overlaid histograms (densities) of several 1-D arrays on a shared axis."""
    vals = [np.asarray(v, dtype=np.float64) for v in series.values() if len(v)]
    if not vals:
        return ""
    lo, hi = min(v.min() for v in vals), max(v.max() for v in vals)
    hi = hi if hi > lo else lo + 1e-9
    edges = np.linspace(lo, hi, bins + 1)
    hists = {k: np.histogram(v, edges, density=True)[0] for k, v in series.items() if len(v)}
    top = max(h.max() for h in hists.values()) or 1.0
    m, pw, ph = 30, width - 40, height - 40
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">',
        f'<text x="{m}" y="12">{html.escape(title)}</text>',
        f'<line x1="{m}" y1="{20 + ph}" x2="{m + pw}" y2="{20 + ph}" stroke="#444"/>',
        f'<text x="{m}" y="{height - 5}">{lo:.3g}</text>'
        f'<text x="{m + pw}" y="{height - 5}" text-anchor="end">{hi:.3g}</text>',
    ]
    bw = pw / bins
    for i, (label, h) in enumerate(hists.items()):
        col = _COLOURS[i % len(_COLOURS)]
        for j, v in enumerate(h):
            bh = v / top * ph
            parts.append(
                f'<rect x="{m + j * bw:.1f}" y="{20 + ph - bh:.1f}" width="{bw:.1f}" height="{bh:.1f}" '
                f'fill="{col}" fill-opacity="0.45"/>'
            )
        parts.append(
            f'<text x="{m + pw}" y="{14 + 13 * (i + 1)}" text-anchor="end" fill="{col}">{html.escape(label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def png_data_uri(img: np.ndarray, *, scale: int = 3) -> str:
    """uint8 grey [H,W] -> data:image/png;base64 URI, upscaled (nearest) for legibility."""
    im = Image.fromarray(np.ascontiguousarray(img), mode="L")
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _gate_rows(report: dict) -> str:
    rows = []
    for c in report.get("checks", []):
        ok = c["passed"]
        rows.append(
            f"<tr class={'ok' if ok else 'bad'}><td>{html.escape(c['name'])}</td><td>{_fmt(c['value'], 4)}</td>"
            f"<td>{c['kind']} {_fmt(c['threshold'], 4)}</td><td>{'pass' if ok else 'FAIL'}</td>"
            f"<td>{html.escape(c.get('message') or '')}</td></tr>"
        )
    return "".join(rows)


def _attack_rows(report: dict) -> str:
    att_rows = [(f"black-box nearest neighbour ({space})", m) for space, m in (report.get("membership") or {}).items()]
    for name, a in (report.get("attacks") or {}).items():
        label = {
            "density_ratio": "density ratio, DOMIAS (attacker embedding)",
            "downstream_loss": "downstream classifier, loss threshold",
            "discriminator": "GAN discriminator, LOGAN (white-box, not gated)",
        }.get(name, name)
        att_rows.append((label, a))
    return "".join(
        f"<tr><td>{html.escape(lbl)}</td><td>{_fmt(m.get('auc'))}{_ci(m.get('auc_ci'))}"
        f"{' (degenerate: all scores equal)' if m.get('degenerate') else ''}</td>"
        f"<td>{_fmt(m.get('tpr_at_1pct_fpr'))}{_ci(m.get('tpr_at_1pct_fpr_ci'))}</td>"
        f"<td>{_fmt(m.get('tpr_at_0.1pct_fpr'))}{_ci(m.get('tpr_at_0.1pct_fpr_ci'))}</td></tr>"
        for lbl, m in att_rows
    )


def _nearest_rows(report: dict) -> str:
    return "".join(
        f"<tr><td>{html.escape(space)}</td><td>{_fmt(n.get('closer_to_train'))}{_ci(n.get('closer_to_train_ci'))}</td>"
        f"<td>{_fmt(n.get('mean_min_train'))}{_ci(n.get('mean_min_train_ci'))}</td><td>{_fmt(n.get('min_train'))}</td>"
        f"<td>{_fmt(n.get('mean_min_holdout'))}</td></tr>"
        for space, n in (report.get("nearest_record") or {}).items()
    )


def _reid_rows(report: dict) -> str:
    return "".join(
        f"<tr><td>{html.escape(k)}</td><td>{_fmt(r.get('rate'))}{_ci(r.get('rate_ci'))}</td>"
        f"<td>{_fmt(r.get('threshold'))}</td></tr>"
        for k, r in (report.get("reid") or {}).items()
    )


def _distance_figures(details: dict, images: tuple[np.ndarray, np.ndarray] | None) -> tuple[str, str]:
    """(the distance histograms of every space, the closest-pairs section; "" without images)."""
    hists, grids = [], []
    for space, d in details.items():
        if not isinstance(d, dict) or "d_s_train" not in d:
            continue
        hists.append(
            svg_hist(
                {"synthetic -> nearest train": d["d_s_train"], "synthetic -> nearest holdout": d["d_s_holdout"]},
                title=f"{space}: distance of each released sample to its nearest record",
            )
        )
        hists.append(
            svg_hist(
                {"train (members)": -d["member_scores"], "holdout (non-members)": -d["nonmember_scores"]},
                title=f"{space}: distance of each real record to its nearest released sample",
            )
        )
        if images is not None:
            candidates, train = images
            cells = "".join(
                f"<figure><img src='{png_data_uri(candidates[s])}'><img src='{png_data_uri(train[t])}'>"
                f"<figcaption>d={dist:.3g}</figcaption></figure>"
                for s, t, dist in d["closest"]
            )
            grids.append(f"<h3>{html.escape(space)}</h3><div class=grid>{cells}</div>")
    if not grids:
        return "".join(hists), ""
    closest = (
        "<h2>Closest released / train pairs</h2>"
        "<p>Each pair: released sample (left), its nearest train image (right).</p>" + "".join(grids)
    )
    return "".join(hists), closest


def _attempt(report: dict) -> str:
    att = report.get("attempt") or {}
    if not att:
        return ""
    return (
        f"<p>Attempt {att.get('number')} on this training data; {att.get('failed_before')} earlier attempt(s) "
        f"failed (policy allows {att.get('max_attempts')} before a new seed and a note are needed); "
        f"synthesis seed {att.get('seed')}"
        + (f"; note: {html.escape(str(att['note']))}" if att.get("note") else "")
        + ".</p>"
    )


def _filter_section(report: dict) -> str:
    cal = report.get("calibration") or {}
    drop = report.get("dropped") or {}
    filt_rows = "".join(
        f"<tr><td>copy ({html.escape(k)})</td><td>{n}</td><td>{_fmt((cal.get('copy_thresholds') or {}).get(k), 4)}</td>"
        f"<td>{(cal.get('copy_calibration_flagged') or {}).get(k)} of {cal.get('n_calibration')}</td></tr>"
        for k, n in (drop.get("copy") or {}).items()
    )
    # a backslash at the end of a line inside these templates joins it to the next: no newline in the HTML
    return f"""<h2>Per-sample filter</h2><p>{report.get("n_distinct")} distinct of \
{report.get("n_candidates")} candidates
({drop.get("duplicate")} duplicates removed); \
{report.get("n_accepted")} accepted from {report.get("n_paths")} paths. Thresholds come
from the holdout's calibration half ({cal.get("n_calibration")} images, \
{cal.get("patients_calibration")} patients); the set-level figures
below are measured on its evaluation half ({cal.get("n_evaluation")} images). Copy distances are minimised over
{cal.get("copy_family")} shifts, flips, rotations and zooms; \
a calibration image flagged is a real non-member as close to a train
image as a copy (near-duplicates across patients in the data).</p>
<table><tr><th>reason</th><th>dropped</th><th>threshold</th><th>calibration images flagged</th></tr>{filt_rows}
<tr><td>pixel MSE below policy.min_pixel_distance</td><td>{drop.get("too_close")}</td><td></td><td></td></tr>
<tr><td>re-identified by phi_id</td><td>{drop.get("reidentified")}</td>\
<td>{_fmt(cal.get("reid_threshold_phi_id"), 4)}</td><td></td></tr>
<tr><td>re-identified by the attacker</td><td>{drop.get("reidentified_attacker")}</td>\
<td>{_fmt(cal.get("reid_threshold_attacker"), 4)}</td><td></td></tr>
</table>"""


def render(report: dict, details: dict, *, images: tuple[np.ndarray, np.ndarray] | None) -> str:
    """The report as one HTML string. `images`: (candidates uint8 [S,H,W], train [N,H,W]) for the
    closest-pair grids; None for embeddings, which have no picture."""
    passed = report.get("passed")
    curves = {f"bb {k}": m.get("roc", {}) for k, m in (report.get("membership") or {}).items()}
    curves.update({k: a.get("roc", {}) for k, a in (report.get("attacks") or {}).items()})
    hists, closest = _distance_figures(details, images)
    control = control_message(report)
    control_html = f"<p class=warn>{html.escape(control)}</p>\n" if control else ""
    lp = report.get("lpips") or {}
    lp_note = (
        ""
        if lp.get("available", True)
        else f"<p class=warn>LPIPS not computed: {html.escape(str(lp.get('reason')))}</p>"
    )
    return f"""<!doctype html><html><head><meta charset="utf-8">\
<title>Privacy audit {html.escape(str(report.get("run_id")))}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}} tr.ok td:nth-child(4){{color:#080}} \
tr.bad td{{background:#fdd}}
.ci{{color:#666;font-size:90%}} .grid{{display:flex;flex-wrap:wrap;gap:10px}} figure{{margin:0;text-align:center}}
figure img{{display:inline-block;margin:1px}} \
.verdict{{font-size:140%;font-weight:bold;color:{"#080" if passed else "#b00"}}} \
.warn{{color:#a60}}</style></head><body>
<h1>Privacy audit of synthetic run {html.escape(str(report.get("run_id")))}</h1>
<p class=verdict>{"PASSED: the accepted set may be published" if passed else "FAILED: nothing is published"}</p>
{control_html}<p>{report.get("n_accepted")} of {report.get("n_candidates")} candidates accepted \
(dropped: {html.escape(str(report.get("dropped")))});
train {report.get("n_train")} records, holdout evaluation half {report.get("n_holdout_evaluation")} records. \
95% bootstrap intervals in
brackets ({html.escape(str((report.get("bootstrap") or {}).get("unit")))}); \
the gate judges each estimate at its unfavourable end.
This report shows real patient images: it must stay at the site.</p>
{_attempt(report)}{lp_note}
<h2>Release gate</h2><table><tr><th>check</th><th>value</th><th>policy</th><th></th><th>by how much</th></tr>\
{_gate_rows(report)}</table>
{_filter_section(report)}
<h2>Membership attacks on the released set</h2><p>AUC 0.5 is ideal (the attacker guesses).</p>
<table><tr><th>attack</th><th>AUC</th><th>TPR at 1% FPR</th><th>TPR at 0.1% FPR</th></tr>{_attack_rows(report)}</table>
{svg_roc(curves)}
<h2>Nearest records</h2><p>Share of released samples nearer a train than a holdout record (0.5 is ideal), \
mean and smallest distance to train.</p>
<table><tr><th>space</th><th>closer to train</th><th>mean min to train</th><th>min to train</th>\
<th>mean min to holdout</th></tr>{_nearest_rows(report)}</table>
{hists}
<h2>Re-identification</h2><p>Share of released samples whose top identity probability exceeds the 95th percentile \
on holdout images (0.05 is what unrelated images score).</p>
<table><tr><th>network</th><th>re-id rate</th><th>threshold</th></tr>{_reid_rows(report)}</table>
{closest}
</body></html>"""


def write_report(path: Path, report: dict, details: dict, *, images: tuple[np.ndarray, np.ndarray] | None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, render(report, details, images=images))
    return path
