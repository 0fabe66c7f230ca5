<?php

declare(strict_types=1);

namespace App\Services\Rtml;

use GuzzleHttp\Exception\TransferException;
use Illuminate\Http\Client\ConnectionException;
use Illuminate\Http\Client\PendingRequest;
use Illuminate\Http\Client\Response;
use Illuminate\Support\Facades\Http;
use Illuminate\Support\Facades\Log;
use Illuminate\Support\Str;

/**
 * rtml from a Laravel app, through Laravel's HTTP client.
 *
 * - predict() / recommend() are on the page's critical path: one attempt, a short timeout (config
 *   rtml.timeout, 250 ms by default) and a fallback when rtml is slow, overloaded or down — a default score,
 *   or the popular items / the candidates in their given order — flagged `fallback` and `degraded`. They are
 *   not retried: the budget belongs to the page, and a retry after a timeout would double its wait.
 *   A 4xx (wrong key or scope, unknown model, invalid input) is thrown: that is a bug to fix, not load.
 * - sendEvents() / postOutcome() are meant to run after the response or in a queued job (SendRtmlEvents).
 *   They are retried on timeouts, 429 and 503 (waiting Retry-After), which is safe: every event gets an
 *   event_id before the first attempt and rtml counts an event_id once; an outcome counts once per
 *   prediction (the first one wins).
 */
final class RtmlClient
{
    public function __construct(
        private readonly string $servingUrl,
        private readonly string $ingestUrl,
        private readonly string $feedbackUrl,
        private readonly ?string $apiKey = null,
        private readonly float $timeout = 0.25,
        private readonly float $connectTimeout = 0.1,
        private readonly float $ingestTimeout = 10.0,
        private readonly int $ingestRetries = 3,
        private readonly float $maxBackoff = 5.0,
        private readonly string $defaultModel = 'ctr',
        private readonly float $defaultScore = 0.0,
    ) {
    }

    /** @param array<string, mixed> $config config('rtml') */
    public static function fromConfig(array $config): self
    {
        return new self(
            servingUrl: (string) $config['serving_url'],
            ingestUrl: (string) $config['ingest_url'],
            feedbackUrl: (string) $config['feedback_url'],
            apiKey: isset($config['api_key']) && $config['api_key'] !== '' ? (string) $config['api_key'] : null,
            timeout: (float) ($config['timeout'] ?? 0.25),
            connectTimeout: (float) ($config['connect_timeout'] ?? 0.1),
            ingestTimeout: (float) ($config['ingest_timeout'] ?? 10.0),
            ingestRetries: (int) ($config['ingest_retries'] ?? 3),
            maxBackoff: (float) ($config['max_backoff'] ?? 5.0),
            defaultModel: (string) ($config['model'] ?? 'ctr'),
            defaultScore: (float) ($config['default_score'] ?? 0.0),
        );
    }

    /**
     * Score one set of entities, e.g. ['user_id' => 'u1', 'item_id' => 't9'].
     *
     * @param array<string, string>          $entities
     * @param array<string, float|int|null>  $features override stored features (optional)
     *
     * @throws RtmlException on a 4xx only
     */
    public function predict(array $entities, ?string $model = null, array $features = [], ?float $defaultScore = null): Prediction
    {
        $model ??= $this->defaultModel;
        $body = ['model' => $model, 'entities' => (object) $entities];
        if ($features !== []) {
            $body['features'] = (object) $features;
        }

        $fallback = fn (RtmlException $e): Prediction => new Prediction(
            predictionId: null,
            model: $model,
            version: null,
            score: $defaultScore ?? $this->defaultScore,
            degraded: true,
            fallback: true,
            reason: $this->noteFallback('predict', $e),
        );

        try {
            $data = $this->hotPath('/v1/predict', $body);
        } catch (RtmlException $e) {
            if (! $e->transient()) {
                throw $e;
            }

            return $fallback($e);
        }
        if (! is_numeric($data['score'] ?? null) || ! is_string($data['prediction_id'] ?? null)) {
            return $fallback(new RtmlException('rtml predict: answer without score', 200, 'bad_response'));
        }

        return new Prediction(
            predictionId: $data['prediction_id'],
            model: (string) ($data['model'] ?? $model),
            version: isset($data['version']) ? (string) $data['version'] : null,
            score: (float) $data['score'],
            degraded: (bool) ($data['degraded'] ?? false),
        );
    }

