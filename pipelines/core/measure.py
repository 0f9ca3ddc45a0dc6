"""Measuring one training or inference step: the machine's peak rate (the best of several measured kernels),
its theoretical peak where it can be computed, a step's time, FLOPs and peak memory in a fresh process, and
MFU. Shared by `segnet bench model`, Table 1's inference column, the GPU check and the GPU Table 1; it imports
only torch and the project's models, so it runs where Ray and albumentations are absent.
"""

import os
import re
import subprocess
import time

import numpy as np

# Worst burst below this fraction of the best: something else ran while the rate was measured.
BUSY_SPREAD = 0.8
PEAK_SOURCES = {
    "cpu": {"matmul": "torch.mm (MKL)", "conv": "3x3 convolution (oneDNN)"},
    "cuda": {"matmul": "matmul (cuBLAS)", "conv": "3x3 convolution (cuDNN)"},
}


def burst_rate(run, flops: float, sync, reps: int = 5, seconds: float = 0.3) -> dict:
    """FLOP/s of `run()` (`flops` each call): the best and worst of `reps` timed bursts after a warm-up, so
    one slow burst on a shared machine does not set MFU's denominator, and the spread shows it."""
    run()
    sync()
    rates = []
    for _ in range(reps):
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            run()
            count += 1
            sync()
        rates.append(flops * count / (time.perf_counter() - t0))
    return {"best": max(rates), "worst": min(rates), "spread": min(rates) / max(rates)}


def _sync(device: str):
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def matmul_rate(dtype=None, device: str = "cpu", reps: int = 5, seconds: float = 0.3) -> dict:
    """The dense matmul rate (fp32, or bf16 for autocast): torch.mm, MKL on CPUs, cuBLAS on GPUs."""
    import torch

    n = 8192 if device == "cuda" else _cpu_matmul_size(dtype, seconds)  # a GPU needs a bigger product
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    return burst_rate(lambda: a @ b, 2 * n**3, _sync(device), reps, seconds)


def _cpu_matmul_size(dtype, seconds: float) -> int:
    """2048, or less where this CPU's kernel for `dtype` is slow: the size doubles from 256 while one product
    takes under a quarter of a burst (the next, 8 times the work, then still fits one). A CPU without
    AVX-512 BF16 or AMX multiplies bf16 at about 1 GFLOP/s: one 2048 product took 21 s on an AMD EPYC,
    and the dry run of the GPU check, which measures the rates several times, ran past 10 minutes."""
    import torch

    n = 256
    while n < 2048:
        a = torch.randn(n, n, dtype=dtype)
        t0 = time.perf_counter()
        a @ a
        if time.perf_counter() - t0 > seconds / 4:
            break
        n *= 2
    return n


def conv_rate(dtype=None, device: str = "cpu", reps: int = 5, seconds: float = 0.3) -> dict:
    """The rate of a large 3x3 convolution, channels_last, 256 to 256 channels at 90x120 (the kind SegNet's
    steps are made of): oneDNN on CPUs, cuDNN on GPUs. On AMD CPUs it runs well above MKL's matmul."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = (32 if device == "cuda" else 1), 256, 90, 120
    memory = torch.channels_last
    x = torch.randn(n, c, h, w, dtype=dtype, device=device).contiguous(memory_format=memory)
    weight = torch.randn(c, c, 3, 3, dtype=dtype, device=device).contiguous(memory_format=memory)

    def run():
        with torch.no_grad():
            F.conv2d(x, weight, padding=1)

    return burst_rate(run, 2 * n * c * c * 9 * h * w, _sync(device), reps, seconds)


def peak_rates(dtype=None, device: str = "cpu", tf32: bool = False) -> dict:
    """{source: {best, worst, spread}} of each measured kernel in the step's precision; MFU is taken against
    the best of them. TF32 is set as the step sets it, so fp32 on a GPU is measured as it computes."""
    import torch

    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        names = PEAK_SOURCES["cuda" if device == "cuda" else "cpu"]
        return {names["matmul"]: matmul_rate(dtype, device), names["conv"]: conv_rate(dtype, device)}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def merge_rates(*measured: dict) -> dict:
    """Rates measured at several times (before and after a step): per source, the best of the bests and the
    worst of the worsts."""
    out = {}
    for rates in measured:
        for name, r in rates.items():
            best = max(r["best"], out.get(name, r)["best"])
            worst = min(r["worst"], out.get(name, r)["worst"])
            out[name] = {"best": best, "worst": worst, "spread": worst / best}
    return out


# ---------------------------------------------------------------- the theoretical CPU peak


def flops_per_cycle(vendor: str, family: int, flags: set, bf16: bool) -> tuple[int | None, str]:
    """FLOPs per cycle per core of the CPU's vector units, from its /proc/cpuinfo flags, with the basis."""
    amd = vendor == "AuthenticAMD"
    if bf16 and "amx_bf16" in flags:
        return 1024, "AMX tiles: 1024 bf16 FLOPs per cycle"
    if "avx512f" in flags and amd and family >= 0x1A:
        fp32, basis = 64, "Zen 5: two 512-bit FMA pipes x 16 fp32 x 2"
    elif "avx512f" in flags and amd:
        fp32, basis = 32, "Zen 4: AVX-512 on two 256-bit FMA pipes x 8 fp32 x 2"
    elif "avx512f" in flags:
        fp32, basis = 64, "two AVX-512 FMA units x 16 fp32 x 2 (a Xeon with one unit reaches half)"
    elif {"avx2", "fma"} <= flags:
        fp32, basis = 32, "two 256-bit FMA units x 8 fp32 x 2"
    elif "avx" in flags:
        fp32, basis = 16, "AVX without FMA: a 256-bit add and a multiply per cycle"
    else:
        return None, "no AVX in the CPU flags: FLOPs per cycle unknown"
    if not bf16:
        return fp32, basis
    if "avx512_bf16" in flags:
        return 2 * fp32, f"AVX512_BF16 dot products, twice the fp32 rate ({basis})"
    return fp32, f"no bf16 units: bf16 at the fp32 rate ({basis})"


