"use strict";
// One latent: its explanation, its scores with what they rest on, its firing, an activation histogram
// (continuous latents) and its windows: top-activating, the test windows it was scored on (by decile of the
// window's peak for continuous latents), and non-activating test windows.
(async () => {
  const { el, num, int, pct, link, label } = BAE;
  const info = await BAE.run();
  const p = BAE.params();
  const d = BAE.dictionary(info, p.get("c"));
  const latent = Number(p.get("l"));
  const rows = await BAE.latents(d);
  const r = rows.find((x) => x.latent === latent);
  if (!r) throw new Error(`${d.coder_id} has no latent ${p.get("l")}`);
  BAE.header(info, [[label(d), link("coder", { c: d.coder_id })], [`latent ${latent}`, null]]);
  document.title = `bae browse: ${label(d)} latent ${latent}`;
  const text = info.texts[d.text];
  const [words, record] = await Promise.all([BAE.text(info, d), r.examples ? BAE.examples(info, d, latent) : null]);
  const binary = d.binary;
  const card = (k, v, b) => el("div", { class: "card" }, el("div", { class: "k" }, k), el("div", { class: "v" }, v), b ? el("div", { class: "b" }, b) : null);

  // Neighbours with a page, for prev / next.
  const paged = rows.filter((x) => x.examples).map((x) => x.latent);
  const at = paged.indexOf(latent);
  const step = (j, name) => (j >= 0 && j < paged.length ? el("a", { href: link("latent", { c: d.coder_id, l: paged[j] }) }, name) : el("span", { class: "muted" }, name));

  const rules = (r.explanation || "").split("; ").filter(Boolean);
  const explanation = el(
    "div",
    { class: "explanation" },
    el("h3", {}, "Lexical explanation: token and bigram rules (p = precision on the explain windows, hits / matches)"),
    rules.length ? el("ul", {}, rules.map((rule) => el("li", {}, el("code", {}, rule)))) : el("p", { class: "note" }, "none: the latent was not scored"),
    BAE.missing(r.llm_explanation) ? null : el("h3", {}, `LLM judge's explanation (${r.judge_model || "model unknown"}, prompts v${r.prompt_version ?? "?"})`),
    BAE.missing(r.llm_explanation) ? null : el("p", {}, r.llm_explanation),
  );

  const tests = `${r.test_activating_windows} activating + ${r.test_nonactivating_windows} non-activating test windows`;
  const scoreRows = [
    ["token AUROC (headline)", num(r.token_auroc), `${tests} (${int((r.test_activating_windows + r.test_nonactivating_windows) * info.window)} tokens)`],
    ["window AUROC", num(r.window_auroc), tests],
    ["window balanced accuracy", num(r.window_balanced_accuracy), tests],
    ["window F1", num(r.window_f1), `${tests}; answering "fires" everywhere gives 0.667`],
    ["shuffled control, token AUROC", num(r.shuffled_token_auroc), "the same windows with firing moved to random windows; expect ~0.5"],
    ["shuffled control, window AUROC", num(r.shuffled_window_auroc), "the same"],
    ["explanation fitted on", "", `${r.explain_activating_windows} activating + ${r.explain_activating_windows} non-activating explain windows`],
  ];
  if (Array.isArray(r.decile_token_auroc) && record && record.test) {
    r.decile_token_auroc.forEach((score, i) => {
      const n = record.test.filter((t) => t[1] === i).length;
      scoreRows.push([`token AUROC, decile ${i + 1} of 10`, num(score), `${n} activating test windows of this decile of peaks, with the non-activating ones`]);
    });
  }
  for (const task of ["detection", "fuzzing"]) {
    if (BAE.missing(r[`${task}_balanced_accuracy`])) continue;
    const basis = `${r[`${task}_windows`]} test windows; ${r.llm_prompts} prompts, ${r.llm_failed_prompts} failed`;
    scoreRows.push([`LLM ${task}, balanced accuracy`, num(r[`${task}_balanced_accuracy`]), basis]);
    scoreRows.push([`LLM ${task}, accuracy / F1`, `${num(r[`${task}_accuracy`])} / ${num(r[`${task}_f1`])}`, basis]);
  }
  const scores = el(
    "table",
    { class: "data scores" },
    el("thead", {}, el("tr", {}, el("th", {}, "score"), el("th", { class: "num" }, "value"), el("th", {}, "based on"))),
    el("tbody", {}, scoreRows.map(([k, v, b]) => el("tr", {}, el("td", {}, k), el("td", { class: "num" }, v), el("td", { class: "muted" }, b)))),
  );

  const why = r.eligible
    ? `eligible: ${r.activating_windows} activating windows (at least ${d.min_examples} needed)`
    : !r.firing_count
      ? "never fires on the held-out split"
      : r.activating_windows < d.min_examples
        ? `not scored: ${r.activating_windows} activating windows, fewer than the ${d.min_examples} needed`
        : "not scored: the explain or the test side has no activating or no non-activating window";
  const firing = el(
    "div",
    { class: "cards" },
    card("firing rate", pct(r.firing_rate, 3), `${int(r.firing_count)} of ${int(text.tokens)} held-out tokens`),
    card("activating windows", int(r.activating_windows), `of ${int(text.windows)}`),
    binary ? card("activation", "0 or 1", "binary") : card("max activation", record ? num(record.max, 3) : "–", "on held-out tokens"),
    card("scored", r.eligible ? "yes" : "no", why),
  );

  const redrawn = record ? [!!record.test, record.test_activating || 0] : null;
  const differs = redrawn && (redrawn[0] !== !!r.eligible || redrawn[1] !== (r.test_activating_windows || 0));
  const sections = [
    el("h1", {}, `${label(d)} · latent ${latent}`),
    differs ? el("p", { class: "warn" }, `These test windows (${redrawn[1]}) are not the ${r.test_activating_windows} the score rests on: the cache or the coder changed since bae score.`) : null,
    el("p", { class: "note" }, `${d.coder_id} · `, step(at - 1, "← previous"), " · ", step(at + 1, "next →"), " · ", el("a", { href: link("coder", { c: d.coder_id }) }, "all latents")),
    explanation,
    el("h2", {}, `Scores: ${info.score_label}`),
    r.eligible ? scores : el("p", { class: "note" }, why),
    el("h2", {}, "Firing"),
    firing,
  ];
  if (!record) {
    sections.push(el("p", { class: "note" }, r.firing_count ? "No examples in this browser for this latent (see bae browse --latents)." : why));
  } else {
    if (record.hist) sections.push(el("h3", {}, "Activations where it fires"), histogram(record.hist));
    const opts = { binary, max: record.max };
    const top = binary ? "Windows where it fires on most tokens" : "Top-activating windows";
    sections.push(el("h2", {}, `${top} (${record.top.length} of ${r.activating_windows} activating windows, both sides)`));
    sections.push(el("div", {}, record.top.map((w) => BAE.windowRow(words, w, opts))));
    if (record.test) {
      const drawn = record.test.some((t) => t[1] >= 0);
      sections.push(el("h2", {}, `Activating test windows the score rests on (${record.test.length})`));
      sections.push(el("p", { class: "note" }, drawn ? "Drawn evenly across deciles of the window's peak activation, highest decile first." : binary ? "Drawn uniformly: a binary latent's peak is always 1." : "Drawn uniformly: fewer than ten activating test windows."));
      const groups = drawn ? [9, 8, 7, 6, 5, 4, 3, 2, 1, 0] : [-1];
      for (const g of groups) {
        const peak = (t) => (binary ? t[2].length : Math.max(...t[3].map(Math.abs)));
        const members = record.test.filter((t) => t[1] === g).sort((a, b) => peak(b) - peak(a));
        if (!members.length) continue;
        if (drawn) sections.push(el("h3", {}, `decile ${g + 1} of 10 (${members.length} windows)`));
        sections.push(el("div", {}, members.map(([w, , ...rest]) => BAE.windowRow(words, [w, ...rest], opts))));
      }
      sections.push(el("h2", {}, `Non-activating test windows (${record.off.length} of ${record.test_nonactivating})`));
      sections.push(el("div", {}, record.off.map((w) => BAE.windowRow(words, [w, [], []], { ...opts, note: "does not fire" }))));
    }
  }
  BAE.show(...sections);

  function histogram(h) {
    const svg = (tag, attrs, ...kids) => {
      const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
      for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
      node.append(...kids);
      return node;
    };
    const [w, hgt, pad] = [520, 130, 28];
    const top = Math.max(...h.counts, 1);
    const bw = (w - 2 * pad) / h.counts.length;
    const bars = h.counts.map((c, i) => {
      const bh = ((hgt - 2 * pad) * c) / top;
      const lo = h.lo + ((h.hi - h.lo) * i) / h.counts.length;
      const rect = svg("rect", { x: pad + i * bw + 1, y: hgt - pad - bh, width: Math.max(bw - 2, 1), height: bh });
      rect.append(svg("title", {}, `${num(lo, 3)} to ${num(lo + (h.hi - h.lo) / h.counts.length, 3)}: ${c} tokens`));
      return rect;
    });
    return svg(
      "svg",
      { class: "hist", width: w, height: hgt, role: "img", "aria-label": "activation histogram" },
      svg("line", { x1: pad, x2: w - pad, y1: hgt - pad, y2: hgt - pad }),
      ...bars,
      svg("text", { x: pad, y: hgt - 10 }, num(h.lo, 3)),
      svg("text", { x: w - pad, y: hgt - 10, "text-anchor": "end" }, num(h.hi, 3)),
      svg("text", { x: pad, y: 14 }, `${top} tokens (tallest bar); ${h.counts.reduce((a, b) => a + b, 0)} in all`),
    );
  }
})().catch(BAE.fail);
