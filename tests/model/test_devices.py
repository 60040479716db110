"""The model's paths keep every tensor on the model's device: what CUDA demands, checked on the CPU.

The model lives on the `meta` device (shapes, no data) under a dispatch mode that rejects any op
mixing a meta tensor with a CPU tensor of one dimension or more, as CUDA rejects a CUDA tensor
with a CPU one (0-dim CPU scalars it accepts, so these do too). A CPU tensor created by our code
where the model's device was meant fails here as it would on a GPU.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from librarian.model.gpt import GPT
from tests.helpers import tiny_config


class RejectMixedDevices(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
        kinds = {t.device.type for t in tensors if t.dim() >= 1}
        if {"meta", "cpu"} <= kinds:
            raise AssertionError(f"{func} mixes devices: {[(t.device.type, tuple(t.shape)) for t in tensors]}")
        return func(*args, **(kwargs or {}))


@pytest.fixture(params=["learned", "rope"])
def meta_model(request):
    with torch.device("meta"):
        model = GPT(tiny_config(position=request.param, context_length=32, dropout=0.0))
    return model


def test_the_check_catches_a_mixed_op(meta_model):
    with RejectMixedDevices(), pytest.raises(AssertionError, match="mixes devices"):
        meta_model.tok_emb(torch.tensor([[1, 2]]))  # CPU ids into a meta embedding


def test_a_training_step_stays_on_the_models_device(meta_model):
    x = torch.zeros(2, 16, dtype=torch.long, device="meta")
    with RejectMixedDevices():
        _, loss = meta_model(x, x)
        loss.backward()
    assert loss.device.type == "meta" and meta_model.lm_head.weight.grad.device.type == "meta"


@torch.inference_mode()
def test_kv_cache_decoding_and_a_batched_slot_cache_step_stay_on_the_models_device(meta_model):
    slots = meta_model.new_slot_cache(4)
    with RejectMixedDevices():
        for row, length in enumerate([3, 7, 1]):
            cache = meta_model.new_cache()
            meta_model.hidden(torch.zeros(1, length, dtype=torch.long, device="meta"), cache)
            meta_model.hidden(torch.zeros(1, 1, dtype=torch.long, device="meta"), cache)  # one decoding step
            slots.rows = row + 1
            slots.load(row, cache)
        out = meta_model.hidden(torch.zeros(3, 1, dtype=torch.long, device="meta"), slots)
        slots.move(2, 0)
        slots.rows = 2
        meta_model.hidden(torch.zeros(2, 1, dtype=torch.long, device="meta"), slots)
    assert out.shape == (3, 1, meta_model.config.d_model) and out.device.type == "meta"
    assert slots.lengths.device.type == "meta" and slots.host_lengths[:2] == [4, 10]  # 3+1+1 moved over row 0, then +1; 7+1+1+1


def test_the_validation_loss_scores_on_the_models_device_by_default(meta_model):
    """window_nats (training's val loss, the fine-tuned model's reply loss) follows the model unless told."""
    import numpy as np

    from librarian.data.windows import Windows, window_nats

    windows = Windows(np.arange(200, dtype=np.uint16) % 64, 16, 16, None, None)
    with torch.no_grad(), RejectMixedDevices():
        total = window_nats(meta_model.eval(), windows, batch_size=4)
    assert total.device.type == "meta" and total.shape == (2,)
