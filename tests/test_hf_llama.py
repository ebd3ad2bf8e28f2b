"""The transformers backbone of the language tasks (`model.backbone=transformers`, models/hf_llama.py): parity with
transformers' LlamaModel, the masks, the KV cache, training and sampling through the CLI, pretrained weights and their
conversion into blocks, and the messages for bad model directories. Tiny random LlamaConfigs; nothing downloads."""

import json
import os

import pytest
import torch

from diffusionblocks import checkpoint
from diffusionblocks.cli import main
from diffusionblocks.config import ConfigError
from diffusionblocks.convert import import_run
from diffusionblocks.models.arlm import CAUSAL, KVCache, training_mask
from diffusionblocks.models.hf_llama import our_names
from diffusionblocks.pretrained import from_pretrained
from diffusionblocks.tasks import apply_overrides, default_config, get_task
from diffusionblocks.token_chain import generate_chain, generate_plain

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

V = 11
HF = ["model.backbone=transformers", "model.hidden_size=16", "model.num_heads=2", "model.depth=3",
      "model.seq_len=12", "train.batch_size=4", "train.steps_per_block=3", "train.log_every=1",
      "train.checkpoint_every=2", "train.lr_warmup_steps=1", "sample.num=2"]
AR = ["task=arlm", *HF, "blocks.num_blocks=3", "sample.new_chars=5", "sample.prompt_chars=4"]
PLAIN = ["task=arlm", *HF, "blocks.num_blocks=1", "model.mode=plain"]
MDLM = ["task=mdlm", *HF, "blocks.num_blocks=3", "sample.steps=4"]


