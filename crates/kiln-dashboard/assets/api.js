// Fetching the JSON API; errors carry the server's message.

export async function getJSON(path, opts = {}) {
  const res = await fetch(path, { headers: { Accept: 'application/json' }, signal: opts.signal });
  let body = null;
  try { body = await res.json(); } catch (_) { /* not JSON */ }
  if (!res.ok) {
    const err = new Error(body?.error || `${res.status} ${res.statusText}`);
    err.status = res.status;
    throw err;
  }
  return body;
}
