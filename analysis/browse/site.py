"""Writing the feature browser of a scored run: a static site that opens from disk (file://), no server.

    OUT/index.html, coder.html, latent.html, compare.html   one kind of page each, from static/page.html (package data)
    OUT/browse.js, browse.css, <page>.js                      the pages' code: every text is set with textContent
    OUT/data/run.js                    the run and its dictionaries: key numbers, scoring settings, coder pairs
    OUT/data/text-<i>.js               a cache's held-out windows (token strings) and the side-by-side documents
    OUT/data/<dictionary>/latents.js   one row per latent: explanation, scores with their sample sizes, firing
    OUT/data/<dictionary>/ex-<n>.js    examples of latents n*256 .. n*256+255 (`analysis.browse.data`)
    OUT/data/<dictionary>/docs.js      the dictionary's firing on the side-by-side documents

Data files are scripts (`BAE.put(key, json)`) loaded with <script src>, which browsers allow on file:// where
fetch() is refused. A page is one template reading its dictionary's chunk, so 18k latents need no 18k pages.
A dictionary's files are redone only when its latents, checkpoint or the browser's options changed (its
done.json records what they were made from), so a rerun resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.browse.data import Corpus, codes, document_firing, latent_examples, open_corpus
from bae_core.coders.config import BINARY_ACTIVATIONS
from bae_core.evaluation.examples import WINDOW, default_min_examples

BROWSER_VERSION = 1
"""Version of the data files; a dictionary's files made by another version are redone."""
CHUNK = 256
"""Latents per examples file."""
PAGES = {"index": "coders", "coder": "coder", "latent": "latent", "compare": "binary vs continuous"}
"""The kinds of page and their titles: each is static/page.html with its title and its script (PAGE.js)."""
STATIC = (*(f"{p}.js" for p in PAGES), "browse.js", "browse.css")
LATENT_COLUMNS = (
    "latent", "explanation", "rules", "token_auroc", "window_auroc", "window_balanced_accuracy", "window_f1",
    "shuffled_token_auroc", "shuffled_window_auroc", "firing_count", "firing_rate", "activating_windows",
    "eligible", "explain_activating_windows", "test_activating_windows", "test_nonactivating_windows",
    "decile_token_auroc", "llm_explanation", "detection_accuracy", "detection_balanced_accuracy", "detection_f1",
    "detection_windows", "fuzzing_accuracy", "fuzzing_balanced_accuracy", "fuzzing_f1", "fuzzing_windows",
    "llm_prompts", "llm_failed_prompts", "llm_failures", "judge_model", "prompt_version",
)  # fmt: skip
"""Columns of latents.parquet a page shows (the LLM judge's when `bae score --judge llm` ran)."""
CODER_COLUMNS = (
    "coder_id", "trial_id", "dictionary", "activation", "kind", "hookpoint", "k", "latents", "alive", "eligible",
    "coverage", "l0_heldout", "fvu", "l0", "loss_recovered", "ce_increase", "token_auroc", "token_auroc_ci_low",
    "token_auroc_ci_high", "token_auroc_weighted", "token_auroc_weighted_ci_low", "token_auroc_weighted_ci_high",
    "shuffled_token_auroc", "test_windows_median", "test_nonactivating_windows_median", "underpowered",
    "dead_fraction", "frequent_fraction", "dense_fraction", "eligible_firing_share", "detection_balanced_accuracy",
    "fuzzing_balanced_accuracy", "llm_latents", "seed", "steps",
)  # fmt: skip
"""Columns of coders.parquet the index shows."""
BINARY_DICTIONARIES = BINARY_ACTIVATIONS | {"token_control", "random_control"}
"""Dictionaries whose latents are 0 or 1: binary coders and the control dictionaries."""
COUNTERPART = {"binary_topk": "topk", "binary_groupmax": "groupmax", "binary_threshold": "jumprelu"}
"""The continuous activation a binary one is compared with on the side-by-side page."""


