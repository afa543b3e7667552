/**
 * `deno task start` and the container's command: reads the configuration,
 * then runs the server (`src/main.ts`) with exactly the permissions it
 * needs ({@link serverFlags}: the files and socket its database settings
 * name, nothing else on the disk), passing on SIGINT and SIGTERM and ending
 * with its exit code. Arguments are Deno flags for the server besides them
 * (the container's `--frozen --cached-only`, say).
 * @module
 */

import { loadConfig } from "./config.ts";
import { EXIT_CONFIG } from "./exit_codes.ts";
import { serverFlags } from "./permissions.ts";

/** Runs the server as the configuration says; resolves with its exit code. */
export async function launch(extraFlags: string[]): Promise<number> {
  let flags: string[];
  try {
    flags = serverFlags(loadConfig((name) => Deno.env.get(name)).database);
  } catch (error) {
    console.error(`pgdeltastream: ${(error as Error).message}`);
    return EXIT_CONFIG;
  }
  const server = new Deno.Command("deno", {
    args: ["run", ...extraFlags, ...flags, new URL("./main.ts", import.meta.url).pathname],
    stdin: "inherit",
    stdout: "inherit",
    stderr: "inherit",
  }).spawn();
  const forward = (signal: Deno.Signal) => () => {
    try {
      server.kill(signal);
    } catch { /* exited */ }
  };
  const handlers = (["SIGINT", "SIGTERM"] as const).map((signal) => {
    const handler = forward(signal);
    Deno.addSignalListener(signal, handler);
    return () => Deno.removeSignalListener(signal, handler);
  });
  const status = await server.status;
  for (const remove of handlers) remove();
  return status.signal !== null ? 128 + (SIGNALS[status.signal] ?? 0) : status.code;
}

/** Signal numbers, for the exit code of a server a signal ended (128 + n, as a shell reports it). */
const SIGNALS: Partial<Record<Deno.Signal, number>> = {
  SIGHUP: 1,
  SIGINT: 2,
  SIGQUIT: 3,
  SIGKILL: 9,
  SIGTERM: 15,
};

if (import.meta.main) Deno.exit(await launch(Deno.args));
