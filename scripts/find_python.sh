#!/usr/bin/env bash
# Prints the path of a Python >= 3.12: python3.13 / python3.12 / python3 on PATH, else pyenv's versions.
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; }
for cand in python3.13 python3.12 python3; do
  p=$(command -v "$cand" 2>/dev/null) || continue
  # pyenv shims exist for versions that are not selected; only accept one that really runs.
  if ok "$p"; then echo "$p"; exit 0; fi
done
root=${PYENV_ROOT:-$HOME/.pyenv}
# 3.12 first: it is the version the pinned ranges are tested with.
for d in $(ls -d "$root"/versions/3.12* 2>/dev/null | sort -Vr) $(ls -d "$root"/versions/3.1[3-9]* 2>/dev/null | sort -V); do
  p="$d/bin/python3"
  if [ -x "$p" ] && ok "$p"; then echo "$p"; exit 0; fi
done
echo "error: no Python >= 3.12 found (looked for python3.13/python3.12/python3 on PATH and in $root/versions)." >&2
echo "Install one (e.g. 'pyenv install 3.12') and run make again." >&2
exit 1
