import assert from "node:assert/strict";
import { CloseCode } from "../src/protocol.ts";
import { TailHub } from "../src/streams/tail_hub.ts";
import { deadline } from "./support/deadline.ts";

Deno.test("a tail closed while its socket is still connecting hears why once it opens", async () => {
  // A stream deleted the moment a tail connects: Deno drops a socket closed before its open
  // without a close frame, and the client (which saw it open) would wait for good.
  const hub = new TailHub();
  await using server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (req) => {
    const { socket, response } = Deno.upgradeWebSocket(req);
    hub.add("doomed", socket);
    hub.close("doomed", CloseCode.SlotDropped, "stream deleted");
    return response;
  });
  const client = new WebSocket(`ws://127.0.0.1:${server.addr.port}/`);
  const closed = await deadline(
    new Promise<CloseEvent>((resolve) => client.addEventListener("close", resolve)),
    "the tail's close",
    10_000,
  );
  assert.equal(closed.code, CloseCode.SlotDropped);
  assert.equal(closed.reason, "stream deleted");
});