def theoretical_peak(cpu: dict, cores: int, bf16: bool = False) -> dict:
    """cores x clock x FLOPs per cycle, from `cpu` (as `read_cpu` gives it), for `cores` threads of the step
    (at most the physical cores). Reported beside the measured peak, never used as MFU's denominator: the
    figure depends on a clock the CPU may not hold and on unit counts the flags do not show."""
    per_cycle, basis = flops_per_cycle(cpu["vendor"], cpu["family"], cpu["flags"], bf16)
    cores = min(cores, cpu["cores"] or cores)
    mhz, clock = cpu["max_mhz"], "the maximum clock (lscpu)"
    if mhz is None:
        mhz, clock = cpu["mhz"], "the reported clock (lscpu gives no maximum, so boost is not counted)"
    if per_cycle is None or mhz is None:
        why = basis if per_cycle is None else "no clock in lscpu or /proc/cpuinfo"
        return {"flops_per_s": None, "unknown": why}
    return {
        "flops_per_s": cores * mhz * 1e6 * per_cycle,
        "basis": f"{cores} cores x {mhz:.0f} MHz x {per_cycle} FLOPs/cycle ({basis}) at {clock}",
    }


def read_cpu() -> dict:
    """Vendor, family, flags, the current clock (/proc/cpuinfo), physical cores and the max clock (lscpu)."""
    text = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    first = dict(
        (k.strip(), v.strip())
        for k, _, v in (line.partition(":") for line in text.split("\n\n")[0].splitlines())
    )
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        lscpu = ""
    field = lambda name: (re.findall(rf"^{name}:\s*(.+)$", lscpu, re.MULTILINE) or [None])[0]  # noqa: E731
    per_socket, sockets, max_mhz = field(r"Core\(s\) per socket"), field(r"Socket\(s\)"), field("CPU max MHz")
    return {
        "vendor": first.get("vendor_id", ""),
        "family": int(first.get("cpu family", 0) or 0),
        "flags": set(first.get("flags", "").split()),
        "mhz": float(first["cpu MHz"]) if "cpu MHz" in first else None,
        "max_mhz": float(max_mhz) if max_mhz else None,
        "cores": int(per_socket) * int(sockets) if per_socket and sockets else None,
    }


# ---------------------------------------------------------------- MFU


def mfu_figures(achieved: float, rates: dict, theoretical: dict | None = None) -> dict:
    """MFU against the best measured rate of `rates` ({source: {best, worst, spread}}), that source named,
    each source's rate and spread beside it, and the theoretical peak if given (reported, never the
    denominator). A step above the best rate gets no MFU but a message saying which figure it exceeded and
    why that can happen."""
    source, peak = max(rates.items(), key=lambda kv: kv[1]["best"])
    out = {
        "mfu_source": source,
        "peak_flops_per_s": peak["best"],
        "peak_spread": peak["spread"],
        "measured_peaks": {k: {"flops_per_s": r["best"], "spread": r["spread"]} for k, r in rates.items()},
    }
    if theoretical is not None:
        out["theoretical_peak"] = theoretical
    mfu = achieved / peak["best"]
    if mfu <= 1:
        return {"mfu": mfu, **out}
    return {"mfu": None, "mfu_error": above_peak(achieved, source, peak, theoretical), **out}


