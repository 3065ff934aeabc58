// Opens edgerelay viewer-page URLs (web/index.html + viewer.js) in the Debian Chromium and
// reports what each page shows: role, status, frames decoded (from the page's stats table).
//
// Usage: node gateway_page.mjs '{"urls": {"name": "http://..."}, "seconds": 30, "minFrames": 30}'
// Prints {"event":"stats",...} samples and a final {"event":"result","pages":{name: {...}}}.
import {
  BASE_ARGS, driverOptions, emit, forwardPageLogs, freshUserDataDir, runDriver, startWatchdog,
} from './chromium_common.mjs';

const { opts, seconds, deadline } = driverOptions(30);
const userDataDir = freshUserDataDir('edgerelay-chromium-page-');
const guard = startWatchdog((seconds + 30) * 1000, 'watchdog fired');
const args = [...BASE_ARGS, '--autoplay-policy=no-user-gesture-required'];
await runDriver({ userDataDir, args, executablePath: opts.executablePath, guard },
  async (browser) => {
  const pages = {};
  for (const [name, url] of Object.entries(opts.urls || {})) {
    const page = await browser.newPage();
    forwardPageLogs(page, name);
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
});
