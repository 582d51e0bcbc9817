// CAS browser: look up a digest, download the blob, view a Directory or a
// Tree (browsable), an Action, text or a hex dump.

import { getJSON } from '../api.js';
import { h, mount, panel, empty, errorBox } from '../dom.js';
import { bytes, casApi, casHref, downloadHref, actionHref, digestText, plural } from '../format.js';
import { dirTree, fetchDirectory } from './tree.js';

function parseParts(parts) {
  if (parts.length === 4) return { instance: parts[0], function: parts[1], hash: parts[2], size: parts[3] };
  if (parts.length === 3) return { instance: '_', function: parts[0], hash: parts[1], size: parts[2] };
  return null;
}

function form(instances, cur) {
  const inst = h('select', { 'aria-label': 'Instance', id: 'cas-instance' }, instances.map(i => h('option', { value: i.segment, selected: cur?.instance === i.segment, text: i.name === '' ? '"" (default)' : i.name })));
  const fn = h('select', { 'aria-label': 'Digest function', id: 'cas-function' });
  const fill = () => {
    const i = instances.find(x => x.segment === inst.value) || instances[0];
    fn.replaceChildren(...(i?.digest_functions || ['sha256']).map(f => h('option', { value: f, selected: cur?.function === f, text: f })));
  };
  fill();
  inst.addEventListener('change', fill);
  const hash = h('input', { type: 'text', class: 'hash', placeholder: 'hash (or hash/size)', value: cur?.hash || '', id: 'cas-hash', 'aria-label': 'Hash', spellcheck: 'false' });
  const size = h('input', { type: 'text', class: 'size', placeholder: 'size', value: cur?.size ?? '', id: 'cas-size', 'aria-label': 'Size in bytes' });
  const go = ev => {
    ev.preventDefault();
    let hv = hash.value.trim();
    let sv = size.value.trim();
    const m = hv.match(/^(?:[a-z0-9]+:)?([0-9a-fA-F]+)\/(\d+)$/);
    if (m) { hv = m[1]; sv = m[2]; }
    location.hash = casHref(inst.value, { function: fn.value, hash: hv.toLowerCase(), size: sv });
  };
  return h('form', { class: 'toolbar', onsubmit: go }, inst, fn, hash, size, h('button', { class: 'btn primary', type: 'submit', text: 'Open' }));
}

function treeView(inst, t) {
  const byHash = new Map(t.children.map(c => [c.digest.hash, c.directory]));
  const resolve = d => Promise.resolve(byHash.get(d.hash) || null);
  return t.root ? dirTree(inst, t.root, resolve) : empty('The Tree has no root.');
}

async function blobView(d, as) {
  const base = casApi(d.instance, d);
  let info;
  try {
    info = await getJSON(base + '/info');
  } catch (e) {
    if (e.status === 404) return panel('Not found', h('div', { class: 'empty', id: 'cas-missing', text: `No blob ${d.function}:${d.hash}/${d.size} in the CAS of this instance.` }));
    throw e;
  }
  const dg = info.digest;
  const kind = as || info.kind;
  const head = panel('Blob', h('div', { class: 'toolbar' },
    h('span', { class: 'pill info kind', id: 'cas-kind', text: kind }),
    h('span', { class: 'digest', text: `${dg.function}:${digestText(dg)}` }),
    h('span', { class: 'muted', text: bytes(dg.size) }),
    h('span', { class: 'spacer', style: { flex: '1' } }),
    h('a', { class: 'btn', href: downloadHref(info.instance, dg) + '?inline=1', target: '_blank', rel: 'noopener', text: 'View raw' }),
    h('a', { class: 'btn primary', id: 'cas-download', href: downloadHref(info.instance, dg), download: dg.hash, text: 'Download' })), { cls: 'section' });

  let body;
  if (kind === 'tree') {
    const t = await getJSON(base + '/tree');
    body = panel('Tree (output directory)', treeView(info.instance, t), { id: 'cas-directory', extra: h('span', { class: 'muted', text: `${t.children.length} subdirectories` }) });
  } else if (kind === 'directory') {
    const dir = info.directory || await getJSON(base + '/directory');
    body = panel('Directory', dirTree(info.instance, dir, fetchDirectory(info.instance)), { id: 'cas-directory', extra: h('span', { class: 'muted', text: [plural(dir.files.length, 'file'), plural(dir.directories.length, 'directory', 'directories'), plural(dir.symlinks.length, 'symlink')].join(' · ') }) });
  } else if (kind === 'action') {
    body = panel('Action', h('div', null,
      h('p', null, 'This blob is an Action. ', h('a', { href: actionHref(info.instance, dg), id: 'cas-open-action', text: 'Open the action page →' })),
      info.action?.command ? h('div', null, 'Command: ', h('a', { class: 'digest', href: casHref(info.instance, info.action.command), text: digestText(info.action.command) })) : null,
      info.action?.input_root ? h('div', null, 'Input root: ', h('a', { class: 'digest', href: casHref(info.instance, info.action.input_root, 'directory'), text: digestText(info.action.input_root) })) : null));
  } else if (kind === 'empty') {
    body = panel('Content', empty('The empty blob (also the empty Directory).'));
  } else {
    body = panel(kind === 'text' ? 'Text' : 'Hex dump', [
      h('pre', { class: 'out', id: 'cas-preview', text: info.preview }),
      info.truncated ? h('div', { class: 'muted', style: { marginTop: '6px' }, text: `Preview only; the blob is ${bytes(dg.size)}. Download it for everything.` }) : null,
    ], { extra: h('span', { class: 'seg' }, ['directory', 'tree'].map(v => h('a', { class: 'btn', href: casHref(info.instance, dg, v), text: `as ${v}` }))) });
  }
  return [head, body];
}

export async function render(el, parts, query) {
  const cur = parseParts(parts);
  const { instances } = await getJSON('/api/instances');
  const content = h('div');
  mount(el,
    h('div', { class: 'page-head' }, h('h1', { text: 'CAS browser' }), h('span', { class: 'sub', text: 'look up any blob by digest' })),
    h('div', { class: 'section' }, panel(null, form(instances, cur))),
    content);
  if (!cur) {
    mount(content, panel(null, empty('Enter a digest, or follow a digest link from an action.')));
    return { title: 'CAS' };
  }
  const as = ['tree', 'directory'].includes(query.get('as')) ? query.get('as') : null;
  try {
    mount(content, await blobView(cur, as));
  } catch (e) {
    mount(content, errorBox(e));
  }
  return { title: `CAS ${cur.hash.slice(0, 10)}` };
}
