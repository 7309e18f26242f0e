"""Deployment: the local launcher (`stagemesh up`), its supervision, the Redis server it starts, compose rendering."""
