// The page: model choice, drop zone, one card per image, heat maps, CSV.
// All inference runs in worker.js; nothing here sends an image anywhere.

// v2: keys carry the file's hash; v1 entries (keyed by name alone) are dropped at start.
const MODEL_CACHE = 'fracture-models-v2';

const $ = (id) => document.getElementById(id);
// Set once per tab when the page reloads to come back under the service worker's
// isolation headers, so that a browser which still refuses isolation never loops.
const ISOLATION_RELOAD = 'fracture-isolation-reload';
const pending = new Map();
let worker = null;
let threadNote = '';
let nextId = 1;
let modelReady = null;
let currentModel = null;
let currentCard = null;
const results = [];
// Files waiting for the detector, and the current batch's count ("12 of 50").
const queue = [];
const batch = { done: 0, total: 0, running: false };

function call(type, bytes, fields = {}) {
  const id = nextId++;
  return new Promise((resolve, reject) => {
    pending.set(id, { resolve, reject });
    worker.postMessage({ type, id, bytes, ...fields }, bytes ? [bytes] : []);
  });
}

function onWorkerMessage(event) {
  const { id, type } = event.data;
  const waiter = pending.get(id);
  if (!waiter) return;
  pending.delete(id);
  if (type === 'error') waiter.reject(new Error(event.data.message));
  else waiter.resolve(event.data);
}

// `?threads=N` forces N (1: the single-thread build); otherwise every core the browser reports.
function requestedThreads() {
  const forced = new URLSearchParams(location.search).get('threads');
  if (forced !== null) {
    const n = Number(forced);
    if (Number.isInteger(n) && n >= 1) return { threads: n, forced: true };
  }
  return { threads: Math.max(1, navigator.hardwareConcurrency || 1), forced: false };
}

// Threads need SharedArrayBuffer, which browsers give only to cross-origin isolated
// pages. Static hosts rarely send the COOP/COEP headers, so sw.js adds them; it can
// only do so for pages it controls, so the first visit reloads once it has taken over.
// Resolves to true when the page is reloading (nothing else should start).
async function reloadUnderIsolation(registration, threads) {
  if (self.crossOriginIsolated || threads === 1 || !registration) return false;
  if (sessionStorage.getItem(ISOLATION_RELOAD)) return false;
  try {
    await registration;
  } catch {
    return false;
  }
  if (!navigator.serviceWorker.controller) {
    await new Promise((resolve) => {
      navigator.serviceWorker.addEventListener('controllerchange', resolve, { once: true });
      setTimeout(resolve, 5000);
    });
  }
  if (!navigator.serviceWorker.controller) return false;
  sessionStorage.setItem(ISOLATION_RELOAD, '1');
  location.reload();
  return true;
}

// `?simd=simd128` forces the plain SIMD builds; otherwise the worker loads the
// relaxed-SIMD ones (fused multiply-add) wherever the browser validates them.
function requestedSimd() {
  return new URLSearchParams(location.search).get('simd') === 'simd128' ? 'simd128' : 'auto';
}

const SIMD_NOTES = { relaxed: 'fused multiply-add (relaxed SIMD)', simd128: 'SIMD128' };

function whySingleThread(threads, forced) {
  if (threads === 1) return forced ? 'one thread, as ?threads=1 asks' : 'one thread: the browser reports one core';
  if (!self.crossOriginIsolated || typeof SharedArrayBuffer === 'undefined') {
    return 'one thread: this page is not cross-origin isolated (no service worker, a private window, or a browser without SharedArrayBuffer)';
  }
  return null;
}

function startWorker(threads) {
  worker?.terminate();
  for (const waiter of pending.values()) waiter.reject(new Error('the detector restarted'));
  pending.clear();
  worker = new Worker('./worker.js', { type: 'module' });
  worker.onmessage = onWorkerMessage;
  return call('start', null, { threads, simd: requestedSimd() });
}

