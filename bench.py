"""Benchmarks that print figures (never run as tests): data loader, training step, inference; optionally side by
side with segmentation_models_pytorch (pip install -r requirements-bench.txt), interleaved in one process.

    python bench.py                                            # all sections, camvid when ../shared is there
    python bench.py --sections train infer --archs deeplabv3plus unet --backbones resnet18 --img-size 256 -b 4 --peer smp
    python bench.py --sections loader --img-size 512 --workers 2
    python bench.py --profile --archs deeplabv3plus --backbones resnet18 --img-size 256 -b 4 --peer smp --steps 3
"""
import argparse
import copy
import json
import platform
import resource
import shutil
import subprocess
import sys
import threading
import statistics
import tempfile
import time
from itertools import product
from pathlib import Path

import torch

from coco import load_coco
from demo import make_demo
from dataset import SegmentationDataset, default_workers
from exported import export_program
from inference import predict_probs, tta_flips
from model import build_model
from optim import build_optimizer
from precision import amp_precision, cpu_bf16_native, cpu_isa


def loader_samples_per_s(dataset, batch_size, workers, batches, repeats):
    """Median samples/s over `repeats` timed passes of `batches` batches, each after one warm-up batch (worker
    start-up is not counted)."""
    rates = []
    for _ in range(repeats):
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                             persistent_workers=False, drop_last=True)
        it = iter(loader)
        next(it)
        t, n = time.perf_counter(), 0
        for _ in range(batches):
            try:
                images = next(it)[0]
            except StopIteration:
                break
            n += images.shape[0]
        rates.append(n / (time.perf_counter() - t))
        del it, loader
    return statistics.median(rates)


def bench_loader(args):
    coco = load_coco(args.data_dir, args.train_json)
    rows = []
    cache_dir = Path(tempfile.mkdtemp(prefix="bench_mask_cache_"))
    try:
        warm = SegmentationDataset(coco, args.img_size, "none", mask_cache=cache_dir)
        t = time.perf_counter()
        for i in range(len(warm)):  # fill the cache once, as the first epoch of a run does
            warm.load(i)
        fill_s = time.perf_counter() - t
        for preset in args.presets:
            for cached in (False, True):
                ds = SegmentationDataset(coco, args.img_size, preset, mask_cache=cache_dir if cached else None)
                rate = loader_samples_per_s(ds, args.batch_size, args.workers, args.batches, args.repeats)
                rows.append({"preset": preset, "mask_cache": cached, "samples_per_s": rate})
                print(f"| {preset} | {'yes' if cached else 'no'} | {rate:.1f} |", flush=True)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return rows, fill_s


# ----------------------------------------------------------------------------- networks

def make_net(impl, arch, backbone, num_classes, head_channels=512):
    if impl == "ours":
        return build_model(arch, backbone, num_classes, pretrained=False, head_channels=head_channels)
    import segmentation_models_pytorch as smp  # benchmark-only dependency
    cls = {"deeplabv3plus": smp.DeepLabV3Plus, "unet": smp.Unet}[arch]
    return cls(encoder_name=backbone, encoder_weights=None, classes=num_classes)


USUAL = "usual: fp32, plain AdamW"  # the peer as its users usually train it: fp32, default format, torch's AdamW
# name -> (autocast dtype or None, channels_last, torch's plain AdamW instead of train.py's optimizer)
VARIANTS = {"fp32": (None, False, False), "fp32+cl": (None, True, False), "bf16": (torch.bfloat16, False, False),
            "bf16+cl": (torch.bfloat16, True, False), "fp16 (cuda)": (torch.float16, True, False),
            USUAL: (None, False, True)}
COMPILED = " compiled"  # a variant's name + this: the same under torch.compile (train.py --compile)


