"""The released DiNa-LRM (liuhuohuo/DiNa-LRM-SD35M-12layers) against the facts of its folder: a synthetic copy at
SD3.5-M shapes (random bf16 tensors with the 87 head and 288 LoRA names and shapes of the released files) loads with
every tensor used, and our head's forward equals a reference written here from the released equations; a missing,
extra or misshapen tensor is a one-line error naming it; a dina model of ours exported to the layout loads back with
the same scores, and its LoRA loads with peft's own load_adapter the way the authors' reader loads it."""
import copy
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import eval_reward
import released
from model import (LORA_TARGETS, SD35_CONFIGS, DinaHead, build_reward_model, make_tiny_pipeline,
                   save_checkpoint, trainable_state)

W, PROJ, TAPS = 1536, 384, (4, 8, 12)  # SD3.5-M: 24 heads x 64; FiLM projections to W / 4
PROJECTIONS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
               "attn.add_v_proj", "attn.to_add_out", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]


def released_head_shapes():
    """rm_head.pt's 87 names and shapes, in its state_dict order, from the facts of the release."""
    out = {"query_tokens": (1, 4, W)}
    for side in ("visual", "text"):
        for j in range(3):
            p = f"layer_adapters_{side}.{j}."
            out |= {p + "layer_embed": (1, 1, W), p + "cond_mlp.0.weight": (2 * W, W), p + "cond_mlp.0.bias": (2 * W,),
                    p + "cond_mlp.2.weight": (2 * W, 2 * W), p + "cond_mlp.2.bias": (2 * W,),
                    p + "proj.weight": (PROJ, W), p + "proj.bias": (PROJ,)}
    for side in ("visual", "text"):
        out |= {f"agg_{side}.weight": (W, 3 * PROJ), f"agg_{side}.bias": (W,)}
    for a, text in (("attn1", True), ("attn2", False)):
        out |= {f"{a}.norm_q.weight": (W,), f"{a}.norm_v.weight": (W,)} | ({f"{a}.norm_t.weight": (W,)} if text else {})
        for lin in ["to_q", "to_k_vis", "to_v_vis"] + (["to_k_text", "to_v_text"] if text else []) + ["to_out.0"]:
            out |= {f"{a}.{lin}.weight": (W, W), f"{a}.{lin}.bias": (W,)}
        for g in ("gate_vis", "gate_text") if text else ():
            out |= {f"{a}.{g}.0.weight": (W, W), f"{a}.{g}.0.bias": (W,), f"{a}.{g}.2.weight": (1, W), f"{a}.{g}.2.bias": (1,)}
    return out | {"norm_ff.weight": (W,), "ff.0.weight": (4 * W, W), "ff.0.bias": (4 * W,), "ff.2.weight": (W, 4 * W),
                  "ff.2.bias": (W,), "head.weight": (1, W), "head.bias": (1,)}


def released_lora_shapes(r=64):
    """adapter_model.safetensors' 288 names and shapes (peft wrapped the authors' SD3Backbone, adapter name dropped)."""
    return {f"base_model.model.transformer_blocks.{i}.{m}.lora_{ab}.weight": ((r, W) if ab == "A" else (W, r))
            for i in range(12) for m in PROJECTIONS for ab in "AB"}


RELEASED_CONFIG = dict(  # thurstone-12layer.yaml as the training code dumps it (the data paths left out)
    model=dict(model_type="thurstone", backbone_model_id="stabilityai/stable-diffusion-3.5-medium", num_transformer_layers=12,
               freeze_backbone=False, use_ema=True, ema_decay=0.995, use_lora=True, use_text_features=True,
               lora_config=dict(r=64, lora_alpha=128, init_lora_weights="gaussian"), use_logistic=False,
               visual_head_idx=[4, 8, 12], text_head_idx=[4, 8, 12], use_t_embed=True,
               reward_head=dict(use_proj_in=False, width=-1, out_dim=1, num_queries=4, num_attn_heads=8, dropout=0.0)),
    training=dict(mixed_precision="bf16", learning_rate="5e-5", warmup_steps=1000, lr_scheduler="constant", add_noise=True),
    logging=dict(eval_frac=1000, save_frac=2000), system=dict(seed=42))


