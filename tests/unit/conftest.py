"""Pure tests: no sockets, no Redis, no processes; the sans-I/O pieces of every service and shared/."""
