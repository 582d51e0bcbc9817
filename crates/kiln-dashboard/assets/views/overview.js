// Overview: totals, live counts, the last hour as charts, store usage.

import { getJSON } from '../api.js';
import { h, mount, panel, table, errorBox } from '../dom.js';
import { lineChart, legend } from '../chart.js';
import { bytes, rate, num, pct, dur, plural } from '../format.js';

const COLORS = ['var(--c1)', 'var(--c2)', 'var(--c3)', 'var(--c4)', 'var(--c5)', 'var(--c6)'];

function card(label, value, detail, cls = '') {
  return h('div', { class: 'panel card ' + cls }, h('div', { class: 'label', text: label }), h('div', { class: 'value', text: value }), detail ? h('div', { class: 'detail', text: detail }) : null);
}

function chartPanel(id, title, sub, chartOpts) {
  return panel(title, [lineChart(chartOpts), h('div', { style: { marginTop: '6px' } }, legend(chartOpts.series))], { id, extra: h('span', { class: 'muted', text: sub }) });
}

function storeRow(s) {
  const used = s.capacity ? s.bytes / s.capacity : null;
  const level = used === null ? '' : used > 0.9 ? 'bad' : used > 0.7 ? 'warn' : 'ok';
  return h('tr', null,
    h('td', null, h('b', { text: s.name }), h('div', { class: 'faint mono', text: s.describe })),
    h('td', { class: 'num nowrap', text: bytes(s.bytes) }),
    h('td', { style: { width: '28%' } }, used === null
      ? h('span', { class: 'faint', text: 'unbounded' })
      : h('div', { style: { display: 'flex', alignItems: 'center', gap: '8px' } },
        h('div', { class: 'meter ' + level, style: { flex: '1' } }, h('span', { style: { width: Math.min(100, used * 100).toFixed(1) + '%' } })),
        h('span', { class: 'muted nowrap', text: `${pct(used)} of ${bytes(s.capacity)}` }))),
    h('td', { class: 'num', text: num(s.items) }),
    h('td', { class: 'num', text: num(s.evictions) }),
    h('td', { class: 'num nowrap', text: s.items ? dur(s.oldest_age_secs * 1000) : '–' }));
}

function build(o) {
  const t = o.totals;
  const lookups = t.ac_hits + t.ac_misses;
  const s = o.series;
  const cards = h('div', { class: 'grid cards', id: 'overview-cards' },
    card('AC hit rate', pct(t.ac_hit_rate), lookups ? `${plural(t.ac_hits, 'hit')} · ${plural(t.ac_misses, 'miss', 'misses')}` : 'no lookups yet', 'accent'),
    card('CAS read', bytes(t.cas_bytes_read), `${num(t.cas_blobs_read)} blobs served`),
    card('CAS written', bytes(t.cas_bytes_written), `${num(t.cas_blobs_written)} blobs stored`),
    card('Actions', num(t.actions_executed + t.actions_cached), `${num(t.actions_executed)} executed · ${num(t.actions_cached)} cached · ${num(t.actions_failed)} failed`),
    o.live
      ? card('Queue', `${num(o.live.executing)} running`, `${num(o.live.queued)} queued`)
      : card('Execution', 'off', 'cache only: no scheduler'),
    o.live ? card('Workers', num(o.live.connected_workers), `${num(o.live.workers)} registered`) : null);

  const storeNames = Object.keys(s.store_bytes);
  const charts = h('div', { class: 'grid charts' },
    chartPanel('chart-hit-rate', 'Action Cache hit rate', 'per interval', {
      t: s.t, format: v => pct(v, 0), yMax: 1, label: 'Action Cache hit rate',
      series: [{ name: 'hit rate', color: 'var(--c1)', values: s.hit_rate }],
    }),
    chartPanel('chart-cas', 'CAS throughput', 'bytes per second', {
      t: s.t, format: rate, label: 'CAS throughput',
      series: [
        { name: 'read', color: 'var(--c2)', values: s.cas_read_bytes_per_sec },
        { name: 'written', color: 'var(--c1)', values: s.cas_written_bytes_per_sec },
      ],
    }),
    chartPanel('chart-actions', 'Actions', 'per minute', {
      t: s.t, format: v => num(v), label: 'Actions per minute',
      series: [
        { name: 'executed', color: 'var(--c1)', values: s.executed_per_min },
        { name: 'cache hits', color: 'var(--c4)', values: s.cached_per_min },
        { name: 'failed', color: 'var(--c6)', values: s.failed_per_min, noFill: true },
      ],
    }),
    chartPanel('chart-stores', 'Store usage', 'bytes held', {
      t: s.t, format: bytes, label: 'Store usage',
      series: storeNames.map((n, i) => ({ name: n, color: COLORS[i % COLORS.length], values: s.store_bytes[n], noFill: storeNames.length > 2 })),
    }));

  const stores = panel('Stores', o.stores.length
    ? table([{ title: 'Store' }, { title: 'Used', num: true }, { title: 'Capacity' }, { title: 'Items', num: true }, { title: 'Evictions', num: true }, { title: 'Oldest', num: true }], o.stores.map(storeRow), { id: 'stores-table' })
    : h('div', { class: 'empty', text: 'No stores.' }), { flush: true });

  return [
    h('div', { class: 'page-head' },
      h('h1', { text: 'Overview' }),
      h('span', { class: 'sub', text: `up ${dur(o.now - o.started_at)} · sampled every ${o.interval_secs} s · last hour` })),
    cards, charts, stores,
  ];
}

export async function render(el) {
  let o = await getJSON('/api/overview');
  mount(el, build(o));
  let last = { sampled_at: null, seq: null, at: Date.now() };
  let busy = false;
  return {
    title: 'Overview',
    async onState(st) {
      const changed = st.sampled_at !== last.sampled_at || st.seq !== last.seq || Date.now() - last.at > 5000;
      if (!changed || busy) return;
      busy = true;
      last = { sampled_at: st.sampled_at, seq: st.seq, at: Date.now() };
      try {
        o = await getJSON('/api/overview');
        if (el.isConnected) mount(el, build(o));
      } catch (e) {
        mount(el, errorBox(e));
      } finally {
        busy = false;
      }
    },
  };
}
