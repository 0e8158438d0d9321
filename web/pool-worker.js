// One thread of the detector's rayon pool (the build with atomics): instantiates
// the detector's module on its shared memory, says it is ready, then runs rayon's
// work loop for the life of the page. Started by worker.js, never by the page.
self.onmessage = async (event) => {
  const { module, memory, receiver } = event.data;
  try {
    const wasm = await import('./threads/fracture-web.js');
    wasm.initSync({ module, memory });
    self.postMessage({ type: 'ready' });
    wasm.runPoolThread(receiver);
  } catch (error) {
    self.postMessage({ type: 'error', message: String(error && error.message ? error.message : error) });
  }
};
