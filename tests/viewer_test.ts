import assert from "node:assert/strict";
import { chromium } from "playwright-core";
import { sql, startApi, startPostgres, StreamClient } from "./support/harness.ts";

const CHROMIUM = Deno.env.get("CHROMIUM_PATH") ?? "/usr/bin/chromium";
const hasChromium = await Deno.stat(CHROMIUM).then(() => true, () => false);
// CI installs Chromium and sets REQUIRE_BROWSER=1, so that a missing browser fails instead of skipping.
if (!hasChromium && Deno.env.get("REQUIRE_BROWSER") === "1") {
  throw new Error(`REQUIRE_BROWSER=1 but there is no Chromium at ${CHROMIUM}`);
}

Deno.test({
  name:
    "viewer: a user creates a stream in the browser and sees rows inserted with SQL appear in its tail",
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
    await using api = await startApi(db);
    const browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: ["--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1", "--no-sandbox"],
    });
    try {
      const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
      const errors: string[] = [];
      page.on("pageerror", (error) => errors.push(error.message));
      await page.goto(api.url.href);

      await t.step("creating a stream with the form lists it", async () => {
        await page.fill("input[name=name]", "orders-live");
        await page.fill("textarea[name=tables]", '["public.orders"]');
        await page.click("button[type=submit]");
        await page.waitForSelector("#create-result:has-text('Created orders-live')");
        await page.waitForSelector("tr[data-stream='orders-live']");
        assert.match(
          await page.textContent("tr[data-stream='orders-live']") ?? "",
          /public\.orders/,
        );
      });

      await t.step(
        "the snapshot browser shows the rows as of the stream's creation, exactly",
        async () => {
          await page.click("tr[data-stream='orders-live'] button:has-text('Snapshot')");
          await page.waitForSelector("#snap-rows td:has-text('grace')");
          assert.match(await page.textContent("#snap-rows") ?? "", /9007199254740993/);
          assert.match(await page.textContent("#snap-state") ?? "", /rows 1–3/);
        },
      );

      // The tail copies what the stream's consumer is sent: a consumer (the tests' raw client).
      let consumer: StreamClient | undefined;
      try {
        await t.step(
          "rows inserted with SQL appear in the tail, with kind, table, key and values",
          async () => {
            await page.click("tr[data-stream='orders-live'] button:has-text('Tail')");
            await page.waitForSelector("#tail-state:has-text('watching')");
            consumer = await StreamClient.changes(api.url, "orders-live");
            await sql(db, "INSERT INTO orders VALUES (3, 'linus', 33.33)");
            await sql(db, "UPDATE orders SET total = 44.44 WHERE id = 2");
            await page.waitForSelector("#tail-rows tr:has-text('linus')");
            await page.waitForSelector("#tail-rows tr:has-text('44.44')");
            const insert = page.locator("#tail-rows tr", { hasText: "linus" });
            assert.equal(await insert.locator("td").nth(1).textContent(), "insert");
            assert.equal(await insert.locator("td").nth(2).textContent(), "public.orders");
            assert.equal(await insert.locator("td.key").textContent(), "id=3");
            const update = page.locator("#tail-rows tr", { hasText: "44.44" });
            assert.equal(await update.locator("td").nth(1).textContent(), "update");
            assert.equal(await update.locator("td.key").textContent(), "id=2");
          },
        );

        await t.step("the filter box hides what does not match", async () => {
          await page.fill("#filter", "linus");
          assert.equal(
            await page.locator("#tail-rows tr", { hasText: "44.44" }).isVisible(),
            false,
          );
          assert.equal(await page.locator("#tail-rows tr", { hasText: "linus" }).isVisible(), true);
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

        await t.step("the stream list shows the consumer connected and the tail", async () => {
          await page.waitForSelector("tr[data-stream='orders-live'] .pill.on");
          assert.match(
            await page.textContent("tr[data-stream='orders-live']") ?? "",
            /connected 1 tail(?!s)/,
          );
          const screenshot = Deno.env.get("VIEWER_SCREENSHOT");
          if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
        });
      } finally {
        await consumer?.[Symbol.asyncDispose]();
      }
      assert.deepEqual(errors, [], "errors in the page");
    } finally {
      await browser.close();
    }
  },
});
