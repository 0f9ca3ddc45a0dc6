"""Table 1's report, shared by `segnet experiment table1` (Ray Tune) and `make gpu-table1` (no Ray): the rows
beside the paper's figures with the differences, and the paper's three conclusions checked on them. Imports
neither Ray nor MLflow; the chart is drawn where matplotlib is installed."""

import csv
import json
from pathlib import Path

from data_prep.datasets import CAMVID
from pipelines.config import TABLE1_BALANCING as BALANCING
from pipelines.core.measure import measure_step
from segnet.models import build_model, count_parameters
from segnet.paper import PAPER_SOURCE, PAPER_TABLE1

MEASURES = ("G", "C", "mIoU", "BF")


def inference_ms(model: str, size: tuple[int, int], steps: int, device: str = "cpu") -> float:
    """Milliseconds per image, batch 1, on this machine (the paper's Table 1 column)."""
    import torch

    spec = {
        "device": device,
        "model": model,
        "size": size,
        "batch": 1,
        "mode": "infer",
        "steps": steps,
        "threads": torch.get_num_threads(),
        "reference": False,
        "channels_last": True,
        "num_classes": CAMVID.num_classes,  # Table 1 is CamVid's
    }
    return 1000 * measure_step(spec)["seconds_per_step"]


def ours_table(rows: list[dict]) -> dict:
    """{variant: {balancing: (G, C, mIoU, BF)}} from the trial rows."""
    table: dict = {}
    for r in rows:
        table.setdefault(r["variant"], {})[r["balancing"]] = tuple(r[m] for m in MEASURES)
    return table


def check_conclusions(table: dict) -> list[dict]:
    """The paper's three Table 1 conclusions, each tested on `table` ({variant: {balancing: scores}}).
    Run on the paper's own figures too, so the criteria are seen to hold there."""
    out = []
    learned = [v for v in table if v != "bilinear-interpolation"]
    # 1. Learned decoders beat bilinear interpolation on every measure.
    base = table.get("bilinear-interpolation", {})
    pairs = [(v, m) for v in learned for m in table[v] if m in base]
    if not pairs:
        out.append({"claim": 1, "verdict": None, "detail": "needs bilinear and a learned decoder"})
    else:
        wins = sum(table[v][m][i] > base[m][i] for v, m in pairs for i in range(4))
        mean_wins = True
        for m in {m for _, m in pairs}:
            mine = [table[v][m] for v, mode in pairs if mode == m]
            mean_wins &= all(sum(s[i] for s in mine) / len(mine) > base[m][i] for i in range(4))
        out.append(
            {
                "claim": 1,
                "verdict": mean_wins,
                "detail": f"the learned decoders' mean beats bilinear on every measure: {mean_wins}; "
                f"{wins} of {4 * len(pairs)} single comparisons won",
            }
        )
    # 2. SegNet-Basic about as good as FCN-Basic (within 2 points of G and mIoU) while storing only indices.
    modes = [m for m in table.get("segnet-basic", {}) if m in table.get("fcn-basic", {})]
    if not modes:
        out.append({"claim": 2, "verdict": None, "detail": "needs segnet-basic and fcn-basic"})
    else:
        gaps = {
            m: (
                table["segnet-basic"][m][0] - table["fcn-basic"][m][0],
                table["segnet-basic"][m][2] - table["fcn-basic"][m][2],
            )
            for m in modes
        }
        ok = all(g >= -2.0 and i >= -2.0 for g, i in gaps.values())
        detail = "; ".join(f"{BALANCING[m]}: G {g:+.1f}, mIoU {i:+.1f} points" for m, (g, i) in gaps.items())
        out.append({"claim": 2, "verdict": ok, "detail": f"SegNet-Basic minus FCN-Basic, {detail}"})
    # 3. Median-frequency balancing raises class average accuracy and mIoU over natural frequency.
    both = [v for v in table if {"median_frequency", "none"} <= set(table[v])]
    if not both:
        out.append({"claim": 3, "verdict": None, "detail": "needs both balancing modes"})
    else:
        dc = [table[v]["median_frequency"][1] - table[v]["none"][1] for v in both]
        di = [table[v]["median_frequency"][2] - table[v]["none"][2] for v in both]
        ok = sum(dc) > 0 and sum(di) > 0
        out.append(
            {
                "claim": 3,
                "verdict": ok,
                "detail": f"mean change C {sum(dc) / len(dc):+.1f}, mIoU {sum(di) / len(di):+.1f} "
                "points; "
                f"C up in {sum(d > 0 for d in dc)} of {len(dc)} variants, mIoU up in "
                f"{sum(d > 0 for d in di)} of {len(di)}",
            }
        )
    return out


CLAIMS = {
    1: (
        "Learned decoders beat bilinear interpolation on every measure",
        "the learned decoders' mean G, C, mIoU and BF each above bilinear's, in every balancing mode run",
    ),
    2: (
        "SegNet-Basic performs about as well as FCN-Basic while storing only the pooling indices",
        "SegNet-Basic's G and mIoU no more than 2 points below FCN-Basic's, storage 1 against 11",
    ),
    3: (
        "Median-frequency balancing raises class average accuracy (C) and mIoU over natural frequency",
        "C and mIoU, averaged over the variants run, higher with median frequency",
    ),
}


def verdict(v: bool | None) -> str:
    return {True: "reproduced", False: "not reproduced", None: "not tested"}[v]