    /**
     * Rank candidates for a user, best first, k of them.
     *
     * @param list<string> $candidates    item ids (1 to 1,000)
     * @param list<string> $fallbackItems e.g. today's popular item ids: what a fallback puts first
     *
     * @throws RtmlException on a 4xx only
     */
    public function recommend(string $userId, array $candidates, int $k = 10, array $fallbackItems = [], ?string $model = null): Recommendation
    {
        $model ??= $this->defaultModel;
        $body = ['model' => $model, 'user_id' => $userId, 'candidates' => array_values($candidates), 'k' => $k];

        $fallback = fn (RtmlException $e): Recommendation => new Recommendation(
            predictionId: null,
            items: self::fallbackRanking($candidates, $k, $fallbackItems),
            model: $model,
            version: null,
            degraded: true,
            fallback: true,
            reason: $this->noteFallback('recommend', $e),
        );

        try {
            $data = $this->hotPath('/v1/recommend', $body);
        } catch (RtmlException $e) {
            if (! $e->transient()) {
                throw $e;
            }

            return $fallback($e);
        }
        if (! is_array($data['items'] ?? null)) {
            return $fallback(new RtmlException('rtml recommend: answer without items', 200, 'bad_response'));
        }
        $items = [];
        foreach ($data['items'] as $item) {
            $items[] = ['item_id' => (string) $item['item_id'], 'score' => (float) $item['score']];
        }

        return new Recommendation(
            predictionId: isset($data['prediction_id']) ? (string) $data['prediction_id'] : null,
            items: $items,
            model: (string) ($data['model'] ?? $model),
            version: isset($data['version']) ? (string) $data['version'] : null,
            degraded: (bool) ($data['degraded'] ?? false),
        );
    }

    /**
     * The fallback ranking: fallback items that are candidates (in their order), then the other candidates
     * in their given order; k of them, no duplicates, score null.
     *
     * @param list<string> $candidates
     * @param list<string> $fallbackItems
     *
     * @return list<array{item_id: string, score: null}>
     */
    public static function fallbackRanking(array $candidates, int $k, array $fallbackItems = []): array
    {
        $allowed = array_flip($candidates);
        $ordered = array_merge(array_filter($fallbackItems, static fn (string $id): bool => isset($allowed[$id])), $candidates);
        $out = [];
        foreach (array_unique($ordered) as $id) {
            if (count($out) >= $k) {
                break;
            }
            $out[] = ['item_id' => $id, 'score' => null];
        }

        return $out;
    }

    /**
     * Copies of the events, each with an event_id (kept when already set). Stamp events once, before they are
     * queued or sent: every retry then carries the same ids, and rtml counts each once.
     *
     * @param list<array<string, mixed>> $events
     *
     * @return list<array<string, mixed>>
     */
    public static function withEventIds(array $events): array
    {
        return array_map(
            static fn (array $e): array => isset($e['event_id']) && $e['event_id'] !== '' ? $e : ['event_id' => (string) Str::uuid()] + $e,
            array_values($events),
        );
    }

    /**
     * Send events ({type, user_id?, item_id?, ts?, properties?}) in batches; returns how many rtml accepted
     * (202: the broker has them). Retries transient failures up to $retries times (default rtml.ingest_retries).
     *
     * @param list<array<string, mixed>> $events
     *
     * @throws RtmlException a 4xx (422: details name each bad index and field; nothing of that batch was
     *                       published) or retries exhausted; ->pending holds the unsent events with their ids
     */
    public function sendEvents(array $events, int $batchSize = 1000, ?int $retries = null): int
    {
        $events = self::withEventIds($events);
        $size = max(1, min($batchSize, 10_000)); // rtml takes up to 10,000 events per request
        $accepted = 0;
        foreach (array_chunk($events, $size) as $i => $batch) {
            try {
                $data = $this->idempotent($this->ingestUrl, '/v1/events', ['events' => $batch], $retries ?? $this->ingestRetries);
            } catch (RtmlException $e) {
                throw $e->withPending(array_slice($events, $i * $size), $accepted);
            }
            $accepted += (int) ($data['accepted'] ?? 0);
        }

        return $accepted;
    }

