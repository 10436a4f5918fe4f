// A local OpenID Connect provider for the tests: panva's oidc-provider (a certified implementation of
// OpenID Connect Core, Discovery, PKCE and private_key_jwt) on a loopback port, standing in for the
// national logins (ID-porten for patients, HelseID for clinicians) that fhir-norse relies on.
//
//   node provider.mjs <config.json>
//
// config.json: {
//   "port": 41234, "issuer": "http://127.0.0.1:41234",
//   "clients": [{"client_id": "...", "client_secret": "..." | "jwks": {"keys": [public JWK]},
//                "redirect_uris": ["..."], "token_endpoint_auth_method": "client_secret_post" | "private_key_jwt"}],
//   "accounts": {"<login>": {"sub"?: "...", "acr"?: "...", "pid": "...", "name": "...", ...}},
//   "claims"?: {"<scope>": ["<claim>", ...]},   // which scope releases which claim (defaults below)
//   "acr_values"?: ["idporten-loa-substantial", "idporten-loa-high"],
//   "id_token_claims"?: true,      // false: scope claims only at the userinfo endpoint (OIDC Core 5.4)
//   "single_sign_on"?: false       // true: a second authorization in the same browser skips the login page
// }
//
// The login page (/interaction/:uid) is a small accessible form: the account's login name, nothing else
// (no password: this is a test double of the login, not of the person). Signing in grants the requested
// scopes and claims at once, so there is no second (consent) page. Prints "READY <issuer>" when listening.
// Nothing here talks to anything but 127.0.0.1.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';

import Provider, { interactionPolicy } from 'oidc-provider';

const MAX_FORM_BYTES = 8192;

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const { issuer, port } = config;
const accounts = new Map(Object.entries(config.accounts ?? {}));
const accountsBySub = new Map(
  [...accounts].map(([login, claims]) => [claims.sub ?? login, { login, claims }]),
);
const supportedAcr = config.acr_values ?? ['idporten-loa-substantial', 'idporten-loa-high'];

// What ID-porten and HelseID release: ID-porten the national identity number ("pid") with openid,
// HelseID the HPR number with its own identity scope.
const defaultClaims = {
  openid: ['sub', 'pid'],
  profile: ['name', 'given_name', 'family_name'],
  'helseid://scopes/identity/hpr_number': ['helseid://claims/hpr/hpr_number'],
};

// The id_token signing key: made afresh at every start (RS256, what both national logins use).
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = {
  ...privateKey.export({ format: 'jwk' }),
  kid: randomBytes(8).toString('hex'),
  alg: 'RS256',
  use: 'sig',
};

const policy = interactionPolicy.base();
if (!config.single_sign_on) {
  // Every authorization request shows the login page, even with a session from an earlier one: the
  // tests sign in as a patient and as a clinician in the same browser.
  policy.get('login').checks.add(new interactionPolicy.Check(
    'fresh_login',
    'every authorization request asks the End-User to sign in',
    (ctx) => (ctx.oidc.result?.login
      ? interactionPolicy.Check.NO_NEED_TO_PROMPT
      : interactionPolicy.Check.REQUEST_PROMPT),
  ));
}

