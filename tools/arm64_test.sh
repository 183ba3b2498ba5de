#!/usr/bin/env bash
# Builds mhattn on aarch64 and runs its test suite there, from an x86-64 Linux machine with no
# ARM hardware: a Debian arm64 root made by debootstrap, whose programs (Python, g++, CMake)
# run through QEMU user-mode emulation. So the portable path is compiled by an aarch64 g++
# (NEON for the vector extensions) and tested by aarch64 binaries, instruction for instruction.
#
#   sudo tools/arm64_test.sh [ROOT]      ROOT defaults to /var/tmp/mhattn-arm64 (kept for reruns)
#
# Needs root (chroot, mounts, binfmt_misc) and Debian's qemu-user-static, binfmt-support and
# debootstrap (installed here when missing). Slow: the first run downloads ~300 MB, the build
# takes about 2 minutes and the tests about 30 under emulation. Not part of .ci/run for that
# reason; the README says when it last passed.
set -euo pipefail

ROOT=${1:-/var/tmp/mhattn-arm64}
SRC=$(cd "$(dirname "$0")/.." && pwd)

if ! command -v debootstrap >/dev/null || [ ! -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P ]; then
  apt-get install -y qemu-user-static binfmt-support debootstrap
fi
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64 2>/dev/null || true
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || { echo "qemu-aarch64 is not registered with binfmt_misc" >&2; exit 1; }

if [ ! -x "$ROOT/usr/bin/python3" ]; then
  debootstrap --arch=arm64 \
    --include=python3,python3-dev,python3-venv,python3-pip,python3-numpy,python3-pytest,python3-hypothesis,g++,cmake,ninja-build,make \
    bookworm "$ROOT" http://deb.debian.org/debian
fi

for d in proc sys dev; do mountpoint -q "$ROOT/$d" || mount --bind "/$d" "$ROOT/$d"; done
trap 'for d in proc sys dev; do umount "$ROOT/$d" 2>/dev/null || true; done' EXIT

# The build requirements are pure Python: fetch them here, where pip is set up for this
# network, and install them in the root without an index.
rm -rf "$ROOT/tmp/wheels" "$ROOT/src"
python3 -m pip download -q -d "$ROOT/tmp/wheels" --only-binary=:all: --python-version 3.11 \
  --platform manylinux2014_aarch64 "scikit-build-core>=0.10" "pybind11>=2.12"
mkdir -p "$ROOT/src"
git -C "$SRC" archive HEAD | tar -x -C "$ROOT/src"  # the committed tree, as CI sees it

chroot "$ROOT" /bin/bash -euo pipefail -c '
  export PIP_NO_INDEX=1 PIP_FIND_LINKS=/tmp/wheels PIP_DISABLE_PIP_VERSION_CHECK=1
  rm -rf /opt/venv
  python3 -m venv --system-site-packages /opt/venv   # NumPy, pytest, hypothesis from Debian
  /opt/venv/bin/pip install -q "scikit-build-core>=0.10" "pybind11>=2.12"
  cd /src
  /opt/venv/bin/pip install -q --no-build-isolation .
  cd /tmp
  echo "machine: $(uname -m)"
  /opt/venv/bin/python -c "import mhattn; mhattn.show_config()"
  /opt/venv/bin/python -m pytest /src/tests -q -p no:cacheprovider
'
