"""Tiny, randomly initialised encoders of every family vitopt lifts, with awkward sizes.

Image sizes, token counts and widths are deliberately not multiples of 8. Each builder
returns (model in eval mode, example image batch).
"""
from __future__ import annotations

import torch
from torch import nn


def _images(batch: int, size: int, chans: int = 3) -> torch.Tensor:
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(0))


def _init_layer_scale(model: nn.Module) -> None:
    # LayerScale starts at a tiny constant; randomise it so folding it is really tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambda1" in name or "gamma" in name or name.endswith("ls1.gamma") or name.endswith("ls2.gamma"):
                p.copy_(torch.rand_like(p) + 0.5)


def timm_vit():
    import timm
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=20, patch_size=4,
                          embed_dim=36, depth=2, num_heads=3, num_classes=7)
    return m.eval(), _images(3, 20)


def timm_vit_mean_pool():
    import timm
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=20, patch_size=4,
                          embed_dim=36, depth=2, num_heads=3, num_classes=5, class_token=False,
                          global_pool="avg")
    return m.eval(), _images(3, 20)


def timm_vit_map():
    """SigLIP's layout in timm: no class token, attention pooling (MAP) with a latent query."""
    import timm
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=20, patch_size=4,
                          embed_dim=36, depth=2, num_heads=3, num_classes=5, class_token=False,
                          global_pool="map")
    return m.eval(), _images(3, 20)


def timm_vit_registers():
    import timm
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=20, patch_size=4,
                          embed_dim=36, depth=2, num_heads=3, num_classes=5, reg_tokens=3,
                          no_embed_class=True, init_values=0.1)
    _init_layer_scale(m)
    return m.eval(), _images(3, 20)


def timm_deit_distilled():
    import timm
    m = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=20,
                          patch_size=4, embed_dim=36, depth=2, num_heads=3, num_classes=6)
    return m.eval(), _images(3, 20)


def hf_vit():
    from transformers import ViTConfig, ViTForImageClassification
    cfg = ViTConfig(image_size=20, patch_size=4, hidden_size=36, num_hidden_layers=2,
                    num_attention_heads=3, intermediate_size=52, num_labels=7)
    return ViTForImageClassification(cfg).eval(), _images(3, 20)


def hf_deit():
    from transformers import DeiTConfig, DeiTForImageClassification
    cfg = DeiTConfig(image_size=20, patch_size=4, hidden_size=36, num_hidden_layers=2,
                     num_attention_heads=3, intermediate_size=52, num_labels=7)
    return DeiTForImageClassification(cfg).eval(), _images(3, 20)


def hf_clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel
    cfg = CLIPVisionConfig(image_size=20, patch_size=4, hidden_size=36, num_hidden_layers=2,
                           num_attention_heads=3, intermediate_size=52)
    return CLIPVisionModel(cfg).eval(), _images(3, 20)


def hf_siglip_vision():
    from transformers import SiglipVisionConfig, SiglipVisionModel
    cfg = SiglipVisionConfig(image_size=20, patch_size=4, hidden_size=36, num_hidden_layers=2,
                             num_attention_heads=3, intermediate_size=52)
    return SiglipVisionModel(cfg).eval(), _images(3, 20)


def hf_dinov2():
    from transformers import Dinov2Config, Dinov2Model
    cfg = Dinov2Config(image_size=20, patch_size=4, hidden_size=36, num_hidden_layers=2,
                       num_attention_heads=3, mlp_ratio=2, layerscale_value=0.5)
    m = Dinov2Model(cfg).eval()
    _init_layer_scale(m)
    return m, _images(3, 20)


def torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer
    m = VisionTransformer(image_size=20, patch_size=4, num_layers=2, num_heads=3, hidden_dim=36,
                          mlp_dim=52, num_classes=7)
    return m.eval(), _images(3, 20)


class UserAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, dim * 3)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.to_qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        out = attn.softmax(dim=-1) @ v
        return self.out(out.transpose(1, 2).reshape(b, n, d))


class UserBlock(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = UserAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class UserViT(nn.Module):
    """A ViT as people write it by hand: conv patchify, cls token, learned positions, eager attention."""

    def __init__(self, image=20, patch=4, dim=36, depth=2, heads=3, hidden=52, classes=7):
        super().__init__()
        self.patchify = nn.Conv2d(3, dim, patch, patch)
        n = (image // patch) ** 2
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(UserBlock(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, img):
        x = self.patchify(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def user_vit():
    return UserViT().eval(), _images(3, 20)


class FlatHeadViT(UserViT):
    """A head that reads every token flattened: its traced graph bakes in the token count."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(36 * 26, 7)

    def forward(self, img):
        x = self.patchify(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).flatten(1))


def flat_head_vit():
    return FlatHeadViT().eval(), _images(3, 20)


def resnet():
    from torchvision.models import resnet18
    return resnet18(num_classes=5).eval(), _images(2, 32)


FAMILIES = {
    "timm_vit": timm_vit,
    "timm_vit_mean_pool": timm_vit_mean_pool,
    "timm_vit_registers": timm_vit_registers,
    "timm_vit_map": timm_vit_map,
    "timm_deit_distilled": timm_deit_distilled,
    "hf_vit": hf_vit,
    "hf_deit": hf_deit,
    "hf_clip_vision": hf_clip_vision,
    "hf_siglip_vision": hf_siglip_vision,
    "hf_dinov2": hf_dinov2,
    "torchvision_vit": torchvision_vit,
    "user_vit": user_vit,
}
