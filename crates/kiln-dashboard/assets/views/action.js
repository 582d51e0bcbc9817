// One action: command, environment, platform, input tree, outputs,
// stdout/stderr, exit code, worker and timing.

import { getJSON } from '../api.js';
import { h, mount, panel, table, empty, errorBox } from '../dom.js';
import { phaseBar, phaseLegend } from '../chart.js';
import { bytes, dateTime, dur, casHref, downloadHref, digestText } from '../format.js';
import { dirTree, fetchDirectory } from './tree.js';
import { statusPill } from './actions.js';

function apiPath(parts) {
  const enc = encodeURIComponent;
  if (parts.length === 4 && /^[0-9a-f]+$/.test(parts[2]) && /^\d+$/.test(parts[3])) {
    return `/api/action/${parts.map(enc).join('/')}`;
  }
  return `/api/action?operation=${enc(parts.join('/'))}`;
}

function kv(rows) {
  return h('table', { class: 'kv' }, h('tbody', null, rows.filter(Boolean).map(([k, v]) => h('tr', null, h('td', { text: k }), h('td', null, v)))));
}

function props(list, emptyText) {
  return list && list.length
    ? table([{ title: 'Name' }, { title: 'Value' }], list.map(p => h('tr', null, h('td', { class: 'mono', text: p.name }), h('td', { class: 'mono', text: p.value }))))
    : empty(emptyText);
}

