"""The model zoos of benchmarks/coverage.py: which models each family holds, and how to build one with the
inputs of one training step.

Every model is built from code or configuration alone, randomly initialised (no weights are downloaded):

* torchvision: ``get_model(name, weights=None)`` (and ``weights_backbone=None``) for classification,
  segmentation, video, optical flow and detection. Detectors are trained with targets: a list of images and
  a list of target dicts (boxes, labels, and masks or keypoints where the model needs them).
* Hugging Face transformers: every architecture with a causal-LM, masked-LM, seq2seq or image-classification
  head, from its configuration class with the sizes shrunk by ``shrink_config`` (2 layers, width 64, 4
  heads, vocabulary 1000, few experts, small images), built by ``AutoModelFor*.from_config``.
* timm (when installed): one small model per family, ``timm.create_model(name, pretrained=False)``.

``build(family, name)`` returns ``(model, inputs)``, where ``inputs`` is what ``memtrace.report(inputs=...)``
takes: a tensor (one positional argument), a tuple (positional arguments, each a tensor or a nested
list/tuple/dict of tensors) or a dict (keyword arguments). The tensors are real, so that the same inputs
can drive the real step.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

BATCH = 2
SEQ = 32  # tokens per sequence (the input of every language model)
TARGET_SEQ = 16  # tokens per label sequence of a seq2seq model
IMAGE = 224  # torchvision classification
SEGMENTATION_IMAGE = 128
VIDEO = (8, 112, 112)  # frames, height, width
FLOW_IMAGE = 128  # RAFT: two images of this size
DETECTION_IMAGE = 320
DETECTION_BOXES = 3  # objects per image
HF_IMAGE = 64  # the image size of a shrunk Hugging Face vision model

FAMILIES = {
    "torchvision-classification": "torchvision.models",
    "torchvision-segmentation": "torchvision.models.segmentation",
    "torchvision-video": "torchvision.models.video",
    "torchvision-optical-flow": "torchvision.models.optical_flow",
    "torchvision-detection": "torchvision.models.detection",
    "hf-causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "hf-masked-lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "hf-seq2seq": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "hf-image-classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "timm": "timm",
}

# one small model per timm family, at its default input size
TIMM_MODELS = (
    "resnet18", "resnetv2_18", "resnest14d", "res2net50_14w_8s", "skresnet18", "cspresnet50", "nfnet_l0",
    "densenet121", "dpn48b", "hrnet_w18_small", "ese_vovnet19b_dw", "regnetx_002", "rexnet_100", "hgnetv2_b0",
    "efficientnet_b0", "mobilenetv3_small_050", "mobilenetv4_conv_small", "ghostnetv2_100", "lcnet_050",
    "repvit_m1", "mobileone_s0", "fastvit_t8", "starnet_s1", "convnext_atto", "inception_next_atto",
    "mambaout_femto", "vit_tiny_patch16_224", "deit_tiny_patch16_224", "eva02_tiny_patch14_224",
    "cait_xxs24_224", "xcit_nano_12_p16_224", "crossvit_tiny_240", "volo_d1_224", "mixer_s32_224",
    "resmlp_12_224", "sequencer2d_s", "poolformerv2_s12", "swin_tiny_patch4_window7_224",
    "swinv2_cr_tiny_ns_224", "maxvit_pico_rw_256", "coatnet_nano_rw_224", "coat_lite_tiny", "levit_128s",
    "mobilevit_xxs", "efficientformer_l1", "edgenext_xx_small", "pvt_v2_b0", "gcvit_xxtiny", "davit_tiny",
    "focalnet_tiny_srf", "hiera_tiny_224", "tiny_vit_5m_224", "efficientvit_b0",
)


def family_models(family: str) -> list[str]:
    """The model names of ``family``, in a stable order."""
    if family.startswith("torchvision-"):
        import importlib

        import torchvision

        module = importlib.import_module(FAMILIES[family])
        return sorted(torchvision.models.list_models(module=module))
    if family.startswith("hf-"):
        from transformers.models.auto import modeling_auto

        return sorted(getattr(modeling_auto, FAMILIES[family]))
    if family == "timm":
        try:
            import timm
        except ImportError:
            return []
        available = set(timm.list_models())
        return [name for name in TIMM_MODELS if name in available]
    raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")


def build(family: str, name: str) -> tuple[torch.nn.Module, Any]:
    """``(model, inputs)`` for one training step of model ``name`` of ``family``."""
    if family.startswith("torchvision-"):
        return build_torchvision(family, name)
    if family.startswith("hf-"):
        return build_hf(family, name)
    if family == "timm":
        return build_timm(name)
    raise ValueError(f"unknown family {family!r}")


# ---- torchvision -----------------------------------------------------------------------------------------

# models whose input must be larger than the family's default
TORCHVISION_IMAGE_SIZE = {"inception_v3": 299}
# the video models built for one clip size: S3D's final pooling and MViT's position embeddings
TORCHVISION_VIDEO_SIZE = {"s3d": (16, 224, 224), "mvit_v1_b": (16, 224, 224), "mvit_v2_s": (16, 224, 224)}


def build_torchvision(family: str, name: str) -> tuple[torch.nn.Module, Any]:
    import torchvision

    kwargs: dict[str, Any] = {"weights": None}
    if family in ("torchvision-segmentation", "torchvision-detection"):
        kwargs["weights_backbone"] = None
    if family == "torchvision-detection" and any(k in name for k in ("rcnn", "retinanet", "fcos")):
        kwargs.update(min_size=DETECTION_IMAGE, max_size=DETECTION_IMAGE)  # no resizing to 800 pixels
    model = torchvision.models.get_model(name, **kwargs)
    if family == "torchvision-classification":
        size = TORCHVISION_IMAGE_SIZE.get(name, IMAGE)
        return model, torch.randn(BATCH, 3, size, size)
    if family == "torchvision-segmentation":
        return model, torch.randn(BATCH, 3, SEGMENTATION_IMAGE, SEGMENTATION_IMAGE)
    if family == "torchvision-video":
        return model, torch.randn(BATCH, 3, *TORCHVISION_VIDEO_SIZE.get(name, VIDEO))
    if family == "torchvision-optical-flow":
        shape = (BATCH, 3, FLOW_IMAGE, FLOW_IMAGE)
        return model, (torch.randn(shape), torch.randn(shape))
    images = [torch.rand(3, DETECTION_IMAGE, DETECTION_IMAGE) for _ in range(BATCH)]
    targets = [detection_target(name, DETECTION_IMAGE) for _ in range(BATCH)]
    return model, (images, targets)


def detection_target(name: str, size: int, k: int = DETECTION_BOXES) -> dict[str, torch.Tensor]:
    """Valid targets for one image: ``k`` boxes (x1 < x2, y1 < y2) with labels, plus masks for Mask R-CNN
    and visible keypoints for Keypoint R-CNN."""
    xy = torch.rand(k, 2) * size * 0.6
    wh = torch.rand(k, 2) * size * 0.3 + size * 0.05
    boxes = torch.cat([xy, xy + wh], dim=1)
    classes = 2 if "keypointrcnn" in name else 10  # Keypoint R-CNN: background and person
    target = {"boxes": boxes, "labels": torch.randint(1, classes, (k,), dtype=torch.int64)}
    if "maskrcnn" in name:
        masks = torch.zeros(k, size, size, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[i, y1:y2, x1:x2] = 1
        target["masks"] = masks
    if "keypointrcnn" in name:
        frac = torch.rand(k, 17, 2)
        points = boxes[:, None, :2] + frac * (boxes[:, None, 2:] - boxes[:, None, :2])
        target["keypoints"] = torch.cat([points, torch.ones(k, 17, 1)], dim=2)
    return target


# ---- timm ------------------------------------------------------------------------------------------------

def build_timm(name: str) -> tuple[torch.nn.Module, Any]:
    import timm

    model = timm.create_model(name, pretrained=False)
    channels, height, width = model.pretrained_cfg.get("input_size", (3, 224, 224))
    return model, torch.randn(BATCH, channels, height, width)


# ---- Hugging Face ----------------------------------------------------------------------------------------
#
# The shrinker works on a configuration's fields by name, for every architecture alike: it lowers the counts
# and sizes a configuration has (never raising one), keeps the ratios that must hold (head dims, grouped
# key/value heads, state-space head dims), keeps one layer of each kind a model mixes (attention types,
# dense and sparse MLPs, hybrid blocks) and remaps what refers to layers by index. Fields the configuration
# derives from others are left for it to derive again.

HF_AUTO_CLASS = {
    "hf-causal-lm": "AutoModelForCausalLM",
    "hf-masked-lm": "AutoModelForMaskedLM",
    "hf-seq2seq": "AutoModelForSeq2SeqLM",
    "hf-image-classification": "AutoModelForImageClassification",
}

LAYERS = 2
WIDTH = 64
HEADS = 4
FFN = 128
VOCAB = 1000
EXPERTS = 4
TOP_K = 2
MAX_POSITIONS = 512
MAX_LAYERS = 6  # layers kept when a model mixes many kinds

LAYER_FIELDS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers",
                "num_encoder_layers", "num_decoder_layers", "depth", "num_self_attends_per_block", "num_blocks",
                "speech_encoder_layers", "num_hidden_groups")
WIDTH_FIELDS = ("hidden_size", "d_model", "n_embd", "embed_dim", "dim", "emb_dim", "embedding_dim",
                "word_embed_proj_dim", "embedding_size", "d_latents", "lru_width", "adapter_in_dim",
                "adapter_out_dim", "adapter_input_size", "hidden_size_global", "audio_hidden_size")
HEAD_FIELDS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads",
               "decoder_attention_heads", "num_self_attention_heads", "num_cross_attention_heads")
KV_HEAD_FIELDS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num", "kv_n_heads")
HEAD_DIM_FIELDS = ("head_dim", "d_kv", "d_head", "kv_channels", "attention_head_dim", "attention_head_size")
FFN_FIELDS = ("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff", "d_inner",
              "ffn_hidden_size", "n_inner", "dim_ff", "dff", "feed_forward_size",
              "speech_encoder_intermediate_size", "mlp_only_intermediate_size")
SMALL = {
    **{f: FFN // 2 for f in ("moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size",
                            "shared_experts_intermediate_size", "first_dense_intermediate_size",
                            "expert_intermediate_size")},
    **{f: EXPERTS for f in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")},
    **{f: TOP_K for f in ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "moe_top_k",
                          "top_k_experts")},
    **{f: 1 for f in ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts", "n_group",
                      "num_expert_group", "topk_group", "first_k_dense_replace", "num_dense_layers",
                      "mamba_n_groups", "n_groups", "mamba_ngroups", "num_nextn_predict_layers", "num_mem_blocks")},
    "vocab_size": VOCAB, "encoder_hash_byte_group_vocab": VOCAB,
    **{f: MAX_POSITIONS for f in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len",
                                  "original_max_position_embeddings", "max_source_positions",
                                  "max_target_positions")},
    # multi-head latent attention (DeepSeek) and its sparse indexer
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "index_head_dim": 16, "index_n_heads": HEADS, "index_num_heads": HEADS // 2,
    # linear attention (Qwen3-Next, Kimi)
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": HEADS, "linear_head_dim": 16, "linear_num_heads": HEADS,
    # state-space layers
    "state_size": 16, "mamba_d_state": 16, "time_step_rank": 8, "mamba_dt_rank": 8, "mamba_n_heads": HEADS,
    "n_mamba_heads": 2,
    # Perceiver latents, CLIP-style projections, Reformer chunks
    "num_latents": 32, "projection_dim": WIDTH, "local_attn_chunk_length": 16, "lsh_attn_chunk_length": 16,
    "adapter_rank": 16, "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": VOCAB,
}
# the few architectures that do not run at the generic sizes
HF_FIXED = {
    "xlstm": {"hidden_size": 128, "embedding_dim": 128},  # its mLSTM state needs a qk head dim over 8
    "zamba": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"]},  # a shared
    # block is tied across its hybrid layers, so it needs two of them
    "granitemoehybrid": {"layer_types": ["linear_attention", "attention"]},  # defaults: Mamba layers only
    "perceiver": {"max_position_embeddings": SEQ},  # its masked-LM decoder queries every position
    "encoder-decoder": {"pad_token_id": 0},  # needed to derive the decoder's inputs from the labels
}
TOKEN_ID_SUFFIXES = ("_token_id", "_token_index", "_token_ids")
PER_LAYER_CONFIG = "per_layer_config"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sub_configs(config) -> dict[str, Any]:
    """The configuration's nested configurations (text, vision, encoder, ...), by field name."""
    subs = {}
    names = set(getattr(config, "sub_configs", None) or {})
    names |= {k for k, v in vars(config).items() if hasattr(v, "to_diff_dict") and hasattr(v, "model_type")}
    for name in sorted(names):
        value = getattr(config, name, None)
        if value is not None and hasattr(value, "to_dict"):
            subs[name] = value
    return subs


