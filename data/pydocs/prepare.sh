#!/usr/bin/env bash
# The AGD study's corpus: the Python 3.11 documentation sources (497 reST files, English prose,
# ~11M bytes, ~3.5M GPT-2 tokens) from Debian's python3.11-doc package, prepared twice:
#   data/pydocs/bytes  (data.tokenizer=bytes)   data/pydocs/gpt2  (data.tokenizer=gpt2)
# with a 5% held-out split by document hash. Run from the repository root:
#   bash data/pydocs/prepare.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
SOURCES=/usr/share/doc/python3.11/html/_sources
if [ ! -d "$SOURCES" ]; then
  apt-get update -qq && apt-get install -y -qq python3-doc
fi
for tok in bytes gpt2; do
  if [ -f "data/pydocs/$tok/meta.json" ]; then
    echo "data/pydocs/$tok is ready"
  else
    rm -rf "data/pydocs/$tok"
    agdlm prepare "$SOURCES" "data/pydocs/$tok" --tokenizer "$tok" --val-fraction 0.05 --no-progress
  fi
done
