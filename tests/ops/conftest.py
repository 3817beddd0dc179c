"""What an operator runs and ships: deployment files, `protege-relay status` and `run`, backlog gauges."""
