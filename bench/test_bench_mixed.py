"""A batch whose sequences use different adapters (the serving case): the mixed-adapter op against
looping over the adapters and merging each adapter's weights, forward only under inference_mode,
each timed in alternation with the same batch on a single adapter (the report's ratio)."""
import pytest
import torch

from _cases import Step, dtype_name, timed
from mixed_adapters import build_cases, build_layer, row_adapters

METHODS = ("mixed op", "loop over adapters", "merge per adapter", "frozen nn.Linear")


@pytest.mark.parametrize("method", METHODS)
def test_mixed(benchmark, size, device, dtype, method):
    sequences, length, adapters, dim = size.mixed
    layer = build_layer(dim, adapters, 8, device, dtype)
    x = torch.randn(sequences, length, dim, device=device, dtype=dtype)
    cases = build_cases(layer, row_adapters(sequences, adapters), x)

    def step(name):
        def run():
            with torch.inference_mode():
                cases[name]()
        return Step(run)

    benchmark.group = f"mixed {dtype_name(dtype)} {sequences}x{length} over {adapters} adapters {dim}x{dim}"
    benchmark.extra_info.update(bench="mixed", method=method, label=method, sequences=sequences,
                                seq_len=length, adapters=adapters, n_in=dim, n_out=dim, r=8,
                                dtype=dtype_name(dtype), device=device.type,
                                threads=torch.get_num_threads())
    timed(benchmark, step(method), size, device, floor=step("single adapter"))
