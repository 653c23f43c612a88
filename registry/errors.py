"""The library's named errors.

Every error a user can cause is one of these. Each message already says what to do next, so the
CLI only has to print it (see ``cli.py``, the one place where errors become exit codes).
"""


class NeuronregError(Exception):
    """Base class: an expected failure with a message meant for the user."""


class ManifestError(NeuronregError):
    """The manifest file is missing, unreadable or has a bad entry."""


class UnknownModel(NeuronregError):
    """A model alias, Hub id or folder that cannot be found."""


class UnknownLanguage(NeuronregError):
    """A language code or name that the manifest does not know."""


class UnsupportedArchitecture(NeuronregError):
    """A model whose MLP layout neuronreg cannot hook."""


class CorpusError(NeuronregError):
    """No text, or text that cannot be read, for a language."""


class RegistryError(NeuronregError):
    """The registry folder cannot be written, or holds something unreadable."""


class SettingsConflict(RegistryError):
    """The registry already holds results made with other settings."""


class SelectionError(NeuronregError):
    """Counts that cannot be selected from (no languages, mismatched shapes, bad rates)."""


class MaskError(NeuronregError):
    """A mask that is malformed, or does not fit the model it is used with."""


class HubError(NeuronregError):
    """A Hub operation that failed: login, access, missing repo or file, network."""


class HeldOutOverlap(CorpusError):
    """Held-out text that is the very text a mask was computed from."""


class FinetuneError(NeuronregError):
    """Fine-tuning settings or a run folder that cannot be used (bad values, a different unfinished run)."""
