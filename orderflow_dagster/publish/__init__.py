"""Publishing `order_status_history` to the Kafka topic `orders.status`, exactly once.

- `changelog`: the outbox. One Postgres transaction diffs the history of the orders dbt rebuilt
  against what was recorded before and appends transitions, corrections and retractions to
  `publish.status_changelog`, whose rows are never updated or deleted.
- `position`: how far the topic got, read back from its last committed messages.
- `producer`: a transactional producer publishing the changelog after that position.
- `run`: both steps, as the Dagster asset and `orderflow catch-up` call them.
"""
