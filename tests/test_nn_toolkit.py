"""The shared transformer toolkit (starflow/nn/): one attention module and one KV cache for every family."""
import torch

from starflow.flow.config import FlowConfig
from starflow.flow.model import STARFlow
from starflow.nn.attention import KVCache, SelfAttention
from starflow.nn.norms import RMSNorm
from starflow.peers.flowar import FlowAR, FlowARConfig
from starflow.peers.flowar_layers import block_causal_mask
from starflow.peers.rectified_flow import RectifiedFlow, RectifiedFlowConfig


def test_chunked_attention_through_the_cache_equals_one_masked_pass():
    torch.manual_seed(0)
    att = SelfAttention(32, 4, qk_norm=RMSNorm).double()
    sizes = [3, 1, 4, 16]
    x = torch.randn(2, sum(sizes), 32, dtype=torch.float64)
    mask = block_causal_mask(sizes)[None, None]
    full = att(x, mask)
    cache, start, parts = KVCache(sum(sizes)), 0, []
    for n in sizes:
        parts.append(att(x[:, start:start + n], mask[..., start:start + n, :start + n], cache, start))
        start += n
        assert cache.length == start
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-12)


def test_every_family_attends_with_the_shared_module():
    flow = STARFlow(FlowConfig(in_channels=1, image_size=8, patch_size=2, width=32, head_dim=16, num_blocks=2,
                               layers_per_block=1))
    rf = RectifiedFlow(RectifiedFlowConfig(in_channels=1, image_size=8, patch_size=2, width=32, depth=2, heads=2,
                                           dual_attention_layers=(0,)))
    far = FlowAR(FlowARConfig(in_channels=1, image_size=8, scales=(2, 4, 8), width=32, depth=1, heads=2,
                              head_width=32, head_depth=1, head_heads=2))
    for model in (flow, rf, far):
        assert any(isinstance(m, SelfAttention) for m in model.modules()), type(model).__name__
