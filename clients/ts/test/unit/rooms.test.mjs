import { test } from "node:test";
import assert from "node:assert/strict";
import { RoomTracker } from "../../dist/index.js";
import { batch } from "./fakes.mjs";

const seqsOf = (events) => events.filter((e) => e.type === "message").map((e) => e.message.seq);

test("fresh join: live messages delivered, resume point is the last delivered", () => {
  const t = new RoomTracker();
  assert.equal(t.resumeFor("r"), undefined);
  t.beginJoin("r", undefined);
  const j = t.handle({ type: "joined", room: "r", seq: 40, epoch: "E1" });
  assert.deepEqual(j, [{ type: "joined", info: { room: "r", seq: 40, epoch: "E1", since: undefined, resumed: false } }]);
  assert.deepEqual(t.resumeFor("r"), { since: 40, epoch: "E1" }, "nothing delivered yet: resume from the join point");
  assert.deepEqual(seqsOf(t.handle(batch("r", 41, 42))), [41, 42]);
  assert.deepEqual(t.resumeFor("r"), { since: 42, epoch: "E1" });
});

test("dedup: a seq at or below the last delivered never reaches the app again", () => {
  const t = new RoomTracker();
  t.beginJoin("r", undefined);
  t.handle({ type: "joined", room: "r", seq: 0, epoch: "E" });
  assert.deepEqual(seqsOf(t.handle(batch("r", 1, 2, 3))), [1, 2, 3]);
  assert.deepEqual(seqsOf(t.handle(batch("r", 2, 3, 4))), [4], "overlapping batch");
  assert.deepEqual(seqsOf(t.handle(batch("r", 4))), [], "same batch twice");
  assert.deepEqual(seqsOf(t.handle(batch("r", 1))), [], "older seq");
  assert.equal(t.duplicates, 4);
});

test("resume across a reconnect: replay marked recovered, seam duplicates dropped", () => {
  const t = new RoomTracker();
  t.beginJoin("r", undefined);
  t.handle({ type: "joined", room: "r", seq: 0, epoch: "E" });
  t.handle(batch("r", 1, 2, 3));
  t.endSession(); // the connection dropped
  assert.deepEqual(seqsOf(t.handle(batch("r", 4))), [], "nothing is delivered between connections");
  const resume = t.resumeFor("r");
  assert.deepEqual(resume, { since: 3, epoch: "E" });
  t.beginJoin("r", resume);
  const j = t.handle({ type: "joined", room: "r", seq: 6, epoch: "E" });
  assert.equal(j[0].info.resumed, true);
  assert.equal(j[0].info.since, 3);
  // History replay 3..6 (3 again from an overlap), then live 6..7 (6 twice at the seam).
  const ev = [...t.handle(batch("r", 3, 4, 5, 6)), ...t.handle(batch("r", 6, 7))];
  const msgs = ev.map((e) => e.message);
  assert.deepEqual(
    msgs.map((m) => [m.seq, m.recovered]),
    [
      [4, true],
      [5, true],
      [6, true],
      [7, false],
    ],
  );
  assert.equal(t.duplicates, 2);
});

test("gap: reported explicitly, and the next resume does not ask for it again", () => {
  const t = new RoomTracker();
  t.beginJoin("r", undefined);
  t.handle({ type: "joined", room: "r", seq: 0, epoch: "E" });
  t.handle(batch("r", 1, 2));
  t.endSession();
  t.beginJoin("r", t.resumeFor("r"));
  const ev = t.handle({ type: "gap", room: "r", from: 3, to: 10 });
  assert.deepEqual(ev, [{ type: "gap", info: { room: "r", from: 3, to: 10 } }]);
  t.handle({ type: "joined", room: "r", seq: 12, epoch: "E" });
  assert.deepEqual(seqsOf(t.handle(batch("r", 11, 12, 13))), [11, 12, 13]);
  t.endSession();
  assert.deepEqual(t.resumeFor("r"), { since: 13, epoch: "E" });
  // Lost connection right after the gap, before any message: resume past the gap.
  const t2 = new RoomTracker();
  t2.beginJoin("r", undefined);
  t2.handle({ type: "joined", room: "r", seq: 2, epoch: "E" });
  t2.endSession();
  t2.beginJoin("r", t2.resumeFor("r"));
  t2.handle({ type: "gap", room: "r", from: 3, to: 10 });
  t2.endSession();
  assert.deepEqual(t2.resumeFor("r"), { since: 10, epoch: "E" });
});

