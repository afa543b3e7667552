/**
 * Checks the import graph of `src/` (type-only imports too, from
 * `deno info --json` of the entry points), as part of `deno task check`:
 *
 * - **no circles**: no module imports, directly or not, one that imports it
 *   back (the strongly connected components of the graph, by Tarjan's
 *   algorithm, printed as the circles they make);
 * - **layers**: each folder imports only what {@link LAYERS} lets it, as
 *   `docs/architecture.md` draws them; every violation is printed.
 * @module
 */

/**
 * What each part of `src/` must not import (by path prefix): lower layers
 * know nothing of the ones built on them, ports are implemented, not
 * imported, and only the composition root and the launchers see everything.
 */
export const LAYERS: Record<string, string[]> = {
  "protocol.ts": ["*"],
  "lsn.ts": ["*"],
  "errors.ts": ["*"],
  "deadline_timer.ts": ["*"],
  "observability/": ["streams/", "relay/", "http/", "server.ts", "snapshots/", "slots/"],
  "auth/": ["streams/", "relay/", "http/", "server.ts", "postgres/", "snapshots/", "slots/"],
  "postgres/": ["replication/", "streams/", "relay/", "http/", "server.ts", "snapshots/", "slots/"],
  "replication/": ["streams/", "relay/", "http/", "server.ts", "snapshots/", "slots/"],
  "snapshots/": ["streams/", "relay/", "http/", "server.ts", "slots/"],
  "slots/": ["streams/", "relay/", "http/", "server.ts"],
  "streams/": ["relay/", "http/", "server.ts"],
  "relay/": ["http/", "server.ts"],
  "http/": ["server.ts", "main.ts", "launch.ts", "dev/"],
  "server.ts": ["main.ts", "launch.ts", "dev/"],
};

/** The rules `edges` break: `a imports b`, where `a`'s layer may not import `b`. */
export function violations(edges: Map<string, string[]>, base: string): string[] {
  const found: string[] = [];
  for (const [from, imports] of edges) {
    const path = from.slice(base.length);
    const rule = Object.entries(LAYERS).find(([prefix]) => path.startsWith(prefix));
    if (rule === undefined) continue;
    for (const to of imports) {
      const target = to.slice(base.length);
      const banned = rule[1].some((prefix) => prefix === "*" || target.startsWith(prefix));
      if (banned && !target.startsWith(rule[0])) found.push(`${path} imports ${target}`);
    }
  }
  return found;
}

const root = new URL("../", import.meta.url);
const src = new URL("src/", root).href;

/** The local import graph of `entries`: module → the `src/` modules it imports. */
async function graph(entries: string[]): Promise<Map<string, string[]>> {
  const edges = new Map<string, string[]>();
  for (const entry of entries) {
    const { stdout, success, stderr } = await new Deno.Command(Deno.execPath(), {
      args: ["info", "--json", entry],
      cwd: root.pathname,
      stdout: "piped",
      stderr: "piped",
    }).output();
    if (!success) throw new Error(`deno info failed: ${new TextDecoder().decode(stderr)}`);
    const info = JSON.parse(new TextDecoder().decode(stdout)) as {
      modules: {
        specifier: string;
        dependencies?: { code?: { specifier: string }; type?: { specifier: string } }[];
      }[];
    };
    for (const module of info.modules) {
      if (!module.specifier.startsWith(src)) continue;
      // Type-only imports count: a module that needs another's types cannot be read alone either.
      const imports = (module.dependencies ?? []).flatMap((d) =>
        [d.code?.specifier, d.type?.specifier].filter((s): s is string =>
          s?.startsWith(src) ?? false
        )
      );
      edges.set(module.specifier, imports);
    }
  }
  return edges;
}

/** The import circles of `edges`: each strongly connected component with more than one module. */
export function cycles(edges: Map<string, string[]>): string[][] {
  let index = 0;
  const indices = new Map<string, number>();
  const low = new Map<string, number>();
  const stack: string[] = [];
  const onStack = new Set<string>();
  const found: string[][] = [];
  const visit = (v: string) => {
    indices.set(v, index);
    low.set(v, index++);
    stack.push(v);
    onStack.add(v);
    for (const w of edges.get(v) ?? []) {
      if (!indices.has(w)) {
        visit(w);
        low.set(v, Math.min(low.get(v)!, low.get(w)!));
      } else if (onStack.has(w)) {
        low.set(v, Math.min(low.get(v)!, indices.get(w)!));
      }
    }
    if (low.get(v) === indices.get(v)) {
      const component: string[] = [];
      let w: string;
      do {
        w = stack.pop()!;
        onStack.delete(w);
        component.push(w);
      } while (w !== v);
      if (component.length > 1) found.push(component);
    }
  };
  for (const v of edges.keys()) if (!indices.has(v)) visit(v);
  return found;
}

if (import.meta.main) {
  const edges = await graph(["src/main.ts", "src/launch.ts", "src/dev/dev.ts"]);
  const found = cycles(edges);
  const short = (s: string) => s.slice(src.length);
  const broken = violations(edges, src);
  if (found.length > 0) {
    console.error(`${found.length} import circle(s) in src/:`);
    for (const component of found) console.error(`  ${component.map(short).sort().join(" ↔ ")}`);
  }
  if (broken.length > 0) {
    console.error(`${broken.length} import(s) across layers (see docs/architecture.md):`);
    for (const line of broken) console.error(`  ${line}`);
  }
  if (found.length > 0 || broken.length > 0) Deno.exit(1);
  const arrows = [...edges.values()].reduce((n, e) => n + e.length, 0);
  console.log(
    `no import circles or layer breaks in src/ (${edges.size} modules, ${arrows} imports)`,
  );
}
