#!/usr/bin/env bash
# GPU acceptance check of the fused kernels (csrc/) on a CUDA machine (H100/H200; python3 with torch, no
# internet needed). From the repository root or anywhere:
#
#     bash bench/gpu_check.sh            # PYTHON=... to pick the interpreter, SKIP_BUILD=1 to reuse a build
#
# 1. builds the extensions from source in place (BCD_STRICT_BUILD=1: a compile error fails the check),
# 2. runs the CUDA tests (python -m pytest -m cuda over the kernel, multi-slice, CUDA-graph and measure tests;
#    none of them imports the TUI; without pytest, a small built-in runner executes test_kernels.py's),
# 3. runs the quickstart recipe on the GPU with ops backend cuda and reference and compares the metrics
#    (bench/gpu_engine_check.py),
# 4. times Algorithm 1's rounds against a naive implementation, then eager rounds against CUDA-graph rounds
#    (rounds/s, GPU busy share) on the seed's CNN recipe and ResNet-18 (bench/round_throughput.py --device cuda,
#    which runs bench/graph_rounds.py),
# 5. runs bench/kernel.py --device cuda (per-block calls, one multi-slice call and one flat call among others),
# and prints the kernel table, then the eager-vs-graphs table, last. Exit status: non-zero when the build, the
# tests or the runs failed. With SAVE_DIR set, the logs, the tables and the built extensions are copied there.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export BCD_STRICT_BUILD=1 BCD_NO_JIT=1 PYTHONDONTWRITEBYTECODE=1
out=$(mktemp -d)
status=0

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || true
$PY -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
command -v nvcc >/dev/null && nvcc --version | tail -n 2

if [ "${SKIP_BUILD:-0}" != "1" ]; then
  echo "== build: $PY setup.py build_ext --inplace"
  t0=$(date +%s)
  if $PY setup.py build_ext --inplace >"$out/build.log" 2>&1; then
    echo "built in $(( $(date +%s) - t0 )) s"
  else
    status=1
    echo "BUILD FAILED; last lines of the log:"
  fi
  grep -E "warning|error|bcdcore build" "$out/build.log" | grep -v "^ninja: " | tail -n 20
  [ $status -ne 0 ] && tail -n 40 "$out/build.log"
fi
$PY - <<'EOF' || status=1
import torch
from bcdcore.ops import compiled
print("compiled ops:", compiled.info())
assert compiled.cuda_module is not None, "the CUDA extension did not load"
assert hasattr(compiled.cuda_module, "multi"), "the CUDA extension has no multi-slice op (a stale build?)"
EOF

for so in bcdcore/_C*.so; do  # a static libstdc++ copy in an extension crashes formatting numbers
  echo "$so links: $(readelf -d "$so" 2>/dev/null | grep -o 'libstdc++[^]]*' || echo 'no shared libstdc++')"
done

GPU_TESTS="tests/test_kernels.py tests/test_multislice.py tests/test_graphs.py tests/test_measure.py"
echo "== tests: $PY -m pytest -m cuda $GPU_TESTS"
if $PY -c "import pytest, hypothesis" 2>/dev/null; then
  # shellcheck disable=SC2086
  $PY -m pytest -q -p no:cacheprovider -m cuda $GPU_TESTS >"$out/tests.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -n 20
  tail -n 2 "$out/tests.log"
else
  echo "(pytest or hypothesis is not installed here: running test_kernels.py's cuda tests with the built-in runner)"
  $PY - <<'EOF' || status=1
# A minimal stand-in for the parts of pytest that tests/test_kernels.py uses.
import importlib.util, itertools, re, sys, traceback, types

class Skip(Exception):
    pass

class Mark:
    def __init__(self, name, args=(), kwargs=None):
        self.name, self.args, self.kwargs = name, args, kwargs or {}
    def __call__(self, f):
        f.__dict__.setdefault("marks", []).append(self)
        return f