// Starts the threaded detector where the page allows it, else (or if it fails) the
// single-thread one; the status line says which and why. Resolves to the worker's
// 'started' message: the threads and the SIMD the detector uses.
async function startDetector() {
  const { threads, forced } = requestedThreads();
  const reason = whySingleThread(threads, forced);
  let started = null;
  if (reason === null) {
    try {
      // A pool worker that never reports (a browser bug, a blocked script) must not stall the page.
      const timeout = new Promise((_, reject) => setTimeout(() => reject(new Error('no answer in 30 s')), 30_000));
      started = await Promise.race([startWorker(threads), timeout]);
      threadNote = `${started.threads} threads`;
    } catch (error) {
      threadNote = `one thread: the threaded build failed (${error.message})`;
    }
  } else {
    threadNote = reason;
  }
  started ??= await startWorker(1);
  threadNote += `, ${SIMD_NOTES[started.simd]}`;
  if (started.fallback) threadNote += ` (${started.fallback})`;
  return started;
}

function setStatus(text, isError = false) {
  const status = $('model-status');
  status.textContent = text;
  status.classList.toggle('error', isError);
}

function hex(buffer) {
  return [...new Uint8Array(buffer)].map((b) => b.toString(16).padStart(2, '0')).join('');
}

// Downloads with progress from Content-Length. The Cache API copy (so that a reload
// works offline) is keyed by the file's SHA-256 from models.json, which the site
// build writes: a rebuilt site with a new model under the same name never gets the
// old bytes back, and the download is checked against the hash. An entry without
// a hash is never cached.
async function fetchModel(entry) {
  const url = `./models/${entry.file}`;
  const key = entry.sha256 ? `${url}?sha256=${entry.sha256}` : null;
  const cache = key && 'caches' in self ? await caches.open(MODEL_CACHE) : null;
  const cached = cache ? await cache.match(key) : null;
  if (cached) return cached.arrayBuffer();

  const response = await fetch(url, { cache: 'no-cache' });
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  const total = Number(response.headers.get('Content-Length')) || 0;
  const progress = $('model-progress');
  progress.hidden = false;
  progress.max = total || 1;
  const reader = response.body.getReader();
  const chunks = [];
  let received = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    received += value.length;
    progress.value = total ? received : 0;
    setStatus(`Downloading model… ${(received / 1e6).toFixed(1)}${total ? ` of ${(total / 1e6).toFixed(1)}` : ''} MB`);
  }
  progress.hidden = true;
  const bytes = new Uint8Array(received);
  let offset = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, offset);
    offset += chunk.length;
  }
  if (entry.sha256 && crypto.subtle) {
    const actual = hex(await crypto.subtle.digest('SHA-256', bytes));
    if (actual !== entry.sha256) {
      throw new Error(`${entry.file} does not match its SHA-256 in models.json (a partial upload, or models.json from another build)`);
    }
  }
  if (cache) {
    // Older copies of this file (other hashes) would only take space.
    for (const old of await cache.keys()) {
      if (new URL(old.url).pathname === new URL(url, location.href).pathname) await cache.delete(old);
    }
    await cache.put(key, new Response(bytes.slice(), { headers: { 'Content-Type': 'application/octet-stream' } }));
  }
  return bytes.buffer;
}

async function loadModel(entry) {
  currentModel = entry;
  setStatus(`Loading ${entry.name}…`);
  modelReady = (async () => {
    const started = performance.now();
    const bytes = await fetchModel(entry);
    const { card } = await call('load', bytes);
    currentCard = card;
    showOperatingPoints(card);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    setStatus(`${entry.name} ready (${seconds} s) · ${threadNote}`);
    document.body.dataset.ready = 'true';
    $('card-summary').textContent = describeCard(entry, card);
    return card;
  })();
  try {
    await modelReady;
  } catch (error) {
    setStatus(`Cannot load ${entry.name}: ${error.message}`, true);
    throw error;
  }
}

function describeCard(entry, card) {
  const training = card.training ? `trained on ${card.training.source} (${card.training.images} images)` : 'untrained';
  return `${entry.name}: ${card.architecture.name}, ${card.preprocessing.input_size} px, ${training}. ${card.notes.join(' ')}`;
}

function percent(p) {
  return `${(p * 100).toFixed(1)}%`;
}

function drawRgba(canvas, size, rgba) {
  canvas.width = size;
  canvas.height = size;
  const context = canvas.getContext('2d');
  context.putImageData(new ImageData(new Uint8ClampedArray(rgba), size, size), 0, 0);
}

