"""
The diffusion-native latent reward model, in one file.

A pretrained text-to-image MMDiT (SD3-family, loaded with diffusers) reads a noisy VAE latent
x_t and its prompt; the hidden states after a few of its blocks (the "tap") go to a small head
that outputs one scalar reward. Three published heads are implemented side by side:

  dina  DiNa-LRM  "Beyond VLM-Based Rewards: Diffusion-Native Latent Reward Modeling"
        FiLM per tapped layer + gated Q-Former, noise-calibrated Thurstone loss,
        multi-noise ensembling by token concatenation.
  drm   DRM       "Diffusion-based Reward Model with Step-wise Guidance"
        21/24 blocks, the backbone's own final norm + projection, a small conv net; Bradley-Terry.
  ditr  DiT-Reward "DiT-Reward: Generative Representations for Text-to-Image Reward Modeling"
        layer-normalised, token-pooled middle-to-late layers, softmax layer weights, small MLP.

This file holds: backbone presets and loading (everything through diffusers), DiTTap, the heads,
RewardModel, the flow-matching math (noising, sigmas, the sampler: sde_step, cps_step, sample) and the losses, and
the checkpoint I/O.
Stages (train_reward.py, eval_reward.py, ...) import from here.

The dina head is the released DiNa-LRM's architecture (liuhuohuo/DiNa-LRM-SD35M-12layers), with its parameter names;
load_reward_model reads that folder (through released.py, which also writes ours in its layout) as well as our
checkpoints. Citations RH and INF are files of the authors' code (HKUST-C4G/diffusion-rm af485b4):
diffusion_rm/models/reward_head.py and diffusion_rm/infer/inference.py.

Deviations from the papers / released code (honest notes):
- thurstone_loss uses sigma_u**2 = 0.01 as the variance floor (the paper); the released DiNa
  code uses 0.05. Set --sigma-u 0.2236 to match the code.
"""

import json
import math
import os
import tempfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

# -----------------------------------------------------------------------------
# Backbone presets: one size dial, as DiT's model dict. Per head: blocks kept and taps (1-based,
# tap i = output of transformer_blocks[i-1]). The dina head's sizes follow the backbone's width W, as the released
# head's do (RH:211-214): FiLM projections to W/4, 8 attention heads of W/8, 4 queries.

BACKBONES = {
    # random tiny SD3 pipeline built in memory from a seed (tests): 4 blocks, width 32, patch 2
    "tiny": dict(path=None, blocks=dict(dina=3, drm=4, ditr=4), taps=dict(dina=(1, 2, 3), drm=(4,), ditr=(2, 3, 4)),
                 conv=(16, 32, 32), mlp=32),
    # the toy generator written by toy.py (6 blocks, width 128, patch 2 on 16x16x4 latents)
    "toy": dict(path="out/toy/pipeline", blocks=dict(dina=4, drm=5, ditr=5), taps=dict(dina=(2, 3, 4), drm=(5,), ditr=(3, 4, 5)),
                conv=(64, 128, 128), mlp=128),
    # SD3.5-M, 24 blocks of width 1536. DiNa: blocks 4/8/12 of the first 12 (paper Sec. 3);
    # DRM: first 21 blocks (paper Sec. 3.1); DiT-Reward: middle-to-late layers (our pick for M).
    "sd35m": dict(path="stabilityai/stable-diffusion-3.5-medium", blocks=dict(dina=12, drm=21, ditr=18),
                  taps=dict(dina=(4, 8, 12), drm=(21,), ditr=(10, 14, 18)), conv=(256, 512, 512), mlp=512),
    # SD3.5-L, 38 blocks of width 2432. DiT-Reward's backbone: middle-to-late layers (paper: best
    # layers are middle-to-late); DiNa/DRM at the same relative depths as on M (our choice).
    "sd35l": dict(path="stabilityai/stable-diffusion-3.5-large", blocks=dict(dina=19, drm=33, ditr=28),
                  taps=dict(dina=(6, 13, 19), drm=(33,), ditr=(16, 22, 28)), conv=(256, 512, 512), mlp=512),
}
# The SD3.5 transformers' architectures (their transformer/config.json), so a randomly initialised backbone
# (the pretraining ablation, GPU benchmarks) needs no download. M is MMDiT-X: extra self-attention in blocks 0-12.
SD35_CONFIGS = {
    "sd35m": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                  dual_attention_layers=tuple(range(13))),
    "sd35l": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192)}
for _c in SD35_CONFIGS.values():
    _c.update(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
              joint_attention_dim=4096, pooled_projection_dim=2048, qk_norm="rms_norm")
HEADS = ("dina", "drm", "ditr")
# peft matches name suffixes: in SD3.5's dual-attention blocks attn2.{to_q, to_k, to_v, to_out.0} too, 12 per block
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def check_names(backbone, head):
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {list(HEADS)}")


def write_word_tokenizer(folder, words=(), max_length=16):
    """A CLIP BPE tokenizer written locally (tiny/toy only): one token per character, plus BPE merges
    that make each of `words` one token ("red</w>"), so a toy prompt is ~9 tokens, not ~37 characters.
    Any other text still tokenizes (character by character). max_length = the CLIP sequence length."""
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    merges = []
    for w in sorted(set(words)):  # left to right: "r e", "re d</w>" -> "red</w>"
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in dict.fromkeys(merges)))
    from transformers import CLIPTokenizer
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         unk_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=max_length)


