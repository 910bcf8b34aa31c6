// URL handling: dispatch endpoints, goaway targets, the WebSocket URL. Pure.

/** Where the next connection attempt starts. */
export type Target =
  | { kind: "dispatch"; url: string }
  | { kind: "ws"; url: string };

/**
 * A dispatch endpoint as given by the app: `http://host:8081` or `http://host:8081/v1/route`
 * (any path ending in `/v1/route`, any query kept). A bare origin or a path without `/v1/route`
 * gets it appended.
 */
export function normalizeDispatch(url: string, base?: string): string {
  const u = new URL(url, base);
  if (!/\/v1\/route\/?$/.test(u.pathname)) {
    u.pathname = u.pathname.replace(/\/+$/, "") + "/v1/route";
  }
  return u.toString();
}

/** The dispatch request for `room`: the endpoint with its `room` parameter set (replaced if present). */
export function routeRequestUrl(dispatch: string, room: string | undefined): string {
  const u = new URL(dispatch);
  if (room !== undefined) u.searchParams.set("room", room);
  else u.searchParams.delete("room");
  return u.toString();
}

/**
 * Where a `goaway` sends the client. The edge gives a dispatch endpoint (an absolute http URL
 * that already names the connection's room); this client sets `room` to the room it wants now
 * (it may have switched since), and copes with what older or differently configured edges send:
 * a relative URL (resolved against the edge's own address), an endpoint without `room`, or a
 * `ws://` URL (connected to directly, with `since`).
 */
export function goawayTarget(goawayUrl: string, room: string | undefined, wsUrl: string | undefined): Target | undefined {
  if (!goawayUrl) return undefined;
  let u: URL;
  try {
    u = new URL(goawayUrl, wsUrl ? httpOf(wsUrl) : undefined);
  } catch {
    return undefined;
  }
  if (u.protocol === "ws:" || u.protocol === "wss:") {
    if (room !== undefined) u.searchParams.set("room", room);
    return { kind: "ws", url: u.toString() };
  }
  if (u.protocol !== "http:" && u.protocol !== "https:") return undefined;
  return { kind: "dispatch", url: routeRequestUrl(normalizeDispatch(u.toString()), room) };
}

export interface WsParams {
  room?: string | undefined;
  since?: number | undefined;
  epoch?: string | undefined;
  token?: string | undefined;
}

/**
 * The URL to open: the edge's (fixed, or from dispatch) with `room`, `since`, `epoch` and `token`
 * set as this connection needs (what dispatch put there is replaced; a stale `since`/`epoch` is
 * removed for a fresh join). An http(s) URL is turned into ws(s).
 */
export function buildWsUrl(base: string, p: WsParams): string {
  const u = new URL(base);
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  const q = u.searchParams;
  if (p.room !== undefined) q.set("room", p.room);
  if (p.room !== undefined && p.since !== undefined) {
    q.set("since", String(p.since));
    if (p.epoch !== undefined) q.set("epoch", p.epoch);
    else q.delete("epoch");
  } else {
    q.delete("since");
    q.delete("epoch");
  }
  if (p.token !== undefined) q.set("token", p.token);
  return u.toString();
}

/** The `room` a ws URL joins at once, if any. */
export function roomOfUrl(url: string): string | undefined {
  try {
    return new URL(url).searchParams.get("room") ?? undefined;
  } catch {
    return undefined;
  }
}

/** The URL without its token (for logs and events). */
export function redactToken(url: string): string {
  try {
    const u = new URL(url);
    if (u.searchParams.has("token")) u.searchParams.set("token", "redacted");
    return u.toString();
  } catch {
    return url;
  }
}

function httpOf(ws: string): string {
  return ws.replace(/^ws(s?):/i, "http$1:");
}
