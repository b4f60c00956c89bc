"""
mmtta_adapt_lifecycle: the node as a managed (lifecycle) node, for stacks that sequence it.

The same parameters, topics and services as `mmtta_adapt` (ros/node.py), and the same
loop (`ros.shell.AdaptationShell`), taken in the steps of the ROS 2 lifecycle:

- configure: read and check the parameters, build the pipeline (loads the model), resume a
  saved state if asked; ~/reset and ~/save_state appear. A bad parameter or checkpoint
  fails the transition with one error line; the node stays unconfigured.
- activate: subscribe, create the publishers, start the worker.
- deactivate: stop the worker, unsubscribe, drop the publishers and half-paired messages,
  and return cached GPU memory to the driver; the adapted state is kept.
- cleanup: drop the pipeline and its adapted state (not saved: call ~/save_state first);
  the next configure starts from the source model.
- shutdown (from any state): stop, save the state if `state.save_on_shutdown`, drop it.

Parameters are declared at construction (so a params file and -p apply) and read at
configure; run-time changes of the dynamic ones apply while configured, as in the plain
node. Transitions come from a lifecycle manager, `ros2 lifecycle set`, the
lifecycle_msgs/ChangeState service, or `--activate` on the command line here.
"""

import argparse
import gc
import sys

from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.utilities import remove_ros_args
import torch

from mmtta_ros.core.params import NODE_NAME, node_params
from mmtta_ros.ros.params import check_changes, current_values, declare_table
from mmtta_ros.ros.shell import AdaptationShell, fatal_reason, spin_node

SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE


def release_cached_memory(device) -> None:
    """Collect garbage and hand the CUDA caching allocator's free blocks back to the driver."""
    gc.collect()
    if torch.device(device).type == 'cuda':
        torch.cuda.empty_cache()


class MMTTALifecycleNode(AdaptationShell, LifecycleNode):
    """The adaptation node, configured, activated, deactivated and cleaned up on request."""

    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        declare_table(self)
        self.add_on_set_parameters_callback(check_changes)
        self.add_post_set_parameters_callback(self._apply_parameters)
        self.params = None
        self.configure_error = ''  # why the last configure failed, one line
        self._active = False
        self.get_logger().info('unconfigured: waiting for configure')

    # --- transitions -----------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Check the parameters and load the model; FAILURE (one error line) if either fails."""
        try:
            self.params = node_params(current_values(self))
            self._load()
        except (ValueError, OSError, RuntimeError) as error:
            self.configure_error = fatal_reason(error)
            self.get_logger().error(f'configure failed: {self.configure_error}')
            self._unload()
            return FAILURE
        self.configure_error = ''
        self.get_logger().info(f'configured: {self._ready_message()}')
        return SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Subscribe and start the worker."""
        self._start_io()
        self._active = True
        self.get_logger().info('active: subscribed, worker running')
        return SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop the worker and unsubscribe; keep the adapted state, free cached GPU memory."""
        self._deactivate()
        self.get_logger().info(f'inactive: adapted state kept ({self._steps()} steps)')
        return SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Drop the pipeline: the next configure starts from the source model."""
        self._cleanup()
        self.get_logger().info('unconfigured: pipeline dropped')
        return SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop, save the state if state.save_on_shutdown, and drop everything."""
        self.shutdown()
        return SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop and drop everything after a transition raised: back to unconfigured."""
        self.get_logger().error(f'error in a transition from {state.label}: cleaning up')
        self._deactivate()
        self._cleanup()
        return SUCCESS

    # --- the steps, safe to repeat ---------------------------------------------------------
    def _deactivate(self) -> None:
        if not self._active:
            return
        self._stop_worker()
        self._drop_io()
        self._active = False
        release_cached_memory(self.pipeline.device)

    def _cleanup(self) -> None:
        if self.pipeline is None:
            return
        device = self.pipeline.device
        self._unload()
        release_cached_memory(device)

    def _steps(self) -> int:
        return int(getattr(self.pipeline.method, 'steps', 0))

    def shutdown(self) -> None:
        """Stop the worker, save the state if configured to, drop the pipeline."""
        self._deactivate()
        self._save_at_shutdown()
        self._cleanup()

    def destroy_node(self) -> None:
        """Destroy the node, and its lifecycle state machine now rather than at GC."""
        super().destroy_node()
        # rclpy's LifecycleNode leaves the state machine to the garbage collector, which
        # may finalise it after the context is shut down or in a forked child (a
        # multiprocessing pool): a segfault there (rclpy 9.1.2).
        self._state_machine.destroy_when_not_in_use()


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments (ROS arguments follow --ros-args)."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument('--activate', action='store_true',
                        help='configure and activate at start (where no lifecycle manager '
                             'or `ros2 lifecycle` is at hand); a failed configure exits 2')
    return parser


def main(args=None) -> int:
    """Run the lifecycle node until Ctrl-C; bad start-up (or --activate failing): exit 2."""
    argv = sys.argv if args is None else args
    options = build_parser().parse_args(remove_ros_args(argv)[1:])

    def make_node():
        node = MMTTALifecycleNode()
        if options.activate:
            if node.trigger_configure() != SUCCESS:
                reason = node.configure_error or 'configure failed'
                node.destroy_node()
                raise ValueError(reason)
            node.trigger_activate()
        return node
    return spin_node(make_node, args)


if __name__ == '__main__':
    raise SystemExit(main())
