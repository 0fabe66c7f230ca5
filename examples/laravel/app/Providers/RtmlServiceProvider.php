<?php

declare(strict_types=1);

namespace App\Providers;

use App\Services\Rtml\RtmlClient;
use Illuminate\Contracts\Foundation\Application;
use Illuminate\Support\ServiceProvider;

/** One RtmlClient per process, built from config/rtml.php; inject it (constructor or method injection). */
final class RtmlServiceProvider extends ServiceProvider
{
    public function register(): void
    {
        $this->app->singleton(
            RtmlClient::class,
            static fn (Application $app): RtmlClient => RtmlClient::fromConfig((array) $app['config']->get('rtml', [])),
        );
    }
}
