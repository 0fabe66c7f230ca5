#!/usr/bin/env node
// The README's walk-through through rtml.mjs, checking every answer; written for the bundled demo config
// (model `ctr`, features user_clicks_5m, user_views_total, user_items_24h).
//
//   RTML_INGEST_URL=... RTML_FEATURES_URL=... RTML_SERVING_URL=... RTML_FEEDBACK_URL=... \
//   RTML_API_KEY=... node demo.mjs
//   RTML_SERVING_URL=http://127.0.0.1:9 node demo.mjs --expect-fallback[=timeout|unavailable]
//
// Prints one JSON line per step ({"step": ..., "ok": true, ...}); exits 1 at the first unexpected answer
// (the failing step's line says why), 0 when every step checked out.

import { RtmlClient, RtmlError } from "./rtml.mjs";

let current = "start";

function emit(step, fields = {}) {
  process.stdout.write(`${JSON.stringify({ step, ok: true, ...fields })}\n`);
}

function check(condition, message, extra = {}) {
  if (!condition) {
    process.stdout.write(`${JSON.stringify({ step: current, ok: false, error: message, ...extra })}\n`);
    process.exit(1);
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function expectFallback(client, reason) {
  const candidates = ["i1", "i2", "i3"];
  current = "predict_fallback";
  let t0 = performance.now();
  const p = await client.predict({ model: "ctr", entities: { user_id: "u1", item_id: "i1" } }, { defaultScore: 0.05 });
  emit(current, { ...p, elapsed_ms: Math.round(performance.now() - t0) });
  check(p.fallback === true && p.degraded === true, "predict should have fallen back", p);
  check(p.score === 0.05 && p.prediction_id === null, "fallback score should be the default", p);
  check(!reason || p.reason === reason, `fallback reason should be ${reason}`, p);

  current = "recommend_fallback";
  t0 = performance.now();
  const r = await client.recommend({ userId: "u1", candidates, k: 2, fallbackItems: ["i3", "not-a-candidate"] });
  emit(current, { ...r, elapsed_ms: Math.round(performance.now() - t0) });
  check(r.fallback === true, "recommend should have fallen back", r);
  const ids = r.items.map((i) => i.item_id);
  check(JSON.stringify(ids) === JSON.stringify(["i3", "i1"]), "fallback ranking: popular candidates first, then the given order", r);
  check(!reason || r.reason === reason, `fallback reason should be ${reason}`, r);
}

async function walkThrough(client) {
  const tag = Math.random().toString(36).slice(2, 10);
  const user = process.env.RTML_DEMO_USER ?? `demo-${tag}`;
  const [a, b, c, d] = ["a", "b", "c", "d"].map((x) => `item-${tag}-${x}`);

  // 1. events, then the same events again as a retry after a lost answer would send them (same event_id).
  current = "events";
  const events = [
    { type: "view", user_id: user, item_id: a },
    { type: "click", user_id: user, item_id: a },
    { type: "view", user_id: user, item_id: b },
  ];
  const sent = await client.sendEvents(events);
  check(sent.accepted === 3 && new Set(sent.event_ids).size === 3, "3 events accepted, each with its own id", sent);
  const again = await client.sendEvents(events.map((e, i) => ({ ...e, event_id: sent.event_ids[i] })));
  check(again.accepted === 3, "the resent batch is accepted (and counted once)", again);
  // A later event of the same user (same partition): once it is visible, everything before it is applied.
  const marker = await client.sendEvents([{ type: "view", user_id: user, item_id: c }]);
  emit(current, { user, accepted: sent.accepted, resent: again.accepted, marker: marker.accepted, event_ids: sent.event_ids });

  // 2. the features they updated.
  current = "features";
  let f;
  for (let i = 0; i < 100; i++) {
    f = await client.features("user", user);
    if ((f.features.user_views_total ?? 0) >= 3) break;
    await sleep(100);
  }
  emit(current, { entity: f.entity, id: f.id, features: f.features });
  check(f.features.user_views_total === 3, "3 views (the resent ones counted once)", f);
  check(f.features.user_clicks_5m === 1, "1 click (the resent one counted once)", f);
  check(f.features.user_items_24h === 3, "3 distinct items", f);

  // 3. predict.
  current = "predict";
  const p = await client.predict({ model: "ctr", entities: { user_id: user, item_id: a } }, { timeoutMs: 2000 });
  emit(current, p);
  check(p.fallback === false, `predict fell back (${p.reason})`, p);
  check(typeof p.prediction_id === "string" && p.prediction_id.length > 0, "a prediction_id", p);
  check(typeof p.version === "string" && p.version.length > 0, "a model version", p);
  check(p.score >= 0 && p.score <= 1, "a score in [0, 1]", p);

  // 4. recommend.
  current = "recommend";
  const candidates = [a, b, c, d];
  const r = await client.recommend({ model: "ctr", userId: user, candidates, k: 2 }, { timeoutMs: 2000 });
  emit(current, { ...r, candidates });
  check(r.fallback === false, `recommend fell back (${r.reason})`, r);
  const ids = r.items.map((i) => i.item_id);
  check(ids.length === 2 && new Set(ids).size === 2, "k = 2 distinct items", r);
  check(ids.every((id) => candidates.includes(id)), "items are candidates", r);
  check(r.items[0].score >= r.items[1].score, "ranked by score", r);

  // 5. the outcome of the prediction of step 3.
  current = "outcome";
  const o = await client.postOutcome({ predictionId: p.prediction_id, label: 1 });
  emit(current, { prediction_id: p.prediction_id, ...o });
  check(o?.accepted === 1, "outcome accepted", o);

  // 6. the registry.
  current = "models";
  const m = await client.models();
  const ctr = m.models.find((x) => x.name === "ctr");
  emit(current, { models: m.models.map((x) => ({ name: x.name, live_version: x.live_version })) });
  check(ctr && ctr.live_version === p.version, "ctr's live version is the one that answered", m.models);

  // 7. the caller's mistakes are errors, not fallbacks.
  current = "errors";
  let unknownModel = null;
  try {
    await client.predict({ model: `no-such-model-${tag}`, entities: { user_id: user } }, { timeoutMs: 2000 });
  } catch (err) {
    unknownModel = err;
  }
  check(unknownModel instanceof RtmlError && unknownModel.status === 404, "an unknown model is a 404 RtmlError", {
    got: String(unknownModel),
  });
  let invalid = null;
  try {
    await client.sendEvents([{ type: "view", user_id: user }, { type: "" }]);
  } catch (err) {
    invalid = err;
  }
  check(
    invalid instanceof RtmlError && invalid.status === 422 && invalid.details?.[0]?.index === 1 && invalid.pending.length === 2,
    "an invalid event is a 422 naming its index; the batch stays pending",
    { got: String(invalid), details: invalid?.details },
  );
  emit(current, { unknown_model: unknownModel.status, invalid_event: invalid.status, invalid_details: invalid.details });
}

const flag = process.argv.slice(2).find((a) => a.startsWith("--expect-fallback"));
const client = RtmlClient.fromEnv(process.env, {
  onFallback: (reason, err) => process.stderr.write(`rtml fallback (${reason}): ${err.message}\n`),
});
try {
  if (flag) await expectFallback(client, flag.split("=")[1]);
  else await walkThrough(client);
  emit("done");
} catch (err) {
  check(false, `unexpected ${err?.name}: ${err?.message}`, { status: err?.status ?? null, code: err?.code ?? null });
}