REPORT_HEADER = [
    "variant",
    "paper_name",
    "params_m",
    "paper_params_m",
    "storage",
    "paper_storage",
    "infer_ms",
    "paper_infer_ms",
    "balancing",
    "epochs",
    "best_epoch",
] + [f"{w}{m}" for m in MEASURES for w in ("", "paper_")]


def report_lines(rows, variants, modes, infer: dict) -> list[dict]:
    """One line per (variant, balancing) that has a row: ours beside the paper's figures."""
    lines = []
    for v in variants:
        model, paper = build_model(v, CAMVID.num_classes), PAPER_TABLE1[v]
        for m in modes:
            row = next((r for r in rows if r["variant"] == v and r["balancing"] == m), None)
            if row is None:  # a run cut off before this variant: reported without it
                continue
            values = [v, paper["paper_name"], count_parameters(model) / 1e6, paper["params_m"]]
            values += [model.storage_multiplier, paper["storage"], infer[v], paper["infer_ms"], m]
            values += [row["epochs"], row["best_epoch"]]
            for i, k in enumerate(MEASURES):
                values += [row[k], paper[m][i]]
            lines.append(dict(zip(REPORT_HEADER, values)))
    return lines


def mode_table(lines: list[dict], mode: str) -> list[str]:
    """One balancing mode's markdown table; each score reads ours / paper (ours minus paper)."""
    md = [
        f"## {BALANCING[mode]} balancing",
        "",
        "| variant | params (M) | storage | infer ms | epochs (best) | G | C | mIoU | BF |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for line in (x for x in lines if x["balancing"] == mode):
        storage = "n/a" if line["paper_storage"] is None else line["paper_storage"]
        md.append(
            f"| {line['paper_name']} | {line['params_m']:.3f} / {line['paper_params_m']} "
            f"| {line['storage']} / {storage} | {line['infer_ms']:.1f} / {line['paper_infer_ms']} "
            f"| {line['epochs']} ({line['best_epoch']}) | "
            + " | ".join(
                f"{line[k]:.1f} / {line['paper_' + k]} ({line[k] - line['paper_' + k]:+.1f})"
                for k in MEASURES
            )
            + " |"
        )
    return md + [""]


def conclusions_md(rows, variants, modes) -> list[str]:
    """Each conclusion's verdict on our rows, beside the same check on the paper's figures."""
    ours = ours_table(rows)
    paper_table = {v: {m: PAPER_TABLE1[v][m] for m in modes} for v in variants if v in ours}
    md = ["## The paper's conclusions, checked on this run", ""]
    for ours_c, paper_c in zip(check_conclusions(ours), check_conclusions(paper_table)):
        n = ours_c["claim"]
        claim, criterion = CLAIMS[n]
        md += [
            f"{n}. **{claim}**: {verdict(ours_c['verdict'])} here (criterion: {criterion}).",
            f"   Ours: {ours_c['detail']}.",
            f"   The paper's figures for the same variants: {paper_c['detail']}.",
            "",
        ]
    return md


def report_md(rows, lines, variants, modes, info: dict, chart: bool) -> str:
    """table1.md. `info` says how the run was made: profile, image_size, training (the epochs or time
    budget), test_images, infer_size, machine, run (what ran it) and minutes."""
    md = [
        f"# SegNet Table 1, rerun ({info['profile']} profile)",
        "",
        f"Trained at {info['image_size']} {info['training']}; each trial's checkpoint chosen by validation "
        f"global accuracy, then scored on the {info['test_images']} test images at full label resolution. "
        f"Inference timed at {info['infer_size']}, batch 1, on {info.get('machine', 'this machine')}. "
        f"{info['run']}; the whole run took {info['minutes']:.1f} minutes.",
        "",
        f"Paper figures: {PAPER_SOURCE}. Each cell reads ours / paper, scores in percent with ours minus "
        "the paper's in brackets. The paper "
        "trains at 360x480 until the loss converges; a shorter or smaller run is expected to score lower.",
        "",
    ]
    for m in modes:
        md += mode_table(lines, m)
    md += conclusions_md(rows, variants, modes)
    if chart:
        md += ["![test mIoU and BF per variant, ours beside the paper's](table1.png)", ""]
    return "\n".join(md)


def save_chart(lines, modes, path: Path) -> bool:
    """table1.png where matplotlib is installed (the GPU machines may not have it)."""
    try:
        from pipelines.core.plots import save_table1_chart
    except ImportError:
        return False
    save_table1_chart(lines, modes, path)
    return True


def write_report(rows, variants, modes, infer: dict, info: dict, out: Path) -> Path:
    """table1.md, table1.csv, table1.json and table1.png, written to a temporary folder and renamed into
    place, so a reader never sees half a report."""
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    lines = report_lines(rows, variants, modes, infer)
    with open(tmp / "table1.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, REPORT_HEADER)
        writer.writeheader()
        writer.writerows(lines)
    chart = bool(lines) and save_chart(lines, modes, tmp / "table1.png")
    (tmp / "table1.md").write_text(report_md(rows, lines, variants, modes, info, chart))
    (tmp / "table1.json").write_text(json.dumps({"info": info, "rows": lines}, indent=2))
    replace_folder(tmp, out)
    return out


def replace_folder(new: Path, out: Path) -> None:
    """Put the folder `new` where `out` is, removing the old one's files."""
    if out.exists():
        old = out.with_name(out.name + ".old")
        out.rename(old)
        new.rename(out)
        for p in old.iterdir():
            p.unlink()
        old.rmdir()
    else:
        new.rename(out)
