<?php

declare(strict_types=1);

namespace App\Services\Rtml;

/** One answer of predict, or its fallback (fallback = true, predictionId = null, the default score). */
final readonly class Prediction
{
    public function __construct(
        public ?string $predictionId,
        public ?string $model,
        public ?string $version,
        public float $score,
        /** true when rtml answered from the model's defaults, and always for a fallback */
        public bool $degraded,
        /** true when rtml did not answer in time (or at all): the score is the configured default */
        public bool $fallback = false,
        /** why the fallback: "timeout", "unavailable", "http_503", "bad_response" */
        public ?string $reason = null,
    ) {
    }

    /** @return array<string, mixed> */
    public function toArray(): array
    {
        return [
            'prediction_id' => $this->predictionId,
            'model' => $this->model,
            'version' => $this->version,
            'score' => $this->score,
            'degraded' => $this->degraded,
            'fallback' => $this->fallback,
            'reason' => $this->reason,
        ];
    }
}
