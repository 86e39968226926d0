"""The event contract in code: the schema registry (one JSON Schema per event type and version)
and the upcasters that lift older payloads to the current version. See docs/schema-evolution.md."""
