// Small SVG charts drawn by hand: a time-series line chart with a hover
// read-out, and the phase-breakdown bar.

import { h, svg } from './dom.js';
import { clock, dur } from './format.js';

function niceStep(range, ticks) {
  const raw = range / ticks;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const f = raw / mag;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
}

/**
 * A line chart. `t`: times (ms); `series`: [{name, color, values}] aligned
 * with `t` (null = no data). `format` formats y values.
 */
export function lineChart({ t, series, format = String, yMax = null, height = 190, label = '' }) {
  const wrap = h('div', { class: 'chart-wrap', role: 'img', 'aria-label': label });
  const hasData = t.length > 0 && series.some(s => s.values.some(v => v !== null && v !== undefined));
  if (!hasData) {
    wrap.appendChild(h('div', { class: 'chart-empty', text: 'No data yet: the first samples arrive within the sample interval.' }));
    return wrap;
  }
  const tip = h('div', { class: 'chart-tip', hidden: true });
  let width = 0;
  const draw = () => {
    const w = Math.max(240, wrap.clientWidth || 480);
    if (w === width) return;
    width = w;
    const pad = { l: 58, r: 12, t: 10, b: 22 };
    const iw = w - pad.l - pad.r;
    const ih = height - pad.t - pad.b;
    const all = series.flatMap(s => s.values).filter(v => v !== null && v !== undefined && isFinite(v));
    let top = yMax ?? Math.max(...all, 0);
    if (top <= 0) top = 1;
    const step = yMax ? yMax / 4 : niceStep(top, 4);
    top = yMax ?? Math.ceil(top / step) * step;
    const t0 = t[0];
    const t1 = t[t.length - 1];
    const x = v => pad.l + (t1 === t0 ? iw / 2 : ((v - t0) / (t1 - t0)) * iw);
    const y = v => pad.t + ih - (v / top) * ih;
    const root = svg('svg', { class: 'chart', viewBox: `0 0 ${w} ${height}`, width: w, height });
    for (let v = 0; v <= top + step / 2; v += step) {
      root.appendChild(svg('line', { class: 'grid-line', x1: pad.l, x2: w - pad.r, y1: y(v), y2: y(v) }));
      root.appendChild(svg('text', { x: pad.l - 6, y: y(v) + 3.5, 'text-anchor': 'end' }, format(v)));
    }
    const xticks = Math.min(5, t.length);
    for (let i = 0; i < xticks; i++) {
      const tv = xticks === 1 ? t0 : t0 + ((t1 - t0) * i) / (xticks - 1);
      const anchor = xticks === 1 ? 'middle' : i === 0 ? 'start' : i === xticks - 1 ? 'end' : 'middle';
      root.appendChild(svg('text', { x: x(tv), y: height - 6, 'text-anchor': anchor }, clock(tv)));
    }
    for (const s of series) {
      let d = '';
      let area = '';
      let open = false;
      let first = null;
      let last = null;
      s.values.forEach((v, i) => {
        if (v === null || v === undefined || !isFinite(v)) {
          if (open && !s.noFill) area += `L${last},${y(0)}L${first},${y(0)}Z`;
          open = false;
          return;
        }
        const px = x(t[i]);
        const py = y(v);
        d += (open ? 'L' : 'M') + px.toFixed(1) + ',' + py.toFixed(1);
        area += (open ? 'L' : 'M') + px.toFixed(1) + ',' + py.toFixed(1);
        if (!open) first = px.toFixed(1);
        last = px.toFixed(1);
        open = true;
      });
      if (open && !s.noFill) area += `L${last},${y(0)}L${first},${y(0)}Z`;
      if (!s.noFill) root.appendChild(svg('path', { d: area, fill: s.color, 'fill-opacity': 0.09, stroke: 'none' }));
      root.appendChild(svg('path', { d, fill: 'none', stroke: s.color, 'stroke-width': 1.8, 'stroke-linejoin': 'round', 'stroke-linecap': 'round' }));
      if (t.length <= 40) {
        s.values.forEach((v, i) => {
          if (v !== null && v !== undefined && isFinite(v)) root.appendChild(svg('circle', { cx: x(t[i]), cy: y(v), r: 2.4, fill: s.color }));
        });
      }
    }
    const cursor = svg('line', { class: 'cursor', x1: 0, x2: 0, y1: pad.t, y2: pad.t + ih, visibility: 'hidden' });
    root.appendChild(cursor);
    const hit = svg('rect', { x: pad.l, y: pad.t, width: iw, height: ih, fill: 'transparent' });
    root.appendChild(hit);
    hit.addEventListener('mousemove', ev => {
      const rect = root.getBoundingClientRect();
      const mx = ev.clientX - rect.left;
      let best = 0;
      t.forEach((tv, i) => { if (Math.abs(x(tv) - mx) < Math.abs(x(t[best]) - mx)) best = i; });
      cursor.setAttribute('x1', x(t[best]));
      cursor.setAttribute('x2', x(t[best]));
      cursor.setAttribute('visibility', 'visible');
      tip.replaceChildren(
        h('div', { class: 't', text: clock(t[best]) + (best === t.length - 1 ? ' (now)' : '') }),
        ...series.map(s => h('div', null, h('i', { style: { background: s.color } }), `${s.name}: `, h('b', { text: s.values[best] === null || s.values[best] === undefined ? '–' : format(s.values[best]) }))));
      tip.hidden = false;
      const left = Math.min(Math.max(0, x(t[best]) + 10), w - 170);
      tip.style.left = left + 'px';
      tip.style.top = pad.t + 'px';
    });
    hit.addEventListener('mouseleave', () => { cursor.setAttribute('visibility', 'hidden'); tip.hidden = true; });
    wrap.replaceChildren(root, tip);
  };
  if (typeof ResizeObserver !== 'undefined') {
    const ro = new ResizeObserver(() => draw());
    ro.observe(wrap);
  }
  requestAnimationFrame(draw);
  return wrap;
}

/** Legend for a chart's series. */
export function legend(series) {
  return h('div', { class: 'legend' }, series.map(s => h('span', null, h('i', { style: { background: s.color } }), s.name)));
}

const PHASES = [
  ['queued_ms', 'ph-queued', 'queued'],
  ['fetch_ms', 'ph-fetch', 'inputs'],
  ['execute_ms', 'ph-exec', 'execute'],
  ['upload_ms', 'ph-upload', 'outputs'],
];

/** Stacked bar of an execution's phases; `null` without timing. */
export function phaseBar(timing, wide = false) {
  if (!timing) return null;
  const parts = PHASES.map(([k, cls, name]) => [timing[k], cls, name]).filter(([v]) => v !== null && v !== undefined);
  const total = parts.reduce((a, [v]) => a + v, 0);
  if (!parts.length) return null;
  const title = parts.map(([v, , name]) => `${name} ${dur(v)}`).join(' · ');
  return h('div', { class: 'phases' + (wide ? ' wide' : ''), title },
    parts.map(([v, cls, name]) => h('span', { class: cls, title: `${name}: ${dur(v)}`, style: { flexGrow: String(total > 0 ? Math.max(v, total / 100) : 1) } })));
}

export function phaseLegend() {
  return h('div', { class: 'legend' }, PHASES.map(([, cls, name]) => h('span', null, h('i', { class: cls }), name)));
}
