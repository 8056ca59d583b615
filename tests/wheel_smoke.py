"""Smoke test of an installed wheel (`make wheel-check` runs it from outside the source tree, in
a fresh venv): the extension loads, a layer trains, freezes, saves and loads."""

import io

import torch
import torch.nn.functional as F

import spatium_torch as st

assert "site-packages" in st.__file__, f"not the installed package: {st.__file__}"
torch.manual_seed(0)
model = torch.nn.Sequential(st.SpatialLayer(16, 8, bits=4), torch.nn.ReLU(), st.SpatialLayer(8, 2))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
x, y = torch.randn(64, 16), torch.randint(0, 2, (64,))
losses = []
for _ in range(30):
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
assert losses[-1] < losses[0], losses
st.freeze(model).eval()
buffer = io.BytesIO()
torch.save(model.state_dict(), buffer)
buffer.seek(0)
again = st.freeze(
    torch.nn.Sequential(st.SpatialLayer(16, 8, bits=4), torch.nn.ReLU(), st.SpatialLayer(8, 2))
).eval()
st.load_state_dict(again, torch.load(buffer, weights_only=True))
with torch.no_grad():
    assert torch.equal(again(x), model(x))
print(f"wheel smoke test passed: spatium-torch {st.__version__}, torch {torch.__version__}")