    /**
     * Report what happened after a prediction: label 1/0 (or a number). Retried like events.
     *
     * @throws RtmlException
     */
    public function postOutcome(string $predictionId, int|float|bool $label, ?string $itemId = null, ?int $retries = null): void
    {
        $body = ['prediction_id' => $predictionId, 'label' => $label];
        if ($itemId !== null) {
            $body['item_id'] = $itemId;
        }
        $this->idempotent($this->feedbackUrl, '/v1/outcomes', $body, $retries ?? $this->ingestRetries);
    }

    /**
     * Every model, its versions and the live one (GET /v1/models; needs the `read` scope).
     *
     * @return array<string, mixed>
     *
     * @throws RtmlException
     */
    public function models(): array
    {
        return $this->idempotent($this->servingUrl, '/v1/models', null, 2);
    }

    private function client(string $baseUrl, float $timeout, float $connectTimeout): PendingRequest
    {
        $request = Http::baseUrl($baseUrl)
            ->acceptJson()
            ->asJson()
            // Guzzle options directly: they take fractions of a second on every Laravel version.
            ->withOptions(['timeout' => $timeout, 'connect_timeout' => min($connectTimeout, $timeout)]);

        return $this->apiKey !== null ? $request->withToken($this->apiKey) : $request;
    }

    /**
     * One attempt of predict/recommend within the page's budget. rtml is told the budget (a bit less, for
     * the network) so that a slow feature store gives a degraded answer in time rather than our timeout.
     *
     * @param array<string, mixed> $body
     *
     * @return array<string, mixed>
     */
    private function hotPath(string $path, array $body): array
    {
        try {
            $response = $this->client($this->servingUrl, $this->timeout, $this->connectTimeout)
                ->withHeaders(['X-Request-Timeout-Ms' => (string) max(1, (int) floor($this->timeout * 600))])
                ->post($path, $body);
        } catch (ConnectionException|TransferException $e) {
            throw RtmlException::noAnswer($path, $e);
        }

        return self::decode($path, $response);
    }

    /**
     * A call that is safe to repeat, retried on transient failures with exponential backoff and jitter, or
     * Retry-After when rtml sends one (503 while its broker or Redis is down, or serving is overloaded).
     *
     * @param array<string, mixed>|null $body null: GET
     *
     * @return array<string, mixed>
     */
    private function idempotent(string $baseUrl, string $path, ?array $body, int $retries): array
    {
        for ($attempt = 0; ; ++$attempt) {
            try {
                $request = $this->client($baseUrl, $this->ingestTimeout, max($this->connectTimeout, 1.0));
                $response = $body === null ? $request->get($path) : $request->post($path, $body);

                return self::decode($path, $response);
            } catch (ConnectionException|TransferException $e) {
                $error = RtmlException::noAnswer($path, $e);
            } catch (RtmlException $e) {
                $error = $e;
            }
            if (! $error->transient() || $attempt >= $retries) {
                throw $error;
            }
            $backoff = min($this->maxBackoff, 0.1 * 2 ** $attempt) * (0.5 + mt_rand() / mt_getrandmax() / 2);
            usleep((int) (min($this->maxBackoff, $error->retryAfter ?? $backoff) * 1_000_000));
        }
    }

    /** @return array<string, mixed> */
    private static function decode(string $path, Response $response): array
    {
        if (! $response->successful()) {
            throw RtmlException::fromResponse($path, $response);
        }
        $data = $response->json();
        if (! is_array($data)) {
            throw new RtmlException("rtml {$path}: answer is not a JSON object", $response->status(), 'bad_response');
        }

        return $data;
    }

    private function noteFallback(string $what, RtmlException $e): string
    {
        // One line per fallback: count them (e.g. a log-based metric) to see how often pages go without rtml.
        Log::warning("rtml {$what}: fallback", ['reason' => $e->reason(), 'error' => $e->getMessage()]);

        return $e->reason();
    }
}
