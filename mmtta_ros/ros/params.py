"""
Declare the parameter table (`core.params.PARAMETERS`) on a node and read it back, typed.

Every entry gets a ParameterDescriptor (description, range, choices, read-only); float
parameters accept integer literals (`-p sync.slop:=1`), as users type them.
"""

from typing import Any, Dict, List

from rcl_interfaces.msg import (
    FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult)
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.node import Node
from rclpy.parameter import Parameter

from mmtta_ros.core.params import (
    check_value, coerce_value, node_params, NodeParams, PARAMETERS, ParamSpec, SPECS)


def descriptor(spec: ParamSpec) -> ParameterDescriptor:
    """Return the ROS descriptor of one table entry."""
    result = ParameterDescriptor(description=spec.description, read_only=spec.read_only)
    if spec.choices:
        result.additional_constraints = 'one of: ' + ', '.join(spec.choices)
    is_number = isinstance(spec.default, (int, float)) and not isinstance(spec.default, bool)
    if spec.low is not None and is_number:
        if isinstance(spec.default, int):
            result.integer_range = [IntegerRange(
                from_value=int(spec.low), to_value=int(spec.high), step=0)]
        else:
            result.floating_point_range = [FloatingPointRange(
                from_value=float(spec.low), to_value=float(spec.high), step=0.0)]
    # Integer literals for floats, and 0/1 inside the extrinsics list, are welcome: the
    # value is coerced and checked by core.params instead of refused by type.
    if isinstance(spec.default, float) or spec.name == 'calibration.T_cam_from_lidar':
        result.dynamic_typing = True
    return result


def declare_parameters(node: Node) -> NodeParams:
    """Declare every parameter on `node`; return them typed (ValueError lists problems)."""
    declare_table(node)
    return node_params(current_values(node))


def declare_table(node: Node) -> None:
    """Declare every parameter on `node` (ValueError: a start value rclpy refuses)."""
    for spec in PARAMETERS:
        # rclpy checks a start value (-p, params file) against the descriptor itself and
        # raises its own exceptions: made a ValueError, so main() ends in one FATAL line.
        try:
            node.declare_parameter(spec.name, spec.default, descriptor(spec))
        except InvalidParameterTypeException:
            raise ValueError(f'invalid parameters: {spec.name} must be '
                             f'{_kind(spec.default)}') from None
        except InvalidParameterValueException:
            raise ValueError(f'invalid parameters: {spec.name} must be in '
                             f'[{spec.low}, {spec.high}]') from None


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return 'true or false'
    if isinstance(default, int):
        return 'an integer'
    if isinstance(default, float):
        return 'a number'
    if isinstance(default, list):
        return 'a list'
    return 'a string'


def current_values(node: Node) -> Dict[str, Any]:
    """Return {name: value} of every table parameter as the node holds it now."""
    return {spec.name: coerce_value(spec.name, node.get_parameter(spec.name).value)
            for spec in PARAMETERS}


def check_changes(parameters: List[Parameter]) -> SetParametersResult:
    """Accept a set of parameter changes only if every value of ours is valid."""
    for parameter in parameters:
        if parameter.name not in SPECS:
            continue  # rclpy's own (use_sim_time, qos overrides) are not ours to check
        reason = check_value(parameter.name, coerce_value(parameter.name, parameter.value))
        if reason:
            return SetParametersResult(successful=False, reason=reason)
    return SetParametersResult(successful=True)
