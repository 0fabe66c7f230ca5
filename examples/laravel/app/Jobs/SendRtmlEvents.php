<?php

declare(strict_types=1);

namespace App\Jobs;

use App\Services\Rtml\RtmlClient;
use App\Services\Rtml\RtmlException;
use DateTimeInterface;
use Illuminate\Bus\Queueable;
use Illuminate\Contracts\Queue\ShouldQueue;
use Illuminate\Foundation\Bus\Dispatchable;
use Illuminate\Queue\InteractsWithQueue;
use Illuminate\Support\Facades\Log;

/**
 * A batch of events for rtml, sent off the page's critical path.
 *
 * SendRtmlEvents::push($events) sends them right after the response (dispatch()->afterResponse(): no queue
 * worker needed, the page does not wait) or, when config rtml.events_queue names a queue, as a queued job
 * whose retries survive a restart of rtml or of the web worker.
 *
 * The event_ids are set once, in the constructor, so they are serialised with the job: every retry (in the
 * client, or the queue's) sends the same ids and rtml counts each event once.
 */
final class SendRtmlEvents implements ShouldQueue
{
    use Dispatchable;
    use InteractsWithQueue;
    use Queueable;

    /** @var list<array<string, mixed>> */
    public array $events;

    /** @param list<array<string, mixed>> $events {type, user_id?, item_id?, ts?, properties?} */
    public function __construct(array $events)
    {
        $this->events = RtmlClient::withEventIds($events);
    }

    /** After the response, or on rtml.events_queue when one is configured. Nothing to send: nothing done. */
    public static function push(array $events): void
    {
        if ($events === []) {
            return;
        }
        $queue = config('rtml.events_queue');
        if (is_string($queue) && $queue !== '') {
            self::dispatch($events)->onQueue($queue);
        } else {
            self::dispatch($events)->afterResponse();
        }
    }

    public function handle(RtmlClient $rtml): void
    {
        // After the response the job runs on the "sync" connection: release() would do nothing there, and
        // the events would be lost without a word. Only a real queue can take them back.
        $queued = $this->job !== null && $this->job->getConnectionName() !== 'sync';
        try {
            // Queued: one quick attempt plus the client's retries would hold a worker; let the queue wait.
            $rtml->sendEvents($this->events, retries: $queued ? 1 : null);
        } catch (RtmlException $e) {
            if ($queued && $e->transient()) {
                // Resending the acknowledged part too is harmless: those event_ids count once.
                $this->release((int) ceil($e->retryAfter ?? min(300, 2 ** $this->attempts())));

                return;
            }
            // Never silent: the count, the reason and (422) which event and field was wrong.
            Log::error('rtml: events not delivered', [
                'events' => count($e->pending),
                'accepted_before' => $e->accepted,
                'error' => $e->getMessage(),
                'details' => $e->details,
            ]);
            if ($queued) {
                $this->fail($e); // a 4xx will not get better by retrying: straight to failed_jobs

                return;
            }
            throw $e;
        }
    }

    /** Queued: retried (released with Retry-After or a growing delay) for up to an hour, then failed_jobs. */
    public function retryUntil(): DateTimeInterface
    {
        return now()->addHour();
    }
}
