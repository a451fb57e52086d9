"""Sparse probing on labelled text tasks (Kantamneni et al. 2025, arXiv 2502.16681, the sae-probes protocol that
SAEBench runs as sparse_probing_sae_probes; evaluation.md §7): can k latents of a dictionary, chosen on training
prompts, tell a task's two classes apart?

    a task of the sae-probes wheel (prompt, target)   binary tasks only; balanced, capped, split train/test
      -> the language model at the hookpoint, at each prompt's last real token (`last_token_activations`)
      -> a dictionary's features there: a coder's code (`coder_features`), the MLP's neurons (`neuron_features`)
         or the raw activations
      -> per k: the k features with the largest |class-mean difference| on the training split (each divided by its
         mean non-zero |value| first, as sae-probes does), a logistic
         regression on them, its test accuracy and AUROC, and the same with shuffled training labels (`probe`)

The tasks ship offline inside the `sae-probes` wheel (`sae_probes/data/cleaned_data/*.csv.zst`); the folder is
found without importing the package (its __init__ needs xgboost). Tasks whose target has more than two values
(multi-class or continuous) are skipped: the wheel already holds one-vs-rest variants of its multi-class tasks
as binary tasks of their own (e.g. 114_nyc_borough_Manhattan).
"""

from __future__ import annotations

import difflib
import importlib.util
import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROBING_VERSION = 2
"""Bumped when a change alters probing numbers; results made by another version are recomputed."""
INSTALL_HINT = "pip install --no-deps sae-probes==0.4.2 (the Makefile's install target does it)"
DEFAULT_TASKS = (
    "113_movie_sent",  # sentiment of a film review
    "139_news_class_Politics",  # news topic: politics or not
    "159_code_Python",  # programming language: Python or another
    "21_headline_istrump",  # headline entity: about Trump or not
    "36_sciq_tf",  # truthfulness: is the answer to a science question right
    "5_hist_fig_ismale",  # factual: a historical figure's sex, from the name
    "154_athlete_sport_football",  # factual: an athlete's sport, from the name
    "96_spam_is",  # spam or not
)
"""Eight binary tasks of different kinds, short enough that `bae probe` on the quickstart takes minutes."""
DEFAULT_KS = (1, 2, 5, 20)
DEFAULT_MAX_EXAMPLES = 600
"""Prompts per task (half of each class): 400 train, 200 test."""
DEFAULT_MAX_TOKENS = 64
"""A longer prompt keeps its last this many tokens, so the probe still reads its real last token."""
TEST_FRACTION = 1 / 3
SHUFFLES = 5
"""Shuffles of the training labels behind each probe's control."""
PROBE_C = 1.0
"""Inverse L2 strength of the k-sparse probes' logistic regressions, on standardised features."""
FULL_CS = (0.001, 0.01, 0.1, 1.0)
"""The full-width probe's inverse L2 strengths, one chosen by cross-validation (with C = 1 it fits the training
prompts perfectly and tests a few points lower)."""


def tasks_folder() -> Path:
    """The folder of the sae-probes wheel's task files, found without importing the package."""
    spec = importlib.util.find_spec("sae_probes")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"sparse probing needs the package sae-probes, which holds its tasks; {INSTALL_HINT}")
    folder = Path(spec.submodule_search_locations[0]) / "data" / "cleaned_data"
    if not folder.is_dir():
        raise FileNotFoundError(f"sae-probes is installed but its tasks ({folder}) are missing; {INSTALL_HINT}")
    return folder


def task_names() -> list[str]:
    """Every task file of the wheel (binary or not), by name, e.g. 113_movie_sent."""
    return sorted((p.name.removesuffix(".csv.zst") for p in tasks_folder().glob("*.csv.zst")), key=_task_order)


def _task_order(name: str) -> tuple[int, str]:
    number = name.split("_", 1)[0]
    return (int(number) if number.isdigit() else 10**9, name)


