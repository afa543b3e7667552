/**
 * The README's examples, run as written against `deno task dev`: every
 * fenced shell block of "Use it" and of the named streams' section, command
 * after command (`curl`, `psql`, `websocat`), each output shown compared
 * with what it printed (slot names and positions aside). So the README
 * cannot drift from the server.
 */

import assert from "node:assert/strict";
import { deadline } from "./support/deadline.ts";
import { ChildProcess, runtimeFlags, StreamClient } from "./support/harness.ts";

const REPO = new URL("..", import.meta.url).pathname;

/** One command of a block and the lines shown after it. */
interface Step {
  command: string;
  output: string[];
}

/** The shell blocks of the README sections that start with `headings`. */
async function blocks(headings: string[]): Promise<Step[][]> {
  const readme = await Deno.readTextFile(`${REPO}README.md`);
  const found: Step[][] = [];
  for (const heading of headings) {
    const start = readme.indexOf(`\n## ${heading}`);
    assert.notEqual(start, -1, `README has no section "${heading}"`);
    const end = readme.indexOf("\n## ", start + 4);
    const section = readme.slice(start, end === -1 ? undefined : end);
    for (const [, body] of section.matchAll(/```bash\n([\s\S]*?)```/g)) {
      const steps: Step[] = [];
      const lines = body.split("\n");
      for (let i = 0; i < lines.length; i++) {
        const line = lines[i];
        if (line.startsWith("$ ")) {
          let command = line.slice(2);
          // Continued: a trailing backslash, or a quote left open (a JSON body over several lines).
          while (
            i + 1 < lines.length &&
            (command.endsWith("\\") || (command.match(/'/g) ?? []).length % 2 === 1)
          ) {
            command = command.endsWith("\\")
              ? `${command.slice(0, -1)}${lines[++i]}`
              : `${command}\n${lines[++i]}`;
          }
          steps.push({ command, output: [] });
        } else if (line.trim() !== "" && !line.startsWith("#") && steps.length > 0) {
          steps.at(-1)!.output.push(line);
        }
      }
      if (steps.length > 0) found.push(steps);
    }
  }
  return found;
}

/** Names and positions that differ from run to run, made alike. */
function normalize(text: string): string {
  return text
    .replace(/\b[0-9A-F]{1,8}\/[0-9A-F]{1,8}\b/g, "LSN")
    .replace(/\bdelta_[a-z]+\d+\b/g, "SLOT")
    .replace(/\bpgds_[a-z0-9_]+_[0-9a-f]{6}\b/g, "SLOT")
    .replace(/\bbf_[0-9a-f]{12}\b/g, "BACKFILL");
}

/** Whether `actual` is what `expected` shows: equal, or, where it says `...`, its pieces in order. */
function shows(actual: string, expected: string): boolean {
  const a = normalize(actual.trim());
  const e = normalize(expected.trim());
  if (!e.includes("...")) return a === e;
  let at = 0;
  for (const piece of e.split("...")) {
    const found = a.indexOf(piece, at);
    if (found === -1) return false;
    at = found + piece.length;
  }
  return true;
}

function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { port } = listener.addr as Deno.NetAddr;
  listener.close();
  return port;
}

Deno.test("the README's examples work as written against deno task dev", async () => {
  const cwd = await Deno.makeTempDir({ prefix: "pgds-readme-" });
  await Deno.chmod(cwd, 0o755);
  const pgPort = freePort();
  const serverPort = freePort();
  const env = {
    PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin",
    HOME: Deno.env.get("HOME") ?? "/",
  };
  const dev = await ChildProcess.spawn({
    name: "deno task dev",
    args: [
      "run",
      "--config",
      `${REPO}deno.json`,
      ...await runtimeFlags("dev"),
      `${REPO}src/dev/dev.ts`,
    ],
    cwd,
    env: { ...env, DEV_PG_PORT: String(pgPort), SERVERPORT: String(serverPort) },
    ready: /init: {6}curl (http:\/\/\S+)\/v1\/init/,
  });
  const sockets: StreamClient[] = [];
  try {
    const names = new Map<string, string>(); // the README's names → this run's
    const rewrite = (command: string) => {
      let out = command.replaceAll("localhost:12312", `127.0.0.1:${serverPort}`)
        .replaceAll("127.0.0.1:54329", `127.0.0.1:${pgPort}`);
      for (const [shown, actual] of names) out = out.replaceAll(shown, actual);
      return out;
    };
    let ran = 0;
    for (const steps of await blocks(["Use it", "Many consumers"])) {
      const watching: { client: StreamClient; output: string[] }[] = [];
      for (const step of steps) {
        const command = rewrite(step.command).replace(/\s+#.*$/, "");
        ran++;
        if (command.startsWith("websocat ")) {
          const url = new URL(command.slice("websocat ".length).trim());
          const client = await StreamClient.connect(
            new URL(`http://${url.host}`),
            `${url.pathname}${url.search}`,
          );
          sockets.push(client);
          watching.push({ client, output: step.output });
          continue;
        }
        // curl answers an error status as a failure, with its body; psql reads no ~/.psqlrc.
        const script = `curl() { command curl -sS --fail-with-body "$@"; echo; }\n${command}`;
        const { code, stdout, stderr } = await deadline(
          new Deno.Command("bash", {
            args: ["-c", script],
            env: { ...env, PSQLRC: "/dev/null" },
            stdout: "piped",
            stderr: "piped",
          }).output(),
          `the README command ${step.command}`,
        );
        const printed = new TextDecoder().decode(stdout);
        assert.equal(code, 0, `${step.command}\n${printed}${new TextDecoder().decode(stderr)}`);
        const lines = printed.trim().split("\n").filter(Boolean);
        step.output.forEach((expected, i) => {
          assert.ok(
            lines[i] !== undefined && shows(lines[i], expected),
            `${step.command}\nshows:   ${expected}\nprinted: ${lines[i]}`,
          );
        });
        // The slot the README calls delta_maple271828 is this run's own.
        const slot = /"slotName":"(delta_[a-z]+\d+)"/.exec(printed)?.[1];
        const shownSlot = /"slotName":"(delta_[a-z]+\d+)"/.exec(step.output.join(""))?.[1];
        if (slot && shownSlot) names.set(shownSlot, slot);
      }
      // What each websocat printed: the frames shown after it, in order.
      for (const { client, output } of watching) {
        for (const expected of output) {
          const frame = await client.nextText();
          assert.ok(
            shows(frame, expected),
            `websocat ${client.url}\nshows:   ${expected}\nprinted: ${frame}`,
          );
        }
      }
      for (const client of sockets.splice(0)) await client[Symbol.asyncDispose]();
    }
    assert.ok(ran >= 15, `only ${ran} commands ran`);
  } finally {
    for (const client of sockets) await client[Symbol.asyncDispose]().catch(() => {});
    await dev.kill("SIGINT");
    await Deno.remove(cwd, { recursive: true }).catch(() => {});
  }
});
