<?php

declare(strict_types=1);

/*
 * Paste into routes/web.php (session-based user ids) or routes/api.php (then userId() in the controller
 * should read your API's authenticated user instead of the session).
 */

use App\Http\Controllers\RecommendationController;
use Illuminate\Support\Facades\Route;

Route::get('/recommendations', [RecommendationController::class, 'index'])->name('recommendations.index');
Route::get('/recommendations/score', [RecommendationController::class, 'score'])->name('recommendations.score');
Route::post('/recommendations/click', [RecommendationController::class, 'click'])->name('recommendations.click');