def read_task(name: str):
    """A task's rows as a DataFrame with `prompt` and `target` (rows without either are dropped)."""
    import pandas as pd
    import zstandard

    path = tasks_folder() / f"{name}.csv.zst"
    if not path.is_file():
        raise ValueError(_unknown(name))
    with path.open("rb") as f:
        frame = pd.read_csv(io.BytesIO(zstandard.ZstdDecompressor().stream_reader(f).read()))
    frame = frame.dropna(subset=["prompt", "target"])
    return frame[frame["prompt"].astype(str).str.len() > 0].reset_index(drop=True)


def _unknown(name: str) -> str:
    names = task_names()
    short = {n.split("_", 1)[-1]: n for n in names}
    close = difflib.get_close_matches(name, names + list(short), n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(dict.fromkeys(short.get(c, c) for c in close))}?)" if close else ""
    return (
        f"task {name!r}: unknown{hint}; the tasks are the files of {tasks_folder()} (name without .csv.zst), "
        "or `all` for every binary one"
    )


def resolve_tasks(names) -> tuple[list[str], list[str]]:
    """(binary tasks, skipped tasks) for names given by a user: `all` (every binary task of the wheel), full
    names (113_movie_sent) or names without their number (movie_sent). An unknown name, or a task that is not
    binary when named on its own, is a ValueError that names it."""
    names = [names] if isinstance(names, str) else list(names)
    every = task_names()
    if names == ["all"]:
        chosen, skipped = [], []
        for name in every:
            (chosen if read_task(name)["target"].nunique() == 2 else skipped).append(name)
        return chosen, skipped
    short = {}
    for n in every:
        short.setdefault(n.split("_", 1)[-1], []).append(n)
    chosen = []
    for name in names:
        if name in every:
            full = name
        elif len(short.get(name, [])) == 1:
            full = short[name][0]
        else:
            raise ValueError(_unknown(name))
        classes = read_task(full)["target"].nunique()
        if classes != 2:
            raise ValueError(
                f"task {full!r}: its target has {classes} values, and probing takes binary tasks only; use its "
                "one-vs-rest variants (tasks named like it with a class at the end), if the wheel has them"
            )
        if full not in chosen:
            chosen.append(full)
    return chosen, []


@dataclass(frozen=True)
class ProbeData:
    """A binary task's prompts, balanced and split: `labels` are 0/1 (1 = `positive`), `train` marks the
    training prompts (the others test)."""

    name: str
    prompts: list[str]
    labels: np.ndarray
    train: np.ndarray
    positive: str


