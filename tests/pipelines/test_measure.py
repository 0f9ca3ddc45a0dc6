"""MFU's denominator on constructed figures: the best measured rate, its source named, the theoretical peak
beside it (never the denominator), and a step above the peak explained by what the figures show."""

import pytest

from pipelines.core.measure import flops_per_cycle, merge_rates, mfu_figures, theoretical_peak

MKL, ONEDNN = "torch.mm (MKL)", "3x3 convolution (oneDNN)"


def rate(best: float, spread: float) -> dict:
    return {"best": best, "worst": best * spread, "spread": spread}


# This AMD EPYC, quiet: MKL's matmul 197 GFLOP/s, oneDNN's convolution 351 GFLOP/s.
QUIET = {MKL: rate(197e9, 0.95), ONEDNN: rate(351e9, 0.91)}
ZEN5 = {"vendor": "AuthenticAMD", "family": 0x1A, "flags": {"avx2", "fma", "avx512f", "avx512_bf16"},
        "mhz": 2596.0, "max_mhz": None, "cores": 2}  # fmt: skip


def test_mfu_is_taken_against_the_best_measured_rate_and_names_it():
    figures = mfu_figures(300e9, QUIET)
    assert figures["mfu"] == pytest.approx(300 / 351)
    assert figures["mfu_source"] == ONEDNN and figures["peak_flops_per_s"] == 351e9
    assert figures["measured_peaks"][MKL] == {"flops_per_s": 197e9, "spread": 0.95}


def test_the_theoretical_peak_is_reported_beside_but_never_the_denominator():
    theory = {"flops_per_s": 100e9, "basis": "constructed"}
    figures = mfu_figures(300e9, QUIET, theory)
    assert figures["mfu"] == pytest.approx(300 / 351) and figures["theoretical_peak"] is theory


def test_a_step_above_steady_bursts_is_not_blamed_on_a_busy_machine():
    figures = mfu_figures(400e9, QUIET)
    assert figures["mfu"] is None
    message = figures["mfu_error"]
    assert "exceeds the best measured rate 3.51e+11 (3x3 convolution (oneDNN))" in message
    assert "not busy" in message and "Winograd" in message and "was busy" not in message


def test_a_step_above_spread_bursts_says_the_machine_was_busy():
    busy = {MKL: rate(40e9, 0.3), ONEDNN: rate(70e9, 0.29)}
    message = mfu_figures(351e9, busy)["mfu_error"]
    assert "(3x3 convolution (oneDNN))" in message and "29% of the best" in message
    assert "the machine was busy" in message


def test_a_step_above_the_theoretical_peak_says_so():
    theory = theoretical_peak(ZEN5, 2)
    message = mfu_figures(360e9, QUIET, theory)["mfu_error"]
    assert "exceeds the theoretical peak 3.32e+11" in message and "clock" in message


def test_theoretical_peak_on_this_amd_epyc_uses_the_reported_clock_and_says_so():
    fp32, bf16 = theoretical_peak(ZEN5, 4), theoretical_peak(ZEN5, 2, bf16=True)
    assert fp32["flops_per_s"] == pytest.approx(2 * 2596e6 * 64)  # at most the 2 physical cores
    assert "reported clock" in fp32["basis"] and "Zen 5" in fp32["basis"]
    assert bf16["flops_per_s"] == pytest.approx(2 * 2596e6 * 128)


def test_theoretical_peak_uses_the_max_clock_when_lscpu_gives_it():
    cpu = {**ZEN5, "max_mhz": 3500.0}
    assert theoretical_peak(cpu, 2)["flops_per_s"] == pytest.approx(2 * 3500e6 * 64)


@pytest.mark.parametrize(
    "vendor, family, flags, bf16, expected",
    [
        ("GenuineIntel", 6, {"avx2", "fma", "avx512f", "amx_bf16"}, True, 1024),
        ("GenuineIntel", 6, {"avx2", "fma", "avx512f", "amx_bf16"}, False, 64),
        ("AuthenticAMD", 0x19, {"avx2", "fma", "avx512f"}, False, 32),
        ("AuthenticAMD", 0x17, {"avx2", "fma"}, True, 32),
        ("GenuineIntel", 6, {"sse2"}, False, None),
    ],
)
def test_flops_per_cycle_from_the_vector_units(vendor, family, flags, bf16, expected):
    assert flops_per_cycle(vendor, family, flags, bf16)[0] == expected


def test_theoretical_peak_is_unknown_without_a_clock_or_vector_units():
    assert theoretical_peak({**ZEN5, "mhz": None}, 2) == {
        "flops_per_s": None,
        "unknown": "no clock in lscpu or /proc/cpuinfo",
    }
    assert "no AVX" in theoretical_peak({**ZEN5, "flags": set()}, 2)["unknown"]


def test_rates_before_and_after_merge_to_the_best_and_the_worst():
    merged = merge_rates({MKL: rate(100.0, 0.9)}, {MKL: rate(120.0, 0.5)})
    assert merged[MKL] == {"best": 120.0, "worst": 60.0, "spread": 0.5}
