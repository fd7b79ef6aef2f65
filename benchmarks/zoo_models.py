"""The zoo: tiny random models of every architecture family the analysis must handle.

One definition shared by `tests/compiler/surgery/test_surgery_zoo.py` and `benchmarks/zoo.py` (both load
this file by path; it is not part of the installed package). Each entry builds a fresh model in
eval mode with seeded random weights and the example inputs to trace it with. Hugging Face models
come from `transformers` configs (no hub access); the vision nets are written here.

    for entry in ZOO:
        model, inputs = entry.build()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, SEQ = 64, 6


@dataclass
class ZooEntry:
    name: str
    family: str
    build: Callable[[], tuple[nn.Module, dict]]
    onnx_refusal: str | None = None  # why torch.onnx (dynamo) cannot export it, when it cannot
    notes: str = ""
    expect_roles: tuple[str, ...] = field(default_factory=tuple)  # roles that must have a prunable group


def _seeded(fn: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    m = fn().eval()
    # random (not the init's zeros/ones) norm and bias values, so masking is actually exercised
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.copy_(torch.randn_like(mod.running_mean) * 0.1)
                mod.running_var.copy_(torch.rand_like(mod.running_var) + 0.5)
    return m


def _ids(n: int = SEQ) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (1, n), generator=g)


def _causal_lm(config_cls_name: str, **kw) -> Callable[[], tuple[nn.Module, dict]]:
    def build():
        import transformers
        from transformers import AutoModelForCausalLM

        cfg = getattr(transformers, config_cls_name)(vocab_size=VOCAB, **kw)
        m = _seeded(lambda: AutoModelForCausalLM.from_config(cfg))
        return m, {"input_ids": _ids()}
    return build


def extra_causal_lm(config_cls_name: str, **kw) -> Callable[[], nn.Module]:
    """A causal-LM family the zoo does not hold, built and seeded as the zoo builds its own (module only)."""
    build = _causal_lm(config_cls_name, **kw)
    return lambda: build()[0]


_LLAMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)


def _bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=32, type_vocab_size=2)
    m = _seeded(lambda: BertModel(cfg, add_pooling_layer=False))
    return m, {"input_ids": _ids(), "attention_mask": torch.ones(1, SEQ, dtype=torch.long)}


def _vit():
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=48)
    m = _seeded(lambda: ViTModel(cfg, add_pooling_layer=False))
    g = torch.Generator().manual_seed(2)
    return m, {"pixel_values": torch.randn(1, 3, 16, 16, generator=g)}


def _whisper_encoder():
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=48, num_mel_bins=8,
                        max_source_positions=8, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=48, vocab_size=VOCAB)
    m = _seeded(lambda: WhisperEncoder(cfg))
    g = torch.Generator().manual_seed(3)
    return m, {"input_features": torch.randn(1, 8, 16, generator=g)}


# --- vision nets written here ---------------------------------------------------------------------

class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(Bottleneck(8, 4, 16), Bottleneck(16, 4, 16))
        self.layer2 = nn.Sequential(Bottleneck(16, 8, 24, stride=2), Bottleneck(24, 8, 24))
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.fc1 = nn.Conv2d(c, max(2, c // r), 1)
        self.fc2 = nn.Conv2d(max(2, c // r), c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, expand: int, cout: int, stride: int = 1):
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.Hardswish())
        self.depthwise = nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.Hardswish())
        self.se = SqueezeExcite(mid)
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class TinyMobileNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        self.blocks = nn.Sequential(InvertedResidual(8, 3, 8), InvertedResidual(8, 3, 12, stride=2), InvertedResidual(12, 2, 12))
        # a grouped (not depthwise) conv: whole groups go together
        self.grouped = nn.Sequential(nn.Conv2d(12, 16, 3, 1, 1, groups=4, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = self.grouped(self.blocks(self.stem(x)))
        return self.head(x.mean((2, 3)))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.norm(x)))], 1)


class TinyDenseNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.block1 = nn.Sequential(DenseLayer(8, 4), DenseLayer(12, 4), DenseLayer(16, 4))
        self.transition = nn.Sequential(nn.BatchNorm2d(20), nn.ReLU(), nn.Conv2d(20, 12, 1, bias=False), nn.AvgPool2d(2))
        self.block2 = nn.Sequential(DenseLayer(12, 4), DenseLayer(16, 4))
        self.norm = nn.BatchNorm2d(20)
        self.fc = nn.Linear(20, classes)

    def forward(self, x):
        x = self.block2(self.transition(self.block1(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.norm(x)), 1).flatten(1))


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1), nn.GroupNorm(2, cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU())


class TinyUNet(nn.Module):
    def __init__(self, cin: int = 3, classes: int = 2):
        super().__init__()
        self.enc1 = _double_conv(cin, 8)
        self.enc2 = _double_conv(8, 16)
        self.bottom = _double_conv(16, 16)
        self.up2 = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec2 = _double_conv(8 + 16, 16)
        self.up1 = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec1 = _double_conv(16 + 8, 8)
        self.out = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottom(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.out(d1)


def _vision(cls: type[nn.Module], size: int = 16) -> Callable[[], tuple[nn.Module, dict]]:
    def build():
        m = _seeded(cls)
        g = torch.Generator().manual_seed(4)
        return m, {"x": torch.randn(1, 3, size, size, generator=g)}
    return build


_MOE_REFUSAL = ("torch.onnx (dynamo) has no translation for transformers' grouped_mm_fallback custom op "
                "that runs 3-D MoE experts")

ZOO: list[ZooEntry] = [
    ZooEntry("resnet-bottleneck", "vision", _vision(TinyResNet), expect_roles=("conv.channel",)),
    ZooEntry("mobilenet-dw-se", "vision", _vision(TinyMobileNet), expect_roles=("conv.channel",)),
    ZooEntry("densenet-concat", "vision", _vision(TinyDenseNet), expect_roles=("conv.channel",)),
    ZooEntry("unet-skip-concat", "vision", _vision(TinyUNet), expect_roles=("conv.channel",)),
    ZooEntry("llama-gqa", "llama", _causal_lm("LlamaConfig", num_key_value_heads=2, tie_word_embeddings=True, **_LLAMA),
             expect_roles=("attention.kv_group", "mlp.neuron")),
    ZooEntry("llama-mha", "llama", _causal_lm("LlamaConfig", num_key_value_heads=4, **_LLAMA),
             expect_roles=("attention.head", "mlp.neuron")),
    ZooEntry("llama-gqa-eager", "llama", _causal_lm("LlamaConfig", num_key_value_heads=2, attn_implementation="eager", **_LLAMA),
             expect_roles=("attention.kv_group", "mlp.neuron")),
    ZooEntry("mistral-gqa", "mistral", _causal_lm("MistralConfig", num_key_value_heads=2, **_LLAMA),
             expect_roles=("attention.kv_group", "mlp.neuron")),
    ZooEntry("mistral-mha", "mistral", _causal_lm("MistralConfig", num_key_value_heads=4, **_LLAMA),
             expect_roles=("attention.head", "mlp.neuron")),
    ZooEntry("qwen2-mha", "qwen2", _causal_lm("Qwen2Config", num_key_value_heads=4, **_LLAMA),
             expect_roles=("attention.head", "mlp.neuron")),
    ZooEntry("qwen2-gqa", "qwen2", _causal_lm("Qwen2Config", num_key_value_heads=2, **_LLAMA),
             expect_roles=("attention.kv_group", "mlp.neuron")),
    ZooEntry("qwen3-gqa", "qwen3", _causal_lm("Qwen3Config", num_key_value_heads=2, head_dim=8, **_LLAMA),
             expect_roles=("attention.kv_group", "mlp.neuron")),
    ZooEntry("qwen3-mha", "qwen3", _causal_lm("Qwen3Config", num_key_value_heads=4, head_dim=8, **_LLAMA),
             expect_roles=("attention.head", "mlp.neuron")),
    ZooEntry("gemma-mqa", "gemma", _causal_lm("GemmaConfig", num_key_value_heads=1, head_dim=8, **_LLAMA),
             expect_roles=("mlp.neuron",), notes="one KV head: its KV group has a single channel"),
    ZooEntry("gemma-gqa", "gemma", _causal_lm("GemmaConfig", num_key_value_heads=2, head_dim=8, **_LLAMA),
             expect_roles=("attention.kv_group", "mlp.neuron")),
    ZooEntry("phi3-gqa", "phi3", _causal_lm("Phi3Config", num_key_value_heads=2, pad_token_id=0, **_LLAMA),
             expect_roles=("mlp.neuron",), notes="fused qkv_proj sliced at offsets from the config: heads unprunable"),
    ZooEntry("phi3-mha", "phi3", _causal_lm("Phi3Config", num_key_value_heads=4, pad_token_id=0, **_LLAMA),
             expect_roles=("mlp.neuron",), notes="fused qkv_proj sliced at offsets from the config: heads unprunable"),
    ZooEntry("gpt2", "gpt2", _causal_lm("GPT2Config", n_embd=32, n_layer=2, n_head=4, n_positions=32),
             expect_roles=("attention.head", "mlp.neuron")),
    ZooEntry("gpt-neox", "gpt_neox", _causal_lm("GPTNeoXConfig", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                num_attention_heads=4, max_position_embeddings=64),
             expect_roles=("attention.head", "mlp.neuron")),
    ZooEntry("opt", "opt", _causal_lm("OPTConfig", hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                                      max_position_embeddings=32, word_embed_proj_dim=32),
             expect_roles=("attention.head", "mlp.neuron")),
    ZooEntry("bert", "bert", _bert, expect_roles=("attention.head", "mlp.neuron")),
    ZooEntry("vit", "vit", _vit, expect_roles=("attention.head", "mlp.neuron")),
    ZooEntry("whisper-encoder", "whisper", _whisper_encoder, expect_roles=("attention.head", "mlp.neuron")),
    ZooEntry("mixtral", "mixtral", _causal_lm("MixtralConfig", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                              **_LLAMA),
             onnx_refusal=_MOE_REFUSAL, expect_roles=("attention.kv_group", "moe.expert", "moe.expert_neuron")),
    ZooEntry("qwen2-moe", "qwen2_moe", _causal_lm("Qwen2MoeConfig", num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                                  moe_intermediate_size=24, shared_expert_intermediate_size=40, **_LLAMA),
             onnx_refusal=_MOE_REFUSAL, expect_roles=("attention.kv_group", "moe.expert", "moe.expert_neuron")),
]


def by_name(name: str) -> ZooEntry:
    for e in ZOO:
        if e.name == name:
            return e
    raise KeyError(name)


def main_output(out) -> torch.Tensor:
    """The tensor to compare: logits / last hidden state / the plain tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        v = getattr(out, key, None)
        if v is None and isinstance(out, dict):
            v = out.get(key)
        if v is not None:
            return v
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"no tensor output in {type(out).__name__}")