# The tiny backbone's tokenizer makes each word of the tests' prompts ("a red circle on a white background") one token.
TINY_WORDS = ("a", "on", "background", "red", "green", "blue", "yellow", "purple", "orange", "circle", "square", "triangle",
              "white", "black", "gray")


def make_tiny_pipeline(seed=0, size="tiny", words=TINY_WORDS):
    """A random SD3 pipeline with the real architecture at toy scale (two CLIP encoders, no T5).
    size="tiny" (tests): 4 blocks, width 32, a 4x VAE (32x32 RGB -> 8x8x4 latents), patch 2: 16 image tokens.
    size="toy" (toy.py trains it): 6 blocks, width 128, a 2x VAE (32x32 -> 16x16x4), patch 2: 64 image tokens.
    words: one token each in the tokenizer (toy.py passes its prompts' words); any other text is spelt out.
    The toy VAE downsamples 2x, not SD3's 8x: at 4x it blurred every edge by about a pixel, the oracle could not read
    the shape off its reconstructions and the reward could not see mild blur (measured: docs/log.md)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    tiny = size == "tiny"
    tokenizer = write_word_tokenizer(tempfile.mkdtemp(prefix="toy_tokenizer_"), words)
    torch.manual_seed(seed)
    h = 16 if tiny else 32  # CLIP width; prompt_embeds = cat(clip_l, clip_g) padded to joint_attention_dim

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, projection_dim=h, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    width, heads = (32, 2) if tiny else (128, 4)
    transformer = SD3Transformer2DModel(
        sample_size=8 if tiny else 16, patch_size=2, in_channels=4, num_layers=4 if tiny else 6,
        attention_head_dim=width // heads, num_attention_heads=heads, joint_attention_dim=2 * h,
        caption_projection_dim=width, pooled_projection_dim=2 * h, out_channels=4, pos_embed_max_size=16,
        dual_attention_layers=(0, 1), qk_norm="rms_norm")  # dual attention + RMS qk-norm: the SD3.5 path
    ch = (8, 16, 16) if tiny else (32, 32)  # len(ch) - 1 stride-2 downsamplings (toy: 32 channels at 16x16 too,
    # as good as 64 there at half the VAE's training time; measured: docs/log.md)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(ch),
                        up_block_types=("UpDecoderBlock2D",) * len(ch), block_out_channels=ch, layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=32, shift_factor=0.0, scaling_factor=1.0)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip(), tokenizer=tokenizer, text_encoder_2=clip(), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)


def resolve_path(backbone, path=None):
    path = path or BACKBONES[backbone]["path"]
    if backbone == "toy" and path == BACKBONES["toy"]["path"] and not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: the toy backbone is not built yet; run `python toy.py` first")
    return path


def load_pipeline(backbone, path=None, seed=0, with_transformer=True, dtype=torch.float32):
    """The diffusers pipeline (VAE + text encoders [+ transformer]). Used for encoding the cache."""
    check_names(backbone, "dina")
    if backbone == "tiny" and path is None:
        return make_tiny_pipeline(seed)
    from diffusers import StableDiffusion3Pipeline
    path = resolve_path(backbone, path)
    kw = {} if with_transformer else dict(transformer=None)
    if not os.path.isdir(os.path.join(path, "text_encoder_3")) and os.path.isdir(path):
        kw.update(text_encoder_3=None, tokenizer_3=None)  # toy pipelines ship only the two CLIP encoders
    return StableDiffusion3Pipeline.from_pretrained(path, torch_dtype=dtype, **kw)


def load_transformer(backbone, path=None, seed=0, dtype=torch.float32, random_init=False):
    """The SD3Transformer2DModel only (no VAE, no text encoders: training reads the cache).
    random_init: the same architecture with fresh weights seeded by `seed` (the papers' ablation)."""
    if backbone == "tiny" and path is None:
        return make_tiny_pipeline(seed).transformer  # float32, as the tests want
    from diffusers import SD3Transformer2DModel
    path = resolve_path(backbone, path)
    if random_init:
        torch.manual_seed(seed)
        local = os.path.isdir(path) or backbone not in SD35_CONFIGS  # the hub presets' configs are above
        config = SD3Transformer2DModel.load_config(path, subfolder="transformer") if local else SD35_CONFIGS[backbone]
        model = SD3Transformer2DModel.from_config(config)
        return model if dtype == torch.float32 else model.to(dtype)
    return SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype)


def to_tensor(images):
    """PIL list -> (N,3,H,W) float in [-1, 1]."""
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2) / 127.5 - 1


@torch.no_grad()
def decode_latents(vae, z):
    """Normalised latents (B,C,h,w) -> PIL images through the VAE: encode_images's inverse (evaluation, the toy oracle)."""
    x = vae.decode(z.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)).sample
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in x]


@torch.no_grad()
def encode_images(vae, x):
    """Images (B,3,H,W) in [-1,1] -> normalised latents (B,C,H/f,W/f), (z - shift) * scale, float32 on the VAE's device;
    z is the posterior mean (deterministic); f = the VAE's downsampling (8 for SD3.5, 4 tiny, 2 toy)."""
    z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean.float()
    return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


@torch.no_grad()
def make_encoders(pipe, device="cpu", max_text_len=77):
    """Wrap a pipeline as the two callables the cache builder needs.
    encode: (B,3,H,W) in [-1,1] -> normalised latents on the CPU (encode_images).
    encode_prompts: list[str] -> prompt_embeds (B, L + max_text_len, D), pooled (B, P); L = the tokenizer's
    model_max_length (77 for CLIP; 16 for the tiny/toy word tokenizer)."""
    vae = pipe.vae.to(device)

    def encode(x):
        return encode_images(vae, x).cpu()

    @torch.no_grad()
    def encode_prompts(prompts):
        pe, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device=device,
                                              do_classifier_free_guidance=False, max_sequence_length=max_text_len)
        return pe.float().cpu(), pooled.float().cpu()
    return encode, encode_prompts

