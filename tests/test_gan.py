import torch

from node.plan.gan import Discriminator, Generator, minibatch_stddev
from node.plan.gan_training import train_gan

KW = dict(z_dim=8, w_dim=8, mapping_layers=2, image_size=16, channels=32)


def test_shapes():
    torch.manual_seed(0)
    G, D = Generator(**KW), Discriminator(image_size=16, channels=32)
    z = torch.randn(5, 8)
    w = G.mapping(z)
    assert w.shape == (5, 8) and G.w_avg.shape == (8,)
    img = G.synthesis(w)
    assert img.shape == (5, 1, 16, 16)
    assert torch.allclose(G(z), img)
    assert D(img).shape == (5,)
    assert minibatch_stddev(torch.randn(6, 3, 4, 4)).shape == (6, 4, 4, 4)


def test_modulation_is_per_sample():
    torch.manual_seed(0)
    G = Generator(**KW)
    w = torch.randn(2, 8)
    both = G.synthesis(w)
    assert torch.allclose(both[1:], G.synthesis(w[1:]), atol=1e-5)  # a sample does not depend on its batch mates


def _train(steps, state_path, key="k", on_checkpoint=None, sample_weights=None):
    torch.manual_seed(0)
    G, D = Generator(**KW), Discriminator(image_size=16, channels=32)
    real = torch.rand(12, 1, 16, 16) * 2 - 1
    return train_gan(
        real,
        G=G,
        D=D,
        steps=steps,
        batch_size=4,
        lr=2e-3,
        r1_gamma=0.1,
        ema_beta=0.9,
        checkpoint_every=2,
        state_path=state_path,
        state_key=key,
        seed=0,
        device=torch.device("cpu"),
        on_checkpoint=on_checkpoint,
        sample_weights=sample_weights,
    )


def test_training_steps_change_weights_and_track_w_avg(tmp_path):
    torch.manual_seed(0)
    before = Generator(**KW).state_dict()
    res = _train(2, None)
    assert any(not torch.equal(before[k], v) for k, v in res.G.state_dict().items())
    assert res.G.w_avg.abs().sum() > 0 and torch.equal(res.G_ema.w_avg, res.G.w_avg)
    assert all(map(lambda x: x == x, (res.loss_G, res.loss_D)))


def test_resume_gives_the_same_models(tmp_path):
    straight = _train(4, tmp_path / "a.safetensors")
    _train(2, tmp_path / "b.safetensors")  # "interrupted" after a checkpoint at step 2
    resumed = _train(4, tmp_path / "b.safetensors")
    for a, b in zip(straight.G_ema.state_dict().values(), resumed.G_ema.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    # another key (config or data changed) starts afresh instead of resuming
    fresh = _train(4, tmp_path / "b.safetensors", key="other")
    assert fresh.steps == 4


def test_quality_is_measured_at_every_checkpoint_and_kept_across_a_resume(tmp_path):
    mean_pixel = lambda G_ema: {"mean": float(G_ema.synthesis(G_ema.w_avg[None]).mean())}  # noqa: E731
    _train(2, tmp_path / "q.safetensors", on_checkpoint=mean_pixel)  # interrupted after step 2
    res = _train(6, tmp_path / "q.safetensors", on_checkpoint=mean_pixel)
    assert [q["step"] for q in res.quality] == [2, 4, 6]
    assert len({q["mean"] for q in res.quality}) == 3  # G_ema changed between checkpoints


def test_sample_weights_decide_what_d_sees():
    uniform = _train(2, None)
    # all the weight on one image: D sees another batch, so the models differ from uniform sampling
    only_first = torch.zeros(12)
    only_first[0] = 1.0
    skewed = _train(2, None, sample_weights=only_first)
    assert any(not torch.equal(a, b) for a, b in zip(uniform.D.state_dict().values(), skewed.D.state_dict().values()))
    again = _train(2, None, sample_weights=only_first)  # and the draw is seeded like the uniform one
    assert all(torch.equal(a, b) for a, b in zip(skewed.D.state_dict().values(), again.D.state_dict().values()))
