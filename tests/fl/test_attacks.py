import torch

from mlsyskit.fl.attacks import choose_malicious, finite_rows, poison

G = torch.tensor([1.0, 1.0, 1.0, 1.0])
M = torch.tensor([2.0, 0.0, 1.5, 1.0])


def test_sign_flip_and_scale_formulas():
    gen = torch.Generator().manual_seed(0)
    assert torch.allclose(poison("sign-flip", M, G, 3.0, gen), G - 3.0 * (M - G))
    assert torch.allclose(poison("scale", M, G, 3.0, gen), G + 3.0 * (M - G))
    assert torch.equal(poison("label-flip", M, G, 3.0, gen), M)


def test_noise_has_requested_scale_and_is_seeded():
    big_m = torch.randn(10000, generator=torch.Generator().manual_seed(1))
    g = torch.zeros(10000)
    a = poison("noise", big_m, g, 2.0, torch.Generator().manual_seed(5))
    b = poison("noise", big_m, g, 2.0, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert abs(float(a.std()) / (2.0 * float(big_m.std())) - 1) < 0.05


def test_nan_attack_is_caught_by_finite_rows():
    bad = poison("nan", M, G, 1.0, torch.Generator())
    rows = torch.stack([M, bad, torch.tensor([0.0, float("inf"), 0.0, 0.0])])
    assert finite_rows(rows).tolist() == [True, False, False]


def test_malicious_set_is_fixed_by_seed():
    a = choose_malicious(100, 7, seed=3)
    assert len(set(a.tolist())) == 7 and (a == choose_malicious(100, 7, seed=3)).all()
    assert len(choose_malicious(100, 0, seed=3)) == 0
