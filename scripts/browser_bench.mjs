// Browser figures for a served site, in Debian's headless Chromium:
// load-to-ready, per-image drop-to-result time for each shipped model and each
// thread count (`?threads=N`: 1 loads the single-thread build) and SIMD choice
// (`--simd auto,simd128`: `?simd=simd128` forces the builds without relaxed SIMD),
// the wasm and model download sizes, and a screenshot. On Linux it also gives
// the CPU time each of the browser's threads spent while the images were
// analysed (from /proc): the detector's threads against everything else the
// browser does meanwhile, which on a machine with few cores competes with them.
//
//   cargo xtask serve --port 8080 &          # the site with its shipped models
//   NODE_PATH=target/tools/node_modules node scripts/browser_bench.mjs \
//     http://127.0.0.1:8080/ IMAGE_OR_DIR... [--threads 1,2] [--simd auto,simd128] [--warm] [--screenshot docs/screenshot.png]
//
// Pause any training first: the figures are wall-clock times on a shared machine.
// Each model gets a fresh browser context (an empty cache), so its load time
// includes the download. Images are sent in one batch, as a user dropping a
// folder would; the page times each image from the worker request to the result
// (the card's data-ms) and the script reports the median and the range.
// `--warm` drops the images once, untimed, before the timed drop: the first
// images of a page run while the browser is still optimising the wasm on its
// background threads (about 0.4 s of CPU on this 2-core machine), so a cold drop
// measures that too and a warm one the steady state of a long batch.
import { createRequire } from 'node:module';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import path from 'node:path';

const require = createRequire(import.meta.url);
const { chromium } = require('playwright-core');

const args = process.argv.slice(2);
const screenshotAt = args.indexOf('--screenshot');
const screenshot = screenshotAt >= 0 ? args.splice(screenshotAt, 2)[1] : null;
const threadsAt = args.indexOf('--threads');
const threadCounts = (threadsAt >= 0 ? args.splice(threadsAt, 2)[1] : '1,2').split(',').map(Number);
if (!threadCounts.every((n) => Number.isInteger(n) && n >= 1)) {
  console.error('--threads takes a comma-separated list of thread counts, e.g. 1,2,4');
  process.exit(2);
}
const simdAt = args.indexOf('--simd');
const simdChoices = (simdAt >= 0 ? args.splice(simdAt, 2)[1] : 'auto').split(',');
if (!simdChoices.every((s) => s === 'auto' || s === 'simd128')) {
  console.error('--simd takes a comma-separated list of auto and simd128');
  process.exit(2);
}
const warmAt = args.indexOf('--warm');
const warm = warmAt >= 0;
if (warm) args.splice(warmAt, 1);
const [url, ...inputs] = args;
if (!url || !inputs.length) {
  console.error('usage: node scripts/browser_bench.mjs URL IMAGE_OR_DIR... [--threads 1,2] [--simd auto,simd128] [--warm] [--screenshot FILE]');
  process.exit(2);
}
const IMAGE = /\.(png|jpe?g|bmp|tiff?|dcm)$/i;
const files = inputs.flatMap(function walk(p) {
  return statSync(p).isDirectory() ? readdirSync(p).sort().flatMap((f) => walk(path.join(p, f))) : IMAGE.test(p) ? [p] : [];
});

