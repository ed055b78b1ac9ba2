"""modeopt.cmd_optimizer.federated: FedAvg rounds through a CMDOptimizer server; clients in its mode space."""

import torch
import torch.nn.functional as F

import modeopt
from modeopt.cmd_optimizer import federated
from workloads import SmallCNN


def _local(model, space, x, y, steps=3, lr=1e-2):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i::steps]), y[i::steps]).backward()
        opt.step()
        if space is not None:
            space.sync()


def test_fedavg_rounds_warmup_then_mode_space(mnist):
    x, y = mnist[0][:120], mnist[1][:120]
    shards = [(x[k::3], y[k::3]) for k in range(3)]
    torch.manual_seed(0)
    glob, client = SmallCNN(width=4), SmallCNN(width=4)
    server = modeopt.CMDOptimizer(glob, torch.optim.SGD(glob.parameters(), lr=1.0), n_modes=4, warmup_steps=4,
                                  snapshot_every=1, n_samples=100, seed=0, exclude=["fc2.bias"],
                                  mode_scale="rms", progress=False)
    n = sum(p.numel() for p in glob.parameters())
    space = None
    for rnd in range(6):
        if rnd == 4:
            assert server.phase == "embedded"
            space = federated.replicate(server, client)
        states, client_weights = [], []
        for xs, ys in shards:
            if space is None:
                client.load_state_dict(glob.state_dict())
            else:
                federated.pull(space, server, client)
                # the replica starts exactly at the global model
                assert all(torch.equal(a, b) for a, b in zip(client.state_dict().values(), glob.state_dict().values()))
            _local(client, space, xs, ys)
            states.append(federated.payload(client))
            client_weights.append({k: v.clone() for k, v in client.state_dict().items()})
        expect = 4 * n if space is None else 4 * (4 + 10)  # N weights, then M scalars + fc2.bias
        assert federated.payload_bytes(states[0]) == expect
        federated.server_round(server, states, [len(s[1]) for s in shards])
        # averaging r (+ the excluded bias) is averaging the clients' weights: the modes are affine
        for k, w in glob.state_dict().items():
            mean = sum(c[k] for c in client_weights) / len(client_weights)
            torch.testing.assert_close(w, mean, rtol=0, atol=2e-6)
    assert server.phase == "embedded" and set(states[0]) == {"fc2.modeopt_r0", "fc2.bias"}
