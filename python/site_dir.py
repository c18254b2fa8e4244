"""Prints the directory, relative to PREFIX (argv[1]), that this Python
searches for packages under that prefix, or nothing if there is none.

meson install needs it: Debian's python3 reads PREFIX/lib/python3.X/
dist-packages for /usr/local, but lib/python3/dist-packages only under
/usr, while meson's default follows the latter for every prefix (and
would install under /usr/local where python3 never looks)."""
import os
import sys

prefix = os.path.realpath(sys.argv[1])
for path in sys.path:
    if path.startswith(prefix + os.sep) and path.endswith(("dist-packages", "site-packages")):
        print(os.path.relpath(path, prefix))
        break