def train_stepper(net, device, variant, img_size, batch_size, num_classes):
    """A closure doing one training step (forward, loss, backward, AdamW step) on a fixed random batch, in one of
    VARIANTS. The optimizer is train.py's (AdamW, fused where the device has it), or in the usual variant torch's
    AdamW with its defaults, as a script using SMP would usually write it."""
    compiled = variant.endswith(COMPILED)
    dtype, channels_last, plain_adamw = VARIANTS[variant.removesuffix(COMPILED)]
    net = net.to(device).train()
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    y = torch.randint(0, num_classes, (batch_size, img_size, img_size), device=device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = (torch.optim.AdamW(net.parameters(), lr=1e-4) if plain_adamw
           else build_optimizer(net, "adamw", lr=1e-4))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    forward = torch.compile(net) if compiled else net

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = forward(x)
        loss = torch.nn.functional.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return step


def infer_stepper(net, device, precision, channels_last, img_size, batch_size, tta, scales):
    net = net.to(device)  # eval mode already (an exported program was traced in it and refuses .eval())
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return lambda: predict_probs(net, x, img_size, tta_flips(tta), scales, precision, channels_last)


def timed_rates(steppers, batch_size, steps, repeats, device):
    """Images/s of each stepper: warm-up, then `repeats` rounds that run every stepper in turn (interleaved, so
    drift in the machine's speed hits all alike); the median round for each."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in steppers.values():
        for _ in range(2):
            step()
    rates = {name: [] for name in steppers}
    for _ in range(repeats):
        for name, step in steppers.items():
            sync()
            t = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            rates[name].append(steps * batch_size / (time.perf_counter() - t))
    return {name: statistics.median(r) for name, r in rates.items()}


def peak_memory_mb(impl, arch, backbone, variant, args):
    """Peak memory of a few training steps of one configuration in a fresh process (CPU: peak resident memory
    above the level after imports; CUDA: max allocated), so configurations do not inherit each other's peaks."""
    cmd = [sys.executable, __file__, "--_memory", impl, arch, backbone, variant, "--img-size", str(args.img_size),
           "-b", str(args.batch_size), "--num-classes", str(args.num_classes), "--head-channels", str(args.head_channels)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else float("nan")


def current_rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def memory_child(args):
    impl, arch, backbone, variant = args._memory
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # ru_maxrss is useless here (importing the CUDA build of torch already peaks higher), so sample the current
    # RSS in a thread while the steps run and report its peak over the level before the network was built
    baseline = current_rss_mb()
    peak, done = [baseline], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], current_rss_mb())
            time.sleep(0.005)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    net = make_net(impl, arch, backbone, args.num_classes, args.head_channels)
    step = train_stepper(net, device, variant, args.img_size, args.batch_size, args.num_classes)
    for _ in range(3):
        step()
    done.set()
    sampler.join()
    if device.type == "cuda":
        print(torch.cuda.max_memory_allocated() / 2 ** 20)
    else:
        print(peak[0] - baseline)


def bench_train(args, device):
    impls = ["ours"] + ([args.peer] if args.peer else [])
    variants = args.variants or (["fp16 (cuda)", "fp32", "fp32+cl"] if device.type == "cuda"
                                 else ["fp32", "fp32+cl", "bf16", "bf16+cl"])
    rows = []
    print("\n| arch | backbone | impl | params (M) | precision/format | train images/s | peak memory MB (CPU: RSS rise) |")
    print("|---|---|---|---|---|---|---|")
    for arch in args.archs:
        for backbone in args.backbones:
            nets = {impl: make_net(impl, arch, backbone, args.num_classes, args.head_channels) for impl in impls}
            steppers = {}
            for impl in impls:
                extra = [USUAL] if impl == args.peer else [v + COMPILED for v in args.compile]
                for variant in variants + extra:
                    steppers[(impl, variant)] = train_stepper(copy.deepcopy(nets[impl]), device, variant,
                                                              args.img_size, args.batch_size, args.num_classes)
            rates = timed_rates(steppers, args.batch_size, args.steps, args.repeats, device)
            for (impl, variant), rate in rates.items():
                params = sum(p.numel() for p in nets[impl].parameters()) / 1e6
                mem = peak_memory_mb(impl, arch, backbone, variant, args) if args.memory else float("nan")
                rows.append({"arch": arch, "backbone": backbone, "impl": impl, "params_m": params,
                             "variant": variant, "train_images_per_s": rate, "peak_memory_mb": mem})
                print(f"| {arch} | {backbone} | {impl} | {params:.2f} | {variant} | {rate:.2f} | {mem:.0f} |",
                      flush=True)
            if args.peer:
                ours_default = rates.get(("ours", "fp32+cl"), float("nan"))  # train.py's defaults: fp32, channels_last
                for variant in variants:
                    print(f"ratio ours/{args.peer} {arch}/{backbone} {variant}: "
                          f"{rates[('ours', variant)] / rates[(args.peer, variant)]:.2f}")
                print(f"ratio ours (train.py defaults: fp32+cl, fused AdamW) / {args.peer} ({USUAL}): "
                      f"{ours_default / rates[(args.peer, USUAL)]:.2f}")
            amp_note(rates, arch, backbone, device)
            for variant in args.compile:
                print(f"ratio compiled / eager {arch}/{backbone} {variant}: "
                      f"{rates[('ours', variant + COMPILED)] / rates[('ours', variant)]:.2f}")
    return rows


