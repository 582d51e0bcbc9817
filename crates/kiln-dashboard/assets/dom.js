// Tiny DOM builder: text is always set as text (never parsed as HTML).

export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') el.setAttribute('class', v);
    else if (k === 'text') el.textContent = v;
    else if (k === 'style' && typeof v === 'object') Object.assign(el.style, v);
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else if (c instanceof Node) el.appendChild(c);
    else el.appendChild(document.createTextNode(String(c)));
  }
}

/** An SVG element (`h` builds HTML ones). */
export function svg(tag, attrs, ...children) {
  const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

/** Replaces an element's content. */
export function mount(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export function panel(title, body, opts = {}) {
  return h('section', { class: 'panel' + (opts.flush ? ' flush' : '') + (opts.cls ? ' ' + opts.cls : ''), id: opts.id },
    title ? h('div', { class: 'panel-head' }, h('h2', { text: title }), opts.extra ? [h('span', { class: 'spacer' }), opts.extra] : null) : null,
    h('div', { class: 'panel-body' }, body));
}

export function table(columns, rows, opts = {}) {
  return h('table', { class: 'data', id: opts.id },
    h('thead', null, h('tr', null, columns.map(c => h('th', { class: c.num ? 'num' : null, text: c.title })))),
    h('tbody', null, rows));
}

export function empty(text) {
  return h('div', { class: 'empty', text });
}

export function errorBox(err) {
  return h('div', { class: 'error-box', role: 'alert', text: err?.message || String(err) });
}
