<?php

declare(strict_types=1);

namespace App\Services\Rtml;

/**
 * One answer of recommend, or its fallback: then the fallback items (e.g. popular ones) that are candidates,
 * then the other candidates in their given order, each with score null.
 */
final readonly class Recommendation
{
    /**
     * @param list<array{item_id: string, score: float|null}> $items best first
     */
    public function __construct(
        public ?string $predictionId,
        public array $items,
        public ?string $model,
        public ?string $version,
        public bool $degraded,
        public bool $fallback = false,
        public ?string $reason = null,
    ) {
    }

    /** @return list<string> */
    public function itemIds(): array
    {
        return array_map(static fn (array $item): string => $item['item_id'], $this->items);
    }

    /** @return array<string, mixed> */
    public function toArray(): array
    {
        return [
            'prediction_id' => $this->predictionId,
            'items' => $this->items,
            'model' => $this->model,
            'version' => $this->version,
            'degraded' => $this->degraded,
            'fallback' => $this->fallback,
            'reason' => $this->reason,
        ];
    }
}