function card(file) {
  const element = document.createElement('article');
  element.className = 'card pending';
  element.setAttribute('data-testid', 'result');
  element.innerHTML = '<div class="images"><canvas class="preview"></canvas><canvas class="heat"></canvas></div><div class="text"><h2></h2><p class="verdict">Analysing…</p><p class="details"></p></div>';
  element.querySelector('h2').textContent = file.name;
  $('results').prepend(element);
  return element;
}

async function analyse({ file, path }) {
  const element = card(file);
  try {
    await modelReady;
    const bytes = await file.arrayBuffer();
    const started = performance.now();
    const { result, ms } = await call('detect', bytes);
    const elapsed = performance.now() - started;
    element.classList.remove('pending');
    element.dataset.probability = String(result.probability);
    element.dataset.ms = String(elapsed);
    const row = { file: file.name, probability: result.probability, label: result.label, model: currentModel.name,
      card: currentCard, element, handle: file, heatmap: result.heatmap,
      study: result.study_uid ? `DICOM ${result.study_uid}` : studyOfPath(path) };
    element.querySelector('.images').onclick = () => openViewer(row);
    element.querySelector('.images').title = 'Click for the full-resolution image';
    relabel(row);
    const details = [`P(abnormal) = ${percent(result.probability)}`, `${result.width}×${result.height}`, `${ms.toFixed(0)} ms`];
    element.querySelector('.details').textContent = details.join(' · ');
    for (const warning of result.warnings) {
      const note = document.createElement('p');
      note.className = 'warning';
      note.setAttribute('data-testid', 'warning');
      note.textContent = warning;
      element.querySelector('.text').append(note);
    }
    const preview = element.querySelector('.preview');
    drawRgba(preview, result.input_size, result.input_rgba);
    const heat = element.querySelector('.heat');
    heat.width = preview.width;
    heat.height = preview.height;
    if (result.overlay_rgba) {
      // Core's overlay, pixel for pixel what `fracture detect --heatmap` writes.
      drawRgba(heat, result.input_size, result.overlay_rgba);
      const toggle = document.createElement('button');
      toggle.type = 'button';
      toggle.className = 'toggle';
      toggle.setAttribute('data-testid', 'heatmap-toggle');
      toggle.textContent = 'Heat map';
      toggle.setAttribute('aria-pressed', String($('show-heatmaps').checked));
      toggle.onclick = () => {
        const shown = heat.hidden;
        heat.hidden = !shown;
        toggle.setAttribute('aria-pressed', String(shown));
      };
      heat.hidden = !$('show-heatmaps').checked;
      element.querySelector('.text').append(toggle);
    } else {
      heat.hidden = true;
    }
    results.push(row);
    showStudies();
    $('export').disabled = false;
    $('clear').disabled = false;
  } catch (error) {
    element.classList.remove('pending');
    element.classList.add('failed');
    element.setAttribute('data-testid', 'error');
    element.querySelector('.verdict').textContent = 'Cannot read this file';
    element.querySelector('.details').textContent = error.message;
  }
}

// The label at the chosen operating point, by the rule of core's Card::label_at
// (abnormal at or above the threshold), with the thresholds of the card that
// scored this image; a card without operating points has only its threshold.
function threshold(card, point) {
  return card.operating_points ? card.operating_points[point] : point === 'balanced' ? card.threshold : null;
}

function labelAt(card, probability) {
  const t = threshold(card, $('operating-point').value) ?? card.threshold;
  const positive = probability >= t;
  return { positive, label: positive ? card.classes.positive : card.classes.negative };
}

function relabel(row) {
  const { positive } = labelAt(row.card, row.probability);
  row.label = positive ? row.card.classes.positive : row.card.classes.negative;
  row.element.classList.toggle('positive', positive);
  row.element.classList.toggle('negative', !positive);
  row.element.dataset.label = row.label;
  row.element.querySelector('.verdict').textContent = `${percent(row.probability)} ${row.label}`;
}

function showOperatingPoints(card) {
  const select = $('operating-point');
  for (const option of select.options) {
    const t = threshold(card, option.value);
    option.disabled = t === null;
    option.textContent = t === null ? `${option.value} (not calibrated)` : `${option.value} (at ${percent(t)})`;
  }
  if (select.selectedOptions[0]?.disabled) select.value = 'balanced';
  select.disabled = !card.operating_points;
}