def random_tensor(name, shape, g):
    """bf16 with scales that keep the activations O(1); nothing zero, so every FiLM, gate and embedding acts."""
    if ".norm_" in name or name.startswith("norm_"):
        x = 1 + 0.2 * torch.randn(shape, generator=g)
    elif name.endswith(".weight") and len(shape) == 2:
        x = torch.randn(shape, generator=g) / math.sqrt(shape[1])
    else:  # biases, layer embeddings, queries
        x = 0.3 * torch.randn(shape, generator=g)
    return x.bfloat16()


def write_released(root, head, lora, adapter_extra=None, config=RELEASED_CONFIG):
    (root / "checkpoint" / "backbone_lora").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config, indent=4))
    torch.save(head, root / "checkpoint" / "rm_head.pt")
    targets = random.Random(0).sample(LORA_TARGETS, len(LORA_TARGETS))  # peft writes them in no fixed order
    adapter = dict(peft_type="LORA", r=64, lora_alpha=128, target_modules=targets, init_lora_weights="gaussian",
                   lora_dropout=0.0, bias="none", use_rslora=False, use_dora=False, rank_pattern={}, alpha_pattern={},
                   base_model_name_or_path=None, exclude_modules=None, task_type=None, inference_mode=True,
                   auto_mapping=dict(base_model_class="SD3Backbone", parent_library="diffusion_rm.models.sd3_rm"))
    (root / "checkpoint" / "backbone_lora" / "adapter_config.json").write_text(json.dumps(adapter | (adapter_extra or {})))
    save_file(lora, str(root / "checkpoint" / "backbone_lora" / "adapter_model.safetensors"), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- the released equations, written out


def rms(x, w):  # nn.RMSNorm(W) with eps=None: float32's epsilon
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps) * w


