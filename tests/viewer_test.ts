import assert from "node:assert/strict";
import { type Browser, chromium, type Page } from "playwright-core";
import { poll } from "./support/deadline.ts";
import {
  authOn,
  createStream,
  init,
  sql,
  startApi,
  startPostgres,
  StreamClient,
} from "./support/harness.ts";

const CHROMIUM = Deno.env.get("CHROMIUM_PATH") ?? "/usr/bin/chromium";
const hasChromium = await Deno.stat(CHROMIUM).then(() => true, () => false);
// CI installs Chromium and sets REQUIRE_BROWSER=1, so that a missing browser fails instead of skipping.
if (!hasChromium && Deno.env.get("REQUIRE_BROWSER") === "1") {
  throw new Error(`REQUIRE_BROWSER=1 but there is no Chromium at ${CHROMIUM}`);
}

function launch(): Promise<Browser> {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1", "--no-sandbox"],
  });
}

/** Whether the page scrolls sideways at its current width (it should not: tables scroll inside). */
function overflowsSideways(page: Page): Promise<boolean> {
  // A string: the test is checked without the DOM's types.
  return page.evaluate<boolean>("document.documentElement.scrollWidth > window.innerWidth + 1");
}

/** The text of `selector`, or "" when it has none. */
async function text(page: Page, selector: string): Promise<string> {
  return await page.textContent(selector) ?? "";
}