# -----------------------------------------------------------------------------
# The tap


class DiTTap(nn.Module):
    """Runs the first n_blocks of an SD3Transformer2DModel and returns the hidden states after the
    tapped blocks. Keeps references to pos_embed, time_text_embed, context_embedder and the kept
    blocks only, so the rest of the transformer can be freed."""

    def __init__(self, transformer, n_blocks, taps):
        super().__init__()
        assert all(1 <= i <= n_blocks for i in taps), f"taps {taps} must lie in 1..{n_blocks}"
        assert n_blocks <= len(transformer.transformer_blocks), f"{n_blocks} blocks > {len(transformer.transformer_blocks)}"
        self.pos_embed, self.time_text_embed = transformer.pos_embed, transformer.time_text_embed
        self.context_embedder = transformer.context_embedder
        self.blocks = nn.ModuleList(transformer.transformer_blocks[:n_blocks])
        self.taps, self.config = tuple(sorted(set(taps))), transformer.config  # features come back in block order
        self.width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        self.grad_ckpt = False

    def forward(self, latents, t, prompt_embeds, pooled):
        """latents (B,C,H,W), t (B,) in [0,1] -> temb (B,W), vis [(B,N,W)], txt [(B,L,W) or None]."""
        C = self.config.in_channels
        if latents.ndim != 4 or latents.shape[1] != C:
            raise ValueError(f"latents of shape {tuple(latents.shape)}: this backbone expects (B, {C}, H, W)")
        x = self.pos_embed(latents).contiguous()  # (B, N, W), N = H*W/p^2
        temb = self.time_text_embed(1000 * t.to(x.dtype), pooled)  # the transformer takes timestep = 1000 t
        ctx = self.context_embedder(prompt_embeds)  # (B, L, W)
        vis, txt = [], []
        for i, block in enumerate(self.blocks, start=1):
            if self.grad_ckpt and torch.is_grad_enabled():
                ctx, x = torch.utils.checkpoint.checkpoint(block, x, ctx, temb, use_reentrant=False)
            else:
                ctx, x = block(hidden_states=x, encoder_hidden_states=ctx, temb=temb)
            if i in self.taps:
                vis.append(x)
                txt.append(ctx)  # None after the model's last block (context_pre_only)
            if i == max(self.taps):
                break  # running stops after the last block needed
        return temb, vis, txt

    def compile_blocks(self):
        """torch.compile each kept block in place (fuses the norms, modulations and activations around the matmuls;
        parameter names are unchanged, so checkpoints and the EMA are unaffected)."""
        for block in self.blocks:
            block.compile()

# -----------------------------------------------------------------------------
# Heads: (temb, vis, txt) -> (B,) float32


class FiLMAdapter(nn.Module):
    """One tapped layer of one stream (RH:32-47): (gamma, beta) = cond_mlp(temb), cond_mlp = Linear(W, 2W) -> SiLU ->
    Linear(2W, 2W) with the last zero-initialised (no modulation at start); x (1 + gamma) + beta, then the layer
    embedding is added (after the modulation), then proj: Linear(W, W/4). The tapped stream x is read raw (no norm)."""

    def __init__(self, width):
        super().__init__()
        self.layer_embed = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.cond_mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, 2 * width))
        self.proj = nn.Linear(width, width // 4)
        nn.init.zeros_(self.cond_mlp[2].weight)
        nn.init.zeros_(self.cond_mlp[2].bias)

    def forward(self, x, temb):  # x (B,N,W), temb (B,W) -> (B,N,W/4)
        gamma, beta = self.cond_mlp(temb).unsqueeze(1).chunk(2, dim=-1)  # (B,1,W) each: gamma the first W outputs
        return self.proj(x * (1 + gamma) + beta + self.layer_embed)


def value_gate(width):
    """A per-token scalar gate on the values (RH:147-189): Linear(W, W) -> SiLU -> Linear(W, 1), the last zero-initialised
    (every gate starts at sigmoid(0) = 0.5)."""
    mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)
    return mlp