def load_task(name: str, max_examples: int = DEFAULT_MAX_EXAMPLES, seed: int = 0) -> ProbeData:
    """Up to `max_examples` distinct prompts of a binary task, half of each class (fewer when a class has fewer),
    drawn with a seed of (seed, task), each class split train/test in the ratio 2:1."""
    frame = read_task(name)
    # A prompt that occurs more than once could land on both sides of the split (the test would then score
    # memorised training prompts): each distinct prompt is kept once, and one given both labels is dropped.
    labels_per_prompt = frame.groupby("prompt")["target"].nunique()
    frame = frame[frame["prompt"].map(labels_per_prompt) == 1].drop_duplicates("prompt")
    values = sorted(frame["target"].unique())
    if len(values) != 2:
        raise ValueError(f"task {name!r}: its target has {len(values)} values; probing takes binary tasks only")
    per_class = min(max_examples // 2, *(int((frame["target"] == v).sum()) for v in values))
    if per_class < 3:
        raise ValueError(f"task {name!r}: max_examples={max_examples} leaves {per_class} prompts per class; need 3")
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    rows, labels, train = [], [], []
    n_test = max(1, round(per_class * TEST_FRACTION))
    for label, value in enumerate(values):
        drawn = rng.choice(np.flatnonzero((frame["target"] == value).to_numpy()), per_class, replace=False)
        rows.append(drawn)
        labels.append(np.full(per_class, label, dtype=np.int8))
        train.append(np.arange(per_class) >= n_test)
    rows = np.concatenate(rows)
    return ProbeData(
        name=name,
        prompts=frame["prompt"].astype(str).to_numpy()[rows].tolist(),
        labels=np.concatenate(labels),
        train=np.concatenate(train),
        positive=str(values[1]),
    )


def last_token_activations(loaded, hookpoints, prompts: list[str], *, max_tokens: int, batch_size: int = 16):
    """Per hookpoint, {"input": (n, d), "output": (n, d)} (residual hookpoints: output only) at each prompt's
    last real token, float32, and the number of tokens each prompt was given. A prompt longer than `max_tokens`
    keeps its last `max_tokens` tokens. Prompts are tokenised as the cache's text is (no special tokens), sorted by
    length and right-padded, so padding never precedes a real token (the model is causal)."""
    import torch

    from bae_core.data.hooks import capture

    ids = loaded.tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]
    ids = [x[-max_tokens:] for x in ids]
    lengths = np.array([len(x) for x in ids])
    if (lengths == 0).any():
        raise ValueError(f"prompt {int(np.argmin(lengths))}: it has no tokens")
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    out = {}
    for start in range(0, len(ids), batch_size):
        chosen = np.argsort(lengths, kind="stable")[start : start + batch_size]
        batch = torch.full((len(chosen), int(lengths[chosen].max())), pad, dtype=torch.long)
        mask = torch.zeros_like(batch)
        for row, i in enumerate(chosen):
            batch[row, : lengths[i]] = torch.tensor(ids[i])
            mask[row, : lengths[i]] = 1
        captured = capture(loaded, batch, hookpoints, attention_mask=mask)
        last = torch.from_numpy(lengths[chosen] - 1)
        for name, columns in captured.items():
            for column, values in columns.items():
                store = out.setdefault(name, {}).setdefault(column, np.zeros((len(ids), values.shape[-1]), np.float32))
                store[chosen] = values[torch.arange(len(chosen)), last].numpy()
    return out, lengths


# ---- features ------------------------------------------------------------------------------------------------


def coder_features(coder, activations: dict[str, np.ndarray]) -> np.ndarray:
    """A coder's code (examples x latents, dense) on the activation it was trained on: the hookpoint's output for an
    SAE (sparsify's convention, `bae_core.data.reader.coder_columns`), the MLP's input for a transcoder."""
    import torch

    column = "input" if coder.cfg.is_transcoder else "output"
    if column not in activations:
        raise ValueError(f"coder: a {coder.cfg.kind} reads the hookpoint's {column}, which these activations lack")
    coder.eval()  # training mode would sample (binary_groupmax) or move the batch threshold (batchtopk)
    with torch.no_grad():
        x = torch.from_numpy(np.asarray(activations[column], dtype=np.float32)).to(coder.device, coder.dtype)
        return coder.encode(x).to_dense(coder.num_latents).float().cpu().numpy()


def neuron_features(loaded, hookpoint, mlp_input: np.ndarray, k: int | None = None) -> np.ndarray:
    """The MLP's own neurons (`bae_core.data.hooks.mlp_neurons`) on its input; with `k`, each example keeps its k
    largest, as the neuron baseline of `bae score` does (`bae_core.evaluation.interp.neuron_activations`)."""
    import torch

    from bae_core.data.hooks import mlp_neurons
    from bae_core.evaluation.examples import per_token_topk

    neurons = mlp_neurons(loaded, hookpoint, torch.from_numpy(np.asarray(mlp_input, dtype=np.float32))).numpy()
    return neurons if k is None else per_token_topk(neurons, k).toarray()


# ---- the probe -----------------------------------------------------------------------------------------------


def mean_activation_scale(x: np.ndarray) -> np.ndarray:
    """Each feature's mean |value| where it is non-zero (sae-probes' `mean_act_normalization`): 1 for a binary
    latent, a continuous latent's typical activation, a raw dimension's typical magnitude."""
    nonzero = (x != 0).sum(0)
    return np.abs(x).sum(0) / (nonzero + 1e-6) + 1e-6


