// Drives Debian's headless Chromium for the display tests (playwright-core, no bundled browser).
// Protocol: one JSON command per stdin line, one JSON reply per stdout line:
//   {"id": 1, "op": "open", "page": "a", "url": "...", "width": 1920, "height": 1080}
//   -> {"id": 1, "ok": true, "value": ...} or {"id": 1, "ok": false, "error": "..."}
// Each page gets its own browser context, i.e. its own localStorage, like two ward monitors.
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

const repo = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const require = createRequire(join(repo, "web", "package.json"));
const { chromium } = require("playwright-core");

const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});

const pages = new Map(); // name -> {context, page, logs}

function get(name) {
  const entry = pages.get(name);
  if (!entry) throw new Error(`no page named ${name}`);
  return entry;
}

const ops = {
  async open({ page: name, url, width = 1920, height = 1080, record = false, reducedMotion = "no-preference" }) {
    const context = await browser.newContext({ viewport: { width, height }, reducedMotion });
    const requests = []; // every request the page makes (with record), and every WebSocket it opens
    const sockets = [];
    if (record) {
      // Interception, not just observation: each request is seen before it leaves, and anything that is
      // not loopback is aborted, so a failing test never reaches the outside world either.
      await context.route("**/*", (route) => {
        const req = route.request();
        requests.push({ url: req.url(), type: req.resourceType(), method: req.method() });
        const host = new URL(req.url()).hostname;
        return ["127.0.0.1", "localhost"].includes(host) ? route.continue() : route.abort("blockedbyclient");
      });
    }
    const page = await context.newPage();
    page.on("websocket", (ws) => sockets.push(ws.url()));
    const logs = [];
    page.on("console", (m) => logs.push(`console.${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => logs.push(`pageerror: ${e.message}`));
    // Any request that is not to loopback would break the "no external network" promise.
    page.on("request", (r) => {
      const host = new URL(r.url()).hostname;
      if (!["127.0.0.1", "localhost", ""].includes(host) && !r.url().startsWith("data:")) {
        logs.push(`external-request: ${r.url()}`);
      }
    });
    pages.set(name, { context, page, logs, requests, sockets });
    await page.goto(url, { waitUntil: "load" });
    return true;
  },
  async reload({ page }) {
    await get(page).page.reload({ waitUntil: "load" });
    return true;
  },
  async fill({ page, selector, value }) {
    await get(page).page.fill(selector, value);
    return true;
  },
  async click({ page, selector, timeout = 10000 }) {
    await get(page).page.click(selector, { timeout });
    return true;
  },
  async mouse({ page, action, selector }) {
    const p = get(page).page;
    if (selector) await p.hover(selector);
    if (action === "down") await p.mouse.down();
    else await p.mouse.up();
    return true;
  },
  async press({ page, key, selector }) {
    const p = get(page).page;
    if (selector) await p.press(selector, key);
    else await p.keyboard.press(key);
    return true;
  },
  async focus({ page, selector }) {
    await get(page).page.focus(selector);
    return true;
  },
  async resize({ page, width, height }) {
    await get(page).page.setViewportSize({ width, height });
    return true;
  },
  async requests({ page }) {
    const { requests, sockets } = get(page);
    return { requests, sockets };
  },
  async wait({ page, selector, state = "visible", timeout = 15000 }) {
    await get(page).page.waitForSelector(selector, { state, timeout });
    return true;
  },
  async waitTrue({ page, expression, timeout = 15000 }) {
    // Polled from here: waitForFunction evaluates strings inside the page, which its CSP forbids.
    const deadline = Date.now() + timeout;
    while (!(await get(page).page.evaluate(expression))) {
      if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${expression}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    return true;
  },
  async eval({ page, expression }) {
    return await get(page).page.evaluate(expression);
  },
  async screenshot({ page, path, fullPage = false }) {
    await get(page).page.screenshot({ path, fullPage });
    return path;
  },
  async logs({ page }) {
    return get(page).logs;
  },
  async closePage({ page }) {
    await get(page).context.close();
    pages.delete(page);
    return true;
  },
};

const reply = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
reply({ id: 0, ok: true, value: browser.version() });

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const cmd = JSON.parse(line);
  if (cmd.op === "quit") break;
  try {
    const fn = ops[cmd.op];
    if (!fn) throw new Error(`unknown op ${cmd.op}`);
    reply({ id: cmd.id, ok: true, value: await fn(cmd) });
  } catch (err) {
    reply({ id: cmd.id, ok: false, error: String(err && err.message ? err.message : err) });
  }
}
await browser.close();