Deno.test({
  name: "console: overview, charts, a stream's detail, its tail and actions, and the events feed",
  ignore: !hasChromium,
  // Playwright's pipes and timers outlive its close by a tick.
  sanitizeOps: false,
  sanitizeResources: false,
  async fn(t) {
    await using postgres = await startPostgres();
    const db = postgres.database;
    await sql(
      db,
      `CREATE TABLE orders(id int8 primary key, customer text, total numeric(12,2));
       INSERT INTO orders VALUES (1, 'ada', 10.50), (2, 'grace', 20.00), (9007199254740993, 'big', 1.00)`,
    );
    // Protected mode (no credentials configured): the page works from this machine without a token.
    await using api = await startApi(db, {
      metrics: { enabled: true, historyIntervalMs: 500 },
      walGuardIntervalMs: 500,
    });
    const browser = await launch();
    try {
      const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
      const errors: string[] = [];
      page.on("pageerror", (error) => errors.push(error.message));
      page.on("console", (message) => {
        // Refusals the steps provoke are logged by the browser as failed loads; the rest is not.
        if (message.type() === "error" && !/^Failed to load resource/.test(message.text())) {
          errors.push(message.text());
        }
      });
      await page.goto(api.url.href);

      await t.step(
        "creating a stream with the form lists it, healthy, with no consumer",
        async () => {
          await page.fill("input[name=name]", "orders-live");
          await page.fill("textarea[name=tables]", '["public.orders"]');
          await page.click("#create button[type=submit]");
          await page.waitForSelector("#create-result:has-text('Created orders-live')");
          const row = "tr[data-stream='orders-live']";
          await page.waitForSelector(row);
          assert.match(await text(page, row), /public\.orders/);
          assert.equal(await text(page, `${row} .pill.ok`), "ok");
          assert.equal(await text(page, `${row} .pill.off`), "none");
        },
      );

      await t.step("a v1 slot is listed beside the streams, with its lag", async () => {
        const slotName = await init(api.url);
        await sql(db, "INSERT INTO orders VALUES (10, 'v1-lag', 1)");
        const row = `tr[data-row='v1 slot:${slotName}']`;
        await page.waitForSelector(row);
        assert.match(await text(page, row), /v1 slot/);
        assert.doesNotMatch(await text(page, `${row} td.lag`), /^0 B$|–/);
      });

      await t.step("a stream past its limits is a problem on top, and sorts first", async () => {
        await createStream(api.url, {
          name: "forgotten",
          tables: ["orders"],
          limits: { maxIdleSeconds: 2 },
        });
        await page.waitForSelector("#problem-list li:has-text('stream forgotten is invalidated')");
        assert.equal(
          await page.locator("#streams tr").first().getAttribute("data-stream"),
          "forgotten",
        );
        assert.equal(
          await text(page, "tr[data-stream='forgotten'] .pill.invalidated"),
          "invalidated",
        );
      });

      await t.step(
        "a stream's detail shows its definition, state and exact snapshot rows",
        async () => {
          await page.click("tr[data-stream='orders-live'] a");
          await page.waitForSelector("#view-stream:not([hidden])");
          assert.equal(await text(page, "#detail-name"), "orders-live");
          assert.match(await text(page, "#detail-definition"), /public\.orders.*key id/s);
          assert.match(await text(page, "#detail-definition"), /insert, update, delete, truncate/);
          await page.waitForSelector("#snap-rows td:has-text('grace')");
          assert.match(await text(page, "#snap-rows"), /9007199254740993/);
          assert.match(await text(page, "#snap-state"), /rows 1–3/);
        },
      );

      await t.step("with no consumer the tail says it waits for one", async () => {
        await page.waitForSelector("#tail-state:has-text('watching')");
        assert.equal(await page.locator("#tail-waiting").isVisible(), true);
      });

      // The tail copies what the stream's consumer is sent: a consumer (the tests' raw client).
      const consumer = await StreamClient.changes(api.url, "orders-live");
      try {
        await t.step(
          "changes appear grouped by transaction, coloured, old key beside new",
          async () => {
            await page.waitForSelector("#tail-waiting", { state: "hidden" });
            await sql(
              db,
              "BEGIN; INSERT INTO orders VALUES (3, 'linus', 33.33); UPDATE orders SET total = 44.44 WHERE id = 2; COMMIT",
            );
            await sql(db, "UPDATE orders SET id = 20 WHERE id = 1");
            const tx = page.locator("#tail-rows tbody.tx", { hasText: "linus" });
            await tx.waitFor();
            assert.match(
              await tx.locator("tr.txhead").textContent() ?? "",
              /\/[0-9A-F]+ · 2 changes/,
            );
            const insert = tx.locator("tr.change", { hasText: "linus" });
            assert.equal(await insert.locator("td.insert").textContent(), "insert");
            assert.equal(await insert.locator("td.key").textContent(), "id=3");
            const update = tx.locator("tr.change", { hasText: "44.44" });
            assert.equal(await update.locator("td.update").textContent(), "update");
            const moved = page.locator("#tail-rows tr.change", { hasText: "id=1 → id=20" });
            await moved.waitFor();
            assert.equal(await moved.locator("td.update").count(), 1);
            await insert.locator("summary").click();
            assert.match(await insert.locator("pre").textContent() ?? "", /"kind": "insert"/);
            while (consumer.pending > 0) consumer.ack((await consumer.next()).nextlsn);
          },
        );

        await t.step("the filter hides transactions that do not match", async () => {
          await page.fill("#filter", "linus");
          assert.equal(
            await page.locator("#tail-rows tbody.tx", { hasText: "id=20" }).isVisible(),
            false,
          );
          assert.equal(
            await page.locator("#tail-rows tbody.tx", { hasText: "linus" }).isVisible(),
            true,
          );
          await page.fill("#filter", "");
        });

        await t.step("pause holds new changes back until resume", async () => {
          await page.click("#pause");
          await sql(db, "INSERT INTO orders VALUES (4, 'paused-row', 1)");
          await page.waitForSelector("#tail-state:has-text('paused: 1 change held')");
          assert.equal(await page.locator("#tail-rows tr", { hasText: "paused-row" }).count(), 0);
          await page.click("#pause");
          await page.waitForSelector("#tail-rows tr:has-text('paused-row')");
        });

        await t.step("the charts move while a writer runs", async () => {
          const line =
            "#detail-charts [data-chart='Changes/s out'] path[data-series='orders-live']";
          // A writer of ten rows per round until the page's next history sample shows them.
          let round = 0;
          await poll(
            async () => {
              const from = 1000 + round++ * 10;
              await sql(
                db,
                `INSERT INTO orders SELECT g, 'w', 1 FROM generate_series(${from}, ${from + 9}) g`,
              );
              while (consumer.pending > 0) consumer.ack((await consumer.next()).nextlsn);
              const max = await page.locator("#detail-charts [data-chart='Changes/s out'] svg")
                .getAttribute("data-max");
              return await page.locator(line).count() > 0 && Number(max) > 1;
            },
            "the changes/s chart to draw the writer's rate above 1",
            { intervalMs: 100 },
          );
          await page.waitForSelector(line, { state: "attached" });
          assert.ok(
            Number(
              await page.locator("#detail-charts [data-chart='Changes/s out'] svg").getAttribute(
                "data-max",
              ),
            ) > 1,
            "the changes/s chart never rose above 1",
          );
          await page.waitForSelector(
            "#detail-charts [data-chart='Commit → client latency'] path[data-series='p99']",
            { state: "attached" },
          );
          assert.match(await text(page, "#consumers"), /changes/);
          const screenshots = Deno.env.get("VIEWER_SCREENSHOTS");
          if (screenshots) {
            await page.screenshot({ path: `${screenshots}/console-stream.png`, fullPage: true });
          }
        });

        await t.step(
          "an admin changes the limits; a refused change shows the server's error",
          async () => {
            await page.fill("#limits input[name=maxIdleSeconds]", "3600");
            await page.click("#limits button[type=submit]");
            await page.waitForSelector("#action-result:has-text('Limits saved')");
            await page.waitForSelector("#detail-definition:has-text('60 min idle')");
            assert.equal(
              (await (await fetch(new URL("/v2/streams/orders-live", api.url))).json()).limits
                .maxIdleSeconds,
              3600,
            );
            await page.fill("#limits input[name=maxLagBytes]", "1e20");
            await page.click("#limits button[type=submit]");
            await page.waitForSelector("#action-result.error");
            assert.match(
              await text(page, "#action-result"),
              /Refused: 400: Invalid request: "maxLagBytes" must be a whole number of bytes/,
            );
          },
        );

        await t.step("releasing the snapshot and resetting are confirmed, then done", async () => {
          await page.click("#act-release");
          assert.match(await text(page, "#confirm-text"), /Release the snapshot of orders-live/);
          await page.click("#confirm-yes");
          await page.waitForSelector("#action-result:has-text('The snapshot was released')");
          await page.waitForSelector("#detail-state:has-text('released')");
          assert.equal(await page.locator("#act-release").isDisabled(), true);
        });
      } finally {
        await consumer[Symbol.asyncDispose]();
      }

      await t.step("a tail closed by the server says why, and Pause is disabled", async () => {
        await createStream(api.url, { name: "doomed", tables: ["orders"] });
        await page.goto(`${api.url.href}#/streams/doomed`);
        await page.waitForSelector("#tail-state:has-text('watching')");
        assert.equal(await page.locator("#pause").isDisabled(), false);
        assert.equal(
          (await fetch(new URL("/v2/streams/doomed", api.url), { method: "DELETE" })).status,
          204,
        );
        await page.waitForSelector("#tail-state:has-text('closed (4000)')");
        assert.equal(await page.locator("#pause").isDisabled(), true);
        await page.waitForSelector("#detail-error:has-text('No stream \"doomed\"')");
      });

      await t.step("deleting a stream from its page, confirmed, removes it", async () => {
        await page.goto(`${api.url.href}#/streams/forgotten`);
        await page.waitForSelector("#detail-health .pill.invalidated");
        await page.click("#act-delete");
        await page.click("#confirm-yes");
        await page.waitForSelector("#view-overview:not([hidden])");
        await page.waitForSelector("tr[data-stream='orders-live']");
        assert.equal(await page.locator("tr[data-stream='forgotten']").count(), 0);
        assert.equal(
          (await fetch(new URL("/v2/streams/forgotten", api.url))).status,
          404,
        );
      });

      await t.step(
        "the events feed shows what happened, newest first, filtered by level",
        async () => {
          await page.click("#nav-events");
          await page.waitForSelector("#events tr[data-event='consumer.connected']");
          await page.waitForSelector("#events tr[data-event='stream.limits_changed']");
          assert.match(await text(page, "#events"), /stream=orders-live/);
          const times = await page.locator("#events td.time").allTextContents();
          assert.deepEqual(times, [...times].sort().reverse(), "events are not newest first");
          assert.ok(times.every((t) => /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/.test(t)), times[0]);
          await page.selectOption("#event-level", "error");
          await page.waitForSelector("#events tr[data-event='stream.invalidated']");
          assert.equal(
            await page.locator("#events tr[data-event='consumer.connected']").count(),
            0,
          );
        },
      );

      await t.step(
        "usable at 1280×800 and at a phone's width, and the icon is served",
        async () => {
          await page.goto(api.url.href);
          await page.waitForSelector("tr[data-stream='orders-live']");
          assert.equal(await overflowsSideways(page), false, "the page scrolls sideways at 1280");
          const screenshots = Deno.env.get("VIEWER_SCREENSHOTS");
          if (screenshots) await page.screenshot({ path: `${screenshots}/console.png` });
          await page.setViewportSize({ width: 390, height: 844 });
          assert.equal(await overflowsSideways(page), false, "the page scrolls sideways at 390");
          await page.goto(`${api.url.href}#/streams/orders-live`);
          await page.waitForSelector("#detail-state:has-text('retained WAL')");
          assert.equal(await overflowsSideways(page), false, "the detail scrolls sideways at 390");
          const icon = await fetch(new URL("/favicon.ico", api.url));
          assert.equal(icon.status, 200);
          assert.match(icon.headers.get("content-type") ?? "", /^image\/svg\+xml/);
          await icon.body?.cancel();
        },
      );
      assert.deepEqual(errors, [], "errors in the page");
    } finally {
      await browser.close();
    }
  },
});

