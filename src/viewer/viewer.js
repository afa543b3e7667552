// The live viewer: streams and their state, a form to create one, a read-only tail of any stream
// (through the client library, so it never moves a position) and a snapshot browser. Every value
// from the database is written with textContent, never as HTML.
// The client library as the server serves it (a variable: type checkers need not resolve it).
const CLIENT_URL = "/assets/pgdeltastream.js";
const { connectStream, jsonParser } = await import(CLIENT_URL);

const $ = (id) => document.getElementById(id);
const MAX_ROWS = 500;
const PAGE = 50;
const tokenInput = $("token");
tokenInput.value = sessionStorage.getItem("pgds-token") ?? "";
tokenInput.addEventListener("change", () => {
  sessionStorage.setItem("pgds-token", tokenInput.value.trim());
  void refresh();
});
const token = () => tokenInput.value.trim() || undefined;
// Snapshot values as their exact text: JSON.parse would round bigint and numeric values.
const parseExact = jsonParser("string");

async function api(method, path, body, exact = false) {
  const headers = { "content-type": "application/json" };
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
      message = JSON.parse(text).error;
    } catch { /* not JSON */ }
    throw new Error(`${response.status}: ${message}`);
  }
  if (text === "") return undefined;
  return exact ? parseExact(text) : JSON.parse(text);
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) (n /= 1024), i++;
  return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
}

/** A value as text: numbers arrive as their exact text, strings as PostgreSQL wrote them. */
function show(value) {
  return value === null
    ? "null"
    : typeof value === "object"
    ? JSON.stringify(value)
    : String(value);
}

function describeTable(t) {
  const columns = t.allColumns ? "" : ` (${t.columns.join(", ")})`;
  const where = t.where.length === 0
    ? ""
    : ` where ${
      t.where.map((c) => c.map((x) => typeof x === "string" ? x : JSON.stringify(x)).join(" "))
        .join(" and ")
    }`;
  return `${t.schema}.${t.table}${columns}${where}`;
}

// ---- streams ------------------------------------------------------------------------------------

let streams = [];

async function refresh() {
  try {
    streams = (await api("GET", "/v2/streams")).streams;
    $("streams-error").textContent = "";
  } catch (error) {
    $("streams-error").textContent = String(error.message);
    return;
  }
  const body = $("streams");
  body.replaceChildren();
  for (const s of streams) {
    const row = body.insertRow();
    row.dataset.stream = s.name;
    cell(row, s.name, "mono");
    cell(row, s.tables.map(describeTable).join("; "));
    cell(row, bytes(s.lagBytes)).className = "lag";
    const state = cell(row, "");
    const pill = document.createElement("span");
    pill.className = `pill ${s.active ? "on" : "off"}`;
    pill.textContent = s.active ? "connected" : "idle";
    state.append(pill, ` ${s.tails} tail${s.tails === 1 ? "" : "s"}`);
    const actions = cell(row, "");
    const tail = document.createElement("button");
    tail.textContent = "Tail";
    tail.addEventListener("click", () => startTail(s));
    const snap = document.createElement("button");
    snap.textContent = "Snapshot";
    snap.disabled = !s.snapshotHeld;
    snap.title = s.snapshotHeld ? "" : "The snapshot was released";
    snap.addEventListener("click", () => openSnapshot(s));
    actions.append(tail, " ", snap);
  }
}

$("create").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const result = $("create-result");
  try {
    const tables = JSON.parse(form.tables.value);
    const operations = [...form.querySelectorAll("input[name=op]:checked")].map((i) => i.value);
    const created = await api("POST", "/v2/streams", { name: form.name.value, tables, operations });
    result.className = "muted";
    result.textContent = `Created ${created.name} (slot ${created.slotName}).`;
    await refresh();
  } catch (error) {
    result.className = "error";
    result.textContent = error instanceof SyntaxError ? `Tables: ${error.message}` : error.message;
  }
});

// ---- tail ---------------------------------------------------------------------------------------

let tail;
let paused = false;
let held = [];

function matches(row) {
  const filter = $("filter").value.trim().toLowerCase();
  return filter === "" || row.dataset.text.includes(filter);
}

