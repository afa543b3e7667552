/**
 * `deno task compile`: one binary of the server, with the permissions the
 * current configuration needs baked in (a binary's permissions are fixed
 * when it is compiled): compile it with the settings it will run with. A
 * binary run with settings naming other files says which it may not use.
 * @module
 */

import { loadConfig } from "../src/config.ts";
import { serverFlags } from "../src/permissions.ts";

const flags = serverFlags(loadConfig((name) => Deno.env.get(name)).database);
// Arguments are deno compile's (e.g. --output elsewhere); the binary is ./pgdeltastream by default.
const output = Deno.args.some((a) => a.startsWith("--output")) ? [] : ["--output", "pgdeltastream"];
const args = ["compile", ...flags, ...output, ...Deno.args, "src/main.ts"];
console.error(`deno ${args.join(" ")}`);
const { code } = await new Deno.Command("deno", { args, stdout: "inherit", stderr: "inherit" })
  .output();
Deno.exit(code);
