"""Decision Transformer: segments, masking, causality, return conditioning, export parity."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from batchrl.protos.sequence import SEQUENCE_INPUTS, ContextSpec, RollingContext
from batchrl.training.algorithms import ALGORITHMS, Context
from batchrl.training.algorithms.dt import DecisionTransformer, DTConfig, masked_action_loss
from batchrl.training.data import OfflineDataset
from batchrl.training.sampling import SegmentSampler, returns_to_go
from batchrl.training.trainer import algorithm_config


def toy_dataset(lengths, rewards, actions, obs_dim=2) -> OfflineDataset:
    """Episodes of the given lengths; observation = (episode index, step index, ...)."""
    lengths = np.asarray(lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    obs = np.concatenate([np.stack([np.full(n, e), np.arange(n)], 1) for e, n in enumerate(lengths)]).astype(np.float32)
    obs = np.concatenate([obs, np.zeros((len(obs), obs_dim - 2), np.float32)], 1)
    n = len(obs)
    return OfflineDataset("toy", "", obs, np.asarray(actions, np.float32).reshape(n, -1),
                          np.asarray(rewards, np.float32), obs, np.zeros(n, np.float32), np.zeros(n, np.float32),
                          starts, lengths, np.array([-1.0], np.float32), np.array([1.0], np.float32), None, None)


def test_returns_to_go_are_per_episode_suffix_sums():
    rtg = returns_to_go(np.array([1, 2, 3, 10, 20], np.float32), np.array([0, 3]), np.array([3, 2]))
    np.testing.assert_array_equal(rtg, [6, 5, 3, 30, 20])


def test_segments_are_left_padded_consecutive_steps_of_one_episode():
    lengths = [3, 5]
    rewards = [1, 2, 3, 1, 1, 1, 1, 1]
    data = toy_dataset(lengths, rewards, np.linspace(-0.5, 0.5, 8))
    k, scale = 4, 2.0
    sampler = SegmentSampler(data, np.zeros(2, np.float32), np.ones(2, np.float32), torch.device("cpu"), 0,
                             context_length=k, max_timestep=4, return_scale=scale)
    batch = sampler.sample(4000)
    episodes = []
    for i in range(4000):
        mask = batch.mask[i].numpy()
        real = int(mask.sum())
        assert real >= 1 and mask.tolist() == [0] * (k - real) + [1] * real  # left padding only
        pad = slice(0, k - real)
        for tensor in (batch.states, batch.actions, batch.returns_to_go):
            assert not tensor[i, pad].any()  # padding holds zeros
        assert not batch.timesteps[i, pad].any()
        ep, steps = batch.states[i, k - real:, 0].numpy(), batch.states[i, k - real:, 1].numpy().astype(int)
        assert len(set(ep)) == 1  # one episode
        e = int(ep[0])
        episodes.append(e)
        assert (np.diff(steps) == 1).all()  # consecutive steps
        # a segment stops early only at the episode's end
        assert real == k or steps[-1] == lengths[e] - 1
        start = [0, 3][e]
        want_rtg = returns_to_go(np.asarray(rewards, np.float32), np.array([0, 3]), np.array(lengths))[start + steps]
        np.testing.assert_allclose(batch.returns_to_go[i, k - real:, 0].numpy(), want_rtg / scale)
        np.testing.assert_array_equal(batch.timesteps[i, k - real:].numpy(), np.minimum(steps, 3))  # clamped at 3
        np.testing.assert_allclose(batch.actions[i, k - real:, 0].numpy(), np.linspace(-0.5, 0.5, 8)[start + steps],
                                   rtol=1e-6)
    # episodes are drawn in proportion to their length: 5/8 from the second
    assert abs(np.mean(episodes) - 5 / 8) < 0.03


def test_masked_loss_counts_real_steps_only():
    predicted = torch.tensor([[[0.5], [0.0], [1.0]]])
    target = torch.tensor([[[9.0], [1.0], [0.0]]])
    mask = torch.tensor([[0, 1, 1]])
    # (0 - 1)^2 and (1 - 0)^2 over 2 real steps; the padded 9.0 must not count
    assert masked_action_loss(predicted, target, mask).item() == pytest.approx(1.0)


def small_model(k=5, max_timestep=50, seed=0, **kw) -> DecisionTransformer:
    torch.manual_seed(seed)
    return DecisionTransformer(3, 2, DTConfig(context_length=k, embed=16, layers=2, heads=2,
                                              max_timestep=max_timestep, **kw)).eval()


def random_context(b=4, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, k, 3, generator=g), torch.rand(b, k, 2, generator=g) * 2 - 1,
            torch.randn(b, k, 1, generator=g), torch.randint(0, 40, (b, k), generator=g),
            torch.ones(b, k, dtype=torch.long))


def test_action_at_t_never_sees_a_t_or_later_steps():
    model = small_model()
    s, a, r, t, m = random_context()
    base = model(s, a, r, t, m)
    for step in range(5):
        a2, s2, r2 = a.clone(), s.clone(), r.clone()
        a2[:, step:] += 0.7          # a_t and later actions
        s2[:, step + 1:] += 0.7      # later states and returns
        r2[:, step + 1:] += 0.7
        out = model(s2, a2, r2, t, m)
        torch.testing.assert_close(out[:, :step + 1], base[:, :step + 1], rtol=0, atol=0)
        if step + 1 < 5:  # ... while a_t does reach the prediction of a_{t+1}
            assert not torch.allclose(out[:, step + 1], base[:, step + 1])


def test_padding_is_masked_and_never_nan():
    model = small_model()
    s, a, r, t, m = random_context()
    m[:, :3] = 0  # 3 padded steps on the left
    base = model(s, a, r, t, m)
    assert torch.isfinite(base).all()  # fully masked query rows stay finite
    s2, a2, r2, t2 = s.clone(), a.clone(), r.clone(), t.clone()
    s2[:, :3], a2[:, :3], r2[:, :3], t2[:, :3] = 1e3, -1.0, -1e3, 7
    torch.testing.assert_close(model(s2, a2, r2, t2, m)[:, 3:], base[:, 3:], rtol=0, atol=1e-6)
    # the same real steps with no padding at all give the same predictions
    short = small_model(k=2)
    short.load_state_dict(model.state_dict())
    torch.testing.assert_close(short(s[:, 3:], a[:, 3:], r[:, 3:], t[:, 3:], m[:, 3:]), base[:, 3:], rtol=0,
                               atol=1e-5)


def test_later_timesteps_share_the_last_embedding():
    model = small_model(max_timestep=10)
    s, a, r, _, m = random_context()
    at_edge = model(s, a, r, torch.full((4, 5), 9), m)
    beyond = model(s, a, r, torch.full((4, 5), 500), m)
    torch.testing.assert_close(beyond, at_edge, rtol=0, atol=0)


def test_rolling_context_keeps_the_last_k_steps_and_lowers_the_return():
    ctx = RollingContext(ContextSpec(obs_dim=1, act_dim=1, context_length=2, max_timestep=2), target_return=10.0)
    with pytest.raises(ValueError, match="first step"):
        ctx.inputs(np.array([1.0]), 0.5)
    first = ctx.inputs(np.array([1.0]), None)
    assert first["attention_mask"].tolist() == [[0, 1]] and first["returns_to_go"][0, -1, 0] == 10.0
    assert ctx.t == 0  # inputs() does not change the context
    ctx.advance(np.array([1.0]), None, np.array([0.1]))
    with pytest.raises(ValueError, match="reward"):
        ctx.inputs(np.array([2.0]), None)
    ctx.advance(np.array([2.0]), 3.0, np.array([0.2]))
    third = ctx.inputs(np.array([3.0]), 1.5)
    assert third["states"][0, :, 0].tolist() == [2.0, 3.0]       # the oldest step dropped
    assert third["actions"][0, :, 0].tolist() == pytest.approx([0.2, 0.0])  # current action unknown: zero
    assert third["returns_to_go"][0, :, 0].tolist() == [7.0, 5.5]
    assert third["timesteps"].tolist() == [[1, 1]]               # step 2 clamped to max_timestep - 1
    assert third["attention_mask"].tolist() == [[1, 1]]
    assert set(third) == set(SEQUENCE_INPUTS)


def test_return_conditioning_picks_the_action_of_the_asked_return():
    """Episodes either always take +0.8 (reward 1 per step) or -0.8 (reward 0). Conditioned on a
    high return the policy must take +0.8, on a zero return -0.8: BC would average to 0."""
    rng = np.random.default_rng(0)
    n_ep, length = 64, 10
    good = rng.random(n_ep) < 0.5
    actions = np.repeat(np.where(good, 0.8, -0.8), length)
    rewards = np.repeat(good.astype(np.float32), length)
    data = toy_dataset([length] * n_ep, rewards, actions)
    data.observations[:, :2] = 0.0  # states say nothing: only the return can tell the modes apart
    config = algorithm_config("dt", {"context_length": 4, "embed": 32, "layers": 1, "dropout": 0.0,
                                     "warmup_steps": 10, "lr": 1e-3, "return_scale": 10.0})
    torch.manual_seed(0)
    algo = ALGORITHMS["dt"][1](config, Context(2, 1, 300, 10.0, torch.device("cpu")))
    sampler = SegmentSampler(data, np.zeros(2, np.float32), np.ones(2, np.float32), torch.device("cpu"), 0, 4, 100,
                             10.0)
    for _ in range(300):
        algo.update(sampler.sample(64))
    policy = algo.policy().eval()
    zeros = torch.zeros(1, 4, 2)
    mask = torch.tensor([[0, 0, 0, 1]])
    with torch.no_grad():
        high = policy(zeros, torch.zeros(1, 4, 1), torch.full((1, 4, 1), 1.0), torch.zeros(1, 4, dtype=torch.long),
                      mask)
        low = policy(zeros, torch.zeros(1, 4, 1), torch.zeros(1, 4, 1), torch.zeros(1, 4, dtype=torch.long), mask)
    assert high.item() > 0.6 and low.item() < -0.6, (high.item(), low.item())


def test_export_parity_on_every_context_length_and_raw_returns_in(dt_runs, tmp_path):
    from batchrl.training.export import export_run, probe_contexts
    from batchrl.training.data import load_dataset
    from batchrl.training.trainer import load_policy

    out = export_run(dt_runs[0], "dt", tmp_path)
    assert out["max_abs_diff"] <= 1e-5
    manifest = out["manifest"]
    assert manifest["contextLength"] == 8 and manifest["returnScale"] == 1000.0 and manifest["maxTimestep"] == 1000
    data = load_dataset("test/pendulum/play-v0")
    assert manifest["defaultTargetReturn"] == pytest.approx(float(data.episode_returns.max()))

    _, policy, _ = load_policy(dt_runs[0])
    contexts = probe_contexts(data, 8, 1000)
    assert set(contexts["attention_mask"].sum(1).tolist()) == set(range(1, 9))  # every length 1..K
    session = ort.InferenceSession(out["path"], providers=["CPUExecutionProvider"])
    got = session.run(None, contexts)[0]
    with torch.no_grad():
        want = policy(*(torch.from_numpy(contexts[k]) for k in SEQUENCE_INPUTS)).numpy()
        # the graph takes raw returns and raw states: the same as the inner model on scaled inputs
        inner = policy.policy(policy.normalize(torch.from_numpy(contexts["states"])),
                              policy.to_unit(torch.from_numpy(contexts["actions"])),
                              torch.from_numpy(contexts["returns_to_go"]) / 1000.0,
                              torch.from_numpy(contexts["timesteps"]), torch.from_numpy(contexts["attention_mask"]))
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got, policy.to_bounds(inner).numpy(), atol=1e-5)
    # the mask really masks in the graph: garbage in the padding changes nothing
    garbage = {k: v.copy() for k, v in contexts.items()}
    pad = contexts["attention_mask"] == 0
    garbage["states"][pad] = 123.0
    garbage["actions"][pad] = -2.0
    garbage["returns_to_go"][pad] = 5e4
    garbage["timesteps"][pad] = 999
    np.testing.assert_allclose(session.run(None, garbage)[0], got, atol=1e-5)
    # ... and the return-to-go is an input that matters
    lowered = dict(contexts, returns_to_go=contexts["returns_to_go"] - 500.0)
    assert np.abs(session.run(None, lowered)[0] - got).max() > 1e-4


def test_dropout_zeroes_a_fraction_p_and_scales_the_rest_and_is_the_identity_in_eval():
    from batchrl.training.algorithms.dt import Dropout

    drop = Dropout(0.25)
    x = torch.ones(200_000, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    assert abs(1.0 - kept.float().mean().item() - 0.25) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.75))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.75)  # the gradient passes through the same mask
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # drawn from torch's generator: a restored RNG state replays it
    assert drop.eval()(x) is x
