"""Quality evaluation (issue 4): generated long-context cases, one run per case and setting, a resumable grid
with a JSON results file, and a markdown report with plots.

    python -m asrkf_gguf eval --model qwen --tasks passkey,passkey-mt --ctx 2048 --budgets 0.25 --out DIR
    python -m asrkf_gguf eval-report DIR

tasks.py makes the cases (fixed seeds, our own text), runner.py runs one case under one setting through the
Engine, grid.py expands and resumes a grid, report.py writes tables and plots.
"""

from .grid import GridSpec, run_grid  # noqa: F401
from .report import write_report  # noqa: F401
from .runner import SETTINGS, Setting  # noqa: F401
from .tasks import TASKS, Case, make_case  # noqa: F401

__all__ = ["GridSpec", "run_grid", "write_report", "SETTINGS", "Setting", "TASKS", "Case", "make_case"]
