// The console: an overview of every stream and v1 slot (health, lag, WAL, consumer, limits; worst
// first, problems on top) with 15-minute charts; a stream's detail (state, definition, consumers,
// recent closes, snapshot, a read-only tail) and its admin actions; the events feed. It polls the
// API with the token its user gives it (kept in sessionStorage), and writes every value from the
// database or the server with textContent, never as HTML.
// Modules as the server serves them (variables: type checkers need not resolve them).
const CLIENT_URL = "/assets/pgdeltastream.js";
const CHARTS_URL = "/assets/charts.js";
const { connectStream, jsonParser } = await import(CLIENT_URL);
const { lineChart } = await import(CHARTS_URL);

const $ = (id) => document.getElementById(id);
const REFRESH_MS = 2000;
const MAX_TRANSACTIONS = 200;
const MAX_HELD = 5000;
const PAGE = 50;
const HEALTH_RANK = { invalidated: 0, warning: 1, ok: 2 };

// ---- the API ------------------------------------------------------------------------------------

const tokenInput = $("token");
tokenInput.value = sessionStorage.getItem("pgds-token") ?? "";
tokenInput.addEventListener("change", () => {
  sessionStorage.setItem("pgds-token", tokenInput.value.trim());
  lastEventId = 0;
  events = [];
  void refresh();
});
const token = () => tokenInput.value.trim() || undefined;
// Snapshot values as their exact text: JSON.parse would round bigint and numeric values.
const parseExact = jsonParser("string");

/** An error the server answered with: its status and its `error`. */
class ApiError extends Error {
  constructor(status, message) {
    super(`${status}: ${message}`);
    this.status = status;
  }
}

async function api(method, path, body, exact = false) {
  const headers = {};
  if (body !== undefined) headers["content-type"] = "application/json";
  if (token()) headers.authorization = `Bearer ${token()}`;
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  if (!response.ok) {
    let message = text;
    try {
      message = JSON.parse(text).error ?? text;
    } catch { /* not JSON */ }
    throw new ApiError(response.status, message);
  }
  if (text === "") return undefined;
  return exact ? parseExact(text) : JSON.parse(text);
}

// ---- formatting ---------------------------------------------------------------------------------

