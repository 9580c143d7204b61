#!/usr/bin/env bash
# Issue 19's CPU table in one command: ours ÷ PyTorch (train step, co-smoothing forwards) for NDT1 and NDT2,
# small and paper size, float32 and bf16, on this host, as docs/performance.md reports it (about 15 minutes on a
# 2-core host; run it with nothing else on the machine, since both sides share its cores).
#
#   bash scripts/cpu_ratio_table.sh            # needs the PyTorch extra: pip install -r requirements-convert.txt
#   SMOKE=1 bash scripts/cpu_ratio_table.sh    # the small models, one round each (checks the script, about a minute)
#
# Writes $OUT/<model>_<dtype>.json (bench's JSON), <model>_<dtype>.log, and $OUT/table.md: the host's CPU and
# vector instruction sets (AMX, AVX-512, AVX2 decide these ratios), then one row per model and dtype.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/cpu_ratio_table}
mkdir -p "$OUT"
if [ -n "${SMOKE:-}" ]; then
  ROWS=("ndt1_small configs/ndt1.py" "ndt2_small configs/ndt2.py") ROUNDS="--rounds=1 --steps=1"
  PAPER_ROUNDS="$ROUNDS"
else
  ROWS=("ndt1_small configs/ndt1.py" "ndt2_small configs/ndt2.py" "ndt1_paper configs/ndt1.py:paper"
        "ndt2_paper configs/ndt2.py:paper") ROUNDS="--rounds=5" PAPER_ROUNDS="--rounds=2 --steps=1"
fi
for row in "${ROWS[@]}"; do
  set -- $row
  name=$1 config=$2
  rounds=$ROUNDS
  [ "$name" = ndt2_paper ] && rounds=$PAPER_ROUNDS  # a step of several seconds on 2 cores
  for dtype in fp32 bf16; do
    echo "== $name $dtype: python -m ibl_jax.bench --config=$config --what=torch --dtype=$dtype $rounds"
    python -m ibl_jax.bench --config="$config" --what=torch --dtype="$dtype" $rounds \
      --out="$OUT/${name}_$dtype.json" > "$OUT/${name}_$dtype.log" 2>&1 || echo "   failed: see $OUT/${name}_$dtype.log"
  done
done
python - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows, host = [], None
for path in sorted(out.glob("*_*.json")):
  r = json.loads(path.read_text())
  host = host or r["device"].get("host_cpu")
  for batch, s in r["torch"]["sizes"].items():
    spread = lambda xs: f"{min(xs):.2f}–{max(xs):.2f}"
    rows.append(f"| {path.stem.rsplit('_', 1)[0]} | {r['dtype']} | {batch} | **{s['train_ratio']:.2f}** "
                f"({spread(s['train_ratio_rounds'])}) | **{s['eval_ratio']:.2f}** ({spread(s['eval_ratio_rounds'])}) | "
                f"{s['ours_train_trials_per_s']:.1f} / {s['torch_train_trials_per_s']:.1f}; "
                f"{s['ours_eval_forwards_per_s']:.0f} / {s['torch_eval_forwards_per_s']:.0f} |")
cpu = f"{host['model']} ({', '.join(host['isa']) or 'no AVX2'})" if host else "unknown"
lines = [f"host CPU: {cpu}", "", "| model | dtype | batch | train (rounds) | co-smoothing (rounds) | "
         "ours / PyTorch (train trials/s; forwards/s) |", "|---|---|---|---|---|---|", *rows]
(out / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
