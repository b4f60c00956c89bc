"""
Static transform trees from tf2_msgs/TFMessage, duck-typed on message fields (pure numpy).

A TransformStamped with header.frame_id = parent and child_frame_id = child holds the pose
of the child in the parent: T_parent_from_child maps child-frame points into the parent frame.
"""

from typing import Dict, Iterable, List, Tuple

import numpy as np

from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.sensors.projection import transform_from_translation_quaternion

# child frame -> (parent frame, <np.float64: 4, 4> T_parent_from_child)
TransformTree = Dict[str, Tuple[str, np.ndarray]]


def _strip(frame_id: str) -> str:
    # tf2 ignores a leading slash (a ROS 1 habit some converters keep).
    return str(frame_id).lstrip('/')


def add_transforms(tree: TransformTree, tf_msg) -> TransformTree:
    """Add every TransformStamped of a TFMessage-like `tf_msg` to `tree` and return it."""
    for stamped in tf_msg.transforms:
        parent, child = _strip(stamped.header.frame_id), _strip(stamped.child_frame_id)
        if not parent or not child or parent == child:
            raise SensorDataError(
                f'transform {parent!r} -> {child!r} needs two different, non-empty frame ids')
        t, q = stamped.transform.translation, stamped.transform.rotation
        tree[child] = (parent, transform_from_translation_quaternion(
            (t.x, t.y, t.z), (q.x, q.y, q.z, q.w)))
    return tree


def build_tree(tf_msgs: Iterable) -> TransformTree:
    """Build a transform tree from TFMessage-like messages; later ones replace earlier ones."""
    tree: TransformTree = {}
    for tf_msg in tf_msgs:
        add_transforms(tree, tf_msg)
    return tree


def _ancestors(tree: TransformTree, frame: str) -> List[Tuple[str, np.ndarray]]:
    """[(ancestor, T_ancestor_from_frame)] from `frame` itself up to the root of its tree."""
    chain = [(frame, np.eye(4))]
    while chain[-1][0] in tree:
        if len(chain) > len(tree):
            raise SensorDataError(f'the transform tree has a cycle through {frame!r}')
        child, T_child_from_frame = chain[-1]
        parent, T_parent_from_child = tree[child]
        chain.append((parent, T_parent_from_child @ T_child_from_frame))
    return chain


def lookup_transform(tree: TransformTree, target_frame: str, source_frame: str) -> np.ndarray:
    """
    T_target_from_source <np.float64: 4, 4> through the frames' common ancestor.

    Raises SensorDataError naming the known frames when the two frames are not connected.
    """
    target_frame, source_frame = _strip(target_frame), _strip(source_frame)
    target_chain = dict(_ancestors(tree, target_frame))
    for ancestor, T_ancestor_from_source in _ancestors(tree, source_frame):
        if ancestor in target_chain:
            T_ancestor_from_target = target_chain[ancestor]
            return np.linalg.inv(T_ancestor_from_target) @ T_ancestor_from_source
    known = sorted(set(tree) | {parent for parent, _ in tree.values()})
    raise SensorDataError(
        f'no transform between {target_frame!r} and {source_frame!r} '
        f"(known frames: {', '.join(known) or 'none'})")
