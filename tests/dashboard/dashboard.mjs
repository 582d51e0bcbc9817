// Drives headless Chromium through Kiln's web dashboard and checks that the
// pages show the actions the Rust test ran (crates/kiln/tests/dashboard.rs
// starts kiln, runs the actions, then this script).
//
// Environment:
//   KILN_URL          the dashboard, e.g. http://127.0.0.1:50052
//   KILN_FACTS        JSON file describing the actions that ran
//   SCREENSHOT_DIR    where to write one PNG per page
//   CHROMIUM          the browser (default /usr/bin/chromium)
//
// Protocol with the test (one line each): this script prints
// "KILN-TEST <event>" and waits for "go" on stdin where the test has to
// act (run an action while a page is open, stop the server).

import { chromium } from 'playwright-core';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import assert from 'node:assert/strict';

const base = process.env.KILN_URL;
const facts = JSON.parse(readFileSync(process.env.KILN_FACTS, 'utf8'));
const shots = process.env.SCREENSHOT_DIR;
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
assert.ok(base && shots, 'KILN_URL and SCREENSHOT_DIR must be set');

const STEP = 20_000; // bound of each wait

const lines = createInterface({ input: process.stdin });
const pending = [];
lines.on('line', l => { const w = pending.shift(); if (w) w(l.trim()); });
function signal(event) {
  console.log(`KILN-TEST ${event}`);
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`no answer from the test after ${event}`)), 120_000);
    pending.push(l => { clearTimeout(t); resolve(l); });
  });
}

function log(msg) {
  console.log(`dashboard test: ${msg}`);
}

const profile = mkdtempSync(join(tmpdir(), 'kiln-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath,
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  viewport: { width: 1440, height: 960 },
  acceptDownloads: true,
  timeout: 60_000,
  colorScheme: 'light',
});
context.setDefaultTimeout(STEP);
const page = context.pages()[0] || await context.newPage();
const consoleErrors = [];
page.on('console', m => { if (m.type() === 'error') consoleErrors.push(m.text()); });
page.on('pageerror', e => consoleErrors.push(String(e)));

async function shot(name) {
  await page.evaluate(() => window.scrollTo(0, 0)); // sticky header stays on top
  await page.waitForTimeout(300); // let charts lay out
  await page.screenshot({ path: join(shots, `${name}.png`), fullPage: true });
  log(`screenshot ${name}.png`);
}

async function go(hash) {
  await page.goto(`${base}/${hash}`);
}

async function text(selector) {
  return (await page.locator(selector).first().textContent()) ?? '';
}

const ok = facts.ok;
const fail = facts.fail;
const digestRoute = d => `_/${d.function}/${d.hash}/${d.size}`;