def _layer_count(fields: dict[str, Any]) -> int | None:
    return next((fields[f] for f in LAYER_FIELDS if _is_int(fields.get(f)) and fields[f] > 0), None)


def _per_layer_lists(fields: dict[str, Any], n: int) -> dict[str, list]:
    return {k: v for k, v in fields.items()
            if isinstance(v, list) and len(v) == n and k != "depths" and n > 1
            and all(x is None or isinstance(x, (str, int, float)) for x in v)}


def _index_lists(fields: dict[str, Any], n: int, per_layer: dict[str, list]) -> dict[str, list]:
    """Lists of layer indices (``attn_layer_indices``, ``hybrid_layer_ids``, ``mlp_only_layers``, ...)."""
    out = {}
    for k, v in fields.items():
        if k in per_layer or not isinstance(v, list) or not v or not all(_is_int(x) for x in v):
            continue
        if k.endswith(("_layers", "_layer_ids", "_layer_indices", "_idxs")) and all(0 <= x < n for x in v):
            out[k] = v
    return out


def _layer_plan(fields: dict[str, Any]) -> list[int] | None:
    """The original layers to keep: the first, and the first of each kind a per-layer list, an index list
    or ``per_layer_config`` sets apart; at least ``LAYERS`` of them."""
    n = _layer_count(fields)
    if not n or n <= LAYERS:
        return None
    per_layer = _per_layer_lists(fields, n)
    keep = {0}
    for values in per_layer.values():
        for value in dict.fromkeys(map(str, values)):
            keep.add([str(x) for x in values].index(value))
    for values in _index_lists(fields, n, per_layer).values():
        keep.add(values[0])
    layer_config = fields.get(PER_LAYER_CONFIG)
    if isinstance(layer_config, dict) and layer_config:
        keep.add(min(int(k) for k in layer_config))
    if any(all(x == "mlp" for x in v[1::2]) for v in per_layer.values()):  # attention and MLP blocks in pairs
        keep = {j for i in keep for j in (i - i % 2, i - i % 2 + 1)}
    plan = sorted(keep)[:MAX_LAYERS]
    extra = (i for i in range(n) if i not in keep)
    while len(plan) < LAYERS:
        plan.append(next(extra))
    return sorted(plan)


