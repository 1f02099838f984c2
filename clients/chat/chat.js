// The chat page's logic: a demo token per name from POST /demo/token, one
// chorus client, one joined room per name in ?rooms=, messages kept in seq
// order (history on first join and when scrolling up, reloaded when the
// client says recovery was impossible), who is online, the connection state.

import { ChorusClient } from '/demo/chorus.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const roomNames = (params.get('rooms') || 'lobby')
  .split(',')
  .map((r) => r.trim())
  .filter(Boolean);
const PAGE = 50;

/** Per room: messages by seq, whether older history remains, unread count. */
const rooms = new Map();
let active = roomNames[0];
let me = null;
let client = null;

async function getToken() {
  const response = await fetch('/demo/token', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ name: me }),
  });
  if (!response.ok) throw new Error(`demo token: ${response.status}`);
  return (await response.json()).token;
}

function start(name) {
  me = name;
  $('login').hidden = true;
  $('chat').hidden = false;
  document.title = `${name} · chorus chat`;
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  client = new ChorusClient({ url: `${scheme}://${location.host}/ws`, getToken });
  window.chorusClient = client;
  client.on('state', (state) => {
    $('state').textContent = state;
    $('state').dataset.state = state;
  });
  for (const name of roomNames) joinRoom(name);
  renderTabs();
  show(active);
}

function joinRoom(name) {
  const room = client.join(name, { presence: true });
  const state = { room, messages: new Map(), oldest: undefined, more: true, unread: 0, members: [], count: 0, loading: false };
  rooms.set(name, state);
  room.on('message', (m) => {
    add(state, m);
    if (name !== active) {
      state.unread += 1;
      renderTabs();
    }
  });
  room.ready.then(() => loadOlder(state));
  room.on('recovery', (r) => {
    if (r.recovered) return;
    // Messages may be missing: start the room over from its history.
    state.messages.clear();
    state.oldest = undefined;
    state.more = true;
    if (name === active) {
      $('messages').replaceChildren();
      notice('Some messages could not be recovered; reloaded the room.');
    }
    loadOlder(state);
  });
  room.on('presence', (p) => {
    state.members = p.members.map((m) => m.sub);
    state.count = p.count;
    if (name === active) renderMembers(state);
  });
  room.on('error', (e) => name === active && notice(`Cannot join ${name}: ${e.message}`));
}

/** One page of older messages, before the oldest one shown. */
async function loadOlder(state) {
  if (state.loading || !state.more) return;
  state.loading = true;
  try {
    const page = await state.room.history({ before: state.oldest, limit: PAGE });
    if (page.length < PAGE) state.more = false;
    const list = $('messages');
    const keepFromBottom = list.scrollHeight - list.scrollTop;
    for (const m of page) add(state, m);
    if (state.room.name === active && state.oldest !== undefined) list.scrollTop = list.scrollHeight - keepFromBottom;
  } catch (e) {
    notice(`History: ${e.message}`);
  } finally {
    state.loading = false;
  }
}

function add(state, m) {
  if (state.messages.has(m.seq)) return;
  state.messages.set(m.seq, m);
  if (state.oldest === undefined || m.seq < state.oldest) state.oldest = m.seq;
  if (state.room.name !== active) return;
  const list = $('messages');
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const item = render(m);
  const after = [...list.children].find((li) => Number(li.dataset.seq) > m.seq);
  list.insertBefore(item, after || null);
  if (atBottom && !after) list.scrollTop = list.scrollHeight;
}

function render(m) {
  const li = document.createElement('li');
  li.dataset.seq = m.seq;
  if (m.from === me) li.className = 'mine';
  const from = document.createElement('span');
  from.className = 'from';
  from.textContent = m.from;
  const time = document.createElement('time');
  const date = new Date(m.ts);
  time.dateTime = date.toISOString();
  time.textContent = date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  const text = document.createElement('span');
  text.className = 'text';
  text.textContent = typeof m.body === 'object' && m.body !== null && 'text' in m.body ? String(m.body.text) : JSON.stringify(m.body);
  li.append(from, time, text);
  return li;
}

function show(name) {
  active = name;
  const state = rooms.get(name);
  state.unread = 0;
  const list = $('messages');
  list.replaceChildren(...[...state.messages.values()].sort((a, b) => a.seq - b.seq).map(render));
  list.scrollTop = list.scrollHeight;
  renderMembers(state);
  renderTabs();
}

function renderTabs() {
  $('rooms').replaceChildren(
    ...roomNames.map((name) => {
      const button = document.createElement('button');
      button.type = 'button';
      button.textContent = `#${name}`;
      button.setAttribute('aria-current', String(name === active));
      const unread = rooms.get(name)?.unread;
      if (unread) {
        const badge = document.createElement('span');
        badge.className = 'unread';
        badge.textContent = unread;
        button.append(badge);
      }
      button.onclick = () => show(name);
      return button;
    }),
  );
}

function renderMembers(state) {
  $('count').textContent = state.count ? `(${state.count})` : '';
  $('members').replaceChildren(
    ...state.members.map((sub) => {
      const li = document.createElement('li');
      li.textContent = sub;
      return li;
    }),
  );
}

function notice(text) {
  $('notice').textContent = text;
  $('notice').hidden = false;
  setTimeout(() => ($('notice').hidden = true), 5000);
}

$('messages').addEventListener('scroll', () => {
  if ($('messages').scrollTop < 40) loadOlder(rooms.get(active));
});

$('compose').addEventListener('submit', async (event) => {
  event.preventDefault();
  const input = $('text');
  const text = input.value.trim();
  if (!text) return;
  input.value = '';
  try {
    await client.send(active, { text });
  } catch (e) {
    notice(`Not sent (${e.code}): ${e.message}`);
    input.value = text;
  }
});

$('login').addEventListener('submit', (event) => {
  event.preventDefault();
  const name = $('name').value.trim();
  localStorage.setItem('chorus-name', name);
  start(name);
});

const named = params.get('name') || localStorage.getItem('chorus-name');
if (named) start(named);
else $('login').hidden = false;
