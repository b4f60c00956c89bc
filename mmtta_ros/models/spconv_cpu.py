"""
Workarounds that make spconv's CPU path usable for training: backward, and correct results.

Two spconv 2.3 CPU problems, both checked on these machines:

1. Backward on a CPU-only torch raises "Torch not compiled with CUDA enabled" from
   `get_current_stream` (traveller59/spconv #366): `apply_cpu_stream_workaround`.
2. With more than one torch thread, the CPU convolutions (forward and backward) give wrong,
   run-to-run different results (also reported in traveller59/spconv #679): errors of
   the order of the outputs themselves. `apply_cpu_conv_workaround` computes CPU
   convolutions with torch ops from spconv's own index pairs instead.
"""

from cumm import tensorview as tv
import spconv.pytorch.functional as _spconv_functional
import spconv.pytorch.hash as _spconv_hash
import spconv.pytorch.ops as _spconv_ops
import torch


def _cpu_stream() -> int:
    """Stream handle for CPU kernels: spconv ignores it there, 0 means 'default'."""
    return 0


def apply_cpu_stream_workaround() -> bool:
    """
    Let spconv's backward run without CUDA; return True when the patch is in place.

    spconv's CPU backward asks `get_current_stream()` for a CUDA stream it never uses on
    CPU, and that call asserts on a CPU-only torch. `ops` and `hash` imported the function
    by name, so the names in those two modules are what must be replaced. Only done when
    CUDA is unavailable, so a GPU build keeps real streams; setting the same function again
    is harmless, so the call is idempotent.
    """
    if torch.cuda.is_available():
        return False
    for module in (_spconv_ops, _spconv_hash):
        module.get_current_stream = _cpu_stream
    return True


def torch_indice_conv(features: torch.Tensor, filters: torch.Tensor,
                      indice_pairs: torch.Tensor, indice_pair_num: torch.Tensor,
                      num_activate_out: int, inverse: bool, subm: bool) -> torch.Tensor:
    """
    Sparse convolution from spconv's index pairs, in torch ops (autograd gives backward).

    Same contract as spconv's native `ops.indice_conv`: gather the input rows of all
    pairs at once, one matmul per kernel offset on its slice, one scatter-add.
    features:        <float: N_in, C_in>
    filters:         <float: C_out, k, k, k, C_in> (spconv's KRSC layout)
    indice_pairs:    <int32: 2, K, P> input / output row per offset and pair, -1 padded
    indice_pair_num: <int32: K> pairs per offset
    returns:         <float: num_activate_out, C_out>
    """
    out_channels, in_channels = filters.shape[0], filters.shape[-1]
    weight = filters.reshape(out_channels, -1, in_channels)  # C_out, K, C_in
    center = weight.shape[1] // 2
    counts = indice_pair_num.long()
    if subm:
        # Submanifold pairs are symmetric: spconv stores the counts of the first half only
        # (offset k > centre has as many pairs as K - 1 - k), and the centre maps every
        # voxel to itself, so it is one plain matmul.
        counts = torch.cat([counts[:center], counts.new_zeros(1), counts[:center].flip(0)])
        out = features @ weight[:, center].T
    else:
        out = features.new_zeros((num_activate_out, out_channels))
    # An inverse conv runs the pairs of the conv it undoes backwards.
    rows_in = indice_pairs[int(inverse)].long()
    rows_out = indice_pairs[int(not inverse)].long()
    is_pair = torch.arange(rows_in.shape[1], device=counts.device) < counts[:, None]  # K, P
    # Row-major masking keeps the pairs grouped by offset, so split() finds each group.
    gathered = features.index_select(0, rows_in[is_pair])
    per_offset = torch.split(gathered, counts.tolist())
    contributions = torch.cat([rows @ weight[:, offset].T
                               for offset, rows in enumerate(per_offset)])
    return out.index_add(0, rows_out[is_pair], contributions)


def _cpu_safe(original, inverse: bool, subm: bool):
    """Wrap one of spconv's native conv functions: torch ops on CPU, spconv elsewhere."""
    def conv(features, filters, indice_pairs, indice_pair_num, num_activate_out, algo,
             timer=None, bias=None, *activation):
        # Fused activations (inference only, never used here) stay with spconv; the last
        # argument is the activation type in all three call sites of spconv's conv.py.
        fused = bool(activation) and activation[-1] != tv.gemm.Activation.None_
        if features.is_cuda or fused:
            return original(features, filters, indice_pairs, indice_pair_num,
                            num_activate_out, algo, timer, bias, *activation)
        out = torch_indice_conv(features, filters, indice_pairs, indice_pair_num,
                                num_activate_out, inverse, subm)
        return out if bias is None else out + bias
    conv.spconv_original = original
    return conv


def apply_cpu_conv_workaround() -> None:
    """
    Route spconv's CPU convolutions through `torch_indice_conv`; idempotent.

    spconv's conv modules call `functional.indice_conv` & co. by module attribute, so
    replacing those three names is enough; CUDA tensors still go to spconv's kernels.
    Index-pair generation stays spconv's (its results do not depend on the thread count).
    """
    for name, inverse, subm in (('indice_conv', False, False),
                                ('indice_inverse_conv', True, False),
                                ('indice_subm_conv', False, True)):
        current = getattr(_spconv_functional, name)
        original = getattr(current, 'spconv_original', current)
        setattr(_spconv_functional, name, _cpu_safe(original, inverse, subm))
