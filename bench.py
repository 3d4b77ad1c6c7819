"""Speed of training and guided sampling, against this machine's own matmul rate.

Ho & Salimans, arXiv 2207.12598. Training (Algorithm 1): one `train.train_step` with train.py's
settings for the preset. Sampling (Algorithm 2): at w = 0 a step evaluates ε_θ(z_t, c) once; at
w ≠ 0, ε̃_t = (1 + w) ε_θ(z_t, c) − w ε_θ(z_t) needs two evaluations, as one batch of 2B or two
passes of B (`guidance.ONE_BATCH`), so a guided step should cost at most 2× an unguided one.

It prints (and writes with --json) the dense matmul rate, the best of several square matmuls
(float32; bfloat16 too on CUDA or with --amp; on CPU through MKL and through oneDNN, which the
convolutions use: MKL is slow on AMD CPUs and would flatter the MFU); per preset, training
images/s, FLOPs per step (FlopCounterMode), FLOP/s over the matmul rate ("MFU"), peak memory;
seconds per sampling step at w = 0 and at w = 1 both ways, their ratio, and hours for 50,000
guided samples at T = 256 and with the fast sampler. Times are the best and median of --iters;
on a shared machine the best estimates the unloaded speed, and `--threads 1 --cpu-time` times
by the thread's CPU time. On CPU, malloc keeps freed memory as in sample.py (fast_cpu); --plain
times without it, as train.py runs. On CUDA, float32 "MFU" can overstate (cuDNN uses TF32);
--amp compares with bfloat16 and samples under bf16 autocast, which sample.py does not offer
yet. Measured figures, with their machines: docs/results.md.

    python bench.py                                  # CPU: digits, mnist, cifar10 (a few minutes)
    python bench.py --presets mnist --iters 10 --json bench.json
    python bench.py --device cuda --amp --compile    # GPU: bf16 autocast and torch.compile
    python bench.py --batch-size mnist=128 cifar10=16
    python bench.py --plain                          # CPU: without fast_cpu, as train.py runs
    python bench.py --presets mnist --guidance-free  # + guidance-free training and sampling
"""
import copy
import ctypes
import dataclasses
import math
import os
import resource
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import cli
import data
import fast_cpu
from guidance import ONE_BATCH, guidance_free_eps, guided_eps
from model import UNet
from presets import PRESETS, fits
from sample import FAST_SAMPLER, SAMPLERS, sample
from train import parse_args, train_step

CPU_BATCH = {"cifar10": 8}  # train.py's 128 is too slow a step on a CPU (docs/results.md)
SAMPLE_BATCH = 64
NUM_SAMPLES, GUIDED_W = 50_000, 1.0  # the "50k guided samples" estimate


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, iters, min_seconds=0.0, clock=time.perf_counter):
    """Seconds of each of `iters` calls of fn(), more (up to 10x) until min_seconds have passed."""
    seconds = []
    while len(seconds) < iters or (sum(seconds) < min_seconds and len(seconds) < 10 * iters):
        sync(device)
        start = clock()
        fn()
        sync(device)
        seconds.append(clock() - start)
    return seconds


def matmul_rate(device, dtype, sizes, clock, repeats=5):
    """{route: FLOP/s} of the fastest n×n @ n×n matmul (2 n³ FLOPs), best of `repeats`.

    "blas" is torch.matmul (MKL on x86 CPUs, cuBLAS on CUDA); on CPU, "onednn" is the same
    product through oneDNN, which PyTorch's CPU convolutions use. They differ on AMD CPUs, where
    MKL's sgemm takes its AVX2 path and oneDNN uses AVX-512."""
    routes = {"blas": lambda a, b: a @ b}
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        routes["onednn"] = lambda a, b: torch._C._nn.mkldnn_linear(a, b, None)  # a @ bᵀ
    best = dict.fromkeys(routes, 0.0)
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        for route, mm in routes.items():
            x, y = (a.to_mkldnn(), b.to_mkldnn()) if route == "onednn" else (a, b)
            mm(x, y)  # warm-up
            seconds = min(timed(lambda: mm(x, y), device, repeats, clock=clock))
            best[route] = max(best[route], 2 * n ** 3 / seconds)
    return best


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            lines = (line for line in f if line.startswith("model name"))
            name = next(lines).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        name = "CPU"
    return f"{name}, {os.cpu_count()} cores"


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # glibc: return freed heap first (fast_cpu's setting keeps it)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:  # Linux: writing 5 resets the peak RSS (VmHWM, which getrusage reports)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False  # then the peak is the whole process's so far


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2 ** 20


