#!/bin/bash
# Stand-in for a custom image's ENTRYPOINT wrapper script: it sets the environment up, then runs
# the container's arguments (`exec "$@"`), like NVIDIA's nvidia_entrypoint.sh.
echo "setup-env: environment ready"
exec "$@"
