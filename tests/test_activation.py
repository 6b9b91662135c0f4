"""cws.live.activation: the steering hook adds exactly c·v at one layer's output and goes away on exit;
the vector is the mean activation difference over the selected tokens."""

import pytest
import torch

from cws.live.activation import ActivationSteerer, decoder_layers, mean_activation, mean_difference, steered_activations
from cws.errors import CwsError
from tiny import tiny_model

LAYER = 1


@pytest.fixture(scope="module")
def model():
    return tiny_model(0, dtype=torch.float32, num_hidden_layers=3)


def batch(seed, n=3, length=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, :2] = 0  # left padding in one row
    tmask = torch.zeros(n, length, dtype=torch.bool)
    tmask[:, -3:] = True
    tmask[1, -1] = False
    return {"input_ids": ids, "attention_mask": mask, "token_mask": tmask}


def capture(model, ids, layer):
    """(input of every layer, output of `layer`) for one forward."""
    seen, hooks = {}, []
    layers = decoder_layers(model)
    for i, block in enumerate(layers):
        hooks.append(
            block.register_forward_pre_hook(
                lambda m, args, kwargs, i=i: seen.__setitem__(
                    f"in{i}", (args[0] if args else kwargs["hidden_states"]).clone()
                ),
                with_kwargs=True,
            )
        )
    hooks.append(
        layers[layer].register_forward_hook(
            lambda m, a, out: seen.__setitem__("out", (out[0] if isinstance(out, tuple) else out).clone())
        )
    )
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    for h in hooks:
        h.remove()
    return seen, logits


def test_hook_adds_exactly_c_times_v_at_the_layer_output(model):
    ids = batch(0)["input_ids"]
    v = torch.randn(model.config.hidden_size)
    plain, plain_logits = capture(model, ids, LAYER)
    for c in (2.5, -0.75):
        with steered_activations(model, v, LAYER, coeff=c):
            steered, logits = capture(model, ids, LAYER)  # capture hook registered after the steering hook
        assert torch.equal(steered["out"], plain["out"] + c * v)
        assert torch.equal(steered[f"in{LAYER + 1}"], plain["out"] + c * v)  # what the next layer receives
        for i in range(LAYER + 1):
            assert torch.equal(steered[f"in{i}"], plain[f"in{i}"])  # nothing changes before it
        assert not torch.equal(logits, plain_logits)


def test_hook_removed_on_exit_and_on_errors(model):
    ids = batch(1)["input_ids"]
    block = decoder_layers(model)[LAYER]
    before = len(block._forward_hooks)
    _, ref = capture(model, ids, LAYER)
    with pytest.raises(RuntimeError, match="boom"):
        with steered_activations(model, torch.ones(model.config.hidden_size), LAYER, coeff=3.0):
            assert len(block._forward_hooks) == before + 1
            raise RuntimeError("boom")
    assert len(block._forward_hooks) == before
    with ActivationSteerer(model, torch.ones(model.config.hidden_size), LAYER, coeff=3.0) as s:
        s.coeff = 0.0  # coefficient changed in place; 0 leaves the model untouched
        _, zero = capture(model, ids, LAYER)
    assert torch.equal(zero, ref)
    _, after = capture(model, ids, LAYER)
    assert torch.equal(after, ref) and len(block._forward_hooks) == before


def test_vector_is_the_mean_difference_over_selected_tokens(model):
    pos, neg = [batch(2), batch(3, n=2)], [batch(4, length=5)]

    def reference(batches):
        rows = []
        for b in batches:
            with torch.no_grad():
                hs = model(
                    input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True
                ).hidden_states
            rows.append(hs[LAYER + 1][b["token_mask"]].double())  # hidden_states[i + 1] = output of layer i
        return torch.cat(rows).mean(0)

    want = reference(pos) - reference(neg)
    hooks = dict(decoder_layers(model)[LAYER]._forward_hooks)
    got = mean_difference(model, LAYER, pos, neg)
    assert got.dtype == torch.float32 and got.shape == (model.config.hidden_size,)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mean_activation(model, LAYER, pos), reference(pos), rtol=1e-6, atol=1e-6)
    assert dict(decoder_layers(model)[LAYER]._forward_hooks) == hooks  # the capture hook is gone


def test_layers_found_through_peft_and_errors(model):
    from peft import LoraConfig, get_peft_model

    import copy

    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"]))
    assert len(decoder_layers(wrapped)) == model.config.num_hidden_layers
    with pytest.raises(CwsError, match="decoder layers"):
        ActivationSteerer(model, torch.zeros(model.config.hidden_size), 7)
    empty = batch(5)
    empty["token_mask"][:] = False
    with pytest.raises(CwsError, match="no positions"):
        mean_activation(model, LAYER, [empty])
    with pytest.raises(CwsError, match="vector of size"):
        with steered_activations(model, torch.zeros(3), LAYER):
            model(input_ids=batch(6)["input_ids"])