/** An element: `tag` with `props` (className, title, dataset, …) and children (text or nodes). */
function h(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(element.dataset, value);
    else element[key] = value;
  }
  element.append(...children.filter((c) => c !== undefined && c !== null));
  return element;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) (n /= 1024), i++;
  return `${i === 0 ? Math.round(n) : n.toFixed(1)} ${units[i]}`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 120) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h`;
  return `${Math.round(seconds / 86400)} d`;
}

/** An ISO 8601 time, UTC, to the second. */
function iso(time) {
  return time ? new Date(time).toISOString().replace(/\.\d{3}Z$/, "Z") : "–";
}

function ago(time) {
  return duration((Date.now() - Date.parse(time)) / 1000);
}

function pill(text, kind) {
  return h("span", { className: `pill ${kind}` }, text);
}

function rate(n) {
  return n >= 1000 ? `${(n / 1000).toFixed(1)}k` : n >= 10 ? String(Math.round(n)) : n.toFixed(1);
}

/** A value as text: numbers arrive as their exact text, strings as PostgreSQL wrote them. */
function show(value) {
  return value === null
    ? "null"
    : typeof value === "object"
    ? JSON.stringify(value)
    : String(value);
}

/** A table's filter as text: `region = eu and deleted_at is null`. */
function whereText(t) {
  return t.where.map((c) => c.map((x) => typeof x === "string" ? x : JSON.stringify(x)).join(" "))
    .join(" and ");
}

function describeTable(t) {
  const columns = t.allColumns ? "" : ` (${t.columns.join(", ")})`;
  const where = t.where.length === 0 ? "" : ` where ${whereText(t)}`;
  return `${t.schema}.${t.table}${columns}${where}`;
}

function limitsText(limits) {
  if (!limits) return "server's";
  const lag = limits.maxLagBytes ? bytes(limits.maxLagBytes) : "no lag limit";
  const idle = limits.maxIdleSeconds ? `${duration(limits.maxIdleSeconds)} idle` : "no idle limit";
  return `${lag}, ${idle}`;
}

// ---- state and refresh --------------------------------------------------------------------------

let streams = [];
let status; // HealthReport, or undefined when it cannot be read (not an admin)
let history; // MetricHistoryBody, or undefined
let events = [];
let lastEventId = 0;
let admin = false;

function setConn(text) {
  $("conn").textContent = text;
}

let refreshes = 0;
let latestRefresh;

/** Reads everything the page shows, and shows it. */
function refresh() {
  latestRefresh = refreshOnce(++refreshes);
  return latestRefresh;
}

async function refreshOnce(mine) {
  const [streamsResult, statusResult, historyResult, eventsResult] = await Promise.allSettled([
    api("GET", "/v2/streams"),
    readStatus(),
    api("GET", "/v2/metrics/history"),
    api("GET", `/v2/events?after=${lastEventId}`),
  ]);
  // Refreshes overlap (a poll, a navigation, an action): only the latest one started is shown,
  // so an answer from before a delete never brings the deleted stream back; an older one ends
  // when the latest does.
  if (mine !== refreshes) return latestRefresh;
  if (streamsResult.status === "fulfilled") {
    streams = streamsResult.value.streams;
    $("streams-error").textContent = "";
  } else {
    const error = streamsResult.reason;
    streams = [];
    $("streams-error").textContent = error.status === 401
      ? `${error.message}\nEnter a token above (an admin token, or a stream token to see its streams).`
      : error.message;
  }
  admin = statusResult.status === "fulfilled";
  status = admin ? statusResult.value : undefined;
  history = historyResult.status === "fulfilled" ? historyResult.value : undefined;
  if (eventsResult.status === "fulfilled") {
    // Two refreshes can overlap (a poll and a navigation) and ask for the same events: keep each once.
    const fresh = eventsResult.value.events.filter((e) => e.id > lastEventId);
    events = events.concat(fresh).slice(-2000);
    lastEventId = events.at(-1)?.id ?? lastEventId;
  }
  setConn(`updated ${iso(Date.now())}${admin ? "" : " · not an admin: streams only"}`);
  renderOverview();
  renderDetail();
  renderEvents();
}

/** `/v2/status`: the report, also when it is a 503 (a degraded server); throws when refused. */
async function readStatus() {
  const headers = token() ? { authorization: `Bearer ${token()}` } : {};
  const response = await fetch("/v2/status", { headers });
  const body = await response.json().catch(() => ({}));
  if (response.ok || (response.status === 503 && body.database)) return body;
  throw new ApiError(response.status, body.error ?? response.statusText);
}

// ---- overview -----------------------------------------------------------------------------------

/** Every stream and v1 slot as one row each, worst first. */
function overviewRows() {
  const rows = streams.map((s) => ({
    kind: "stream",
    name: s.name,
    health: s.health,
    lagBytes: s.lagBytes,
    lagSeconds: s.consumer?.unackedSeconds,
    retainedBytes: s.retainedBytes,
    connected: s.active,
    since: s.consumer?.connectedAt,
    lastActivityAt: s.lastActivityAt,
    limits: s.limits,
    tables: s.tables.map(describeTable).join("; "),
    stream: s,
  }));
  for (const slot of status?.slots ?? []) {
    if (!slot.v1) continue;
    rows.push({
      kind: "v1 slot",
      name: slot.slotName,
      health: slot.health ?? "ok",
      lagBytes: slot.lagBytes,
      retainedBytes: slot.retainedBytes,
      connected: slot.streaming || slot.activePid !== null,
      limits: undefined,
      tables: "v1: every table",
      slot,
    });
  }
  return rows.sort((a, b) =>
    HEALTH_RANK[a.health] - HEALTH_RANK[b.health] || (b.lagBytes ?? 0) - (a.lagBytes ?? 0) ||
    a.name.localeCompare(b.name)
  );
}

function problems(rows) {
  const found = [];
  if (status && !status.database.reachable) {
    found.push(`The database is unreachable: ${status.database.error ?? "no answer"}`);
  }
  for (const row of rows) {
    const what = `${row.kind} ${row.name}`;
    const s = row.stream;
    if (s?.invalidated) {
      found.push(`${what} is invalidated: ${s.invalidated.reason} (reset it to start again)`);
    } else if (row.health === "invalidated") found.push(`${what} is invalidated (a new init)`);
    else if (row.health === "warning") {
      const idle = (Date.now() - Date.parse(row.lastActivityAt ?? Date.now())) / 1000;
      const parts = [];
      if (row.limits?.maxLagBytes) {
        parts.push(`lag ${bytes(row.lagBytes)} of ${bytes(row.limits.maxLagBytes)}`);
      }
      if (row.limits?.maxIdleSeconds && !row.connected) {
        parts.push(`idle ${duration(idle)} of ${duration(row.limits.maxIdleSeconds)}`);
      }
      found.push(`${what} is near its limits${parts.length ? `: ${parts.join(", ")}` : ""}`);
    }
    if (s?.waitingFor) found.push(`${what} waits: ${s.waitingFor}`);
  }
  return found;
}

function renderOverview() {
  const rows = overviewRows();
  const found = problems(rows);
  $("problems").hidden = found.length === 0;
  $("problem-list").replaceChildren(...found.map((p) => h("li", {}, p)));
  $("overview-note").textContent = admin ? "" : "(v1 slots need an admin token)";
  $("streams").replaceChildren(...rows.map((row) => {
    const name = row.kind === "stream"
      ? h(
        "a",
        { href: `#/streams/${encodeURIComponent(row.name)}`, className: "mono name" },
        row.name,
      )
      : h("span", { className: "mono name" }, row.name);
    const consumer = row.connected
      ? h(
        "span",
        {},
        pill("connected", "on"),
        row.since ? ` since ${iso(row.since)}` : "",
        row.stream?.tails ? ` · ${row.stream.tails} tail${row.stream.tails === 1 ? "" : "s"}` : "",
      )
      : h(
        "span",
        {},
        pill("none", "off"),
        row.stream?.tails ? ` · ${row.stream.tails} tail(s)` : "",
      );
    const lag = h("span", {}, bytes(row.lagBytes));
    if (row.lagSeconds) {
      lag.append(h("br"), h("span", { className: "muted" }, `${duration(row.lagSeconds)} unacked`));
    }
    return h(
      "tr",
      {
        dataset: {
          row: `${row.kind}:${row.name}`,
          ...(row.kind === "stream" ? { stream: row.name } : {}),
        },
      },
      h("td", {}, name, h("div", { className: "muted" }, row.kind)),
      h("td", {}, pill(row.health, row.health)),
      h("td", { className: "num lag" }, lag),
      h("td", { className: "num hide-narrow" }, bytes(row.retainedBytes)),
      h("td", {}, consumer),
      h(
        "td",
        { className: "hide-narrow time" },
        row.connected
          ? "now"
          : row.lastActivityAt
          ? `${iso(row.lastActivityAt)} (${ago(row.lastActivityAt)} ago)`
          : "–",
      ),
      h("td", { className: "hide-narrow" }, limitsText(row.limits)),
      h("td", { className: "hide-narrow values" }, row.tables),
    );
  }));
  renderCharts($("charts"), undefined);
  $("charts-note").textContent = history
    ? `(a sample every ${history.intervalSeconds} s${
      history.samples.length > 0 &&
        Date.now() - Date.parse(history.samples[0].time) < 14 * 60 * 1000
        ? `, kept since ${iso(history.samples[0].time)}`
        : ""
    })`
    : admin
    ? "(metrics are off)"
    : "(needs an admin token)";
  renderDatabase();
}