try {
  // ---- Overview -----------------------------------------------------------
  await go('#/');
  await page.waitForSelector('#overview-cards');
  // Every chart has data once actions ran (the AC lookups of their Executes,
  // CAS traffic, finished actions, store sizes): each draws lines, none is
  // left empty. Checked in one pass, as live updates redraw the page.
  const charts = ['chart-hit-rate', 'chart-cas', 'chart-actions', 'chart-stores'];
  await page.waitForFunction(ids => ids.every(id => document.querySelector(`#${id} svg.chart path`)), charts);
  assert.equal(await page.locator('.chart-empty').count(), 0, 'no chart is empty');
  const storeLegend = await text('#chart-stores .legend');
  for (const name of facts.stores) assert.ok(storeLegend.includes(name), `store usage chart shows ${name}: ${storeLegend}`);
  const cards = await text('#overview-cards');
  assert.match(cards, /AC hit rate/);
  const executed = Number((cards.match(/(\d+) executed/) || [])[1]);
  const cached = Number((cards.match(/(\d+) cached/) || [])[1]);
  assert.ok(executed >= facts.executed, `overview shows ${executed} executed actions, expected at least ${facts.executed}: ${cards}`);
  assert.ok(cached >= facts.cached, `overview shows ${cached} cache hits, expected at least ${facts.cached}: ${cards}`);
  assert.match(cards, /1 failed|[2-9] failed/, 'the failing action is counted');
  const stores = await text('#stores-table');
  for (const name of facts.stores) assert.ok(stores.includes(name), `stores table lists ${name}: ${stores}`);
  // The live indicator connects (SSE).
  await page.waitForSelector('#live[data-state="live"]');
  await shot('overview');

  // ---- Workers ------------------------------------------------------------
  await go('#/workers');
  await page.waitForSelector('#workers-grid .worker');
  const workers = await text('#workers-grid');
  assert.ok(workers.includes(facts.worker), `workers page shows ${facts.worker}: ${workers}`);
  assert.match(workers, /\d+ \/ \d+ busy/);
  assert.match(workers, /OSFamily=/, 'worker properties are shown');
  await shot('workers');

  // ---- Actions ------------------------------------------------------------
  await go('#/actions');
  await page.waitForSelector('#actions-table tbody tr');
  const actions = await text('#actions-table');
  for (const m of [ok.mnemonic, fail.mnemonic]) assert.ok(actions.includes(m), `actions list shows ${m}`);
  assert.ok(actions.includes('cache hit'), 'a cache hit is flagged');
  assert.ok(actions.includes(`exit ${fail.exit_code}`), `the failing action shows exit ${fail.exit_code}`);
  assert.ok(actions.includes(ok.digest.hash.slice(0, 12)), 'action digests are shown');
  assert.ok(actions.includes(facts.worker), 'the worker that ran each action is shown');
  assert.ok(await page.locator('#actions-table .phases').count() >= 2, 'executed actions have a phase breakdown');
  // Filtering to failures keeps only the failing action.
  await page.click('button[data-filter="failed"]');
  await page.waitForFunction(() => {
    const t = document.querySelector('#actions-table');
    return t && !t.textContent.includes('cache hit');
  });
  assert.ok((await text('#actions-table')).includes(fail.mnemonic));
  await page.click('button[data-filter=""]');
  await page.waitForFunction(m => document.querySelector('#actions-table')?.textContent.includes(m), ok.mnemonic);

  // ---- Live refresh: actions run after the page loaded appear -------------
  // One more than the worker has slots: while they sleep, one has to wait.
  await go('#/queue');
  await page.waitForSelector('h1');
  await page.evaluate(() => { window.__kilnNoReload = true; });
  await signal('run-live-action');
  // They show as running, with their worker, and queued, without a reload.
  await page.waitForFunction(m => ['#executing-table', '#queued-table'].every(t => document.querySelector(t)?.textContent.includes(m)),
    facts.live.mnemonic, { timeout: 30_000 });
  const running = await text('#executing-table');
  assert.ok(running.includes(facts.worker), `the running action names its worker: ${running}`);
  await shot('queue');
  await go('#/actions');
  // Every one of them finishes and is listed.
  await page.waitForFunction(({ m, n }) => [...document.querySelectorAll('#actions-table tbody tr')].filter(r => r.textContent.includes(m)).length >= n,
    { m: facts.live.mnemonic, n: facts.live.count }, { timeout: 60_000 });
  assert.equal(await page.evaluate(() => window.__kilnNoReload), true, 'the page was not reloaded');
  await shot('actions');

  // ---- Action page (by digest) -------------------------------------------
  await go(`#/action/${digestRoute(ok.digest)}`);
  await page.waitForSelector('#command-argv');
  assert.ok((await text('#command-argv')).includes(ok.command_snippet), 'the command is shown');
  assert.equal((await text('#exit-code')).trim(), '0');
  assert.equal((await text('#action-worker')).trim(), facts.worker);
  assert.ok((await text('#stdout')).includes(ok.stdout), 'stdout is shown');
  const envValue = await page.evaluate(name => [...document.querySelectorAll('#environment tbody tr')]
    .find(r => r.cells[0]?.textContent === name)?.cells[1]?.textContent, ok.env_name);
  assert.equal(envValue, ok.env_value, 'the environment is shown');
  assert.ok((await text('#outputs-table')).includes(ok.output_file), 'outputs are listed');
  const platform = await text('#platform');
  assert.ok(platform.includes('OSFamily') && platform.includes('Linux'), `the platform is shown: ${platform}`);
  // The input tree is browsable.
  const tree = page.locator('#input-tree');
  assert.ok((await tree.textContent()).includes(ok.input_file));
  await tree.locator('.toggle', { hasText: ok.input_dir + '/' }).click();
  await tree.getByText(ok.nested_file).waitFor();
  await shot('action');

  // ---- Failing action (by operation name) --------------------------------
  await go(`#/action/${fail.operation}`);
  await page.waitForSelector('#exit-code');
  assert.equal((await text('#exit-code')).trim(), String(fail.exit_code));
  assert.ok((await text('#stderr')).includes(fail.stderr), 'stderr of the failing action is shown');
  await shot('action-failed');

  // ---- CAS browser: a Directory and a downloaded blob ---------------------
  await go(`#/cas/${digestRoute(ok.input_root)}`);
  await page.waitForSelector('#cas-directory');
  assert.equal((await text('#cas-kind')).trim(), 'directory');
  const listing = await text('#cas-directory');
  assert.ok(listing.includes(ok.input_file) && listing.includes(ok.input_dir + '/'), `directory listing: ${listing}`);
  await shot('cas');
  await go(`#/cas/${digestRoute(ok.output_digest)}`);
  await page.waitForSelector('#cas-download');
  assert.ok((await text('#cas-preview')).includes(ok.output_content.trim()), 'the text preview shows the blob');
  const [download] = await Promise.all([page.waitForEvent('download'), page.click('#cas-download')]);
  const saved = join(profile, 'downloaded-blob');
  await download.saveAs(saved);
  assert.equal(readFileSync(saved, 'utf8'), ok.output_content, 'the downloaded blob has the right bytes');
  // A malformed digest is a clear error, not a crash.
  await go('#/cas/_/sha256/not-a-hash/12');
  await page.waitForSelector('.error-box');
  assert.match(await text('.error-box'), /bad digest/);

  // ---- Dark theme ---------------------------------------------------------
  await go('#/');
  await page.waitForSelector('#overview-cards');
  await page.click('#theme');
  await shot('overview-dark');
  await page.click('#theme'); // back to light for the next visitor of this profile

  assert.deepEqual(consoleErrors.filter(e => !/Failed to load resource/.test(e)), [], 'no JavaScript errors');

  // ---- Shutdown with a live tab open --------------------------------------
  await go('#/');
  await page.waitForSelector('#live[data-state="live"]');
  await signal('stop-server');
  log('server stopped with a tab open');
  console.log('KILN-TEST passed');
} catch (e) {
  console.log(`KILN-TEST failed: ${e.stack || e}`);
  try { await page.screenshot({ path: join(shots, 'failure.png'), fullPage: true }); } catch (_) { /* ignore */ }
  process.exitCode = 1;
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
  lines.close();
}
