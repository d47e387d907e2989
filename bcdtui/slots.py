"""The machine's slots: the GPUs nvidia-smi reports, else the one CPU slot (bcdtui.runner re-exports these)."""
from __future__ import annotations

import shutil
import subprocess

from bcdcore.scheduler import Slot, cpu_slot, gpu_slot

# GPUs: nvidia-smi, not torch, so that the workstation never loads torch (`bcdcore sweep` asks torch, which
# honours CUDA_VISIBLE_DEVICES)

def parse_nvidia_smi(text: str) -> list[Slot]:
    """Slots from `nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader,nounits`."""
    slots = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2 or not parts[0].isdigit():
            continue
        index, name = parts[0], parts[1]
        memory = ""
        if len(parts) > 2:
            try:
                memory = f" ({float(parts[2]) / 1024:.0f} GiB)"
            except ValueError:
                memory = ""
        slots.append(gpu_slot(index, f"{index}: {name}{memory}"))
    return slots


def detect_slots(nvidia_smi: str | None = "nvidia-smi", timeout: float = 5.0) -> list[Slot]:
    """The GPUs nvidia-smi reports (in its order), else the one CPU slot. Asks nvidia-smi, not torch, so that
    the caller never loads torch."""
    exe = shutil.which(nvidia_smi) if nvidia_smi else None
    if exe:
        try:
            out = subprocess.run([exe, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
            slots = parse_nvidia_smi(out.stdout) if out.returncode == 0 else []
            if slots:
                return slots
        except (OSError, subprocess.SubprocessError):
            pass
    return [cpu_slot()]
