"""`bae browse`: the feature browser of the small quickstart run (the session fixture `quickstart_run`), opened
from file:// in Debian's chromium through Playwright: every kind of page loads without console errors or failed
requests, tables sort and filter, latent pages highlight the tokens the scorer counted, the side-by-side page
shows a binary coder and its continuous counterpart, and text from the data (tokens, explanations) is shown as
text, never as markup."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import BIN

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
NASTY = '<script>window.pwned=1</script><img src=x onerror="window.pwned=1"> & \'q\' "x"'
"""An explanation (and, through `decode`, a token) that would run or add elements if it were read as HTML."""

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (the Makefile installs Debian's chromium)"
)


@pytest.fixture(scope="module")
def site(quickstart_run, tmp_path_factory):
    """`bae browse` on a copy of the quickstart run in which one binary latent's explanation is NASTY and the
    LLM judge's columns are filled for it; returns (site folder, latents table, that latent's coder id and index,
    the command's stdout)."""
    run, _ = quickstart_run
    tmp = tmp_path_factory.mktemp("browse")
    (tmp / "run").mkdir()
    for entry in run.iterdir():  # the tables copied (one is changed), the cache and checkpoints linked (read only)
        if entry.is_dir():
            (tmp / "run" / entry.name).symlink_to(entry, target_is_directory=True)
        else:
            shutil.copy(entry, tmp / "run" / entry.name)
    latents = pd.read_parquet(tmp / "run" / "latents.parquet")
    binary = latents[latents["dictionary"].str.startswith("binary") & latents["eligible"]].iloc[0]
    at = (latents["coder_id"] == binary["coder_id"]) & (latents["latent"] == binary["latent"])
    latents.loc[at, "explanation"] = NASTY
    latents["llm_explanation"] = np.where(at, "fires on commas <between> clauses", None)
    latents["detection_balanced_accuracy"] = np.where(at, 0.75, np.nan)
    latents["detection_windows"] = np.where(at, 40, np.nan)
    # A latent of another coder whose recorded test windows the redrawn ones cannot match: the browser says so.
    other = latents[(latents["dictionary"] == "topk skip_transcoder") & latents["eligible"]].index[0]
    latents.loc[other, "test_activating_windows"] += 1
    latents.to_parquet(tmp / "run" / "latents.parquet")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_ADDRESS": "local"}
    done = subprocess.run(
        ["bae", "browse", str(tmp / "run"), "--out", str(tmp / "site")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"warning: {latents.loc[other, 'coder_id']}: the redrawn test windows of 1 latent(s) differ" in done.stderr
    return tmp / "site", latents, binary["coder_id"], int(binary["latent"]), done.stdout


@pytest.fixture(scope="module")
def chromium():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(chromium, folder: Path, url: str):
    """A page at file://folder/url, drawn; returns (page, problems: console errors, page errors, failed requests)."""
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    problems = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed request: {r.url} {r.failure}"))
    page.goto(f"file://{folder}/{url}")
    page.wait_for_function("!document.querySelector('#main .loading')")
    page.wait_for_load_state("load")
    return page, problems


def dictionary_ids(latents: pd.DataFrame) -> dict[str, str]:
    first = latents.drop_duplicates("dictionary").set_index("dictionary")["coder_id"]
    return {name: first[name] for name in ("topk sae", "binary_topk sae", "mlp_neurons", "token_control")}


def test_every_page_loads_from_file_without_errors(site, chromium):
    folder, latents, _, _, stdout = site
    assert "12 dictionaries" in stdout and (folder / "index.html").exists()
    ids = dictionary_ids(latents)
    page, _ = open_page(
        chromium, folder, f"coder.html#c={latents[latents['dictionary'] == 'topk skip_transcoder'].iloc[0]['coder_id']}"
    )
    assert "The redrawn test windows of 1 latent(s) differ" in page.inner_text("p.warn")
    page.close()
    paged = latents[latents["firing_count"] > 0].drop_duplicates("coder_id").set_index("coder_id")["latent"]
    urls = ["index.html", "compare.html"]
    urls += [f"coder.html#c={c}" for c in ids.values()]
    urls += [f"latent.html#c={c}&l={paged[c]}" for c in ids.values()]
    for url in urls:
        page, problems = open_page(chromium, folder, url)
        assert problems == [], (url, problems)
        assert page.locator("#main .error").count() == 0, (url, page.inner_text("#main")[:300])
        assert page.evaluate("window.pwned") is None
        if url == "index.html":
            assert page.locator("table.data tbody tr").count() == latents["coder_id"].nunique()
        page.close()


def test_clicking_a_header_sorts_and_filters_hide_rows(site, chromium):
    folder, latents, coder, _, _ = site
    rows = latents[latents["coder_id"] == coder]
    page, problems = open_page(chromium, folder, f"coder.html#c={coder}")
    header = page.locator("th", has_text="token AUROC")

    def column(n: int) -> list[str]:
        return page.eval_on_selector_all(
            "table.data tbody tr:not([hidden])", f"trs => trs.map(tr => tr.children[{n}].textContent)"
        )

    index = page.eval_on_selector_all("table.data thead th", "ths => ths.map(th => th.textContent)").index(
        "token AUROC"
    )
    assert [int(x) for x in column(0)] == sorted(rows["latent"])  # opens in latent order
    header.click()
    scores = column(index)
    scored = [float(x) for x in scores if x != "–"]
    assert scored == sorted(scored, reverse=True) and scores[len(scored) :] == ["–"] * (len(scores) - len(scored))
    assert len(scored) == rows["token_auroc"].notna().sum()
    header.click()
    scored = [float(x) for x in column(index) if x != "–"]
    assert scored == sorted(scored)

    page.fill("input[name=smin]", "0.7")
    expected = int((rows["token_auroc"] >= 0.7).sum())
    assert 0 < expected < len(rows)
    assert len(column(0)) == expected
    assert page.inner_text("#count") == f"showing {expected} of {len(rows)} latents"
    page.fill("input[name=smin]", "")
    page.fill("input[name=q]", "<script>")  # the explanation that would be markup is found as text
    assert len(column(0)) == 1 and NASTY in column(1)[0]
    page.fill("input[name=q]", "")
    page.select_option("select[name=which]", "ineligible")
    assert len(column(0)) == int((~rows["eligible"]).sum())
    assert problems == []


def test_a_latent_page_highlights_the_tokens_the_scorer_counted(site, chromium):
    folder, latents, _, _, _ = site
    # A latent whose activating windows all fit among the top windows: its highlighted tokens there are all its
    # firing tokens, counted by `bae score` (firing_count) independently of the browser.
    for name, cls in (("topk sae", "cont"), ("binary_topk sae", "bin")):
        rows = latents[(latents["dictionary"] == name) & latents["eligible"] & (latents["activating_windows"] <= 10)]
        r = rows.sort_values("firing_count").iloc[-1]
        page, problems = open_page(chromium, folder, f"latent.html#c={r['coder_id']}&l={r['latent']}")
        top = page.locator("h2", has_text="windows").first.locator("xpath=following-sibling::div[1]")
        assert top.locator(".window").count() == r["activating_windows"]
        assert top.locator(f".tok.on.{cls}").count() == r["firing_count"]
        tested = page.locator("h2", has_text=re.compile("^Activating test windows")).inner_text()
        assert f"({r['test_activating_windows']})" in tested
        assert page.locator("svg.hist").count() == (cls == "cont")
        if cls == "cont":  # intensity by activation: the window's peak is full, weaker tokens are paler
            alphas = top.locator(".tok.on").evaluate_all("ts => ts.map(t => Number(t.style.getPropertyValue('--a')))")
            assert max(alphas) == 1 and min(alphas) < 1
        assert problems == []
        page.close()


def test_text_from_the_data_is_shown_as_text(site, chromium, tmp_path):
    from analysis.browse import BrowseOptions, write_browser

    folder, latents, coder, latent, _ = site
    page, problems = open_page(chromium, folder, f"latent.html#c={coder}&l={latent}")
    assert page.locator(".explanation code").first.inner_text() == NASTY
    assert "fires on commas <between> clauses" in page.inner_text(".explanation")
    assert "LLM detection, balanced accuracy" in page.inner_text("table.scores")
    assert page.locator("#main script, #main img").count() == 0 and page.evaluate("window.pwned") is None
    page.close()

    # Tokens: a decode whose every token is markup, for a few latents of one coder (no language model needed).
    options = BrowseOptions(coders=(coder,), latents=f"{latent}")
    write_browser(str(folder.parent / "run"), str(tmp_path), options, decode=lambda ids: f"{NASTY}{ids[0]}")
    page, problems = open_page(chromium, tmp_path, f"latent.html#c={coder}&l={latent}")
    first = page.locator(".window .tok").first.inner_text()
    assert first.startswith(NASTY) and page.locator("#main .tok.on").count() > 0
    assert page.locator("#main script, #main img").count() == 0 and page.evaluate("window.pwned") is None
    assert problems == []


def test_the_side_by_side_page_shows_a_binary_coder_and_its_continuous_counterpart(site, chromium):
    folder, latents, _, _, _ = site
    info = json.loads((folder / "data" / "run.js").read_text().split(",", 1)[1].rsplit(");", 1)[0])
    left, right = info["pairs"][0]
    by_id = {d["coder_id"]: d for d in info["dictionaries"]}
    assert by_id[left]["activation"] == "binary_topk" and by_id[right]["activation"] == "topk"
    assert all(by_id[left][c] == by_id[right][c] for c in ("kind", "hookpoint", "k"))
    page, problems = open_page(chromium, folder, "compare.html")
    panes = page.locator(".pane")
    assert panes.evaluate_all("ps => ps.map(p => p.dataset.coder)") == [left, right]
    words = [panes.nth(i).locator(".tokens .tok").all_inner_texts() for i in range(2)]
    assert words[0] == words[1] and len(words[0]) > 32  # the same held-out tokens on both sides
    panes.nth(0).locator(".tokens .tok").nth(5).click()
    for i in range(2):
        assert panes.nth(i).locator(".tok.selected").count() == 1
        assert "(document 1, position 5)" in panes.nth(i).locator("p.note").nth(1).inner_text()
        assert panes.nth(i).locator(".firing tbody tr").count() > 0  # top-k: latents fire on every token
    latent = panes.nth(1).locator(".firing tbody tr:not(.pinned)").first.get_attribute("data-latent")
    row = panes.nth(1).locator(f".firing tbody tr[data-latent='{latent}']")
    row.click()
    assert row.get_attribute("class") == "pinned" and panes.nth(1).locator(".tokens .tok.on.cont").count() > 0
    assert problems == []


def test_bad_input_is_named_in_one_line(tmp_path, capsys):
    from analysis.browse.site import latent_selection
    from ray_jobs.cli import main

    assert latent_selection("0-2,7", np.arange(10), np.ones(10, bool)).tolist() == [0, 1, 2, 7]
    with pytest.raises(ValueError, match="runs backwards"):
        latent_selection("5-2", np.arange(10), np.ones(10, bool))
    (tmp_path / "run").mkdir()
    assert main(["browse", str(tmp_path / "run")]) == 2
    assert "trials.parquet" in capsys.readouterr().err
