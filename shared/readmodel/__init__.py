"""Projections of the event log into DuckDB, and the replay and live follower that feed them.

Shared because two services build the same catalog projection (the catalog,
and the probe's Q/R front door) and the CLI rebuilds both services' stores.
"""
