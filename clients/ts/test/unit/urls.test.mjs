import { test } from "node:test";
import assert from "node:assert/strict";
import { buildWsUrl, goawayTarget, normalizeDispatch, routeRequestUrl } from "../../dist/index.js";

test("dispatch endpoints: a bare origin gets /v1/route", () => {
  assert.equal(normalizeDispatch("http://10.0.0.1:8081"), "http://10.0.0.1:8081/v1/route");
  assert.equal(normalizeDispatch("http://d.example/api/"), "http://d.example/api/v1/route");
  assert.equal(normalizeDispatch("https://d.example/v1/route?x=1"), "https://d.example/v1/route?x=1");
  assert.equal(normalizeDispatch("/v1/route", "http://page.example/live/"), "http://page.example/v1/route");
});

test("route request sets or replaces room", () => {
  assert.equal(routeRequestUrl("http://d/v1/route", "a b"), "http://d/v1/route?room=a+b");
  assert.equal(routeRequestUrl("http://d/v1/route?room=old&x=1", "new"), "http://d/v1/route?room=new&x=1");
  assert.equal(routeRequestUrl("http://d/v1/route?room=old", undefined), "http://d/v1/route");
});

test("goaway url with the edge's room: the room the client is in now wins", () => {
  const t = goawayTarget("http://10.0.0.7:8081/v1/route?room=first", "second", "ws://10.0.0.7:8080/ws?room=first");
  assert.deepEqual(t, { kind: "dispatch", url: "http://10.0.0.7:8081/v1/route?room=second" });
});

test("goaway url without a room (older edges): the room is added", () => {
  const t = goawayTarget("http://10.0.0.7:8081/v1/route", "lobby", undefined);
  assert.deepEqual(t, { kind: "dispatch", url: "http://10.0.0.7:8081/v1/route?room=lobby" });
});

test("goaway url that is a bare origin or relative is made a route endpoint", () => {
  assert.equal(goawayTarget("http://d.example:9000", "r", undefined).url, "http://d.example:9000/v1/route?room=r");
  assert.equal(
    goawayTarget("/v1/route", "r", "wss://edge.example/ws?room=r&token=t").url,
    "https://edge.example/v1/route?room=r",
  );
});

test("goaway url that is a ws URL is connected to directly", () => {
  const t = goawayTarget("ws://e2:8080/ws", "r", undefined);
  assert.deepEqual(t, { kind: "ws", url: "ws://e2:8080/ws?room=r" });
});

test("goaway url that is garbage is ignored", () => {
  assert.equal(goawayTarget("", "r", undefined), undefined);
  assert.equal(goawayTarget("mailto:x@y", "r", undefined), undefined);
  assert.equal(goawayTarget("::::", "r", undefined), undefined);
});

test("ws URL: room, since, epoch, token set; stale ones removed", () => {
  const u = new URL(
    buildWsUrl("ws://e:8080/ws?room=x&since=5&epoch=old", { room: "lobby", since: 41, epoch: "abc", token: "T" }),
  );
  assert.equal(u.searchParams.get("room"), "lobby");
  assert.equal(u.searchParams.get("since"), "41");
  assert.equal(u.searchParams.get("epoch"), "abc");
  assert.equal(u.searchParams.get("token"), "T");
  const fresh = new URL(buildWsUrl("ws://e:8080/ws?room=x&since=5&epoch=old", { room: "lobby" }));
  assert.equal(fresh.searchParams.get("since"), null);
  assert.equal(fresh.searchParams.get("epoch"), null);
  assert.equal(new URL(buildWsUrl("https://e/ws", {})).protocol, "wss:");
  const noEpoch = new URL(buildWsUrl("ws://e/ws?epoch=old", { room: "r", since: 3 }));
  assert.equal(noEpoch.searchParams.get("epoch"), null, "a since without epoch sends no stale epoch");
});