def attention(q, k, v, heads=8):  # one softmax: heads from view(B, L, 8, 192), scale 1/sqrt(192), no mask
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, -1).permute(0, 2, 1, 3)
    a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(q.shape[-1] // heads), dim=-1)
    return (a @ split(v)).permute(0, 2, 1, 3).reshape(q.shape)


def reference_head(sd, temb, vis, txt):
    """The released head's forward from the facts (FiLM, fusion, gated dual attention, visual attention, FFN, mean of
    the query scores), on the file's tensors: -> (B,)."""
    p = lambda k: sd[k].float()
    lin = lambda x, k: x @ p(k + ".weight").T + p(k + ".bias")
    silu = lambda x: x * torch.sigmoid(x)

    def film(prefix, x):  # cond_mlp = Linear -> SiLU -> Linear on the raw temb; gamma the first W outputs
        style = lin(silu(lin(temb, prefix + "cond_mlp.0")), prefix + "cond_mlp.2")
        gamma, beta = style[:, None, :W], style[:, None, W:]
        return lin(x * (1 + gamma) + beta + p(prefix + "layer_embed"), prefix + "proj")  # embedding after FiLM

    V = lin(torch.cat([film(f"layer_adapters_visual.{j}.", x) for j, x in enumerate(vis)], -1), "agg_visual")
    T = lin(torch.cat([film(f"layer_adapters_text.{j}.", x) for j, x in enumerate(txt)], -1), "agg_text")
    gate = lambda k, c: torch.sigmoid(lin(silu(lin(c, k + ".0")), k + ".2"))  # (B, N, 1), from the normalised context
    q0 = p("query_tokens").expand(len(temb), -1, -1)
    q, Vn, Tn = lin(rms(q0, p("attn1.norm_q.weight")), "attn1.to_q"), rms(V, p("attn1.norm_v.weight")), rms(T, p("attn1.norm_t.weight"))
    h = (attention(q, lin(Vn, "attn1.to_k_vis"), lin(Vn, "attn1.to_v_vis") * gate("attn1.gate_vis", Vn))
         + attention(q, lin(Tn, "attn1.to_k_text"), lin(Tn, "attn1.to_v_text") * gate("attn1.gate_text", Tn)))
    q1 = q0 + lin(h, "attn1.to_out.0")
    Vn = rms(V, p("attn2.norm_v.weight"))
    q2 = q1 + lin(attention(lin(rms(q1, p("attn2.norm_q.weight")), "attn2.to_q"), lin(Vn, "attn2.to_k_vis"),
                            lin(Vn, "attn2.to_v_vis")), "attn2.to_out.0")
    f = lin(rms(q2, p("norm_ff.weight")), "ff.0")
    q3 = q2 + lin(0.5 * f * (1 + torch.erf(f / math.sqrt(2))), "ff.2")  # exact GELU
    return lin(q3, "head").mean(1).squeeze(-1)  # (B, 4, 1) per-query scores -> their mean


# ----------------------------------------------------------------------------- SD3.5-M shapes


def test_sd35m_dina_head_is_the_released_one():
    """139,296,003 parameters in the 87 tensors of rm_head.pt, same names, shapes and order (meta device: no memory)."""
    with torch.device("meta"):
        head = DinaHead(W, len(TAPS))
    assert sum(p.numel() for p in head.parameters()) == 139_296_003
    assert [(k, tuple(v.shape)) for k, v in head.state_dict().items()] == list(released_head_shapes().items())
    assert len(released_lora_shapes()) == 288 and sum(math.prod(s) for s in released_lora_shapes().values()) == 28_311_552


def sd35m_backbone():
    """SD3.5-M's transformer config with 13 blocks (the 12 kept, and a 13th so block 12 still outputs its text stream)
    on the meta device: exact shapes, no storage (12 blocks with real random weights take 41 s and 4 GB here). The
    loader assigns what it loads, so the head and the LoRA are real; the tap's forward is tested against diffusers'
    own at tiny and toy sizes (test_model.py)."""
    from diffusers import SD3Transformer2DModel
    with torch.device("meta"):
        return SD3Transformer2DModel.from_config(dict(SD35_CONFIGS["sd35m"], num_layers=13))


@pytest.fixture(scope="module")
def sd35m(tmp_path_factory):
    """A synthetic released folder at SD3.5-M shapes (random bf16 tensors under the facts' names), and what
    released.load_reward makes of it."""
    root = tmp_path_factory.mktemp("DiNa-LRM-SD35M-12layers")
    g = torch.Generator().manual_seed(0)
    head = {k: random_tensor(k, s, g) for k, s in released_head_shapes().items()}
    lora = {k: random_tensor(k, s, g) for k, s in released_lora_shapes().items()}
    write_released(root, head, lora)
    model, meta = released.load_reward(str(root), transformer=sd35m_backbone())
    return head, lora, model, meta


def test_released_folder_loads_at_sd35m_shapes_and_matches_the_reference(sd35m):
    head, lora, model, meta = sd35m
    a = meta["args"]
    assert (a["backbone"], a["head"], a["blocks"], tuple(a["taps"]), a["lora_rank"], a["lora_alpha"]) == ("sd35m", "dina", 12, TAPS, 64, 128)
    assert a["max_text_len"] == 128 and a["t_eval"] == 0.4  # 77 + 128 = 205 text tokens; the README's u for latents
    # every one of the 87 + 288 tensors is in the model, as the file holds it
    ours = model.head.state_dict()
    assert set(ours) == set(head)
    for k, v in head.items():
        assert ours[k].dtype == torch.float32 and torch.equal(ours[k], v.float()), k
    names = released.lora_names(model.tap)
    assert sorted(names.values()) == sorted(lora)
    tap = model.tap.state_dict()
    for n, r in names.items():
        assert torch.equal(tap[n], lora[r].float()), n
    lora_modules = [m for m in model.tap.modules() if hasattr(m, "scaling")]
    assert len(lora_modules) == 144 and {m.scaling["default"] for m in lora_modules} == {2.0}  # alpha / r = 128 / 64
    # the adapter is live at scale 2 (one module, its base weight made real here): W x + b + 2 B A x
    m = copy.deepcopy(model.tap.blocks[11].attn2.to_out[0])
    m.base_layer.weight = torch.nn.Parameter(torch.randn(W, W) / math.sqrt(W))
    m.base_layer.bias = torch.nn.Parameter(torch.randn(W))
    x = torch.randn(3, W)
    A = lora["base_model.model.transformer_blocks.11.attn2.to_out.0.lora_A.weight"].float()
    B = lora["base_model.model.transformer_blocks.11.attn2.to_out.0.lora_B.weight"].float()
    with torch.no_grad():
        torch.testing.assert_close(m(x), F.linear(x, m.base_layer.weight, m.base_layer.bias) + 2 * (x @ A.T) @ B.T)
    # the head's forward on tapped streams of SD3.5-M's widths (64 image tokens, 205 text tokens) = the reference
    g = torch.Generator().manual_seed(1)
    temb = torch.randn(2, W, generator=g)
    vis = [2 * torch.randn(2, 64, W, generator=g) for _ in TAPS]
    txt = [2 * torch.randn(2, 205, W, generator=g) for _ in TAPS]
    with torch.no_grad():
        got, want = model.head(temb, vis, txt), reference_head(head, temb, vis, txt)
    assert got.shape == (2,) and (want[0] - want[1]).abs() > 1e-2  # the two samples' scores differ 100x the tolerance
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the noise level: the nearest sigma of the shift-3 training grid (the facts' measured values)
    for u, sigma in ((0.1, 0.100746), (0.2, 0.200173), (0.4, 0.400293), (0.7, 0.700426), (0.9, 0.9)):
        assert model.snap(u) == pytest.approx(sigma, abs=1e-6)
    assert float(1000 * torch.tensor(model.snap(0.4))) == pytest.approx(400.2933, abs=1e-4)


def test_released_lora_with_a_missing_attn2_key_is_refused(sd35m, tmp_path):
    """The MindSpore port's pitfall: attn2's adapters dropped. peft's own loader would go on without them."""
    head, lora, model, _ = sd35m
    key = "base_model.model.transformer_blocks.5.attn2.to_v.lora_B.weight"
    write_released(tmp_path, head, {k: v for k, v in lora.items() if k != key})
    with pytest.raises(ValueError) as e:
        released.read_state(str(tmp_path), model)  # what released.load_reward calls on the model it built
    assert f"adapter_model.safetensors: missing tensor {key} of shape (1536, 64) (1 missing)" in str(e.value)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- ours -> released layout -> ours (tiny)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny dina checkpoint of ours (LoRA r 4, alpha 8, every trainable tensor moved off its init), exported with
    eval_reward.py --export-released."""
    d = tmp_path_factory.mktemp("export")
    torch.manual_seed(3)
    m = build_reward_model("tiny", "dina", lora_rank=4, lora_alpha=8).eval()
    with torch.no_grad():
        for p in trainable_state(m).values():
            p.add_(0.2 * torch.randn_like(p))
    args = dict(backbone="tiny", head="dina", lora_rank=4, lora_alpha=8, seed=0, t_eval=0.3, max_text_len=8, resolution=32)
    save_checkpoint(str(d / "ours" / "ckpt.safetensors"), {"model." + n: p for n, p in trainable_state(m).items()},
                    {"args": args, "step": 5})
    eval_reward.main(eval_reward.parser.parse_args(["--ckpt", str(d / "ours"), "--export-released", str(d / "rel")]))
    return d, m


def test_export_writes_the_released_layout(exported):
    d, m = exported
    root = d / "rel"
    head = torch.load(root / "checkpoint" / "rm_head.pt", weights_only=True, map_location="cpu")
    assert type(head) is dict and list(head) == list(m.head.state_dict())
    cfg = json.loads((root / "config.json").read_text())["model"]
    assert (cfg["num_transformer_layers"], cfg["visual_head_idx"], cfg["text_head_idx"]) == (3, [1, 2, 3], [1, 2, 3])
    assert (cfg["use_lora"], cfg["freeze_backbone"], cfg["lora_config"]["r"], cfg["lora_config"]["lora_alpha"]) == (True, False, 4, 8)
    with safe_open(str(root / "checkpoint" / "backbone_lora" / "adapter_model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = list(f.keys())
    assert len(keys) == 64 and all(k.startswith("base_model.model.transformer_blocks.") for k in keys)  # (12 + 12 + 8) x 2:
    # the tiny transformer's blocks 0 and 1 have attn2, block 2 not
    with pytest.raises(FileExistsError, match="exists"):
        released.export(m, dict(args=dict(backbone="tiny", lora_rank=4)), str(root))
    with pytest.raises(ValueError, match="full-finetune"):
        released.export(m, dict(args=dict(backbone="tiny", full_finetune=True)), str(d / "new"))


class SD3Backbone(torch.nn.Module):
    """The module the authors wrap with peft: its kept blocks as transformer_blocks."""

    def __init__(self, blocks):
        super().__init__()
        self.transformer_blocks = blocks


def test_exported_lora_loads_with_peft_as_the_authors_reader_does(exported):
    """INF:150: peft.load_adapter(<root>/checkpoint/backbone_lora, adapter_name="rm_lora") on the LoRA'd backbone
    module: every adapter tensor arrives, at our values."""
    from peft import LoraConfig, get_peft_model
    d, m = exported
    blocks = torch.nn.ModuleList(make_tiny_pipeline(0).transformer.transformer_blocks[:3])
    pm = get_peft_model(SD3Backbone(blocks), LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights="gaussian"))
    res = pm.load_adapter(str(d / "rel" / "checkpoint" / "backbone_lora"), adapter_name="rm_lora")
    assert not [k for k in res.missing_keys if "rm_lora" in k] and not res.unexpected_keys
    state = pm.state_dict()
    ours = {n: p for n, p in m.tap.state_dict().items() if "lora_" in n}
    assert len(ours) == 64
    for n, p in ours.items():
        torch.testing.assert_close(state["base_model.model.transformer_" + n.replace(".default.", ".rm_lora.")], p)
    assert pm.base_model.model.transformer_blocks[0].attn2.to_q.scaling["rm_lora"] == 2.0


def test_exported_folder_loads_back_with_the_same_scores(exported):
    d, m = exported
    back, meta = released.load_reward(str(d / "rel"))
    assert (meta["args"]["t_eval"], meta["args"]["max_text_len"], meta["args"]["resolution"]) == (0.3, 8, 32)
    g = torch.Generator().manual_seed(2)
    x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    pe, pooled = torch.randn(2, 24, 32, generator=g), torch.randn(2, 32, generator=g)
    with torch.no_grad():
        for kw in (dict(t=0.3), dict(t=0.5), dict(ts=(0.3, 0.5, 0.9))):  # sigmas of the grid: nothing to snap
            torch.testing.assert_close(back.score(x, pe, pooled, noise=eps, **kw), m.score(x, pe, pooled, noise=eps, **kw),
                                       atol=1e-6, rtol=1e-6)
        snapped = back.score(x, pe, pooled, t=0.4, noise=eps)  # off the grid: read at the nearest sigma, 0.400293
        torch.testing.assert_close(snapped, m.score(x, pe, pooled, t=0.4002932608127594, noise=eps), atol=1e-6, rtol=1e-6)
        assert (snapped - m.score(x, pe, pooled, t=0.4, noise=eps)).abs().max() > 1e-7
        ten, _ = released.load_reward(str(d / "rel"), normalisation="plus12")
        torch.testing.assert_close(ten.score(x, pe, pooled, t=0.3, noise=eps), (m.score(x, pe, pooled, t=0.3, noise=eps) + 12) / 10)
    with pytest.raises(ValueError, match="unknown score normalisation 'plus11'"):
        released.load_reward(str(d / "rel"), normalisation="plus11")


def broken_copy(src, dst, head=None, lora=None, config=None, adapter=None):
    """A copy of an exported folder with some of its files replaced."""
    import shutil
    shutil.copytree(src, dst)
    ckpt = dst / "checkpoint"
    if head is not None:
        torch.save(head, ckpt / "rm_head.pt")
    if lora is not None:
        save_file(lora, str(ckpt / "backbone_lora" / "adapter_model.safetensors"))
    for path, edit in ((dst / "config.json", config), (ckpt / "backbone_lora" / "adapter_config.json", adapter)):
        if edit is not None:
            path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return str(dst)


class Payload:  # what a pickle could run on load; weights_only refuses to build it
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_bad_released_folders_are_one_line_errors(exported, tmp_path, capsys):
    d, _ = exported
    src = d / "rel"
    head = torch.load(src / "checkpoint" / "rm_head.pt", weights_only=True)
    lora = load_file(str(src / "checkpoint" / "backbone_lora" / "adapter_model.safetensors"))
    lk = "base_model.model.transformer_blocks.2.attn.to_add_out.lora_A.weight"
    cases = [
        (dict(head={k: v for k, v in head.items() if k != "attn1.gate_text.2.bias"}),
         "rm_head.pt: missing tensor attn1.gate_text.2.bias of shape (1,)"),
        (dict(head=head | {"proj_in.weight": torch.zeros(32, 32)}), "rm_head.pt: unexpected tensor proj_in.weight"),
        (dict(head=head | {"agg_visual.weight": torch.zeros(32, 12)}), "rm_head.pt: agg_visual.weight has shape (32, 12), expected (32, 24)"),
        (dict(head={"state_dict": head}), "rm_head.pt: missing tensor"),
        (dict(head=head | {"x": Payload()}), "Weights only load failed"),
        (dict(lora={k: v for k, v in lora.items() if k != lk}), f"adapter_model.safetensors: missing tensor {lk} of shape (4, 32)"),
        (dict(lora=lora | {lk.replace(".weight", ".bias"): torch.zeros(4)}),
         f"adapter_model.safetensors: unexpected tensor {lk.replace('.weight', '.bias')}"),
        (dict(lora=lora | {lk: torch.zeros(8, 32)}), f"adapter_model.safetensors: {lk} has shape (8, 32), expected (4, 32)"),
        (dict(config=lambda c: c | dict(model=c["model"] | dict(use_logistic=True))),
         "config.json: model.use_logistic is True; this loader reads False there"),
        (dict(config=lambda c: c | dict(model=c["model"] | dict(text_head_idx=[1, 2]))), "config.json: model.text_head_idx is [1, 2]"),
        (dict(config=lambda c: c | dict(model=c["model"] | dict(reward_head=dict(num_attn_heads=4)))),
         "config.json: model.reward_head.num_attn_heads is 4"),
        (dict(adapter=lambda c: c | dict(use_rslora=True)), "adapter_config.json: use_rslora is True"),
        (dict(adapter=lambda c: c | dict(target_modules=["to_q", "to_v"])), "adapter_config.json: target_modules is"),
    ]
    for i, (edit, message) in enumerate(cases):
        with pytest.raises(Exception) as e:
            released.load_reward(broken_copy(src, tmp_path / str(i), **edit))
        assert message in str(e.value), (i, str(e.value)[:300])
        if "Weights only" not in message:
            assert isinstance(e.value, ValueError) and "\n" not in str(e.value), (i, str(e.value))
    assert "unpickled!" not in capsys.readouterr().out  # weights_only: the payload never ran
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(RELEASED_CONFIG))
    with pytest.raises(FileNotFoundError, match="adapter_config.json: not found"):
        released.load_reward(str(tmp_path / "empty"))
