// Live updates: one EventSource on /api/events; if it cannot connect,
// polling /api/overview every 2 s stands in. Views subscribe with onState.

const listeners = new Set();
let source = null;
let pollTimer = null;
let lastState = null;
let failures = 0;

function setIndicator(state) {
  const el = document.getElementById('live');
  const text = document.getElementById('live-text');
  if (!el) return;
  el.dataset.state = state;
  text.textContent = { live: 'live', polling: 'polling', offline: 'offline', connecting: 'connecting' }[state] || state;
}

function emit(state) {
  lastState = state;
  for (const fn of listeners) {
    try { fn(state); } catch (e) { console.error(e); }
  }
  const q = document.getElementById('nav-queue');
  const w = document.getElementById('nav-workers');
  if (q) { q.hidden = !(state.queued + state.executing); q.textContent = String(state.queued + state.executing); q.classList.toggle('hot', state.executing > 0); }
  if (w) { w.hidden = !state.workers; w.textContent = String(state.workers); }
}

async function poll() {
  try {
    const res = await fetch('/api/overview');
    const o = await res.json();
    setIndicator('polling');
    emit({ now: o.now, seq: o.totals.actions_executed + o.totals.actions_cached, sampled_at: o.now, queued: o.live?.queued ?? 0, executing: o.live?.executing ?? 0, workers: o.live?.connected_workers ?? 0 });
  } catch (_) {
    setIndicator('offline');
  }
}

function startPolling() {
  if (pollTimer) return;
  poll();
  pollTimer = setInterval(poll, 2000);
}

function connect() {
  if (typeof EventSource === 'undefined') { startPolling(); return; }
  source = new EventSource('/api/events');
  source.addEventListener('state', ev => {
    failures = 0;
    if (pollTimer) { clearInterval(pollTimer); pollTimer = null; }
    setIndicator('live');
    try { emit(JSON.parse(ev.data)); } catch (e) { console.error(e); }
  });
  source.onerror = () => {
    failures++;
    setIndicator(failures > 2 ? 'offline' : 'connecting');
    if (failures > 2) startPolling();
  };
}

export function startLive() {
  if (!source && !pollTimer) connect();
}

/** Calls fn with every state event (and the latest one at once); returns an unsubscribe function. */
export function onState(fn) {
  listeners.add(fn);
  if (lastState) fn(lastState);
  return () => listeners.delete(fn);
}
