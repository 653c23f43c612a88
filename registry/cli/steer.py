"""``neuronreg generate`` and ``neuronreg steer-eval``: steer the output language with the registry's neurons."""

from __future__ import annotations

import shutil
import textwrap

import click

from . import _options as o
from ._output import json_result, result, setup_logging, status

MODES = ("replace", "additive")
STATISTICS = ("mean", "positive")


def _strength(ctx, param, value):
    from ..errors import SettingsError
    from ..steering.plan import check_strength

    try:
        return check_strength(value)
    except SettingsError as exc:
        raise click.BadParameter(exc.message) from exc


def _strengths(ctx, param, value):
    from ..errors import SettingsError
    from ..steering.plan import parse_strengths

    try:
        return parse_strengths(value)
    except SettingsError as exc:
        raise click.BadParameter(exc.message) from exc


def steering_options(f):
    """How to steer, shared by generate and steer-eval."""
    for option in reversed([
        click.option("--mode", type=click.Choice(MODES), default="replace", show_default=True,
                     help="replace: the deactivated language's neurons output 0 and the activated one's STRENGTH x "
                          "their mean activation; additive: STRENGTH x (mean of the activated language - mean of "
                          "the deactivated one) is added on both languages' neurons."),
        click.option("--statistic", type=click.Choice(STATISTICS), default="mean", show_default=True,
                     help="Which recorded mean: over every token of the language's text, or over the tokens where "
                          "the neuron fired (positive)."),
        click.option("--layers", default=None,
                     help="Steer only these layers: FIRST-LAST or a comma-separated list, e.g. 20-29 [default: all]."),
    ]):
        f = option(f)
    return f


def generation_options(f):
    """How outputs are generated, shared by generate and steer-eval."""
    for option in reversed([
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=40, show_default=True,
                     help="Tokens to generate per prompt."),
        click.option("--sample", is_flag=True, help="Sample instead of greedy decoding."),
        click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
                     help="Sampling temperature (with --sample)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the sampling (with --sample); base and steered runs start from the same one."),
        click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=1.0,
                     show_default=True, help="Penalty on repeating tokens (1.0: none; 1.1 is common)."),
        o.batch_size_option(8, "Prompts generated together (padded on the left)."),
    ]):
        f = option(f)
    return f


def model_options(f):
    for option in (o.registry_option, o.token_option, o.trust_remote_code_option, o.name_option, o.device_option,
                   o.dtype_option, o.which_selection_options):
        f = option(f)
    return f


def _generation(max_new_tokens, sample, temperature, seed, repetition_penalty, batch_size):
    from ..steering.generation import GenerationSettings

    return GenerationSettings(max_new_tokens=max_new_tokens, sample=sample, temperature=temperature, seed=seed,
                              batch_size=batch_size, repetition_penalty=repetition_penalty)


def side_by_side(left: str, right: str, width: int) -> list[str]:
    """Two texts in two columns of ``width`` characters each, wrapped, their line breaks kept."""
    def lines(text: str) -> list[str]:
        out = []
        for paragraph in text.split("\n"):
            out.extend(textwrap.wrap(paragraph, width, replace_whitespace=False, drop_whitespace=True) or [""])
        return out

    a, b = lines(left), lines(right)
    rows = max(len(a), len(b))
    a += [""] * (rows - len(a))
    b += [""] * (rows - len(b))
    return [f"{x:<{width}} | {y}".rstrip() for x, y in zip(a, b)]


@click.command(name="generate")
@click.argument("model")
@click.argument("prompt", nargs=-1)
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False),
              help="A text file with one prompt per line (added after the PROMPT arguments).")
@click.option("--deactivate", default=None, help="Language whose neurons output 0 (code or name).")
@click.option("--activate", default=None,
              help="Language whose neurons output STRENGTH x their mean activation on it (code or name).")
@click.option("--strength", default=1.0, show_default=True, callback=_strength, type=float,
              help="Multiplier of the activated language's mean activation (additive: of the difference of means).")
