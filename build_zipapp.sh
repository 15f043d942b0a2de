#!/usr/bin/env bash
# Build dist/sparkrun.pyz with shiv: one file that runs on any Linux CPU with python3 >= 3.10.
set -euo pipefail
cd "$(dirname "$0")"
out=${1:-dist/sparkrun.pyz}
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT

# tomli is what huggingface_hub needs on Python 3.10; listed so a build on a newer Python keeps it.
python3 -m pip install --quiet --disable-pip-version-check --no-binary tomli --target "$build/site" . tomli

# Compiled extensions would tie the file to one CPU and Python version. Everything shipped
# works without them: PyYAML falls back to its pure-Python parser, huggingface_hub to plain HTTP.
rm -rf "$build"/site/hf_xet "$build"/site/hf_xet-*.dist-info "$build"/site/_yaml "$build"/site/yaml/_yaml*.so "$build"/site/bin
compiled=$(find "$build/site" \( -name '*.so' -o -name '*.so.*' -o -name '*.pyd' \) | head -5)
if [ -n "$compiled" ]; then
    echo "build_zipapp.sh: compiled files would make the zipapp non-portable:" >&2
    echo "$compiled" >&2
    exit 1
fi

mkdir -p "$(dirname "$out")"
python3 -m shiv --site-packages "$build/site" --entry-point sparkrun:main \
    --python '/usr/bin/env python3' --reproducible --compressed --output-file "$out"
echo "built $out ($(du -h "$out" | cut -f1))"
