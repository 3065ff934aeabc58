// Shared plumbing of the Chromium drivers (chromium_whep.mjs, relay_chromium.mjs,
// gateway_ws.mjs, gateway_master.mjs, gateway_page.mjs): the launch arguments, the JSON
// event output, the watchdog, a playwright launch with a fresh user-data-dir and the
// getStats() reading done inside the page.
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

/** Chromium flags every driver uses (headless, no sandbox/GPU/QUIC, no background traffic). */
export const BASE_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--use-fake-ui-for-media-stream',
];

/** Prints one JSON event line on stdout (the Python side parses these). */
export const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');

/** Parses the driver's JSON options (argv[2]); returns { opts, seconds, deadline }. */
export function driverOptions(defaultSeconds) {
  const opts = JSON.parse(process.argv[2] || '{}');
  const seconds = Number(opts.seconds ?? defaultSeconds);
  return { opts, seconds, deadline: Date.now() + seconds * 1000 };
}

/** Hard guard: emits an error event and exits 3 after `ms`, whatever happens. */
export function startWatchdog(ms, message = 'chromium driver watchdog fired') {
  return setTimeout(() => {
    emit({ event: 'error', error: message });
    process.exit(3);
  }, ms);
}

/** Creates a fresh --user-data-dir under the temp directory. */
export function freshUserDataDir(prefix) {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/** Launches Chromium (a persistent context on `userDataDir`) with `args`. */
export function launchChromium(userDataDir, args, executablePath) {
  return chromium.launchPersistentContext(userDataDir, {
    executablePath: executablePath || '/usr/bin/chromium',
    headless: true,
    args,
    timeout: 30000,
  });
}

/**
 * Runs a driver body with a launched browser and does the common ending: an exception
 * becomes an `error` event and exit code 2; the watchdog is cleared, the browser closed,
 * the user-data-dir removed and the process exits (0 unless the body failed).
 */
export async function runDriver({ userDataDir, args, executablePath, guard }, body) {
  let browser;
  let exitCode = 0;
  try {
    browser = await launchChromium(userDataDir, args, executablePath);
    await body(browser);
  } catch (e) {
    emit({ event: 'error', error: String(e && e.stack ? e.stack : e) });
    exitCode = 2;
  } finally {
    clearTimeout(guard);
    if (browser) await browser.close().catch(() => {});
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
  process.exit(exitCode);
}

/** Forwards the page's console messages and uncaught errors as events (tagged with `page`). */
export function forwardPageLogs(page, name) {
  const tag = name === undefined ? {} : { page: name };
  page.on('console', (m) => emit({ event: 'console', ...tag, type: m.type(), text: m.text() }));
  page.on('pageerror', (e) => emit({ event: 'pageerror', ...tag, error: String(e) }));
}

// Runs inside the page: defines window.__readStats(pc), which returns the stats by id, the
// video inbound-rtp / outbound-rtp entries, the last nominated succeeded candidate pair and
// the pair a transport reports as selected.
function defineStatsReader() {
  window.__readStats = async (pc) => {
    const stats = await pc.getStats();
    const byId = {};
    let inbound = null; let outbound = null; let nominatedPair = null; let selectedPair = null;
    stats.forEach((s) => { byId[s.id] = s; });
    stats.forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') inbound = s;
      if (s.type === 'outbound-rtp' && s.kind === 'video') outbound = s;
      if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') nominatedPair = s;
      if (s.type === 'transport' && s.selectedCandidatePairId) {
        selectedPair = byId[s.selectedCandidatePairId] || selectedPair;
      }
    });
    return { byId, inbound, outbound, nominatedPair, selectedPair };
  };
}

/** Installs window.__readStats in the page (again after every navigation). */
export function installStatsReader(page) {
  return page.evaluate(defineStatsReader);
}
