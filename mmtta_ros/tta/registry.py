"""Build an adaptation method by name; adding a method means one module and one line here."""

import inspect
from typing import Dict, Type

from torch import nn

from mmtta_ros.tta.base import AdaptationMethod
from mmtta_ros.tta.bn_stats import BatchNormStatistics
from mmtta_ros.tta.cbst import CBST
from mmtta_ros.tta.latte import Latte
from mmtta_ros.tta.ftd import FusionThenDistillation
from mmtta_ros.tta.mic import MaskedImageConsistency
from mmtta_ros.tta.mmtta import MMTTA
from mmtta_ros.tta.proda import ProDA
from mmtta_ros.tta.source import SourceOnly
from mmtta_ros.tta.tent import Tent
from mmtta_ros.tta.tent_ens import TentEnsemble
from mmtta_ros.tta.xmuda import XMUDA
from mmtta_ros.tta.xmuda_pl import XMUDAPseudoLabel

METHODS: Dict[str, Type[AdaptationMethod]] = {
    method.name: method
    for method in (SourceOnly, BatchNormStatistics, Tent, TentEnsemble, XMUDA,
                   XMUDAPseudoLabel, MMTTA, Latte, CBST, ProDA,
                   MaskedImageConsistency, FusionThenDistillation)
}


def build_method(name: str, model: nn.Module, **hyperparameters) -> AdaptationMethod:
    """Wrap `model` in the adaptation method `name` ('source', 'tent', ..., 'mmtta')."""
    if name not in METHODS:
        raise ValueError(f'unknown adaptation method {name!r}; choose one of {sorted(METHODS)}')
    method = METHODS[name]
    accepted = [parameter.name for parameter in
                inspect.signature(method.__init__).parameters.values()
                if parameter.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(hyperparameters) - set(accepted))
    if unknown:
        raise TypeError(f'{name} takes no hyperparameter {unknown}; it takes {accepted}')
    return method(model, **hyperparameters)
