"""
Norm-layer handling shared by every adaptation method: find, configure, collect.

Test-time adaptation here touches batch-norm layers only (all of
`nn.modules.batchnorm._BatchNorm`: BatchNorm2d of the 2D branch, BatchNorm1d on the
sparse-conv features of the 3D branch). Everything else stays frozen and in eval mode.
"""

from contextlib import contextmanager
from typing import Iterator, List, Tuple

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

AFFINE = ('weight', 'bias')
STATISTICS = ('running_mean', 'running_var')


def norm_layers(module: nn.Module) -> List[Tuple[str, _BatchNorm]]:
    """Return (qualified name, layer) of every batch-norm layer under `module`, in order."""
    return [(name, layer) for name, layer in module.named_modules()
            if isinstance(layer, _BatchNorm)]


def norm_parameters(module: nn.Module) -> List[nn.Parameter]:
    """Return the affine weight and bias of every batch-norm layer under `module`."""
    return [getattr(layer, name) for _, layer in norm_layers(module) for name in AFFINE
            if getattr(layer, name) is not None]


def freeze(model: nn.Module) -> nn.Module:
    """Put `model` in eval mode with no trainable parameter (source and slow models)."""
    model.eval()
    model.requires_grad_(False)
    return model


def set_norm_train_mode(model: nn.Module) -> None:
    """Eval mode everywhere (dropout off) except batch norm, which normalises with batch stats."""
    model.eval()
    for _, layer in norm_layers(model):
        layer.train()


def configure_norm_adaptation(model: nn.Module, record_batch_stats: bool = False) -> nn.Module:
    """
    Configure `model` in place for norm-only adaptation, as tent's configure_model does.

    Only batch-norm affine weights and biases require grad; batch norm normalises with the
    statistics of the current batch; every other layer is frozen and in eval mode.
    Unlike tent, the running-statistics buffers are kept (not set to None), so the state
    dict keeps the source's keys and `reset` / save / restore stay exact:
    - record_batch_stats=False: running statistics are neither used nor updated
      (track_running_stats off).
    - record_batch_stats=True: after each forward the buffers hold the statistics of the
      batch just seen (track_running_stats on, momentum 1), so a slow model can fold the
      fast model's batch statistics into its own (MM-TTA Eq. 6). BatchNorm stores the
      unbiased batch variance, as it does for its own running_var.
    """
    freeze(model)
    for _, layer in norm_layers(model):
        for name in AFFINE:
            parameter = getattr(layer, name)
            if parameter is not None:
                parameter.requires_grad_(True)
        if record_batch_stats:
            layer.track_running_stats = True
            layer.momentum = 1.0
        else:
            layer.track_running_stats = False
    set_norm_train_mode(model)
    return model


def branch_norm_parameters(model: nn.Module, method: str
                           ) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """
    Return the batch-norm affine parameters of model.net_2d and of model.net_3d.

    Fails early, saying what to fix, when a branch is missing, has nothing to adapt, or
    a batch-norm layer sits outside both branches (it would get no optimiser).
    """
    branches = {}
    for branch in ('net_2d', 'net_3d'):
        submodule = getattr(model, branch, None)
        if not isinstance(submodule, nn.Module):
            raise ValueError(
                f'{method} adapts the two branches with separate optimisers and needs '
                f'model.{branch} (an nn.Module); {type(model).__name__} has none')
        branches[branch] = submodule
    inside = {id(layer) for submodule in branches.values()
              for _, layer in norm_layers(submodule)}
    outside = [name for name, layer in norm_layers(model) if id(layer) not in inside]
    if outside:
        raise ValueError(
            f'{method}: batch-norm layers {outside} are in neither model.net_2d nor '
            f'model.net_3d; move them into a branch so they get an optimiser')
    params_2d = norm_parameters(branches['net_2d'])
    params_3d = norm_parameters(branches['net_3d'])
    for branch, params in (('net_2d', params_2d), ('net_3d', params_3d)):
        if not params:
            raise ValueError(
                f'{method} adapts batch-norm affine parameters, but model.{branch} has no '
                f'batch-norm layer with affine=True; use the source method for this model')
    return params_2d, params_3d


@contextmanager
def untracked_batch_stats(module: nn.Module) -> Iterator[nn.Module]:
    """
    Within the block, batch norm under `module` normalises with batch statistics and records none.

    For an extra forward of the fast model on an altered input (a masked image): its
    statistics must not replace the current batch's in the buffers a slow model averages
    (configure_norm_adaptation with record_batch_stats). Restores the settings on exit.
    """
    layers = norm_layers(module)
    saved = [layer.track_running_stats for _, layer in layers]
    try:
        for _, layer in layers:
            layer.track_running_stats = False
        yield module
    finally:
        for (_, layer), tracked in zip(layers, saved):
            layer.track_running_stats = tracked