class GatedCrossAttention(nn.Module):
    """Queries attend to the visual tokens and (text=True) to the text tokens (RH:125-189): affine RMSNorms on the
    queries, V and T (eps=None: float32's epsilon, as released); own key and value projections per modality; with
    gated=True each value is scaled by its token's sigmoid gate, computed from the normalised context (keys are not
    gated); one softmax per modality, summed: out = queries + to_out(SDPA(q, k_v, v_v) + SDPA(q, k_t, v_t)), heads of
    width W/heads (8 x 192 on SD3.5-M), scale 1/sqrt(W/heads), no mask."""

    def __init__(self, width, heads=8, text=True, gated=True):
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_v = nn.RMSNorm(width), nn.RMSNorm(width)
        self.norm_t = nn.RMSNorm(width) if text else None
        self.to_q = nn.Linear(width, width)
        self.to_k_vis, self.to_v_vis = nn.Linear(width, width), nn.Linear(width, width)
        if text:
            self.to_k_text, self.to_v_text = nn.Linear(width, width), nn.Linear(width, width)
        self.to_out = nn.Sequential(nn.Linear(width, width))  # "to_out.0", as released (its Dropout(0) left out)
        self.gate_vis = value_gate(width) if gated else None
        self.gate_text = value_gate(width) if gated and text else None

    def branch(self, q, ctx, norm, to_k, to_v, gate):
        """SDPA of q (B,Q,W) over one modality's tokens ctx (B,N,W) -> (B,Q,W)."""
        c = norm(ctx)
        k, v = to_k(c), to_v(c)
        if gate is not None:
            v = v * torch.sigmoid(gate(c))  # (B,N,1): one gate per token
        heads = lambda x: x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)  # (B,h,L,W/h)
        return F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).flatten(2)

    def forward(self, queries, vis, txt=None):  # queries (B,Q,W), vis (B,N,W), txt (B,L,W) -> (B,Q,W)
        q = self.to_q(self.norm_q(queries))
        h = self.branch(q, vis, self.norm_v, self.to_k_vis, self.to_v_vis, self.gate_vis)
        if self.norm_t is not None:
            h = h + self.branch(q, txt, self.norm_t, self.to_k_text, self.to_v_text, self.gate_text)
        return queries + self.to_out(h)


