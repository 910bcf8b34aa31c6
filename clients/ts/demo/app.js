// The live-room demo: chat list, gift banner, connection state, gap/reset notices.
// Built on the client's compiled ESM (../dist/index.js): serve clients/ts/ and open /demo/.
import { RoomcastClient } from "../dist/index.js";

const q = new URLSearchParams(location.search);
const room = q.get("room") ?? "lobby";
const dispatch = q.get("dispatch")?.split(",").filter(Boolean);
const url = q.get("url") ?? undefined;
const num = (k) => (q.has(k) ? Number(q.get(k)) : undefined);

const $ = (id) => document.getElementById(id);
$("room").textContent = room;

const client = new RoomcastClient({
  dispatch: dispatch ?? (url ? undefined : `${location.protocol}//${location.hostname}:8081`),
  url,
  room,
  minReconnectDelayMs: num("min_delay_ms"),
  maxReconnectDelayMs: num("max_delay_ms"),
  livenessTimeoutMs: num("liveness_ms"),
});

// What the page shows, also read by the end-to-end test.
const demo = {
  client,
  state: client.state,
  gifts: [],
  chats: [],
  notices: [],
  joins: [],
  errors: [],
  edges: [],
};
window.roomcastDemo = demo;

const MAX_LINES = 200;
function addLine(list, li) {
  list.appendChild(li);
  while (list.children.length > MAX_LINES) list.firstChild.remove();
  list.scrollTop = list.scrollHeight;
}

function describe(body) {
  if (body == null) return "";
  if (typeof body !== "object") return String(body);
  if (typeof body.name === "string") return `${body.name}${body.count ? ` ×${body.count}` : ""}`;
  return Object.entries(body)
    .map(([k, v]) => (typeof v === "number" ? `${k} ×${v}` : `${k}: ${JSON.stringify(v)}`))
    .join(", ");
}

function notice(kind, text) {
  demo.notices.push({ kind, text, at: Date.now() });
  const li = document.createElement("li");
  li.className = kind;
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  addLine($("notices"), li);
}

function figures() {
  const p = client.position(room);
  $("gift-count").textContent = String(demo.gifts.length);
  $("last-seq").textContent = p ? String(p.seq) : "–";
  $("epoch").textContent = p?.epoch ?? "–";
  $("recovered").textContent = String(demo.gifts.filter((g) => g.recovered).length);
  $("reconnects").textContent = String(client.stats.reconnects);
}

client.on("state", ({ state }) => {
  demo.state = state;
  const el = $("state");
  el.textContent = state;
  el.className = `state ${state}`;
  figures();
});

client.on("connected", (c) => {
  demo.edges.push(c.url);
  $("edge").textContent = c.edge ? `edge ${c.edge}` : new URL(c.url).host;
});

client.on("joined", (j) => {
  demo.joins.push(j);
  if (j.resumed) notice("info", `rejoined ${j.room} from seq ${j.since} (room at ${j.seq})`);
  figures();
});

let bannerTimer;
client.on("gift", (m) => {
  demo.gifts.push({ seq: m.seq, epoch: m.epoch, user: m.user, body: m.body, recovered: m.recovered });
  const text = `${m.user} sent ${describe(m.body)}`;
  const banner = $("banner");
  banner.classList.remove("idle");
  banner.classList.add("flash");
  $("banner-text").textContent = text;
  clearTimeout(bannerTimer);
  bannerTimer = setTimeout(() => banner.classList.remove("flash"), 250);
  const li = document.createElement("li");
  li.className = "gift";
  li.innerHTML = `<span class="user"></span><span class="text"></span>`;
  li.querySelector(".user").textContent = m.user;
  li.querySelector(".text").textContent = `sent ${describe(m.body)} (#${m.seq})`;
  li.dataset.seq = String(m.seq);
  if (m.recovered) li.insertAdjacentHTML("beforeend", `<span class="rec">recovered</span>`);
  addLine($("chat"), li);
  figures();
});

client.on("chat", (m) => {
  demo.chats.push({ seq: m.seq, user: m.user, body: m.body });
  const li = document.createElement("li");
  li.innerHTML = `<span class="user"></span><span class="text"></span>`;
  li.querySelector(".user").textContent = m.user;
  li.querySelector(".text").textContent = typeof m.body === "string" ? m.body : JSON.stringify(m.body);
  li.dataset.seq = String(m.seq);
  addLine($("chat"), li);
  figures();
});

// A moderator deleted a message: it leaves the list.
client.on("deleted", (d) => {
  if (d.room === client.room) $("chat").querySelector(`li[data-seq="${d.seq}"]`)?.remove();
});

client.on("online", (o) => {
  document.getElementById("online").textContent = String(o.count);
});
client.on("gap", (g) => notice("gap", `gap: messages ${g.from}–${g.to} of ${g.room} could not be recovered`));
client.on("reset", (r) =>
  notice("reset", `reset: ${r.room} restarted its numbering (${r.previousEpoch ?? "?"} → ${r.epoch}, ${r.reason})`),
);
client.on("goaway", (g) => notice("goaway", `edge going away (${g.reason}): moving in ${g.reconnectAfterMs} ms`));
client.on("disconnected", (d) =>
  notice(
    "info",
    `disconnected (${d.code}${d.reason ? ` ${d.reason}` : ""})${d.reconnect ? `, retry in ${d.delayMs} ms` : ": not reconnecting"}`,
  ),
);
client.on("error", (e) => {
  demo.errors.push({ code: e.code, source: e.source, message: e.message });
  notice("error", `${e.source} error ${e.code}: ${e.message}`);
});

$("say").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const input = $("say-text");
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  try {
    await client.publish("chat", text);
  } catch (e) {
    notice("error", `chat not sent: ${e.code ?? e}`);
  }
});

client.connect();