@steering_options
@generation_options
@o.json_option
@model_options
@o.quiet_option
@click.pass_context
def generate_cmd(ctx, model, prompt, prompts_file, deactivate, activate, strength, mode, statistic, layers,
                 max_new_tokens, sample, temperature, seed, repetition_penalty, batch_size, as_json, registry, token,
                 trust_remote_code, name, device, dtype, selection, which_top_rate, quiet):
    """Generate from prompts with and without steering, and show both side by side.

    Steering switches the language's neurons of the registry during generation (the weights are not
    touched): --deactivate's neurons output 0, --activate's output --strength x their mean activation
    on that language (as counted by 'neuronreg compute'). Greedy by default (--sample for sampling).

    \b
    Example:
        neuronreg generate smollm2-135m "The capital of France is" --deactivate en --activate fr
        neuronreg generate ./my-model --prompts prompts.txt --activate sw --strength 2 --layers 20-29
    """
    from ..steering.generation import check_prompts, read_prompts, steered_generation
    from ..steering.plan import SteeringSettings

    setup_logging(quiet)
    prompts = list(prompt) + (read_prompts(prompts_file) if prompts_file else [])
    check_prompts(prompts)
    steering = SteeringSettings(deactivate=deactivate, activate=activate, strength=strength, mode=mode,
                                statistic=statistic, layers=layers, selection=o.selection(selection, which_top_rate))
    report = steered_generation(model, prompts, steering, manifest=o.manifest(ctx), registry=o.registry(registry),
                                settings=_generation(max_new_tokens, sample, temperature, seed, repetition_penalty,
                                                     batch_size),
                                name=name, load=o.load(dtype, device, token, trust_remote_code))
    if as_json:
        json_result(report.to_json())
        return
    width = max(30, (shutil.get_terminal_size((120, 24)).columns - 3) // 2)
    for i, (text, base, steered) in enumerate(zip(report.prompts, report.base, report.steered)):
        if i:
            result()
        result(f"prompt: {text}")
        result(f"{'base':<{width}} | steered")
        result(f"{'-' * width}-+-{'-' * width}")
        for line in side_by_side(base.strip(), steered.strip(), width):
            result(line)


@click.command(name="steer-eval")
@click.argument("model")
@click.option("--from", "source", required=True, help="The language the model would write in (its neurons off).")
@click.option("--to", "target", required=True, help="The language to steer to (its neurons activated).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False),
              help="A text file with one prompt per line [default: 20 short neutral English prompts].")
@o.out_option("Folder for steering.json, steering.csv, outputs.csv and steering.png.", required=True)
@click.option("--strengths", default="0,0.5,1,2,4", show_default=True, callback=_strengths,
              help="Comma-separated strengths to try (besides generating without steering).")
@steering_options
@generation_options
@o.json_option
@model_options
@o.quiet_option
@click.pass_context
def steer_eval_cmd(ctx, model, source, target, prompts_file, out, strengths, mode, statistic, layers, max_new_tokens,
                   sample, temperature, seed, repetition_penalty, batch_size, as_json, registry, token,
                   trust_remote_code, name, device, dtype, selection, which_top_rate, quiet):
    """Measure how well steering switches the output language, per strength.

    Generates from every prompt without steering and, for each strength, with --from's neurons off
    and --to's neurons activated; identifies the language of every output (py3langid) and reports the
    share of outputs in the target and in the source language. Prints the table; writes JSON, CSV,
    every output and a plot of share against strength to --out.

    \b
    Example:
        neuronreg steer-eval smollm2-135m --from en --to fr --out steer/
        neuronreg steer-eval mistral-nemo --from en --to sw --prompts prompts.txt --out steer/ --strengths 0,1,2,4
    """
    from ..files import output_folder
    from ..steering.evaluate import SteerEvalSettings, save_report, steer_eval
    from ..steering.generation import read_prompts
    from ._tables import steering_table

    setup_logging(quiet)
    output_folder(out)
    settings = SteerEvalSettings(strengths=strengths, prompts=read_prompts(prompts_file) if prompts_file else None,
                                 mode=mode, statistic=statistic, layers=layers,
                                 selection=o.selection(selection, which_top_rate),
                                 generation=_generation(max_new_tokens, sample, temperature, seed,
                                                        repetition_penalty, batch_size))
    report = steer_eval(model, source, target, manifest=o.manifest(ctx), registry=o.registry(registry),
                        settings=settings, name=name, load=o.load(dtype, device, token, trust_remote_code))
    paths = save_report(report, out)
    if as_json:
        json_result(report.to_json())  # what steering.json holds
    else:
        for line in steering_table(report):
            result(line)
    status(quiet, f"Wrote {', '.join(str(p) for p in paths.values())}")


COMMANDS = [generate_cmd, steer_eval_cmd]
