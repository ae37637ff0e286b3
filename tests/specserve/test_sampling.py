import pytest
import torch

from specserve.contracts import SamplingParams
from specserve.errors import InvalidArgument
from specserve.sampling import processed_probs


@pytest.mark.parametrize("params, field", [
    (SamplingParams(max_new_tokens=0), "sampling.max_new_tokens"),
    (SamplingParams(temperature=-0.1), "sampling.temperature"),
    (SamplingParams(temperature=float("nan")), "sampling.temperature"),
    (SamplingParams(top_k=-1), "sampling.top_k"),
    (SamplingParams(top_p=0.0), "sampling.top_p"),
    (SamplingParams(top_p=1.5), "sampling.top_p"),
    (SamplingParams(stop=("",)), "sampling.stop"),
])
def test_bad_parameters_name_their_field(params, field):
    with pytest.raises(InvalidArgument) as err:
        params.validate()
    assert err.value.field == field


def test_top_k_and_top_p_truncate_and_renormalise():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    k2 = processed_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(k2, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = processed_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    greedy = processed_probs(logits, SamplingParams())
    assert greedy.tolist() == [[1.0, 0.0, 0.0, 0.0]]