function shellQuote(a) {
  return /^[A-Za-z0-9_\-+=/.,:@%]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`;
}

function streamPanel(title, id, s, inst) {
  if (!s) return panel(title, h('pre', { class: 'out empty-out', id, text: '(none)' }));
  const extra = s.digest ? h('span', { class: 'muted' }, `${bytes(s.size)} · `, h('a', { href: downloadHref(inst, s.digest, title.toLowerCase() + '.txt'), text: 'download' }), ' · ', h('a', { href: casHref(inst, s.digest), text: 'CAS' })) : null;
  return panel(title, [
    s.missing ? h('div', { class: 'note', text: 'This blob is no longer in the CAS.' }) : null,
    h('pre', { class: 'out' + (s.preview ? '' : ' empty-out'), id, text: s.preview || '(empty)' }),
    s.truncated ? h('div', { class: 'muted', style: { marginTop: '6px' }, text: `Showing the first ${bytes(s.preview.length)} of ${bytes(s.size)}; download for the rest.` }) : null,
  ], { extra });
}

function outputsPanel(r, inst) {
  const rows = [];
  for (const f of r.output_files) {
    rows.push(h('tr', null,
      h('td', null, h('span', { class: 'kind muted', text: 'file' })),
      h('td', { class: 'mono' }, f.digest ? h('a', { href: casHref(inst, f.digest), text: f.path }) : f.path, f.executable ? h('span', { class: 'faint', text: ' *' }) : null),
      h('td', { class: 'num', text: f.digest ? bytes(f.digest.size) : '–' }),
      h('td', null, f.digest ? h('a', { href: downloadHref(inst, f.digest, f.path), text: 'download' }) : null)));
  }
  for (const d of r.output_directories) {
    rows.push(h('tr', null,
      h('td', null, h('span', { class: 'kind muted', text: 'dir' })),
      h('td', { class: 'mono' }, d.tree_digest ? h('a', { href: casHref(inst, d.tree_digest, 'tree'), text: d.path + '/' }) : d.path + '/'),
      h('td', { class: 'num', text: d.tree_digest ? bytes(d.tree_digest.size) + ' tree' : '–' }),
      h('td', null, d.tree_digest ? h('a', { href: casHref(inst, d.tree_digest, 'tree'), text: 'browse' }) : null)));
  }
  for (const s of r.output_symlinks) {
    rows.push(h('tr', null, h('td', null, h('span', { class: 'kind muted', text: 'link' })), h('td', { class: 'mono', text: `${s.path} → ${s.target}` }), h('td'), h('td')));
  }
  return panel('Outputs', rows.length ? table([{ title: '' }, { title: 'Path' }, { title: 'Size', num: true }, { title: '' }], rows, { id: 'outputs-table' }) : empty('No outputs.'), { flush: true });
}

function build(a) {
  const inst = a.instance;
  const r = a.result;
  const rec = a.record;
  const md = r?.metadata || rec?.metadata;
  const timing = md?.timing;
  const mnemonic = rec?.mnemonic || a.live?.mnemonic;
  const target = rec?.target_id || a.live?.target_id;
  const worker = r?.worker || rec?.worker || a.live?.worker;
  let status;
  if (a.live) status = h('span', { class: 'pill ' + (a.live.state === 'executing' ? 'warn' : 'neutral'), text: a.live.state === 'executing' ? `executing · ${a.live.phase}` : 'queued' });
  else if (r) status = statusPill({ cached: r.cached_result || (rec?.cached ?? false), status_code: r.status_code, status: r.status, exit_code: r.exit_code });
  else if (rec) status = statusPill(rec);
  else status = h('span', { class: 'pill neutral', text: a.state });

  const cmd = a.command;
  const summary = h('div', { class: 'panel grid summary section', id: 'action-summary' },
    h('div', null, h('div', { class: 'k', text: 'Exit code' }), h('div', { class: 'v', id: 'exit-code', text: r ? String(r.exit_code) : (rec?.exit_code ?? '–') })),
    h('div', null, h('div', { class: 'k', text: 'Worker' }), h('div', { class: 'v', id: 'action-worker', text: worker || '–' })),
    h('div', null, h('div', { class: 'k', text: 'Duration' }), h('div', { class: 'v', text: dur(timing?.total_ms ?? timing?.worker_ms) })),
    h('div', null, h('div', { class: 'k', text: 'Result' }), h('div', { class: 'v', text: r ? (r.source === 'operation' ? 'from the operation' : 'from the Action Cache') : '–' })),
    h('div', null, h('div', { class: 'k', text: 'Completed' }), h('div', { class: 'v', text: rec ? dateTime(rec.completed_at) : (md?.worker_completed ? dateTime(md.worker_completed) : '–') })));

  const timingPanel = timing && (timing.total_ms !== null || timing.worker_ms !== null)
    ? panel('Timing', [phaseBar(timing, true), h('div', { style: { margin: '8px 0' } }, phaseLegend()),
      kv([
        ['Queued', dur(timing.queued_ms)],
        ['Fetching inputs', dur(timing.fetch_ms)],
        ['Executing', dur(timing.execute_ms)],
        ['Uploading outputs', dur(timing.upload_ms)],
        ['Total', dur(timing.total_ms)],
        md?.queued ? ['Queued at', dateTime(md.queued)] : null,
      ])], { extra: rec?.cached ? h('span', { class: 'pill cache', text: 'timing of the run that produced the cached result' }) : null })
    : null;

  const request = rec || a.live;
  const requestPanel = panel('Request', kv([
    ['Instance', h('span', { class: 'mono', text: inst === '_' ? '"" (default)' : inst })],
    ['Action digest', h('a', { class: 'digest', href: casHref(inst, a.digest), text: `${a.digest.function}:${digestText(a.digest)}` })],
    a.operation ? ['Operation', h('span', { class: 'mono', text: a.operation })] : null,
    ['Mnemonic', mnemonic || '–'],
    ['Target', target || '–'],
    ['Invocation', h('span', { class: 'mono', text: request?.invocation_id || '–' })],
    rec?.tool ? ['Tool', rec.tool] : null,
    a.action ? ['Timeout', a.action.timeout_ms ? dur(a.action.timeout_ms) : 'server default'] : null,
    a.action ? ['Cacheable', a.action.do_not_cache ? 'no (do_not_cache)' : 'yes'] : null,
    r?.status_code ? ['Status', h('span', { class: 'pill bad', text: `${r.status}${r.status_message ? ': ' + r.status_message : ''}` })] : null,
    r?.message ? ['Message', r.message] : null,
  ]));

  const commandPanel = panel('Command', cmd ? [
    h('pre', { class: 'argv', id: 'command-argv', text: cmd.arguments.map(shellQuote).join(' ') }),
    h('div', { style: { marginTop: '10px' } }, kv([
      ['Working directory', h('span', { class: 'mono', text: cmd.working_directory || '(input root)' })],
      ['Output paths', h('span', { class: 'mono', text: [...cmd.output_paths, ...cmd.output_files, ...cmd.output_directories].join(', ') || '–' })],
      a.action?.command_digest ? ['Command digest', h('a', { class: 'digest', href: casHref(inst, a.action.command_digest), text: digestText(a.action.command_digest) })] : null,
    ])),
  ] : empty('The Command is not available.'));

  const platform = a.action?.platform?.length ? a.action.platform : (cmd?.platform || []);
  const inputPanel = panel('Input tree', a.input_root
    ? [h('div', { class: 'muted', style: { marginBottom: '6px' } }, 'root ', h('a', { class: 'digest', href: casHref(inst, a.action.input_root_digest), text: digestText(a.action.input_root_digest) })), dirTree(inst, a.input_root, fetchDirectory(inst))]
    : empty('The input root is not available.'), { id: 'input-tree' });

  return [
    h('div', { class: 'page-head' },
      h('h1', { text: mnemonic || 'Action' }), status,
      target ? h('span', { class: 'sub mono', text: target }) : null),
    a.notes.map(n => h('div', { class: 'note', text: n })),
    summary,
    h('div', { class: 'grid two-col section' }, requestPanel, timingPanel || panel('Timing', empty(a.live ? 'Running…' : 'No timing recorded.'))),
    h('div', { class: 'grid two-col section' }, commandPanel, h('div', { class: 'grid', style: { alignContent: 'start' } },
      panel('Environment', props(cmd?.environment, 'No environment variables.'), { flush: true, id: 'environment' }),
      panel('Platform', props(platform, 'Default platform (no properties).'), { flush: true, id: 'platform' }))),
    r ? h('div', { class: 'grid two-col section' }, streamPanel('stdout', 'stdout', r.stdout, inst), streamPanel('stderr', 'stderr', r.stderr, inst)) : null,
    r ? h('div', { class: 'section' }, outputsPanel(r, inst)) : null,
    inputPanel,
  ];
}

export async function render(el, parts) {
  if (!parts.length) throw new Error('No action given: open one from the Actions or Queue page.');
  const path = apiPath(parts);
  let a = await getJSON(path);
  mount(el, build(a));
  let busy = false;
  let seq = null; // the latest finished action's number when last fetched
  return {
    title: 'Action',
    async onState(st) {
      // Follow a running action until it completes (every tick: its phase
      // changes). An action in no known state, e.g. opened from the CAS
      // browser, is fetched again only when some action has finished.
      if (busy || !(a.live || (a.state === 'unknown' && st.seq !== seq))) return;
      seq = st.seq;
      busy = true;
      try {
        const next = await getJSON(path);
        if (el.isConnected && (next.state !== a.state || next.live?.phase !== a.live?.phase)) {
          a = next;
          mount(el, build(a));
        }
      } catch (e) {
        if (e.status !== 404) mount(el, errorBox(e));
      } finally {
        busy = false;
      }
    },
  };
}
