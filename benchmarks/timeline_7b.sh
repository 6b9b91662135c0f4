#!/usr/bin/env bash
# Timelines of cold cws apply/extract/compare on bench_scale's 7B-shaped checkpoints, each next to
# disk_floor.py doing the same I/O with no compute, so the two disk rates come from the same minute.
#   bash benchmarks/timeline_7b.sh [DATA_DIR (default /work/scale/7b-L24)] [OUT (default benchmarks/results/timeline.json)]
# DATA_DIR holds base/, pos/, neg/ (python benchmarks/bench_scale.py --keep makes them); writes DATA_DIR/../tl-out.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
data=${1:-/work/scale/7b-L24}
out=${2:-$here/results/timeline.json}
work=$(dirname "$data")/tl-out
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
tl() { python "$here/timeline.py" --out "$out" --name "$1" -- "${@:2}" | tail -1; }
shards() { ls "$data"/"$1"/*.safetensors; }
bytes=$(cat "$data"/base/*.safetensors | wc -c)
tl "cws extract --pos --neg --dtype bfloat16" cws extract --pos "$data/pos" --neg "$data/neg" --dtype bfloat16 --out "$work/dir" -q
tl "disk_floor: read pos+neg, write one output" python "$here/disk_floor.py" --read $(shards pos) $(shards neg) --write "$work/f.bin" --bytes "$bytes"
rm -f "$work/f.bin"
tl "cws compare" cws compare --base "$data/base" --model "$data/pos" --direction "$work/dir" -q --json "$work/c.json"
tl "disk_floor: read base+pos+direction" python "$here/disk_floor.py" --read $(shards base) $(shards pos) "$work"/dir/*.safetensors
tl "cws apply --pos --neg" cws apply --model "$data/base" --pos "$data/pos" --neg "$data/neg" --alpha 1 --out "$work/apply" -q
rm -rf "$work/apply"
tl "disk_floor: read base+pos+neg, write one output" python "$here/disk_floor.py" --read $(shards base) $(shards pos) $(shards neg) --write "$work/f.bin" --bytes "$bytes"
