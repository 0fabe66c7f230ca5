<?php

declare(strict_types=1);

namespace App\Http\Controllers;

use App\Jobs\SendRtmlEvents;
use App\Services\Rtml\RtmlClient;
use Illuminate\Http\JsonResponse;
use Illuminate\Http\Request;
use Illuminate\Support\Facades\Cache;

/**
 * Recommendations, scores and clicks through rtml. The page never waits on rtml for longer than
 * config rtml.timeout, never fails because rtml is down (it gets the fallback, flagged `degraded`), and
 * never waits on event ingestion (events go out after the response, or through a queue).
 */
final class RecommendationController extends Controller
{
    public function __construct(private readonly RtmlClient $rtml)
    {
    }

    /**
     * GET /recommendations?candidates[]=t9&candidates[]=t4&k=2
     * In your app the candidates come from your catalogue or search (in stock, allowed for this user, ...).
     */
    public function index(Request $request): JsonResponse
    {
        $valid = $request->validate([
            'candidates' => ['required', 'array', 'min:1', 'max:1000'],
            'candidates.*' => ['required', 'string', 'max:256'],
            'k' => ['sometimes', 'integer', 'min:1', 'max:100'],
        ]);
        $userId = $this->userId($request);
        $candidates = array_values(array_map('strval', $valid['candidates']));

        $recommendation = $this->rtml->recommend(
            $userId,
            $candidates,
            (int) ($valid['k'] ?? 10),
            fallbackItems: $this->popularItems(),
        );

        // The items shown are views (impressions): the model's features and its labels are built from them.
        $now = now()->getTimestampMs(); // when it happened, not when a queue gets round to sending it
        $properties = $recommendation->predictionId !== null ? ['prediction_id' => $recommendation->predictionId] : [];
        SendRtmlEvents::push(array_map(
            static fn (string $itemId): array => [
                'type' => 'view',
                'user_id' => $userId,
                'item_id' => $itemId,
                'ts' => $now,
                'properties' => (object) $properties,
            ],
            $recommendation->itemIds(),
        ));

        return response()->json($recommendation->toArray());
    }

    /**
     * GET /recommendations/score?item_id=t9 — one score, e.g. to decide whether to show a promotion.
     */
    public function score(Request $request): JsonResponse
    {
        $valid = $request->validate(['item_id' => ['required', 'string', 'max:256']]);
        $prediction = $this->rtml->predict(
            ['user_id' => $this->userId($request), 'item_id' => (string) $valid['item_id']],
            defaultScore: 0.1, // what the page assumes without rtml: here, the average click-through rate
        );

        return response()->json($prediction->toArray());
    }

    /**
     * POST /recommendations/click {item_id, prediction_id?} — the user clicked a recommended item:
     * a click event for the features, and the outcome of the prediction that ranked it.
     */
    public function click(Request $request): JsonResponse
    {
        $valid = $request->validate([
            'item_id' => ['required', 'string', 'max:256'],
            'prediction_id' => ['sometimes', 'nullable', 'string', 'max:256'],
        ]);
        $userId = $this->userId($request);
        $itemId = (string) $valid['item_id'];

        SendRtmlEvents::push([[
            'type' => 'click',
            'user_id' => $userId,
            'item_id' => $itemId,
            'ts' => now()->getTimestampMs(),
        ]]);
        $predictionId = $valid['prediction_id'] ?? null;
        if (is_string($predictionId) && $predictionId !== '') {
            // After the response too; retried inside postOutcome (the first outcome of a prediction counts).
            dispatch(static function (RtmlClient $rtml) use ($predictionId, $itemId): void {
                $rtml->postOutcome($predictionId, 1, $itemId);
            })->afterResponse();
        }

        return response()->json(['ok' => true], 202);
    }

    /** The signed-in user's id, else the session's: rtml only needs a stable string per visitor. */
    private function userId(Request $request): string
    {
        $id = $request->user()?->getAuthIdentifier();

        return $id !== null ? 'user-'.$id : 'session-'.$request->session()->getId();
    }

    /**
     * Today's popular item ids: what the page shows first when rtml cannot answer. Fill this cache from
     * your own data (e.g. a scheduled command counting yesterday's orders).
     *
     * @return list<string>
     */
    private function popularItems(): array
    {
        $items = Cache::get('popular_item_ids', []);

        return is_array($items) ? array_values(array_map('strval', $items)) : [];
    }
}
