#!/usr/bin/env bash
# Prepare .whl/: DeepSpeed and the pure-Python packages it needs that the GPU machine's image lacks,
# as wheels for that machine's Python 3.12 (x86-64), so benchmarks/gpu_check.sh can install them
# there without a package index.
#
# Run HERE (a machine with pip access to PyPI), from anywhere inside the repository:
#
#     bash benchmarks/gpu_bundle.sh            # versions as installed in the active Python environment
#     DEEPSPEED_VERSION=0.19.8 bash benchmarks/gpu_bundle.sh
#
# DeepSpeed publishes only an sdist; it is built here into a pure-Python wheel (DS_BUILD_OPS=0: no
# compiled ops, which HyLo does not use) with the active environment's torch and setuptools
# (--no-build-isolation, so no second torch is downloaded). Which accelerator DeepSpeed uses is
# decided at run time, so a wheel built on a CPU machine runs on CUDA.
#
# The GPU image already holds einops, msgpack, ninja, numpy, packaging, psutil, py-cpuinfo, tqdm
# and torch (see the device notes); missing are hjson and pydantic with its needs
# (pydantic-core, a compiled cp312 wheel, annotated-types, typing-inspection, typing-extensions).
# .whl/ is ignored through the repository's info/exclude (not .gitignore) and kept under 60 MiB.
set -euo pipefail

ROOT="$(git rev-parse --show-toplevel)"
cd "$ROOT"
PY="${PYTHON:-python3}"
WHL="$ROOT/.whl"
LIMIT_MIB=60

EXCLUDE="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >>"$EXCLUDE"

installed_version() {  # version of a distribution in the active environment, or empty
    "$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1"
}

pin() {  # NAME -> NAME==VERSION with the version from $VAR_VERSION or the active environment
    local name="$1" var value
    var="$(echo "$name" | tr 'a-z-' 'A-Z_')_VERSION"
    value="${!var:-$(installed_version "$name")}"
    if [ -n "$value" ]; then echo "$name==$value"; else echo "$name"; fi
}

DS_SPEC="$(pin deepspeed)"
PURE=(hjson pydantic annotated-types typing-inspection typing-extensions)
BINARY=(pydantic-core)

rm -rf "$WHL"
mkdir -p "$WHL"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "== building $DS_SPEC as a pure-Python wheel (DS_BUILD_OPS=0)"
DS_BUILD_OPS=0 DS_ACCELERATOR=cpu "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir \
    --no-binary deepspeed -w "$TMP" "$DS_SPEC"
cp "$TMP"/deepspeed-*.whl "$WHL"/

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none)

for name in "${PURE[@]}"; do
    echo "== $(pin "$name")"
    "$PY" -m pip download -q --no-deps "${TARGET[@]}" --platform any "${PLATFORMS[@]}" -d "$WHL" "$(pin "$name")"
done
for name in "${BINARY[@]}"; do
    echo "== $(pin "$name") (cp312 manylinux x86-64)"
    "$PY" -m pip download -q --no-deps "${TARGET[@]}" "${PLATFORMS[@]}" -d "$WHL" "$(pin "$name")"
done

# Every Requires-Dist of the bundled wheels (extras aside) must be bundled or in the GPU image.
IMAGE="einops msgpack ninja numpy packaging psutil py-cpuinfo tqdm torch"
"$PY" - "$WHL" "$IMAGE" <<'EOF'
import re, sys, zipfile
from pathlib import Path

folder, image = Path(sys.argv[1]), set(sys.argv[2].split())
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
have = set()
needs = {}
for wheel in sorted(folder.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    name = norm(re.search(r"^Name: (.+)$", meta, re.M).group(1))
    have.add(name)
    for line in re.findall(r"^Requires-Dist: (.+)$", meta, re.M):
        if "extra ==" in line:
            continue
        needs.setdefault(norm(re.match(r"[A-Za-z0-9_.-]+", line).group(0)), []).append(name)
missing = {dep: by for dep, by in needs.items() if dep not in have and dep not in {norm(i) for i in image}}
if missing:
    sys.exit(f"missing from the bundle and the GPU image: {missing}")
print("requirements covered:", ", ".join(sorted(needs)))
EOF

ls -l "$WHL"
SIZE_KIB=$(du -sk "$WHL" | cut -f1)
echo "total $((SIZE_KIB / 1024)) MiB in $WHL"
if [ "$SIZE_KIB" -gt $((LIMIT_MIB * 1024)) ]; then
    echo "error: .whl is over $LIMIT_MIB MiB" >&2
    exit 1
fi
