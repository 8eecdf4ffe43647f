"""
The released DiNa-LRM folder (liuhuohuo/DiNa-LRM-SD35M-12layers, the one released latent reward model), both ways:
read it into our dina RewardModel (load_reward, which reads our own checkpoints too), and write one of ours
in its layout (export), so that the authors' own reader loads a model trained here.

    <root>/config.json                     the training config dump; its model.* keys give the taps, blocks and LoRA
    <root>/checkpoint/rm_head.pt           torch.save(RewardHead.state_dict()): 87 tensors, bf16 (ENG:491-492)
    <root>/checkpoint/backbone_lora/       peft's save_pretrained of the LoRA'd backbone (ENG:484-490):
        adapter_config.json                r 64, lora_alpha 128 (scale 2), the 8 target names of model.LORA_TARGETS
        adapter_model.safetensors          288 tensors: lora_A (64, 1536), lora_B (1536, 64) of 12 projections x 12 blocks

Reading follows the authors' reader (DRMInferencer, INF:54-159), but strictly: each file must hold exactly the
model's tensors at their shapes, or a one-line error names the first that is missing, unexpected or misshapen (peft's
load_adapter only reports missing keys, and INF ignores the report). rm_head.pt is read with torch.load(weights_only=
True): tensors and plain containers, nothing else is unpickled. The released model's conventions: the noise level
snapped to the nearest of the 1000 sigmas of SD3.5-M's shift-3 scheduler (INF:92-102: u = 0.4 reads sigma 0.400293,
timestep 400.2933), 77 + 128 = 205 text tokens (SD3RM:298). Its callers' output normalisations are
model.SCORE_NORMALISATIONS (eval_reward.py and the alignment stages: --score-normalisation).

    python eval_reward.py --ckpt /path/to/DiNa-LRM-SD35M-12layers --bench hpdv3/test=/data/HPDv3/test.json ...
    python eval_reward.py --ckpt out/reward-sd35m-dina --export-released out/dina-released

Citations: files of HKUST-C4G/diffusion-rm at af485b4: RH diffusion_rm/models/reward_head.py, SD3RM
diffusion_rm/models/sd3_rm.py, ENG diffusion_rm/train/engine.py, TR diffusion-rm/scripts/train_sd3.py, INF diffusion_rm/infer/inference.py.
It sits above model.py (which imports neither this file nor toy.py): whatever names a reward on the command line
(--ckpt, --reward) is opened by load_reward here, which hands our own checkpoints to model.load_reward_model.
"""

import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file

from model import BACKBONES, LORA_TARGETS, check_tensors, load_reward_model, load_weights, reward_model_from_args

# Our args for a released folder, where its config.json says nothing: SD3.5-M; t_eval 0.4, the noise level of the
# authors' README for pipeline latents, of their demos and of their GRPO reward (reward()'s default is 0.1); 128 T5
# tokens after the 77 CLIP ones, as in training (their demos use 256: with no attention mask, padding changes scores).
RELEASED_ARGS = dict(backbone="sd35m", head="dina", seed=0, t_eval=0.4, max_text_len=128, lora_rank=0)


def lora_names(tap):
    """{our tap's LoRA tensor name: its name in adapter_model.safetensors}. peft wrapped the authors' backbone module,
    whose blocks are transformer_blocks (hence base_model.model.), and drops the adapter name on save:
    blocks.3.attn2.to_q.lora_A.default.weight <-> base_model.model.transformer_blocks.3.attn2.to_q.lora_A.weight"""
    return {n: "base_model.model.transformer_" + n.replace(".default.", ".") for n in tap.state_dict() if "lora_" in n}


def sigma_grid():
    """The 1000 sigmas the released model was trained and is read at: SD3.5-M's scheduler (shift 3) as constructed,
    never set_timesteps (INF:70-71, TR:73): sigma = 3 s / (1 + 2 s) for s = 1, 0.999, ..., 0.001; timestep = 1000 sigma."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas.float()


def need(path):
    """path, or a one-line error saying what the folder should hold."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found (a released DiNa-LRM folder holds config.json, checkpoint/rm_head.pt "
                                "and checkpoint/backbone_lora/)")
    return path


def check_config(path, checks):
    """checks: (key, value found, value this loader reads) -> a one-line error naming the first key that differs."""
    for key, got, want in checks:
        if got != want:
            raise ValueError(f"{path}: {key} is {got!r}; this loader reads {want!r} there (the released DiNa-LRM's)")


def read_args(root):
    """config.json (and adapter_config.json, the LoRA config peft's load_adapter reads, INF:150) -> our args. Only the
    keys the authors' reader uses count (SD3RM:152-286, INF:74); an option our dina head does not have is an error.
    An exported folder's "latent_reward" entry gives back our own args (backbone, noise level, text length)."""
    path = need(os.path.join(root, "config.json"))
    with open(path) as f:
        cfg = json.load(f)
    m = cfg.get("model", {})
    head, lora = m.get("reward_head", {}), bool(m.get("use_lora"))
    released_head = dict(width=-1, use_proj_in=False, out_dim=1, num_queries=4, num_attn_heads=8)  # also RH's defaults
    check_config(path, [("model.use_text_features", m.get("use_text_features"), True),
                        ("model.use_logistic", m.get("use_logistic", False), False),
                        ("model.freeze_backbone", m.get("freeze_backbone"), not lora),
                        ("model.text_head_idx", m.get("text_head_idx"), m.get("visual_head_idx")),
                        ("training.add_noise", cfg.get("training", {}).get("add_noise", True), True)]
                 + [(f"model.reward_head.{k}", head.get(k, v), v) for k, v in released_head.items()])
    if not isinstance(m.get("num_transformer_layers"), int) or not m.get("visual_head_idx"):
        raise ValueError(f"{path}: model.num_transformer_layers and model.visual_head_idx are required")
    args = RELEASED_ARGS | dict(backbone_path=m.get("backbone_model_id"), blocks=m["num_transformer_layers"],
                                taps=list(m["visual_head_idx"]))
    if lora:
        path = need(os.path.join(root, "checkpoint", "backbone_lora", "adapter_config.json"))
        with open(path) as f:
            c = json.load(f)
        check_config(path, [("target_modules", sorted(c.get("target_modules") or []), sorted(LORA_TARGETS)),
                            ("use_rslora", c.get("use_rslora", False), False), ("use_dora", c.get("use_dora", False), False),
                            ("rank_pattern", c.get("rank_pattern") or {}, {}), ("alpha_pattern", c.get("alpha_pattern") or {}, {})])
        args.update(lora_rank=c["r"], lora_alpha=c["lora_alpha"])
    return args | cfg.get("latent_reward", {})


