// Keeps the app shell available offline: same-origin GETs go to the network
// first (so a new build shows at once) and fall back to the last copy cached.
// Model files are cached by the page itself (index.js), not here.
//
// It also makes the page cross-origin isolated on any static host: every
// response it serves gets COOP/COEP (and CORP), which the threaded detector's
// SharedArrayBuffer needs and which most static hosts cannot be told to send.
// Everything the page loads is same-origin, so require-corp blocks nothing.
const CACHE = 'fracture-app-v1';

const ISOLATION_HEADERS = {
  'Cross-Origin-Opener-Policy': 'same-origin',
  'Cross-Origin-Embedder-Policy': 'require-corp',
  'Cross-Origin-Resource-Policy': 'same-origin',
};

self.addEventListener('install', (event) => {
  event.waitUntil(self.skipWaiting());
});

self.addEventListener('activate', (event) => {
  event.waitUntil((async () => {
    for (const key of await caches.keys()) {
      if (key !== CACHE && key.startsWith('fracture-app-')) await caches.delete(key);
    }
    await self.clients.claim();
  })());
});

function isolated(response) {
  // Opaque and error responses cannot be rebuilt; they pass as they are.
  if (response.status === 0) return response;
  const headers = new Headers(response.headers);
  for (const [name, value] of Object.entries(ISOLATION_HEADERS)) headers.set(name, value);
  return new Response(response.body, { status: response.status, statusText: response.statusText, headers });
}

self.addEventListener('fetch', (event) => {
  const request = event.request;
  const url = new URL(request.url);
  // Model files are fetched by an isolated page too: same-origin, they need no headers.
  if (request.method !== 'GET' || url.origin !== self.location.origin || url.pathname.endsWith('.safetensors')) return;
  event.respondWith((async () => {
    const cache = await caches.open(CACHE);
    try {
      const response = await fetch(request);
      if (response.ok) await cache.put(request, response.clone());
      return isolated(response);
    } catch (offline) {
      const cached = await cache.match(request, { ignoreSearch: true });
      if (cached) return isolated(cached);
      throw offline;
    }
  })());
});