def build(preset, device, args, guidance_free=False):
    """(the preset's UNet on `device`, the network to call: it or, with --compile, compiled);
    `guidance_free` adds the strength input β that train.py --guidance-free gives it."""
    network = dataclasses.replace(PRESETS[preset].network, strength_input=guidance_free)
    raw_model = UNet(network).to(device)
    net = torch.compile(raw_model) if args.compile else raw_model  # reads config through
    return raw_model, net


def preset_flags(preset):
    """train.py's flags for a preset: a dataset of its image shape (or an image folder)."""
    network = PRESETS[preset].network
    fitting = (d.name for d in data.DATASETS.values() if fits(network, d))
    return ["--dataset", next(fitting, data.IMAGE_FOLDER), "--preset", preset]


def bench_train(preset, batch_size, device, args, guidance_free=False):
    """train.py's step (train_step; with guidance_free, its gft_loss) on random data of the
    preset's shape: FLOPs, times and peak memory."""
    torch.manual_seed(0)
    flags = (["--amp"] if args.amp else []) + (["--guidance-free"] if guidance_free else [])
    settings = parse_args(preset_flags(preset) + flags)
    raw_model, net = build(preset, device, args, guidance_free)
    ema = copy.deepcopy(raw_model).requires_grad_(False)  # θ_ema, as in train.py
    optimizer = torch.optim.Adam(raw_model.parameters(), lr=settings.lr)  # as in train.py
    config = PRESETS[preset].network
    shape = (batch_size, config.in_channels, config.image_size, config.image_size)
    x = torch.rand(shape, device=device) * 2 - 1
    labels = torch.randint(0, config.num_classes, (batch_size,), device=device)

    def step(model):  # train.py's loop body, minus data loading and logging
        train_step(model, ema, optimizer, x, labels, config.num_classes, 1000, settings)

    with FlopCounterMode(display=False) as counter:  # on the eager model: the same math
        step(raw_model)
    flops = counter.get_total_flops()
    for _ in range(args.warmup):  # compiles here with --compile
        step(net)
    has_reset = reset_peak_memory(device)
    seconds = timed(lambda: step(net), device, args.iters, args.min_seconds, args.clock)
    if device.type == "cuda":
        memory_kind = "torch.cuda.max_memory_allocated"
    else:
        memory_kind = "process RSS" + ("" if has_reset else " (whole run)")
    return dict(preset=preset, loss="guidance-free" if guidance_free else "Algorithm 1",
                batch_size=batch_size, flops_per_step=flops, seconds_best=min(seconds),
                seconds_median=statistics.median(seconds), images_per_s=batch_size / min(seconds),
                flops_per_s=flops / min(seconds), peak_memory_mb=peak_memory_mb(device),
                peak_memory_kind=memory_kind)


class CountingModel:
    """Calls the network and counts the images it evaluates (B per evaluation of ε_θ)."""

    def __init__(self, net):
        self.net, self.images = net, 0

    def __getattr__(self, name):  # config, null_label: read through to the network
        return getattr(self.net, name)

    def __call__(self, z, logsnr, labels, **kwargs):  # kwargs: a GFT network's strength β
        self.images += len(z)
        return self.net(z, logsnr, labels, **kwargs)


def guided_as(one_batch):
    """guided_eps as one batch of 2B (True) or two passes of B (False), whatever ONE_BATCH
    says for the device: a rule for sample(), so that both ways are timed on every device."""
    def rule(model, z, logsnr, labels, w, state=None):
        device_type, saved = z.device.type, dict(ONE_BATCH)
        ONE_BATCH[device_type] = one_batch
        try:
            return guided_eps(model, z, logsnr, labels, w)
        finally:
            ONE_BATCH.clear()
            ONE_BATCH.update(saved)
    return rule


