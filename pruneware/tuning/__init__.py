"""The plan autotuner: `pruneware.tune(model, processor, calibration, budget)`.

    result = pruneware.tune(model, processor, budget={"avg_tokens": 64})
    str(result.plan)       # e.g. "divprune@pre:96,random@4:40"
    result.report.summary()

See `pruneware.tuning.tuner.tune` for what it optimises and why the search is sound.
"""

from pruneware.tuning.budget import Budget, BudgetError
from pruneware.tuning.calibration import CalibrationError
from pruneware.tuning.tuner import TuneReport, TuneResult, tune

__all__ = ["Budget", "BudgetError", "CalibrationError", "TuneReport", "TuneResult", "tune"]
