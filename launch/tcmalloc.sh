#!/usr/bin/env bash
# Installs gperftools' tcmalloc where that is possible without asking (root, apt-get), for the
# commands to preload (pegjax.distributed.restart_with_tuned_malloc): XLA:CPU's temporaries are
# then reused instead of being faulted in afresh every step. Optional: without it the commands run
# on glibc's malloc, tuned, and a little slower. Run by .ci/run and launch/recipe.sh.
if ! python3 -c 'import ctypes.util, sys; sys.exit(ctypes.util.find_library("tcmalloc_minimal") is None)'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    timeout 300 apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 \
      || echo "note: apt-get could not install libtcmalloc-minimal4; running on glibc's malloc"
  else
    echo "note: no tcmalloc here; pegjax runs faster on CPU with it (Debian/Ubuntu: apt-get install libtcmalloc-minimal4)"
  fi
fi
