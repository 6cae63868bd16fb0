"""The static site: Jinja2 templates rendered into a folder any browser opens offline.

``index.html`` (the dictionary at a glance and the features with a page), one small page per
chosen feature under ``features/``, ``compare.html`` with a second dictionary, and the table
of every feature as ``data/features.js`` (a script, so it loads from ``file://`` without a
server, and only the index reads it). The site is written into a staging folder beside
``out`` and moved into place at the end: a reader sees the old site or the new one. A folder
that is not a site this command wrote is never replaced."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jinja2
import torch

from sae_e2e_plugin.features import views
from sae_e2e_plugin.features.build import Inspection
from sae_e2e_plugin.run_files import atomic_write_text
from sae_e2e_plugin.version import __version__

MARKER = ".sae-e2e-inspect.json"
"""The file that marks a folder as a site written by ``sae-e2e inspect``."""
_TEMPLATES = Path(__file__).parent / "templates"
KEY_METRICS = (
    "ce_loss_increase",
    "ce_loss_score",
    "kl_orig_patched",
    "l0",
    "alive_fraction",
    "explained_variance",
)
"""The evaluation's numbers shown first on the index; the rest fold away."""


def check_out_folder(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that holds anything but an earlier site, or one without ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={str(out)!r} is a file; choose a folder for the site.")
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / MARKER).is_file():
        raise ValueError(
            f"out={str(out)!r} is a folder with other files in it (no {MARKER}): the site is "
            "written only into a new or empty folder, or over a site written before. Choose "
            "another folder."
        )
    if not overwrite:
        raise ValueError(
            f"out={str(out)!r} already holds a site; pass overwrite=True (--overwrite) to "
            "replace it, or choose another folder."
        )


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.globals["scaled"] = lambda x, log: torch.tensor(float(x)).log1p().item() if log else x
    return env


def write_site(
    inspection: Inspection,
    out: Path,
    *,
    tokenizer: Any,
    facts: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the site for ``inspection`` into ``out``; ``facts``: name, model_name, hook_name,
    select, compare_name, no_match_below."""
    out = Path(out)
    check_out_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        _render_into(staging, inspection, tokenizer, facts, metrics)
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _swap_in(staging: Path, out: Path) -> None:
    _readable(staging)
    if out.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        out.rename(retired / "site")
        staging.rename(out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(out)


def _readable(folder: Path) -> None:
    """The modes a plain ``mkdir``/``open`` would give (the staging folder and the atomic
    writes' temporary files are private to the user), so the site can be served and shared."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _render_into(
    folder: Path,
    inspection: Inspection,
    tokenizer: Any,
    facts: dict[str, Any],
    metrics: dict[str, Any] | None,
) -> None:
    env = _environment()
    text = views.token_texts(tokenizer)
    stats = inspection.stats
    compare = views.comparison(
        inspection, facts.get("no_match_below", 0.7), facts.get("compare_name", "")
    )
    common = {
        "version": __version__,
        "name": facts["name"],
        "n_tokens": stats.n_tokens,
        "has_compare": compare is not None,
        "compare_name": facts.get("compare_name", ""),
        "logits_note": "no logit table: the decoder does not write the residual stream the "
        "unembedding reads",
    }
    selected = inspection.selected
    for i, feature in enumerate(selected):
        neighbours = (
            selected[i - 1] if i > 0 else None,
            selected[i + 1] if i + 1 < len(selected) else None,
        )
        page = views.feature_page(inspection, feature, neighbours, text)
        html = env.get_template("feature.html.j2").render(common, root="../", f=page)
        atomic_write_text(folder / "features" / f"{feature}.html", html)
    index = _index_context(inspection, text, facts, metrics, compare)
    atomic_write_text(
        folder / "index.html",
        env.get_template("index.html.j2").render({**common, **index}, root=""),
    )
    if compare is not None:
        html = env.get_template("compare.html.j2").render(
            common, root="", compare=compare, d_sae=stats.d_sae
        )
        atomic_write_text(folder / "compare.html", html)
    atomic_write_text(folder / "data" / "features.js", _table_script(inspection, text))
    for name in ("style.css", "table.js"):
        atomic_write_text(folder / "assets" / name, (_TEMPLATES / name).read_text())
    marker = {"version": __version__, "features_with_pages": len(selected), **facts}
    atomic_write_text(folder / MARKER, json.dumps(marker, indent=2, default=str))


def _index_context(
    inspection: Inspection,
    text: views.TokenText,
    facts: dict[str, Any],
    metrics: dict[str, Any] | None,
    compare: dict[str, Any] | None,
) -> dict[str, Any]:
    stats = inspection.stats
    freq = stats.frequency
    matches = inspection.matches
    shown_tokens = views.top_tokens(stats, inspection.tokens, text)
    rows = [
        {
            "id": f,
            "freq": float(freq[f]),
            "max": float(stats.act_max[f]),
            "ablation": inspection.ablation.get(f),
            "cosine": float(matches.cosine[f]) if matches is not None else None,
            "top_tokens": shown_tokens[f],
        }
        for f in inspection.selected
    ]
    return {
        "model_name": facts.get("model_name", ""),
        "hook_name": facts.get("hook_name", ""),
        "select": facts.get("select", ""),
        "d_sae": stats.d_sae,
        "mean_l0": stats.mean_l0,
        "dead": int((stats.fired == 0).sum()),
        "dense": int((freq > views.DENSE_ABOVE).sum()),
        "dense_above": views.DENSE_ABOVE,
        "metrics": _scalar_metrics(metrics),
        "key_metrics": KEY_METRICS,
        "freq_hist": views.frequency_histogram(freq),
        "l0_hist": views.l0_histogram(stats.l0_counts),
        "compare": compare,
        "rows": rows,
    }


def _scalar_metrics(metrics: dict[str, Any] | None) -> list[tuple[str, Any]]:
    if not metrics:
        return []
    return [(k, v) for k, v in metrics.items() if isinstance(v, (int, float, str, bool))]


def _table_script(inspection: Inspection, text: views.TokenText) -> str:
    """``data/features.js``: one row per feature [id, frequency, max, mean when firing, top
    tokens, match cosine, has a page]."""
    stats = inspection.stats
    freq = stats.frequency.tolist()
    peak = stats.act_max.tolist()
    fired = stats.fired.tolist()
    sums = stats.act_sum.tolist()
    cosine = inspection.matches.cosine.tolist() if inspection.matches is not None else None
    pages = set(inspection.selected)
    shown_tokens = views.top_tokens(stats, inspection.tokens, text)
    rows = [
        [
            f,
            round(freq[f], 8),
            round(peak[f], 5),
            round(sums[f] / fired[f], 5) if fired[f] else 0.0,
            shown_tokens[f],
            round(cosine[f], 4) if cosine is not None else None,
            int(f in pages),
        ]
        for f in range(stats.d_sae)
    ]
    payload = {"has_match": cosine is not None, "rows": rows}
    # "</" escaped so a token's text can never close the script element.
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    return f"window.SAE_FEATURES = {body};\n"
