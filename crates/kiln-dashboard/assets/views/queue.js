// Live queue: executing actions with their worker and phase, then queued ones.

import { getJSON } from '../api.js';
import { h, mount, panel, table, empty, errorBox } from '../dom.js';
import { dur, short, actionHref, operationHref, num } from '../format.js';

const PHASE_CLS = { assigned: 'neutral', started: 'info', fetching: 'info', executing: 'warn', uploading: 'ok' };

function platformChips(p) {
  return p.length ? p.map(x => h('span', { class: 'chip' }, h('b', { text: x.name + '=' }), x.value)) : h('span', { class: 'faint', text: 'default' });
}

function actionCell(a) {
  const href = a.operations[0] ? operationHref(a.operations[0]) : actionHref(a.instance, a.digest);
  return h('td', null,
    h('a', { href, class: 'digest', title: `${a.digest.function}:${a.digest.hash}/${a.digest.size}`, text: short(a.digest.hash, 12) }),
    a.mnemonic ? h('span', { class: 'pill neutral', style: { marginLeft: '8px' }, text: a.mnemonic }) : null,
    a.operations.length > 1 ? h('span', { class: 'faint', title: 'identical actions merged', text: ` ×${a.operations.length}` }) : null);
}

function build(q) {
  if (!q.execution) {
    return [h('div', { class: 'page-head' }, h('h1', { text: 'Queue' })), panel(null, empty('Remote execution is not enabled on this server (no [scheduler]).'))];
  }
  const executing = q.executing.length
    ? table(
      [{ title: 'Action' }, { title: 'Target' }, { title: 'Worker' }, { title: 'Phase' }, { title: 'Running', num: true }, { title: 'Attempt', num: true }, { title: 'Invocation' }],
      q.executing.map(e => h('tr', null,
        actionCell(e),
        h('td', { class: 'truncate', title: e.target_id, text: e.target_id || '–' }),
        h('td', null, h('a', { href: '#/workers', text: e.worker })),
        h('td', null, h('span', { class: 'pill ' + (PHASE_CLS[e.phase] || 'neutral'), text: e.phase })),
        h('td', { class: 'num', text: dur(e.running_ms) }),
        h('td', { class: 'num', text: String(e.attempts) }),
        h('td', { class: 'mono faint truncate', title: e.invocation_id, text: short(e.invocation_id, 8) || '–' }))),
      { id: 'executing-table' })
    : empty('Nothing is running.');
  const queued = q.queued.length
    ? table(
      [{ title: 'Action' }, { title: 'Target' }, { title: 'Priority', num: true }, { title: 'Platform' }, { title: 'Waiting', num: true }, { title: 'Invocation' }],
      q.queued.map(e => h('tr', null,
        actionCell(e),
        h('td', { class: 'truncate', title: e.target_id, text: e.target_id || '–' }),
        h('td', { class: 'num', text: String(e.priority) }),
        h('td', null, platformChips(e.platform)),
        h('td', { class: 'num', text: dur(e.waiting_ms) }),
        h('td', { class: 'mono faint', title: e.invocation_id, text: short(e.invocation_id, 8) || '–' }))),
      { id: 'queued-table' })
    : empty('The queue is empty.');
  const more = (shown, total) => total > shown ? h('span', { class: 'muted', text: `showing ${shown} of ${num(total)}` }) : null;
  return [
    h('div', { class: 'page-head' }, h('h1', { text: 'Queue' }), h('span', { class: 'sub', text: `${num(q.executing_total)} running · ${num(q.queued_total)} queued` })),
    h('div', { class: 'section' }, panel(`Running (${q.executing_total})`, executing, { flush: true, extra: more(q.executing.length, q.executing_total) })),
    panel(`Queued (${q.queued_total})`, queued, { flush: true, extra: more(q.queued.length, q.queued_total) }),
  ];
}

export async function render(el) {
  mount(el, build(await getJSON('/api/queue')));
  let busy = false;
  return {
    title: 'Queue',
    async onState() {
      if (busy) return;
      busy = true;
      try {
        const q = await getJSON('/api/queue');
        if (el.isConnected) mount(el, build(q));
      } catch (e) {
        mount(el, errorBox(e));
      } finally {
        busy = false;
      }
    },
  };
}