function renderDatabase() {
  const list = $("database");
  if (!status) {
    list.replaceChildren(h("dt", {}, "status"), h("dd", {}, "needs an admin token"));
    return;
  }
  const f = status.failover;
  const entries = [
    ["status", pill(status.status, status.status === "ok" ? "ok" : "warning")],
    ["reachable", status.database.reachable ? "yes" : `no: ${status.database.error}`],
    ["wal_level", status.database.walLevel ?? "–"],
    ["current LSN", h("span", { className: "mono lsn" }, status.database.currentLsn ?? "–")],
    [
      "failover",
      !f
        ? "–"
        : !f.supported
        ? "not supported (PostgreSQL < 17)"
        : f.ready
        ? "ready"
        : f.problems.join("; "),
    ],
    ["slots", String(status.slots?.length ?? 0)],
  ];
  list.replaceChildren(...entries.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

/** The four charts, for every stream (`name` undefined) or one. */
function renderCharts(container, name) {
  if (!history) {
    container.replaceChildren(
      h(
        "p",
        { className: "muted" },
        admin ? "Metrics are off (METRICS=off)." : "Charts need an admin token.",
      ),
    );
    return;
  }
  const samples = history.samples;
  const times = samples.map((s) => Date.parse(s.time));
  const names = name !== undefined
    ? [name]
    : [...new Set(samples.flatMap((s) => Object.keys(s.streams)))].sort().slice(0, 7);
  const series = (field, label = (n) => n) =>
    names.map((n) => ({
      name: label(n),
      points: samples.map((s, i) => [times[i], s.streams[n]?.[field] ?? null]),
    }));
  const to = Date.now();
  // A server younger than 15 minutes: its history fills the chart (at least the last minute).
  const from = Math.max(to - 15 * 60 * 1000, Math.min(times[0] ?? 0, to - 60 * 1000));
  const charts = [
    { title: "Lag", series: series("lagBytes"), format: bytes },
    { title: "Changes/s out", series: series("changesPerSecond"), format: rate },
    { title: "Bytes/s out", series: series("bytesPerSecond"), format: bytes },
    {
      title: "Commit → client latency",
      series: name !== undefined
        ? [...series("latencyP50Ms", () => "p50"), ...series("latencyP99Ms", () => "p99")]
        : series("latencyP99Ms", (n) => `${n} p99`),
      format: (ms) => ms >= 1000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms)} ms`,
    },
  ];
  const boxes = charts.map((chart) => {
    const box = h("div", { dataset: { chart: chart.title } });
    lineChart(box, { ...chart, from, to });
    return box;
  });
  container.replaceChildren(...boxes);
}

$("create").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const result = $("create-result");
  try {
    const tables = JSON.parse(form.tables.value);
    const operations = [...form.querySelectorAll("input[name=op]:checked")].map((i) => i.value);
    const created = await api("POST", "/v2/streams", { name: form.name.value, tables, operations });
    result.className = "result muted";
    result.textContent = `Created ${created.name} (slot ${created.slotName}).`;
    await refresh();
  } catch (error) {
    result.className = "result error";
    result.textContent = error instanceof SyntaxError ? `Tables: ${error.message}` : error.message;
  }
});

// ---- stream detail ------------------------------------------------------------------------------

let detailName;

function current() {
  return streams.find((s) => s.name === detailName);
}

function renderDetail() {
  if (detailName === undefined) return;
  const s = current();
  $("detail-name").textContent = detailName;
  if (!s) {
    $("detail-health").replaceChildren();
    $("detail-error").textContent = `No stream "${detailName}" (deleted, or not yours to read).`;
    $("detail-state").replaceChildren();
    $("detail-definition").replaceChildren();
    for (const id of ["act-release", "act-reset", "act-delete"]) $(id).disabled = true;
    return;
  }
  $("detail-error").textContent = "";
  $("detail-health").replaceChildren(pill(s.health, s.health));
  const entry = (k, v) => [h("dt", {}, k), h("dd", {}, v)];
  $("detail-state").replaceChildren(
    ...entry(
      "consumer",
      s.active
        ? h(
          "span",
          {},
          pill("connected", "on"),
          s.consumer ? ` since ${iso(s.consumer.connectedAt)}` : "",
        )
        : pill("none", "off"),
    ),
    ...entry("confirmed LSN", h("span", { className: "mono lsn" }, s.confirmedLsn ?? "–")),
    ...entry(
      "lag",
      `${bytes(s.lagBytes)}${
        s.consumer?.unackedSeconds
          ? ` · oldest unacknowledged ${duration(s.consumer.unackedSeconds)}`
          : ""
      }`,
    ),
    ...entry("retained WAL", bytes(s.retainedBytes)),
    ...entry(
      "last activity",
      s.active ? "now" : `${iso(s.lastActivityAt)} (${ago(s.lastActivityAt)} ago)`,
    ),
    ...entry("snapshot", s.snapshotHeld ? `held until ${iso(s.snapshotExpiresAt)}` : "released"),
    ...entry("tails", String(s.tails)),
    ...(s.invalidated
      ? entry("invalidated", `${iso(s.invalidated.at)}: ${s.invalidated.reason}`)
      : []),
    ...(s.waitingFor ? entry("waiting for", s.waitingFor) : []),
    ...(s.relay ? entry("relay publisher", s.relay.publisher ?? "none") : []),
    ...(s.backfills?.length
      ? entry(
        "backfills",
        h(
          "span",
          { className: "values" },
          ...s.backfills.flatMap((b, i) => [
            i ? h("br") : undefined,
            h("span", { className: "mono name" }, b.id),
            ` ${b.table} (${b.mode}) ${b.state}: ${b.rowsDone} of ~${b.rowsEstimated ?? "?"} rows `,
            h("progress", {
              className: "backfill",
              max: Math.max(b.rowsEstimated ?? 0, b.rowsDone, 1),
              value: b.rowsDone,
            }),
          ]),
        ),
      )
      : []),
  );
  $("detail-definition").replaceChildren(
    ...entry("slot", h("span", { className: "mono name" }, s.slotName)),
    ...entry("created", iso(s.createdAt)),
    ...entry("operations", s.operations.join(", ")),
    ...entry("limits", limitsText(s.limits)),
    ...s.tables.flatMap((t) =>
      entry(
        h("span", { className: "mono name" }, `${t.schema}.${t.table}`),
        h(
          "span",
          { className: "values" },
          `${t.allColumns ? "every column" : t.columns.join(", ")}; key ${t.key.join(", ") || "–"}`,
          t.where.length ? h("br") : undefined,
          t.where.length ? `where ${whereText(t)}` : undefined,
        ),
      )
    ),
  );
  $("act-release").disabled = !admin || !s.snapshotHeld;
  $("act-reset").disabled = !admin;
  $("act-delete").disabled = !admin;
  const limits = $("limits");
  limits.hidden = !admin;
  if (!limits.contains(document.activeElement)) {
    limits.maxLagBytes.value = String(s.limits.maxLagBytes);
    limits.maxIdleSeconds.value = String(s.limits.maxIdleSeconds);
  }
  const consumers = s.relay?.consumers?.length
    ? s.relay.consumers.map((c) =>
      h(
        "tr",
        {},
        h("td", { className: "mono name" }, c.id),
        h(
          "td",
          {},
          c.leasedBy ? pill(`connected to ${c.leasedBy}`, "on") : pill("not connected", "off"),
        ),
        h("td", { className: "num" }, `${c.pending} frames (ack floor ${c.ackFloor})`),
      )
    )
    : s.consumer
    ? [
      h(
        "tr",
        {},
        h("td", {}, "changes"),
        h("td", { className: "time" }, iso(s.consumer.connectedAt)),
        h("td", { className: "num" }, duration(s.consumer.unackedSeconds)),
      ),
    ]
    : [
      h(
        "tr",
        {},
        h(
          "td",
          { colSpan: 3, className: "muted" },
          s.active ? "connected to another instance" : "none connected",
        ),
      ),
    ];
  $("consumers").replaceChildren(...consumers);
  const closes = events.filter((e) =>
    e.event === "consumer.disconnected" && e.fields.stream === s.name
  ).slice(-10).reverse();
  $("closes").replaceChildren(
    ...(closes.length === 0
      ? [
        h(
          "tr",
          {},
          h(
            "td",
            { colSpan: 4, className: "muted" },
            admin ? "none recorded" : "needs an admin token",
          ),
        ),
      ]
      : closes.map((e) =>
        h(
          "tr",
          {},
          h("td", { className: "time" }, iso(e.time)),
          h("td", {}, String(e.fields.code ?? "")),
          h("td", {}, String(e.fields.closedBy ?? "")),
          h("td", { className: "values" }, String(e.fields.reason ?? "")),
        )
      )),
  );
  renderCharts($("detail-charts"), s.name);
  $("tail-waiting").hidden = s.active;
}

/** Runs `action` after an inline confirmation, and shows what the server answered. */
function confirmThen(text, button, action) {
  $("confirm").hidden = false;
  $("confirm-text").textContent = text;
  $("confirm-yes").textContent = button;
  $("confirm-yes").onclick = async () => {
    $("confirm").hidden = true;
    await act(action);
  };
}
$("confirm-no").addEventListener("click", () => ($("confirm").hidden = true));

async function act(action) {
  const result = $("action-result");
  try {
    result.className = "result muted";
    result.textContent = await action();
  } catch (error) {
    result.className = "result error";
    result.textContent = `Refused: ${error.message}`;
  }
  await refresh();
}

const path = () => `/v2/streams/${encodeURIComponent(detailName)}`;
$("act-delete").addEventListener("click", () =>
  confirmThen(
    `Delete stream ${detailName}? Its slot is dropped and its consumer closed (4000).`,
    "Delete",
    async () => {
      await api("DELETE", path());
      // The overview shows at once, before the next refresh answers: never with the deleted row.
      const deleted = detailName;
      streams = streams.filter((s) => s.name !== deleted);
      renderOverview();
      location.hash = "#/";
      return `Deleted ${detailName}.`;
    },
  ));
$("act-reset").addEventListener("click", () =>
  confirmThen(
    `Reset stream ${detailName}? It gets a new slot and snapshot; changes not acknowledged are skipped.`,
    "Reset",
    async () => {
      const body = await api("POST", `${path()}/reset`);
      return body.snapshot
        ? `Reset: new slot ${body.slotName}, snapshot held until ${iso(body.snapshot.expiresAt)}.`
        : `Reset: new slot ${body.slotName}, ${body.backfills.length} backfill(s) queued.`;
    },
  ));
$("act-release").addEventListener("click", () =>
  confirmThen(
    `Release the snapshot of ${detailName}? It can no longer be read.`,
    "Release",
    async () => {
      await api("DELETE", `${path()}/snapshot`);
      return "The snapshot was released.";
    },
  ));
$("limits").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.target;
  void act(async () => {
    const body = await api("PATCH", path(), {
      limits: {
        maxLagBytes: Number(form.maxLagBytes.value),
        maxIdleSeconds: Number(form.maxIdleSeconds.value),
      },
    });
    document.activeElement?.blur();
    return `Limits saved: ${limitsText(body.limits)}.`;
  });
});

// ---- tail ---------------------------------------------------------------------------------------

let tail;
let paused = false;
let held = [];

function matches(body) {
  const filter = $("filter").value.trim().toLowerCase();
  return filter === "" || body.dataset.text.includes(filter);
}

function pairs(names, values) {
  return names.map((n, i) => `${n}=${show(values[i])}`).join(", ");
}

/** A transaction as a group: its position and size, then one row per change. */
function renderTransaction(tx, keyNames) {
  const body = h("tbody", { className: "tx", dataset: { lsn: tx.lsn } });
  body.append(
    h(
      "tr",
      { className: "txhead" },
      h(
        "td",
        { colSpan: 4 },
        h("span", { className: "mono lsn" }, tx.lsn),
        ` · ${tx.changes.length} change${tx.changes.length === 1 ? "" : "s"} · received ${
          iso(Date.now())
        }`,
      ),
    ),
  );
  const text = [];
  for (const change of tx.changes) {
    const kind = change.kind;
    let key = "";
    let values = "";
    if (kind === "insert" || kind === "update") {
      const names = change.columnnames ?? [];
      const at = (name) => change.columnvalues[names.indexOf(name)];
      const newKey = keyNames(change).filter((k) => names.includes(k)).map((k) =>
        `${k}=${show(at(k))}`
      ).join(", ");
      const oldKey = change.oldkeys ? pairs(change.oldkeys.keynames, change.oldkeys.keyvalues) : "";
      key = oldKey && oldKey !== newKey ? `${oldKey} → ${newKey}` : newKey || oldKey;
      values = pairs(names, change.columnvalues);
    } else if (kind === "delete") {
      key = pairs(change.oldkeys.keynames, change.oldkeys.keyvalues);
    } else if (kind === "schema") {
      values = change.columnnames.map((n, i) => `${n} ${change.columntypes[i]}`).join(", ");
    }
    const json = h(
      "details",
      {},
      h("summary", {}, values || "JSON"),
      h("pre", {}, JSON.stringify(change, null, 2)),
    );
    body.append(h(
      "tr",
      { className: "change" },
      h("td", { className: kind }, kind),
      h("td", { className: "mono name" }, `${change.schema}.${change.table}`),
      h("td", { className: "mono key" }, key),
      h("td", { className: "mono values" }, json),
    ));
    text.push(`${kind} ${change.schema}.${change.table} ${key} ${values}`);
  }
  body.dataset.text = text.join(" ").toLowerCase();
  body.hidden = !matches(body);
  const table = $("tail-rows");
  table.tHead.after(body);
  const groups = table.tBodies;
  while (groups.length > MAX_TRANSACTIONS) groups[groups.length - 1].remove();
}

function tailState(text) {
  $("tail-state").textContent = text;
}

async function startTail(s) {
  await tail?.close();
  for (const body of [...$("tail-rows").tBodies]) body.remove();
  held = [];
  paused = false;
  $("pause").disabled = false;
  $("pause").textContent = "Pause";
  const keys = new Map(s.tables.map((t) => [`${t.schema}.${t.table}`, t.key]));
  const keyNames = (change) => keys.get(`${change.schema}.${change.table}`) ?? [];
  const stream = connectStream({
    url: location.origin,
    stream: s.name,
    tail: true,
    token: () => token(),
    numbers: "string",
    onStatus: (status) => {
      if (tail !== stream) return;
      if (status.state === "open") tailState("watching (read-only)");
      else if (status.state === "closed") {
        tailState(`closed (${status.code}): ${status.reason || "no reason given"}`);
        $("pause").disabled = true;
      } else if (status.state === "reconnecting") tailState(`reconnecting (${status.code})…`);
      else tailState(status.state);
    },
  });
  tail = stream;
  try {
    for await (const tx of stream) {
      if (paused) {
        if (held.length < MAX_HELD) held.push([tx, keyNames]);
        const n = held.reduce((sum, [t]) => sum + t.changes.length, 0);
        tailState(`paused: ${n} change${n === 1 ? "" : "s"} held`);
      } else renderTransaction(tx, keyNames);
    }
  } catch (error) {
    if (tail === stream) {
      tailState(error.message);
      $("pause").disabled = true;
    }
  }
}

$("pause").addEventListener("click", () => {
  paused = !paused;
  $("pause").textContent = paused ? "Resume" : "Pause";
  tailState(paused ? "paused: 0 changes held" : "watching (read-only)");
  if (!paused) {
    for (const args of held) renderTransaction(...args);
    held = [];
  }
});
$("filter").addEventListener("input", () => {
  for (const body of $("tail-rows").tBodies) body.hidden = !matches(body);
});

// ---- snapshot -----------------------------------------------------------------------------------

let snap;

function openSnapshot(s) {
  const select = $("snap-table");
  select.replaceChildren(...s.tables.map((t) => new Option(`${t.schema}.${t.table}`)));
  snap = { stream: s.name, offset: 0 };
  select.onchange = () => {
    snap.offset = 0;
    void showPage();
  };
  if (!s.snapshotHeld) {
    $("snap-rows").replaceChildren();
    $("snap-state").textContent = "The snapshot was released: reset the stream for a fresh one.";
    $("snap-prev").disabled = $("snap-next").disabled = true;
    return;
  }
  void showPage();
}

async function showPage() {
  const table = $("snap-rows");
  try {
    const rows = await api("POST", `/v2/streams/${encodeURIComponent(snap.stream)}/snapshot`, {
      table: $("snap-table").value,
      offset: snap.offset,
      limit: PAGE,
    }, true);
    table.replaceChildren();
    const columns = rows.length > 0 ? Object.keys(rows[0]) : [];
    const head = table.createTHead().insertRow();
    for (const c of columns) head.append(h("th", {}, c));
    const body = table.createTBody();
    for (const r of rows) {
      body.append(
        h(
          "tr",
          {},
          ...columns.map((c) =>
            h("td", { className: "mono values" }, r[c] === null ? "null" : String(r[c]))
          ),
        ),
      );
    }
    $("snap-state").textContent = rows.length === 0
      ? "no rows"
      : `rows ${snap.offset + 1}–${snap.offset + rows.length}`;
    $("snap-prev").disabled = snap.offset === 0;
    $("snap-next").disabled = rows.length < PAGE;
  } catch (error) {
    $("snap-state").textContent = error.message;
  }
}

$("snap-prev").addEventListener("click", () => {
  snap.offset = Math.max(0, snap.offset - PAGE);
  void showPage();
});
$("snap-next").addEventListener("click", () => {
  snap.offset += PAGE;
  void showPage();
});

// ---- events -------------------------------------------------------------------------------------

const LEVELS = ["info", "warn", "error"];

function renderEvents() {
  if ($("view-events").hidden) return;
  if (!admin) {
    $("events-error").textContent = "Events need an admin token.";
    $("events").replaceChildren();
    return;
  }
  $("events-error").textContent = "";
  const least = LEVELS.indexOf($("event-level").value);
  const filter = $("event-filter").value.trim().toLowerCase();
  const shown = events.filter((e) => LEVELS.indexOf(e.level) >= least).filter((e) =>
    filter === "" ||
    `${e.event} ${e.message} ${JSON.stringify(e.fields)}`.toLowerCase().includes(filter)
  ).slice(-500).reverse();
  $("events").replaceChildren(...shown.map((e) => {
    const fields = Object.entries(e.fields).map(([k, v]) => `${k}=${v}`).join(" ");
    return h(
      "tr",
      { dataset: { event: e.event } },
      h("td", { className: "time" }, iso(e.time)),
      h("td", {}, pill(e.level, e.level === "info" ? "info" : e.level)),
      h("td", { className: "mono name" }, e.event),
      h(
        "td",
        { className: "values" },
        e.message,
        fields ? h("div", { className: "muted mono" }, fields) : undefined,
      ),
    );
  }));
}
$("event-level").addEventListener("change", renderEvents);
$("event-filter").addEventListener("input", renderEvents);

// ---- routing ------------------------------------------------------------------------------------

async function route() {
  const hash = location.hash || "#/";
  const match = /^#\/streams\/([^/]+)$/.exec(hash);
  const view = match ? "stream" : hash === "#/events" ? "events" : "overview";
  const name = match ? decodeURIComponent(match[1]) : undefined;
  if (name !== detailName) {
    detailName = name;
    // What is known of the stream is shown before its view is: never an empty heading.
    renderDetail();
    $("confirm").hidden = true;
    $("action-result").textContent = "";
    if (tail) {
      const closing = tail;
      tail = undefined;
      await closing.close();
    }
    tailState("");
    $("pause").disabled = true;
  }
  for (const name of ["overview", "stream", "events"]) $(`view-${name}`).hidden = name !== view;
  $("nav-overview").ariaCurrent = view === "overview" ? "page" : null;
  $("nav-events").ariaCurrent = view === "events" ? "page" : null;
  await refresh();
  const s = current();
  if (view === "stream" && s && tail === undefined) {
    openSnapshot(s);
    void startTail(s);
  }
}

addEventListener("hashchange", () => void route());
await route();
setInterval(() => void refresh(), REFRESH_MS);
