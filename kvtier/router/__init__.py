"""HGA routing: summaries, routing plans and prefetch hints."""
