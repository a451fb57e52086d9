"use strict";
// The feature browser's shared code: data files loaded with <script src> (allowed on file://, where fetch() is
// not), formatting, sortable tables and token windows. Every text from the data is set with textContent or
// append(string), never innerHTML, so a token or an explanation holding <, & or quotes shows as written.

const BAE = (() => {
  const store = {};
  const pending = {};

  function put(key, value) {
    store[key] = value;
  }

  function load(src, key) {
    if (key in store) return Promise.resolve(store[key]);
    if (!pending[key]) {
      pending[key] = new Promise((resolve, reject) => {
        const script = document.createElement("script");
        script.src = src;
        script.onload = () => (key in store ? resolve(store[key]) : reject(new Error(`${src} holds no ${key}`)));
        script.onerror = () => reject(new Error(`cannot read ${src}: run bae browse again`));
        document.head.append(script);
      });
    }
    return pending[key];
  }

  // An element: props are attributes (class, title, href...), `text`, or on<event> listeners; children are
  // nodes or strings (text nodes).
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "text") node.textContent = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child !== undefined && child !== null && child !== false) node.append(child);
    }
    return node;
  }

  // A page is drawn from its hash (latent.html#c=...&l=...): a link that changes only the hash redraws it.
  window.addEventListener("hashchange", () => location.reload());

  const params = () => new URLSearchParams(location.hash.slice(1));
  const link = (page, values) => `${page}.html#${new URLSearchParams(values).toString()}`;

  const missing = (x) => x === null || x === undefined || (typeof x === "number" && Number.isNaN(x));
  const num = (x, digits = 3) => (missing(x) ? "–" : Number(x).toFixed(digits));
  const int = (x) => (missing(x) ? "–" : Math.round(x).toLocaleString("en-US"));
  const pct = (x, digits = 2) => (missing(x) ? "–" : `${(100 * x).toFixed(digits)}%`);
  const interval = (x, low, high) => (missing(x) ? "–" : `${num(x)} [${num(low)}, ${num(high)}]`);

  async function run() {
    return load("data/run.js", "run");
  }

  function dictionary(info, id) {
    const found = info.dictionaries.find((d) => d.coder_id === id);
    if (!found) throw new Error(`no dictionary ${JSON.stringify(id)} in this browser`);
    return found;
  }

  // A dictionary's latents as objects, one per latent, in latent order.
  async function latents(d) {
    const table = await load(`data/${d.dir}/latents.js`, `latents/${d.dir}`);
    if (!table.objects) {
      table.objects = table.rows.map((row) => Object.fromEntries(table.columns.map((c, i) => [c, row[i]])));
    }
    return table.objects;
  }

  const text = (info, d) => load(`data/${info.texts[d.text].file}`, `text/${d.text}`);

  function examples(info, d, latent) {
    const chunk = Math.floor(latent / info.chunk);
    return load(`data/${d.dir}/ex-${chunk}.js`, `ex/${d.dir}/${chunk}`).then((records) => records[latent]);
  }

  function label(d) {
    const kind = d.kind === "skip_transcoder" ? "skip TC" : d.kind === "transcoder" ? "TC" : d.kind;
    if (d.kind === "baseline") return `MLP neurons k=${d.k}`;
    if (d.kind === "control") return d.activation.replace("_", " ");
    return `${d.activation} ${kind} k=${d.k}`;
  }

  function header(info, crumbs) {
    const nav = el("nav", { class: "crumbs" }, el("a", { href: "index.html" }, `bae browse · ${info.name}`));
    for (const [name, href] of crumbs) nav.append(" › ", href ? el("a", { href }, name) : el("span", {}, name));
    nav.append(el("a", { class: "right", href: "compare.html" }, "binary vs continuous"));
    document.getElementById("top").replaceChildren(nav);
  }

  // The page's content (null entries, for sections a page leaves out, are skipped).
  function show(...sections) {
    document.getElementById("main").replaceChildren(...sections.flat().filter((x) => x !== null && x !== undefined));
  }

  function fail(error) {
    const main = document.getElementById("main");
    main.replaceChildren(el("p", { class: "error" }, String(error.message || error)));
    console.warn(error);
  }

  // ---- tokens and windows ----

  const shown = (s) => s.replace(/\r?\n/g, "↵").replace(/\t/g, "→") || "∅";

  // One token: highlighted where `value` is given (binary: on/off; continuous: intensity |value| / max).
  function token(s, value, max, binary) {
    const span = el("span", { class: "tok" }, shown(s));
    if (!missing(value)) {
      span.classList.add("on", binary ? "bin" : "cont");
      if (!binary) span.style.setProperty("--a", Math.min(1, Math.abs(value) / (max || 1)).toFixed(3));
      span.title = binary ? "fires" : `activation ${value}`;
    }
    return span;
  }

  // A window entry [w, positions] (binary) or [w, positions, activations], as a row of tokens with its side and
  // a note (peak activation, or firing tokens).
  function windowRow(words, entry, { binary, max, note }) {
    const [w, positions, values] = entry;
    const at = new Map(positions.map((p, i) => [p, binary ? 1 : values[i]]));
    const side = { E: "explain", T: "test", "-": "neither" }[words.side[w]];
    const peak = binary ? `${positions.length} firing` : `peak ${num(Math.max(0, ...values.map(Math.abs)), 2)}`;
    const tokens = el("div", { class: "tokens" });
    words.windows[w].forEach((t, p) => tokens.append(token(words.vocab[t], at.get(p), max, binary)));
    return el(
      "div",
      { class: "window", "data-window": w },
      el("div", { class: "meta" }, el("span", { class: `side ${side}` }, side), note || peak),
      tokens,
    );
  }

  // ---- a sortable table ----
  // columns: {key, label, title, num (numbers sort descending first), value(row), cell(row) -> node or string}.
  function table(columns, rows, { sortKey, descending } = {}) {
    const head = el("tr");
    const body = el("tbody");
    const trs = rows.map((row) => {
      const tr = el("tr");
      for (const c of columns) {
        const cell = c.cell ? c.cell(row) : c.value(row);
        tr.append(el("td", { class: c.num ? "num" : null }, typeof cell === "number" ? String(cell) : cell));
      }
      return tr;
    });
    body.append(...trs);
    const state = { key: sortKey, descending: !!descending };
    function sort(key, desc) {
      const column = columns.find((c) => c.key === key);
      const sign = desc ? -1 : 1;
      const order = rows.map((_, i) => i);
      order.sort((a, b) => {
        const x = column.value(rows[a]);
        const y = column.value(rows[b]);
        if (missing(x) || missing(y)) return missing(x) - missing(y) || a - b; // blanks last either way
        return (x < y ? -sign : x > y ? sign : 0) || a - b;
      });
      body.append(...order.map((i) => trs[i]));
      state.key = key;
      state.descending = desc;
      for (const th of head.children) {
        const on = th.dataset.key === key;
        th.setAttribute("aria-sort", on ? (desc ? "descending" : "ascending") : "none");
      }
    }
    for (const c of columns) {
      const th = el("th", { "data-key": c.key, title: c.title, class: c.num ? "num" : null, tabindex: 0 }, c.label);
      const click = () => sort(c.key, state.key === c.key ? !state.descending : !!c.num);
      th.addEventListener("click", click);
      th.addEventListener("keydown", (e) => (e.key === "Enter" ? click() : null));
      head.append(th);
    }
    if (state.key) sort(state.key, state.descending);
    const node = el("table", { class: "data" }, el("thead", {}, head), body);
    return { node, trs, rows, sort };
  }

  return {
    put, load, el, params, link, missing, num, int, pct, interval, run, dictionary, latents, text, examples,
    label, header, show, fail, shown, token, windowRow, table,
  };
})();
