"""The reports: one human-readable page per pipeline, in Markdown and in self-contained HTML.

    render.py    blocks -> Markdown / HTML, the figures (sample grid, generator curve), the page folder
    inputs.py    reading and cross-checking the stages' outputs (``ReportError``), shared formatting
    core.py      the core pipeline's page: the ``report`` stage of dvc.yaml -> <reports>/report/
    variants.py  the variants pipeline's page: the ``variants_report`` stage of variants/dvc.yaml
                 -> <reports>/variants_report/

A report computes no new metric; it reads what the stages wrote and refuses inputs from
different runs (a ``ReportError`` names the file and the stage to rerun).
"""

from poison.report.core import INPUTS, build_report
from poison.report.inputs import ReportError
from poison.report.render import (curve_png, render_html, render_markdown, sample_grid_png, save_sample_grid,
                                  write_page)
from poison.report.variants import VARIANT_INPUTS, build_variants_report

__all__ = ["INPUTS", "VARIANT_INPUTS", "ReportError", "build_report", "build_variants_report", "curve_png",
           "render_html", "render_markdown", "sample_grid_png", "save_sample_grid", "write_page"]
