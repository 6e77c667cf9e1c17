"""The one place that hooks into model modules (as rome's nethook does, in miniature).

Hooks are used only on the HF path for computing keys, statistics and values; the served
routed layer never relies on hooks (vLLM's compiled graphs skip hooks added later).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass early, once what was needed is captured."""


@contextlib.contextmanager
def capture_input(module: nn.Module, stop: bool = False):
    """Capture the first positional input of `module` on the next forward(s).

    Yields a list that receives one tensor per call. With `stop=True`, the forward pass
    ends at this module (raise caught by `run_until`).
    """
    seen: list[torch.Tensor] = []

    def hook(_mod, args):
        seen.append(args[0])
        if stop:
            raise StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@contextlib.contextmanager
def edit_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Replace `module`'s output (a tensor, or the first item of a tuple) by `fn(output)`."""

    def hook(_mod, _args, out):
        if isinstance(out, tuple):
            return (fn(out[0]),) + out[1:]
        return fn(out)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_calls(modules: list[nn.Module]):
    """Record the (args, kwargs) each module is called with and its output.

    Yields a list of dicts, one per module, filled in as the forward runs. Used to replay
    the upper layers of a model without re-running the lower ones.
    """
    records: list[dict] = [{} for _ in modules]
    handles = []
    for rec, mod in zip(records, modules):
        def pre(_mod, args, kwargs, rec=rec):
            rec["args"], rec["kwargs"] = args, kwargs

        def post(_mod, _args, _kwargs, out, rec=rec):
            rec["output"] = out

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, with_kwargs=True))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def run_until(model: nn.Module, **inputs) -> None:
    """Run `model(**inputs)` and swallow a `StopForward` raised by a hook."""
    try:
        model(**inputs, use_cache=False)
    except StopForward:
        pass
