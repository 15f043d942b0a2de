#!/bin/bash
# Stand-in for /opt/nvidia/nvidia_entrypoint.sh, the ENTRYPOINT of NVIDIA's NGC images (and so of
# nearly every image built on them): it prints the CUDA banner, runs the image's setup scripts
# (/opt/nvidia/entrypoint.d), then runs its arguments with `exec "$@"` (bash when there are none).
echo
echo "=========="
echo "== CUDA =="
echo "=========="
echo
echo "CUDA Version 13.0.1"
export NVIDIA_ENTRYPOINT_RAN=1
if [[ $# -eq 0 ]]; then
  exec /bin/bash
else
  exec "$@"
fi
