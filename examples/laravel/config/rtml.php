<?php

declare(strict_types=1);

/*
 * rtml (real-time ML) — where the services are and how long a web request may wait for them.
 * Copy to config/rtml.php; the values come from .env (see .env.example in this folder).
 */

return [
    // serving: predict, recommend, models
    'serving_url' => env('RTML_SERVING_URL', 'http://127.0.0.1:8003'),
    // ingest: events
    'ingest_url' => env('RTML_INGEST_URL', 'http://127.0.0.1:8001'),
    // feedback: outcomes
    'feedback_url' => env('RTML_FEEDBACK_URL', 'http://127.0.0.1:8004'),

    // Sent as "Authorization: Bearer KEY" when set. It needs the scopes ingest + predict (+ read for models).
    'api_key' => env('RTML_API_KEY'),

    // predict / recommend: the whole call, in seconds. Past it the page gets the fallback (a default score,
    // popular items) flagged degraded; it never waits longer and never errors because rtml is slow or down.
    'timeout' => (float) env('RTML_TIMEOUT', 0.25),
    // TCP connect, in seconds: a host that is gone fails fast instead of eating the whole budget.
    'connect_timeout' => (float) env('RTML_CONNECT_TIMEOUT', 0.1),

    // Events and outcomes: one attempt, in seconds. rtml answers 503 once its broker has not acknowledged
    // within RTML_KAFKA_PUBLISH_TIMEOUT_S (5 s by default), so keep this above that.
    'ingest_timeout' => (float) env('RTML_INGEST_TIMEOUT', 10.0),
    // Extra attempts of events/outcomes after a timeout, 429 or 503 (waiting Retry-After). Safe: every
    // event carries an event_id set here, and rtml counts an event_id once.
    'ingest_retries' => (int) env('RTML_INGEST_RETRIES', 3),
    // Longest wait between two attempts, in seconds (a longer Retry-After is capped to it).
    'max_backoff' => (float) env('RTML_MAX_BACKOFF', 5.0),

    // Model used when a call names none, and predict's fallback score.
    'model' => env('RTML_MODEL', 'ctr'),
    'default_score' => (float) env('RTML_DEFAULT_SCORE', 0.0),

    // Queue for event batches. null: sent right after the response, in the web worker (no queue worker
    // needed; lost if that worker dies). A queue name: a queued job with retries (needs `queue:work`).
    'events_queue' => env('RTML_EVENTS_QUEUE'),
];
