"""Markdown of a `gpu_check` summary: the README's GPU table and every part's rows.

    python -m vidistill.gpu_report outputs/gpu_check/gpu_check.json   # prints the README table

Kept apart from `gpu_check` (which runs things) so it is tested on CPU with a made-up summary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _rows(summary: dict[str, Any], part: str) -> list[dict[str, Any]]:
    return ((summary.get("parts", {}).get(part) or {}).get("result") or {}).get("rows", [])


def _cmd(summary: dict[str, Any], part: str) -> str:
    cmd = (summary.get("parts", {}).get(part) or {}).get("command")
    return f"`{' '.join(cmd.split())}`" if cmd else "—"


def _status(summary: dict[str, Any], part: str) -> str | None:
    """None if the part ran; else why its row has no numbers."""
    p = summary.get("parts", {}).get(part)
    if not p:
        return "not run"
    if p.get("status") not in ("ok", "failed"):
        return f"**{p.get('status')}**: {p.get('error', '')}".rstrip(": ")
    return None


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        v = f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return f"{v}{unit}"


def _flow_cell(summary: dict[str, Any], part: str) -> str:
    why = _status(summary, part)
    if why:
        return why
    rows = _rows(summary, part)
    cuda = [r for r in rows if str(r.get("backend", "")).startswith("torch")]
    ref = next((r for r in rows if r.get("backend") in ("opencv", "opencv-mp") and "pairs_per_s" in r), None)
    bits = []
    for r in cuda:
        if "error" in r:
            bits.append(f"{r['backend']} compile={r.get('compile')}: error {r['error']}")
            continue
        where = "CUDA" if r["backend"] == "torch-cuda" else "torch CPU"
        bits.append(f"{where} compile={r.get('compile')}: **{_fmt(r['pairs_per_s'])} pairs/s**"
                    + (f" ({_fmt(r.get('speedup'))}× OpenCV)" if r.get("speedup") is not None else "")
                    + (f", EPE {_fmt(r.get('epe_ref'))} = {_fmt(r.get('epe_ratio'))}× OpenCV's" if r.get("epe_ratio") is not None else "")
                    + f", peak {_fmt(r.get('peak_mib'))} MiB, batch {r.get('batch_size')}")
    if ref:
        bits.append(f"OpenCV DualTVL1 over {summary.get('parts', {}).get(part, {}).get('result', {}).get('workers', '?')} "
                    f"CPU processes: {_fmt(ref['pairs_per_s'])} pairs/s, EPE {_fmt(ref.get('epe_ref', ref.get('epe')))} "
                    f"(on the first {ref.get('pairs')} pairs)")
    return "; ".join(bits) or "no rows"


def _memory_cell(summary: dict[str, Any]) -> str:
    why = _status(summary, "flow_memory")
    if why:
        return why
    by_mode: dict[str, list[str]] = {}
    for r in _rows(summary, "flow_memory"):
        if str(r.get("backend", "")).startswith("torch"):
            value = f"error {r['error']}" if "error" in r else f"{_fmt(r.get('peak_mib'))} MiB"
            by_mode.setdefault(str(r.get("compile")), []).append(f"{r.get('batch_size')} pairs: {value}")
    return "; ".join(f"compile={m}: " + ", ".join(v) for m, v in by_mode.items()) or "no rows"


def _train_cell(summary: dict[str, Any], part: str) -> str:
    why = _status(summary, part)
    if why:
        return why
    by_task: dict[str, list[str]] = {}
    for r in _rows(summary, part):
        value = f"error {r['error']}" if "error" in r else (
            f"{_fmt(r['clips_per_s'])}" + (f" ({_fmt(r.get('speedup_vs_fp32'))}×)" if r["precision"] != "fp32" else ""))
        by_task.setdefault(f"{r['task']} ({r['model']}, batch {r['batch_size']})", []).append(f"{r['precision']} {value}")
    return "; ".join(f"{t}: " + ", ".join(v) for t, v in by_task.items()) + " clips/s" if by_task else "no rows"


def _ort_cell(summary: dict[str, Any]) -> str:
    why = _status(summary, "ort")
    if why:
        return why
    bits = []
    for r in _rows(summary, "ort"):
        if "skipped" in r or "error" in r:
            if r["batch"] == min(x["batch"] for x in _rows(summary, "ort")):
                bits.append(f"{r['runtime']}: {'not measured: ' + r['skipped'] if 'skipped' in r else 'error ' + r['error']}")
            continue
        bits.append(f"{r['runtime']} batch {r['batch']}: p50 {_fmt(r['p50_ms'])} ms, {_fmt(r['clips_per_s'])} clips/s, "
                    f"max abs Δ {r['max_abs_diff']:.1e} vs PyTorch CPU")
    return "; ".join(bits) or "no rows"


def _tests_cell(summary: dict[str, Any], part: str) -> str:
    why = _status(summary, part)
    if why:
        return why
    res = summary["parts"][part].get("result") or {}
    failed = [t["name"] for t in res.get("tests", []) if t["outcome"] == "failed"]
    skipped = sorted({t["message"] for t in res.get("tests", []) if t["outcome"] == "skipped" and t.get("message")})
    return (f"{res.get('passed', 0)} passed, {res.get('failed', 0)} failed, {res.get('skipped', 0)} skipped"
            + (f" (failed: {', '.join(failed)})" if failed else "") + (f" (skipped: {'; '.join(skipped)})" if skipped else ""))


def readme_table(summary: dict[str, Any]) -> str:
    """The README's GPU table (| what | command | result |) from a `gpu_check` summary."""
    env = summary.get("environment", {})
    lines = ["| what | command | result |", "|---|---|---|",
             f"| GPU tests of TV-L1 (`-m gpu`) | {_cmd(summary, 'tests_flow')} | {_tests_cell(summary, 'tests_flow')} |",
             f"| GPU tests of training, ONNX Runtime, flow stage | {_cmd(summary, 'tests_gpu')} | {_tests_cell(summary, 'tests_gpu')} |",
             f"| TV-L1, 320×240 | {_cmd(summary, 'flow_320x240')} | {_flow_cell(summary, 'flow_320x240')} |",
             f"| TV-L1, 320×240, CUDA graphs | {_cmd(summary, 'flow_320x240_graphs')} | {_flow_cell(summary, 'flow_320x240_graphs')} |",
             f"| TV-L1, 112×112 | {_cmd(summary, 'flow_112x112')} | {_flow_cell(summary, 'flow_112x112')} |",
             f"| TV-L1 peak GPU memory per batch size, 320×240 | {_cmd(summary, 'flow_memory')} | {_memory_cell(summary)} |",
             f"| training, 8×56×56 clips | {_cmd(summary, 'train_8x56')} | {_train_cell(summary, 'train_8x56')} |",
             f"| training, 16×112×112 clips | {_cmd(summary, 'train_16x112')} | {_train_cell(summary, 'train_16x112')} |",
             f"| serving: ONNX Runtime per provider, r2plus1d_student 8×56×56 | {_cmd(summary, 'ort')} | {_ort_cell(summary)} |"]
    machine = (f"Machine: {env.get('gpu', 'no GPU')} ({env.get('gpu_memory_gib', '?')} GiB), driver {env.get('driver') or '?'}, "
               f"{env.get('cpu', '?')} ({env.get('cores', '?')} cores); torch {env.get('torch')}, triton {env.get('triton')}, "
               f"onnxruntime {env.get('onnxruntime')}, OpenCV {env.get('cv2')}; `make gpu-check` ({summary.get('profile')} "
               f"profile) in {summary.get('seconds', '?')} s.")
    return machine + "\n\n" + "\n".join(lines) + "\n"


