"""What every server process shares: start-up, lifecycle, health, heartbeat, CPU binding, parent-death."""