def bench_sample(preset, device, args):
    """Seconds per step of sample() (steps=1: one step of Algorithm 2) at w = 0, and at w = 1
    both as one batch of 2B and as two passes of B; with --guidance-free also the GFT network
    at w = 1 (one evaluation). Timed in turn, round after round, so that a slow spell on a
    shared machine hits them alike; ratios are of the best times."""
    torch.manual_seed(0)
    raw_model, net = build(preset, device, args)
    raw_model.eval()
    batch = args.sample_batch_size
    labels = torch.arange(batch, device=device) % PRESETS[preset].network.num_classes
    variants = {"w0": (0.0, guided_eps), "w1_one_batch": (GUIDED_W, guided_as(True)),
                "w1_two_passes": (GUIDED_W, guided_as(False))}
    counted = {key: CountingModel(net) for key in variants}
    if args.guidance_free:  # train.py --guidance-free's network: one evaluation at any w
        raw_gft, net_gft = build(preset, device, args, guidance_free=True)
        raw_gft.eval()
        variants["w1_guidance_free"] = (GUIDED_W, guidance_free_eps)
        counted["w1_guidance_free"] = CountingModel(net_gft)

    def one_step(key):
        w, rule = variants[key]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            sample(counted[key], labels, w, steps=1, guidance=rule)

    for _ in range(args.warmup):
        for key in variants:
            one_step(key)
    seconds = {key: [] for key in variants}
    rounds, most = 0, 10 * args.sample_iters
    while rounds < args.sample_iters or (sum(seconds["w0"]) < args.min_seconds and rounds < most):
        for key in variants:
            seconds[key] += timed(lambda: one_step(key), device, 1, clock=args.clock)
        rounds += 1
    result = dict(preset=preset, batch_size=batch, rounds=rounds)
    for key in variants:
        result[f"{key}_seconds_best"] = min(seconds[key])
        result[f"{key}_seconds_median"] = statistics.median(seconds[key])
        result[f"{key}_evals_per_step"] = counted[key].images / ((args.warmup + rounds) * batch)
    for key in [k for k in variants if k != "w0"]:
        result[f"ratio_{key[3:]}"] = result[f"{key}_seconds_best"] / result["w0_seconds_best"]
    way = "one_batch" if ONE_BATCH.get(device.type, True) else "two_passes"  # guided_eps's here
    result["guided_way"], result["ratio"] = way, result[f"ratio_{way}"]
    guided_seconds = result[f"w1_{way}_seconds_best"]
    batches, fast_steps = math.ceil(NUM_SAMPLES / batch), SAMPLERS[FAST_SAMPLER]["steps"]
    result["hours_50k_T256_guided"] = batches * 256 * guided_seconds / 3600
    result["fast_sampler"], result["fast_steps"] = FAST_SAMPLER, fast_steps
    result["hours_50k_fast_guided"] = batches * fast_steps * guided_seconds / 3600
    if "w1_guidance_free" in variants:
        gft_seconds = result["w1_guidance_free_seconds_best"]
        result["guidance_free_vs_guided"] = gft_seconds / guided_seconds
        result["hours_50k_fast_guidance_free"] = batches * fast_steps * gft_seconds / 3600
    return result


def parse_batch_sizes(items, presets, device):
    """'N' for every preset, or 'PRESET=N' items; the rest: train.py's batch (CPU: CPU_BATCH)."""
    cpu = device.type == "cpu"
    sizes = {p: (CPU_BATCH.get(p) if cpu else None) or PRESETS[p].recipe.batch_size
             for p in presets}
    for item in items:
        name, _, value = item.rpartition("=")
        if name and name not in PRESETS or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--batch-size {item!r}: give N or PRESET=N with N >= 1 "
                             f"(presets: {', '.join(PRESETS)})")
        for p in ([name] if name else presets):
            sizes[p] = int(value)
    return sizes


