"""Steering: switch the language a model writes in with the registry's neurons, and measure it.

Researchers steer a model at inference by deactivating the neurons of the language it would write in
and activating those of another (Tang et al. 2024 switch languages this way). Everything here works
through :func:`neuronreg.hooks.steered_neurons`: hooks on the module whose output ``compute`` counts,
alive only inside a ``with`` block; the weights are never modified. Two modes:

* ``replace`` (the default): the ``deactivate`` language's neurons output 0, and the ``activate``
  language's neurons output ``strength`` x their mean activation on that language's text (a
  neuron in both masks is activated). Either language may be left out.
* ``additive``: on the union of both languages' neurons, ``strength`` x (mean on the ``activate``
  language - mean on the ``deactivate`` language) is added to the activation (a difference of means).

The means are the ones ``compute`` records in the counts files (``activation_sum / tokens``, or with
``statistic="positive"`` ``positive_sum / count``, the mean over the positions where the neuron fired).
``layers`` restricts steering to some layers. :func:`steer_eval` generates with and without steering
over a grid of strengths and identifies the language of every output with py3langid (see
:class:`LanguageIdentifier` for why that identifier).
"""

from .evaluate import SteerEvalReport, SteerEvalSettings, steer_eval
from .generation import GenerationSettings, generate_texts, steered_generation
from .identify import LanguageIdentifier
from .plan import SteeringPlan, SteeringSettings, plan_steering, steer, steered

__all__ = ["GenerationSettings", "LanguageIdentifier", "SteerEvalReport", "SteerEvalSettings", "SteeringPlan",
           "SteeringSettings", "generate_texts", "plan_steering", "steer", "steer_eval", "steered",
           "steered_generation"]
