"""The mesh's control plane: the Redis store, the typed topology, worker figures, expert placement, layout planning."""