def amp_note(rates, arch, backbone, device):
    """What train.py --amp picks on this machine, beside the measured bf16 / fp32 speed of our network."""
    picked = amp_precision(device, True)
    line = f"--amp here: {picked}"
    if device.type == "cpu":
        line += f" (native bf16: {'yes' if cpu_bf16_native() else 'no'}, {cpu_isa()})"
        for fmt in ("", "+cl"):
            if ("ours", "bf16" + fmt) in rates and ("ours", "fp32" + fmt) in rates:
                line += (f"; {arch}/{backbone} bf16{fmt} / fp32{fmt} step speed "
                         f"{rates[('ours', 'bf16' + fmt)] / rates[('ours', 'fp32' + fmt)]:.2f}")
    print(line, flush=True)


def module_ranges(net, depth=2):
    """Forward-pass profiler ranges for the network's parts (children, and grandchildren outside the encoder),
    so the profile says which part of the network the time goes to, not only which kernels."""
    parts = [(name, m) for name, m in net.named_modules() if name and name.count(".") < depth
             and not (name.count(".") == 1 and name.split(".")[0] == "encoder")]
    for name, module in parts:
        def enter(mod, inputs, name=name):
            mod._bench_range = torch.profiler.record_function(f"part: {name}")
            mod._bench_range.__enter__()

        def leave(mod, inputs, output):
            mod._bench_range.__exit__(None, None, None)
        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)