const provider = new Provider(issuer, {
  clients: (config.clients ?? []).map((client) => ({
    grant_types: ['authorization_code'],
    response_types: ['code'],
    // auth_time in every id_token, as ID-porten and HelseID send it.
    require_auth_time: true,
    ...client,
  })),
  async findAccount(_ctx, sub) {
    const found = accountsBySub.get(sub);
    if (!found) {
      return undefined;
    }
    return {
      accountId: sub,
      async claims() {
        const { sub: _sub, acr: _acr, ...claims } = found.claims;
        return { sub, ...claims };
      },
    };
  },
  claims: { acr: null, auth_time: null, ...(config.claims ?? defaultClaims) },
  acrValues: supportedAcr,
  conformIdTokenClaims: !(config.id_token_claims ?? true),
  features: { devInteractions: { enabled: false } },
  pkce: { required: () => true },
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  jwks: { keys: [signingKey] },
  interactions: { policy, url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
  async renderError(ctx, out) {
    ctx.type = 'html';
    ctx.body = page('Innloggingen feilet / Sign-in failed', `
      <h1>Innloggingen feilet / Sign-in failed</h1>
      <p role="alert">${escape(out.error)}: ${escape(out.error_description ?? '')}</p>`);
  },
});

function escape(value) {
  return String(value).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function page(title, body) {
  return `<!doctype html>
<html lang="nb">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>${escape(title)}</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 28rem; padding: 1rem; line-height: 1.5; }
  label { display: block; font-weight: 600; margin-bottom: .25rem; }
  input { font-size: 1rem; padding: .5rem; width: 100%; box-sizing: border-box; }
  button { font-size: 1rem; padding: .6rem 1.2rem; margin-top: 1rem; }
  .error { color: #a00; font-weight: 600; }
</style></head>
<body><main>${body}</main></body>
</html>`;
}

function loginPage(uid, clientId, { error, login } = {}) {
  const described = error ? ' aria-describedby="login-error" aria-invalid="true"' : '';
  return page('Logg inn / Sign in', `
    <h1>Logg inn / Sign in</h1>
    <p>Testinnlogging for <strong>${escape(clientId)}</strong> / Test sign-in.</p>
    ${error ? `<p id="login-error" class="error" role="alert">${escape(error)}</p>` : ''}
    <form method="post" action="/interaction/${escape(uid)}">
      <label for="login">Brukernavn / User name</label>
      <input id="login" name="login" autocomplete="username" required value="${escape(login ?? '')}"${described}>
      <button type="submit">Logg inn</button>
    </form>`);
}

async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_FORM_BYTES) {
      throw new Error('form too large');
    }
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function send(res, status, html) {
  res.writeHead(status, {
    'content-type': 'text/html; charset=utf-8',
    'cache-control': 'no-store',
  });
  res.end(html);
}

// The grant of everything the client asked for: the OpenID scopes and any claims of the "claims"
// request parameter (OIDC Core 5.5), and resource scopes when a resource was named.
async function grantAll(details, accountId) {
  const { params, prompt } = details;
  const grant = details.grantId
    ? await provider.Grant.find(details.grantId)
    : new provider.Grant({ accountId, clientId: params.client_id });
  grant.addOIDCScope(String(params.scope ?? 'openid'));
  const claims = new Set(prompt.details.missingOIDCClaims ?? []);
  if (params.claims) {
    const requested = JSON.parse(params.claims);
    for (const where of ['id_token', 'userinfo']) {
      for (const claim of Object.keys(requested[where] ?? {})) {
        claims.add(claim);
      }
    }
  }
  if (claims.size) {
    grant.addOIDCClaims([...claims]);
  }
  for (const [indicator, scopes] of Object.entries(prompt.details.missingResourceScopes ?? {})) {
    grant.addResourceScope(indicator, scopes.join(' '));
  }
  return grant.save();
}

function acrFor(account, params) {
  if (account.acr) {
    return account.acr;
  }
  const requested = String(params.acr_values ?? '').split(' ').filter((v) => supportedAcr.includes(v));
  return requested[0] ?? supportedAcr[0];
}

async function interaction(req, res, uid) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) {
    send(res, 400, page('Ugyldig / Invalid', '<h1>Ugyldig innlogging / Invalid sign-in</h1>'));
    return;
  }
  const { prompt, params, session } = details;
  if (req.method === 'GET') {
    if (prompt.name === 'consent') {
      // Already signed in (single sign-on) and the client asks for more: granted without a page.
      const grantId = await grantAll(details, session.accountId);
      await provider.interactionFinished(req, res, { consent: { grantId } }, {
        mergeWithLastSubmission: true,
      });
      return;
    }
    send(res, 200, loginPage(uid, params.client_id));
    return;
  }
  if (req.method !== 'POST') {
    res.writeHead(405, { allow: 'GET, POST' });
    res.end();
    return;
  }
  const form = await readForm(req);
  const login = (form.get('login') ?? '').trim();
  const account = accounts.get(login);
  if (!account) {
    send(res, 200, loginPage(uid, params.client_id, {
      login,
      error: 'Ukjent brukernavn / Unknown user name',
    }));
    return;
  }
  const accountId = account.sub ?? login;
  const grantId = await grantAll(details, accountId);
  await provider.interactionFinished(req, res, {
    login: { accountId, acr: acrFor(account, params), amr: ['pwd'], remember: false },
    consent: { grantId },
  }, { mergeWithLastSubmission: false });
}

const handle = provider.callback();
const server = createServer((req, res) => {
  const path = new URL(req.url, issuer).pathname;
  const match = /^\/interaction\/([A-Za-z0-9_-]{1,64})$/.exec(path);
  if (!match) {
    handle(req, res);
    return;
  }
  interaction(req, res, match[1]).catch((error) => {
    // An expired or unknown interaction (its cookie is missing) is the usual case here.
    const status = error.statusCode ?? error.status ?? 500;
    if (!res.headersSent) {
      send(res, status, page('Innloggingen feilet / Sign-in failed', `
        <h1>Innloggingen feilet / Sign-in failed</h1>
        <p role="alert">${escape(error.error ?? error.name)}: ${escape(error.error_description ?? error.message)}</p>`));
    }
  });
});

server.listen(port, '127.0.0.1', () => {
  process.stdout.write(`READY ${issuer}\n`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.closeAllConnections();
    process.exit(0);
  });
}
