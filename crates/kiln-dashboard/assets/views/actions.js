// Recent actions: newest first, with status, duration and phase breakdown.

import { getJSON } from '../api.js';
import { h, mount, panel, table, empty, errorBox } from '../dom.js';
import { phaseBar, phaseLegend } from '../chart.js';
import { clock, dur, short, num, recordHref } from '../format.js';

export function statusPill(r) {
  if (r.cached) return h('span', { class: 'pill cache', text: 'cache hit' });
  if (r.status_code !== 0) return h('span', { class: 'pill bad', title: r.status, text: r.status.toLowerCase().replace(/_/g, ' ') });
  if (r.exit_code === null || r.exit_code === undefined) return h('span', { class: 'pill neutral', text: 'no result' });
  if (r.exit_code !== 0) return h('span', { class: 'pill bad', text: `exit ${r.exit_code}` });
  return h('span', { class: 'pill ok', text: 'exit 0' });
}

const FILTERS = [['', 'All'], ['executed', 'Executed'], ['cached', 'Cache hits'], ['failed', 'Failed']];

function row(r, fresh) {
  const href = recordHref(r);
  const timing = r.metadata?.timing;
  return h('tr', { class: 'clickable' + (fresh ? ' flash' : ''), dataset: { seq: r.seq, digest: r.digest.hash }, onclick: ev => { if (!ev.target.closest('a')) location.hash = href; } },
    h('td', { class: 'nowrap muted', title: new Date(r.completed_at).toString(), text: clock(r.completed_at) }),
    h('td', null, statusPill(r)),
    h('td', null, r.mnemonic ? h('b', { text: r.mnemonic }) : h('span', { class: 'faint', text: '–' })),
    h('td', { class: 'truncate', title: r.target_id, text: r.target_id || '–' }),
    h('td', null, h('a', { class: 'digest', href, title: `${r.digest.function}:${r.digest.hash}/${r.digest.size}`, text: short(r.digest.hash, 12) })),
    h('td', { class: 'nowrap', text: r.cached ? '–' : (r.worker || '–') }),
    h('td', { class: 'num nowrap', text: r.cached ? '–' : dur(timing?.total_ms ?? timing?.worker_ms) }),
    h('td', null, r.cached ? h('span', { class: 'faint', text: 'from cache' }) : (phaseBar(timing) || h('span', { class: 'faint', text: '–' }))));
}

export async function render(el, _parts, query) {
  const params = { filter: query.get('filter') || '', q: query.get('q') || '' };
  let seen = null;
  let data = null;

  const search = h('input', { type: 'search', placeholder: 'Filter: mnemonic, target, digest, worker…', value: params.q, 'aria-label': 'Filter actions' });
  const seg = h('div', { class: 'seg', role: 'group' }, FILTERS.map(([v, label]) => h('button', { type: 'button', class: params.filter === v ? 'on' : '', dataset: { filter: v }, text: label, onclick: () => { params.filter = v; syncHash(); } })));
  const body = h('div');
  const sub = h('span', { class: 'sub' });

  function syncHash() {
    const qs = new URLSearchParams();
    if (params.filter) qs.set('filter', params.filter);
    if (params.q) qs.set('q', params.q);
    const s = qs.toString();
    history.replaceState(null, '', '#/actions' + (s ? '?' + s : ''));
    for (const b of seg.children) b.classList.toggle('on', b.dataset.filter === params.filter);
    load();
  }
  let timer = null;
  search.addEventListener('input', () => { clearTimeout(timer); timer = setTimeout(() => { params.q = search.value.trim(); syncHash(); }, 200); });

  function draw() {
    if (!data.execution) {
      mount(body, panel(null, empty('Remote execution is not enabled on this server (no [scheduler]): there are no actions to show.')));
      return;
    }
    sub.textContent = `last ${num(data.kept)} finished actions (up to ${num(data.capacity)} kept)`;
    const rows = data.actions.map(r => row(r, seen !== null && r.seq > seen));
    mount(body, panel(null, rows.length
      ? table([{ title: 'Time' }, { title: 'Status' }, { title: 'Mnemonic' }, { title: 'Target' }, { title: 'Action' }, { title: 'Worker' }, { title: 'Duration', num: true }, { title: 'Phases' }], rows, { id: 'actions-table' })
      : empty(params.filter || params.q ? 'No action matches.' : 'No action has finished yet. Actions appear here as soon as they complete.'), { flush: true, extra: phaseLegend() }));
    seen = data.latest_seq;
  }

  async function load() {
    const qs = new URLSearchParams({ limit: '300' });
    if (params.filter) qs.set('filter', params.filter);
    if (params.q) qs.set('q', params.q);
    data = await getJSON('/api/actions?' + qs);
    if (el.isConnected) draw();
  }

  await load();
  mount(el,
    h('div', { class: 'page-head' }, h('h1', { text: 'Actions' }), sub, h('span', { class: 'spacer' }), h('div', { class: 'toolbar' }, seg, search)),
    body);
  let busy = false;
  return {
    title: 'Actions',
    async onState(st) {
      if (busy || st.seq === data?.latest_seq) return;
      busy = true;
      try { await load(); } catch (e) { mount(body, errorBox(e)); } finally { busy = false; }
    },
  };
}