// CPU ticks of every thread of this script's descendant processes (the browser),
// keyed by process/thread id; null where /proc is not there to read.
const ticksPerSecond = (() => {
  try { return Number(execFileSync('getconf', ['CLK_TCK']).toString()) || 100; } catch { return 100; }
})();
function browserThreads() {
  let pids;
  try { pids = readdirSync('/proc').filter((d) => /^\d+$/.test(d)); } catch { return null; }
  const parent = new Map();
  const statOf = (file) => {
    const text = readFileSync(file, 'utf8');
    return text.slice(text.lastIndexOf(')') + 2).split(' ');
  };
  for (const pid of pids) {
    try { parent.set(pid, statOf(`/proc/${pid}/stat`)[1]); } catch {}
  }
  const mine = (pid) => {
    for (let p = pid, hops = 0; p && p !== '0' && hops < 64; p = parent.get(p), hops++) if (p === String(process.pid)) return p !== pid;
    return false;
  };
  const threads = new Map();
  for (const pid of pids.filter(mine)) {
    let tids = [];
    try { tids = readdirSync(`/proc/${pid}/task`); } catch { continue; }
    for (const tid of tids) {
      try {
        const fields = statOf(`/proc/${pid}/task/${tid}/stat`);
        const name = readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8').trim();
        threads.set(`${pid}/${tid}`, { name, main: pid === tid, ticks: Number(fields[11]) + Number(fields[12]) });
      } catch {}
    }
  }
  return threads;
}
// Per image: the detector's threads one by one (its worker and its pool's threads,
// the renderer's dedicated workers), the page's main thread, and the rest of the browser.
function cpuPerImage(before, after, images) {
  if (!before || !after) return null;
  const ms = (ticks) => ((1000 * ticks) / ticksPerSecond / images).toFixed(0);
  const spent = [...after].map(([key, t]) => ({ ...t, pid: key.split('/')[0], ticks: t.ticks - (before.get(key)?.ticks ?? 0) }))
    .filter((t) => t.ticks > 0);
  const isWorker = (t) => t.name.startsWith('DedicatedWorker');
  const workers = spent.filter(isWorker).sort((a, b) => b.ticks - a.ticks);
  const renderers = new Set(workers.map((t) => t.pid));
  const pageMain = spent.filter((t) => t.main && renderers.has(t.pid));
  const rest = spent.filter((t) => !isWorker(t) && !pageMain.includes(t));
  const total = (ts) => ts.reduce((sum, t) => sum + t.ticks, 0);
  return `CPU per image: detector threads ${workers.map((t) => ms(t.ticks)).join('+') || '0'} ms, ` +
    `page main thread ${ms(total(pageMain))} ms, rest of the browser ${ms(total(rest))} ms`;
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--no-first-run'],
});
const models = await (await fetch(new URL('models/models.json', url))).json();
const bytesOf = async (relative) => (await (await fetch(new URL(relative, url))).arrayBuffer()).byteLength;
console.log(`wasm: ${(await bytesOf('fracture-web_bg.wasm') / 1e6).toFixed(2)} MB single-thread, ` +
  `${(await bytesOf('threads/fracture-web_bg.wasm') / 1e6).toFixed(2)} MB threaded, ` +
  `${(await bytesOf('relaxed/fracture-web_bg.wasm') / 1e6).toFixed(2)} / ` +
  `${(await bytesOf('threads-relaxed/fracture-web_bg.wasm') / 1e6).toFixed(2)} MB with relaxed SIMD; ${files.length} images`);

for (const simd of simdChoices) for (const threads of threadCounts) for (const [index, entry] of models.models.entries()) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  const pageUrl = new URL(url);
  pageUrl.searchParams.set('threads', String(threads));
  if (simd !== 'auto') pageUrl.searchParams.set('simd', simd);
  const started = Date.now();
  // On a host without isolation headers this includes the service worker's one reload.
  await page.goto(pageUrl.href);
  await page.waitForSelector('body[data-ready="true"]', { timeout: 300_000 });
  const pageReady = Date.now() - started;
  const used = await page.evaluate(() => document.body.dataset.threads);
  const simdUsed = await page.evaluate(() => document.body.dataset.simd);
  let modelReady = pageReady;
  if (index > 0) {
    await page.evaluate(() => { delete document.body.dataset.ready; });
    const switched = Date.now();
    await page.selectOption('#model', entry.file);
    await page.waitForSelector('body[data-ready="true"]', { timeout: 300_000 });
    modelReady = Date.now() - switched;
  }
  const analyse = async () => {
    await page.setInputFiles('[data-testid="file-input"]', files);
    await page.waitForFunction((n) => document.querySelectorAll('[data-testid="result"][data-ms], [data-testid="error"]').length >= n,
      files.length, { timeout: 600_000 });
  };
  if (warm) {
    await analyse();
    await page.click('#clear');
  }
  const threadsBefore = browserThreads();
  await analyse();
  const cpu = cpuPerImage(threadsBefore, browserThreads(), files.length);
  const ms = await page.$$eval('[data-testid="result"][data-ms]', (cards) => cards.map((c) => Number(c.dataset.ms)));
  const size = await bytesOf(`models/${entry.file}`);
  console.log(`${entry.name} (${entry.file}, ${(size / 1e6).toFixed(1)} MB), ${used} thread(s), ${simdUsed}${warm ? ', warm' : ''}: ` +
    `${index === 0 ? 'page load to ready' : 'model switch to ready'} ${modelReady} ms; ` +
    `drop to result per image: median ${median(ms).toFixed(0)} ms (${Math.min(...ms).toFixed(0)}-${Math.max(...ms).toFixed(0)}) over ${ms.length}` +
    (cpu ? `; ${cpu}` : ''));
  if (screenshot && index === models.models.length - 1 && threads === threadCounts.at(-1) && simd === simdChoices.at(-1)) {
    await page.check('#show-heatmaps').catch(() => {});
    await page.screenshot({ path: screenshot, fullPage: false });
    console.log(`screenshot: ${screenshot}`);
  }
  await context.close();
}
await browser.close();
