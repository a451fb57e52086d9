"use strict";
// One dictionary: its key numbers and a table of its latents, sortable (click a header) and filterable.
(async () => {
  const { el, num, int, pct, interval, link, label } = BAE;
  const info = await BAE.run();
  const id = BAE.params().get("c");
  const d = BAE.dictionary(info, id);
  BAE.header(info, [[label(d), null]]);
  document.title = `bae browse: ${label(d)}`;
  const rows = await BAE.latents(d);
  const judged = rows.some((r) => !BAE.missing(r.llm_explanation));
  const card = (k, v, b) => el("div", { class: "card" }, el("div", { class: "k" }, k), el("div", { class: "v" }, v), b ? el("div", { class: "b" }, b) : null);

  const columns = [
    {
      key: "latent",
      label: "latent",
      num: true,
      value: (r) => r.latent,
      cell: (r) => (r.examples ? el("a", { href: link("latent", { c: d.coder_id, l: r.latent }) }, String(r.latent)) : String(r.latent)),
    },
    { key: "explanation", label: "explanation (lexical rules)", value: (r) => r.explanation || "", cell: (r) => el("span", { class: "expl-text" }, r.explanation || "") },
    ...(judged ? [{ key: "llm", label: "LLM explanation", value: (r) => r.llm_explanation || "", cell: (r) => r.llm_explanation || "" }] : []),
    { key: "token_auroc", label: "token AUROC", num: true, title: "lexical token AUROC on the test windows", value: (r) => r.token_auroc, cell: (r) => num(r.token_auroc) },
    { key: "window_f1", label: "window F1", num: true, value: (r) => r.window_f1, cell: (r) => num(r.window_f1) },
    { key: "shuffled", label: "shuffled", num: true, title: "shuffled control (expect ~0.5)", value: (r) => r.shuffled_token_auroc, cell: (r) => num(r.shuffled_token_auroc) },
    ...(judged
      ? [
          { key: "det", label: "detection", num: true, title: "LLM judge, detection balanced accuracy", value: (r) => r.detection_balanced_accuracy, cell: (r) => num(r.detection_balanced_accuracy) },
          { key: "fuz", label: "fuzzing", num: true, title: "LLM judge, fuzzing balanced accuracy", value: (r) => r.fuzzing_balanced_accuracy, cell: (r) => num(r.fuzzing_balanced_accuracy) },
        ]
      : []),
    { key: "firing_rate", label: "firing rate", num: true, title: "share of held-out tokens it fires on", value: (r) => r.firing_rate, cell: (r) => pct(r.firing_rate, 3) },
    { key: "firing_count", label: "fires", num: true, title: "held-out tokens it fires on", value: (r) => r.firing_count, cell: (r) => int(r.firing_count) },
    { key: "activating", label: "act. windows", num: true, value: (r) => r.activating_windows, cell: (r) => int(r.activating_windows) },
    {
      key: "tests",
      label: "test windows",
      num: true,
      title: "activating + non-activating test windows the score rests on",
      value: (r) => r.test_activating_windows,
      cell: (r) => (r.eligible ? `${r.test_activating_windows} + ${r.test_nonactivating_windows}` : "–"),
    },
    { key: "eligible", label: "eligible", value: (r) => (r.eligible ? 1 : 0), cell: (r) => (r.eligible ? "yes" : "no") },
  ];
  const latents = BAE.table(columns, rows, { sortKey: "latent" });
  latents.trs.forEach((tr) => tr.children[1].classList.add("expl"));

  const input = (name, props) => el("input", { name, ...props });
  const form = el(
    "form",
    { class: "filters", onsubmit: (e) => e.preventDefault() },
    el("label", {}, "token AUROC from", input("smin", { type: "number", step: "0.01", min: 0, max: 1 })),
    el("label", {}, "to", input("smax", { type: "number", step: "0.01", min: 0, max: 1 })),
    el("label", {}, "firing rate from (%)", input("fmin", { type: "number", step: "any", min: 0 })),
    el("label", {}, "to (%)", input("fmax", { type: "number", step: "any", min: 0 })),
    el(
      "label",
      {},
      "latents",
      el(
        "select",
        { name: "which" },
        el("option", { value: "all" }, "all"),
        el("option", { value: "eligible" }, "eligible"),
        el("option", { value: "ineligible" }, "not eligible"),
        el("option", { value: "pages" }, "with a page"),
      ),
    ),
    el("label", {}, "explanation contains", input("q", { type: "search", placeholder: "e.g. ' the'" })),
  );
  const count = el("p", { class: "note", id: "count" });
  function apply() {
    const f = new FormData(form);
    const bound = (name, scale = 1) => (f.get(name) === "" ? null : Number(f.get(name)) / scale);
    const [smin, smax, fmin, fmax] = [bound("smin"), bound("smax"), bound("fmin", 100), bound("fmax", 100)];
    const which = f.get("which");
    const kept = { all: () => true, eligible: (r) => r.eligible, ineligible: (r) => !r.eligible, pages: (r) => r.examples };
    const q = String(f.get("q") || "").toLowerCase();
    let shown = 0;
    rows.forEach((r, i) => {
      const score = r.token_auroc;
      const ok =
        (smin === null || (!BAE.missing(score) && score >= smin)) &&
        (smax === null || (!BAE.missing(score) && score <= smax)) &&
        (fmin === null || r.firing_rate >= fmin) &&
        (fmax === null || r.firing_rate <= fmax) &&
        kept[which](r) &&
        (!q || `${r.explanation || ""} ${r.llm_explanation || ""}`.toLowerCase().includes(q));
      latents.trs[i].hidden = !ok;
      shown += ok;
    });
    count.textContent = `showing ${shown} of ${rows.length} latents`;
  }
  form.addEventListener("input", apply);
  apply();

  const mismatch = d.mismatched
    ? el("p", { class: "warn" }, `The redrawn test windows of ${d.mismatched} latent(s) differ in number from latents.parquet's: the cache or the coder changed since bae score, so their windows are not the ones scored.`)
    : null;
  BAE.show(
    el("h1", {}, `${label(d)}`),
    el("p", { class: "note" }, `${d.coder_id} · ${d.dictionary} on ${d.hookpoint}${d.trial_id ? ` · trial ${d.trial_id}` : ""}`),
    el(
      "div",
      { class: "cards" },
      card("FVU", num(d.fvu), "held-out"),
      card("L0", num(d.l0_heldout, 1), `k = ${d.k}`),
      card("loss recovered", num(d.loss_recovered, 2)),
      card("token AUROC", interval(d.token_auroc, d.token_auroc_ci_low, d.token_auroc_ci_high), "95% CI over latents"),
      card("freq-weighted", num(d.token_auroc_weighted), "by firing count"),
      card("eligible", `${int(d.eligible)} / ${int(d.latents)}`, `${int(d.alive)} alive`),
      card("test windows", num(d.test_windows_median, 0), d.underpowered ? "median, underpowered" : "median per latent"),
      card("shuffled", num(d.shuffled_token_auroc), "control, expect 0.5"),
    ),
    mismatch,
    form,
    count,
    el("div", { class: "wrap" }, latents.node),
  );
})().catch(BAE.fail);
