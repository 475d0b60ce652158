// flowproof live web view: the flow matrix, open mismatches and each flow's explanation, kept
// current by server-sent events. No framework, no external assets; all data goes in through
// textContent, never as HTML.
(() => {
  "use strict";

  const ORDER = [
    "REQUIRED_BLOCKED", "FORBIDDEN_OPEN", "POLICY_MISMATCH", "ENFORCEMENT_DRIFT",
    "INCONCLUSIVE", "MODEL_INCOMPLETE", "STALE", "PENDING", "PASS",
  ];
  const FAILING = new Set(ORDER.slice(0, 4));
  const LOOK = {
    PASS: ["✓", "pass", "intent, model and reality agree"],
    REQUIRED_BLOCKED: ["✕", "blocked", "required flow blocked: declared allow, the packets do not get through"],
    FORBIDDEN_OPEN: ["!", "open", "forbidden flow open: declared deny, the packets get through"],
    POLICY_MISMATCH: ["≠", "policy", "policy mismatch: the policies disagree with the intent"],
    ENFORCEMENT_DRIFT: ["≈", "drift", "enforcement drift: the network does not do what the policies say"],
    INCONCLUSIVE: ["?", "unsure", "inconclusive: the probe could not decide"],
    MODEL_INCOMPLETE: ["◌", "unmodelled", "model incomplete: policies flowproof does not model may decide this flow"],
    STALE: ["◷", "stale", "stale: the last result is too old"],
    PENDING: ["…", "pending", "pending: not probed yet"],
  };
  const NAME = {
    PASS: "pass", REQUIRED_BLOCKED: "required blocked", FORBIDDEN_OPEN: "forbidden open",
    POLICY_MISMATCH: "policy mismatch", ENFORCEMENT_DRIFT: "enforcement drift",
    INCONCLUSIVE: "inconclusive", MODEL_INCOMPLETE: "model incomplete", STALE: "stale",
    PENDING: "pending",
  };
  const MAX_MISMATCHES = 200;
  // Evidence statuses, worst first, each drawn in the colours of the flow status it resembles.
  const EVIDENCE = {
    NOT_ENFORCED: ["✕", "not enforced", "REQUIRED_BLOCKED", "a witness contradicts the policy: the network does not enforce it as written"],
    PENDING: ["…", "pending", "PENDING", "not every witness has passed yet"],
    UNPROVABLE: ["∅", "unprovable", "STALE", "no witness can exist (the reason says why)"],
    PROVEN: ["✓", "proven", "PASS", "every witness passed: the policy is enforced as written"],
  };
  const EVIDENCE_ORDER = Object.keys(EVIDENCE);
  const KIND = { declared: "declared", witness: "witness", sweep: "sweep" };

  const rank = (s) => { const i = ORDER.indexOf(s); return i < 0 ? ORDER.length : i; };
  const worst = (statuses) => {
    let best = null;
    for (const s of statuses) if (best === null || rank(s) < rank(best)) best = s;
    return best;
  };
  const $ = (id) => document.getElementById(id);

  // State, readable from tests and benchmarks as window.flowproof.
  const S = {
    rows: new Map(),            // key -> ConcreteRow
    sources: [], destinations: [],
    cellKeys: new Map(),        // "src\u0000dst" -> [keys]
    cellEls: new Map(),         // "src\u0000dst" -> td
    structure: "",
    active: { src: null, dst: null },
    dirty: new Set(),
    summary: null,
    policies: [],               // PolicyEvidence, worst first
    witnessOf: new Map(),       // witness flow key -> [policy id]
    policy: null,               // {id, returnTo}
    panels: [],                 // open panels, the topmost last (Esc closes it)
    drill: null,                // {src, dst, returnTo}
    explain: null,              // {key, returnTo}
    live: false,
    everConnected: false,
    firstPaintMs: null,
    lastEvent: null,
    eventsApplied: 0,
    loads: 0,                   // how often everything was (re)loaded
    resyncing: false,
  };
  window.flowproof = S;

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (v === undefined || v === null || v === false) continue;
        if (k === "class") node.className = v;
        else if (k === "text") node.textContent = v;
        else if (k === "dataset") Object.assign(node.dataset, v);
        else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
        else node.setAttribute(k, v === true ? "" : String(v));
      }
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function badge(status, extra) {
    const [sym, short] = LOOK[status] || ["·", status];
    return el("span", { class: "badge", dataset: { status }, title: LOOK[status] ? LOOK[status][2] : status },
      el("span", { class: "sym", "aria-hidden": "true", text: sym }),
      extra === undefined ? short : `${short} ${extra}`);
  }

  function evidenceBadge(status) {
    const [sym, short, tone, title] = EVIDENCE[status] || ["·", status, status, status];
    return el("span", { class: "badge", dataset: { status: tone }, title },
      el("span", { class: "sym", "aria-hidden": "true", text: sym }), short);
  }

  function undeclaredName(row) {
    return row.kind === "witness" ? "policy witness" : row.kind === "sweep" ? "truth-table sweep" : row.kind;
  }

  function fmtTime(ts) {
    if (ts === null || ts === undefined) return "never";
    const d = new Date(ts * 1000);
    return d.toLocaleTimeString([], { hour12: false });
  }
  function ago(ts) {
    if (ts === null || ts === undefined) return "never";
    const s = Math.max(0, Date.now() / 1000 - ts);
    if (s < 60) return `${Math.round(s)} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    return `${Math.round(s / 3600)} h ago`;
  }
  function ms(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    return seconds < 1 ? `${(seconds * 1000).toFixed(1)} ms` : `${seconds.toFixed(2)} s`;
  }

  async function getJSON(path) {
    const response = await fetch(path, { headers: { Accept: "application/json" }, cache: "no-store" });
    if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
    return response.json();
  }

  // --- filters -----------------------------------------------------------------------------

  function filters() {
    return {
      namespace: $("f-namespace").value,
      status: $("f-status").value,
      text: $("f-text").value.trim().toLowerCase(),
      drift: $("f-drift").checked,
    };
  }

  function visible(row, f) {
    if (!f.drift && row.kind !== "declared") return false;
    if (f.namespace && row.sourceNamespace !== f.namespace && row.destinationNamespace !== f.namespace) return false;
    if (f.status && row.status !== f.status) return false;
    if (f.text) {
      const hay = `${row.key} ${row.declared || ""} ${row.reason} ${row.sourceGroup} ${row.destinationGroup}`.toLowerCase();
      if (!hay.includes(f.text)) return false;
    }
    return true;
  }

  function fillFilterChoices() {
    const select = $("f-namespace");
    const current = select.value;
    const names = new Set();
    for (const row of S.rows.values()) {
      names.add(row.sourceNamespace);
      if (row.destinationNamespace) names.add(row.destinationNamespace);
    }
    const sorted = [...names].sort();
    const have = [...select.options].slice(1).map((o) => o.value);
    if (have.join("\n") !== sorted.join("\n")) {
      select.replaceChildren(el("option", { value: "", text: "all" }),
        ...sorted.map((n) => el("option", { value: n, text: n })));
      select.value = sorted.includes(current) ? current : "";
    }
    const status = $("f-status");
    if (status.options.length === 1) {
      for (const s of ORDER) status.append(el("option", { value: s, text: `${LOOK[s][0]} ${NAME[s]}` }));
    }
  }

  function renderLegend() {
    $("legend").replaceChildren(...ORDER.map((s) => el("li", null, badge(s, `= ${NAME[s]}`))));
  }

  // --- the matrix --------------------------------------------------------------------------

  const cellId = (src, dst) => `${src}\u0000${dst}`;
  const groupOrder = (a, b) =>
    (a.namespace === "") - (b.namespace === "") || a.namespace.localeCompare(b.namespace) || a.name.localeCompare(b.name);

  function computeGrid() {
    const f = filters();
    const sources = new Map(), destinations = new Map(), cells = new Map();
    for (const row of S.rows.values()) {
      if (!visible(row, f)) continue;
      if (!sources.has(row.sourceGroup)) {
        sources.set(row.sourceGroup, { id: row.sourceGroup, namespace: row.sourceNamespace, name: row.sourceGroup.slice(row.sourceGroup.indexOf("/") + 1) });
      }
      if (!destinations.has(row.destinationGroup)) {
        destinations.set(row.destinationGroup, { id: row.destinationGroup, namespace: row.destinationNamespace, name: row.destinationGroup.slice(row.destinationGroup.indexOf("/") + 1) });
      }
      const id = cellId(row.sourceGroup, row.destinationGroup);
      if (!cells.has(id)) cells.set(id, []);
      cells.get(id).push(row.key);
    }
    return {
      sources: [...sources.values()].sort(groupOrder),
      destinations: [...destinations.values()].sort(groupOrder),
      cells,
    };
  }

  function groupLabel(group) {
    return group.namespace ? `${group.namespace}/${group.name}` : `${group.name} (outside the cluster)`;
  }

  function paintCell(td, src, dst) {
    const keys = S.cellKeys.get(cellId(src.id, dst.id)) || [];
    const where = `${groupLabel(src)} to ${groupLabel(dst)}`;
    if (!keys.length) {
      td.className = "none";
      delete td.dataset.status;
      td.replaceChildren();
      td.setAttribute("aria-label", `${where}: no flow`);
      td.removeAttribute("title");
      return;
    }
    const counts = new Map();
    for (const key of keys) {
      const status = S.rows.get(key).status;
      counts.set(status, (counts.get(status) || 0) + 1);
    }
    const status = worst(counts.keys());
    const detail = ORDER.filter((s) => counts.has(s)).map((s) => `${counts.get(s)} ${NAME[s]}`).join(", ");
    const label = `${where}: ${NAME[status]}; ${keys.length} flow${keys.length === 1 ? "" : "s"} (${detail})`;
    if (td.dataset.status && td.dataset.status !== status) {
      td.classList.remove("flash");
      void td.offsetWidth; // restart the animation
      td.classList.add("flash");
    }
    td.classList.remove("none");
    td.dataset.status = status;
    td.replaceChildren(
      el("span", { class: "sym", "aria-hidden": "true", text: LOOK[status][0] }),
      LOOK[status][1],
      el("span", { class: "n", "aria-hidden": "true", text: `×${keys.length}` }),
    );
    td.setAttribute("aria-label", label);
    td.title = label;
  }

  function renderMatrix() {
    const hadFocus = $("matrix").contains(document.activeElement);
    const grid = computeGrid();
    S.sources = grid.sources;
    S.destinations = grid.destinations;
    S.cellKeys = grid.cells;
    S.cellEls = new Map();
    S.structure = structureOf(grid);
    const table = $("matrix");
    $("matrix-empty").hidden = grid.sources.length > 0;
    const head = el("tr", null, el("th", { class: "corner", scope: "col", text: "source ↓ · destination →" }));
    for (const dst of grid.destinations) {
      head.append(el("th", { scope: "col", title: groupLabel(dst) },
        el("span", { class: "ns", text: dst.namespace || "outside" }), dst.name));
    }
    const body = document.createDocumentFragment();
    grid.sources.forEach((src, r) => {
      const tr = el("tr", null, el("th", { scope: "row", title: groupLabel(src) },
        el("span", { class: "ns", text: src.namespace }), src.name));
      grid.destinations.forEach((dst, c) => {
        const td = el("td", { role: "gridcell", tabindex: "-1", dataset: { r, c } });
        paintCell(td, src, dst);
        S.cellEls.set(cellId(src.id, dst.id), td);
        tr.append(td);
      });
      body.append(tr);
    });
    const tbody = el("tbody");
    tbody.append(body);
    table.replaceChildren(el("thead", null, head), tbody);
    const active = activeCell() || table.querySelector("td[data-status]") || table.querySelector("td");
    if (active) setActive(active, false);
    if (active && hadFocus) active.focus({ preventScroll: true });  // a redraw keeps the focus
  }

  function structureOf(grid) {
    return `${grid.sources.map((g) => g.id).join("\n")}\u0001${grid.destinations.map((g) => g.id).join("\n")}\u0001${[...grid.cells.keys()].join("\n")}`;
  }

  function activeCell() {
    if (S.active.src === null) return null;
    return S.cellEls.get(cellId(S.active.src, S.active.dst)) || null;
  }

  function setActive(td, focus) {
    for (const old of $("matrix").querySelectorAll('td[tabindex="0"]')) old.tabIndex = -1;
    td.tabIndex = 0;
    const src = S.sources[Number(td.dataset.r)], dst = S.destinations[Number(td.dataset.c)];
    S.active = { src: src.id, dst: dst.id };
    if (focus) {
      td.focus({ preventScroll: false });
      td.scrollIntoView({ block: "nearest", inline: "nearest" });
    }
  }

  function cellAt(r, c) {
    const rows = $("matrix").tBodies[0];
    if (!rows || r < 0 || r >= rows.rows.length) return null;
    const row = rows.rows[r];
    return c < 0 || c >= row.cells.length - 1 ? null : row.cells[c + 1];
  }

  function onMatrixKey(event) {
    const td = event.target.closest("td");
    if (!td) return;
    let r = Number(td.dataset.r), c = Number(td.dataset.c);
    const last = { r: S.sources.length - 1, c: S.destinations.length - 1 };
    switch (event.key) {
      case "ArrowUp": r -= 1; break;
      case "ArrowDown": r += 1; break;
      case "ArrowLeft": c -= 1; break;
      case "ArrowRight": c += 1; break;
      case "Home": c = 0; if (event.ctrlKey) r = 0; break;
      case "End": c = last.c; if (event.ctrlKey) r = last.r; break;
      case "PageUp": r = Math.max(0, r - 5); break;
      case "PageDown": r = Math.min(last.r, r + 5); break;
      case "Enter": case " ":
        event.preventDefault();
        openDrill(td);
        return;
      default: return;
    }
    event.preventDefault();
    const next = cellAt(r, c);
    if (next) setActive(next, true);
  }

  // --- open mismatches ---------------------------------------------------------------------

  function renderMismatches() {
    const f = filters();
    const rows = [...S.rows.values()].filter((row) => FAILING.has(row.status) && visible(row, f));
    rows.sort((a, b) => rank(a.status) - rank(b.status) || (a.declared || "~").localeCompare(b.declared || "~") || a.key.localeCompare(b.key));
    // One entry per declared flow and status (drift-sample flows stand alone): its worst pair first.
    const groups = new Map();
    for (const row of rows) {
      const id = `${row.declared || row.key}\u0000${row.status}`;
      if (!groups.has(id)) groups.set(id, []);
      groups.get(id).push(row);
    }
    $("mismatch-count").textContent = `(${groups.size})`;
    $("mismatch-empty").hidden = groups.size > 0;
    const filtered = f.namespace || f.status || f.text || !f.drift;
    $("mismatch-empty").textContent = filtered
      ? "None among the flows the filters show."
      : "None: every probed flow agrees with its intent.";
    const inList = document.activeElement && document.activeElement.closest && document.activeElement.closest("#mismatches");
    const focused = inList ? document.activeElement.dataset.key : null;
    const items = [...groups.values()].slice(0, MAX_MISMATCHES).map((members) => {
      const row = members[0];
      const more = members.length > 1 ? ` and ${members.length - 1} more pod pair${members.length > 2 ? "s" : ""}` : "";
      const where = `${row.source} → ${row.destination} ${row.port}/${row.protocol}${more}`;
      const button = el("button", {
        type: "button", class: "mismatch", dataset: { key: row.key, tone: row.status },
        "aria-label": `${NAME[row.status]}: ${row.declared || undeclaredName(row)}, ${where}. ${row.reason}`,
        onclick: (e) => openExplain(row.key, e.currentTarget),
      },
      badge(row.status, members.length > 1 ? `×${members.length}` : undefined),
      el("span", { class: "what", text: row.declared ? row.flow : undeclaredName(row) },
        row.declared ? el("span", { class: "exp", text: ` · ${row.expectation}` }) : null),
      el("span", { class: "where", text: where }),
      el("span", { class: "why", text: row.reason }));
      button.style.setProperty("--tone", `var(--${row.status}-bg)`);
      return el("li", null, button);
    });
    if (groups.size > MAX_MISMATCHES) {
      items.push(el("li", { class: "muted", text: `and ${groups.size - MAX_MISMATCHES} more: narrow the filters` }));
    }
    $("mismatches").replaceChildren(...items);
    if (focused) {
      const again = $("mismatches").querySelector(`button[data-key="${CSS.escape(focused)}"]`);
      if (again) again.focus();
    }
  }

  function onMismatchKey(event) {
    if (event.key !== "ArrowDown" && event.key !== "ArrowUp") return;
    const buttons = [...$("mismatches").querySelectorAll("button")];
    const i = buttons.indexOf(document.activeElement);
    if (i < 0) return;
    event.preventDefault();
    const next = buttons[i + (event.key === "ArrowDown" ? 1 : -1)];
    if (next) next.focus();
  }

  // --- policies: evidence that each is enforced as written --------------------------------

  function policyLink(id, text) {
    return el("button", { type: "button", class: "linklike", dataset: { policy: id }, text: text || id,
      onclick: (e) => openPolicy(id, e.currentTarget) });
  }

  function renderPolicies() {
    const items = S.policies.map((p) => {
      const button = el("button", {
        type: "button", class: "mismatch", dataset: { policy: p.id },
        "aria-label": `${EVIDENCE[p.status] ? EVIDENCE[p.status][1] : p.status}: NetworkPolicy ${p.id}. ${p.reason}`,
        onclick: (e) => openPolicy(p.id, e.currentTarget),
      },
      evidenceBadge(p.status),
      el("span", { class: "what", text: p.name }, el("span", { class: "exp", text: ` · ${p.namespace}` })),
      el("span", { class: "why", text: p.reason }));
      button.style.setProperty("--tone", `var(--${(EVIDENCE[p.status] || [])[2] || "PENDING"}-bg)`);
      return el("li", null, button);
    });
    const counts = EVIDENCE_ORDER.filter((s) => S.policies.some((p) => p.status === s))
      .map((s) => `${S.policies.filter((p) => p.status === s).length} ${EVIDENCE[s][1]}`).join(", ");
    $("policy-count").textContent = S.policies.length ? `(${counts})` : "";
    $("policy-empty").hidden = S.policies.length > 0;
    $("policies").replaceChildren(...items);
  }

  async function loadPolicies() {
    try {
      const listing = await getJSON("api/v1/policies");
      S.policies = listing.policies;
      S.witnessOf = new Map();
      for (const p of S.policies) {
        const all = p.witnesses.concat(...p.rules.map((r) => r.witnesses));
        for (const w of all) {
          if (!S.witnessOf.has(w.flow)) S.witnessOf.set(w.flow, []);
          if (!S.witnessOf.get(w.flow).includes(p.id)) S.witnessOf.get(w.flow).push(p.id);
        }
      }
      renderPolicies();
      if (S.policy) renderPolicy(S.policies.find((p) => p.id === S.policy.id));
    } catch (error) {
      console.warn(error);
    }
  }

  let policiesTimer = null;
  function policiesSoon() {
    if (policiesTimer === null) policiesTimer = setTimeout(() => { policiesTimer = null; loadPolicies(); }, 500);
  }

  function raise(which) {
    S.panels = S.panels.filter((p) => p !== which).concat(which);
    $(which).style.zIndex = String(30 + S.panels.length);
  }

  function openPolicy(id, returnTo) {
    S.policy = { id, returnTo: returnTo || document.activeElement };
    raise("policy");
    $("policy").hidden = false;
    renderPolicy(S.policies.find((p) => p.id === id));
    $("policy-body").focus();
  }

  function witnessRows(witnesses) {
    return el("table", { "aria-label": "Witness flows" },
      el("thead", null, el("tr", null, ...["status", "witness flow", "must be", "why", "reality"].map((h) => el("th", { scope: "col", text: h })))),
      el("tbody", null, ...witnesses.map((w) => el("tr", {
        class: "flowrow", tabindex: "0", dataset: { key: w.flow },
        onclick: (e) => openExplain(w.flow, e.currentTarget),
        onkeydown: (e) => { if (e.key === "Enter") openExplain(w.flow, e.currentTarget); },
      },
      el("td", null, w.status ? badge(w.status) : "–"),
      el("td", { class: "mono", text: `${w.source} → ${w.destination} ${w.port}/${w.protocol}${w.via ? ` (${w.via})` : ""}` }),
      el("td", { text: w.expect === "allow" ? "allowed" : "denied" }),
      el("td", { text: w.why }),
      el("td", { text: w.reality || "not probed yet" })))));
  }

  function renderPolicy(p) {
    if (!S.policy) return;
    $("policy-title").textContent = `NetworkPolicy ${S.policy.id}`;
    if (!p) {
      $("policy-body").replaceChildren(el("p", { text: "This policy is gone from the cluster." }));
      return;
    }
    const nodes = [
      el("p", null, evidenceBadge(p.status), " ", el("span", { text: p.reason })),
      p.source ? el("p", { class: "muted", text: `read from ${p.source}` }) : null,
      ...p.lint.map((line) => el("p", { class: "lint", text: `lint: ${line}` })),
      el("h3", { text: "Witnesses of the policy" }),
      p.witnesses.length ? witnessRows(p.witnesses) : el("p", { class: "muted", text: "None of its own: its rules' witnesses prove it." }),
    ];
    for (const r of p.rules) {
      nodes.push(el("h3", { text: `rule ${r.rule}` }),
        el("p", { class: "mono", text: r.text }),
        el("p", null, evidenceBadge(r.status), " ", r.reason),
        r.witnesses.length ? witnessRows(r.witnesses) : null);
    }
    nodes.push(el("p", null, el("a", { href: `api/v1/policies/${p.id}`, text: "this policy's evidence as JSON" })));
    $("policy-body").replaceChildren(...nodes.filter(Boolean));
  }

  // --- header ------------------------------------------------------------------------------

  function renderSummary() {
    const s = S.summary;
    if (!s) return;
    const items = ORDER.filter((st) => s.declared.byStatus[st] > 0).map((st) =>
      el("li", null, badge(st, s.declared.byStatus[st])));
    if (!items.length) items.push(el("li", { class: "muted", text: "no declared flows" }));
    $("totals").replaceChildren(...items);
    const ratio = s.compliance.ratio;
    $("compliance").textContent = ratio === null ? "compliance: –" : `compliance ${(ratio * 100).toFixed(1)} % of ${s.declared.total} declared flows`;
    const ev = s.policies;
    if (ev) {
      const sweep = ev.sweep.ratio === null ? "" : ` · sweep ${(ev.sweep.ratio * 100).toFixed(0)} % of ${ev.sweep.cells} cells`;
      const broken = ev.byStatus.NOT_ENFORCED ? ` · ${ev.byStatus.NOT_ENFORCED} not enforced` : "";
      $("evidence").textContent = `policies ${ev.byStatus.PROVEN}/${ev.total} proven${broken}${sweep}`;
    }
    const missing = s.agents.missing.length ? ` · missing on ${s.agents.missing.join(", ")}` : "";
    $("agents").textContent = s.role === "standby"
      ? `standby collector: no agents, no results here · the leader is ${s.leader || "not known yet"}`
      : `agents ${s.agents.connected}/${s.agents.nodes} nodes${missing}`;
  }

  async function loadSummary() {
    try {
      S.summary = await getJSON("api/v1/summary");
      renderSummary();
    } catch (error) {
      console.warn(error);
    }
  }

  let summaryTimer = null;
  function summarySoon() {
    if (summaryTimer === null) summaryTimer = setTimeout(() => { summaryTimer = null; loadSummary(); }, 250);
  }

  function setLive(state, text) {
    $("live").dataset.state = state;
    $("live-text").textContent = text;
    S.live = state === "live";
  }

  // --- panels ------------------------------------------------------------------------------

  function openDrill(td, returnTo) {
    const src = S.sources[Number(td.dataset.r)], dst = S.destinations[Number(td.dataset.c)];
    const keys = S.cellKeys.get(cellId(src.id, dst.id)) || [];
    if (!keys.length) return;
    S.drill = { src: src.id, dst: dst.id, returnTo: returnTo || td };
    raise("drill");
    renderDrill(true);
  }

  function renderDrill(focus) {
    if (!S.drill) return;
    const { src, dst } = S.drill;
    const keys = (S.cellKeys.get(cellId(src, dst)) || []).filter((k) => S.rows.has(k));
    const rows = keys.map((k) => S.rows.get(k));
    rows.sort((a, b) => rank(a.status) - rank(b.status) || a.source.localeCompare(b.source) || a.destination.localeCompare(b.destination) || a.port - b.port);
    $("drill-title").textContent = `${src} → ${dst}`;
    const focusedKey = document.activeElement && document.activeElement.closest && document.activeElement.closest("#drill") ? document.activeElement.dataset.key : null;
    const table = el("table", { "aria-label": "Flows between the pods of these workloads" },
      el("thead", null, el("tr", null,
        el("th", { scope: "col", text: "status" }), el("th", { scope: "col", text: "source pod" }),
        el("th", { scope: "col", text: "destination" }), el("th", { scope: "col", text: "port" }),
        el("th", { scope: "col", text: "declared flow" }), el("th", { scope: "col", text: "verified" }))));
    const body = el("tbody");
    for (const row of rows) {
      body.append(el("tr", {
        class: "flowrow", tabindex: "0", dataset: { key: row.key },
        "aria-label": `${NAME[row.status]}: ${row.source} to ${row.destination} ${row.port}/${row.protocol}, ${row.declared || undeclaredName(row)}. Enter explains.`,
        onclick: (e) => openExplain(row.key, e.currentTarget),
        onkeydown: onDrillRowKey,
      },
      el("td", null, badge(row.status)),
      el("td", { class: "mono", text: row.source }),
      el("td", { class: "mono", text: row.destination }),
      el("td", { class: "mono", text: `${row.port}/${row.protocol}` }),
      el("td", { text: row.declared ? row.flow : undeclaredName(row) }),
      el("td", { title: fmtTime(row.lastVerifiedAt), text: ago(row.lastVerifiedAt) })));
    }
    table.append(body);
    const counts = ORDER.filter((s) => rows.some((r) => r.status === s))
      .map((s) => `${rows.filter((r) => r.status === s).length} ${NAME[s]}`).join(", ");
    const proving = new Set();
    for (const row of rows) for (const id of S.witnessOf.get(row.key) || []) proving.add(id);
    const policies = S.policies.filter((p) => proving.has(p.id));
    $("drill-body").replaceChildren(
      el("p", { class: "muted", text: `${rows.length} flow${rows.length === 1 ? "" : "s"} between pods: ${counts}. Enter on a row opens its explanation.` }),
      table,
      policies.length ? el("h3", { text: "Policies these flows prove" }) : null,
      policies.length ? el("ul", { class: "rules" }, ...policies.map((p) => el("li", null,
        evidenceBadge(p.status), " ", policyLink(p.id)))) : null);
    $("drill").hidden = false;
    const again = focusedKey ? body.querySelector(`tr[data-key="${CSS.escape(focusedKey)}"]`) : null;
    if (again) again.focus();
    else if (focus && body.firstChild) body.firstChild.focus();
  }

  function onDrillRowKey(event) {
    const tr = event.currentTarget;
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      openExplain(tr.dataset.key, tr);
    } else if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      event.preventDefault();
      const next = event.key === "ArrowDown" ? tr.nextElementSibling : tr.previousElementSibling;
      if (next) next.focus();
    }
  }

  async function openExplain(key, returnTo) {
    S.explain = { key, returnTo: returnTo || document.activeElement };
    raise("explain");
    $("explain-title").textContent = "Explanation";
    $("explain-body").replaceChildren(el("p", { class: "muted", text: "loading…" }));
    $("explain").hidden = false;
    $("explain-body").focus();
    await refreshExplain();
  }

  async function refreshExplain() {
    if (!S.explain) return;
    const key = S.explain.key;
    let detail;
    try {
      detail = await getJSON(`api/v1/flows/${encodeURIComponent(key)}`);
    } catch (error) {
      if (S.explain && S.explain.key === key) {
        $("explain-body").replaceChildren(el("p", { text: `This flow is gone from the plan (${error.message}).` }));
      }
      return;
    }
    if (!S.explain || S.explain.key !== key) return;
    renderExplain(detail.flows[0], detail.declared);
  }

  function direction(name, side) {
    const parts = [];
    if (!side.applies) parts.push("does not apply (outside the pod network or host network)");
    else if (side.tier === "Admin" || side.tier === "Baseline") parts.push(`decided in the ${side.tier} tier`);
    else if (!side.isolated) parts.push("not isolated: no policy selects this pod for " + name);
    else parts.push(`isolated by ${side.policies.join(", ")}`);
    if (side.clusterPolicies && side.clusterPolicies.length) parts.push(`cluster policies: ${side.clusterPolicies.join(", ")}`);
    return el("li", null, el("strong", { text: `${name}: ` }), `${side.allowed ? "allowed" : "denied"}; ${parts.join("; ")}`,
      side.reason ? el("div", { class: "muted", text: side.reason }) : null,
      side.allowedBy.length ? el("ul", { class: "rules" }, ...side.allowedBy.map((m) => el("li", { class: "mono", text: m.text }))) : null);
  }

  function renderExplain(flow, declared) {
    $("explain-title").textContent = flow.kind === "declared" ? `${flow.expectation} · ${flow.flow}` : (flow.kind === "witness" ? "Policy witness" : "Truth-table sweep");
    const model = flow.explanation;
    const results = [...flow.results].reverse();
    const history = [...flow.history].reverse();
    const nodes = [
      el("p", null, badge(flow.status), " ", el("span", { text: flow.reason })),
      flow.confirming ? el("p", { class: "muted", text: `A retry is confirming ${NAME[flow.confirming] || flow.confirming}.` }) : null,
      el("dl", { class: "truths" },
        el("dt", { text: "flow" }), el("dd", { class: "mono", text: `${flow.source} → ${flow.destination} ${flow.port}/${flow.protocol}` }),
        el("dt", { text: "intent" }), el("dd", { text: flow.kind === "declared" ? `${flow.intent} (declared in ${flow.expectation})` : `${flow.intent} (${undeclaredName(flow)}: the model's verdict)` }),
        el("dt", { text: "model" }), el("dd", { text: model.summary }),
        el("dt", { text: "reality" }), el("dd", { text: flow.reality ? `${flow.reality} (${flow.observed})` : (flow.unprobeable ? `not probed: ${flow.unprobeable}` : "not probed yet") }),
        el("dt", { text: "since" }), el("dd", { title: fmtTime(flow.since), text: `${fmtTime(flow.since)} (${ago(flow.since)})` })),
      model.incomplete && model.incomplete.length
        ? el("div", { class: "incomplete", dataset: { status: "MODEL_INCOMPLETE" } },
          el("strong", { text: "The model is incomplete for this flow:" }),
          el("ul", null, ...model.incomplete.map((reason) => el("li", { text: reason }))))
        : null,
      el("h3", { text: "Deciding tier, policy, rule and action" }),
      model.deciding.length
        ? el("ul", { class: "rules" }, ...model.deciding.map((d) => el("li", { class: "mono" }, d, " ", policyLink(d.split(" ")[0], "evidence"))))
        : el("p", { text: model.allowed ? "No policy isolates either side." : "No rule allows it." }),
      (S.witnessOf.get(flow.key) || []).length
        ? el("p", null, "Witness of ", ...S.witnessOf.get(flow.key).flatMap((id, i) => [i ? ", " : "", policyLink(id)]))
        : null,
      el("ul", { class: "rules" },
        direction("egress at the source", model.egress),
        direction("ingress at the destination", model.ingress)),
      ...model.notes.map((n) => el("p", { class: "muted", text: n })),
      el("h3", { text: "Last probe results" }),
    ];
    if (results.length) {
      nodes.push(el("table", null,
        el("thead", null, el("tr", null, ...["time", "outcome", "latency", "node", "try", "reality"].map((h) => el("th", { scope: "col", text: h })))),
        el("tbody", null, ...results.map((r) => el("tr", null,
          el("td", { title: new Date(r.receivedAt * 1000).toISOString(), text: fmtTime(r.receivedAt) }),
          el("td", { class: "mono", text: r.httpStatus ? `${r.outcome} ${r.httpStatus}` : r.outcome }),
          el("td", { text: ms(r.latencySeconds) }),
          el("td", { text: r.node }),
          el("td", { text: String(r.attempt) }),
          el("td", { text: `${r.reality}: ${r.reason}${r.statusMismatch ? `; ${r.statusMismatch}` : ""}` }))))));
    } else {
      nodes.push(el("p", { class: "muted", text: "No result yet." }));
    }
    nodes.push(el("h3", { text: "History" }));
    if (history.length) {
      nodes.push(el("ol", { class: "rules", reversed: true }, ...history.map((h) =>
        el("li", null, el("span", { class: "muted", text: `${fmtTime(h.at)} ` }), badge(h.from), " → ", badge(h.to), el("div", { text: h.reason })))));
    } else {
      nodes.push(el("p", { class: "muted", text: "No status change yet." }));
    }
    if (flow.lastFlap) {
      nodes.push(el("p", { class: "muted", text: `${flow.flaps} flap(s): a retry disagreed, ${NAME[flow.lastFlap.kept] || flow.lastFlap.kept} was kept.` }));
    }
    if (declared) {
      nodes.push(el("h3", { text: "Declared flow" }),
        el("p", null, badge(declared.status), ` ${declared.id}: ${declared.pairsCovered} of ${declared.pairsTotal} pod pairs probed; ${declared.observedAllowed} seen allowed, ${declared.observedDenied} denied.`));
    }
    nodes.push(el("p", null, el("a", { href: `api/v1/flows/${encodeURIComponent(flow.key)}`, text: "this flow as JSON" })));
    $("explain-body").replaceChildren(...nodes.filter(Boolean));
  }

  function closePanel(which) {
    const panel = S[which];
    if (!panel) return;
    S[which] = null;
    S.panels = S.panels.filter((p) => p !== which);
    $(which).hidden = true;
    let back = panel.returnTo;
    if (back && !document.contains(back) && back.dataset && back.dataset.key) {
      // The element was redrawn by a live update: return to its successor for the same flow.
      const scope = S.drill ? "#drill" : "#mismatches";
      back = document.querySelector(`${scope} [data-key="${CSS.escape(back.dataset.key)}"]`);
    }
    if (back && document.contains(back)) back.focus();
    else if (S.drill && which === "explain") { const row = $("drill-body").querySelector("tr.flowrow"); if (row) row.focus(); }
    else { const td = activeCell(); if (td) td.focus(); }
  }

  let explainTimer = null;
  function explainSoon() {
    if (explainTimer === null) explainTimer = setTimeout(() => { explainTimer = null; refreshExplain(); }, 300);
  }

  // --- live updates ------------------------------------------------------------------------

  let flushTimer = null;
  function flushSoon() {
    if (flushTimer === null) flushTimer = setTimeout(flush, 30);
  }

  function flush() {
    flushTimer = null;
    const dirty = S.dirty;
    S.dirty = new Set();
    const grid = computeGrid();
    if (structureOf(grid) !== S.structure) {
      renderMatrix();
    } else {
      S.cellKeys = grid.cells;
      const touched = new Set();
      for (const key of dirty) {
        const row = S.rows.get(key);
        if (row) touched.add(cellId(row.sourceGroup, row.destinationGroup));
      }
      const srcById = new Map(S.sources.map((g) => [g.id, g]));
      const dstById = new Map(S.destinations.map((g) => [g.id, g]));
      for (const id of touched) {
        const td = S.cellEls.get(id);
        if (!td) continue;
        const [src, dst] = id.split("\u0000");
        paintCell(td, srcById.get(src), dstById.get(dst));
      }
    }
    renderMismatches();
    if (S.drill) renderDrill(false);
    if (S.explain && dirty.has(S.explain.key)) explainSoon();
    for (const key of dirty) if (S.witnessOf.has(key)) { policiesSoon(); break; }
    if (S.lastEvent && S.lastEvent.appliedAt === null) S.lastEvent.appliedAt = Date.now() / 1000;
  }

  function applyRow(row) {
    S.rows.set(row.key, row);
    S.dirty.add(row.key);
    S.eventsApplied += 1;
    flushSoon();
  }

  function onFlowEvent(event) {
    let data;
    try { data = JSON.parse(event.data); } catch (error) { return; }
    S.lastEvent = { id: event.lastEventId, kind: event.type, publishedAt: data.publishedAt, receivedAt: Date.now() / 1000, appliedAt: null, flow: data.flow || null };
    if (data.row) applyRow(data.row);
    else if (data.row === null && data.flow) { S.rows.delete(data.flow); S.dirty.add(data.flow); flushSoon(); }
    else reloadSoon(1000);  // an event that names no flow: reload everything, at most once a second
    summarySoon();
  }

  let reloadTimer = null;
  function reloadSoon(delay = 250) {
    if (reloadTimer === null) reloadTimer = setTimeout(() => { reloadTimer = null; loadAll(); }, delay);
  }

  function connect() {
    if (!window.EventSource) { setLive("offline", "no live updates in this browser"); return; }
    const source = new EventSource("api/v1/events");
    source.addEventListener("hello", () => {
      setLive("live", "live");
      if (S.everConnected) reloadSoon();  // we may have missed events while away
      S.everConnected = true;
    });
    source.addEventListener("status", onFlowEvent);
    source.addEventListener("result", onFlowEvent);
    source.addEventListener("snapshot", () => { reloadSoon(); summarySoon(); policiesSoon(); });
    source.addEventListener("resync", () => { S.resyncing = true; reloadSoon(); });
    source.onerror = () => {
      // After a resync the server closes the stream on purpose: say so, not "offline".
      if (S.resyncing) { S.resyncing = false; setLive("connecting", "catching up…"); }
      else setLive("offline", "reconnecting…");
    };
  }

  // --- start -------------------------------------------------------------------------------

  async function loadAll() {
    try {
      const matrix = await getJSON("api/v1/matrix");
      S.loads += 1;
      S.rows = new Map(matrix.flows.map((row) => [row.key, row]));
      fillFilterChoices();
      renderMatrix();
      renderMismatches();
      if (S.drill) renderDrill(false);
      if (S.explain) explainSoon();
      if (S.firstPaintMs === null) {
        S.firstPaintMs = performance.now();
        document.documentElement.dataset.ready = "1";
      }
    } catch (error) {
      setLive("offline", `cannot load flows: ${error.message}`);
    }
    loadSummary();
    loadPolicies();
  }

  function start() {
    renderLegend();
    fillFilterChoices();
    for (const id of ["f-namespace", "f-status", "f-drift"]) $(id).addEventListener("change", () => { renderMatrix(); renderMismatches(); });
    $("f-text").addEventListener("input", () => { renderMatrix(); renderMismatches(); });
    $("filters").addEventListener("submit", (e) => e.preventDefault());
    const matrix = $("matrix");
    matrix.addEventListener("keydown", onMatrixKey);
    matrix.addEventListener("click", (event) => {
      const td = event.target.closest("td");
      if (!td) return;
      setActive(td, true);
      openDrill(td);
    });
    matrix.addEventListener("focusin", (event) => {
      const td = event.target.closest("td");
      if (td && td.tabIndex !== 0) setActive(td, false);
    });
    $("mismatches").addEventListener("keydown", onMismatchKey);
    for (const button of document.querySelectorAll("[data-close]")) {
      button.addEventListener("click", () => closePanel(button.dataset.close));
    }
    document.addEventListener("keydown", (event) => {
      if (event.key !== "Escape") return;
      const top = S.panels[S.panels.length - 1];
      if (!top) return;
      closePanel(top);
      event.preventDefault();
    });
    document.querySelector(".skip").addEventListener("click", (event) => {
      event.preventDefault();
      const td = activeCell() || $("matrix").querySelector("td");
      if (td) td.focus();
    });
    setInterval(loadSummary, 10000);
    setInterval(loadPolicies, 10000);
    connect();
    loadAll();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
