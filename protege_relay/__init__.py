"""Command-line entry point and single-machine supervisor of Protege Relay."""
