// Workers: slots, load, properties and what each one runs.

import { getJSON } from '../api.js';
import { h, mount, panel, empty, errorBox } from '../dom.js';
import { ago, dur, short, num, pct, operationHref, actionHref } from '../format.js';

function workerCard(w, now) {
  const status = !w.connected ? h('span', { class: 'pill bad', text: 'disconnected' })
    : w.draining ? h('span', { class: 'pill warn', text: 'draining' })
      : w.busy >= w.slots ? h('span', { class: 'pill warn', text: 'full' })
        : h('span', { class: 'pill ok', text: w.busy ? 'busy' : 'idle' });
  const load = Math.max(0, w.load);
  const loadCls = load > 0.9 ? 'bad' : load > 0.7 ? 'warn' : 'ok';
  const slots = [];
  for (let i = 0; i < Math.min(w.slots, 128); i++) slots.push(h('i', { class: i < w.busy ? 'busy' : '' }));
  return h('div', { class: 'panel worker', dataset: { worker: w.name || w.id } },
    h('div', { class: 'top' }, h('span', { class: 'name', text: w.name || w.id }), status, h('span', { style: { flex: '1' } }), h('span', { class: 'id', title: 'worker id', text: w.id })),
    h('div', { class: 'stats' },
      h('div', null, h('div', { class: 'k', text: 'Slots' }), h('div', { class: 'v', text: `${w.busy} / ${w.slots} busy` }), h('div', { class: 'slots' }, slots)),
      h('div', null, h('div', { class: 'k', text: 'Load' }), h('div', { class: 'v', text: pct(load, 0) }), h('div', { class: 'meter ' + loadCls }, h('span', { style: { width: Math.min(100, load * 100).toFixed(0) + '%' } }))),
      h('div', null, h('div', { class: 'k', text: 'Last heard' }), h('div', { class: 'v', text: ago(w.last_seen, now) })),
      h('div', null, h('div', { class: 'k', text: 'Running' }), h('div', { class: 'v', text: num(w.running.length) }))),
    h('div', null, h('div', { class: 'k muted', style: { fontSize: '11.5px', fontWeight: 600, textTransform: 'uppercase', letterSpacing: '.04em', marginBottom: '4px' }, text: 'Properties' }),
      w.properties.length ? w.properties.map(p => h('span', { class: 'chip' }, h('b', { text: p.name + '=' }), p.value)) : h('span', { class: 'faint', text: 'none' })),
    w.running.length ? h('ul', { class: 'running-list' }, w.running.map(r => h('li', null,
      h('span', { class: 'pill info', text: r.phase }),
      h('a', { class: 'digest', href: r.operation ? operationHref(r.operation) : actionHref(r.instance, r.digest), text: short(r.digest.hash, 12) }),
      r.mnemonic ? h('span', { class: 'muted', text: r.mnemonic }) : null,
      h('span', { style: { flex: '1' } }),
      h('span', { class: 'muted', text: dur(r.running_ms) })))) : null);
}

function build(ws) {
  if (!ws.execution) {
    return [h('div', { class: 'page-head' }, h('h1', { text: 'Workers' })), panel(null, empty('Remote execution is not enabled on this server (no [scheduler]).'))];
  }
  return [
    h('div', { class: 'page-head' }, h('h1', { text: 'Workers' }),
      h('span', { class: 'sub', text: `${ws.workers.length} registered · ${num(ws.busy)} of ${num(ws.slots)} slots busy · ${num(ws.queued_total)} queued` })),
    ws.workers.length ? h('div', { class: 'grid workers', id: 'workers-grid' }, ws.workers.map(w => workerCard(w, ws.now)))
      : panel(null, empty('No worker is registered. Start one with `kiln worker --scheduler grpc://HOST:PORT`.')),
  ];
}

export async function render(el) {
  mount(el, build(await getJSON('/api/workers')));
  let busy = false;
  return {
    title: 'Workers',
    async onState() {
      if (busy) return;
      busy = true;
      try {
        const ws = await getJSON('/api/workers');
        if (el.isConnected) mount(el, build(ws));
      } catch (e) {
        mount(el, errorBox(e));
      } finally {
        busy = false;
      }
    },
  };
}
