// rtml client for Node >= 18: global fetch, AbortSignal.timeout, no npm dependencies.
//
// What a web backend needs from rtml, and nothing more:
// - predict / recommend answer within a short budget (default 250 ms) or fall back: a default score, or the
//   caller's popular items / the candidates in their given order, flagged `fallback: true` (and
//   `degraded: true`), so a page never fails or hangs because rtml is slow or down. They are not retried:
//   the budget belongs to the page, and a retry after a timeout would double its wait.
// - Mistakes of the caller (401/403 wrong key or scope, 404 unknown model, 422 invalid input) are thrown as
//   RtmlError, not hidden behind a fallback: they are bugs or configuration errors to fix, not load.
// - sendEvents stamps each event with an `event_id` before the first attempt, so every retry (after a
//   timeout, a dropped connection, 429 or 503 + Retry-After) is idempotent: rtml counts an event_id once.
//   Batches of up to `batchSize` events; when it gives up, the error carries the unsent events, ids included,
//   for a queue to retry later without double counting.
// - postOutcome is retried the same way: feedback keeps the first outcome of a prediction.

import { randomUUID } from "node:crypto";

/** An answer rtml gave that is not a success, or a request that could not be completed. */
export class RtmlError extends Error {
  /**
   * @param {string} message
   * @param {{status?: number, code?: string, details?: unknown, retryAfterMs?: number, cause?: unknown,
   *          pending?: object[], accepted?: number}} [info]
   */
  constructor(message, info = {}) {
    super(message, info.cause === undefined ? undefined : { cause: info.cause });
    this.name = "RtmlError";
    this.status = info.status ?? null; // HTTP status, null when no answer came (timeout, refused)
    this.code = info.code ?? null; // rtml's error.code ("invalid", "unauthorized", "overloaded", ...)
    this.details = info.details ?? null; // e.g. 422: [{index, field, message}]
    this.retryAfterMs = info.retryAfterMs ?? null;
    this.pending = info.pending ?? []; // sendEvents: events (with their event_id) not acknowledged
    this.accepted = info.accepted ?? 0; // sendEvents: events acknowledged before it gave up
  }

  /** Worth retrying or falling back: no answer, a timeout, 429 or 5xx. */
  get transient() {
    return this.status === null || this.status === 429 || this.status >= 500;
  }

  /** "timeout", "unavailable" (no connection), "http_503", ... : the reason a fallback names. */
  get reason() {
    if (this.code === "timeout") return "timeout";
    if (this.status === null) return "unavailable";
    return `http_${this.status}`;
  }
}

/** A fresh event id (UUID v4). */
export function newEventId() {
  return randomUUID();
}

/** Copies of the events, each with an event_id (kept when already set): send these, retry these. */
export function withEventIds(events) {
  return events.map((e) => (e.event_id ? { ...e } : { ...e, event_id: newEventId() }));
}

