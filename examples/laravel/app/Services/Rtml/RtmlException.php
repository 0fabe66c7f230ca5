<?php

declare(strict_types=1);

namespace App\Services\Rtml;

use Illuminate\Http\Client\Response;
use RuntimeException;
use Throwable;

/**
 * rtml refused a call (4xx: the caller's mistake; 429/5xx: load or an outage) or did not answer at all
 * (status null). predict/recommend only throw it for 4xx; everything transient becomes their fallback.
 */
final class RtmlException extends RuntimeException
{
    /**
     * @param list<array<string, mixed>> $details e.g. 422: [{index, field, message}]
     * @param list<array<string, mixed>> $pending sendEvents: the events not acknowledged, event_id included
     */
    public function __construct(
        string $message,
        public readonly ?int $status = null,
        public readonly ?string $errorCode = null,
        public readonly array $details = [],
        public readonly ?float $retryAfter = null,
        public readonly array $pending = [],
        public readonly int $accepted = 0,
        ?Throwable $previous = null,
    ) {
        parent::__construct($message, 0, $previous);
    }

    public static function fromResponse(string $what, Response $response): self
    {
        $error = $response->json('error');
        $error = is_array($error) ? $error : [];
        $retryAfter = $response->header('Retry-After');

        return new self(
            sprintf('rtml %s: %d %s', $what, $response->status(), (string) ($error['message'] ?? $response->body())),
            status: $response->status(),
            errorCode: isset($error['code']) ? (string) $error['code'] : null,
            details: is_array($error['details'] ?? null) ? array_values($error['details']) : [],
            retryAfter: is_numeric($retryAfter) ? max(0.0, (float) $retryAfter) : null,
        );
    }

    public static function noAnswer(string $what, Throwable $previous): self
    {
        // cURL error 28 is "operation timed out" (connect or transfer).
        $timedOut = str_contains($previous->getMessage(), 'cURL error 28');

        return new self(
            sprintf('rtml %s: %s', $what, $previous->getMessage()),
            errorCode: $timedOut ? 'timeout' : 'unavailable',
            previous: $previous,
        );
    }

    /** The same error, naming the events still to send and how many were acknowledged before. */
    public function withPending(array $pending, int $accepted): self
    {
        return new self(
            $this->getMessage(),
            $this->status,
            $this->errorCode,
            $this->details,
            $this->retryAfter,
            array_values($pending),
            $accepted,
            $this->getPrevious(),
        );
    }

    /** Worth retrying (or falling back): no answer, 429, 5xx, or an answer that is not rtml's JSON. */
    public function transient(): bool
    {
        return $this->status === null || $this->status === 429 || $this->status >= 500
            || $this->errorCode === 'bad_response';
    }

    /** "timeout", "unavailable" or "http_NNN": what a fallback reports. */
    public function reason(): string
    {
        if ($this->status === null) {
            return $this->errorCode === 'timeout' ? 'timeout' : 'unavailable';
        }

        return $this->errorCode === 'bad_response' ? 'bad_response' : 'http_'.$this->status;
    }
}
