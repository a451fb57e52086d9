"""The report's LLM-judge section (`bae score --judge llm`): per dictionary, the judged latents, failed prompts, and
balanced accuracy and AUROC of detection and fuzzing, with the share of AUROCs read from logprobs."""

from __future__ import annotations

import math

import pandas as pd

from analysis.frontier import family


def llm_judge_section(coders: pd.DataFrame, latents: pd.DataFrame) -> list[str]:
    """The LLM judge's section (bae score --judge llm): per dictionary, the judged latents, failed prompts, and
    balanced accuracy and AUROC of detection and fuzzing with the share of AUROCs read from logprobs."""
    from analysis.report import DICTIONARY_LABELS, _markdown

    if "detection_balanced_accuracy" not in coders or "llm_prompts" not in latents:
        return []
    judged = latents[latents["llm_prompts"].notna()]
    if judged.empty:
        return []
    rows = []
    for r in coders.to_dict("records"):
        g = judged[judged["coder_id"] == r["coder_id"]]
        if g.empty:
            continue
        trained = isinstance(r.get("trial_id"), str)
        name = family(r["activation"], r["kind"]) if trained else DICTIONARY_LABELS.get(r.get("dictionary"), "")
        row = {
            "dictionary": name,
            "k": r["k"] if trained or r.get("dictionary") == "mlp_neurons" else "–",
            "judged latents": len(g),
            "test windows (median)": float(g["detection_windows"].median()),
            "failed prompts": r.get("llm_failed_fraction", math.nan),
        }
        for task in ("detection", "fuzzing"):
            row[f"{task} bal. acc."] = r.get(f"{task}_balanced_accuracy", math.nan)
            row[f"{task} AUROC"] = r.get(f"{task}_auroc", math.nan)
        sources = [g[f"{t}_auroc_source"] for t in ("detection", "fuzzing") if f"{t}_auroc_source" in g]
        sources = pd.concat(sources).dropna() if sources else pd.Series(dtype=object)
        row["AUROC from logprobs"] = float((sources == "logprobs").mean()) if len(sources) else math.nan
        rows.append(row)
    model = ", ".join(sorted(judged["judge_model"].dropna().unique()))
    version = ", ".join(sorted(judged["prompt_version"].dropna().unique()))
    return [
        "## LLM judge",
        "",
        f"Explanations and scores by **{model}** (prompts {version}), on a sample of each dictionary's eligible "
        "latents: an explainer describes a latent from its activating explain windows, then a scorer answers 0/1 "
        "for test windows from other documents, half of them activating: *detection* (does the explained feature "
        "occur in the window?) and *fuzzing* (with tokens highlighted: the firing ones, or random ones in "
        "non-activating windows, is the highlighting correct?). Balanced accuracy is from the 0/1 answers "
        "(0.5 = chance). AUROC is from each window's P(\"1\"), read from the answer's token logprobs as delphi does; "
        "for a latent whose windows did not all come with logprobs (a server that gives none, or rejects the "
        "parameter) it is the AUROC of the 0/1 answers, which equals the balanced accuracy. `AUROC from logprobs` "
        "is the share of a dictionary's latent AUROCs read from logprobs (1 = all): compare AUROCs only between "
        "dictionaries with the same share. Failed prompts are left out of every score, never counted as wrong; "
        "`test windows (median)` is the median number of scored windows per latent.",
        "",
        _markdown(pd.DataFrame(rows)),
        "",
    ]
