"""Measuring one training or inference step: the machine's matmul rate, a step's time, FLOPs and peak memory
in a fresh process, and MFU. Shared by `segnet bench model`, Table 1's inference column and the GPU check;
it imports only torch and the project's models, so it runs where Ray and albumentations are absent.
"""

import os
import time

import numpy as np


def matmul_rate(dtype=None, device: str = "cpu", reps: int = 5, seconds: float = 0.3) -> dict:
    """The dense matmul rate of this machine now: the best of `reps` timed bursts (fp32, or bf16 for
    autocast), with the spread, so that one slow burst on a shared machine does not set MFU's denominator."""
    import torch

    n = 8192 if device == "cuda" else 2048  # a GPU needs a bigger product to reach its rate
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    rates = []
    for _ in range(reps):
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            count += 1
            sync()
        rates.append(2 * n**3 * count / (time.perf_counter() - t0))
    return {"best": max(rates), "worst": min(rates)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_step(spec: dict) -> dict:
    """Runs in a fresh process, so the peak memory belongs to this model's step alone (CPU: resident-set
    growth; GPU: torch.cuda.max_memory_allocated growth). `compile` is a torch.compile mode or None."""
    import resource

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipelines.reference import build_reference
    from segnet import build_model
    from segnet.layers import fold_batch_norm

    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    device = spec.get("device", "cpu")
    cuda = device == "cuda"
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = spec.get("tf32", False)
    options = {"recompute": spec["recompute"]} if spec.get("recompute") else {}
    model = build_reference(spec["model"]) if spec["reference"] else build_model(spec["model"], **options)
    train = spec["mode"] == "train"
    if not train and not spec["reference"]:  # ours infers with batch norm folded into the convs
        model = fold_batch_norm(model)
    model = model.to(device)
    x = torch.randn(spec["batch"], 3, *spec["size"], device=device)
    y = torch.randint(0, 11, (spec["batch"], *spec["size"]), device=device)
    if spec["channels_last"]:
        model, x = (
            model.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    model.train(train)
    fused = {"fused": True} if cuda else {}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, **fused)
    flop_model = model
    if spec.get("compile"):
        model = torch.compile(model, mode=None if spec["compile"] == "default" else spec["compile"])

    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=spec.get("amp", False))
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(net=model):
        if train:
            with autocast:
                out = net(x)
            loss = torch.nn.functional.cross_entropy(out.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        else:
            with torch.no_grad(), autocast:
                net(x)

    base = torch.cuda.memory_allocated() if cuda else _rss_bytes()
    t0 = time.perf_counter()
    for _ in range(3 if spec.get("compile") else 1):  # warm-up (compiles; CUDA graphs record on the 3rd)
        step()
    sync()
    warmup = time.perf_counter() - t0
    peak = (
        torch.cuda.max_memory_allocated() - base
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    )
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    with FlopCounterMode(display=False) as counter:  # counted on the eager model: the same arithmetic
        step(flop_model)
    seconds = float(np.median(times))
    return {
        "seconds_per_step": seconds,
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


def mfu_figures(achieved: float, rate: dict) -> dict:
    """MFU against the best measured matmul rate; above 100% the denominator was measured too low (a busy
    machine), so no MFU is given, only the error."""
    mfu = achieved / rate["best"]
    if mfu > 1:
        return {
            "mfu": None,
            "mfu_error": f"achieved {achieved:.3g} FLOP/s exceeds the measured matmul rate "
            f"{rate['best']:.3g}: the rate was measured while the machine was busy; rerun",
        }
    return {"mfu": mfu}
