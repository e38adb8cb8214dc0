"""What `--amp` means on the machine at hand: fp16 autocast (with a GradScaler) on CUDA; on a CPU, bf16 autocast
only where the processor runs bf16 natively (avx512_bf16 or AMX on x86, the bf16 extension on ARM). Elsewhere
(AVX2-only x86: most laptops, AMD before Zen 4) oneDNN emulates bf16, and a training step of the CPU recipe took
34x longer than in fp32, so --amp trains in fp32 there and says so.

    precision = amp_precision(device, args.amp)        # "fp16", "bf16" or "fp32"
    with autocast(device, precision): logits = model(x)

TRASHSEG_CPU_BF16=1 (or 0) overrides the check, for a CPU the check judges wrongly and for the tests.
"""
import os
import platform

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _cpu_flag(name):
    check = getattr(torch.cpu, name, None)  # private helpers of torch.cpu: absent from older releases
    try:
        return bool(check()) if check else False
    except RuntimeError:
        return False


def cpu_bf16_native():
    """True where this CPU has bf16 instructions. oneDNN's own check (torch.ops.mkldnn._is_mkldnn_bf16_supported)
    also says yes on AVX-512 without bf16, where it converts in software; so on x86 the bf16 flags decide."""
    forced = os.environ.get("TRASHSEG_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    if not onednn:
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
        return _cpu_flag("_is_avx512_bf16_supported") or _cpu_flag("_is_amx_tile_supported")
    return True


def cpu_isa():
    """The vector instructions torch dispatches to here (e.g. AVX2, AVX512), for the one-line note."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return platform.machine()


def amp_precision(device, amp):
    """The precision a run uses: fp32 without --amp; with it fp16 on CUDA, bf16 on a CPU with native bf16, else
    fp32. device: a torch.device or its type."""
    kind = getattr(device, "type", device)
    if not amp:
        return "fp32"
    if kind == "cuda":
        return "fp16"
    return "bf16" if cpu_bf16_native() else "fp32"


def precision_note(device, amp, doing="training"):
    """One line for the log where --amp did not get mixed precision, else None."""
    if amp and amp_precision(device, amp) == "fp32":
        return (f"--amp: this CPU has no native bf16 ({cpu_isa()}): {doing} in fp32, which is faster here "
                f"(TRASHSEG_CPU_BF16=1 forces bf16)")
    return None


def autocast(device, precision):
    """Autocast to the precision's dtype; a no-op context for fp32. precision: one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    kind = getattr(device, "type", device)
    return torch.autocast(kind, dtype=DTYPES.get(precision, torch.bfloat16), enabled=precision != "fp32")
