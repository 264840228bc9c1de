"""The prediction cache, the rate limiter, the analytics package, database engines and migrations.
Takes URLs as arguments and imports nothing of the project outside storage/; service/ builds it."""
