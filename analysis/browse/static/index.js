"use strict";
// The index: the run, how it was scored, and one row per dictionary with its key numbers.
(async () => {
  const { el, num, int, pct, interval, link, label } = BAE;
  const info = await BAE.run();
  BAE.header(info, []);
  document.title = `bae browse: ${info.name}`;
  const first = info.dictionaries[0] || {};
  const texts = info.texts.map((t) =>
    el(
      "li",
      {},
      `${t.hookpoint}: ${int(t.tokens)} held-out tokens in ${int(t.windows)} windows of ${info.window} tokens ` +
        `(${int(t.explain_windows)} on the explain side, ${int(t.test_windows)} on the test side, ` +
        `${int(t.documents)} documents)`,
    ),
  );
  const judged = info.dictionaries.some((d) => !BAE.missing(d.detection_balanced_accuracy));
  const columns = [
    {
      key: "dictionary",
      label: "dictionary",
      value: (d) => label(d),
      cell: (d) => el("a", { href: link("coder", { c: d.coder_id }) }, label(d)),
    },
    { key: "coder_id", label: "id", value: (d) => d.coder_id, cell: (d) => el("span", { class: "muted" }, d.coder_id) },
    { key: "hookpoint", label: "hookpoint", value: (d) => d.hookpoint },
    { key: "k", label: "k", num: true, value: (d) => d.k },
    { key: "fvu", label: "FVU", num: true, title: "fraction of variance unexplained (held-out)", value: (d) => d.fvu, cell: (d) => num(d.fvu) },
    { key: "l0", label: "L0", num: true, title: "latents firing per held-out token", value: (d) => d.l0_heldout, cell: (d) => num(d.l0_heldout, 1) },
    { key: "lr", label: "loss rec.", num: true, title: "loss recovered with the coder spliced in", value: (d) => d.loss_recovered, cell: (d) => num(d.loss_recovered, 2) },
    {
      key: "auroc",
      label: "token AUROC [95% CI]",
      num: true,
      title: "mean lexical token AUROC over eligible latents, bootstrap interval over latents",
      value: (d) => d.token_auroc,
      cell: (d) => interval(d.token_auroc, d.token_auroc_ci_low, d.token_auroc_ci_high),
    },
    {
      key: "weighted",
      label: "freq-weighted",
      num: true,
      title: "token AUROC weighted by firing count",
      value: (d) => d.token_auroc_weighted,
      cell: (d) => num(d.token_auroc_weighted),
    },
    ...(judged
      ? [
          { key: "det", label: "LLM detection", num: true, value: (d) => d.detection_balanced_accuracy, cell: (d) => num(d.detection_balanced_accuracy) },
          { key: "fuz", label: "LLM fuzzing", num: true, value: (d) => d.fuzzing_balanced_accuracy, cell: (d) => num(d.fuzzing_balanced_accuracy) },
        ]
      : []),
    {
      key: "eligible",
      label: "eligible / latents",
      num: true,
      title: "latents with enough activating windows to be scored",
      value: (d) => d.eligible,
      cell: (d) => `${int(d.eligible)} / ${int(d.latents)}`,
    },
    {
      key: "tests",
      label: "test windows",
      num: true,
      title: "median activating test windows per eligible latent (underpowered below 20)",
      value: (d) => d.test_windows_median,
      cell: (d) => `${num(d.test_windows_median, 0)}${d.underpowered ? " (underpowered)" : ""}`,
    },
    { key: "dead", label: "dead", num: true, value: (d) => d.dead_fraction, cell: (d) => pct(d.dead_fraction, 1) },
    { key: "pages", label: "pages", num: true, title: "latents with examples in this browser", value: (d) => d.examples, cell: (d) => int(d.examples) },
  ];
  const coders = BAE.table(columns, info.dictionaries);
  const pairs = info.pairs.map(([b, c]) => {
    const [bd, cd] = [BAE.dictionary(info, b), BAE.dictionary(info, c)];
    return el("li", {}, el("a", { href: link("compare", { b, c }) }, `${label(bd)}  ↔  ${label(cd)}`));
  });
  BAE.show(
    el("h1", {}, info.name),
    el("p", { class: "note" }, `run ${info.run}; browser written ${info.generated}`),
    el(
      "p",
      { class: "note" },
      `Scores are ${info.score_label}: a proxy that under-scores latents tracking context, not the paper's LLM judge. ` +
        `Windows are drawn as bae score drew them (min_examples ${first.min_examples}, up to ` +
        `${first.scoring_test_windows} activating test windows per latent, seed ${first.scoring_seed}). ` +
        `Latent pages: ${info.latents_option === "all" ? "every latent that fires on the held-out split" : info.latents_option}.`,
    ),
    el("ul", { class: "note" }, texts),
    el("h2", {}, `Dictionaries (${info.dictionaries.length})`),
    el("div", { class: "wrap" }, coders.node),
    el("h2", {}, "Binary and continuous side by side"),
    pairs.length ? el("ul", {}, pairs) : el("p", { class: "note" }, "No binary coder has a continuous counterpart here."),
  );
})().catch(BAE.fail);
