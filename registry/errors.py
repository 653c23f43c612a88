"""The library's named errors.

Every error a user can cause is one of these. The message says what went wrong, in terms a Python
caller understands (argument names, not command-line flags), and, where there is one, what to do
next (``advice``). The command line shows the same ``message`` but replaces the advice with its own
hint for the same ``fix`` (see ``neuronreg/cli/_errors.py``, the one table of CLI hints), so a
Python user never reads "--force" and a CLI user never reads "force=True".
"""

from __future__ import annotations


class NeuronregError(Exception):
    """Base class: an expected failure with a message meant for the user.

    ``fix`` names the remedy (``"force"``, ``"login"``, ``"registry"`` ...) so that the CLI can say
    it with its own flags; ``advice`` says it to a Python caller.
    """

    def __init__(self, message: str, *, advice: str | None = None, fix: str | None = None):
        self.message = message.strip()
        self.advice = advice
        self.fix = fix
        super().__init__(f"{self.message} {advice}" if advice else self.message)


class ManifestError(NeuronregError):
    """The manifest file is missing, unreadable or has a bad entry."""


class UnknownModel(NeuronregError):
    """A model alias, Hub id, folder or registry name that cannot be found or loaded."""


class UnknownLanguage(NeuronregError):
    """A language code or name that neither the manifest nor the registry knows."""


class UnsupportedArchitecture(NeuronregError):
    """A model whose MLP layout neuronreg cannot hook."""


class CorpusError(NeuronregError):
    """No text, or text that cannot be read, for a language."""


class HeldOutOverlap(CorpusError):
    """Held-out text that is the very text a mask was computed from."""


class RegistryError(NeuronregError):
    """The registry folder cannot be written, or holds something missing or unreadable."""


class SettingsConflict(RegistryError):
    """The registry already holds results made with other settings."""


class RecordError(RegistryError):
    """A provenance record or run config that is malformed, or written by a newer neuronreg."""


class SelectionError(NeuronregError):
    """Counts that cannot be selected from (no languages, mismatched shapes, bad rates)."""


class MaskError(NeuronregError):
    """A mask that is malformed, or does not fit the model it is used with."""


class HubError(NeuronregError):
    """A Hub operation that failed: login, access, missing repo or file, network."""


class FinetuneError(NeuronregError):
    """Fine-tuning settings or a run folder that cannot be used (bad values, a different unfinished run)."""


class SettingsError(NeuronregError):
    """A setting (token count, dtype, device, rate ...) that is out of range or not understood."""


class MissingExtra(NeuronregError):
    """An optional package that a feature needs is not installed; the message names the extra that brings it
    (``pip install 'neuronreg[peft]'``). :mod:`neuronreg.extras` lists them."""