test("reset: the new numbering's messages pass even though their seqs are lower", () => {
  const t = new RoomTracker();
  t.beginJoin("r", undefined);
  t.handle({ type: "joined", room: "r", seq: 0, epoch: "OLD" });
  t.handle(batch("r", ...Array.from({ length: 50 }, (_, i) => i + 1)));
  t.endSession();
  t.beginJoin("r", t.resumeFor("r"));
  const r = t.handle({ type: "reset", room: "r", epoch: "NEW", seq: 0, reason: "epoch" });
  assert.deepEqual(r, [
    { type: "reset", info: { room: "r", epoch: "NEW", seq: 0, reason: "epoch", previousEpoch: "OLD", previousSeq: 50 } },
  ]);
  const j = t.handle({ type: "joined", room: "r", seq: 3, epoch: "NEW" });
  assert.equal(j.length, 1, "no second reset for the joined that follows a reset");
  const ev = t.handle(batch("r", 1, 2, 3, 4));
  assert.deepEqual(
    ev.map((e) => [e.message.seq, e.message.epoch, e.message.recovered]),
    [
      [1, "NEW", true],
      [2, "NEW", true],
      [3, "NEW", true],
      [4, "NEW", false],
    ],
  );
  assert.deepEqual(t.resumeFor("r"), { since: 4, epoch: "NEW" });
});

test("a joined in another epoch without a reset first is reported as a reset", () => {
  const t = new RoomTracker();
  t.beginJoin("r", undefined);
  t.handle({ type: "joined", room: "r", seq: 0, epoch: "OLD" });
  t.handle(batch("r", 1, 2, 3));
  t.endSession();
  t.beginJoin("r", t.resumeFor("r"));
  const ev = t.handle({ type: "joined", room: "r", seq: 1, epoch: "NEW" });
  assert.deepEqual(
    ev.map((e) => e.type),
    ["reset", "joined"],
  );
  assert.equal(ev[0].info.reason, "epoch_changed");
  assert.deepEqual(seqsOf(t.handle(batch("r", 1, 2))), [1, 2]);
});

test("messages of a room the client is not in (any more) are not delivered", () => {
  const t = new RoomTracker();
  t.beginJoin("a", undefined);
  t.handle({ type: "joined", room: "a", seq: 0, epoch: "E" });
  t.beginJoin("b", undefined); // switched
  assert.deepEqual(seqsOf(t.handle(batch("a", 1))), []);
  assert.deepEqual(seqsOf(t.handle(batch("b", 1))), [], "b not joined yet");
  t.handle({ type: "joined", room: "b", seq: 0, epoch: "F" });
  assert.deepEqual(seqsOf(t.handle(batch("b", 1))), [1]);
  // Back to a: resumes from its own position.
  t.beginJoin("a", t.resumeFor("a"));
  assert.deepEqual(t.resumeFor("a"), { since: 0, epoch: "E" });
});

test("positions are bounded: the least recently joined room is forgotten first", () => {
  const t = new RoomTracker(3);
  t.beginJoin("keep", undefined);
  t.handle({ type: "joined", room: "keep", seq: 7, epoch: "E" });
  for (const r of ["a", "b", "c", "d"]) {
    t.beginJoin(r, undefined);
    t.handle({ type: "joined", room: r, seq: 1, epoch: "E" });
  }
  assert.equal(t.position("keep"), undefined, "oldest forgotten");
  assert.ok(t.position("d") && t.position("c") && t.position("b"));
  assert.equal(t.position("a"), undefined);
});
