// The single-page app: hash routes, one view at a time, live updates.

import { errorBox, mount } from './dom.js';
import { startLive, onState } from './live.js';
import * as overview from './views/overview.js';
import * as queue from './views/queue.js';
import * as workers from './views/workers.js';
import * as actions from './views/actions.js';
import * as action from './views/action.js';
import * as cas from './views/cas.js';

const routes = {
  '': { nav: 'overview', view: overview },
  queue: { nav: 'queue', view: queue },
  workers: { nav: 'workers', view: workers },
  actions: { nav: 'actions', view: actions },
  action: { nav: 'actions', view: action },
  cas: { nav: 'cas', view: cas },
};

let current = null;
let unsubscribe = null;

/** `#/a/b%2Fc?x=1` → { name: 'a', parts: ['b/c'], query }. */
function parse(hash) {
  const raw = hash.replace(/^#\/?/, '');
  const [path, qs] = raw.split('?');
  const segs = path.split('/').filter(s => s !== '');
  const name = segs.shift() || '';
  let parts;
  try { parts = segs.map(decodeURIComponent); } catch (_) { parts = segs; }
  return { name, parts, query: new URLSearchParams(qs || '') };
}

async function route() {
  const r = parse(location.hash);
  const def = routes[r.name];
  const el = document.getElementById('view');
  if (current?.dispose) current.dispose();
  if (unsubscribe) unsubscribe();
  current = null;
  unsubscribe = null;
  for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('active', def?.nav === a.dataset.route);
  if (!def) {
    mount(el, errorBox(new Error(`Unknown page ${location.hash}`)));
    return;
  }
  el.replaceChildren();
  try {
    current = await def.view.render(el, r.parts, r.query);
    document.title = (current?.title ? current.title + ' · ' : '') + 'Kiln';
  } catch (e) {
    mount(el, errorBox(e));
    return;
  }
  if (current?.onState) {
    const view = current;
    unsubscribe = onState(s => view.onState(s));
  }
}

function setupTheme() {
  const btn = document.getElementById('theme');
  btn?.addEventListener('click', () => {
    const root = document.documentElement;
    const dark = root.dataset.theme ? root.dataset.theme === 'dark' : matchMedia('(prefers-color-scheme: dark)').matches;
    root.dataset.theme = dark ? 'light' : 'dark';
    try { localStorage.setItem('kiln-theme', root.dataset.theme); } catch (_) {}
    window.dispatchEvent(new Event('resize'));
  });
}

window.addEventListener('hashchange', route);
setupTheme();
startLive();
route();
