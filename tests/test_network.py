"""The network against the facts measured on the official MGCC code."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from networks import count_parameters
from networks.mgcc import MGCCNet
from networks.official import (convert_official_state_dict, infer_official_architecture, is_official_state_dict,
                               official_to_ours)
from networks.perturbations import AlwaysOnDropout, FeatureDropout, FeatureNoise
from reference_weights import FIXTURES, official_reference_state_dict, read_layout


def test_matches_official_eval_vectors_in_float64():
    official = official_reference_state_dict()
    assert is_official_state_dict(official)
    model = MGCCNet(**infer_official_architecture(official)).double().eval()
    model.load_state_dict(convert_official_state_dict(official), strict=True)
    vectors = np.load(FIXTURES / "mgcc_official_eval_w16.npz")
    with torch.no_grad():
        out = model(torch.from_numpy(vectors["input"])).numpy()
    assert out.shape == (2, 1, 64, 64)
    np.testing.assert_allclose(out, vectors["output"], rtol=0, atol=1e-8)


@pytest.mark.parametrize("tsv,width", [("mgcc_official_state_dict_w16.tsv", 16), ("mgcc_official_state_dict.tsv", 64)])
def test_official_names_map_one_to_one_with_shapes(tsv, width):
    with torch.device("meta"):
        ours = MGCCNet(in_channels=3, width=width).state_dict()
    layout = read_layout(tsv)
    mapped = {official_to_ours(name): shape for name, shape in layout}
    assert len(mapped) == len(layout) == len(ours)
    assert {k: tuple(v.shape) for k, v in ours.items()} == mapped


def test_parameter_count_at_published_width():
    with torch.device("meta"):
        model = MGCCNet(in_channels=3, width=64)
    assert count_parameters(model) == 122_182_980  # the official network's count


def test_unknown_official_name_is_rejected():
    with pytest.raises(KeyError, match="not a parameter name"):
        official_to_ours("Conv9.weight")


def test_aux_decoders_see_features_at_their_depth():
    """With the perturbations replaced by identity, aux k must equal its decoder on the features
    after k - 1 ConvMixer stages, and main on the features after all three."""
    torch.manual_seed(0)
    model = MGCCNet(in_channels=1, width=4).eval()
    model.perturbations = nn.ModuleList(nn.Identity() for _ in range(3))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        main, aux = model(x, with_aux=True)
        *skips, x5 = model.encoder(x)
        expected = []
        for k in range(3):
            expected.append(model.aux_decoders[k]([*skips, x5]))
            x5 = model.mixers[k](x5)
        torch.testing.assert_close(main, model.main_decoder([*skips, x5]), rtol=0, atol=0)
        torch.testing.assert_close(main, model(x), rtol=0, atol=0)
    for got, want in zip(aux, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_training_forward_shapes_and_randomness():
    torch.manual_seed(0)
    model = MGCCNet(in_channels=3, width=4)
    x = torch.randn(3, 3, 32, 32)
    main, aux = model(x, with_aux=True)
    assert main.shape == (3, 1, 32, 32) and len(aux) == 3 and all(a.shape == main.shape for a in aux)
    model.eval()
    with torch.no_grad():
        _, aux_a = model(x, with_aux=True)
        _, aux_b = model(x, with_aux=True)
        assert torch.equal(model(x), model(x))  # the inference path is deterministic
    for a, b in zip(aux_a, aux_b):  # the perturbed paths are not, even in eval mode (as official)
        assert not torch.equal(a, b)


def test_feature_dropout_drops_the_most_active_region():
    x = torch.zeros(2, 2, 1, 4)
    x[0, :, 0] = torch.tensor([1.0, 5.0, 9.0, 10.0])  # channel mean 1, 5, 9, 10; max 10
    x[1, :, 0] = torch.tensor([2.0, 1.0, 0.5, 0.0])   # max 2
    out = FeatureDropout(0.8, 0.8)(x)  # threshold = 0.8 * max: 8 and 1.6
    assert out[0, :, 0].tolist() == [[1.0, 5.0, 0.0, 0.0]] * 2
    assert out[1, :, 0].tolist() == [[0.0, 1.0, 0.5, 0.0]] * 2


def test_feature_dropout_draws_gamma_in_range():
    torch.manual_seed(0)
    x = torch.arange(100.0).view(1, 1, 10, 10)
    kept = [int((FeatureDropout()(x) > 0).sum()) + 1 for _ in range(200)]  # +1: the zero pixel
    # gamma in [0.7, 0.9): values < 0.9 * 99 = 89.1 kept at most, < 0.7 * 99 = 69.3 at least
    assert min(kept) >= 70 and max(kept) <= 90 and len(set(kept)) > 5


def test_always_on_dropout_is_on_in_eval_and_rescales():
    torch.manual_seed(0)
    dropout = AlwaysOnDropout(0.3).eval()
    out = dropout(torch.ones(200_000))
    values = out.unique()
    assert len(values) == 2 and values[0] == 0 and values[1].item() == pytest.approx(1 / 0.7)
    assert abs((out == 0).float().mean().item() - 0.3) < 0.01


def test_feature_noise_is_multiplicative_uniform_and_shared_by_the_batch():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8) + 1
    out = FeatureNoise(0.3)(x)
    ratio = out / x - 1
    assert ratio.abs().max() <= 0.3 + 1e-6 and ratio.abs().max() > 0.25
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio), atol=1e-6)
