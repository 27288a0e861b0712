#!/usr/bin/env bash
# BigDL PPML's submit script, run by ppml: the same options and SimpleQuery arguments
# (docs/migrating-from-bigdl.md §6). `--verbose` shows what each option becomes.
set -euo pipefail
exec "${PPML:-ppml}" bigdl-submit "$@"