@dataclass(frozen=True)
class BrowseOptions:
    """What the browser holds."""

    latents: str = "all"
    """Latents given examples and a page: all (every latent that fires on the held-out split), eligible (those
    the lexical judge scored), or latent indices and ranges such as 0-99,512 (in every dictionary)."""
    coders: tuple[str, ...] | None = None
    """coder_id of each dictionary to include (default: every dictionary of coders.parquet)."""
    pair: tuple[str, str] | None = None
    """(binary, continuous) coder_id the side-by-side page opens with (default: the first matched pair)."""
    top_windows: int = 10
    """Top-activating windows per latent."""
    nonactivating_windows: int = 5
    """Non-activating test windows shown per latent (of the ones scored)."""
    documents: int = 3
    """Held-out test-side documents on the side-by-side page."""
    document_tokens: int = 128
    """Tokens of each of those documents (from its start)."""

    def __post_init__(self):
        for name in ("top_windows", "nonactivating_windows", "documents", "document_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        latent_selection(self.latents, np.arange(1), np.ones(1, bool))  # a malformed selection fails here


@dataclass(frozen=True)
class BrowseSummary:
    index: Path
    dictionaries: int
    latents: int
    """Latents with examples (pages)."""
    redone: int
    """Dictionaries whose files were (re)written; the others were up to date."""
    bytes: int
    mismatched: dict[str, int]
    """Per dictionary, latents whose redrawn test windows differ in number from latents.parquet's (expected 0)."""


def latent_selection(spec: str, latents: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """The latents of `spec` (all, eligible, or indices and ranges like 0-99,512) among `latents`."""
    text = spec.strip()
    if text == "all":
        return latents
    if text == "eligible":
        return latents[eligible]
    chosen = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise ValueError(
                f"latents: {part.strip()!r} is not an index or a range; use all, eligible or e.g. 0-99,512"
            )
        low, high = int(match[1]), int(match[2] or match[1])
        if high < low:
            raise ValueError(f"latents: the range {part.strip()} runs backwards")
        chosen.update(range(low, high + 1))
    return latents[np.isin(latents, sorted(chosen))]


def dictionaries(tables, options: BrowseOptions) -> list[dict]:
    """One dict per dictionary of coders.parquet (or of `options.coders`): its key numbers, its checkpoint and
    cache (a baseline's and a control's: those of a trial on its hookpoint) and its scoring settings."""
    coders, trials, latents = tables.coders, tables.trials, tables.latents
    if coders.empty or latents.empty:
        raise ValueError(f"run {tables.path}: not scored (no coders.parquet or latents.parquet); run `bae score` first")
    if options.coders is not None:
        unknown = [c for c in options.coders if c not in set(coders["coder_id"])]
        if unknown:
            raise ValueError(
                f"coders: {', '.join(unknown)} not in this run; choose from {', '.join(coders['coder_id'])}"
            )
        coders = coders[coders["coder_id"].isin(options.coders)]
    by_trial = trials.set_index("trial_id")
    out = []
    for row in coders.to_dict("records"):
        info = {c: _plain(row[c]) for c in CODER_COLUMNS if c in row}
        trial = row.get("trial_id")
        if isinstance(trial, str) and trial in by_trial.index:
            info["checkpoint"], info["cache"] = by_trial.loc[trial, "checkpoint"], by_trial.loc[trial, "cache"]
        else:
            same = trials[trials["hookpoint"] == row["hookpoint"]]
            info["checkpoint"], info["cache"] = None, same["cache"].iloc[0] if len(same) else None
        if info["cache"] is None:
            raise ValueError(f"coder {row['coder_id']}: no trial of this run reads hookpoint {row['hookpoint']}")
        rows = latents[latents["coder_id"] == row["coder_id"]]
        info["settings"] = json.loads(rows["scoring_settings"].iloc[0])
        info["binary"] = row["activation"] in BINARY_DICTIONARIES
        out.append(info)
    return out


def pairs(dicts: list[dict]) -> list[list[str]]:
    """(binary, continuous) coder ids of trained coders alike in kind, hookpoint and k (the counterpart
    activation, e.g. binary_topk with topk; the same seed and size where there is one)."""
    trained = [d for d in dicts if d.get("checkpoint")]
    found = []
    for b in (d for d in trained if d["activation"] in COUNTERPART):
        alike = [
            d
            for d in trained
            if d["activation"] == COUNTERPART[b["activation"]] and all(d[c] == b[c] for c in ("kind", "hookpoint", "k"))
        ]
        alike.sort(key=lambda d: (d.get("seed") != b.get("seed"), d.get("latents") != b.get("latents")))
        if alike:
            found.append([b["coder_id"], alike[0]["coder_id"]])
    return found


def write_browser(
    run: str, out: str | None = None, options: BrowseOptions = BrowseOptions(), *, decode=None, progress=None
) -> BrowseSummary:
    """Write the browser of the scored run `run` into `out` (default RUN/browse); returns a `BrowseSummary`.
    `decode(ids) -> str` gives a token's text (default: the run's model's tokenizer); `progress(done, total,
    label)` is called after each dictionary."""
    from analysis.run import load_run
    from bae_core.data.paths import is_uri

    if out is None:
        if is_uri(run):
            raise ValueError(f"out: the run {run} is not on this machine; give a local folder for the browser")
        out = f"{run.rstrip('/')}/browse"
    tables = load_run(run)
    dicts = dictionaries(tables, options)
    matched = pairs(dicts)
    if options.pair is not None:
        missing = [c for c in options.pair if c not in {d["coder_id"] for d in dicts}]
        if missing:
            raise ValueError(f"pair: {', '.join(missing)} not among the browser's dictionaries")
        matched = [list(options.pair)] + [p for p in matched if p != list(options.pair)]
    root = Path(out)
    (root / "data").mkdir(parents=True, exist_ok=True)
    corpora: dict[tuple[str, str, int], Corpus] = {}  # one per (cache, hookpoint, scoring seed)
    models: dict[str, object] = {}
    texts = []
    for d in dicts:
        key = (d["cache"], d["hookpoint"], int(d["settings"].get("seed") or 0))
        if key not in corpora:
            cache, hookpoint, seed = key
            corpora[key] = open_corpus(
                cache, hookpoint, seed=seed, documents=options.documents, document_tokens=options.document_tokens
            )
            texts.append(_write_text(root, len(corpora) - 1, corpora[key], decode or _decoder(models, d["cache"])))
        d["text"] = list(corpora).index(key)
        d["min_examples"] = int(d["settings"].get("min_examples") or default_min_examples(corpora[key].tokens.size))
    redone, mismatched = 0, {}
    for i, d in enumerate(dicts):
        frame = tables.latents[tables.latents["coder_id"] == d["coder_id"]].sort_values("latent")
        d["dir"] = re.sub(r"[^A-Za-z0-9._-]", "_", d["coder_id"])
        stamp = _stamp(d, frame, options)
        done = root / "data" / d["dir"] / "done.json"
        if done.exists() and json.loads(done.read_text()).get("stamp") == stamp:
            d.update(json.loads(done.read_text())["summary"])
        else:
            corpus = list(corpora.values())[d["text"]]
            d.update(_write_dictionary(root, d, frame, corpus, models, options))
            done.write_text(json.dumps({"stamp": stamp, "summary": {k: d[k] for k in ("examples", "mismatched")}}))
            redone += 1
        if d["mismatched"]:
            mismatched[d["coder_id"]] = d["mismatched"]
        if progress is not None:
            progress(i + 1, len(dicts), d["coder_id"])
    _write_js(root / "data" / "run.js", "run", _run_info(tables, dicts, matched, texts, options))
    static = resources.files("analysis.browse") / "static"
    for name in STATIC:
        (root / name).write_text((static / name).read_text(encoding="utf-8"), encoding="utf-8")
    template = (static / "page.html").read_text(encoding="utf-8")
    for page, title in PAGES.items():
        (root / f"{page}.html").write_text(template.format(title=title, page=page), encoding="utf-8")
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return BrowseSummary(root / "index.html", len(dicts), sum(d["examples"] for d in dicts), redone, size, mismatched)


def _decoder(models: dict, cache: str):
    """The tokenizer's decode of `cache`'s model (loading the model once per cache: the neuron baseline needs it
    too)."""
    return lambda ids: _model(models, cache).tokenizer.decode(ids)


def _model(models: dict, cache: str):
    if cache not in models:
        from bae_core.data.cache import open_cache
        from bae_core.data.lm import EMBEDDED_MODEL, load_model

        manifest = open_cache(cache)
        models[cache] = load_model(
            manifest.model, revision=None if manifest.model == EMBEDDED_MODEL else manifest.revision
        )
    return models[cache]


def _write_text(root: Path, index: int, corpus: Corpus, decode) -> dict:
    """data/text-<index>.js: the token strings of every window and side-by-side document; returns its summary."""
    flat = corpus.tokens.reshape(-1)
    ids = np.unique(np.concatenate([corpus.windows.tokens.reshape(-1), *(flat[r] for _, r in corpus.documents)]))
    position = {int(t): i for i, t in enumerate(ids.tolist())}
    w = corpus.windows
    docs, doc_index = np.unique(w.doc_id, return_inverse=True)
    text = {
        "vocab": [decode([int(t)]) for t in ids.tolist()],
        "windows": [[position[t] for t in row] for row in w.tokens.tolist()],
        "side": "".join("E" if e else "T" if t else "-" for e, t in zip(w.explain, w.test, strict=True)),
        "doc": doc_index.tolist(),
        "docs": docs.tolist(),
        "documents": [{"id": doc, "tokens": [position[int(t)] for t in flat[r]]} for doc, r in corpus.documents],
    }
    name = f"text-{index}.js"
    _write_js(root / "data" / name, f"text/{index}", text)
    return {
        "file": name,
        "cache": corpus.cache,
        "hookpoint": corpus.hookpoint,
        "tokens": int(flat.size),
        "windows": len(w),
        "explain_windows": int(w.explain.sum()),
        "test_windows": int(w.test.sum()),
        "documents": len(docs),
    }


def _stamp(d: dict, frame: pd.DataFrame, options: BrowseOptions) -> str:
    """What a dictionary's files are made from: its latents' rows, its checkpoint, the options, the version."""
    columns = [c for c in LATENT_COLUMNS if c in frame.columns and c != "decile_token_auroc"]
    rows = pd.util.hash_pandas_object(frame[columns].astype(str), index=False).to_numpy()
    kept = [
        getattr(options, f) for f in ("latents", "top_windows", "nonactivating_windows", "documents", "document_tokens")
    ]
    made_from = json.dumps([BROWSER_VERSION, d["coder_id"], d["checkpoint"], d["cache"], kept], default=str)
    return hashlib.sha256(made_from.encode() + rows.tobytes()).hexdigest()


def _write_dictionary(root: Path, d: dict, frame: pd.DataFrame, corpus: Corpus, models: dict, options) -> dict:
    """A dictionary's latents table, examples chunks and document firing; returns what run.js says of them."""
    folder = root / "data" / d["dir"]
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    settings = d["settings"]
    needs_model = d["activation"] == "mlp_neurons" and not d.get("checkpoint")
    acts, binary = codes(d, corpus, _model(models, d["cache"]) if needs_model else None, int(settings.get("seed") or 0))
    chosen = latent_selection(options.latents, frame["latent"].to_numpy(), frame["eligible"].to_numpy(bool))
    scored = frame.set_index("latent")[["eligible", "test_activating_windows"]].to_dict("index")
    chunks: dict[int, dict] = {}
    mismatched = 0
    for latent, record in latent_examples(
        corpus.windows,
        acts[corpus.rows].tocsc(),
        binary=binary,
        min_examples=d["min_examples"],
        test_windows=int(settings.get("test_windows") or 50),
        seed=int(settings.get("seed") or 0),
        latents=chosen,
        top=options.top_windows,
        nonactivating=options.nonactivating_windows,
    ):
        # The draw must be the scorer's: the same eligibility and the same number of activating test windows.
        drawn = ("test" in record, record.get("test_activating", 0))
        mismatched += drawn != (bool(scored[latent]["eligible"]), scored[latent]["test_activating_windows"])
        chunks.setdefault(latent // CHUNK, {})[latent] = record
    for n, records in chunks.items():
        _write_js(folder / f"ex-{n}.js", f"ex/{d['dir']}/{n}", records)
    has = np.isin(frame["latent"].to_numpy(), [latent for records in chunks.values() for latent in records])
    columns = [c for c in LATENT_COLUMNS if c in frame.columns]
    table = {
        "columns": [*columns, "examples"],
        "rows": [[*map(_plain, r), bool(h)] for r, h in zip(frame[columns].itertuples(index=False), has, strict=True)],
    }
    _write_js(folder / "latents.js", f"latents/{d['dir']}", table)
    _write_js(folder / "docs.js", f"docs/{d['dir']}", document_firing(acts.tocsr(), corpus.documents, binary))
    d["binary"] = bool(binary)
    return {"examples": int(has.sum()), "mismatched": mismatched}


def _run_info(tables, dicts: list[dict], matched: list[list[str]], texts: list[dict], options) -> dict:
    from bae_core.evaluation.lexical import LABEL

    shown = ("checkpoint", "cache", "settings")
    return {
        "version": BROWSER_VERSION,
        "run": str(tables.path),
        "name": Path(str(tables.path).rstrip("/")).name,
        "generated": time.strftime("%Y-%m-%d %H:%M"),
        "score_label": LABEL,
        "chunk": CHUNK,
        "window": WINDOW,
        "latents_option": options.latents,
        "texts": texts,
        "pairs": matched,
        "dictionaries": [
            {**{k: v for k, v in d.items() if k not in shown}, **{f"scoring_{k}": v for k, v in d["settings"].items()}}
            for d in dicts
        ],
    }


def _plain(value):
    """A cell as JSON: numpy scalars and arrays as Python values, NaN and missing as null."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else float(f"{value:.5g}")
    return None if value is None or value is pd.NA else value


def _write_js(path: Path, key: str, value) -> None:
    """A data file: `BAE.put(key, value);` with the value as ASCII JSON (so no text of the data can end the
    script or change its meaning; non-ASCII characters are \\u escapes)."""
    body = json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=True)
    path.write_text(f"BAE.put({json.dumps(key)},{body});\n", encoding="ascii")
