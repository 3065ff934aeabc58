// Opens edgerelay viewer-page URLs (web/index.html + viewer.js) in the Debian Chromium and
// reports what each page shows: role, status, frames decoded (from the page's stats table).
//
// Usage: node gateway_page.mjs '{"urls": {"name": "http://..."}, "seconds": 30, "minFrames": 30}'
// Prints {"event":"stats",...} samples and a final {"event":"result","pages":{name: {...}}}.
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const opts = JSON.parse(process.argv[2] || '{}');
const seconds = Number(opts.seconds ?? 30);
const deadline = Date.now() + seconds * 1000;
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'edgerelay-chromium-page-'));
const guard = setTimeout(() => { emit({ event: 'error', error: 'watchdog fired' }); process.exit(3); },
  (seconds + 30) * 1000);
let browser;
let code = 0;
try {
  browser = await chromium.launchPersistentContext(userDataDir, {
    executablePath: opts.executablePath || '/usr/bin/chromium',
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--use-fake-ui-for-media-stream', '--autoplay-policy=no-user-gesture-required'],
    timeout: 30000,
  });
  const pages = {};
  for (const [name, url] of Object.entries(opts.urls || {})) {
    const page = await browser.newPage();
    page.on('pageerror', (e) => emit({ event: 'pageerror', page: name, error: String(e) }));
    page.on('console', (m) => emit({ event: 'console', page: name, type: m.type(), text: m.text() }));
    await page.goto(url, { timeout: 15000 });
    pages[name] = page;
    await new Promise((r) => setTimeout(r, 500));
  }
  const last = {};
  while (Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 1000));
    let done = true;
    for (const [name, page] of Object.entries(pages)) {
      const s = await page.evaluate(() => ({
        role: document.getElementById('role').textContent,
        status: document.getElementById('status').textContent,
        decoded: Number(document.getElementById('s-decoded').textContent) || 0,
        room: document.getElementById('room').textContent,
        log: document.getElementById('log').textContent.slice(0, 400),
      }));
      last[name] = s;
      emit({ event: 'stats', page: name, ...s });
      if (s.decoded <= Number(opts.minFrames ?? 30)) done = false;
    }
    if (done) break;
  }
  emit({ event: 'result', pages: last });
} catch (e) {
  emit({ event: 'error', error: String(e && e.stack ? e.stack : e) });
  code = 2;
} finally {
  clearTimeout(guard);
  if (browser) await browser.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(code);
