"""Stand-in for the docker CLI, used on simulated hosts (stdlib only)."""
