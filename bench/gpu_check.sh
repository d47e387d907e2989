#!/usr/bin/env bash
# GPU acceptance check of the fused kernels (csrc/) on a CUDA machine (H100/H200; python3 with torch, no
# internet needed). From the repository root or anywhere:
#
#     bash bench/gpu_check.sh            # PYTHON=... to pick the interpreter, SKIP_BUILD=1 to reuse a build
#
# 1. builds the extensions from source in place (BCD_STRICT_BUILD=1: a compile error fails the check),
# 2. runs the CUDA tests (python -m pytest -m cuda -q tests/test_kernels.py; without pytest, a small built-in
#    runner executes the same test functions),
# 3. runs the quickstart recipe on the GPU with ops backend cuda and reference and compares the metrics
#    (bench/gpu_engine_check.py),
# 4. times Algorithm 1's rounds against a naive implementation (bench/round_throughput.py --device cuda),
# 5. runs bench/kernel.py --device cuda,
# and prints the bench table last. Exit status: non-zero when the build, the tests or the runs failed.
# With SAVE_DIR set, the logs, the bench table and the built extensions are copied there.
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
from bcdcore import _compiled
print("compiled ops:", _compiled.info())
assert _compiled.cuda_module is not None, "the CUDA extension did not load"
EOF

for so in bcdcore/_C*.so; do  # a static libstdc++ copy in an extension crashes formatting numbers
  echo "$so links: $(readelf -d "$so" 2>/dev/null | grep -o 'libstdc++[^]]*' || echo 'no shared libstdc++')"
done

echo "== tests: $PY -m pytest -q tests/test_kernels.py (cpu and cuda) and the cuda test of tests/test_measure.py"
if $PY -c "import pytest" 2>/dev/null; then
  $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    tests/test_measure.py::test_memory_peak_on_cuda_and_hessian_blocks_on_gpu >"$out/tests.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -n 20
  tail -n 2 "$out/tests.log"
else
  echo "(pytest is not installed here: running the cuda tests with the built-in runner)"
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

echo "== rounds: $PY bench/round_throughput.py --device cuda (Algorithm 1 vs a naive implementation)"
timeout 180 $PY bench/round_throughput.py --device cuda --rounds 10 --warmup 2 >"$out/rounds.log" 2>&1 \
  || echo "round_throughput failed or ran past 180 s (see rounds.log)"
sed -n '/^candidate/,/^best speedup/p' "$out/rounds.log"

echo "== bench: $PY bench/kernel.py --device cuda"
$PY bench/kernel.py --device cuda --out "$out/table.md" >"$out/bench.log" 2>&1 || { status=1; tail -n 30 "$out/bench.log"; }
if [ -n "${SAVE_DIR:-}" ]; then
  mkdir -p "$SAVE_DIR"
  cp "$out"/*.log "$out"/table.md bcdcore/_C*.so "$SAVE_DIR"/ 2>/dev/null
fi
if [ -s "$out/table.md" ]; then
  echo
  cat "$out/table.md"
fi
exit $status
