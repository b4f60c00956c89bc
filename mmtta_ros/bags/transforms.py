"""
Transforms from tf2_msgs/TFMessage, duck-typed on message fields (pure numpy).

A TransformStamped with header.frame_id = parent and child_frame_id = child holds the pose
of the child in the parent: T_parent_from_child maps child-frame points into the parent frame.
Static trees (sensor mounts) and a moving pose over time (odom -> base_link), interpolated
at any stamp between two of its samples.
"""

from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from mmtta_ros.core.errors import SensorDataError
from mmtta_ros.sensors.projection import (
    quaternion_to_matrix, transform_from_translation_quaternion)
from mmtta_ros.sensors.stamps import stamp_to_ns

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


def slerp(q0: np.ndarray, q1: np.ndarray, fraction: float) -> np.ndarray:
    """Return the quaternion <np.float64: 4> (x, y, z, w) `fraction` of the way from q0 to q1."""
    q0 = np.asarray(q0, dtype=np.float64) / np.linalg.norm(q0)
    q1 = np.asarray(q1, dtype=np.float64) / np.linalg.norm(q1)
    dot = float(np.dot(q0, q1))
    if dot < 0.0:  # q and -q are one rotation: take the short way round
        q1, dot = -q1, -dot
    if dot > 0.9995:
        # Nearly parallel: sin(angle) is tiny, and a normalised lerp is exact to 1e-7.
        q = q0 + fraction * (q1 - q0)
        return q / np.linalg.norm(q)
    angle = np.arccos(dot)
    return (np.sin((1.0 - fraction) * angle) * q0 + np.sin(fraction * angle) * q1) / np.sin(angle)


class PoseTrack:
    """
    A moving transform over time (e.g. odom -> base_link on /tf), interpolated at any stamp.

    Samples may come in any order; a stamp given twice keeps the last. `at` interpolates
    linearly in translation and by slerp in rotation between the two samples around the
    stamp, and, as tf2, never extrapolates. Memory: 8 numbers a sample (an hour of 50 Hz
    odometry is 11 MB).
    """

    def __init__(self):
        self._samples: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
        self._sorted: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None

    def __len__(self) -> int:
        """Return the number of samples."""
        return len(self._samples)

    def add(self, stamp_ns: int, translation, q_xyzw) -> None:
        """Add the pose at `stamp_ns`: translation (x, y, z) and quaternion (x, y, z, w)."""
        quaternion_to_matrix(q_xyzw)  # refuses a quaternion that is no rotation
        self._samples[int(stamp_ns)] = (np.asarray(translation, dtype=np.float64),
                                        np.asarray(q_xyzw, dtype=np.float64))
        self._sorted = None

    def at(self, stamp_ns: int) -> Optional[np.ndarray]:
        """Return T_parent_from_child <np.float64: 4, 4> at `stamp_ns`, None outside the track."""
        if not self._samples:
            return None
        if self._sorted is None:
            stamps = np.array(sorted(self._samples), dtype=np.int64)
            self._sorted = (stamps,
                            np.stack([self._samples[s][0] for s in stamps.tolist()]),
                            np.stack([self._samples[s][1] for s in stamps.tolist()]))
        stamps, translations, quaternions = self._sorted
        stamp_ns = int(stamp_ns)
        if stamp_ns < stamps[0] or stamp_ns > stamps[-1]:
            return None
        after = int(np.searchsorted(stamps, stamp_ns, side='left'))
        if stamps[after] == stamp_ns:
            return transform_from_translation_quaternion(translations[after], quaternions[after])
        before = after - 1
        fraction = (stamp_ns - stamps[before]) / float(stamps[after] - stamps[before])
        translation = translations[before] + fraction * (translations[after]
                                                         - translations[before])
        return transform_from_translation_quaternion(
            translation, slerp(quaternions[before], quaternions[after], fraction))


def add_poses(track: PoseTrack, tf_msg, parent_frame: str, child_frame: str) -> PoseTrack:
    """Add the transforms parent_frame -> child_frame of a TFMessage-like `tf_msg` to `track`."""
    parent_frame, child_frame = _strip(parent_frame), _strip(child_frame)
    for stamped in tf_msg.transforms:
        if (_strip(stamped.header.frame_id), _strip(stamped.child_frame_id)) != (
                parent_frame, child_frame):
            continue
        t, q = stamped.transform.translation, stamped.transform.rotation
        track.add(stamp_to_ns(stamped.header.stamp), (t.x, t.y, t.z), (q.x, q.y, q.z, q.w))
    return track
