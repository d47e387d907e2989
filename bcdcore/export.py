"""`bcdcore export RUN_DIR --onnx`: the run's eval-mode model as model.onnx, checked and compared with torch."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch

from bcdcore.checkpoint import load_checkpoint
from bcdcore.recipe import RecipeError, load_recipe
from bcdcore.run import prepare


class ExportError(RuntimeError):
    """An export that failed, with the reason as one line."""


def load_trained(run_dir: Path):
    """The run's model with the weights of its checkpoint, on the CPU, in eval mode."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.toml").is_file():
        raise RecipeError(f"{run_dir}: not a run directory (no recipe.toml)")  # bad input: exit 2
    if not (run_dir / "checkpoint.pt").is_file():
        raise RecipeError(f"{run_dir}: no checkpoint.pt (the run has not stopped yet, or was killed hard)")
    recipe = load_recipe(run_dir / "recipe.toml", ["run.device=\"cpu\""])
    prepared = prepare(recipe)
    params = prepared.params
    template = {"flat": params.flat.detach().cpu(),
                "buffers": [[b.cpu() for b in bs] for bs in params.snapshot_buffers()]}
    state = load_checkpoint(run_dir / "checkpoint.pt", template)  # tensors only: never runs code from the file
    params.flat.copy_(state["flat"])
    params.restore_buffers(state["buffers"])
    prepared.params.set_trainable(None)
    prepared.model.eval()
    return prepared


def export_onnx(run_dir: Path, batch_size: int = 4, rtol: float = 1e-3, atol: float = 1e-4) -> Path:
    import onnx
    from onnx.reference import ReferenceEvaluator

    prepared = load_trained(run_dir)
    model, data = prepared.model, prepared.data
    source = data.test if len(data.test) else data.train
    example = source.x[:batch_size].cpu()
    out_path = Path(run_dir) / "model.onnx"
    tmp = out_path.with_suffix(".onnx.tmp")
    try:
        with torch.no_grad():  # before tracing: lazily built constants (ensemble hash weights) exist by then
            expected = model(example).numpy()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            buffer = io.BytesIO()
            torch.onnx.export(model, (example,), buffer, input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, dynamo=False)
        proto = onnx.load_from_string(buffer.getvalue())
        onnx.checker.check_model(proto, full_check=True)
        feed = example.numpy()
        if feed.dtype == np.float64:
            feed = feed.astype(np.float32)
        got = ReferenceEvaluator(proto).run(None, {"input": feed})[0]
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"ONNX export of {prepared.recipe.model.name} failed: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=rtol, atol=atol):
        worst = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else float("nan")
        raise ExportError(f"ONNX outputs differ from torch (max abs diff {worst:.3g}, shapes {got.shape} vs "
                          f"{expected.shape}); model.onnx not written")
    tmp.write_bytes(proto.SerializeToString())
    tmp.replace(out_path)
    return out_path
