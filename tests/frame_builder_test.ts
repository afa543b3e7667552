import assert from "node:assert/strict";
import { FrameBuilder } from "../src/replication/frame_builder.ts";
import { seededRandom, testSeed } from "./support/random.ts";

Deno.test("a frame's text is its opening, its changes joined by commas, and ]}, whatever their sizes", () => {
  const seed = testSeed();
  const random = seededRandom(seed);
  const pieces = ["a", "é", "€", "😀", '\\"', "x".repeat(1000)];
  const change = () => {
    const length = random() < 0.05 ? 40_000 : Math.floor(random() * 300);
    let text = "";
    while (text.length < length) text += pieces[Math.floor(random() * pieces.length)];
    return JSON.stringify({ v: text });
  };
  const builder = new FrameBuilder(64 << 10);
  for (let frame = 0; frame < 200; frame++) {
    const changes = Array.from({ length: Math.floor(random() * 400) }, change);
    for (const c of changes) builder.add(c);
    assert.equal(builder.count, changes.length, `seed ${seed}`);
    const head = `{"nextlsn":"0/${frame.toString(16)}","change":[`;
    assert.equal(
      builder.take(head),
      `${head}${changes.join(",")}]}`,
      `seed ${seed}, frame ${frame}`,
    );
    assert.equal(builder.count, 0);
  }
});

Deno.test("a cleared builder starts its next frame empty", () => {
  const builder = new FrameBuilder(1024);
  for (let i = 0; i < 10_000; i++) builder.add(`{"i":${i}}`);
  builder.clear();
  builder.add('{"i":"only"}');
  assert.equal(builder.take("["), '[{"i":"only"}]}');
});
