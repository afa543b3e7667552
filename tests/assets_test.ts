import assert from "node:assert/strict";
import { buildAssets } from "../tools/build_assets.ts";

Deno.test("the committed client bundle and viewer assets are what deno task build-assets makes", async () => {
  for (const [file, text] of Object.entries(await buildAssets())) {
    const committed = await Deno.readTextFile(new URL(`../${file}`, import.meta.url));
    assert.ok(committed === text, `${file} is out of date: run deno task build-assets`);
  }
});

Deno.test("the client bundle loads in a plain JavaScript runtime with no Deno APIs", async () => {
  // Node 20+ and browsers get this file: it must not reach for Deno or server modules.
  const bundle = await Deno.readTextFile(
    new URL("../client/dist/pgdeltastream.js", import.meta.url),
  );
  assert.doesNotMatch(bundle, /\bDeno\.|from "(pg|hono|zod|jose|npm:)/);
  const module = await import(
    `data:text/javascript;base64,${btoa(unescape(encodeURIComponent(bundle)))}`
  );
  assert.equal(typeof module.connectStream, "function");
  assert.equal(typeof module.snapshotThenStream, "function");
  assert.equal(module.CloseCode.SlotDropped, 4000);
  assert.equal(module.jsonParser("string")("[12345678901234567890]")[0], "12345678901234567890");
});
