// Runs the model off the main thread, so the page never freezes.
// Messages in: {type: 'start', id, threads}, then {type: 'load', id, bytes}, {type: 'detect', id, bytes}
// and {type: 'view', id, bytes, heatmap}.
// Messages out: {type: 'started', id, threads}, {type: 'loaded', id, card},
// {type: 'result', id, result, ms}, {type: 'view', id, view}, {type: 'error', id, message}.
//
// 'start' picks the build: with threads > 1 the one with atomics (threads/, which needs
// a cross-origin isolated page), whose rayon pool runs on pool-worker.js workers that
// share this worker's wasm memory; otherwise the single-thread build.

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

async function start(threads) {
  if (threads > 1) {
    wasm = await import('./threads/fracture-web.js');
    await wasm.default();
    pool = new wasm.ThreadPool(threads);
    const module = wasm.sharedModule();
    const memory = wasm.sharedMemory();
    await Promise.all(Array.from({ length: threads }, () => startPoolWorker(module, memory, pool.receiver())));
    pool.build();
  } else {
    wasm = await import('./fracture-web.js');
    await wasm.default();
  }
  return wasm.threads();
}

self.onmessage = async (event) => {
  const { type, id, bytes } = event.data;
  try {
    if (type === 'start') {
      if (wasm) throw new Error('the detector has already started');
      self.postMessage({ type: 'started', id, threads: await start(event.data.threads) });
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