def above_peak(achieved: float, source: str, peak: dict, theoretical: dict | None) -> str:
    """Why a step can run faster than the best measured kernel: the bursts were slowed (only when their
    spread shows it), or the step's kernels do less work than the FLOP counter counts, or suit the hardware
    better than the probe; and, above the theoretical peak, a clock above the one it assumes."""
    text = f"achieved {achieved:.3g} FLOP/s exceeds the best measured rate {peak['best']:.3g} ({source})"
    if peak["spread"] < BUSY_SPREAD:
        text += (
            f": its bursts' worst ran at {peak['spread']:.0%} of the best, so the machine was busy while the "
            "rate was measured; rerun on a quiet machine"
        )
    else:
        text += (
            f": its bursts were steady (worst {peak['spread']:.0%} of the best), so the machine was not "
            "busy; the step's kernels beat the probe (a convolution algorithm such as Winograd does fewer "
            "multiplies than the direct count the FLOP counter assumes, or the step's shapes suit the "
            "hardware better)"
        )
    limit = (theoretical or {}).get("flops_per_s")
    if limit and achieved > limit:
        text += (
            f"; it also exceeds the theoretical peak {limit:.3g} ({theoretical['basis']}), so either the "
            "clock ran above the one assumed there or the FLOP count overstates the work"
        )
    return text


# ---------------------------------------------------------------- one step, in a fresh process


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def step_inputs(spec: dict):
    """The model of `spec` (ours or the plain reference; ours infers with batch norm folded into the
    convolutions), on its device and in its memory format, with a random batch and labels."""
    import torch

    from pipelines.core.reference import build_reference
    from segnet import build_model
    from segnet.layers import fold_batch_norm

    device = spec.get("device", "cpu")
    options = {"recompute": spec["recompute"]} if spec.get("recompute") else {}
    k = spec["num_classes"]
    model = (
        build_reference(spec["model"], k) if spec["reference"] else build_model(spec["model"], k, **options)
    )
    train = spec["mode"] == "train"
    if not train and not spec["reference"]:
        model = fold_batch_norm(model)
    model = model.to(device)
    x = torch.randn(spec["batch"], 3, *spec["size"], device=device)
    y = torch.randint(0, k, (spec["batch"], *spec["size"]), device=device)
    if spec["channels_last"]:
        model, x = (
            model.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    return model.train(train), x, y


def step_function(model, x, y, spec: dict):
    """step(net): one SGD training step (bf16 autocast if `amp`), or one forward pass without gradients."""
    import torch

    device = spec.get("device", "cpu")
    fused = {"fused": True} if device == "cuda" else {}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, **fused)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=spec.get("amp", False))

    def step(net):
        if spec["mode"] == "train":
            with autocast:
                out = net(x)
            loss = torch.nn.functional.cross_entropy(out.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        else:
            with torch.no_grad(), autocast:
                net(x)

    return step


def measure_step(spec: dict) -> dict:
    """Runs in a fresh process, so the peak memory belongs to this model's step alone (CPU: resident-set
    growth; GPU: torch.cuda.max_memory_allocated growth). `compile` is a torch.compile mode or None."""
    import resource

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    cuda = spec.get("device", "cpu") == "cuda"
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = spec.get("tf32", False)
    eager, x, y = step_inputs(spec)
    step = step_function(eager, x, y, spec)
    mode = spec.get("compile")
    model = torch.compile(eager, mode=None if mode == "default" else mode) if mode else eager
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    base = torch.cuda.memory_allocated() if cuda else _rss_bytes()
    t0 = time.perf_counter()
    for _ in range(3 if mode else 1):  # warm-up (compiles; CUDA graphs record on the 3rd)
        step(model)
    sync()
    warmup = time.perf_counter() - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        step(model)
        sync()
        times.append(time.perf_counter() - t0)
    with FlopCounterMode(display=False) as counter:  # counted on the eager model: the same arithmetic
        step(eager)
    return {
        "seconds_per_step": float(np.median(times)),
        "flops_per_image": counter.get_total_flops() / spec["batch"],
        "peak_memory_bytes": peak,
        "warmup_s": warmup,
    }


def run_isolated(spec: dict, timeout: float | None = None) -> dict:
    """measure_step in a fresh process; past `timeout` seconds (compiling, autotuning) it is stopped and
    TimeoutError raised."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        try:
            return pool.apply_async(measure_step, (spec,)).get(timeout)
        except multiprocessing.TimeoutError:
            raise TimeoutError(f"gave up after {timeout:.0f} s") from None