def print_tables(report):
    m = report["machine"]
    print(f"\n{m['device_name']}, {m['threads']} threads, torch {m['torch']}, {m['clock']} clock; "
          f"amp={m['amp']} compile={m['compile']} fast_cpu={m['fast_cpu']}")
    for dtype, rate in report["matmul_flops_per_s"].items():
        by_route = ", ".join(f"{route} {r / 1e9:,.1f}"
                             for route, r in report["matmul_routes"][dtype].items())
        print(f"dense matmul {dtype}: {rate / 1e9:,.1f} GFLOP/s (fastest of {by_route}; "
              f"{report['matmul_sizes']} squares)")
    print(f"MFU below is FLOP/s over the {report['mfu_vs']} matmul rate.\n")
    print(f"{'training':11s} {'loss':13s} {'batch':>5s} {'GFLOP/step':>10s} {'ms/step best':>12s} "
          f"{'median':>8s} {'img/s':>8s} {'GFLOP/s':>8s} {'MFU':>6s} {'peak MB':>8s}")
    for r in report["train"]:
        print(f"{r['preset']:11s} {r['loss']:13s} {r['batch_size']:5d} "
              f"{r['flops_per_step'] / 1e9:10.2f} {r['seconds_best'] * 1e3:12.1f} "
              f"{r['seconds_median'] * 1e3:8.1f} {r['images_per_s']:8.1f} "
              f"{r['flops_per_s'] / 1e9:8.1f} {r['mfu']:6.1%} {r['peak_memory_mb']:8.0f}")
    print(f"(peak memory: {report['train'][0]['peak_memory_kind']})")
    by_preset = {}
    for r in report["train"]:
        by_preset.setdefault(r["preset"], {})[r["loss"]] = r
    for preset, rows in by_preset.items():
        if len(rows) == 2:
            plain, gft = rows["Algorithm 1"], rows["guidance-free"]
            time_x = gft["seconds_best"] / plain["seconds_best"]
            flops_x = gft["flops_per_step"] / plain["flops_per_step"]
            print(f"{preset}: a guidance-free step costs {time_x:.2f}x an "
                  f"Algorithm 1 step ({flops_x:.2f}x its FLOPs)")
    if not report["sample"]:
        return
    print(f"\n{'sampling':11s} {'batch':>5s} {'w=0':>8s} {'w=1: 2B':>8s} {'2 × B':>8s} "
          f"{'ratio 2B':>8s} {'2 × B':>6s} {'50k, T=256, w=1':>16s} {'50k, fast, w=1':>15s}")
    for r in report["sample"]:
        print(f"{r['preset']:11s} {r['batch_size']:5d} {r['w0_seconds_best']:8.4f} "
              f"{r['w1_one_batch_seconds_best']:8.4f} {r['w1_two_passes_seconds_best']:8.4f} "
              f"{r['ratio_one_batch']:8.2f} {r['ratio_two_passes']:6.2f} "
              f"{r['hours_50k_T256_guided']:14.2f} h {r['hours_50k_fast_guided']:13.2f} h")
    first = report["sample"][0]
    print(f"(seconds per step, best of each; w = 1 as one batch of 2B and as two passes of B; "
          f"guided_eps uses {first['guided_way'].replace('_', ' ')} here,\n which the 50k "
          f"columns use; ratio = guided / unguided, limit 2.0; fast: "
          f"{first['fast_sampler']} at T = {first['fast_steps']})")
    for r in report["sample"]:
        if "w1_guidance_free_seconds_best" in r:
            print(f"{r['preset']}: guidance-free at w = 1: "
                  f"{r['w1_guidance_free_seconds_best']:.4f} s per step "
                  f"({r['w1_guidance_free_evals_per_step']:.0f} evaluation per image), "
                  f"{r['ratio_guidance_free']:.2f}x the unguided step and "
                  f"{r['guidance_free_vs_guided']:.2f}x the guided one; 50k fast: "
                  f"{r['hours_50k_fast_guidance_free']:.2f} h")


