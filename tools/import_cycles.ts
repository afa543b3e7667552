/**
 * Fails when a module of `src/` imports, directly or not, one that imports
 * it back: the import graph (type-only imports too) of `deno info --json` of the entry points,
 * its strongly connected components of more than one module (Tarjan's
 * algorithm) printed as the circles they make. Part of `deno task check`.
 * @module
 */

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
        [d.code?.specifier, d.type?.specifier].filter((s): s is string => s?.startsWith(src) ?? false)
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
  if (found.length > 0) {
    console.error(`${found.length} import circle(s) in src/:`);
    for (const component of found) console.error(`  ${component.map(short).sort().join(" ↔ ")}`);
    Deno.exit(1);
  }
  const arrows = [...edges.values()].reduce((n, e) => n + e.length, 0);
  console.log(`no import circles in src/ (${edges.size} modules, ${arrows} imports)`);
}
