#!/usr/bin/env bash
# A downstream project's view of kvlink: install it into a temporary
# prefix, compile each installed header alone, build an example there
# with g++ and pkg-config alone (no flags of our own: the .pc must carry
# the C++ standard, Asio's configuration and every library), check that
# this CPU-only engine contains no CUDA, and run it against the real
# server; in a CUDA build, also build a GPU engine with kvlink-cuda.pc and
# start it without libcudart.so; import the installed Python package.
#
# downstream.sh BUILD_DIR EXAMPLE_SOURCE RUN_EXAMPLE KVLINK_SERVER
set -euo pipefail
build=$1 source=$2 runner=$3 server=$4
tmp=$(mktemp -d /tmp/kvlink-downstream-XXXXXX)
trap 'rm -rf "$tmp"' EXIT

meson install -C "$build" --destdir "$tmp" --no-rebuild --quiet >/dev/null
pc=$(find "$tmp" -name kvlink.pc | head -1)
[ -n "$pc" ] || { echo "downstream: meson install wrote no kvlink.pc"; exit 1; }
prefix=$(sed -n 's/^prefix=//p' "$pc")
pkgconf() { PKG_CONFIG_PATH=$(dirname "$pc") pkg-config --define-variable=prefix="$tmp$prefix" "$@"; }
# kvlink-cuda.pc exists in CUDA builds: engines that register GPU memory.
packages=kvlink
pkgconf --exists kvlink-cuda && packages="kvlink kvlink-cuda"
flags=$(pkgconf --cflags --libs kvlink)
echo "downstream: g++ $(basename "$source") $flags"

# Every installed header compiles on its own: it includes what it uses,
# and only what is installed.
cflags=$(pkgconf --cflags $packages)
include=$(find "$tmp" -type d -name kvlink -path '*/include/*' | head -1)
headers=$(cd "$include/.." && find kvlink -name '*.hpp' | sort)
failed=0
for h in $headers; do
  echo "#include <$h>" | g++ -x c++ -fsyntax-only $cflags - || { echo "downstream: $h does not compile alone"; failed=1; }
done
[ "$failed" = 0 ] || exit 1
echo "downstream: $(echo "$headers" | wc -w) installed headers each compile alone"

# The example's own header sits beside it, as in a consumer's tree.
cp "$source" "$(dirname "$source")"/example_kv.hpp "$tmp/"
g++ -o "$tmp/engine" "$tmp/$(basename "$source")" $flags
if ldd "$tmp/engine" | grep -q -i cuda || nm "$tmp/engine" | grep -q ' cuda[A-Z]'; then
  echo "downstream: a CPU-only engine links CUDA:"
  ldd "$tmp/engine"
  exit 1
fi
KVLINK_SERVER=$server "$runner" "$tmp/engine"
echo "downstream: built with pkg-config alone and ran against kvlink-server"

# A GPU engine's build: the CUDA export library, with the CUDA runtime
# linked in; it must start (and say why there is no device) without
# libcudart.so.
if [ "$packages" != kvlink ]; then
  cat >"$tmp/gpu_engine.cpp" <<'CPP'
#include <cstdio>
#include <kvlink/transfer/cuda_export.hpp>
int main() {
  kvlink::transfer::cuda::EngineEvent event;
  const kvlink::Error err = event.create();
  std::printf("gpu_engine: %s\n", err ? err.message().c_str() : "event created on a CUDA device");
}
CPP
  g++ -o "$tmp/gpu_engine" "$tmp/gpu_engine.cpp" $(pkgconf --cflags --libs kvlink-cuda)
  if ldd "$tmp/gpu_engine" | grep -q libcudart; then
    echo "downstream: the CUDA consumer needs the shared CUDA runtime"
    exit 1
  fi
  "$tmp/gpu_engine"
  echo "downstream: a CUDA consumer built with pkg-config kvlink-cuda alone and started"
fi

# The Python package, where the build made one: meson install put it into
# the prefix's directory that /usr/bin/python3 searches; it imports from
# there alone (the extension and the pure-Python modules side by side).
ext=$(find "$tmp" -name '_kvlink*.so' | head -1)
if [ -n "$ext" ]; then
  site=$(dirname "$(dirname "$ext")")
  # Where it goes without --destdir must be a directory python3 searches.
  /usr/bin/python3 -c "import sys; d = sys.argv[1]; assert d in sys.path, d + ' is not on python3 sys.path: ' + str(sys.path)" "${site#"$tmp"}" \
    || { echo "downstream: meson install puts the Python package where python3 does not look"; exit 1; }
  (cd "$tmp" && PYTHONPATH=$site /usr/bin/python3 -c "
import kvlink, os
assert kvlink.__file__.startswith('$site'), kvlink.__file__
layout = kvlink.paged_layout(1, 4, 16, 4, 32, 2)
cache = kvlink.CpuKvCache(layout)
print('downstream: the installed Python package imports from', os.path.dirname(kvlink.__file__), 'and made a', cache.nbytes, 'byte KV cache')")
fi
