// Runs the model off the main thread, so the page never freezes.
// Messages in: {type: 'start', id, threads, simd}, then {type: 'load', id, bytes}, {type: 'detect', id, bytes}
// and {type: 'view', id, bytes, heatmap}.
// Messages out: {type: 'started', id, threads, simd, fallback?}, {type: 'loaded', id, card},
// {type: 'result', id, result, ms}, {type: 'view', id, view}, {type: 'error', id, message}.
//
// 'start' picks the build: with threads > 1 one with atomics (threads/ or threads-relaxed/,
// which need a cross-origin isolated page), whose rayon pool runs on pool-worker.js workers
// that share this worker's wasm memory; otherwise a single-thread build (the site root or
// relaxed/). The relaxed-SIMD builds (products on fused multiply-add) load where the probe
// below validates and `simd` is not 'simd128', and where one fails to start the plain
// build of its kind does; 'started' says which ran (and in `fallback`, why).

let wasm = null;
let detector = null;
// Never freed: the pool's workers read its channel for the life of the page.
let pool = null;

function startPoolWorker(module, memory, receiver) {
  return new Promise((resolve, reject) => {
    const worker = new Worker('./pool-worker.js', { type: 'module' });
    worker.onmessage = (event) => {
      if (event.data.type === 'ready') resolve(worker);
      else reject(new Error(`a pool worker failed: ${event.data.message}`));
    };
    worker.onerror = (event) => {
      event.preventDefault();
      reject(new Error(`a pool worker failed to start: ${event.message || 'unknown error'}`));
    };
    worker.postMessage({ module, memory, receiver });
  });
}

// The smallest module with a relaxed-SIMD instruction: one function that returns
// f32x4.relaxed_madd of three zero vectors. Browsers without relaxed SIMD fail to
// validate it, as they would the relaxed builds.
const V128_ZERO = [0xfd, 0x0c, ...new Array(16).fill(0)];
const PROBE_BODY = [0, ...V128_ZERO, ...V128_ZERO, ...V128_ZERO, 0xfd, 0x85, 0x02, 0x0b];
const RELAXED_SIMD_PROBE = new Uint8Array([
  0x00, 0x61, 0x73, 0x6d, 1, 0, 0, 0, // magic, version
  1, 5, 1, 0x60, 0, 1, 0x7b, // types: () -> v128
  3, 2, 1, 0, // one function of type 0
  10, PROBE_BODY.length + 2, 1, PROBE_BODY.length, ...PROBE_BODY, // its code
]);

function relaxedSimd(simd) {
  if (simd === 'simd128') return false;
  try {
    return WebAssembly.validate(RELAXED_SIMD_PROBE);
  } catch {
    return false;
  }
}

// Loads one build (with atomics and its pool where `threads` > 1) and says which ran.
async function startBuild(threads, relaxed) {
  if (threads > 1) {
    wasm = await import(relaxed ? './threads-relaxed/fracture-web.js' : './threads/fracture-web.js');
    await wasm.default();
    pool = new wasm.ThreadPool(threads);
    const module = wasm.sharedModule();
    const memory = wasm.sharedMemory();
    await Promise.all(Array.from({ length: threads }, () => startPoolWorker(module, memory, pool.receiver())));
    pool.build();
  } else {
    wasm = await import(relaxed ? './relaxed/fracture-web.js' : './fracture-web.js');
    await wasm.default();
  }
  return { threads: wasm.threads(), simd: relaxed ? 'relaxed' : 'simd128' };
}

async function start(threads, simd) {
  if (!relaxedSimd(simd)) return startBuild(threads, false);
  try {
    return await startBuild(threads, true);
  } catch (error) {
    // The probe validating does not promise that the whole relaxed module compiles
    // (nor that its download succeeds); the plain build of the same kind does the
    // same work, and 'started' says why it runs.
    wasm = null;
    const started = await startBuild(threads, false);
    return { ...started, fallback: `the relaxed-SIMD build failed: ${error && error.message ? error.message : error}` };
  }
}

self.onmessage = async (event) => {
  const { type, id, bytes } = event.data;
  try {
    if (type === 'start') {
      if (wasm) throw new Error('the detector has already started');
      self.postMessage({ type: 'started', id, ...(await start(event.data.threads, event.data.simd)) });
    } else if (!wasm) {
      throw new Error('the detector has not started');
    } else if (type === 'load') {
      if (detector) detector.free();
      detector = null;
      detector = new wasm.Detector(new Uint8Array(bytes));
      self.postMessage({ type: 'loaded', id, card: detector.card() });
    } else if (type === 'view') {
      if (!detector) throw new Error('no model is loaded');
      self.postMessage({ type: 'view', id, view: detector.full_view(new Uint8Array(bytes), event.data.heatmap ?? null) });
    } else if (type === 'detect') {
      if (!detector) throw new Error('no model is loaded');
      const started = performance.now();
      const result = detector.detect(new Uint8Array(bytes));
      self.postMessage({ type: 'result', id, result, ms: performance.now() - started });
    }
  } catch (error) {
    self.postMessage({ type: 'error', id, message: String(error && error.message ? error.message : error) });
  }
};