function render(lsn, change, keyNames) {
  const row = document.createElement("tr");
  const kind = change.kind;
  cell(row, lsn, "mono");
  cell(row, kind, kind);
  cell(row, `${change.schema}.${change.table}`, "mono");
  let key = "";
  let values = "";
  if (kind === "insert" || kind === "update") {
    const names = change.columnnames ?? [];
    const at = (name) => change.columnvalues[names.indexOf(name)];
    key = (change.oldkeys?.keynames ?? keyNames(change).filter((k) => names.includes(k)))
      .map((k, i) => `${k}=${change.oldkeys ? change.oldkeys.keyvalues[i] : at(k)}`).join(", ");
    values = names.map((n, i) => `${n}=${show(change.columnvalues[i])}`).join(", ");
  } else if (kind === "delete") {
    key = change.oldkeys.keynames.map((k, i) => `${k}=${change.oldkeys.keyvalues[i]}`).join(", ");
  } else if (kind === "schema") {
    values = change.columnnames.map((n, i) => `${n} ${change.columntypes[i]}`).join(", ");
  }
  cell(row, key, "mono key");
  cell(row, values, "mono values");
  row.dataset.text = `${kind} ${change.schema}.${change.table} ${key} ${values}`.toLowerCase();
  row.hidden = !matches(row);
  const body = $("tail-rows");
  body.prepend(row);
  while (body.rows.length > MAX_ROWS) body.deleteRow(body.rows.length - 1);
}

async function startTail(s) {
  await tail?.close();
  $("tail-rows").replaceChildren();
  held = [];
  paused = false;
  $("pause").disabled = false;
  $("pause").textContent = "Pause";
  $("tail-name").textContent = s.name;
  const keys = new Map(s.tables.map((t) => [`${t.schema}.${t.table}`, t.key]));
  const keyNames = (change) => keys.get(`${change.schema}.${change.table}`) ?? [];
  const stream = connectStream({
    url: location.origin,
    stream: s.name,
    tail: true,
    token: () => token(),
    numbers: "string",
    onStatus: (status) => {
      $("tail-state").textContent = status.state === "open"
        ? "watching (read-only)"
        : status.state === "closed"
        ? `closed: ${status.reason || status.code}`
        : status.state;
    },
  });
  tail = stream;
  try {
    for await (const tx of stream) {
      for (const change of tx.changes) {
        if (paused) {
          if (held.length < 5000) held.push([tx.lsn, change, keyNames]);
          $("tail-state").textContent = `paused: ${held.length} change${
            held.length === 1 ? "" : "s"
          } held`;
        } else render(tx.lsn, change, keyNames);
      }
    }
  } catch (error) {
    if (tail === stream) $("tail-state").textContent = error.message;
  }
}

$("pause").addEventListener("click", () => {
  paused = !paused;
  $("pause").textContent = paused ? "Resume" : "Pause";
  $("tail-state").textContent = paused ? "paused: 0 changes held" : "watching (read-only)";
  if (!paused) {
    for (const args of held) render(...args);
    held = [];
  }
});
$("filter").addEventListener("input", () => {
  for (const row of $("tail-rows").rows) row.hidden = !matches(row);
});

// ---- snapshot -----------------------------------------------------------------------------------

let snap;

async function openSnapshot(s) {
  $("snap-name").textContent = s.name;
  const select = $("snap-table");
  select.replaceChildren(...s.tables.map((t) => new Option(`${t.schema}.${t.table}`)));
  snap = { stream: s.name, offset: 0 };
  select.onchange = () => {
    snap.offset = 0;
    void showPage();
  };
  await showPage();
}

async function showPage() {
  const table = $("snap-rows");
  try {
    const rows = await api("POST", `/v2/streams/${snap.stream}/snapshot`, {
      table: $("snap-table").value,
      offset: snap.offset,
      limit: PAGE,
    }, true);
    table.replaceChildren();
    const columns = rows.length > 0 ? Object.keys(rows[0]) : [];
    const head = table.createTHead().insertRow();
    for (const c of columns) head.appendChild(document.createElement("th")).textContent = c;
    const body = table.createTBody();
    for (const r of rows) {
      const row = body.insertRow();
      for (const c of columns) cell(row, r[c] === null ? "null" : String(r[c]), "mono");
    }
    $("snap-state").textContent = `rows ${snap.offset + 1}–${snap.offset + rows.length}`;
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

await refresh();
setInterval(() => void refresh(), 2000);