def is_released(path):
    """A released DiNa-LRM folder holds a config.json; our run folders hold ckpt.safetensors."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def load_reward(path, ema=True, transformer=None, expect=None, normalisation="raw"):
    """Any reward a --ckpt or --reward names -> (RewardModel, meta): a released DiNa-LRM folder, read as the authors'
    reader reads it (its tensors checked by name and shape, t snapped to its sigma grid), or a train_reward.py
    checkpoint (model.load_reward_model; ema picks its EMA weights)."""
    if not is_released(path):
        return load_reward_model(path, ema, transformer, expect, normalisation)
    meta = dict(args=read_args(path), step=None)
    model = reward_model_from_args(path, meta["args"], transformer, expect)
    state = read_state(path, model)
    model.t_grid = sigma_grid()
    return load_weights(model, state, normalisation), meta


def read_state(root, model):
    """rm_head.pt and adapter_model.safetensors -> {our name: tensor} for `model` (built from read_args), each file
    holding exactly the model's tensors at their shapes: the head's 87 and, with LoRA, the adapter's 288."""
    path = need(os.path.join(root, "checkpoint", "rm_head.pt"))
    head = torch.load(path, weights_only=True, map_location="cpu")  # a plain state_dict, saved from CUDA (INF:158)
    check_tensors(path, head, {k: v.shape for k, v in model.head.state_dict().items()})
    state = {f"head.{k}": v for k, v in head.items()}
    names = lora_names(model.tap)
    if names:
        path = need(os.path.join(root, "checkpoint", "backbone_lora", "adapter_model.safetensors"))
        lora, shapes = load_file(path), {n: p.shape for n, p in model.tap.state_dict().items()}
        check_tensors(path, lora, {r: shapes[n] for n, r in names.items()})
        state.update({f"tap.{n}": lora[r] for n, r in names.items()})
    return state


def export(model, meta, folder):
    """Write a dina RewardModel (head, and LoRA or a frozen backbone) into a new folder in the released layout:
    config.json with the model.* keys the authors' reader uses, plus our args under "latent_reward" (it ignores them;
    read_args restores them); rm_head.pt, torch.save of a plain dict of tensors; backbone_lora/ as peft writes it
    (adapter_config.json by LoraConfig.save_pretrained, adapter_model.safetensors with metadata format pt). float32
    tensors (the released ones are bf16; the authors' loaders cast on load). Written to a temp folder, then renamed."""
    a = meta["args"]
    if model.kind != "dina":
        raise ValueError(f"the released layout holds a dina head; this checkpoint's head is {model.kind}")
    if a.get("full_finetune"):
        raise ValueError("the released layout holds a LoRA (or nothing) for the backbone; a --full-finetune "
                         "checkpoint's tuned blocks do not fit it")
    if os.path.exists(folder):
        raise FileExistsError(f"{folder}: exists; export into a new folder")
    names, rank, taps = lora_names(model.tap), a.get("lora_rank", 0), list(model.tap.taps)
    alpha = a.get("lora_alpha") or rank
    cfg = dict(model=dict(backbone_model_id=a.get("backbone_path") or BACKBONES[a["backbone"]]["path"],
                          num_transformer_layers=len(model.tap.blocks), visual_head_idx=taps, text_head_idx=taps,
                          use_lora=bool(names), freeze_backbone=not names, use_text_features=True, use_t_embed=True,
                          use_logistic=False, lora_config=dict(r=rank, lora_alpha=alpha, init_lora_weights="gaussian"),
                          reward_head=dict(use_proj_in=False, width=-1, out_dim=1, num_queries=model.head.query_tokens.shape[1],
                                           num_attn_heads=model.head.attn1.heads, dropout=0.0)),
               training=dict(add_noise=True),
               latent_reward={k: a.get(k) for k in ("backbone", "backbone_path", "seed", "random_backbone", "t_eval",
                                                    "max_text_len", "resolution")})
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".released_tmp_")
    try:
        os.makedirs(os.path.join(tmp, "checkpoint"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=4)
        torch.save({k: v.float().cpu() for k, v in model.head.state_dict().items()}, os.path.join(tmp, "checkpoint", "rm_head.pt"))
        if names:
            from peft import LoraConfig
            lora_dir = os.path.join(tmp, "checkpoint", "backbone_lora")
            LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS, init_lora_weights="gaussian").save_pretrained(lora_dir)
            tap = model.tap.state_dict()
            save_file({r: tap[n].float().cpu().contiguous() for n, r in names.items()},
                      os.path.join(lora_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