def _randomise(net: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Every weight moved off its initial value (zero adaLN would hide a leak through a gated path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net.eval()


def _build(overrides, b=0, seed=0, vocab=V):
    cfg = apply_overrides(default_config("arlm" if "task=arlm" in overrides else "mdlm"),
                          [*overrides, f"model.vocab_size={vocab}"])
    return get_task(cfg.task).build_block(cfg, b, torch.Generator().manual_seed(seed)), cfg


def _llama(num_kv_heads: int = 2, vocab: int = V, tie: bool = False) -> "transformers.LlamaForCausalLM":
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=42, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=num_kv_heads, rms_norm_eps=1e-5,
                                      rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                                      max_position_embeddings=64, tie_word_embeddings=tie)
    return _randomise(transformers.LlamaForCausalLM(config), 7)


def test_identity_conditioning_gives_llama_models_hidden_states():
    """A fresh layer is the plain LlamaDecoderLayer: with the weights of a LlamaModel, the plain model's normalised
    hidden states are LlamaModel's."""
    net, _ = _build(PLAIN)
    state = net.state_dict()
    llama_std = _randomise(transformers.LlamaModel(net.trunk.rotary_emb.config), 8)  # the config our task derived
    named = our_names(llama_std.state_dict(), "trunk", "norm_final.weight", "head.weight", 3, False)
    assert set(named) <= set(state)
    net.load_state_dict({**state, **named})
    with torch.no_grad():
        net.trunk.clean_cond.normal_()  # any constant condition: the modulation is zero
        tokens = torch.randint(V, (2, 10), generator=torch.Generator().manual_seed(1))
        ours = net.norm_final(net.trunk.run(net.trunk.tok_embed(tokens), net.trunk.clean_cond, torch.arange(10),
                                            CAUSAL))
        theirs = llama_std(input_ids=tokens).last_hidden_state
    assert (ours - theirs).abs().max() < 1e-5
    with torch.no_grad():  # and the check can fail: a modulation moves it
        net.trunk.layers[1].adaLN_modulation[-1].bias.fill_(0.1)
        moved = net.norm_final(net.trunk.run(net.trunk.tok_embed(tokens), net.trunk.clean_cond, torch.arange(10),
                                             CAUSAL))
    assert (moved - theirs).abs().max() > 1e-3


@pytest.mark.parametrize("cut", [0, 3, 6])
def test_the_noisy_stream_never_sees_its_own_or_a_later_token(cut):
    net, _ = _build(AR)
    _randomise(net, 1)
    net.E.copy_(torch.nn.functional.normalize(torch.randn(V, 16, generator=torch.Generator().manual_seed(2)), dim=-1))
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(V, (3, 8), generator=g)
    z, sigma = torch.randn(3, 8, 16, generator=g), torch.rand(3, 8, generator=g) + 0.05
    later = tokens.clone()
    later[:, cut:] = (later[:, cut:] + 1 + torch.randint(V - 1, later[:, cut:].shape, generator=g)) % V
    noisy_later = z.clone()
    noisy_later[:, cut + 1:] += 1.0
    with torch.no_grad():
        D, logits = net.denoise(z, sigma, tokens)
        D2, logits2 = net.denoise(noisy_later, sigma, later)
    assert torch.allclose(logits[:, :cut + 1], logits2[:, :cut + 1], atol=1e-5)
    assert torch.allclose(D[:, :cut + 1], D2[:, :cut + 1], atol=1e-5)
    assert not torch.allclose(logits[:, cut + 1:], logits2[:, cut + 1:])


def test_the_clean_stream_never_sees_the_noisy_one():
    net, _ = _build(AR)
    _randomise(net, 4)
    L, g = 6, torch.Generator().manual_seed(5)
    tokens = torch.randint(V, (2, L), generator=g)
    c = (torch.randn(2, L, 16, generator=g), net.trunk.clean_cond)
    x = torch.cat([torch.randn(2, L, 16, generator=g), net.trunk.tok_embed(tokens)], 1)
    y = x.clone()
    y[:, :L] += torch.randn(2, L, 16, generator=g)
    with torch.no_grad():
        hx = net.trunk.run(x, c, torch.arange(L).repeat(2), training_mask(L))
        hy = net.trunk.run(y, c, torch.arange(L).repeat(2), training_mask(L))
    assert torch.allclose(hx[:, L:], hy[:, L:], atol=1e-6) and not torch.allclose(hx[:, :L], hy[:, :L])


def test_the_cached_next_position_equals_the_training_forward():
    net, _ = _build(AR)
    _randomise(net, 6)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(V, (2, 9), generator=g)
    z, sigma = torch.randn(2, 9, 16, generator=g), torch.rand(2, 9, generator=g) + 0.05
    with torch.no_grad():
        D, logits = net.denoise(z, sigma, tokens)
        cache = KVCache(len(net.trunk.layers))
        net.trunk.extend(cache, tokens[:, :3])  # a prompt at once, then a token at a time
        for i in range(3, 9):
            Dn, ln = net.denoise_next(z[:, i], sigma[:, i], cache)
            assert torch.allclose(ln, logits[:, i], atol=1e-5) and torch.allclose(Dn, D[:, i], atol=1e-5)
            net.trunk.extend(cache, tokens[:, i:i + 1])
        Dc, lc = net.denoise_cached(z, sigma, net.clean_cache(tokens))  # every position after the clean stream
        assert torch.allclose(lc, logits, atol=1e-5) and torch.allclose(Dc, D, atol=1e-5)


@pytest.mark.parametrize("bridge", ["estimate", "sample"])
def test_generation_with_the_cache_equals_generation_without_it(bridge):
    from diffusionblocks.blocks import BlockwiseDenoiser

    blocks, cfg = zip(*[_build(AR, b, seed=b) for b in range(3)])
    chain = BlockwiseDenoiser([_randomise(n, 10 + b) for b, n in enumerate(blocks)], get_task("arlm").partition(cfg[0]))
    prompts = torch.randint(V, (3, 4), generator=torch.Generator().manual_seed(3))
    kw = dict(window=8, bridge=bridge, seeds=[5, 6, 7], temperature=0.8, top_p=0.9)
    fast = generate_chain(chain, prompts, 12, cache=True, **kw)  # the window moves on and the cache is re-filled
    assert torch.equal(fast, generate_chain(chain, prompts, 12, cache=False, **kw))
    plain, _ = _build(PLAIN)
    _randomise(plain, 9)
    a = generate_plain(plain, prompts, 12, window=6, seeds=[1, 2, 3])
    assert torch.equal(a, generate_plain(plain, prompts, 12, window=6, seeds=[1, 2, 3], cache=False))


def test_the_masked_diffusion_trunk_is_bidirectional():
    net, _ = _build(MDLM, vocab=V)
    _randomise(net, 3)
    x = torch.randint(V, (2, 8), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[:, 6] = (y[:, 6] + 1) % V
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        assert not torch.allclose(net(x, t)[:, :6], net(y, t)[:, :6])


def test_ar_and_mdlm_train_sample_resume_through_the_cli(tmp_path):
    for name, args in [("ar", AR), ("mdlm", MDLM), ("plain", PLAIN)]:
        run = tmp_path / name
        half = [a.replace("train.steps_per_block=3", "train.steps_per_block=2") for a in args]
        assert main(["train", "--out", str(run), "--no-progress", *half]) == 0
        assert main(["train", "--resume", str(run), "--no-progress", "train.steps_per_block=3"]) == 0
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["model"]["backbone"] == "transformers" and (run / "samples.txt").is_file()
        assert all(checkpoint.block_step(run, b) == 3 for b in range(cfg["blocks"]["num_blocks"]))
        out = tmp_path / f"{name}.txt"
        assert main(["sample", str(run), "--num", "2", "--out", str(out), "--no-progress"]) == 0
        assert out.read_text().strip()
        assert main(["status", str(run)]) == 0
    for name in ("ar", "mdlm"):
        assert main(["evaluate", str(tmp_path / name), "--windows", "4", "--out", str(tmp_path / f"ev-{name}"),
                     "--no-progress", *(["--prompts", "2", "--new", "3", "--speed-prompts", "1", "--judge", "none"] if name == "ar"
                                        else ["--repeats", "2", "--strata", "2", "--num", "2", "--judge",
                                              "none"])]) == 0
        assert 0 < json.loads((tmp_path / f"ev-{name}" / "evaluation.json").read_text())["bpc"] < 10
    ar = tmp_path / "ar"
    assert main(["compose", "--block", f"0={ar}", "--block", f"1,2={ar}", "--out", str(tmp_path / "mix")]) == 0
    assert main(["status", str(tmp_path / "mix")]) == 0
    ours = tmp_path / "ours"
    assert main(["train", "--out", str(ours), "--no-progress", *AR, "model.backbone=ours", "sample.num=0"]) == 0
    assert main(["compose", "--block", f"0={ar}", "--block", f"1,2={ours}", "--out", str(tmp_path / "x")]) == 2


def test_compare_trains_and_reports_both_on_the_backbone(tmp_path, monkeypatch):
    from dataclasses import dataclass

    from diffusionblocks.tasks.masked_diffusion import BPCEvaluateOptions

    @dataclass(frozen=True)
    class WithoutJudge(BPCEvaluateOptions):  # compare evaluates at the defaults: no 3000-step judge in a test
        judge: str = "none"

    monkeypatch.setattr(type(get_task("mdlm")), "evaluate_options", WithoutJudge)
    out = tmp_path / "cmp"
    assert main(["compare", "--out", str(out), "--num-blocks", "3", "--num", "2", "--no-progress", *MDLM,
                 f"model.vocab_size={V}", f"data.path={_tiny_text(tmp_path)}", "sample.num=0"]) == 0
    assert (out / "report.md").is_file()
    configs = [json.loads(p.read_text()) for p in out.glob("*/config.json")]
    assert len(configs) == 2 and all(c["model"]["backbone"] == "transformers" for c in configs)


@pytest.fixture
def llama_dir(tmp_path):
    path = tmp_path / "llama"
    _llama().save_pretrained(path)
    return path


@pytest.mark.parametrize("kv_heads, tie", [(2, False), (1, True)])  # grouped keys and values; a tied head
def test_pretrained_weights_give_the_source_models_logits(tmp_path, kv_heads, tie):
    path = tmp_path / "llama"
    _llama(kv_heads, tie=tie).save_pretrained(path)
    source = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    net, _ = _build([*PLAIN, f"model.pretrained={path}", "model.mlp_ratio=3.9375"])
    tokens = torch.randint(V, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (net.eval()(tokens) - source(input_ids=tokens).logits).abs().max() < 1e-5
    # The cache through grouped key/value heads, and a masked-diffusion block from the same weights.
    prompts = tokens[:, :3]
    assert torch.equal(generate_plain(net, prompts, 6, window=8, seeds=[1, 2]),
                       generate_plain(net, prompts, 6, window=8, seeds=[1, 2], cache=False))
    mdlm, _ = _build([*MDLM, "blocks.num_blocks=1", f"model.pretrained={path}", "model.mlp_ratio=3.9375"])
    assert torch.equal(mdlm.trunk.tok_embed.weight[:V], source.model.embed_tokens.weight)
    assert torch.equal(mdlm.trunk.layers[2].layer.self_attn.k_proj.weight,
                       source.model.layers[2].self_attn.k_proj.weight)


def test_a_pretrained_run_converts_into_blocks(llama_dir, tmp_path):
    run, blocks = tmp_path / "e2e", tmp_path / "B3"
    args = [a for a in AR if a != "blocks.num_blocks=3"]
    assert main(["train", "--out", str(run), "--no-progress", *args, "blocks.num_blocks=1", f"model.vocab_size={V}",
                 "model.mlp_ratio=3.9375", f"model.pretrained={llama_dir}", "data.path=" + str(_tiny_text(tmp_path)),
                 "sample.num=0"]) == 0
    assert main(["convert", str(run), "--num-blocks", "3", "--init", "depth", "--out", str(blocks)]) == 0
    assert main(["train", "--from", str(blocks), "--out", str(tmp_path / "ft"), "--no-progress",
                 "train.steps_per_block=1"]) == 0
    from safetensors.torch import load_file

    w = load_file(str(blocks / "block_02.safetensors"))
    assert torch.equal(w["trunk.layers.0.layer.mlp.up_proj.weight"], load_file(str(run / "block_00.safetensors"))[
        "trunk.layers.2.layer.mlp.up_proj.weight"])


def _tiny_text(tmp_path):
    """A corpus of exactly V = 11 characters in both splits."""
    path = tmp_path / "text.txt"
    g = torch.Generator().manual_seed(0)
    path.write_text("".join("abcdefghij\n"[int(i)] for i in torch.randint(11, (4000,), generator=g)))
    return path


def test_bad_model_directories_get_one_message_each(llama_dir, tmp_path):
    def build(path, *more):
        _build([*PLAIN, f"model.pretrained={path}", "model.mlp_ratio=3.9375", *more])

    with pytest.raises(ConfigError, match="has no config.json"):
        build(tmp_path)
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="holds a 'gpt2' model"):
        build(other)
    with pytest.raises(ConfigError, match="hidden_size=16 but model.hidden_size=32: set model.hidden_size=16"):
        build(llama_dir, "model.hidden_size=32")
    with pytest.raises(ConfigError, match="intermediate_size=42 but model.mlp_ratio=3.0 gives a SwiGLU width of 32"
                       ".*set model.mlp_ratio=3.9375 and model.mlp_multiple=1"):
        _build([*PLAIN, f"model.pretrained={llama_dir}", "model.mlp_ratio=3.0"])
    with pytest.raises(ConfigError, match="vocab_size=11 but model.vocab_size=65"):
        _build([*PLAIN, f"model.pretrained={llama_dir}", "model.mlp_ratio=3.9375"], vocab=65)
    with pytest.raises(ConfigError, match="needs model.backbone='transformers'"):
        apply_overrides(default_config("arlm"), [f"model.pretrained={llama_dir}"])
    with pytest.raises(ConfigError, match="then `diffusionblocks convert` it"):
        apply_overrides(default_config("arlm"), ["model.backbone=transformers", f"model.pretrained={llama_dir}"])
    with pytest.raises(ConfigError, match="model.backbone"):
        apply_overrides(default_config("mdlm"), ["model.backbone=hf"])


def test_activation_checkpointing_gives_the_same_gradients():
    net, _ = _build(AR)
    _randomise(net, 2).train()
    g = torch.Generator().manual_seed(3)
    tokens, sigma = torch.randint(V, (2, 6), generator=g), torch.rand(2, 6, generator=g) + 0.1
    noise = torch.randn(2, 6, 16, generator=g)
    grads = []
    for on in (False, True):
        net.zero_grad()
        net.trunk.checkpointing = on
        net.loss(tokens, sigma, noise).sum().backward()
        grads.append([p.grad.clone() for p in net.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_import_makes_a_run_of_the_saved_llama(llama_dir, tmp_path):
    """`diffusionblocks import` writes the saved model as a trained end-to-end run: loaded back it gives the source's
    logits. (The run still reads the directory's config, its eps, rope theta and key/value heads, when it is built.)"""
    cfg = apply_overrides(default_config("arlm"), [*PLAIN, f"model.vocab_size={V}", "model.mlp_ratio=3.9375",
                                                   f"model.pretrained={llama_dir}",
                                                   "data.path=" + str(_tiny_text(tmp_path))])
    import_run(cfg, tmp_path / "imported")
    source = transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval()
    model, _ = from_pretrained(tmp_path / "imported")
    tokens = torch.randint(V, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model.blocks[0](tokens) - source(input_ids=tokens).logits).abs().max() < 1e-5