def _table(rows: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, (dict, list))))
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(str(r.get(k, "")).replace("|", "/") for k in keys) + " |" for r in rows]
    return "\n".join(out)


def render_markdown(summary: dict[str, Any]) -> str:
    """gpu_check.md: verdict, failures, the README table, each part's status and full rows."""
    failures = summary.get("failures", [])
    head = summary.get("headline", {})
    parts = ["# vidistill GPU check", "",
             f"**{'all parts passed' if not failures else f'{len(failures)} failure(s)'}** in {summary.get('seconds', '?')} s "
             f"(budget {summary.get('budget_s', '?')} s)."]
    if head.get("tvl1_320x240"):
        h = head["tvl1_320x240"]
        parts.append(f"TV-L1 at 320×240: best {h['pairs_per_s']} pairs/s with compile={h['best_compile']} (eager "
                     f"{h['eager_pairs_per_s']}); floor 300 {'met' if h['floor_met'] else 'NOT met'}, goal 1,000 "
                     f"{'met' if h['goal_met'] else 'not met'}. Recommended `flow.tvl1_compile`: "
                     f"`{head.get('recommended_tvl1_compile')}`.")
    if failures:
        parts += ["", "## Failures", *[f"- {f}" for f in failures]]
    parts += ["", "## README table", "", readme_table(summary), "## Parts", "",
              "| part | status | seconds | limit s | error |", "|---|---|---|---|---|"]
    parts += [f"| {n} | {p.get('status')} | {p.get('seconds', '')} | {p.get('timeout_s', '')} | {p.get('error', '')} |"
              for n, p in summary.get("parts", {}).items()]
    for name, p in summary.get("parts", {}).items():
        result = p.get("result") or {}
        rows = result.get("rows") or result.get("tests")
        if rows:
            parts += ["", f"### {name}", "", f"`{p.get('command', '')}`", "", _table(rows)]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(readme_table(json.loads(Path(sys.argv[1]).read_text())))
