"""Every option the EMAs share, defined once: its name, default and meaning.

The plain :class:`~ema_callbacks.EMA`, :meth:`EMAController.create
<ema_callbacks.controller.EMAController.create>` and the three trainer adapters each list these
options in their own signature, with these names and defaults: LightningCLI's ``--help`` and
``--print_config``, IDE completion and the ``trainer_state.json`` of the transformers adapter see
real parameters. Each passes them on with :func:`forwarded` (no option is forwarded by hand),
and validation happens once, in the controller. ``tests/test_options.py`` checks every
signature against :data:`OPTIONS`; :func:`document` writes each option's entry into every
entry point's docstring, and ``docs/options.md`` and ``configs/ema_options.yaml`` are generated
from it (``python -m ema_callbacks.options [--yaml]``; a test keeps them current).

>>> OPTIONS['half_life'].default is None, OPTIONS['buffers'].default
(True, 'average')
>>> sorted(forwarded({'self': None, 'half_life': '50ba', 'tokens_fn': None}))
['half_life']
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "GROUPS",
    "OPTIONS",
    "Option",
    "document",
    "forwarded",
    "markdown",
    "signature_differences",
    "yaml_reference",
]


@dataclass(frozen=True)
class Option:
    """One shared option: ``name``, ``default``, ``group`` (a key of :data:`GROUPS`) and
    ``doc`` (one paragraph of reStructuredText-flavoured Markdown)."""

    name: str
    default: Any
    group: str
    doc: str


GROUPS = {
    "averaging": "The average (exactly one kind; default `half_life='1000ba'`)",
    "schedule": "When it updates",
    "weights": "Which tensors, and how they are kept",
    "evaluation": "Which weights the model holds, and when",
    "snapshots": "Post-hoc EMA snapshots (EDM2)",
}

_OPTIONS = (
    Option(
        "half_life",
        None,
        "averaging",
        "A time string (`'50ba'`, `'1ep'`, `'2e6tok'`, `'0.1dur'`): the smoothing of an update is "
        "`2 ** (-elapsed / half_life)`, `elapsed` the progress since the previous update in the "
        "half-life's unit. `'0ba'` follows the model, `float('inf')` never moves. A list tracks "
        "one EMA per element (`['100ba', '1000ba']`).",
    ),
    Option(
        "smoothing",
        None,
        "averaging",
        "A constant decay per update (`0.999`, flax/optax/TF style), or a list of them.",
    ),
    Option(
        "sigma_rel",
        None,
        "averaging",
        "EDM2's power-function EMA with this relative width (`0.05`), or a list; the post-hoc "
        "snapshots are written for these.",
    ),
    Option(
        "ema_power",
        None,
        "averaging",
        "BEMA, the bias-corrected EMA (TRL's `BEMACallback` names; any of the five BEMA options "
        "selects it, the others take TRL's defaults): the EMA's weight of the new weights is "
        "`max((lag + multiplier*t) ** -ema_power, min_ema_multiplier)`, `t` the progress since "
        "the EMA started in the update interval's unit. Default 0.5.",
    ),
    Option(
        "bias_power",
        None,
        "averaging",
        "BEMA: the evaluated weights are `ema + (lag + multiplier*t) ** -bias_power * (theta - "
        "theta0)`, `theta0` the weights when the EMA started. Default 0.2; `0` pins the factor "
        "at 1, `float('inf')` turns the correction off.",
    ),
    Option("lag", None, "averaging", "BEMA: the virtual starting age `lag` (>= 1). Default 10."),
    Option("multiplier", None, "averaging", "BEMA: how fast the age grows with `t`. Default 1.0."),
    Option(
        "min_ema_multiplier",
        None,
        "averaging",
        "BEMA: the least weight of the new weights in the EMA. Default 0.0.",
    ),
    Option(
        "uniform",
        False,
        "averaging",
        "`True`: the uniform average of stochastic weight averaging (SWA, `AveragedModel`'s "
        "default): the mean of the weights seen at every update since `start`.",
    ),
    Option(
        "profiles",
        None,
        "averaging",
        "Several EMAs, each a mapping of averaging and schedule options that override the "
        "shared ones, with an optional `name` (its metric prefix): `[{'name': 'fast', "
        "'half_life': '100ba'}, {'name': 'bema', 'ema_power': 0.5}, {'uniform': True}]`. They "
        "update in the same multi-tensor calls; the first is the primary one.",
    ),
    Option(
        "update_interval",
        None,
        "schedule",
        "How often to update (a time string in any unit); default every batch, or every epoch "
        "for an `ep` half-life.",
    ),
    Option(
        "start",
        "0ba",
        "schedule",
        "Progress before which the EMA is not started (not averaged, not swapped in); it starts "
        "as a copy of the weights at the first update due at or after it.",
    ),
    Option(
        "warmup",
        "none",
        "schedule",
        "`'none'`, `'tf'` (caps beta at `(1+n)/(10+n)`), `'power'` (caps it at "
        "`1-(1+t/warmup_gamma)**-warmup_power`, timm/diffusers) or `'debias'` (optax's zero-init "
        "EMA with bias correction). Not with `sigma_rel`, BEMA or `uniform`.",
    ),
    Option("warmup_gamma", 1.0, "schedule", "The `'power'` warm-up's gamma."),
    Option("warmup_power", 2 / 3, "schedule", "The `'power'` warm-up's power."),
    Option(
        "rampup_ratio",
        None,
        "schedule",
        "EDM2's ramp: the half-life is at most this fraction of the progress since the start.",
    ),
    Option(
        "include",
        None,
        "weights",
        "Glob patterns on normalised weight names (`'encoder.*'`); only matching tensors are "
        "averaged. A pattern matching nothing is an error.",
    ),
    Option("exclude", None, "weights", "Glob patterns of tensors not to average."),
    Option(
        "trainable_only",
        True,
        "weights",
        "Skip parameters with `requires_grad=False` (frozen backbones, LoRA bases).",
    ),
    Option(
        "buffers",
        "average",
        "weights",
        "`'average'` (BatchNorm statistics averaged like weights), `'copy'` (the latest value) "
        "or `'ignore'`. Integer buffers are always copied.",
    ),
    Option(
        "dtype",
        None,
        "weights",
        "The average's dtype (`'float32'`...); default float32 for bf16/fp16 weights, the "
        "weight's own dtype otherwise.",
    ),
    Option(
        "device",
        None,
        "weights",
        "The average's device (`'cpu'` offloads it, pinned when the weights are on CUDA).",
    ),
    Option(
        "nonfinite",
        "ignore",
        "weights",
        "An update from weights holding NaN/Inf: `'ignore'` (no check), `'skip'` (counted, "
        "warned about) or `'error'`.",
    ),
    Option(
        "stream",
        False,
        "weights",
        "On CUDA, update on a side stream overlapping the next forward and backward (every "
        "`torch.optim` step waits for it on the GPU). Ignored on CPU.",
    ),
    Option(
        "fused_optimizer",
        False,
        "weights",
        "Fuse the update into the trainer's optimizer step: its `optimizer.step()` runs one "
        "`torch.compile`d function doing the step and the EMA's due update, which then reads "
        "the weights while the optimizer writes them (`docs/fused.md`). One optimizer, "
        "`nonfinite='ignore'`, `stream=False`; the first steps pay the compilation. Not in the "
        "plain loop: call `ema.fused_step(optimizer)` there.",
    ),
    Option(
        "final_weights",
        "ema",
        "evaluation",
        "What the model holds after training: `'ema'` (the primary average) or `'training'`.",
    ),
    Option(
        "eval_with_ema",
        True,
        "evaluation",
        "Swap the average in for evaluation (and predict), once it has started.",
    ),
    Option(
        "eval_all",
        None,
        "evaluation",
        "Evaluate the training weights and every profile in each evaluation, the profiles' "
        "metrics prefixed by their names; default True with several profiles, False with one "
        "(the EMA is evaluated under the trainer's metric names).",
    ),
    Option(
        "train_with_ema_weights",
        False,
        "evaluation",
        "After every update, copy the average into the training weights (Composer's "
        "experimental option; one profile only).",
    ),
    Option(
        "update_bn_batches",
        None,
        "evaluation",
        "Recompute the BatchNorm statistics of the average over this many training batches "
        "before each evaluation with it and at the end of training "
        "(`torch.optim.swa_utils.update_bn` for the average); the training weights' statistics "
        "are untouched. Needs `buffers='average'` or `'copy'`.",
    ),
    Option(
        "snapshot_every",
        None,
        "snapshots",
        "Write post-hoc EMA snapshots of every `sigma_rel` profile on this interval "
        "(`'1000ba'`), for `ema-callbacks posthoc` and `ema_callbacks.posthoc.reconstruct`.",
    ),
    Option(
        "snapshot_dtype",
        "float16",
        "snapshots",
        "Floating dtype of the snapshot files (`'float16'`, as EDM2).",
    ),
    Option(
        "snapshot_keep",
        None,
        "snapshots",
        "Keep only the latest this many snapshot times (default all, which post-hoc "
        "reconstruction wants).",
    ),
    Option(
        "snapshot_folder",
        None,
        "snapshots",
        "Where the snapshots go; the adapters default to an `ema_snapshots` folder beside the "
        "trainer's checkpoints.",
    ),
)

#: The shared options by name, in the order the entry points list them.
OPTIONS: dict[str, Option] = {o.name: o for o in _OPTIONS}
#: Options that the controller does not take (the entry points use them themselves).
_NOT_FORWARDED = frozenset({"snapshot_folder", "fused_optimizer"})


def forwarded(values: Mapping[str, Any]) -> dict[str, Any]:
    """The shared options among ``values`` (an entry point's ``locals()``), for
    :meth:`EMAController.create <ema_callbacks.controller.EMAController.create>`."""
    return {k: values[k] for k in OPTIONS if k in values and k not in _NOT_FORWARDED}


def signature_differences(
    func: Callable[..., Any],
    *,
    renamed: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    absent: tuple[str, ...] = (),
) -> list[str]:
    """How ``func``'s parameters differ from :data:`OPTIONS`: an option missing (not in
    ``absent``), or with another default (unless ``defaults`` names it). ``renamed`` maps an
    option to the parameter name ``func`` uses (Composer's ``ema_start``). Empty when they
    agree.

    >>> def f(half_life=None, start='1ba'): ...
    >>> signature_differences(f, absent=tuple(o for o in OPTIONS if o not in ('half_life', 'start')))
    ["start: default '1ba', not '0ba'"]
    """
    params = inspect.signature(func).parameters
    renamed = dict(renamed or {})
    defaults = dict(defaults or {})
    out = []
    for option in OPTIONS.values():
        name = renamed.get(option.name, option.name)
        if option.name in absent:
            if name in params:
                out.append(f"{name}: present, but listed as absent")
            continue
        if name not in params:
            out.append(f"{name}: missing")
            continue
        want = defaults.get(option.name, option.default)
        got = params[name].default
        if got is not want and got != want:
            out.append(f"{name}: default {got!r}, not {want!r}")
    return out


def document(
    obj: Any,
    *,
    notes: Mapping[str, str] | None = None,
    skip: tuple[str, ...] = (),
) -> Any:
    """Add an ``Args`` entry for every shared option ``obj`` (a class: its ``__init__``; or a
    function) takes to its docstring, at the end of its ``Args:`` section, so ``help()``,
    Sphinx and LightningCLI's ``--help`` show each option with the text written once here.
    ``notes`` adds a sentence to an option's entry (an adapter's default folder); ``skip``
    names options the docstring documents itself (Composer's own). Returns ``obj``.

    >>> def f(half_life=None, tokens_fn=None):
    ...     '''F.
    ...
    ...     Args:
    ...         tokens_fn: a function.
    ...     '''
    >>> document(f).__doc__.split('Args:')[1].splitlines()[2][:32]
    '    half_life: A time string (``'
    """
    func = obj.__init__ if inspect.isclass(obj) else obj
    params = inspect.signature(func).parameters
    notes = dict(notes or {})
    doc = inspect.cleandoc(obj.__doc__ or "")
    head, sep, tail = doc.partition("\nArgs:\n")
    if not sep:
        raise ValueError(f"{obj.__qualname__}'s docstring has no 'Args:' section")
    entries = []
    for option in OPTIONS.values():
        name = option.name
        if name not in params or name in skip:
            continue
        text = option.doc.replace("`", "``")
        if option.name in notes:
            text += " " + notes[option.name]
        entries.append(
            textwrap.fill(
                f"{name}: {text}",
                width=96,
                initial_indent="    ",
                subsequent_indent="        ",
                break_on_hyphens=False,
            )
        )
    own, blank, rest = tail.partition("\n\n")
    obj.__doc__ = head + sep + "\n".join([own, *entries]) + blank + rest
    return obj


def markdown() -> str:
    """``docs/options.md``: every shared option, by group, with its default."""
    lines = [
        "# Options",
        "",
        "Every option below is taken, with this name and default, by `EMA` (the plain loop; "
        "not the evaluation group, which it does itself with `swapped()`, nor `update_bn_batches`: "
        "call `ema.update_bn(loader)`), by `composer.EMA` (which says `ema_start` for `start`, "
        "with Composer's default `'0.0dur'`, and `half_life='1000ba'` by default, as Composer), by "
        "the Lightning `EMACallback` and by the transformers `EMATrainerCallback`. They are "
        "validated at construction; an error names the option. Generated from "
        "`ema_callbacks/options.py` (`python -m ema_callbacks.options > docs/options.md`).",
        "",
    ]
    for group, title in GROUPS.items():
        lines += [f"## {title}", "", "| option | default | meaning |", "|---|---|---|"]
        for o in OPTIONS.values():
            if o.group == group:
                lines.append(f"| `{o.name}` | `{o.default!r}` | {o.doc} |")
        lines.append("")
    return "\n".join(lines)


_YAML_HEAD = """\
# Every EMA option with its default and meaning (a reference, not a run config)
# Generated from ema_callbacks/options.py: python -m ema_callbacks.options --yaml
#   Lightning     ema_callbacks.lightning.EMACallback(**common, **lightning)
#   transformers  ema_callbacks.transformers.EMATrainerCallback(**common, **transformers)
#   Composer      ema_callbacks.composer.EMA(**common, **composer), with `start` called
#                 `ema_start` (composer.algorithms.EMA's name) and default '0.0dur', and
#                 half_life '1000ba' in its signature (null here: the default average)
# Where they go in a run config (`ema-callbacks run NAME`): lightning_digits.yaml
# (trainer.callbacks[].init_args), composer_digits.yaml (algorithms.ema),
# transformers_digits.yaml (callbacks[].init_args). The tests build every adapter from this
# file and check it lists every argument with its default.
#
# All values are plain strings, numbers, booleans or lists, validated when the object is built:
# a bad value raises ValueError/TypeError naming the option (reported with the file and key by
# `ema-callbacks run`).
#
# Time strings: a number and a unit, no spaces: ba (optimizer steps), ep (epochs, fractions
# allowed: 0.25ep), sp (samples), tok (tokens), dur (fraction of the planned run, 0..1);
# scientific notation allowed (2e6tok); 'infba' means infinity.
#
# The plain-loop ema_callbacks.EMA(model, ...) takes the same options but the evaluation ones
# (it evaluates with ema.swapped(), and recomputes BatchNorm statistics with ema.update_bn()),
# plus steps_per_epoch and max_duration.

common:
"""

_YAML_TAIL = """\

lightning:                   # EMACallback only
  checkpoint_weights: ema    # what checkpoint['state_dict'] holds: ema | training
  batch_size_fn: null        # 'pkg.module.fn' (batch -> samples) for 'sp' times; default
                             # Lightning's extract_batch_size
  tokens_fn: null            # 'pkg.module.fn' (batch -> tokens); required for 'tok' times
  log_metrics: true          # log ema/smoothing, ema/num_updates, ema/num_skipped

transformers:                # EMATrainerCallback only
  name: ema                  # file prefix in checkpoint-N/ (two callbacks need two names)

composer: {}                 # Composer's EMA has no options of its own beyond the common ones
                             # (it names `start` `ema_start`)
"""


def yaml_reference() -> str:
    """``ema_callbacks/configs/ema_options.yaml``: every option with its default, the shared
    ones from :data:`OPTIONS` (and each adapter's own, which the tests check against the
    adapters' signatures)."""
    import yaml

    lines = [_YAML_HEAD.rstrip("\n")]
    for group, title in GROUPS.items():
        lines.append(f"  # -- {title.replace('`', '')} ".ljust(96, "-"))
        for o in OPTIONS.values():
            if o.group != group:
                continue
            value = yaml.safe_dump({o.name: o.default}, default_flow_style=True, width=1000)
            for text in textwrap.wrap(o.doc.replace("`", ""), width=90, break_on_hyphens=False):
                lines.append(f"  # {text}")
            lines.append("  " + value.strip()[1:-1])
    return "\n".join(lines) + "\n" + _YAML_TAIL


if __name__ == "__main__":  # pragma: no cover - the docs generator
    import sys

    print(yaml_reference() if sys.argv[1:] == ["--yaml"] else markdown(), end="")
