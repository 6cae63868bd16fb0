"""The site ``inspect_sae`` writes: every page parses with a strict HTML5 parser, every link
and script resolves, and the numbers shown equal those computed independently from the SAE on
the same tokens; the output folder is never another folder's files mixed in."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import html5lib
import pytest
from conftest import tiny_model
from features_common import (
    D_SAE,
    all_feature_acts,
    brute_logits,
    brute_nearest,
    hand_ablation_kl,
    random_sae,
    tokens,
)
from sae_lens import StandardSAE, StandardSAEConfig

from sae_e2e_plugin.cli.commands import main
from sae_e2e_plugin.features.dashboard import inspect_sae
from sae_e2e_plugin.features.options import InspectOptions
from sae_e2e_plugin.features.site import MARKER

NS = {"h": "http://www.w3.org/1999/xhtml"}
OPTIONS = InspectOptions(n_features=6, top_k=4, n_samples=8, ablation_contexts=2, logit_k=5)


class Tokenizer:
    """Token texts with markup in them: they must reach the page as text, never as tags."""

    def decode(self, ids: list[int]) -> str:
        return "</script><b>x" if ids == [1] else f"tok{ids[0]}&"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    model, a, b, toks = tiny_model(), random_sae(0), random_sae(1, d_sae=30), tokens()
    out = tmp_path_factory.mktemp("sites") / "site"
    inspect_sae(
        a,
        model,
        toks,
        out,
        compare=b,
        options=OPTIONS,
        name="A",
        compare_name="B",
        tokenizer=Tokenizer(),
        metrics={"ce_loss_increase": 0.125, "n_tokens": 40, "downstream": {"nested": 1}},
    )
    return {"out": out, "model": model, "a": a, "b": b, "tokens": toks}


def parse(path: Path) -> Any:
    # strict=True: any HTML5 parse error (a stray tag, a bad attribute) raises.
    return html5lib.HTMLParser(strict=True, namespaceHTMLElements=True).parse(path.read_bytes())


def pages(out: Path) -> list[Path]:
    return sorted(out.rglob("*.html"))


def test_every_page_parses_and_every_link_resolves(site: dict[str, Any]) -> None:
    out = site["out"]
    assert {p.name for p in out.glob("*.html")} == {"index.html", "compare.html"}
    assert len(list((out / "features").glob("*.html"))) == OPTIONS.n_features
    for page in pages(out):
        tree = parse(page)
        targets = [e.get("href") for e in tree.iterfind(".//h:a", NS)]
        targets += [e.get("href") for e in tree.iterfind(".//h:link", NS)]
        targets += [e.get("src") for e in tree.iterfind(".//h:script", NS)]
        assert targets
        for target in targets:
            parts = urlsplit(target)
            assert not parts.scheme and not parts.netloc, f"{page}: {target} leaves the site"
            assert (page.parent / parts.path).resolve().is_file(), f"{page}: {target}"


def test_token_text_is_escaped(site: dict[str, Any]) -> None:
    out = site["out"]
    for page in pages(out):
        assert not list(parse(page).iterfind(".//h:b", NS)), page
    script = (out / "data" / "features.js").read_text()
    assert "</script>" not in script


def feature_ids(out: Path) -> list[int]:
    return sorted(int(p.stem) for p in (out / "features").glob("*.html"))


def by_id(tree: Any, element_id: str) -> Any:
    found = [e for e in tree.iter() if e.get("id") == element_id]
    assert len(found) == 1, element_id
    return found[0]


def value(tree: Any, element_id: str) -> float:
    return float(by_id(tree, element_id).get("data-value"))


def test_feature_pages_show_brute_force_numbers(site: dict[str, Any]) -> None:
    out, model, a, toks = site["out"], site["model"], site["a"], site["tokens"]
    acts = all_feature_acts(model, a, toks)
    logits = brute_logits(model, a)
    for f in feature_ids(out):
        tree = parse(out / "features" / f"{f}.html")
        assert value(tree, "frequency") == pytest.approx(float((acts[:, f] > 0).double().mean()))
        assert value(tree, "max-act") == pytest.approx(float(acts[:, f].max()), abs=1e-5)
        top = sorted(acts[:, f][acts[:, f] > 0].tolist(), reverse=True)[: OPTIONS.top_k]
        shown = by_id(tree, "top-contexts").iterfind(".//h:div[@class='ctx']", NS)
        contexts = list(shown)
        assert [float(c.get("data-act")) for c in contexts] == pytest.approx(top, abs=1e-5)
        for context in contexts:  # the outlined token is the example token, with its value
            token = int(context.get("data-token"))
            center = [s for s in context.iter() if "c" in (s.get("class") or "").split()]
            assert len(center) == 1
            assert float(center[0].get("data-act")) == pytest.approx(
                float(acts[token, f]), abs=1e-5
            )
            expected = Tokenizer().decode([int(toks.view(-1)[token])])
            assert center[0].text == expected
        raised = [
            (int(td.get("data-id")), float(td.get("data-value")))
            for td in by_id(tree, "raised").iterfind(".//h:td[@data-id]", NS)
        ]
        best = logits[f].topk(OPTIONS.logit_k)
        assert [i for i, _ in raised] == best.indices.tolist()
        assert [v for _, v in raised] == pytest.approx(best.values.tolist(), abs=1e-5)
        hand = [hand_ablation_kl(model, a, toks, f, int(c.get("data-token"))) for c in contexts[:2]]
        assert value(tree, "ablation") == pytest.approx(sum(hand) / len(hand), rel=1e-3, abs=1e-7)


def test_comparison_shows_the_cosine_argmax(site: dict[str, Any]) -> None:
    out, a, b = site["out"], site["a"], site["b"]
    index, best = brute_nearest(a, b)
    for f in feature_ids(out):
        match = by_id(parse(out / "features" / f"{f}.html"), "match-cosine")
        assert int(match.get("data-feature")) == int(index[f])
        assert float(match.get("data-value")) == pytest.approx(float(best[f]), abs=1e-6)
    tree = parse(out / "compare.html")
    assert float(by_id(tree, "median").get("data-value")) == pytest.approx(float(best.median()))
    below = sorted(float(c) for c in best if c < OPTIONS.no_match_below)
    assert int(by_id(tree, "no-match-count").get("data-value")) == len(below)
    listed = [float(td.get("data-value")) for td in tree.iterfind(".//h:tbody/h:tr/h:td[3]", NS)]
    assert listed == pytest.approx(below, abs=1e-6)


def test_index_and_feature_table_show_every_feature(site: dict[str, Any]) -> None:
    out, model, a, toks = site["out"], site["model"], site["a"], site["tokens"]
    acts = all_feature_acts(model, a, toks)
    firing = acts > 0
    script = (out / "data" / "features.js").read_text()
    table = json.loads(re.fullmatch(r"window\.SAE_FEATURES = (.*);\n", script, re.S).group(1))
    assert [row[0] for row in table["rows"]] == list(range(D_SAE))
    freq = [row[1] for row in table["rows"]]
    assert freq == pytest.approx(firing.double().mean(0).tolist(), abs=1e-8)
    assert sum(row[6] for row in table["rows"]) == OPTIONS.n_features
    tree = parse(out / "index.html")
    assert float(by_id(tree, "mean-l0").get("data-value")) == pytest.approx(
        float(firing.sum(1).double().mean())
    )
    assert int(by_id(tree, "dead").get("data-value")) == int((firing.sum(0) == 0).sum())
    metrics = by_id(tree, "eval-metrics")
    assert [th.text for th in metrics.iterfind(".//h:th", NS)] == ["ce_loss_increase"]
    every = by_id(tree, "eval-all")
    assert [th.text for th in every.iterfind(".//h:th", NS)] == ["ce_loss_increase", "n_tokens"]


def test_a_folder_with_other_files_is_refused_before_the_pass(tmp_path: Path) -> None:
    model, sae = tiny_model(), random_sae(0)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="other files in it"):
        inspect_sae(sae, model, "not tokens", folder)  # refused before the tokens are read
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        inspect_sae(sae, model, tokens(), tmp_path / "file")


def test_an_earlier_site_is_replaced_only_with_overwrite(tmp_path: Path) -> None:
    model, sae, toks = tiny_model(), random_sae(0), tokens(n_rows=6)
    out = tmp_path / "site"
    first = InspectOptions(
        select="ids", feature_ids=(0, 1), top_k=2, n_samples=2, ablation_contexts=1
    )
    inspect_sae(sae, model, toks, out, options=first)
    with pytest.raises(ValueError, match="already holds a site"):
        inspect_sae(sae, model, toks, out, options=first)
    second = InspectOptions(
        select="ids", feature_ids=(2,), top_k=2, n_samples=2, ablation_contexts=1
    )
    inspect_sae(sae, model, toks, out, options=second, overwrite=True)
    assert feature_ids(out) == [2]  # the first site's pages are gone, not mixed in
    assert json.loads((out / MARKER).read_text())["features_with_pages"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["site"]  # no staging folder left


def test_cli_refuses_bad_flags_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert main(["inspect", "--sae", str(tmp_path), "--out", str(busy)]) == 2
    assert "other files in it" in capsys.readouterr().err
    assert main(["inspect", "--sae", str(tmp_path), "--features", "3,x"]) == 2
    assert "--features '3,x'" in capsys.readouterr().err
    assert main(["inspect", "--sae", str(tmp_path), "--n-tokens", "0"]) == 2
    assert "--n-tokens must be >= 1" in capsys.readouterr().err


def test_cli_refuses_more_ablation_contexts_than_top_contexts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["inspect", "--sae", str(tmp_path), "--top-k", "3", "--ablation-contexts", "5"]
    assert main(argv) == 2
    assert "ablation_contexts=5 exceeds top_k=3" in capsys.readouterr().err


def test_cli_loads_saes_through_the_loader_that_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "cfg.json").write_text("{not json")
    assert main(["inspect", "--sae", str(damaged), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert f"--sae={str(damaged)!r}" in err and "cfg.json" in err, err
    assert not (tmp_path / "a").exists()  # refused before anything is written
    good = tmp_path / "good"
    StandardSAE(StandardSAEConfig(d_in=16, d_sae=32)).save_model(str(good))
    argv = ["inspect", "--sae", str(good), "--out", str(tmp_path / "b")]
    (tmp_path / "file.txt").write_text("x")
    assert main([*argv, "--compare", str(tmp_path / "file.txt")]) == 2
    assert f"--compare={str(tmp_path / 'file.txt')!r} is not a folder" in capsys.readouterr().err
    assert main([*argv, "--compare", "some-release"]) == 2
    assert "pass --compare-id (e.g." in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
