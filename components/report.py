from typing import List

from kfp import dsl
from kfp.dsl import HTML, Input, Markdown, Model, Output

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def report_op(results: List[str], baseline: str, report: Output[Markdown], page: Output[HTML]) -> str:
    """Comparison of all methods and baselines: a Markdown table and an HTML page with the plot."""
    import json

    from vidistill.evaluate.report import comparison_report

    rows = [json.loads(baseline)] + [json.loads(r) for r in results]
    markdown, html = comparison_report(rows)
    open(report.path, "w").write(markdown)
    open(page.path, "w").write(html)
    return markdown


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def select_best_op(results: List[str], students: Input[List[Model]], best: Output[Model]) -> str:
    """Copy the student with the highest top-1 to `best`; returns its method key."""
    import json
    import shutil

    rows = [json.loads(r) for r in results]
    winner = max(rows, key=lambda r: r["top1"])
    source = next(s.path for s in students if s.metadata.get("method") == winner["method"])
    shutil.copytree(source, best.path)
    best.metadata.update({"method": winner["method"], "top1": winner["top1"]})
    return winner["method"]
