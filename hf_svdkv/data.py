"""The seed's `core.data` import path (compat/), with the text helpers once defined here (now `text`)."""

from .compat import LLaMADatasetProcessor, load_text, make_windows, split_calibration, tokenize_text  # noqa: F401
