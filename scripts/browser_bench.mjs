// Browser figures for a served site, in Debian's headless Chromium:
// load-to-ready, per-image drop-to-result time for each shipped model and each
// thread count (`?threads=N`: 1 loads the single-thread build) and SIMD choice
// (`--simd auto,simd128`: `?simd=simd128` forces the builds without relaxed SIMD),
// the wasm and model download sizes, and a screenshot.
//
//   cargo xtask serve --port 8080 &          # the site with its shipped models
//   NODE_PATH=target/tools/node_modules node scripts/browser_bench.mjs \
//     http://127.0.0.1:8080/ IMAGE_OR_DIR... [--threads 1,2] [--simd auto,simd128] [--screenshot docs/screenshot.png]
//
// Pause any training first: the figures are wall-clock times on a shared machine.
// Each model gets a fresh browser context (an empty cache), so its load time
// includes the download. Images are sent in one batch, as a user dropping a
// folder would; the page times each image from the worker request to the result
// (the card's data-ms) and the script reports the median and the range.
import { createRequire } from 'node:module';
import { readdirSync, statSync } from 'node:fs';
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
const [url, ...inputs] = args;
if (!url || !inputs.length) {
  console.error('usage: node scripts/browser_bench.mjs URL IMAGE_OR_DIR... [--threads 1,2] [--simd auto,simd128] [--screenshot FILE]');
  process.exit(2);
}
const IMAGE = /\.(png|jpe?g|bmp|tiff?|dcm)$/i;
const files = inputs.flatMap(function walk(p) {
  return statSync(p).isDirectory() ? readdirSync(p).sort().flatMap((f) => walk(path.join(p, f))) : IMAGE.test(p) ? [p] : [];
});

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
  await page.setInputFiles('[data-testid="file-input"]', files);
  await page.waitForFunction((n) => document.querySelectorAll('[data-testid="result"][data-ms], [data-testid="error"]').length >= n,
    files.length, { timeout: 600_000 });
  const ms = await page.$$eval('[data-testid="result"][data-ms]', (cards) => cards.map((c) => Number(c.dataset.ms)));
  const size = await bytesOf(`models/${entry.file}`);
  console.log(`${entry.name} (${entry.file}, ${(size / 1e6).toFixed(1)} MB), ${used} thread(s), ${simdUsed}: ` +
    `${index === 0 ? 'page load to ready' : 'model switch to ready'} ${modelReady} ms; ` +
    `drop to result per image: median ${median(ms).toFixed(0)} ms (${Math.min(...ms).toFixed(0)}-${Math.max(...ms).toFixed(0)}) over ${ms.length}`);
  if (screenshot && index === models.models.length - 1 && threads === threadCounts.at(-1) && simd === simdChoices.at(-1)) {
    await page.check('#show-heatmaps').catch(() => {});
    await page.screenshot({ path: screenshot, fullPage: false });
    console.log(`screenshot: ${screenshot}`);
  }
  await context.close();
}
await browser.close();