def _apply_plan(fields: dict[str, Any], plan: list[int], out: dict[str, Any]) -> None:
    n = _layer_count(fields)
    per_layer = _per_layer_lists(fields, n)
    position = {old: new for new, old in enumerate(plan)}
    for name in LAYER_FIELDS:
        if _is_int(fields.get(name)) and fields[name] == n:
            out[name] = len(plan)
    for name, values in per_layer.items():
        kept = [values[i] for i in plan]
        if name.endswith("_layers") and all(_is_int(x) and 0 <= x < n for x in values):  # layer -> source layer
            kept = [position.get(x, new) for new, x in enumerate(kept)]
        out[name] = kept
    for name, values in _index_lists(fields, n, per_layer).items():
        out[name] = [position[x] for x in values if x in position]
    layer_config = fields.get(PER_LAYER_CONFIG)
    if isinstance(layer_config, dict):
        width = max((len(k) for k in layer_config), default=1)
        out[PER_LAYER_CONFIG] = {f"{position[int(k)]:0{width}d}": {**v, **_scalar_overrides(v)}
                                 for k, v in layer_config.items() if int(k) in position}


def _scalar_overrides(fields: dict[str, Any]) -> dict[str, Any]:
    """Lowered sizes and counts: widths, heads, head dims, feed-forward sizes, experts, vocabulary."""
    out: dict[str, Any] = {}

    def put(name: str, target: int) -> None:
        if _is_int(fields.get(name)) and fields[name] > target:
            out[name] = target

    hierarchical = isinstance(fields.get("depths"), (list, tuple))  # stages: widths and heads per stage
    per_stage_heads = any(isinstance(fields.get(f), (list, tuple)) for f in HEAD_FIELDS)
    if not hierarchical:
        for name in LAYER_FIELDS:
            put(name, LAYERS)
    if not hierarchical and not per_stage_heads:
        for name in WIDTH_FIELDS:
            put(name, WIDTH)
        heads = {name: fields[name] for name in HEAD_FIELDS if _is_int(fields.get(name))}
        for name in heads:
            put(name, HEADS)
        n_heads = min(list(heads.values()) + [HEADS])
        most = max(heads.values(), default=HEADS)
        for name in KV_HEAD_FIELDS:
            kv = fields.get(name)
            if _is_int(kv) and kv > 0:
                out[name] = n_heads if kv >= most else (1 if kv == 1 else max(1, n_heads // 2))
        head_dim = WIDTH // n_heads
        for name in HEAD_DIM_FIELDS:
            put(name, head_dim)
        put("rotary_dim", head_dim // 2)
    for name in FFN_FIELDS:
        put(name, FFN)
    for name, target in SMALL.items():
        put(name, target)
    return out


def _special_overrides(fields: dict[str, Any], out: dict[str, Any], family: str) -> None:
    """What a few layouts need beyond the generic rules."""
    width = out.get("hidden_size", fields.get("hidden_size"))
    # state-space heads: expand x width = heads x head dim
    for expand, heads, dim in (("mamba_expand", "mamba_n_heads", "mamba_d_head"),
                               ("mamba_expand", "n_mamba_heads", "mamba_headdim"),
                               ("expand", "num_heads", "head_dim")):
        if all(_is_int(fields.get(f)) for f in (expand, heads, dim)) and _is_int(width):
            out[dim] = fields[expand] * width // out.get(heads, fields[heads])
    expand = fields.get("mamba_expand")
    if _is_int(fields.get("mamba_d_ssm")) and _is_int(expand) and _is_int(width):  # Falcon-H1
        out["mamba_d_ssm"] = expand * width
        out["mamba_d_head"] = expand * width // out.get("mamba_n_heads", fields["mamba_n_heads"])
    # multi-head latent attention: the rotary part is the head dim that rotary embeddings see
    if _is_int(fields.get("qk_rope_head_dim")) and fields.get("head_dim") == fields["qk_rope_head_dim"]:
        out["head_dim"] = out.get("qk_rope_head_dim", fields["qk_rope_head_dim"])
    # experts that a configuration leaves unset at its defaults
    experts = any(_is_int(fields.get(f)) and fields[f] > 1 for f in ("n_routed_experts", "num_experts"))
    if experts and "num_experts_per_tok" in fields and fields["num_experts_per_tok"] is None:
        out["num_experts_per_tok"] = TOP_K
    # hybrids placed by period and offset: a period of 2 keeps one layer of each kind
    for name, value in fields.items():
        if name.endswith("_layer_period") and _is_int(value) and value > LAYERS:
            out[name] = LAYERS
            offset = name.replace("_period", "_offset")
            if _is_int(fields.get(offset)):
                out[offset] = fields[offset] % LAYERS
    if "attn_layer_indices" in fields and fields["attn_layer_indices"] is None:
        out["attn_layer_indices"] = [LAYERS - 1]
    # GPT-Neo: the attention pattern repeated once
    if isinstance(fields.get("attention_types"), list) and fields["attention_types"]:
        pattern = fields["attention_types"][0][0]
        out["attention_types"] = [[pattern, 1]]
        out["num_layers"] = len(pattern)
        out.pop("attention_layers", None)
    # a repeating block pattern shorter than the model: one of each kind
    blocks = fields.get("block_types")
    if isinstance(blocks, list) and all(isinstance(b, str) for b in blocks):
        kinds = list(dict.fromkeys(blocks))
        out["block_types"] = kinds
        for name in LAYER_FIELDS:
            if name in out or _is_int(fields.get(name)):
                out[name] = max(LAYERS, len(kinds))
    # layers that reuse another layer's key/value cache: as many again, sharing
    shared = fields.get("num_kv_shared_layers")
    if _is_int(shared) and shared > 0:
        n = next((out[f] for f in LAYER_FIELDS if f in out), None)
        if n:
            for name in LAYER_FIELDS:
                if out.get(name) == n:
                    out[name] = 2 * n
            for name, values in list(out.items()):
                if isinstance(values, list) and len(values) == n and name not in ("depths",):
                    out[name] = values * 2
            out["num_kv_shared_layers"] = n
    # Reformer: axial position embeddings cover exactly the sequence
    if isinstance(fields.get("axial_pos_shape"), list):
        out["axial_pos_shape"] = [4, SEQ // 4]
        w = width if _is_int(width) else WIDTH
        out["axial_pos_embds_dim"] = [w // 2, w - w // 2]
    if family == "hf-causal-lm" and fields.get("is_decoder") is False:
        out["is_decoder"] = True
    if isinstance(fields.get("depths"), (list, tuple)):
        out["depths"] = [1] * len(fields["depths"])
        return  # stages window their input: the image keeps its size
    size = fields.get("image_size")
    if _is_int(size) and size > HF_IMAGE:
        out["image_size"] = HF_IMAGE
    elif isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(s) and s > HF_IMAGE for s in size):
        out["image_size"] = [HF_IMAGE, HF_IMAGE]


def _config_overrides(config, family: str) -> dict[str, Any]:
    """Overrides for ``config`` and, as dicts, for each nested configuration."""
    fields = config.to_dict()
    out = _scalar_overrides(fields)
    plan = _layer_plan(fields)
    if plan:
        _apply_plan(fields, plan, out)
    _special_overrides(fields, out, family)
    for name, sub in _sub_configs(config).items():
        base = {k: v for k, v in sub.to_diff_dict().items() if not isinstance(v, list)}
        out[name] = {**base, **({"model_type": sub.model_type} if sub.model_type else {}),
                     **_config_overrides(sub, family)}
    return out


def _move_token_ids(overrides: dict[str, Any], config, vocab: int, moved: dict[int, int]) -> None:
    """Special-token ids past the shrunk vocabulary, moved to its top (equal ids stay equal), at every level."""
    def move(i: Any) -> Any:
        if not _is_int(i) or i < vocab:
            return i
        if i not in moved:
            moved[i] = vocab - 1 - len(moved)
        return moved[i]

    for name, value in config.to_dict().items():
        if name.endswith(TOKEN_ID_SUFFIXES) or name in ("unk_index", "mask_index"):
            new = [move(v) for v in value] if isinstance(value, list) else move(value)
            if new != value:
                overrides[name] = new
    for name, sub in _sub_configs(config).items():
        if isinstance(overrides.get(name), dict):
            _move_token_ids(overrides[name], sub, vocab, moved)


def _without_head_dims(overrides: dict[str, Any]) -> dict[str, Any]:
    return {k: (_without_head_dims(v) if isinstance(v, dict) and k != PER_LAYER_CONFIG else v)
            for k, v in overrides.items() if k not in HEAD_DIM_FIELDS}


def _keep_independent_head_dims(overrides: dict[str, Any], default, probe) -> dict[str, Any]:
    """Drop the head-dim overrides of fields that the configuration derives from others (they changed in
    ``probe``, built without them): the configuration derives them again, consistently."""
    out = dict(overrides)
    probe_fields, default_fields = probe.to_dict(), default.to_dict()
    for name in HEAD_DIM_FIELDS:
        if name in out and probe_fields.get(name) != default_fields.get(name):
            del out[name]
    for name, sub in _sub_configs(default).items():
        probe_sub = getattr(probe, name, None)
        if isinstance(out.get(name), dict) and probe_sub is not None:
            out[name] = _keep_independent_head_dims(out[name], sub, probe_sub)
    return out


def shrink_config(model_type: str, family: str = ""):
    """The configuration of ``model_type`` at its defaults, shrunk to a tiny model."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    overrides = {**_config_overrides(default, family), **HF_FIXED.get(model_type, {})}
    if default.to_dict().get("is_encoder_decoder") and getattr(default, "decoder_start_token_id", None) is None:
        pad = getattr(default, "pad_token_id", None)  # T5's checkpoints start decoding from the pad token
        overrides["decoder_start_token_id"] = pad if _is_int(pad) else 0
    vocab = min([v for v in _all_values(default, "vocab_size") if v > 0] or [VOCAB])
    _move_token_ids(overrides, default, min(vocab, VOCAB), {})
    try:
        probe = AutoConfig.for_model(model_type, **_without_head_dims(overrides))
    except Exception:
        return AutoConfig.for_model(model_type, **overrides)
    return AutoConfig.for_model(model_type, **_keep_independent_head_dims(overrides, default, probe))


def _all_fields(config) -> list[dict[str, Any]]:
    return [config.to_dict()] + [f for sub in _sub_configs(config).values() for f in _all_fields(sub)]


def _all_values(config, name: str) -> list[int]:
    return [f[name] for f in _all_fields(config) if _is_int(f.get(name))]


def _special_ids(config) -> set[int]:
    ids: set[int] = set()
    for fields in _all_fields(config):
        for name, value in fields.items():
            if name.endswith(TOKEN_ID_SUFFIXES) or name.endswith("token_id"):
                ids.update(v for v in (value if isinstance(value, list) else [value]) if _is_int(v))
    return ids


def token_ids(config, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random token ids within the vocabulary, none of them a special token (an image placeholder would
    ask for pixels)."""
    vocab = min(_all_values(config, "vocab_size") or [VOCAB])
    special = _special_ids(config)
    allowed = torch.tensor([i for i in range(vocab) if i not in special] or [0])
    return allowed[torch.randint(len(allowed), shape, generator=generator)]


def _image_fields(config) -> tuple[int, int]:
    size = next((f["image_size"] for f in _all_fields(config) if f.get("image_size") is not None), HF_IMAGE)
    size = size[0] if isinstance(size, (list, tuple)) else size
    channels = next(iter(_all_values(config, "num_channels")), 3)
    return (size if _is_int(size) else HF_IMAGE), channels


def build_hf(family: str, model_type: str) -> tuple[torch.nn.Module, Any]:
    import transformers

    from transformers.models.auto import modeling_auto

    config = shrink_config(model_type, family)
    classes = getattr(modeling_auto, FAMILIES[family])[model_type]
    config.architectures = [classes[0] if isinstance(classes, tuple) else classes]  # the head of a shared type
    model = getattr(transformers, HF_AUTO_CLASS[family]).from_config(config)
    if hasattr(model, "set_default_language") and getattr(config, "languages", None):  # X-MOD's adapters
        model.set_default_language(config.languages[0])
    gen = torch.Generator().manual_seed(0)
    if family == "hf-image-classification":
        params = inspect.signature(model.forward).parameters
        labels = torch.zeros(BATCH, dtype=torch.long)
        if "pixel_values" not in params and "input_ids" in params:  # pixels as tokens (ImageGPT)
            return model, {"input_ids": token_ids(config, (BATCH, SEQ), gen), "labels": labels}
        size, channels = _image_fields(config)
        return model, {"pixel_values": torch.randn(BATCH, channels, size, size, generator=gen), "labels": labels}
    ids = token_ids(config, (BATCH, SEQ), gen)
    if family == "hf-seq2seq" and getattr(config, "is_encoder_decoder", False):
        return model, {"input_ids": ids, "labels": token_ids(config, (BATCH, TARGET_SEQ), gen)}
    return model, {"input_ids": ids, "labels": ids.clone()}


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_inputs(inputs: Any) -> str:
    """A short description of nested inputs: shapes of tensors, lengths of lists."""
    if isinstance(inputs, torch.Tensor):
        return "x".join(map(str, inputs.shape)) if inputs.dim() else "scalar"
    if isinstance(inputs, dict):
        return "{" + ", ".join(f"{k}: {describe_inputs(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, (list, tuple)):
        items = [describe_inputs(v) for v in inputs]
        if isinstance(inputs, list) and len(set(items)) == 1 and len(items) > 1:
            return f"[{len(items)} x {items[0]}]"
        return ("[" if isinstance(inputs, list) else "(") + ", ".join(items) + ("]" if isinstance(inputs, list) else ")")
    return repr(inputs)

