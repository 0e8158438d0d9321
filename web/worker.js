// Runs the model off the main thread, so the page never freezes.
// Messages in: {type: 'load', id, bytes} and {type: 'detect', id, bytes}.
// Messages out: {type: 'loaded', id, card}, {type: 'result', id, result, ms}, {type: 'error', id, message}.
import init, { Detector } from './fracture-web.js';

const ready = init();
let detector = null;

self.onmessage = async (event) => {
  const { type, id, bytes } = event.data;
  try {
    await ready;
    if (type === 'load') {
      if (detector) detector.free();
      detector = null;
      detector = new Detector(new Uint8Array(bytes));
      self.postMessage({ type: 'loaded', id, card: detector.card() });
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
