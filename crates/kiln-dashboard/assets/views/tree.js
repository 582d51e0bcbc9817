// A browsable directory tree: subdirectories expand on click, fetched
// lazily from the CAS (or from a Tree's children).

import { getJSON } from '../api.js';
import { h } from '../dom.js';
import { bytes, casApi, casHref, downloadHref } from '../format.js';

export function fetchDirectory(instance) {
  return d => getJSON(casApi(instance, d) + '/directory');
}

/** `dir`: a DirectoryJson; `resolve(digest)` → Promise<DirectoryJson>. */
export function dirTree(instance, dir, resolve, depth = 0) {
  const ul = h('ul', { class: 'tree' });
  const total = dir.directories.length + dir.files.length + dir.symlinks.length;
  if (!total) {
    ul.appendChild(h('li', { class: 'faint', text: '(empty directory)' }));
    return ul;
  }
  for (const d of dir.directories) {
    const li = h('li');
    const toggle = h('span', { class: 'toggle', role: 'button', tabindex: '0', text: d.name + '/' });
    let child = null;
    const open = async () => {
      if (child) {
        child.hidden = !child.hidden;
        toggle.classList.toggle('open', !child.hidden);
        return;
      }
      toggle.classList.add('open');
      child = h('div', { class: 'faint', text: 'loading…' });
      li.appendChild(child);
      try {
        const sub = await resolve(d.digest);
        const next = sub ? dirTree(instance, sub, resolve, depth + 1) : h('div', { class: 'faint', text: '(not available)' });
        li.replaceChild(next, child);
        child = next;
      } catch (e) {
        const msg = h('div', { class: 'faint', text: e.message });
        li.replaceChild(msg, child);
        child = msg;
      }
    };
    toggle.addEventListener('click', open);
    toggle.addEventListener('keydown', ev => { if (ev.key === 'Enter' || ev.key === ' ') { ev.preventDefault(); open(); } });
    li.appendChild(h('div', { class: 'row' }, toggle, h('span', { class: 'grow' }),
      d.digest ? h('a', { class: 'size', href: casHref(instance, d.digest), title: 'open in the CAS browser', text: 'digest' }) : null));
    ul.appendChild(li);
  }
  for (const f of dir.files) {
    ul.appendChild(h('li', null, h('div', { class: 'row' },
      h('span', { style: { width: '12px', display: 'inline-block' } }),
      f.digest ? h('a', { href: casHref(instance, f.digest), title: `${f.digest.function}:${f.digest.hash}`, text: f.name }) : h('span', { text: f.name }),
      f.executable ? h('span', { class: 'x', title: 'executable', text: '*' }) : null,
      h('span', { class: 'grow' }),
      f.digest ? h('span', { class: 'size', text: bytes(f.digest.size) }) : null,
      f.digest ? h('a', { class: 'size', href: downloadHref(instance, f.digest, f.name), download: f.name, text: 'download' }) : null)));
  }
  for (const s of dir.symlinks) {
    ul.appendChild(h('li', null, h('div', { class: 'row' }, h('span', { style: { width: '12px', display: 'inline-block' } }), h('span', { text: s.name }), h('span', { class: 'faint', text: '→ ' + s.target }))));
  }
  return ul;
}
