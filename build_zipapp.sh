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

# The fast start below puts site-packages on the path without running .pth files: there must be none.
pth=$(find "$build/site" -maxdepth 1 -name '*.pth' | head -5)
if [ -n "$pth" ]; then
    echo "build_zipapp.sh: .pth files would be skipped by the zipapp's start-up:" >&2
    echo "$pth" >&2
    exit 1
fi

mkdir -p "$(dirname "$out")"
python3 -m shiv --site-packages "$build/site" --entry-point sparkrun:main \
    --python '/usr/bin/env python3' --reproducible --compressed --output-file "$build/shiv.pyz"

# Two changes to what shiv wrote. Bytecode for the building Python goes into the archive (shiv
# leaves it out; hash-checked, because unpacking does not keep modification times); other Python
# versions compile their own on first use, as usual. And a __main__.py that, once the archive is
# unpacked, finds the unpacked copy where shiv put it and imports sparkrun from there, without
# shiv's bootstrap and the ~25 ms of modules it imports (compileall, subprocess, zipfile,
# hashlib, ...). The first run, or any shiv setting in the environment, goes through shiv's
# bootstrap, which unpacks the archive.
python3 -m compileall -q --invalidation-mode checked-hash "$build/site"
python3 - "$build/shiv.pyz" "$build/site" "$out" <<'PY'
import json, pathlib, sys, zipfile

shiv_pyz, site, out = sys.argv[1:]
MAIN = '''import os
import sys

BUILD_ID = {build_id!r}
SHIV_SETTINGS = ("SHIV_FORCE_EXTRACT", "SHIV_INTERPRETER", "SHIV_ENTRY_POINT", "SHIV_MODULE",
                 "SHIV_CONSOLE_SCRIPT", "SHIV_EXTEND_PYTHONPATH", "SHIV_PREPEND_PYTHONPATH")


def unpacked_site_packages():
    """shiv's unpacked copy of this archive, $SHIV_ROOT (else ~/.shiv)/<file name>_<build id>."""
    if any(os.environ.get(name) for name in SHIV_SETTINGS):
        return None
    root = os.path.expanduser(os.environ.get("SHIV_ROOT") or "~/.shiv")
    name = f"{{os.path.basename(os.path.realpath(sys.argv[0]))}}_{{BUILD_ID}}"
    folder = os.path.join(root, name, "site-packages")
    return folder if os.path.isdir(folder) else None


site_packages = unpacked_site_packages()
if site_packages is None:
    import _bootstrap

    _bootstrap.bootstrap()
else:
    # Where shiv puts it: before the first site-packages folder on the path.
    first_site = next((i for i, p in enumerate(sys.path)
                       if os.path.basename(p) in ("site-packages", "dist-packages")), len(sys.path))
    sys.path.insert(first_site, site_packages)
    import sparkrun

    sys.exit(sparkrun.main())
'''
with zipfile.ZipFile(shiv_pyz) as archive, open(shiv_pyz, "rb") as raw, open(out, "wb") as target:
    target.write(raw.readline())  # the shebang
    build_id = json.loads(archive.read("environment.json"))["build_id"]
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as rebuilt:
        for info in archive.infolist():
            is_main = info.filename == "__main__.py"
            rebuilt.writestr(info, MAIN.format(build_id=build_id) if is_main else archive.read(info))
        for pyc in sorted(pathlib.Path(site).rglob("__pycache__/*.pyc")):
            info = zipfile.ZipInfo(f"site-packages/{pyc.relative_to(site)}", (1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            rebuilt.writestr(info, pyc.read_bytes(), zipfile.ZIP_DEFLATED)
PY
chmod 755 "$out"
echo "built $out ($(du -h "$out" | cut -f1))"
