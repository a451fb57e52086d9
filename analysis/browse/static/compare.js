"use strict";
// Two dictionaries side by side on the same held-out tokens (a binary coder and its continuous counterpart by
// default): click a token to list the latents that fire on it in each, click a latent to show where it fires.
(async () => {
  const { el, num, link, label } = BAE;
  const info = await BAE.run();
  const p = BAE.params();
  const fallback = info.pairs[0] || info.dictionaries.slice(0, 2).map((d) => d.coder_id);
  const left = BAE.dictionary(info, p.get("b") || fallback[0]);
  const right = BAE.dictionary(info, p.get("c") || fallback[1] || fallback[0]);
  BAE.header(info, [["binary vs continuous", null]]);
  if (left.text !== right.text) {
    throw new Error(`${left.coder_id} and ${right.coder_id} read different held-out splits; pick two dictionaries of one hookpoint`);
  }
  const words = await BAE.text(info, left);
  const load = (d) => Promise.all([BAE.latents(d), BAE.load(`data/${d.dir}/docs.js`, `docs/${d.dir}`)]);
  const [[leftRows, leftDocs], [rightRows, rightDocs]] = await Promise.all([load(left), load(right)]);

  const same = info.dictionaries.filter((d) => d.text === left.text);
  const picker = (name, current) =>
    el("select", { class: "pick", name, onchange: (e) => go(name, e.target.value) }, same.map((d) => el("option", { value: d.coder_id, selected: d === current }, `${label(d)} (${d.coder_id})`)));
  function go(name, id) {
    const values = { b: left.coder_id, c: right.coder_id, [name]: id };
    location.hash = new URLSearchParams(values).toString();
  }

  const panes = [pane(left, leftRows, leftDocs), pane(right, rightRows, rightDocs)];
  const pairs = info.pairs.map(([b, c]) => el("a", { href: link("compare", { b, c }) }, `${label(BAE.dictionary(info, b))} ↔ ${label(BAE.dictionary(info, c))}`));
  BAE.show(
    el("h1", {}, "Binary and continuous on the same held-out tokens"),
    el("p", { class: "note" }, `${words.documents.length} test-side document${words.documents.length === 1 ? "" : "s"} of the held-out split (the first ${Math.max(...words.documents.map((x) => x.tokens.length))} tokens of each). Click a token to list the latents that fire on it in each dictionary; click a latent to highlight where it fires (binary: on/off; continuous: intensity by activation). Hover a token for its strongest latents.`),
    el("p", { class: "note" }, "matched pairs: ", pairs.length ? pairs.flatMap((a, i) => (i ? [" · ", a] : [a])) : "none"),
    el("div", { class: "grid2" }, el("label", {}, "left ", picker("b", left)), el("label", {}, "right ", picker("c", right))),
    el("div", { class: "grid2 compare" }, panes.map((x) => x.node)),
  );
  selectEverywhere(0, 0);
  panes.forEach((x) => x.pin(x.bestLatent()));

  // A token clicked in either pane is selected in both.
  function selectEverywhere(doc, tok) {
    panes.forEach((x) => x.select(doc, tok));
  }

  function pane(d, rows, firing) {
    const byLatent = new Map(rows.map((r) => [r.latent, r]));
    const list = (doc, tok) => {
      const cell = firing[doc][tok];
      if (d.binary) {
        const score = (l) => byLatent.get(l)?.token_auroc ?? -1;
        return [...cell].sort((a, b) => score(b) - score(a) || a - b).map((l) => [l, 1]);
      }
      return cell[0].map((l, i) => [l, cell[1][i]]);
    };
    const spans = [];
    const docs = words.documents.map((doc, i) => {
      const tokens = el("div", { class: "tokens" });
      spans.push(
        doc.tokens.map((t, j) => {
          const fired = list(i, j);
          const span = BAE.token(words.vocab[t]);
          const strongest = fired.slice(0, 5).map(([l, v]) => (d.binary ? `#${l}` : `#${l} (${num(v, 2)})`));
          span.title = `${fired.length} latents fire${fired.length ? `: ${strongest.join(", ")}${fired.length > 5 ? ", …" : ""}` : ""}`;
          span.addEventListener("click", () => selectEverywhere(i, j));
          tokens.append(span);
          return span;
        }),
      );
      return el("div", { class: "doc" }, el("h3", {}, doc.id), tokens);
    });
    const details = el("div", { class: "firing" });
    const heading = el("p", { class: "note" });
    let pinned = null;
    let selected = [0, 0];

    function select(doc, tok) {
      spans[selected[0]][selected[1]].classList.remove("selected");
      selected = [doc, tok];
      spans[doc][tok].classList.add("selected");
      const fired = list(doc, tok);
      heading.textContent = `token ${JSON.stringify(words.vocab[words.documents[doc].tokens[tok]])} (document ${doc + 1}, position ${tok}): ${fired.length} latents fire`;
      const body = fired.map(([l, v]) => {
        const r = byLatent.get(l) || {};
        const id = r.examples ? el("a", { href: link("latent", { c: d.coder_id, l }), onclick: (e) => e.stopPropagation() }, `#${l}`) : `#${l}`;
        return el(
          "tr",
          { class: l === pinned ? "pinned" : null, "data-latent": l, onclick: () => pin(l === pinned ? null : l) },
          el("td", {}, id),
          d.binary ? null : el("td", { class: "num" }, num(v, 2)),
          el("td", { class: "num" }, num(r.token_auroc)),
          el("td", {}, r.explanation || (r.eligible ? "" : "not scored")),
        );
      });
      const head = el("tr", {}, el("th", {}, "latent"), d.binary ? null : el("th", { class: "num" }, "act."), el("th", { class: "num" }, "AUROC"), el("th", {}, "explanation"));
      details.replaceChildren(el("table", { class: "data" }, el("thead", {}, head), el("tbody", {}, body)));
    }

    function pin(latent) {
      pinned = latent;
      let max = 0;
      const values = spans.map((doc, i) => doc.map((_, j) => {
        const hit = list(i, j).find(([l]) => l === latent);
        if (hit) max = Math.max(max, Math.abs(hit[1]));
        return hit ? hit[1] : null;
      }));
      spans.forEach((doc, i) => doc.forEach((span, j) => {
        const v = values[i][j];
        span.classList.remove("on", "bin", "cont");
        span.style.removeProperty("--a");
        if (v === null) return;
        span.classList.add("on", d.binary ? "bin" : "cont");
        if (!d.binary) span.style.setProperty("--a", (Math.abs(v) / (max || 1)).toFixed(3));
      }));
      for (const tr of details.querySelectorAll("tr[data-latent]")) tr.classList.toggle("pinned", Number(tr.dataset.latent) === latent);
      const r = byLatent.get(latent);
      pinNote.textContent = latent === null ? "no latent highlighted" : `highlighted: latent #${latent}${r && r.explanation ? `, ${r.explanation}` : ""}`;
    }

    const pinNote = el("p", { class: "note" });
    const node = el(
      "div",
      { class: "pane", "data-coder": d.coder_id },
      el("h2", {}, el("a", { href: link("coder", { c: d.coder_id }) }, label(d))),
      el("p", { class: "note" }, `${d.coder_id} · FVU ${num(d.fvu)} · L0 ${num(d.l0_heldout, 1)} · token AUROC ${num(d.token_auroc)} · ${d.binary ? "binary" : "continuous"}`),
      heading,
      details,
      pinNote,
      docs,
    );
    // The best-explained latent firing on the selected token (the first one where none is scored).
    function bestLatent() {
      const fired = list(selected[0], selected[1]).map(([l]) => l);
      const score = (l) => byLatent.get(l)?.token_auroc ?? -1;
      return fired.reduce((best, l) => (best === null || score(l) > score(best) ? l : best), null);
    }
    return { node, select, pin, bestLatent };
  }
})().catch(BAE.fail);