class DinaHead(nn.Module):
    """DiNa-LRM's head as released (RH:300-331; the names of rm_head.pt's tensors, 139,296,003 parameters on SD3.5-M):
    per tapped layer and stream a FiLMAdapter; concatenation over the taps -> agg_visual / agg_text Linear(L W/4, W);
    then 4 learned queries: attn1 (gated cross-attention to V and T, two softmaxes summed), attn2 (visual only, no
    gates), q + ff(norm_ff(q)) with ff = Linear(W, 4W) -> GELU -> Linear(4W, W), and the mean over the queries of
    head(q), head = Linear(W, 1)."""

    def __init__(self, width, n_layers, n_queries=4, heads=8):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.randn(1, n_queries, width) * 0.02)
        self.layer_adapters_visual = nn.ModuleList(FiLMAdapter(width) for _ in range(n_layers))
        self.layer_adapters_text = nn.ModuleList(FiLMAdapter(width) for _ in range(n_layers))
        self.agg_visual = nn.Linear(n_layers * (width // 4), width)
        self.agg_text = nn.Linear(n_layers * (width // 4), width)
        self.attn1 = GatedCrossAttention(width, heads, text=True, gated=True)
        self.attn2 = GatedCrossAttention(width, heads, text=False, gated=False)
        self.norm_ff = nn.RMSNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.head = nn.Linear(width, 1)

    def tokens(self, temb, vis, txt):
        """FiLM-ed, fused tokens at one noise level (RH:278-296): V (B,N,W), T (B,L,W). Columns j W/4 : (j+1) W/4 of
        agg_* read tap j (in tap order)."""
        v = torch.cat([a(x, temb) for a, x in zip(self.layer_adapters_visual, vis, strict=True)], dim=-1)
        t = torch.cat([a(x, temb) for a, x in zip(self.layer_adapters_text, txt, strict=True)], dim=-1)
        return self.agg_visual(v), self.agg_text(t)

    def readout(self, v, t):
        """The query transformer over tokens (several noise levels may be concatenated along N and L, RH:333-375) -> (B,)."""
        q = self.query_tokens.expand(v.shape[0], -1, -1)  # (B,Q,W)
        q = self.attn2(self.attn1(q, v, t), v)
        q = q + self.ff(self.norm_ff(q))
        return self.head(q).mean(1).squeeze(-1)  # per-query scores (B,Q,1), their mean

    def forward(self, temb, vis, txt):
        return self.readout(*self.tokens(temb, vis, txt))


class DRMHead(nn.Module):
    """DRM: the backbone's own final norm (conditioned on temb) and output projection turn the last
    kept block's visual tokens into a latent-shaped map; three stride-2 3x3 convs with GroupNorm +
    SiLU (16 -> 256 -> 512 -> 512 at SD3.5 width), global average pool, MLP 512 -> 512 -> 1."""

    def __init__(self, norm_out, proj_out, patch, out_channels, conv=(256, 512, 512)):
        super().__init__()
        self.norm_out, self.proj_out, self.patch, self.c = norm_out, proj_out, patch, out_channels
        layers, c_in = [], out_channels
        for c in conv:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(min(32, c // 4), c), nn.SiLU()]
            c_in = c
        self.convs = nn.Sequential(*layers)
        self.mlp = nn.Sequential(nn.Linear(c_in, c_in), nn.SiLU(), nn.Linear(c_in, 1))
        self.hw = None  # (H, W) of the latent, set by RewardModel before each call

    def forward(self, temb, vis, txt):
        x = self.proj_out(self.norm_out(vis[-1], temb))  # (B, N, p*p*C)
        B, (H, W), p = x.shape[0], self.hw, self.patch
        x = x.reshape(B, H // p, W // p, p, p, self.c)
        x = torch.einsum("nhwpqc->nchpwq", x).reshape(B, self.c, H, W)  # unpatchify, as diffusers does
        return self.mlp(self.convs(x).mean(dim=(2, 3))).squeeze(-1)


class DiTRHead(nn.Module):
    """DiT-Reward: per tapped layer, LayerNorm the (text-conditioned) image tokens and mean-pool
    them; combine layers with learned softmax weights (or concatenation); MLP -> scalar."""

    def __init__(self, width, n_layers, hidden=512, combine="softmax"):
        super().__init__()
        self.combine = combine
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.layer_logits = nn.Parameter(torch.zeros(n_layers))
        d = width * n_layers if combine == "concat" else width
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, temb, vis, txt):
        pooled = torch.stack([self.norm(x).mean(1) for x in vis], dim=1)  # (B, L, W)
        if self.combine == "concat":
            f = pooled.flatten(1)
        else:
            f = (torch.softmax(self.layer_logits, 0)[None, :, None] * pooled).sum(1)
        return self.mlp(f).squeeze(-1)

# -----------------------------------------------------------------------------
# The reward model


# What score() returns (the callers of the released DiNa-LRM): raw; (raw + 10) / 10, its README's and demos'
# (INF:257,350); (raw + 12) / 10, the authors' GRPO reward. Affine: accuracies and GRPO's group advantages hardly change.
SCORE_NORMALISATIONS = {"raw": (0.0, 1.0), "plus10": (10.0, 10.0), "plus12": (12.0, 10.0)}


class RewardModel(nn.Module):
    """tap + head. forward(latents, t, prompt_embeds, pooled) -> (B,) float32 rewards.
    t_grid: None, or the sigmas a released DiNa-LRM reads (score() snaps t to them); normalisation: score()'s output."""

    def __init__(self, tap, head, kind):
        super().__init__()
        self.tap, self.head, self.kind = tap, head, kind
        self.t_grid, self.normalisation = None, "raw"

    def forward(self, latents, t, prompt_embeds, pooled):
        if self.kind == "drm":
            self.head.hw = tuple(latents.shape[-2:])
        return self.head(*self.tap(latents, t, prompt_embeds, pooled)).float()

    def snap(self, t):
        """t, or the nearest sigma of t_grid, as the authors' reader picks it (INF:92-102): 0.4 -> 0.400293."""
        if self.t_grid is None:
            return float(t)
        return float(self.t_grid[(self.t_grid - float(t)).abs().argmin()])

    def score(self, latents, prompt_embeds, pooled, t=0.4, ts=None, generator=None, noise=None):
        """Score clean latents: noise them to level t (or to each of ts, with the same noise for
        every level) and read the reward. Ensembling: DiNa concatenates the FiLM-ed tokens of all
        levels and runs its Q-Former once (paper Sec. 3.4); the other heads average the scores.
        noise: the (B,C,H,W) noise to use instead of drawing it from `generator`."""
        ts = [self.snap(s) for s in ([t] if ts is None else ts)]
        eps = noise if noise is not None else torch.randn(
            latents.shape, generator=generator, device=generator.device if generator else "cpu")
        eps = eps.to(latents.device, latents.dtype)
        full = lambda s: torch.full((latents.shape[0],), float(s), device=latents.device)
        if self.kind != "dina":
            r = torch.stack([self(add_noise(latents, full(s), eps), full(s), prompt_embeds, pooled) for s in ts]).mean(0)
        else:
            toks = [self.head.tokens(*self.tap(add_noise(latents, full(s), eps), full(s), prompt_embeds, pooled)) for s in ts]
            r = self.head.readout(torch.cat([v for v, _ in toks], 1), torch.cat([s for _, s in toks], 1)).float()
        shift, div = SCORE_NORMALISATIONS[self.normalisation]
        return (r + shift) / div


def build_reward_model(backbone, head, path=None, n_blocks=None, taps=None, lora_rank=0, full_finetune=False,
                       seed=0, combine="softmax", transformer=None, random_init=False, lora_alpha=None):
    """Load the backbone through diffusers, keep the needed blocks, attach a head, set what trains:
    LoRA on the attention projections (lora_rank > 0; scale lora_alpha / lora_rank, alpha = rank by default),
    everything (full_finetune), or only the head."""
    check_names(backbone, head)
    preset = BACKBONES[backbone]
    n_blocks = n_blocks or preset["blocks"][head]
    taps = tuple(taps or preset["taps"][head])
    if head == "drm":
        taps = (n_blocks,)  # DRM reads the last kept block
    transformer = transformer or load_transformer(backbone, path, seed, random_init=random_init)
    if head == "dina" and max(taps) == len(transformer.transformer_blocks):
        raise ValueError(f"dina reads the text stream, which the model's last block ({max(taps)}) does not output")
    tap = DiTTap(transformer, n_blocks, taps)
    torch.manual_seed(seed)
    if head == "dina":
        h = DinaHead(tap.width, len(taps))
    elif head == "drm":
        cfg = transformer.config
        h = DRMHead(transformer.norm_out, transformer.proj_out, cfg.patch_size, cfg.out_channels, preset["conv"])
    else:
        h = DiTRHead(tap.width, len(taps), preset["mlp"], combine)
    del transformer  # blocks beyond n_blocks (and the unused final layer) are freed with it
    tap.requires_grad_(full_finetune)
    if lora_rank > 0 and not full_finetune:
        from peft import LoraConfig, inject_adapter_in_model
        inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_alpha or lora_rank, target_modules=LORA_TARGETS), tap)
        for n, p in tap.named_parameters():
            p.requires_grad_("lora_" in n)
    return RewardModel(tap, h, head)

# -----------------------------------------------------------------------------
# Flow-matching math (SD3 convention: x_t = (1 - t) x0 + t eps, timestep = 1000 t)


def add_noise(x0, t, eps):
    t = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * eps


def sd3_sigmas(num_steps, shift=3.0, num_train_timesteps=1000):
    """== FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps).sigmas: a linspace
    from sigma_max (1) to the shifted sigma_min, shifted by s*t / (1 + (s-1)*t), then a final 0."""
    sh = lambda t: shift * t / (1 + (shift - 1) * t)
    t = torch.linspace(1.0, sh(1.0 / num_train_timesteps), num_steps, dtype=torch.float64)
    return torch.cat([sh(t), torch.zeros(1, dtype=torch.float64)]).float()


def x0_hat(x, sigma, v):
    """One-step prediction of the clean latent from x_sigma and the velocity: x0 = x - sigma * v."""
    return x - sigma * v


def gaussian_log_prob(x, mean, std):
    """log N(x; mean, std^2) in float32, averaged over all non-batch elements (Flow-GRPO) -> (B,)."""
    x, mean = x.float(), mean.float()
    lp = -((x - mean) ** 2) / (2 * std ** 2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.mean(dim=tuple(range(1, x.ndim)))


def draw_noise(shape, generator=None, device="cpu"):
    """Standard normal noise; generator may be a list, one per batch row (seeded per image, so a sample does
    not depend on how the batch is split over ranks or micro-batches)."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(shape[1:], generator=g) for g in generator]).to(device)
    return torch.randn(shape, generator=generator).to(device)


def sde_step(v, x, sigma, sigma_next, noise_level=0.7, prev_sample=None, generator=None, sigma1=None):
    """Flow-GRPO's SDE step with its log-probability (docs/design.md §6), dt = sigma_next - sigma < 0:
        std = a sqrt(sigma / (1 - sigma')), sigma' = sigma1 (= sigmas[1]) when sigma == 1, else sigma
        mu  = x + v dt + std^2 / (2 sigma) (x + (1 - sigma) v) dt;   x_next = mu + std sqrt(-dt) z
    -> (x_next, log_prob (B,), mu, std sqrt(-dt)). prev_sample given: it is x_next (training re-scores it).
    noise_level 0: the Euler step x + v dt, log_prob 0."""
    sigma, sigma_next = float(sigma), float(sigma_next)
    dt = sigma_next - sigma
    x, v = x.float(), v.float()
    if noise_level == 0:
        x_next = x + v * dt if prev_sample is None else prev_sample.float()
        return x_next, torch.zeros(x.shape[0], device=x.device), x + v * dt, 0.0
    if sigma == 1 and sigma1 is None:
        raise ValueError("sde_step at sigma = 1 needs sigma1 (sigmas[1] of the schedule)")
    s = sigma1 if sigma == 1 else sigma
    std = noise_level * math.sqrt(sigma / (1 - s))
    mu = x + v * dt + std ** 2 / (2 * sigma) * (x + (1 - sigma) * v) * dt
    scale = std * math.sqrt(-dt)
    x_next = mu + scale * draw_noise(x.shape, generator, x.device) if prev_sample is None else prev_sample.float()
    return x_next, gaussian_log_prob(x_next, mu, scale), mu, scale


def cps_step(v, x, sigma, sigma_next, noise_level=0.8, prev_sample=None, generator=None, sigma1=None):
    """Coefficients-preserving sampling (DiNa-LRM's GRPO recipe), same signature and returns as sde_step:
        std = sigma_next sin(a pi / 2),  mu = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) x1_hat
    with x0_hat = x - sigma v, x1_hat = x + (1 - sigma) v;  x_next = mu + std z. The log-prob is the true Gaussian
    density (Flow-GRPO's CPS code logs -(x_next - mu)^2 without its scaling, so its clip range has another scale).
    The last step (sigma_next = 0) has std 0: the Euler step, log_prob 0."""
    sigma, sigma_next = float(sigma), float(sigma_next)
    x, v = x.float(), v.float()
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    mu = (1 - sigma_next) * x0_hat(x, sigma, v) + math.sqrt(max(sigma_next ** 2 - std ** 2, 0.0)) * (x + (1 - sigma) * v)
    if std == 0:
        x_next = mu if prev_sample is None else prev_sample.float()
        return x_next, torch.zeros(x.shape[0], device=x.device), mu, 0.0
    x_next = mu + std * draw_noise(x.shape, generator, x.device) if prev_sample is None else prev_sample.float()
    return x_next, gaussian_log_prob(x_next, mu, std), mu, std


SDE_STEPS = {"sde": sde_step, "cps": cps_step}


def sde_children(step_fn, v, x, sigma, sigma_next, noise_level, k, generator=None, sigma1=None):
    """k successors of every state x (B,C,H,W) from its one velocity v (DRM's Step-wise Sampling and Step-GRPO): the
    same mean, k noise draws (image b's k draws from generator[b] in order, so k = 1 is step_fn's own sample bit for bit)
    -> (children (B,k,C,H,W), log_probs (B,k) under the shared mean, mu (B,C,H,W), the step's noise std)."""
    _, _, mu, std = step_fn(v, x, sigma, sigma_next, noise_level, prev_sample=x, sigma1=sigma1)
    if std == 0:  # an ODE step (a = 0, or CPS's last): k equal children
        return mu[:, None].expand(-1, k, *mu.shape[1:]), torch.zeros(len(x), k, device=x.device), mu, std
    children = mu[:, None] + std * draw_noise((len(x), k, *x.shape[1:]), generator, x.device)
    return children, children_log_prob(children, mu, std), mu, std


def children_log_prob(children, mu, std):
    """log-probs (B,k) of children (B,k,C,H,W) under N(mu (B,C,H,W), std^2), as gaussian_log_prob of each child."""
    k = children.shape[1]
    return gaussian_log_prob(children.flatten(0, 1), mu.repeat_interleave(k, 0), std).view(-1, k)


def velocity(transformer, x, sigma, prompt_embeds, pooled, guidance_scale=1.0, negative=None):
    """The generator's velocity at noise level sigma, (B,C,H,W) float32; CFG as diffusers' SD3 pipeline: one forward
    of [uncond; cond], v = v_u + w (v_c - v_u), the negative prompt's (embeds, pooled) broadcast over the batch."""
    t = torch.full((x.shape[0],), 1000 * float(sigma), device=x.device)
    if guidance_scale > 1:
        neg_pe, neg_pooled = (n.expand(len(x), *n.shape[1:]) for n in negative)
        v = transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]), return_dict=False,
                        encoder_hidden_states=torch.cat([neg_pe, prompt_embeds]),
                        pooled_projections=torch.cat([neg_pooled, pooled]))[0].float()
        v_u, v_c = v.chunk(2)
        return v_u + guidance_scale * (v_c - v_u)
    return transformer(hidden_states=x, timestep=t, encoder_hidden_states=prompt_embeds, pooled_projections=pooled,
                       return_dict=False)[0].float()


def sample(transformer, latents, sigmas, prompt_embeds, pooled, guidance_scale=1.0, negative=None, noise_level=0.0,
           sde_steps=None, generator=None, sde_type="sde"):
    """The sampling loop every alignment stage and evaluation share (docs/design.md §6).
    latents: the initial noise (B,C,H,W); sigmas: sd3_sigmas(N) (N+1 values); sde_steps: the stochastic step indices
    (None: all when noise_level > 0; the Flow-GRPO-Fast window otherwise); the other steps are Euler (ODE).
    -> dict(latents (B,C,H,W), trajectory (B,N+1,C,H,W), log_probs (B,N), 0 on ODE steps), float32.
    noise_level 0 reproduces StableDiffusion3Pipeline(..., output_type="latent") of the same transformer."""
    if sde_type not in SDE_STEPS:
        raise ValueError(f"unknown SDE type {sde_type!r}; choose {' or '.join(SDE_STEPS)}")
    n = len(sigmas) - 1
    stochastic = set(range(n) if sde_steps is None else sde_steps) if noise_level > 0 else set()
    x, traj, log_probs = latents.float(), [latents.float()], []
    for i in range(n):
        v = velocity(transformer, x, sigmas[i], prompt_embeds, pooled, guidance_scale, negative)
        a = noise_level if i in stochastic else 0.0
        x, lp, _, _ = SDE_STEPS[sde_type](v, x, sigmas[i], sigmas[i + 1], a, generator=generator, sigma1=float(sigmas[1]))
        traj.append(x)
        log_probs.append(lp)
    return dict(latents=x, trajectory=torch.stack(traj, 1), log_probs=torch.stack(log_probs, 1))


def prompt_noise(seed, prompt_key, rep, shape):
    """Evaluation noise shared by every image of one prompt, seeded by (seed, prompt, repeat): the two
    images of a pair get the same noise, independent of batching, order and world size.
    prompt_key: data.py's sha1 key of the prompt (hex)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + rep * 7_919 + int(prompt_key[:12], 16)) % 2 ** 63)
    return torch.randn(shape, generator=g)


def shift_t(t, s):
    """SD3's resolution shift of a noise level (Esser et al. 2024, Sec. 5.3.2): s t / (1 + (s - 1) t).
    s > 1 moves t toward noise (SD3.5 samples 1024px with s = 3); s < 1 toward clean, for latents
    smaller than the ones a recipe was tuned on: the same t destroys more of a small latent."""
    return s * t / (1 + (s - 1) * t)


def sample_t(n, mode="uniform", generator=None, mu=0.0, s=1.0, t_fixed=0.4, shift=1.0):
    """Training noise levels: uniform U(0,1) (DiNa default), logit-normal(mu, s), or fixed t*;
    the first two then shifted by shift_t(., shift) (shift 1 = unchanged)."""
    if mode == "uniform":
        return shift_t(torch.rand(n, generator=generator), shift)
    if mode == "logit-normal":
        return shift_t(torch.sigmoid(mu + s * torch.randn(n, generator=generator)), shift)
    if mode == "fixed":
        return torch.full((n,), float(t_fixed))
    raise ValueError(f"unknown t-sampling {mode!r}; choose uniform, logit-normal or fixed")

def seeded(*keys):
    """A torch.Generator seeded by a tuple of non-negative ints (seed, iteration, image, ...): the same image gets the
    same noise whatever the batching, rank or world size."""
    s = 0
    for k in keys:
        s = (s * 1_000_003 + int(k) + 1) % 2 ** 63
    return torch.Generator().manual_seed(s)

# -----------------------------------------------------------------------------
# Losses (docs/design.md §5); r_pos, r_neg (B,) rewards of the preferred / other image


def bt_loss(r_pos, r_neg, y=None):
    """Bradley-Terry: -log sigmoid(r+ - r-); a soft label y gives the cross-entropy with y."""
    d = r_pos - r_neg
    if y is None:
        return -F.logsigmoid(d).mean()
    return -(y * F.logsigmoid(d) + (1 - y) * F.logsigmoid(-d)).mean()


def grpo_loss(log_prob, old_log_prob, adv, clip_range, mean=None, mean_ref=None, std=None, beta=0.0):
    """Flow-GRPO's clipped policy loss max(-A r, -A clip(r, 1 +- eps)), r = exp(log_prob - old), per sample (grpo.py,
    step_grpo.py), and the KL of two Gaussians with one std, mean((mu - mu_ref)^2) / (2 std^2) -> (loss, kl, ratio)."""
    ratio = torch.exp(log_prob - old_log_prob)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range))
    kl = torch.zeros_like(loss)
    if beta > 0:
        kl = ((mean - mean_ref) ** 2).mean(dim=tuple(range(1, mean.ndim))) / (2 * std ** 2)
        kl = kl.view(-1, *([1] * (loss.ndim - 1))).expand_as(loss)  # log_prob (B,k): each child gets its parent's KL
    return loss + beta * kl, kl, ratio


def thurstone_loss(r_pos, r_neg, t, k=2.0, sigma_u=0.1, y=None):
    """Noise-calibrated Thurstone with the fidelity loss (DiNa-LRM Eq. 6-8): per-item variance
    s2(t) = k t^2 + sigma_u^2, p = Phi(d / sqrt(2 s2)), loss = 1 - sqrt(y p + (1-y)(1-p))."""
    s2 = k * t ** 2 + sigma_u ** 2
    p = 0.5 * (1 + torch.erf((r_pos - r_neg) / torch.sqrt(2 * s2) / math.sqrt(2)))  # standard normal CDF
    y = torch.ones_like(p) if y is None else y
    return (1 - torch.sqrt((y * p + (1 - y) * (1 - p)).clamp_min(1e-12))).mean()

# -----------------------------------------------------------------------------
# Checkpoints: one safetensors file (weights, EMA, optimizer tensors) with the JSON metadata in
# its header, written to a temp file and renamed, so a crash mid-write leaves the old one intact.


def atomic_write(path, write):
    """write(tmp) into a temp file of path's folder, then rename it to path: a killed run never leaves a half-written
    file under the real name (every checkpoint, cache shard, result and figure of the project is written this way)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, tensors, meta):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"meta": json.dumps(meta)}))


def load_checkpoint(path):
    """-> (tensors, meta). Plain safetensors: nothing is unpickled."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no checkpoint there")
    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "null") or "null")
        if not isinstance(meta, dict) or "args" not in meta:
            raise ValueError(f"{path}: not a reward-model checkpoint (no args in its metadata)")
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def trainable_state(model):
    """Unwrapped names (no module./_orig_mod. prefixes) of what trains: head (+ LoRA / backbone)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def cast_frozen(model, dtype=torch.bfloat16):
    """Store the weights that do not train in `dtype` (bf16 on GPU, under autocast: half the memory and no
    per-step cast of the frozen backbone); what trains (LoRA, head, or all in a full fine-tune) stays float32."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    return model


def check_tensors(path, got, want):
    """got {name: tensor} must hold exactly the names of want {name: shape}, at those shapes; else a one-line error
    naming the first tensor missing, unexpected or of the wrong shape (never a silent partial load)."""
    if not isinstance(got, dict):
        raise ValueError(f"{path}: holds a {type(got).__name__}, not a dict of tensors")
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing:
        raise ValueError(f"{path}: missing tensor {missing[0]} of shape {tuple(want[missing[0]])} ({len(missing)} missing)")
    if extra:
        raise ValueError(f"{path}: unexpected tensor {extra[0]} ({len(extra)} unexpected)")
    for k, shape in want.items():
        if not isinstance(got[k], torch.Tensor) or got[k].shape != shape:
            raise ValueError(f"{path}: {k} has shape {tuple(getattr(got[k], 'shape', ()))}, expected {tuple(shape)}")


def reward_model_from_args(path, a, transformer=None, expect=None):
    """The RewardModel a checkpoint's args describe, its weights not yet loaded. expect: optional dict of args the
    caller requires (e.g. head, backbone) -> a one-line error naming path on a mismatch."""
    for k, v in (expect or {}).items():
        if v is not None and a.get(k) != v:
            raise ValueError(f"{path}: checkpoint has {k}={a.get(k)!r}, but {v!r} was asked for")
    return build_reward_model(a["backbone"], a["head"], a.get("backbone_path"), a.get("blocks"), a.get("taps"),
                              a.get("lora_rank", 0), a.get("full_finetune", False), a.get("seed", 0),
                              a.get("combine", "softmax"), transformer, a.get("random_backbone", False), a.get("lora_alpha"))


def load_weights(model, state, normalisation="raw"):
    """Checked {name: tensor} into the model (assign: also onto a backbone built on the meta device, where only what is
    loaded is real); normalisation: what score() returns, a key of SCORE_NORMALISATIONS -> the model in eval mode."""
    if normalisation not in SCORE_NORMALISATIONS:
        raise ValueError(f"unknown score normalisation {normalisation!r}; choose one of {list(SCORE_NORMALISATIONS)}")
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False, assign=True)
    model.normalisation = normalisation
    return model.eval()


def load_reward_model(path, ema=True, transformer=None, expect=None, normalisation="raw"):
    """Rebuild a RewardModel from a train_reward.py checkpoint (a file, or a run folder holding ckpt.safetensors), EMA
    weights by default, each tensor checked (check_tensors) -> (model, meta). A released DiNa-LRM folder is read by
    released.load_reward, which also reads these."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.safetensors")
    tensors, meta = load_checkpoint(path)
    model = reward_model_from_args(path, meta["args"], transformer, expect)
    prefix = "ema." if ema and any(k.startswith("ema.") for k in tensors) else "model."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    check_tensors(path, state, {n: p.shape for n, p in trainable_state(model).items()})
    return load_weights(model, state, normalisation), meta
