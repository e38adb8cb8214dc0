"""What `--amp` means on the machine at hand: fp16 autocast (with a GradScaler) on CUDA; on a CPU, bf16 autocast
only where the processor runs bf16 natively (avx512_bf16 or AMX on x86, the bf16 extension on ARM). Elsewhere
(AVX2-only x86: most laptops, AMD before Zen 4) oneDNN emulates bf16, and a training step of the CPU recipe took
34x longer than in fp32, so --amp trains in fp32 there and says so.

    precision = amp_precision(device, args.amp)        # "fp16", "bf16" or "fp32"
    with autocast(device, precision): logits = model(x)

TRASHSEG_CPU_BF16=1 (or 0) overrides the check, for a CPU the check judges wrongly and for the tests.
The memory format is measured the same way rather than assumed: choose_memory_format.
"""
import copy
import os
import platform
import time

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


def faster_memory_format(model, batch_shape, num_classes, device, precision, steps=2):
    """(channels_last is over 5% faster, seconds per step channels_last, seconds per step contiguous): both timed on
    training steps (forward, loss, backward; no optimizer step) of a copy of the model on a random batch, `steps`
    each after one warm-up, interleaved. Which is faster depends on the network, the processor and the threads (on
    one AVX2 CPU channels_last slowed DeepLabV3+ by 16% on two threads, UPerNet-128 by 10% on one, and sped
    UPerNet-128 up by 6% on two), so it is measured, not assumed."""
    with torch.random.fork_rng(devices=[]):  # the run's random stream stays as if nothing had been measured
        return _time_formats(copy.deepcopy(model).to(device).train(), batch_shape, num_classes, device, precision,
                             steps)


def _time_formats(probe, batch_shape, num_classes, device, precision, steps):
    x = torch.randn(batch_shape, device=device)
    y = torch.randint(0, num_classes, (batch_shape[0],) + tuple(batch_shape[2:]), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(channels_last):
        probe.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        images = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        sync()
        t = time.perf_counter()
        with autocast(device, precision):
            out = probe(images)
        if isinstance(out, dict):  # mask classification: its final prediction stands in for the set loss
            loss = out["logits"].float().square().mean() + out["masks"].float().square().mean()
        else:
            loss = torch.nn.functional.cross_entropy((out[0] if isinstance(out, tuple) else out).float(), y)
        loss.backward()
        probe.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t
    times = {True: [], False: []}
    for i in range(steps + 1):
        for channels_last in (True, False):
            seconds = step(channels_last)
            if i:  # the first of each is warm-up
                times[channels_last].append(seconds)
    cl, plain = min(times[True]), min(times[False])
    return cl < 0.95 * plain, cl, plain  # within 5% is noise here: keep torch's default (contiguous)


def choose_memory_format(model, batch_shape, num_classes, device, precision):
    """(channels_last?, a line for the log or None): on CUDA channels_last (faster on the H200, and what Tensor
    Cores want); on a CPU whichever format faster_memory_format measures faster for this network."""
    if device.type == "cuda":
        return True, None
    faster, cl, plain = faster_memory_format(model, batch_shape, num_classes, device, precision)
    return faster, (f"memory format: channels_last {cl:.2f} s/step, contiguous {plain:.2f} s/step (forward + "
                    f"backward, measured here): using {'channels_last' if faster else 'contiguous'} "
                    f"(--channels-last or --no-channels-last to choose)")
