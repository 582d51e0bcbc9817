// Formatting and link helpers.

export function bytes(n) {
  if (n === null || n === undefined || !isFinite(n)) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  let v = Number(n);
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? v.toFixed(0) : v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0)) + ' ' + units[i];
}

export function rate(n) {
  return bytes(n) + '/s';
}

export function num(n) {
  if (n === null || n === undefined || !isFinite(n)) return '–';
  if (Math.abs(n) >= 1e6) return (n / 1e6).toFixed(1) + 'M';
  if (Math.abs(n) >= 1e4) return (n / 1e3).toFixed(1) + 'k';
  return Number.isInteger(n) ? n.toLocaleString('en-US') : n.toFixed(n < 10 ? 2 : 1);
}

export function plural(n, one, many = one + 's') {
  return `${num(n)} ${n === 1 ? one : many}`;
}

export function pct(x, digits = 1) {
  if (x === null || x === undefined || !isFinite(x)) return '–';
  return (x * 100).toFixed(digits) + '%';
}

export function dur(ms) {
  if (ms === null || ms === undefined || !isFinite(ms)) return '–';
  if (ms < 1) return '<1 ms';
  if (ms < 1000) return Math.round(ms) + ' ms';
  const s = ms / 1000;
  if (s < 60) return s.toFixed(s < 10 ? 2 : 1) + ' s';
  const m = Math.floor(s / 60);
  if (m < 60) return m + 'm ' + String(Math.floor(s % 60)).padStart(2, '0') + 's';
  const hr = Math.floor(m / 60);
  return hr + 'h ' + String(m % 60).padStart(2, '0') + 'm';
}

export function ago(ms, now = Date.now()) {
  if (!ms) return '–';
  const d = Math.max(0, now - ms);
  if (d < 1500) return 'just now';
  return dur(d) + ' ago';
}

export function clock(ms) {
  if (!ms) return '–';
  const d = new Date(ms);
  return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false });
}

export function dateTime(ms) {
  if (!ms) return '–';
  const d = new Date(ms);
  return d.toLocaleString([], { hour12: false });
}

export function short(hash, n = 10) {
  return hash ? hash.slice(0, n) : '';
}

export function digestText(d) {
  return d ? `${d.hash}/${d.size}` : '';
}

const enc = encodeURIComponent;

/** API path of a blob. */
export function casApi(instance, d) {
  return `/api/cas/${enc(instance || '_')}/${enc(d.function)}/${enc(d.hash)}/${d.size}`;
}

export function casHref(instance, d, as) {
  return `#/cas/${enc(instance || '_')}/${enc(d.function)}/${enc(d.hash)}/${d.size}` + (as ? `?as=${as}` : '');
}

export function downloadHref(instance, d, name) {
  return casApi(instance, d) + (name ? `?name=${enc(name)}` : '');
}

export function actionHref(instance, d) {
  return `#/action/${enc(instance || '_')}/${enc(d.function)}/${enc(d.hash)}/${d.size}`;
}

export function operationHref(op) {
  return `#/action/${op.split('/').map(enc).join('/')}`;
}

/** The best link for a record: its operation while it may be retained, else its digest. */
export function recordHref(r) {
  return r.operation && !r.cached ? operationHref(r.operation) : actionHref(r.instance, r.digest);
}