class MarkGen:
    def __getattr__(self, name):
        def make(*args, **kwargs):
            if len(args) == 1 and callable(args[0]) and not kwargs and name not in ("skipif", "parametrize"):
                return Mark(name)(args[0])
            return Mark(name, args, kwargs)
        return make if name in ("skipif", "parametrize") else Mark(name)

class Raises:
    def __init__(self, exc, match=None):
        self.exc, self.match, self.value = exc, match, None
    def __enter__(self):
        return self
    def __exit__(self, et, ev, tb):
        if et is None:
            raise AssertionError(f"DID NOT RAISE {self.exc}")
        if not issubclass(et, self.exc):
            return False
        if self.match and not re.search(self.match, str(ev)):
            raise AssertionError(f"{ev!r} does not match {self.match!r}")
        self.value = ev
        return True

pt = types.ModuleType("pytest")
pt.mark = MarkGen()
pt.skip = lambda reason="": (_ for _ in ()).throw(Skip(reason))
pt.raises = lambda exc, match=None: Raises(exc, match)
sys.modules["pytest"] = pt

spec = importlib.util.spec_from_file_location("test_kernels", "tests/test_kernels.py")
mod = importlib.util.module_from_spec(spec)
sys.modules["test_kernels"] = mod
spec.loader.exec_module(mod)
passed = failed = skipped = 0
for name, fn in list(vars(mod).items()):
    if not name.startswith("test_") or not callable(fn):
        continue
    marks = getattr(fn, "marks", [])
    if not any(m.name == "cuda" for m in marks):
        continue
    skip = next((m.kwargs.get("reason", "") for m in marks if m.name == "skipif" and m.args and m.args[0]), None)
    grids = [m for m in marks if m.name == "parametrize"]
    names = [m.args[0] for m in grids]
    for combo in itertools.product(*[list(m.args[1]) for m in grids]):
        label = name + (str(combo) if combo else "")
        if skip is not None:
            skipped += 1
            continue
        try:
            fn(**dict(zip(names, combo)))
            passed += 1
        except Skip:
            skipped += 1
        except Exception:
            failed += 1
            print("FAILED", label[:160])
            traceback.print_exc(limit=3)
print(f"{passed} passed, {failed} failed, {skipped} skipped (built-in runner)")
sys.exit(1 if failed else 0)
EOF
fi

echo "== engine: recipes/quickstart.toml on the GPU, ops backend cuda vs reference"
$PY bench/gpu_engine_check.py "$out/runs" || status=1
# the inexactness rule on (device-side flag, predicated step, host read a step later): same stops as reference
$PY bench/gpu_engine_check.py "$out/runs_rule" recipes/quickstart.toml cuda algorithm.accuracy_factor=200 || status=1

echo "== rounds: $PY bench/round_throughput.py --device cuda (vs a naive implementation; eager vs CUDA graphs)"
PYTHONUNBUFFERED=1 timeout 420 $PY bench/round_throughput.py --device cuda --rounds 5 --warmup 1 \
  --graphs-table "$out/graphs.md" >"$out/rounds.log" 2>&1 || { status=1; echo "round_throughput failed or ran \
past 420 s; its last lines:"; tail -n 15 "$out/rounds.log"; }
sed -n '/^candidate/,/^best speedup/p' "$out/rounds.log"
grep -E "^  (seed CNN|ResNet-18):" "$out/rounds.log"

echo "== bench: $PY bench/kernel.py --device cuda"
$PY bench/kernel.py --device cuda --out "$out/table.md" >"$out/bench.log" 2>&1 || { status=1; tail -n 30 "$out/bench.log"; }
if [ -n "${SAVE_DIR:-}" ]; then
  mkdir -p "$SAVE_DIR"
  cp "$out"/*.log "$out"/*.md bcdcore/_C*.so "$SAVE_DIR"/ 2>/dev/null
fi
for t in table.md graphs.md; do
  if [ -s "$out/$t" ]; then
    echo
    cat "$out/$t"
  fi
done
exit $status
