"""tunecomp-fx: joint fine-tuning and compression as a torch.fx pass pipeline.

    compact = tunecomp_fx.compress(model, example_inputs, ratio=0.4)  # training-free
    compact = tunecomp_fx.compress(model, example_inputs, ratio=0.4, data=loader, steps=1000)  # joint
    print(tunecomp_fx.get_report(compact))
"""

__version__ = "0.1.0"

from tunecomp_fx.api import compress, finalize, get_report, prepare, prune_slack
from tunecomp_fx.config import CompressionConfig
from tunecomp_fx.errors import (
    BudgetError,
    CalibrationError,
    CaptureError,
    ConfigError,
    ExportError,
    InputError,
    PassError,
    SiteError,
    TrainingError,
    TunecompError,
)
from tunecomp_fx.report import CompressionReport
from tunecomp_fx.sites import set_blend
from tunecomp_fx.train import JointTrainer, StepHook, TrainingConfig

__all__ = [
    "BudgetError",
    "CalibrationError",
    "CaptureError",
    "CompressionConfig",
    "CompressionReport",
    "ConfigError",
    "ExportError",
    "InputError",
    "JointTrainer",
    "PassError",
    "SiteError",
    "StepHook",
    "TrainingConfig",
    "TrainingError",
    "TunecompError",
    "__version__",
    "compress",
    "finalize",
    "get_report",
    "prepare",
    "prune_slack",
    "set_blend",
]