def profile_train(args, device):
    """torch.profiler over a few training steps of ours with train.py's defaults and the peer used the usual way:
    forward time per part of the network, then the costliest operators by input shape (forward and backward)."""
    impls = ["ours"] + ([args.peer] if args.peer else [])
    for arch in args.archs:
        for backbone in args.backbones:
            for impl in impls:
                variant = "fp32+cl" if impl == "ours" else USUAL
                net = make_net(impl, arch, backbone, args.num_classes, args.head_channels)
                module_ranges(net)
                step = train_stepper(net, device, variant, args.img_size, args.batch_size, args.num_classes)
                step()
                activities = [torch.profiler.ProfilerActivity.CPU] + (
                    [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
                with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
                    for _ in range(args.steps):
                        step()
                events = prof.key_averages()
                total = sum(e.self_cpu_time_total for e in events)
                print(f"\n### profile: {impl} {arch}/{backbone} {variant}, {args.img_size}px, batch {args.batch_size}, "
                      f"{args.steps} steps, {total / 1e3 / args.steps:.0f} ms CPU per step")
                print("\n| part (forward only) | ms per step | share of step |\n|---|---|---|")
                for e in sorted((e for e in events if e.key.startswith("part: ")),
                                key=lambda e: -e.cpu_time_total):
                    print(f"| {e.key[6:]} | {e.cpu_time_total / 1e3 / args.steps:.1f} | "
                          f"{100 * e.cpu_time_total / total:.1f}% |")
                print("\n| operator | input shapes | ms per step | share |\n|---|---|---|---|")
                by_shape = prof.key_averages(group_by_input_shape=True)
                top = sorted((e for e in by_shape if not e.key.startswith("part: ")),
                             key=lambda e: -e.self_cpu_time_total)[:args.profile_rows]
                for e in top:
                    shapes = str(e.input_shapes)[:70]
                    print(f"| {e.key} | {shapes} | {e.self_cpu_time_total / 1e3 / args.steps:.1f} | "
                          f"{100 * e.self_cpu_time_total / total:.1f}% |")


def bench_infer(args, device):
    impls = ["ours"] + ([args.peer] if args.peer else [])
    precision, cl = amp_precision(device, True), True  # what predict.py --amp runs here (channels_last: its default)
    print(f"\ninference: predict.py --amp's precision here, {precision}, channels_last")
    modes = {"plain": (False, (1.0,)), "flip TTA": (True, (1.0,)), "flips + 3 scales": (True, (0.75, 1.0, 1.25))}
    rows = []
    print("\n| arch | backbone | impl | TTA | infer images/s | cost vs plain |\n|---|---|---|---|---|---|")
    for arch in args.archs:
        for backbone in args.backbones:
            steppers = {}
            for impl in impls:
                net = make_net(impl, arch, backbone, args.num_classes, args.head_channels).eval()
                if impl == "ours" and args.exported:  # the same weights as a torch.export program (export.py)
                    impls_nets = [(impl, net), ("ours exported", export_program(net, args.img_size).module())]
                else:
                    impls_nets = [(impl, net)]
                for (impl_name, impl_net), (mode, (tta, scales)) in product(impls_nets, modes.items()):
                    steppers[(impl_name, mode)] = infer_stepper(impl_net, device, precision, cl, args.img_size,
                                                                args.batch_size, tta, scales)
            rates = timed_rates(steppers, args.batch_size, args.steps, args.repeats, device)
            for (impl, mode), rate in rates.items():
                cost = rates[(impl, "plain")] / rate
                rows.append({"arch": arch, "backbone": backbone, "impl": impl, "tta": mode, "precision": precision,
                             "infer_images_per_s": rate, "cost_vs_plain": cost})
                print(f"| {arch} | {backbone} | {impl} | {mode} | {rate:.2f} | {cost:.2f}x |", flush=True)
    return rows


def describe_machine(device):
    """CPU model, cores, bf16 support (or the GPU), torch version: figures only mean something with these."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or "unknown CPU")
    text = (f"{platform.machine()} {model}, {torch.get_num_threads()} torch threads, "
            f"{cpu_isa()}, avx512_bf16={'avx512_bf16' in info}, amx_bf16={'amx_bf16' in info}, --amp picks "
            f"{amp_precision(device, True)}, torch {torch.__version__}")
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = Path(__file__).resolve().parent.parent / "shared" / "data" / "camvid"
    p.add_argument("--data-dir", default=str(default_data) if default_data.is_dir() else None,
                   help="default: ../shared/data/camvid when present, else a fresh demo set")
    p.add_argument("--train-json", default="train_all.json", help="the loader's COCO JSON")
    p.add_argument("--img-size", type=int, default=512)
    p.add_argument("-b", "--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=20, help="timed batches per pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--presets", nargs="+", default=["none", "strong"])
    p.add_argument("--sections", nargs="+", default=["loader", "train", "infer"], choices=["loader", "train", "infer"])
    p.add_argument("--archs", nargs="+", default=["deeplabv3plus", "unet"])
    p.add_argument("--backbones", nargs="+", default=["resnet18"])
    p.add_argument("--num-classes", type=int, default=11)
    p.add_argument("--head-channels", type=int, default=512, help="our UPerNet's width (the CPU recipe: 128)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round (train, infer)")
    p.add_argument("--variants", nargs="+", choices=[v for v in VARIANTS if v != USUAL],
                   help="train: precision/format rows of ours and the peer (default: fp32, fp32+cl, bf16, bf16+cl on "
                        "the CPU; emulated bf16 takes minutes a step at 512 px)")
    p.add_argument("--peer", choices=["smp"], help="also time segmentation_models_pytorch, interleaved")
    p.add_argument("--exported", action="store_true", help="infer: also time ours as a torch.export program")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--compile", nargs="*", default=[], metavar="VARIANT",
                   help="also time ours under torch.compile in these variants, e.g. fp32+cl bf16+cl")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="peak memory of each training configuration, in a fresh process")
    p.add_argument("--_memory", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing: torch.profiler of the training step, by network part and operator")
    p.add_argument("--profile-rows", type=int, default=15)
    args = p.parse_args()
    if args._memory:
        return memory_child(args)
    if args.data_dir is None and "loader" in args.sections:
        args.data_dir = str(make_demo(tempfile.mkdtemp(prefix="bench_demo_")))
    torch.manual_seed(0)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    machine = describe_machine(device)
    print(f"machine: {machine}; data {args.data_dir}, {args.img_size}px, batch {args.batch_size}, "
          f"{args.workers} workers; loader: median of {args.repeats} x {args.batches} batches, networks: median of "
          f"{args.repeats} x {args.steps} steps after 2 warm-up steps")
    if args.profile:
        return profile_train(args, device)
    results = {"machine": machine, "args": {k: v for k, v in vars(args).items() if k != "_memory"}}
    if "loader" in args.sections:
        print("\n| preset | mask cache | loader samples/s |\n|---|---|---|")
        rows, fill_s = bench_loader(args)
        print(f"\nfilling the mask cache once took {fill_s:.1f} s for {len(load_coco(args.data_dir, args.train_json))} images")
        results.update(loader=rows, cache_fill_s=fill_s)
    if "train" in args.sections:
        results["train"] = bench_train(args, device)
    if "infer" in args.sections:
        results["infer"] = bench_infer(args, device)
    if "loader" in args.sections and "train" in args.sections:
        # the loader must outrun the fastest training step, or the GPU/CPU waits for data
        fastest = max(r["train_images_per_s"] for r in results["train"] if r["impl"] == "ours")
        print()
        for row in results["loader"]:
            row["vs_fastest_train_step"] = row["samples_per_s"] / fastest
            print(f"loader {row['preset']} (mask cache {'yes' if row['mask_cache'] else 'no'}) delivers "
                  f"{row['vs_fastest_train_step']:.1f}x the fastest training step ({fastest:.2f} images/s)")
        limits = [r["preset"] for r in results["loader"] if r["mask_cache"] and r["vs_fastest_train_step"] < 1]
        verdict = f"is the limit ({', '.join(limits)})" if limits else "is not the limit"
        print(f"with {args.workers} workers the loader {verdict} of the fastest training step here (train.py's "
              f"default --workers here: {default_workers()})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