def select_latents(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k features with the largest absolute difference of class means on (x, labels), each feature first
    divided by its mean non-zero |value| on x (`mean_activation_scale`, as sae-probes ranks them), largest first
    (ties: the lower index), and those differences (signed: positive class minus negative, in those units).

    Without the scaling the ranking is in each feature's own units: a binary latent's difference of firing rates
    against a continuous latent's, or a raw dimension's, that grows with its scale, so a large feature that
    separates the classes poorly (a massive-activation dimension of the residual stream, the largest latent of a
    dictionary) would be chosen first."""
    labels = np.asarray(labels).astype(bool)
    x = x / mean_activation_scale(x)
    difference = x[labels].mean(0) - x[~labels].mean(0)
    order = np.lexsort((np.arange(len(difference)), -np.abs(difference)))[:k]
    return order, difference[order]


def fit_probe(x_train, y_train, x_test, y_test, seed: int = 0, cs=None) -> tuple[float, float]:
    """Test accuracy and AUROC of an L2 logistic regression on standardised features: with C = `PROBE_C`, or,
    given `cs`, with the C among them that 3-fold cross-validation on the training split prefers."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y_train)) < 2:
        raise ValueError("labels: the training split needs both classes")
    model = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=2000, random_state=seed))
    if cs is not None:
        model = GridSearchCV(model, {"logisticregression__C": list(cs)}, cv=3)
    model.fit(x_train, y_train)
    accuracy = float((model.predict(x_test) == y_test).mean())
    scores = model.decision_function(x_test)
    auroc = float(roc_auc_score(y_test, scores)) if len(np.unique(y_test)) == 2 else float("nan")
    return accuracy, auroc


def probe(x: np.ndarray, labels: np.ndarray, train: np.ndarray, ks, *, seed: int = 0, full: bool = False):
    """One row per k: the k-sparse probe's test `accuracy` and `auroc`, the chosen `latents` and their class-mean
    `differences`, and `shuffled_accuracy`: the same selection and fit on shuffled training labels (seeded),
    tested on the true labels and averaged over `SHUFFLES` shuffles (expect ~0.5; one shuffle alone can land far
    from it when a feature separates the classes well, since the sign its probe learns is random). With `full`,
    also a row with `probe` "full": a logistic regression on every feature, its C cross-validated among `FULL_CS`
    (on the raw activations: what a dense readout of every feature reaches with these prompts, not a ceiling).
    `n_train` and `n_test` are the split's sizes."""
    x = np.asarray(x, dtype=np.float64)
    labels, train = np.asarray(labels).astype(np.int64), np.asarray(train).astype(bool)
    if max(ks) > x.shape[1]:
        raise ValueError(f"k: {max(ks)} is more than the dictionary's {x.shape[1]} features")
    x_train, x_test, y_train, y_test = x[train], x[~train], labels[train], labels[~train]
    rng = np.random.default_rng([seed, 1])
    shuffles = [rng.permutation(y_train) for _ in range(SHUFFLES)]
    rows = []
    for k in ks:
        latents, differences = select_latents(x_train, y_train, k)
        accuracy, auroc = fit_probe(x_train[:, latents], y_train, x_test[:, latents], y_test, seed)
        controls = []
        for shuffled in shuffles:
            chosen, _ = select_latents(x_train, shuffled, k)
            controls.append(fit_probe(x_train[:, chosen], shuffled, x_test[:, chosen], y_test, seed)[0])
        rows.append(
            {
                "probe": "sparse",
                "probe_k": int(k),
                "accuracy": accuracy,
                "auroc": auroc,
                "shuffled_accuracy": float(np.mean(controls)),
                "latents": latents.tolist(),
                "differences": differences.tolist(),
            }
        )
    if full:
        accuracy, auroc = fit_probe(x_train, y_train, x_test, y_test, seed, cs=FULL_CS)
        rows.append(
            {"probe": "full", "probe_k": x.shape[1], "accuracy": accuracy, "auroc": auroc, "shuffled_accuracy": None}
        )
    for row in rows:
        row.update(n_train=int(train.sum()), n_test=int((~train).sum()))
    return rows