/** Retry-After (seconds or an HTTP date) in ms, or null. */
function parseRetryAfter(value) {
  if (!value) return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds * 1000);
  const at = Date.parse(value);
  return Number.isNaN(at) ? null : Math.max(0, at - Date.now());
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Fallback ranking: the fallback items (e.g. today's popular items) that are candidates, in their order,
 * then the other candidates in their given order; k of them, without duplicates.
 */
export function fallbackRanking(candidates, k, fallbackItems = []) {
  const allowed = new Set(candidates);
  const out = [];
  const seen = new Set();
  for (const id of [...fallbackItems.filter((id) => allowed.has(id)), ...candidates]) {
    if (out.length >= k) break;
    if (!seen.has(id)) {
      seen.add(id);
      out.push({ item_id: id, score: null });
    }
  }
  return out;
}

export class RtmlClient {
  /**
   * @param {object} options
   * @param {string} [options.servingUrl]  e.g. http://127.0.0.1:8003 (predict, recommend, models)
   * @param {string} [options.ingestUrl]   e.g. http://127.0.0.1:8001 (events)
   * @param {string} [options.featuresUrl] e.g. http://127.0.0.1:8002 (features)
   * @param {string} [options.feedbackUrl] e.g. http://127.0.0.1:8004 (outcomes, quality)
   * @param {string} [options.apiKey]      sent as Authorization: Bearer KEY when set
   * @param {number} [options.timeoutMs=250]       whole budget of one predict/recommend call
   * @param {number} [options.ingestTimeoutMs=10000] one attempt of events/outcomes (rtml answers 503 after
   *        RTML_KAFKA_PUBLISH_TIMEOUT_S, 5 s by default, so keep this above it)
   * @param {number} [options.readTimeoutMs=2000]  features, models
   * @param {number} [options.retries=4]           extra attempts of idempotent calls
   * @param {number} [options.maxBackoffMs=5000]   longest wait between attempts (Retry-After is capped to it)
   * @param {number} [options.defaultScore=0]      predict's fallback score
   * @param {(reason: string, error: RtmlError) => void} [options.onFallback] e.g. log and count it
   */
  constructor(options = {}) {
    const strip = (u) => (u ? String(u).replace(/\/+$/, "") : null);
    this.servingUrl = strip(options.servingUrl);
    this.ingestUrl = strip(options.ingestUrl);
    this.featuresUrl = strip(options.featuresUrl);
    this.feedbackUrl = strip(options.feedbackUrl);
    this.apiKey = options.apiKey || null;
    this.timeoutMs = options.timeoutMs ?? 250;
    this.ingestTimeoutMs = options.ingestTimeoutMs ?? 10000;
    this.readTimeoutMs = options.readTimeoutMs ?? 2000;
    this.retries = options.retries ?? 4;
    this.maxBackoffMs = options.maxBackoffMs ?? 5000;
    this.defaultScore = options.defaultScore ?? 0;
    this.onFallback = options.onFallback ?? (() => {});
  }

  /** Client from RTML_SERVING_URL, RTML_INGEST_URL, RTML_FEATURES_URL, RTML_FEEDBACK_URL, RTML_API_KEY. */
  static fromEnv(env = process.env, options = {}) {
    return new RtmlClient({
      servingUrl: env.RTML_SERVING_URL ?? "http://127.0.0.1:8003",
      ingestUrl: env.RTML_INGEST_URL ?? "http://127.0.0.1:8001",
      featuresUrl: env.RTML_FEATURES_URL ?? "http://127.0.0.1:8002",
      feedbackUrl: env.RTML_FEEDBACK_URL ?? "http://127.0.0.1:8004",
      apiKey: env.RTML_API_KEY,
      ...(env.RTML_TIMEOUT_MS ? { timeoutMs: Number(env.RTML_TIMEOUT_MS) } : {}),
      ...options,
    });
  }

  /** One HTTP call: the parsed JSON body on 2xx, else RtmlError (status null when nothing came back). */
  async #call(method, base, path, { body, timeoutMs, headers = {} } = {}) {
    if (!base) throw new RtmlError(`no URL configured for ${path}`);
    const h = { accept: "application/json", ...headers };
    if (body !== undefined) h["content-type"] = "application/json";
    if (this.apiKey) h.authorization = `Bearer ${this.apiKey}`;
    let res;
    let text;
    try {
      // The signal covers the whole exchange, body included.
      res = await fetch(base + path, {
        method,
        headers: h,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(timeoutMs),
      });
      text = await res.text();
    } catch (err) {
      const timedOut = err?.name === "TimeoutError" || err?.name === "AbortError";
      const why = err?.cause ? `${err.message}: ${err.cause.code ?? err.cause.message}` : err?.message;
      throw new RtmlError(
        timedOut ? `${method} ${path}: no answer within ${timeoutMs} ms` : `${method} ${path}: ${why}`,
        { code: timedOut ? "timeout" : "unavailable", cause: err },
      );
    }
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      if (res.ok) throw new RtmlError(`${method} ${path}: answer is not JSON`, { status: res.status, code: "bad_response" });
    }
    if (!res.ok) {
      const e = data?.error ?? {};
      throw new RtmlError(`${method} ${path}: ${res.status} ${e.message ?? text.slice(0, 200)}`, {
        status: res.status,
        code: e.code,
        details: e.details,
        retryAfterMs: parseRetryAfter(res.headers.get("retry-after")),
      });
    }
    return data;
  }

  /** #call, retried on transient failures with backoff (Retry-After when given). Only for idempotent calls. */
  async #callWithRetry(method, base, path, options) {
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.#call(method, base, path, options);
      } catch (err) {
        if (!(err instanceof RtmlError) || !err.transient || attempt >= this.retries) throw err;
        const backoff = Math.min(this.maxBackoffMs, 100 * 2 ** attempt) * (0.5 + Math.random() / 2);
        await sleep(Math.min(this.maxBackoffMs, err.retryAfterMs ?? backoff));
      }
    }
  }

  /**
   * Score one pair. Never throws for load or outages: falls back to `defaultScore` with fallback: true.
   * @returns {Promise<{prediction_id: string|null, model: string, version: string|null, score: number,
   *          degraded: boolean, fallback: boolean, reason?: string}>}
   */
  async predict({ model, entities, features } = {}, { timeoutMs = this.timeoutMs, defaultScore = this.defaultScore } = {}) {
    const body = { entities: entities ?? {} };
    if (model) body.model = model;
    if (features) body.features = features;
    try {
      const r = await this.#call("POST", this.servingUrl, "/v1/predict", {
        body,
        timeoutMs,
        // Leaves rtml time to answer from the model's defaults (degraded) before this client gives up.
        headers: { "x-request-timeout-ms": String(Math.max(1, Math.floor(timeoutMs * 0.6))) },
      });
      if (typeof r?.score !== "number") throw new RtmlError("predict: answer has no score", { status: 200, code: "bad_response" });
      return { ...r, fallback: false };
    } catch (err) {
      if (!(err instanceof RtmlError) || !(err.transient || err.code === "bad_response")) throw err;
      this.onFallback(err.reason, err);
      return {
        prediction_id: null, model: model ?? null, version: null, score: defaultScore,
        degraded: true, fallback: true, reason: err.reason,
      };
    }
  }

  /**
   * Rank candidates for a user. Never throws for load or outages: falls back to `fallbackItems` (e.g. popular
   * items) that are candidates, then the candidates in their given order, with score null and fallback: true.
   * @returns {Promise<{prediction_id: string|null, items: {item_id: string, score: number|null}[],
   *          model: string|null, version: string|null, degraded: boolean, fallback: boolean, reason?: string}>}
   */
  async recommend({ model, userId, candidates, k = 10, fallbackItems = [] }, { timeoutMs = this.timeoutMs } = {}) {
    const body = { user_id: userId, candidates, k };
    if (model) body.model = model;
    try {
      const r = await this.#call("POST", this.servingUrl, "/v1/recommend", {
        body,
        timeoutMs,
        headers: { "x-request-timeout-ms": String(Math.max(1, Math.floor(timeoutMs * 0.6))) },
      });
      if (!Array.isArray(r?.items)) throw new RtmlError("recommend: answer has no items", { status: 200, code: "bad_response" });
      return { degraded: false, ...r, fallback: false };
    } catch (err) {
      if (!(err instanceof RtmlError) || !(err.transient || err.code === "bad_response")) throw err;
      this.onFallback(err.reason, err);
      return {
        prediction_id: null, items: fallbackRanking(candidates, k, fallbackItems), model: model ?? null,
        version: null, degraded: true, fallback: true, reason: err.reason,
      };
    }
  }

  /**
   * Send events in batches; resolves {accepted, event_ids} once rtml acknowledged every one (202).
   * Throws RtmlError on a 4xx (422: err.details names each bad index and field; nothing of that batch was
   * published) or when retries are exhausted; err.pending then holds the events not yet acknowledged, with
   * their event_id, so resending them later cannot double count.
   */
  async sendEvents(events, { batchSize = 1000 } = {}) {
    const stamped = withEventIds(events);
    let accepted = 0;
    for (let start = 0; start < stamped.length; start += batchSize) {
      const batch = stamped.slice(start, start + batchSize);
      try {
        const r = await this.#callWithRetry("POST", this.ingestUrl, "/v1/events", {
          body: { events: batch },
          timeoutMs: this.ingestTimeoutMs,
        });
        accepted += r?.accepted ?? 0;
      } catch (err) {
        if (err instanceof RtmlError) {
          err.pending = stamped.slice(start);
          err.accepted = accepted;
        }
        throw err;
      }
    }
    return { accepted, event_ids: stamped.map((e) => e.event_id) };
  }

  /** Report what happened after a prediction (label 0/1 or a number). Retried: the first outcome counts. */
  async postOutcome({ predictionId, label, itemId, ts }) {
    const body = { prediction_id: predictionId, label };
    if (itemId !== undefined) body.item_id = itemId;
    if (ts !== undefined) body.ts = ts;
    return this.#callWithRetry("POST", this.feedbackUrl, "/v1/outcomes", { body, timeoutMs: this.ingestTimeoutMs });
  }

  /** Features of one entity; a pair entity's id may be given as an array of its keys' values. */
  async features(entity, id, { names } = {}) {
    const joined = Array.isArray(id) ? id.join("|") : String(id);
    const query = names?.length ? `?features=${encodeURIComponent(names.join(","))}` : "";
    const path = `/v1/features/${encodeURIComponent(entity)}/${encodeURIComponent(joined)}${query}`;
    return this.#callWithRetry("GET", this.featuresUrl, path, { timeoutMs: this.readTimeoutMs });
  }

  /** Every model, its versions and the live one. */
  async models() {
    return this.#callWithRetry("GET", this.servingUrl, "/v1/models", { timeoutMs: this.readTimeoutMs });
  }
}
