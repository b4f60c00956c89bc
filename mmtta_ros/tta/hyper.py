"""
What a method's constructor says about its hyperparameters: type, default, range, choices, doc.

Every method declares its hyperparameters once, as keyword-only constructor arguments:
the type (``Annotated[float, Range(0, 1)]`` for a bounded number, ``Literal['a', 'b']``
for a choice), the default, and a ``name: description`` line in the class docstring (or a
base class's). The node's ROS parameters, config/adapt.yaml and the offline tools' ``--set``
are generated from this, so adding a method never touches the ROS layer.
"""

from dataclasses import dataclass
import inspect
import re
import typing
from typing import Any, Dict, Optional, Tuple

# Constructor arguments that are not hyperparameters: objects the builder passes in.
NOT_HYPERPARAMETERS = ('collapse_guard',)


@dataclass(frozen=True)
class Range:
    """Closed range [low, high] of a numeric hyperparameter."""

    low: float
    high: float


@dataclass(frozen=True)
class Hyperparameter:
    """One keyword-only constructor argument of a method, as the ROS layer needs it."""

    name: str
    default: Any
    kind: type  # bool, int, float or str
    description: str
    range: Optional[Range] = None
    choices: Tuple[str, ...] = ()


_DOC_LINE = re.compile(r'^(\s*)([a-z_][a-z0-9_]*(?:, [a-z_][a-z0-9_]*)*):\s+(\S.*)$')


def docstring_descriptions(cls: type) -> Dict[str, str]:
    """Return {name: description} from ``name: text`` lines of the class docstrings (MRO)."""
    found: Dict[str, str] = {}
    for klass in cls.__mro__:
        lines = inspect.cleandoc(klass.__doc__ or '').splitlines()
        for i, line in enumerate(lines):
            match = _DOC_LINE.match(line)
            if not match:
                continue
            indent, names, text = len(match.group(1)), match.group(2), [match.group(3)]
            for more in lines[i + 1:]:
                # Continuation: indented deeper than the name, and not a name line itself.
                if not more.strip() or len(more) - len(more.lstrip()) <= indent \
                        or _DOC_LINE.match(more):
                    break
                text.append(more.strip())
            for name in names.split(', '):
                found.setdefault(name, ' '.join(text))
    return found


def _kind_and_limits(annotation: Any) -> Tuple[type, Optional[Range], Tuple[str, ...]]:
    limits = None
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *extras = typing.get_args(annotation)
        limits = next((extra for extra in extras if isinstance(extra, Range)), None)
    if typing.get_origin(annotation) is typing.Literal:
        return str, None, tuple(str(choice) for choice in typing.get_args(annotation))
    if annotation not in (bool, int, float, str):
        raise TypeError(f'hyperparameters are bool, int, float, str or Literal; got '
                        f'{annotation!r}')
    return annotation, limits, ()


def hyperparameters(cls: type) -> Tuple[Hyperparameter, ...]:
    """Return the hyperparameters of method class `cls`, in constructor order."""
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    docs = docstring_descriptions(cls)
    found = []
    for parameter in inspect.signature(cls.__init__).parameters.values():
        if parameter.kind is not inspect.Parameter.KEYWORD_ONLY \
                or parameter.name in NOT_HYPERPARAMETERS:
            continue
        if parameter.default is inspect.Parameter.empty:
            raise TypeError(f'{cls.__name__}: hyperparameter {parameter.name} needs a default')
        if parameter.name not in docs:
            raise TypeError(f'{cls.__name__}: document hyperparameter {parameter.name} with a '
                            f'"{parameter.name}: ..." line in the class docstring')
        kind, limits, choices = _kind_and_limits(hints[parameter.name])
        found.append(Hyperparameter(parameter.name, parameter.default, kind,
                                    docs[parameter.name], limits, choices))
    return tuple(found)