function showBatch() {
  const status = $('batch-status');
  if (batch.total <= 1 && !batch.cancelled) {
    status.textContent = '';
  } else if (batch.running) {
    status.textContent = `Analysing ${Math.min(batch.done + 1, batch.total)} of ${batch.total}…`;
  } else {
    status.textContent = batch.cancelled
      ? `Cancelled: ${batch.done} analysed, ${batch.cancelled} left out`
      : `${batch.done} of ${batch.total} analysed`;
  }
  $('cancel').hidden = !batch.running;
}

// The study an image belongs to from the folder it was dropped in, as `fracture detect
// --by-study` groups it: a folder named studyK… (patientNNNNN/studyK_… in MURA's layout)
// is a study; any other image, in a class folder or loose, is a study of its own (null).
function studyOfPath(path) {
  const parts = (path || '').split('/').filter(Boolean);
  const [patient, study] = [parts.at(-3), parts.at(-2)];
  if (!/^study\d/.test(study ?? '')) return null;
  return patient?.startsWith('patient') ? `${patient}/${study}` : parts.slice(0, -1).join('/');
}

// One verdict per study and model: the mean of its images' (calibrated) probabilities,
// labelled at the operating point, as `detect --by-study` does.
function showStudies() {
  const groups = new Map();
  for (const row of results) {
    if (!row.study) continue;
    const key = `${row.model}\u0000${row.study}`;
    if (!groups.has(key)) groups.set(key, { study: row.study, model: row.model, card: row.card, rows: [] });
    groups.get(key).rows.push(row);
  }
  const table = $('studies');
  table.hidden = groups.size === 0;
  const body = table.querySelector('tbody');
  body.replaceChildren();
  for (const group of groups.values()) {
    const probability = group.rows.reduce((sum, row) => sum + row.probability, 0) / group.rows.length;
    const { positive, label } = labelAt(group.card, probability);
    const tr = document.createElement('tr');
    tr.setAttribute('data-testid', 'study');
    tr.className = positive ? 'positive' : 'negative';
    Object.assign(tr.dataset, { study: group.study, images: String(group.rows.length), probability: String(probability), label });
    for (const text of [group.study, String(group.rows.length), percent(probability), label, group.model]) {
      const td = document.createElement('td');
      td.textContent = text;
      tr.append(td);
    }
    body.append(tr);
  }
}

// The image at its own resolution with core's heat map stretched over it, decoded
// again from the file when asked (nothing full-size is kept per card).
let viewerRow = null;
let viewerPixels = null;
function drawViewer() {
  const { width, height, rgba, overlay_rgba: overlay } = viewerPixels;
  const canvas = $('viewer-image');
  canvas.width = width;
  canvas.height = height;
  const pixels = $('viewer-heatmap').checked && overlay ? overlay : rgba;
  canvas.getContext('2d').putImageData(new ImageData(new Uint8ClampedArray(pixels), width, height), 0, 0);
}

async function openViewer(row) {
  viewerRow = row;
  const dialog = $('viewer');
  $('viewer-title').textContent = row.file;
  $('viewer-details').textContent = 'Decoding…';
  if (!dialog.open) dialog.showModal();
  try {
    if (row.model !== currentModel.name) throw new Error(`scored by ${row.model}; select that model to view its heat map`);
    const { view } = await call('view', await row.handle.arrayBuffer(), { heatmap: row.heatmap });
    if (viewerRow !== row) return;
    viewerPixels = view;
    $('viewer-heatmap').disabled = !view.overlay_rgba;
    drawViewer();
    $('viewer-details').textContent = `${view.width}×${view.height} · P(abnormal) = ${percent(row.probability)} · ${row.label}`;
  } catch (error) {
    if (viewerRow === row) $('viewer-details').textContent = `Cannot show this image: ${error.message}`;
  }
}

function closeViewer() {
  viewerRow = null;
  viewerPixels = null;
  const canvas = $('viewer-image');
  canvas.width = 0;
  canvas.height = 0;
}