Deno.test({
  name:
    "console with auth on: nothing without a token, an admin sees all, a consumer only its stream",
  ignore: !hasChromium,
  sanitizeOps: false,
  sanitizeResources: false,
  async fn(t) {
    await using postgres = await startPostgres();
    const db = postgres.database;
    await sql(db, "CREATE TABLE a_t(id int primary key); CREATE TABLE b_t(id int primary key)");
    const ADMIN = `admin-${crypto.randomUUID()}`;
    await using api = await startApi(db, {
      auth: authOn(ADMIN),
    });
    const asAdmin = { authorization: `Bearer ${ADMIN}`, "content-type": "application/json" };
    for (const [name, table] of [["alpha", "a_t"], ["beta", "b_t"]]) {
      const response = await fetch(new URL("/v2/streams", api.url), {
        method: "POST",
        headers: asAdmin,
        body: JSON.stringify({ name, tables: [table] }),
      });
      assert.equal(response.status, 201, await response.text());
    }
    const minted = await fetch(new URL("/v2/streams/alpha/tokens", api.url), {
      method: "POST",
      headers: asAdmin,
      body: "{}",
    });
    const { token: alphaToken } = await minted.json();
    const browser = await launch();
    try {
      const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
      await page.goto(api.url.href);

      await t.step("without a token the page says it needs one, and lists nothing", async () => {
        await page.waitForSelector("#streams-error:has-text('401')");
        assert.match(await text(page, "#streams-error"), /Enter a token above/);
        assert.equal(await page.locator("#streams tr").count(), 0);
      });

      await t.step(
        "an admin token shows every stream, kept for the tab, never in the URL",
        async () => {
          await page.fill("#token", ADMIN);
          await page.press("#token", "Enter");
          await page.waitForSelector("tr[data-stream='alpha']");
          await page.waitForSelector("tr[data-stream='beta']");
          assert.equal(await page.evaluate(() => sessionStorage.getItem("pgds-token")), ADMIN);
          assert.doesNotMatch(page.url(), new RegExp(ADMIN));
          await page.reload();
          await page.waitForSelector("tr[data-stream='beta']");
        },
      );

      await t.step("a stream's token sees only its stream, and no admin actions", async () => {
        await page.fill("#token", alphaToken);
        await page.press("#token", "Enter");
        await page.waitForSelector("#conn:has-text('not an admin')");
        await page.waitForSelector("tr[data-stream='alpha']");
        assert.equal(await page.locator("tr[data-stream='beta']").count(), 0);
        await page.click("tr[data-stream='alpha'] a");
        await page.waitForSelector("#tail-state:has-text('watching')");
        assert.equal(await page.locator("#act-delete").isDisabled(), true);
        assert.equal(await page.locator("#limits").isVisible(), false);
      });
    } finally {
      await browser.close();
    }
  },
});
