import torch

from diffusionblocks.precond import get_scalings
from diffusionblocks.tasks import apply_overrides, get_task


def test_fresh_block_denoiser_returns_c_skip_z(tiny_cfg):
    block = get_task(tiny_cfg.task).build_block(tiny_cfg, 1, torch.Generator().manual_seed(0))
    z = torch.randn(5, 1, 8, 8)
    sigma = torch.tensor([0.01, 0.1, 0.3, 1.0, 10.0])
    c_skip = get_scalings(sigma, 0.5)[0]
    out = block(z, sigma, class_labels=torch.tensor([0, 1, 2, 3, 10]))
    assert torch.allclose(out, c_skip[:, None, None, None] * z, atol=1e-6)


def test_blocks_are_self_contained_and_split_the_layers(tiny_cfg):
    blocks = [get_task(tiny_cfg.task).build_block(tiny_cfg, b, torch.Generator().manual_seed(b)) for b in range(3)]
    assert [len(b.inner_model.layers) for b in blocks] == [1, 1, 1]
    ptrs = [{p.data_ptr() for p in b.parameters()} for b in blocks]
    assert not (ptrs[0] & ptrs[1]) and not (ptrs[1] & ptrs[2])
    # Each block owns its embedders and final layer.
    for b in blocks:
        names = dict(b.named_parameters())
        assert {"inner_model.x_embedder.weight", "inner_model.t_embedder.mlp.0.weight",
                "inner_model.y_embedder.weight", "inner_model.final_layer.linear.weight"} <= set(names)


def test_initialisation_depends_only_on_the_generator(tiny_cfg):
    a = get_task(tiny_cfg.task).build_block(tiny_cfg, 0, torch.Generator().manual_seed(3)).state_dict()
    torch.manual_seed(123)  # the global RNG must not matter
    b = get_task(tiny_cfg.task).build_block(tiny_cfg, 0, torch.Generator().manual_seed(3)).state_dict()
    c = get_task(tiny_cfg.task).build_block(tiny_cfg, 0, torch.Generator().manual_seed(4)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["inner_model.layers.0.attn.qkv.weight"], c["inner_model.layers.0.attn.qkv.weight"])


def test_layers_per_block_explicit_split(tiny_cfg):
    cfg = apply_overrides(tiny_cfg, ["model.depth=5", "blocks.layers_per_block=[2,2,1]"])
    assert [len(get_task(cfg.task).build_block(cfg, b).inner_model.layers) for b in range(3)] == [2, 2, 1]