// A dropped folder's files, each with its path below the drop (for study grouping).
async function droppedFiles(dataTransfer) {
  const entries = [...dataTransfer.items].map((item) => item.webkitGetAsEntry?.()).filter(Boolean);
  if (!entries.length) return [...dataTransfer.files].map((file) => ({ file, path: file.name }));
  const found = [];
  async function walk(entry) {
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      found.push({ file, path: entry.fullPath.replace(/^\//, '') });
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
        if (!batch.length) break;
        for (const child of batch.sort((a, b) => a.name.localeCompare(b.name))) await walk(child);
      }
    }
  }
  for (const entry of entries) await walk(entry);
  return found;
}

// One image at a time, in drop order: cards stay in order, the detector uses every
// thread on each image, and only one image's bytes are in flight (memory stays
// bounded however many files are dropped). A drop during a batch joins it.
async function analyseAll(files) {
  if (!batch.running) Object.assign(batch, { done: 0, total: 0, cancelled: 0 });
  queue.push(...files);
  batch.total += files.length;
  if (batch.running) {
    showBatch();
    return;
  }
  batch.running = true;
  showBatch();
  while (queue.length) {
    await analyse(queue.shift());
    batch.done += 1;
    showBatch();
  }
  batch.running = false;
  showBatch();
}

function cancelBatch() {
  batch.cancelled += queue.length;
  batch.total -= queue.length;
  queue.length = 0;
  showBatch();
}

function csvField(value) {
  const text = String(value);
  return /[",\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

function exportCsv() {
  const lines = ['path,probability,label,model'];
  for (const row of results) {
    lines.push([row.file, row.probability.toFixed(6), row.label, row.model].map(csvField).join(','));
  }
  const url = URL.createObjectURL(new Blob([lines.join('\n') + '\n'], { type: 'text/csv' }));
  const link = document.createElement('a');
  link.href = url;
  link.download = 'fracture-results.csv';
  link.click();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

async function main() {
  if ('caches' in self) caches.delete('fracture-models-v1').catch(() => {});
  const registration = 'serviceWorker' in navigator ? navigator.serviceWorker.register('./sw.js') : null;
  registration?.catch(() => {});
  if (await reloadUnderIsolation(registration, requestedThreads().threads)) return;
  if (self.crossOriginIsolated) sessionStorage.removeItem(ISOLATION_RELOAD);
  try {
    const started = await startDetector();
    document.body.dataset.threads = String(started.threads);
    document.body.dataset.simd = started.simd;
  } catch (error) {
    setStatus(`Cannot start the detector: ${error.message}`, true);
    return;
  }
  const drop = $('drop');
  drop.addEventListener('dragover', (event) => {
    event.preventDefault();
    drop.classList.add('over');
  });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', async (event) => {
    event.preventDefault();
    drop.classList.remove('over');
    analyseAll(await droppedFiles(event.dataTransfer));
  });
  $('files').addEventListener('change', (event) => {
    analyseAll([...event.target.files].map((file) => ({ file, path: file.name })));
    event.target.value = '';
  });
  $('folder').addEventListener('change', (event) => {
    analyseAll([...event.target.files].map((file) => ({ file, path: file.webkitRelativePath || file.name })));
    event.target.value = '';
  });
  $('show-heatmaps').addEventListener('change', (event) => {
    for (const heat of document.querySelectorAll('.card .heat')) heat.hidden = !event.target.checked;
  });
  $('export').addEventListener('click', exportCsv);
  $('cancel').addEventListener('click', cancelBatch);
  $('operating-point').addEventListener('change', () => {
    results.forEach(relabel);
    showStudies();
  });
  $('viewer-heatmap').addEventListener('change', () => viewerPixels && drawViewer());
  $('viewer-close').addEventListener('click', () => $('viewer').close());
  $('viewer').addEventListener('close', closeViewer);
  $('clear').addEventListener('click', () => {
    $('results').replaceChildren();
    results.length = 0;
    showStudies();
    $('export').disabled = true;
    $('clear').disabled = true;
  });

  let models;
  try {
    const response = await fetch('./models/models.json');
    models = (await response.json()).models;
  } catch (error) {
    setStatus(`Cannot list the models: ${error.message}`, true);
    return;
  }
  if (!models.length) {
    setStatus('No model is shipped with this build: add one to web/models/models.json.', true);
    return;
  }
  const select = $('model');
  for (const entry of models) {
    const option = document.createElement('option');
    option.value = entry.file;
    option.textContent = entry.name;
    select.append(option);
  }
  select.addEventListener('change', () => loadModel(models.find((m) => m.file === select.value)).catch(() => {}));
  await loadModel(models[0]).catch(() => {});
}

main();
