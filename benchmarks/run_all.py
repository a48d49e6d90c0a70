"""Run every benchmark in benchmarks/ and merge their results into benchmarks/results/bench.json
(with this machine's info), the file `logitflow report` reads.

Run: .venv/bin/python benchmarks/run_all.py          (what `make bench` does)
     .venv/bin/python benchmarks/run_all.py --merge-only   (merge results already in results/)
Each result keeps the machine info of the run that measured it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine

from logitflow.fsio import atomic_write_json

HERE = Path(__file__).resolve().parent
SKIP = {"common.py", "run_all.py"}
BENCH_FILE = RESULTS / "bench.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merge-only", action="store_true", help="do not run; merge results/*.json")
    args = parser.parse_args()
    if not args.merge_only:
        for script in sorted(p for p in HERE.glob("*.py") if p.name not in SKIP):
            print(f"== {script.name}", flush=True)
            subprocess.run([sys.executable, str(script)], check=True)
    results = {path.stem: json.loads(path.read_text()) for path in sorted(RESULTS.glob("*.json")) if path != BENCH_FILE}
    atomic_write_json(
        BENCH_FILE,
        {"generated": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(), "benchmarks": results},
    )
    print(f"wrote {BENCH_FILE} ({', '.join(results)})")


if __name__ == "__main__":
    main()
