"""A checkpoint written by the official STARFlow code (apple/ml-starflow) converts and reproduces its outputs.

Data-driven: every size and switch comes from the fixture's JSON, so another fixture of the same format
(``starflow_official_*.safetensors`` + ``.json``) runs through the same code.
"""
import glob
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from starflow.convert.starflow import from_starflow

PATHS = sorted(glob.glob(os.path.join(FIXTURES, "starflow_official_*.safetensors")))
pytestmark = pytest.mark.skipif(not PATHS, reason="shared fixture not present")
TOL = dict(atol=1e-4, rtol=1e-5)


def jacobi_settings(meta: dict) -> dict:
    """The fixture's Jacobi settings: a 'jacobi' entry if present, else read from its notes."""
    if isinstance(meta.get("jacobi"), dict):
        j = meta["jacobi"]
        return dict(jacobi_window=int(j["block"]), jacobi_threshold=float(j["threshold"]),
                    jacobi_max_iters=int(j["iterations"]))
    m = re.search(r"jacobi: block (\d+), threshold ([0-9.eE+-]+), (\d+) iterations", meta.get("notes", ""))
    assert m, "fixture does not say how its Jacobi output was made"
    return dict(jacobi_window=int(m[1]), jacobi_threshold=float(m[2]), jacobi_max_iters=int(m[3]))


@pytest.fixture(scope="module", params=PATHS, ids=[os.path.basename(p) for p in PATHS])
def case(request):
    data = load_file(request.param)
    meta = json.load(open(request.param.replace(".safetensors", ".json")))
    state = {k: v for k, v in data.items() if k.startswith("model.")}
    model = from_starflow(state, meta["config"])
    return model, data, meta


def test_forward_matches_official(case):
    model, d, _ = case
    z, logdet = model(d["x"], text=d.get("y"))
    torch.testing.assert_close(z, d["z"], **TOL)
    torch.testing.assert_close(logdet, d["logdet_sum"], **TOL)
    # The official loss averages over dimensions where ours sums: 0.5 mean(z^2) - logdet / D per example.
    loss = (0.5 * z.pow(2).flatten(1).mean(1) - logdet / model.dims).mean()
    torch.testing.assert_close(loss.reshape(1), d["loss"].reshape(1), **TOL)
    # ... which is our nats/dim loss less the constant 0.5 log(2 pi) (no condition dropout here).
    ours = model.loss(d["x"], text=d.get("y"))
    torch.testing.assert_close(ours - 0.5 * torch.log(torch.tensor(2 * torch.pi)), loss, atol=1e-5, rtol=0)


def test_plain_reverse_matches_official(case):
    model, d, _ = case
    torch.testing.assert_close(model.inverse(d["z_sample"], text=d.get("y")), d["x_reverse"], **TOL)


def test_guided_reverse_matches_official(case):
    model, d, meta = case
    if "x_reverse_guided" not in d:
        pytest.skip("fixture has no guided output")
    kw = dict(text=d["y"], negative_text=d["y_null"], guidance=float(meta["guidance"]), guidance_rule="starflow")
    torch.testing.assert_close(model.inverse(d["z_sample"], **kw), d["x_reverse_guided"], **TOL)
    # Guidance in the deep block only is the same here: the shallow blocks read no condition.
    deep_only = model.inverse(d["z_sample"], guidance_blocks="deep", **kw)
    torch.testing.assert_close(deep_only, d["x_reverse_guided"], **TOL)


def test_guided_chunked_jacobi_matches_official(case):
    model, d, meta = case
    if "x_reverse_guided_jacobi" not in d:
        pytest.skip("fixture has no Jacobi output")
    out = model.inverse(d["z_sample"], text=d["y"], negative_text=d["y_null"], guidance=float(meta["guidance"]),
                        sampler="chunked-jacobi", **jacobi_settings(meta))
    torch.testing.assert_close(out, d["x_reverse_guided_jacobi"], **TOL)


def test_switches_come_from_the_fixture(case):
    model, _, meta = case
    c, cfg = model.config, meta["config"]
    assert c.width == cfg["channels"] and c.head_dim == cfg.get("head_dim", 64)
    assert c.num_blocks == cfg["num_blocks"] and (c.positions == "rope") == bool(cfg.get("rope"))
    assert c.start_token == bool(cfg.get("sos")) and (c.scale == "softplus") == bool(cfg.get("use_softplus"))
    assert c.soft_clip == float(cfg.get("soft_clip", 0)) and c.seq_order == cfg.get("seq_order", "R2L")
    assert not c.learned_null  # guidance needs the explicit negative, as in the official sampler
    if not c.cond_dim:
        return
    with pytest.raises(ValueError, match="no learned null"):
        model.inverse(torch.zeros(1, *model.image_shape), text=torch.zeros(1, 2, c.cond_dim), guidance=1.0)
