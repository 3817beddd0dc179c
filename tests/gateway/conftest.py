"""The reference gateway (`protege-relay gateway` / `send`) against a scripted relay in the test."""
