"""The local Kafka + Postgres stack (`orderflow stack up|down|status`); see `manager`."""
