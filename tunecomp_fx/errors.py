"""One exception hierarchy: every failure a user can cause says what is wrong, where, and what to do."""


class TunecompError(Exception):
    """Base class of every error raised on purpose by tunecomp-fx."""


class ConfigError(TunecompError, ValueError):
    """A configuration value is out of range or of the wrong type."""


class InputError(TunecompError, ValueError):
    """Example inputs or data batches do not fit the model."""


class CaptureError(TunecompError):
    """Neither symbolic tracing nor torch.export could capture the model."""


class SiteError(TunecompError):
    """No compressible site was found, or every site was excluded."""


class BudgetError(TunecompError):
    """The parameter budget cannot be met."""


class CalibrationError(TunecompError):
    """Calibration data is empty or holds NaN/inf."""


class TrainingError(TunecompError):
    """The joint optimisation hit a non-finite loss or gradient or a loss that is not a scalar, or a
    checkpoint (or checkpoint folder) that cannot be used."""


class ExportError(TunecompError):
    """ONNX export failed, or ONNX Runtime disagrees with PyTorch beyond tolerance."""


class PassError(TunecompError):
    """A graph pass broke one of the invariants it declares; the message names the pass."""


class DataError(TunecompError):
    """A bundled model or data set is missing or malformed; the message names the package to install."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (or its type's name), for messages that quote a cause."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
