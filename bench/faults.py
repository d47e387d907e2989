"""The fault table: every fault of tests/faults.py injected into real `bcdcore` processes, then what was
expected and what was observed, side by side.

    .venv/bin/python bench/faults.py            # all faults (about two minutes on 2 cores)
    .venv/bin/python bench/faults.py disk kill  # only faults whose name contains one of the words
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from faults import FAULTS  # noqa: E402


def main(words: list[str]) -> int:
    chosen = [f for f in FAULTS if not words or any(w in f.name for w in words)]
    rows, survived, intact = [], 0, 0
    for fault in chosen:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="bcd-fault-") as tmp:
            try:
                seen = fault.inject(Path(tmp))
                observed, ok, kept = seen.observed, seen.survived, seen.intact
            except Exception as exc:  # noqa: BLE001 - a harness failure is a row, not a crash
                observed, ok, kept = f"harness error: {type(exc).__name__}: {exc}", False, False
        survived += ok
        intact += ok and kept
        rows.append((fault.name, fault.expected, observed, "yes" if ok else "NO", "yes" if kept else "NO",
                     f"{time.perf_counter() - start:.0f}s"))
        print(f"{fault.name}: {'ok' if ok and kept else 'FAILED'}", file=sys.stderr, flush=True)
    print("| fault | expected | observed | survived | nothing lost | time |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    print(f"\n{len(rows)} faults tried, {survived} survived, {intact} survived with nothing lost")
    return 0 if intact == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