def main(argv=None):
    p = cli.parser("bench.py", __doc__)
    count = cli.number(int, 1)  # a count of at least 1
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--presets", nargs="+", default=["digits", "mnist", "cifar10"],
                   choices=list(PRESETS))
    p.add_argument("--batch-size", nargs="+", default=[], metavar="N|PRESET=N",
                   help="training batch (default train.py's; cifar10 on CPU: 8)")
    p.add_argument("--iters", type=count, default=5, help="timed training steps per preset")
    p.add_argument("--warmup", type=count,
                   help="untimed steps first (default 1; 3 with --compile, which compiles here)")
    p.add_argument("--min-seconds", type=cli.number(float, 0), default=3.0,
                   help="keep timing (up to 10x the iterations) until this much time is measured")
    p.add_argument("--sample-batch-size", type=count, default=SAMPLE_BATCH)
    p.add_argument("--sample-iters", type=count, default=3,
                   help="timed sampling steps per preset and w")
    p.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast (train.py uses it on CUDA only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--plain", action="store_true",
                   help="CPU: glibc malloc's defaults, without fast_cpu (which sample.py uses)")
    p.add_argument("--threads", type=count, help="torch.set_num_threads (CPU)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time by this thread's CPU time, not the wall clock (needs --threads 1): "
                        "figures that other processes barely disturb")
    p.add_argument("--no-sample", action="store_true", help="skip the sampling measurements")
    p.add_argument("--guidance-free", action="store_true",
                   help="also time train.py --guidance-free's step (one more forward pass) and "
                        "its network's sampling step at w = 1 (one evaluation)")
    p.add_argument("--matmul-sizes", type=count, nargs="+", metavar="N",
                   help="n of the n×n matmuls that measure the rate (default: CUDA 4096 8192, "
                        "CPU 2048 4096; small ones understate it and overstate MFU)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = 3 if args.compile else 1
    device = cli.device(args.device, p.error)
    try:
        batch_sizes = parse_batch_sizes(args.batch_size, args.presets, device)
    except ValueError as e:
        p.error(str(e))
    if args.cpu_time and (args.threads != 1 or device.type != "cpu"):
        p.error("--cpu-time needs --device cpu --threads 1 (the work must run on this thread)")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.clock = time.thread_time if args.cpu_time else time.perf_counter
    if device.type == "cpu" and not args.plain:
        fast_cpu.keep_freed_memory()  # as sample.py does

    # The matmul rate is measured before each preset's training and at the end; on a shared
    # machine the best of all is the closest to the unloaded rate, the safest MFU reference.
    default_sizes = (4096, 8192) if device.type == "cuda" else (2048, 4096)
    sizes = tuple(args.matmul_sizes or default_sizes)
    dtypes = [torch.float32] + ([torch.bfloat16] if args.amp or device.type == "cuda" else [])
    routes = {str(d).split(".")[-1]: {} for d in dtypes}  # dtype -> route -> best FLOP/s

    def measure_matmul():
        for d in dtypes:
            name = str(d).split(".")[-1]
            for route, rate in matmul_rate(device, d, sizes, args.clock).items():
                routes[name][route] = max(routes[name].get(route, 0.0), rate)

    train_rows = []
    for preset in args.presets:
        measure_matmul()
        batch = batch_sizes[preset]
        train_rows.append(bench_train(preset, batch, device, args))
        if args.guidance_free:
            train_rows.append(bench_train(preset, batch, device, args, guidance_free=True))
    sample_rows = [] if args.no_sample else [bench_sample(p, device, args) for p in args.presets]
    measure_matmul()
    rates = {name: max(by_route.values()) for name, by_route in routes.items()}  # faster route
    mfu_vs = "bfloat16" if args.amp else "float32"
    for row in train_rows:
        row["mfu"] = row["flops_per_s"] / rates[mfu_vs]

    machine = dict(device=str(device), device_name=device_name(device),
                   threads=torch.get_num_threads(), torch=torch.__version__, amp=args.amp,
                   compile=args.compile, fast_cpu=device.type == "cpu" and not args.plain,
                   clock="thread CPU time" if args.cpu_time else "wall")
    command = " ".join(["python bench.py"] + (argv if argv is not None else sys.argv[1:]))
    report = dict(machine=machine, command=command, matmul_flops_per_s=rates,
                  matmul_routes=routes, matmul_sizes=list(sizes), mfu_vs=mfu_vs,
                  train=train_rows, sample=sample_rows)
    print_tables(report)
    if args.json:
        cli.write_json(args.json, report)


if __name__ == "__main__":
    main()
