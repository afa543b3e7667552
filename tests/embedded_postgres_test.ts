import assert from "node:assert/strict";
import { deadline } from "./support/deadline.ts";
import { init, sql, startApi, startPostgres, StreamClient } from "./support/harness.ts";

Deno.test("a fast stop held by a client that confirms nothing becomes an immediate one", async () => {
  const lines: string[] = [];
  await using postgres = await startPostgres({
    fastStopMs: 1000,
    onLog: (line) => lines.push(line),
  });
  const db = postgres.database;
  await sql(db, "CREATE TABLE t(id int primary key)");
  await using api = await startApi(db);
  const slotName = await init(api.url);
  await using client = await StreamClient.connect(api.url, `/v1/lr/stream?slotName=${slotName}`);
  await sql(db, "INSERT INTO t VALUES (1)");
  await client.nextText(); // received, never acknowledged: the walsender waits for its confirmation
  await deadline(postgres.stop(), "PostgreSQL to stop while a stream's client confirms nothing");
  assert.ok(
    lines.some((line) => /did not stop within 1 s .*stopping it now/.test(line)),
    "the stop says why it became immediate",
  );
  await client.closedWithin();
});

Deno.test("a free port taken before PostgreSQL binds it is replaced by another", async () => {
  // What tests running in parallel do to each other: the port picked is bound by someone else first.
  using taken = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const takenPort = (taken.addr as Deno.NetAddr).port;
  let picks = 0;
  await using postgres = await startPostgres({
    pickPort: () => {
      if (picks++ === 0) return takenPort;
      const free = Deno.listen({ hostname: "127.0.0.1", port: 0 });
      free.close();
      return (free.addr as Deno.NetAddr).port;
    },
  });
  assert.equal(picks, 2, "a second port was picked");
  assert.notEqual(postgres.port, takenPort);
  assert.deepEqual(await sql(postgres.database, "SELECT 1 AS one"), [{ one: 1 }]);
});
